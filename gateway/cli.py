"""`lora-gateway serve`: run the gateway with settings from LGW_* variables and flags.

Every setting of ``GatewaySettings`` is a flag (``max_cpu_loras`` → ``--max-cpu-loras``),
except secrets, which come from the environment only (a flag would show in ``ps``).
Flags win over the environment; pydantic validates both the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Callable

from pydantic import SecretStr, ValidationError

from gateway.config import GatewaySettings
from gateway.observability.logs import configure_logging, quiet_known_harmless
from gateway.server import serve_settings


def _flag_fields() -> dict[str, str]:
    """setting name -> how its flag takes values: 'bool', 'list' (repeatable) or 'value'."""
    kinds = {}
    for name, field in GatewaySettings.model_fields.items():
        annotation = field.annotation
        args = typing.get_args(annotation)
        if annotation is SecretStr or SecretStr in args:
            continue
        if annotation is bool:
            kinds[name] = "bool"
        elif typing.get_origin(annotation) is list:
            kinds[name] = "list"
        else:
            kinds[name] = "value"
    return kinds


def _number_type(annotation: object) -> type[int] | type[float] | None:
    """int or float where the setting is one (pydantic takes no "16" for Literal[16])."""
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        return int if values and all(type(v) is int for v in values) else None
    kinds = {a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)}
    return next(iter(kinds)) if kinds in ({int}, {float}) else None


FLAG_FIELDS = _flag_fields()
# The registry commands' names for the same settings, so one command line serves both.
ALIASES = {"database_url": ("--db",), "artifacts_dir": ("--artifacts",)}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible gateway",
                       description=__doc__.splitlines()[0])
    for name, kind in FLAG_FIELDS.items():
        field = GatewaySettings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "") + f" (env LGW_{name.upper()})"
        if kind == "bool":
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind == "list":
            p.add_argument(flag.rstrip("s"), dest=name, action="append", metavar="VALUE",
                           help=help_text + "; repeat the flag for several")
        else:
            p.add_argument(flag, *ALIASES.get(name, ()), dest=name, metavar=name.upper(),
                           help=help_text, type=_number_type(field.annotation) or str)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    overrides = {k: getattr(args, k) for k in FLAG_FIELDS if getattr(args, k, None) is not None}
    return GatewaySettings(**overrides)


def settings_problems(exc: ValidationError) -> str:
    """One line per invalid setting, named as the operator wrote it."""
    lines = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        shown = json.dumps(err.get("input"), default=str)[:80] if "input" in err else ""
        lines.append(f"  --{name.replace('_', '-')} (LGW_{name.upper()}): {err['msg']}"
                     + (f" (got {shown})" if shown and err["type"] != "missing" else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace,
        on_started: Callable[[GatewaySettings], Callable[[], None]] | None = None) -> int:
    """Serve; ``on_started(settings)`` runs once the server accepts requests, and what it
    returns runs when the server has stopped (the composition's in-process extras)."""
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"lora-gateway serve: invalid settings:\n{settings_problems(exc)}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, settings.log_format)
    quiet_known_harmless(settings.cache_dir)
    stops: list[Callable[[], None]] = []
    started = None if on_started is None else (lambda: stops.append(on_started(settings)))
    try:
        return serve_settings(settings, args.log_level, command="lora-gateway serve", on_started=started)
    finally:
        for stop in stops:
            stop()


__all__ = ["register", "run", "settings_from_args"]
