"""The usage ledger: exact usage per tenant, model (an adapter version, or the base) and
minute, written by every gateway process, read for chargeback.

Each writer (one gateway process: its replica name and a per-process id) keeps absolute
totals per (tenant, model, minute) and replaces its own rows with them (``write``): a
flush that is retried, or that committed before its caller saw an error, counts nothing
twice, and a restarted process is a new writer whose rows add to the old one's. Readers
sum over writers (``read``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from adapters_registry.db import AnswerStatsRow, UsageRow, as_utc
from adapters_registry.errors import ValidationError

__all__ = ["Ledger", "UsageCounts", "UsageRecord", "read", "write"]


@dataclass(frozen=True)
class UsageCounts:
    requests_2xx: int = 0
    requests_4xx: int = 0
    requests_5xx: int = 0
    aborted: int = 0  # answers the client left before they ended
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: UsageCounts) -> UsageCounts:
        return UsageCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


COUNTS = tuple(f.name for f in fields(UsageCounts))
MAX_RANGE = timedelta(days=31)  # a read's span: a month of minutes per tenant and model


@dataclass(frozen=True)
class UsageRecord:
    tenant: str
    model: str  # tenant/name@vN, or the base's served name
    minute: datetime  # UTC, the minute's start
    counts: UsageCounts
    # Its answers' figures (``answer_stats``), written beside the bill; not part of it.
    stats: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, object]:
        return {"tenant": self.tenant, "model": self.model, "minute": self.minute.isoformat(),
                **asdict(self.counts)}


def write(engine: Engine, writer: str, records: Iterable[UsageRecord]) -> None:
    """Replace ``writer``'s totals (and answer figures) for each record's (tenant, model,
    minute), in one transaction. A record with no usage (a shadow comparison's only) has
    no row in the bill."""
    records = list(records)
    rows = [{"writer": writer, "tenant": r.tenant, "model": r.model, "minute": r.minute,
             **asdict(r.counts)} for r in records if r.counts != UsageCounts()]
    stats = [{"writer": writer, "tenant": r.tenant, "model": r.model, "minute": r.minute,
              "stats": r.stats} for r in records if r.stats is not None]
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    with Session(engine) as s, s.begin():
        for table, values, names in ((UsageRow, rows, COUNTS), (AnswerStatsRow, stats, ("stats",))):
            if values:
                stmt = insert(table)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["writer", "tenant", "model", "minute"],
                    set_={name: getattr(stmt.excluded, name) for name in names})
                s.execute(stmt, values)


def read(engine: Engine, start: datetime, end: datetime, *,
         tenant: str | None = None) -> list[UsageRecord]:
    """Every writer's usage summed per tenant, model and minute in [start, end), oldest first."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValidationError("usage: give --from and --to with a timezone (e.g. 2026-12-07T00:00Z)")
    if end <= start:
        raise ValidationError("usage: the end must come after the start")
    if end - start > MAX_RANGE:
        raise ValidationError(f"usage: ask for at most {MAX_RANGE.days} days at a time")
    sums = [func.sum(getattr(UsageRow, name)).label(name) for name in COUNTS]
    q = (select(UsageRow.tenant, UsageRow.model, UsageRow.minute, *sums)
         .where(UsageRow.minute >= start, UsageRow.minute < end)
         .group_by(UsageRow.tenant, UsageRow.model, UsageRow.minute)
         .order_by(UsageRow.minute, UsageRow.tenant, UsageRow.model))
    if tenant is not None:
        q = q.where(UsageRow.tenant == tenant)
    with Session(engine) as s:
        return [UsageRecord(t, m, as_utc(minute), UsageCounts(*(int(v) for v in rest)))
                for t, m, minute, *rest in s.execute(q)]


class Ledger:
    """The registry's usage service over one database (the facade's ``record_usage`` and
    ``usage``)."""

    def __init__(self, db: Engine) -> None:
        self.db = db

    def record_usage(self, writer: str, records: Iterable[UsageRecord]) -> None:
        write(self.db, writer, records)

    def usage(self, start: datetime, end: datetime, *, tenant: str | None = None) -> list[UsageRecord]:
        return read(self.db, start, end, tenant=tenant)
