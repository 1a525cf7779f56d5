"""The audit trail: one row per change, written in the change's own transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from adapters_registry.db import AuditRow, as_utc


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]


def record(s: Session, actor: str, action: str, subject: str, **details: Any) -> None:
    s.add(AuditRow(actor=actor, action=action, subject=subject, details=details))


def read(engine: Engine, *, subject_prefix: str | None = None, limit: int = 100) -> list[AuditEntry]:
    """Newest first."""
    q = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
    if subject_prefix:
        q = q.where(AuditRow.subject.startswith(subject_prefix, autoescape=True))
    with Session(engine) as s:
        return [AuditEntry(as_utc(r.at), r.actor, r.action, r.subject, dict(r.details))
                for r in s.scalars(q)]
