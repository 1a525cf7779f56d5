"""A rollout step's evidence and rules: what each version answered, from the usage ledger
(every replica's answers per version and minute), and when the candidate must go back.
Used by ``rollouts.Rollouts``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters_registry.db import AdapterVersionRow, RolloutRow, UsageRow
from adapters_registry.errors import ValidationError
from adapters_registry.records import Tenant

__all__ = ["RolloutRules", "baseline", "breach", "counts", "gates_passed", "ledger_ref"]


@dataclass(frozen=True)
class RolloutRules:
    """What each step must show (see the module docstring)."""

    min_requests: int = 20
    min_step_seconds: float = 60.0
    max_error_rate: float = 0.05
    max_error_rate_increase: float = 0.02

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.min_requests <= 1_000_000:
            out.append(f"min_requests {self.min_requests} is outside 1..1000000")
        if not 0 <= self.min_step_seconds <= 7 * 86400:
            out.append(f"min_step_seconds {self.min_step_seconds} is outside 0..604800")
        for name in ("max_error_rate", "max_error_rate_increase"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"{name} {getattr(self, name)} is outside 0..1")
        return out


def gates_passed(s: Session, adapter_id: int, version: int, ref: str) -> None:
    """A version made by the trainer carries its eval gates in its manifest: a failed report
    never takes traffic. (One registered from elsewhere has none to check.)"""
    row = s.scalar(select(AdapterVersionRow).filter_by(adapter_id=adapter_id, version=version))
    evals = ((row.manifest or {}).get("metrics") or {}).get("evals") if row is not None else None
    if isinstance(evals, dict) and evals.get("passed") is False:
        failed = ", ".join(g.get("name", "?") for g in evals.get("gates", []) if not g.get("passed"))
        raise ValidationError(f"{ref}'s trainer gates failed ({failed or 'see its manifest'}): "
                              "a version whose gates failed is never rolled out")


_COUNTS = ("requests_2xx", "requests_4xx", "requests_5xx", "aborted")


def ledger_ref(tenant: Tenant, name: str, version: int) -> str:
    return f"{tenant.name}/{name}@v{version}"  # as the ledger names what served


def _sums(s: Session, tenant: str, model: str, *where: Any) -> dict[str, int]:
    row = s.execute(select(*(func.coalesce(func.sum(getattr(UsageRow, n)), 0) for n in _COUNTS))
                    .where(UsageRow.tenant == tenant, UsageRow.model == model, *where)).one()
    return dict(zip(_COUNTS, (int(v) for v in row), strict=True))


def baseline(s: Session, tenant: str, name: str, row: RolloutRow,
              now: datetime) -> dict[str, dict[str, int]]:
    """What the step's start minute already holds of each version (not the step's)."""
    minute = now.replace(second=0, microsecond=0)
    return {side: _sums(s, tenant, f"{tenant}/{name}@v{version}", UsageRow.minute == minute)
            for side, version in (("stable", row.stable_version),
                                  ("candidate", row.candidate_version))}


def counts(s: Session, tenant: str, model: str, since: datetime,
            baseline: dict[str, int] | None) -> dict[str, Any]:
    """A version's answers from every writer since ``since`` (a minute's start), less what
    that minute held when the step began."""
    counts = _sums(s, tenant, model, UsageRow.minute >= since)
    counts = {k: max(0, v - (baseline or {}).get(k, 0)) for k, v in counts.items()}
    answers = sum(counts.values())
    errors = counts["requests_5xx"]
    return {**counts, "answers": answers, "error_rate": errors / answers if answers else 0.0}


def breach(rules: RolloutRules, cand: dict[str, Any], stable: dict[str, Any]) -> str:
    """Why the candidate must go back now, or ""."""
    errors = cand["requests_5xx"]
    if errors > rules.max_error_rate * rules.min_requests:
        return (f"{errors} server errors in {cand['answers']} answers: more than "
                f"{rules.max_error_rate:.2%} of the {rules.min_requests}-answer minimum sample")
    if cand["answers"] < rules.min_requests:
        return ""
    if cand["error_rate"] > rules.max_error_rate:
        return f"error rate {cand['error_rate']:.4f} > max_error_rate {rules.max_error_rate}"
    if cand["error_rate"] - stable["error_rate"] > rules.max_error_rate_increase:
        return (f"error rate {cand['error_rate']:.4f} exceeds the stable version's "
                f"{stable['error_rate']:.4f} by more than {rules.max_error_rate_increase}")
    return ""

