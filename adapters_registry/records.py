"""What the registry hands out: frozen values, never ORM rows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from adapters_registry.errors import NotFoundError, ValidationError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_REF_RE = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9._-]{0,62})"
    r"(?:(?::(?P<alias>[a-z0-9][a-z0-9._-]{0,62}))|(?:@v(?P<version>[0-9]{1,9})))?$"
)


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str


@dataclass(frozen=True)
class ApiKeyInfo:
    """What can be shown about a key after creation: never the key itself."""

    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable adapter version, as the gateway serves it."""

    lora_int_id: int
    tenant: str
    adapter: str
    version: int
    content_sha256: str
    files: dict[str, str]  # relative path -> sha256
    base_model_id: str
    base_revision: str
    template_id: str
    size_bytes: int
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.tenant}/{self.adapter}@v{self.version}"


@dataclass(frozen=True)
class AdapterInfo:
    tenant: str
    name: str
    template_id: str
    default_alias: str
    aliases: dict[str, int]  # alias -> version number
    versions: list[int]
    created_at: datetime


@dataclass(frozen=True)
class ModelRef:
    """A request's ``model``: ``name`` (default alias), ``name:alias`` or ``name@vN``."""

    name: str
    alias: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        # The message never echoes "exists/doesn't exist": malformed and unknown read alike.
        match = _REF_RE.match(text)
        if match is None:
            raise NotFoundError(f"model {text!r} does not exist")
        version = match.group("version")
        return cls(match.group("name"), match.group("alias"), int(version) if version else None)


def validate_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ValidationError(
            f"{kind} name {name!r} is invalid: use 1-63 lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name
