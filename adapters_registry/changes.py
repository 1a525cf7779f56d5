"""Change notices: what a registry mutation changed, for every gateway replica's caches.

On PostgreSQL each mutation that changes what a name resolves to, which keys are valid
or a tenant's limits issues ``pg_notify`` in its own transaction, so every writer (the
admin API of any replica, the ``lora-gateway registry`` CLI, a script) publishes, and a
notice is delivered only when the change commits. SQLite has no channel: one gateway
process alone, trusting its resolve TTL.

A notice names the tenant, the adapter and the kind of change; never a key or its hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

from sqlalchemy import select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from adapters_registry.db import GenerationRow
from adapters_registry.errors import ValidationError

Kind = Literal["alias", "version", "adapter", "keys", "limits"]
KINDS: tuple[str, ...] = get_args(Kind)
ADAPTER_KINDS = frozenset({"alias", "version", "adapter"})  # what a name resolves to
FORMAT = 1
# One channel per registry (database + schema): notices are database-wide in PostgreSQL,
# and two registries in schemas of one database must not see each other's changes.
CHANNEL_SQL = "'lgw_changes_' || md5(current_schema())"
GENERATION_ROW = 1


@dataclass(frozen=True)
class Change:
    """``kind`` of change to ``tenant``'s ``adapter`` (None for keys and limits)."""

    kind: Kind
    tenant_id: int
    tenant: str
    adapter: str | None = None

    def __post_init__(self) -> None:
        if (self.kind in ADAPTER_KINDS) != (self.adapter is not None):
            raise ValueError(f"a {self.kind!r} change names an adapter iff it is one of "
                             f"{sorted(ADAPTER_KINDS)}")

    def payload(self) -> str:
        return json.dumps({"format": FORMAT, "kind": self.kind, "tenant_id": self.tenant_id,
                           "tenant": self.tenant, "adapter": self.adapter}, separators=(",", ":"))

    @classmethod
    def parse(cls, payload: str) -> Change:
        """The change a notice describes; ValidationError naming what is wrong with it."""
        try:
            data: Any = json.loads(payload)
        except ValueError:
            raise ValidationError(f"change notice is not JSON: {payload[:80]!r}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValidationError(f"change notice is not format {FORMAT}: {payload[:80]!r}")
        kind: Any = data.get("kind")
        tenant_id: Any = data.get("tenant_id")
        tenant: Any = data.get("tenant")
        adapter: Any = data.get("adapter")
        problems = []
        if kind not in KINDS:
            problems.append(f"kind must be one of {list(KINDS)}")
        if isinstance(tenant_id, bool) or not isinstance(tenant_id, int):
            problems.append("tenant_id must be an integer")
        if not isinstance(tenant, str) or not tenant:
            problems.append("tenant must be a name")
        if kind in KINDS and (kind in ADAPTER_KINDS) != (isinstance(adapter, str) and bool(adapter)):
            problems.append(f"adapter must be {'a name' if kind in ADAPTER_KINDS else 'null'} "
                            f"for a {kind!r} change")
        if problems:
            raise ValidationError(f"change notice {payload[:80]!r}: {'; '.join(problems)}")
        return cls(kind, tenant_id, tenant, adapter)


def publish(s: Session, change: Change) -> None:
    """Announce ``change`` when (and only if) ``s``'s transaction commits: the registry's
    generation goes up by one (every backend), and on PostgreSQL a notice goes out."""
    s.execute(update(GenerationRow).where(GenerationRow.id == GENERATION_ROW)
              .values(generation=GenerationRow.generation + 1))
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text(f"SELECT pg_notify({CHANNEL_SQL}, :payload)"),
                  {"payload": change.payload()})


def generation(db: Engine) -> int:
    """How many changes the registry has published: equal readings mean nothing changed
    in between (one indexed read of one row)."""
    with db.connect() as conn:
        value = conn.execute(select(GenerationRow.generation)
                             .where(GenerationRow.id == GENERATION_ROW)).scalar_one()
    return int(value)


def listen_params(db: Engine) -> dict[str, Any] | None:
    """psycopg (3) connection keywords for the registry database; None when it has no channel."""
    if db.dialect.name != "postgresql":
        return None
    _, params = db.dialect.create_connect_args(db.url)
    params.pop("context", None)  # the dialect's sync adapters map; a listener needs none
    return dict(params)
