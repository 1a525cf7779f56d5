"""Every name the registry accepts, and every reference form, parsed in one place.

Names are matched against the *whole* string (``re.fullmatch``): ``$`` also matches
before a trailing newline, which once let ``bot\\n`` become a second, unreachable
adapter beside ``bot``. Messages echo what they refuse through :func:`shown`, so a
10,000-character name is never printed back whole.

Reference forms:
    ``TENANT/NAME``                    an adapter, as operators name it (CLI, trainer)
    ``NAME``, ``NAME:ALIAS``, ``NAME@vN``  a request's ``model`` (the caller's namespace)
    ``TENANT/NAME[:ALIAS|@vN]``        an operator's name for what a model resolves to
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from adapters_registry.errors import NotFoundError, ValidationError

__all__ = [
    "AdapterRef",
    "ModelRef",
    "NameKind",
    "parse_adapter_ref",
    "parse_qualified_model",
    "shown",
    "validate_name",
]

NameKind = Literal["tenant", "adapter", "alias", "template", "base"]

_SLUG = r"[a-z0-9][a-z0-9._-]{0,62}"
# Hub-style ids ("tiny-llama", "HuggingFaceTB/SmolLM2-135M-Instruct"): case kept, one '/'.
_BASE_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_PATTERNS: dict[str, re.Pattern[str]] = {
    "tenant": re.compile(_SLUG),
    "adapter": re.compile(_SLUG),
    "alias": re.compile(_SLUG),
    "template": re.compile(r"tpl-[0-9a-f]{16}"),
    "base": re.compile(rf"{_BASE_PART}(?:/{_BASE_PART})?"),
}
_RULES = {
    "tenant": "1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit",
    "template": "'tpl-' and 16 lowercase hex digits, as add-template prints it",
    "base": "a model id such as 'tiny-llama' or 'org/model' (letters, digits, '.', '_', '-')",
}
_MODEL = re.compile(rf"(?P<name>{_SLUG})(?::(?P<alias>{_SLUG})|@v(?P<version>[1-9][0-9]{{0,8}}))?")
SHOWN_CHARS = 80


def shown(text: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(text)``, cut to ``limit`` characters with a note of the full length."""
    if not isinstance(text, str):
        text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def validate_name(kind: NameKind, name: str) -> str:
    """``name`` itself if it is a valid ``kind`` name; ValidationError otherwise."""
    if not isinstance(name, str) or _PATTERNS[kind].fullmatch(name) is None:
        rule = _RULES.get(kind, _RULES["tenant"])
        raise ValidationError(f"{kind} name {shown(name)} is invalid: use {rule}")
    return name


@dataclass(frozen=True)
class AdapterRef:
    """``TENANT/NAME``: one adapter of one tenant."""

    tenant: str
    name: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}"


def parse_adapter_ref(text: str, *, what: str = "adapter") -> AdapterRef:
    """``TENANT/NAME`` with both names valid; ValidationError says what ``what`` expects."""
    tenant, sep, name = text.partition("/")
    if not sep or not tenant or not name:
        raise ValidationError(f"{what} expects TENANT/NAME, got {shown(text)}")
    return AdapterRef(validate_name("tenant", tenant), validate_name("adapter", name))


@dataclass(frozen=True)
class ModelRef:
    """A request's ``model``: ``name`` (default alias), ``name:alias`` or ``name@vN``."""

    name: str
    alias: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """NotFoundError for anything malformed: unknown and malformed names read alike (404)."""
        match = _MODEL.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise NotFoundError(f"model {shown(text)} does not exist")
        version = match.group("version")
        return cls(match.group("name"), match.group("alias"), int(version) if version else None)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@v{self.version}"
        return f"{self.name}:{self.alias}" if self.alias else self.name


def parse_qualified_model(text: str) -> tuple[str, ModelRef]:
    """``TENANT/NAME[:ALIAS|@vN]`` -> (tenant, model); ValidationError when not of that form.

    The model part is parsed as a request's would be (NotFoundError when malformed).
    """
    tenant, sep, model = text.partition("/")
    if not sep or not tenant or not model:
        raise ValidationError(f"adapter {shown(text)} must be TENANT/NAME[:ALIAS|@vN]")
    return validate_name("tenant", tenant), ModelRef.parse(model)
