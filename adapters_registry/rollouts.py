"""Progressive delivery: a candidate version earns an alias's traffic step by step.

``start`` splits the alias between its stable version and the candidate at the first
step's percentage (``catalog`` splits: each caller sticky to one version). ``decide``
then judges every running rollout on its evidence, read from the usage ledger: what every
replica answered, per version and minute, in this database, so it is the fleet's evidence,
not one replica's. Over the current step's window (from the step's start minute on):

(The ledger counts per minute: what the start minute held when the step began is kept
as the step's baseline and taken off, so a step's window is its own answers, give or take
what the replicas had not flushed yet, at most ``usage_flush_seconds`` of them.)

- a breach rolls back at once (the alias names the stable version again; state
  ``rolled_back``): once the candidate has ``min_requests`` answers, its share of server
  errors (5xx, in-stream errors included) above ``max_error_rate`` or above the stable
  version's by more than ``max_error_rate_increase``; its refusal rate above the stable
  version's by more than ``max_refusal_rate_increase``; its time to first token or
  latency p95 more than ``max_ttft_p95_ratio`` / ``max_latency_p95_ratio`` times the
  stable version's; its tokens per answer more than ``max_tokens_per_answer_ratio``
  apart from the stable version's. Sooner: when its errors alone already exceed what
  that minimum sample could absorb, or when ``min_shadow_pairs`` shadow comparisons show
  its greedy answers agreeing less than ``min_shadow_agreement`` or diverging by more
  than ``max_shadow_kl`` (``rollout_evidence``, ``answer_stats``);
- a step with ``min_requests`` candidate answers (and ``min_shadow_pairs`` comparisons
  while it shadows), ``min_step_seconds`` behind it and no breach advances; past the
  last step (100 %) the alias names the candidate (``promoted``).

One process decides at a time: the holder of the ``rollouts`` lease (a row in this
database, taken when free or expired, renewed by its holder), so replicas never race
each other's decisions. Every start, step, pause, resume, promotion, rollback and abort is
an audit entry with its reason and figures, and the state survives any restart. A rollout
whose alias was moved by hand (``set-alias``, another split) stops as ``superseded``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adapters_registry._audit import record
from adapters_registry.catalog import Catalog
from adapters_registry.changes import Change, publish
from adapters_registry.db import (
    AdapterRow,
    AnswerStatsRow,
    LeaseRow,
    RolloutRow,
    TenantRow,
    as_utc,
)
from adapters_registry.errors import ConflictError, NotFoundError, ValidationError
from adapters_registry.names import validate_name
from adapters_registry.records import Tenant
from adapters_registry.rollout_evidence import (
    RolloutRules,
    baseline,
    breach,
    counts,
    gates_passed,
    ledger_ref,
    shadow_short,
    summary,
)
from adapters_registry.splits import split_labels
from adapters_registry.tenancy import Tenancy

logger = logging.getLogger(__name__)
__all__ = ["DEFAULT_STEPS", "Rollout", "RolloutRules", "Rollouts"]
DEFAULT_STEPS = (5, 25, 50, 100)
LEASE = "rollouts"
STATS_KEPT = timedelta(days=14)  # answer figures a step may read; older ones are pruned
PRUNE_EVERY = timedelta(hours=1)
ACTIVE = ("running", "paused")


@dataclass(frozen=True)
class Rollout:
    id: int
    tenant: str
    adapter: str
    alias: str
    stable: int
    candidate: int
    percents: tuple[int, ...]
    step: int
    state: str  # running, paused, promoted, rolled_back, aborted, superseded
    rules: RolloutRules
    reason: str
    evidence: dict[str, Any]  # the last judgement's figures
    step_started_at: datetime
    updated_at: datetime

    @property
    def percent(self) -> int:
        """The candidate's share of the alias's callers now (0 once it is over, unless promoted)."""
        if self.state == "promoted":
            return 100
        return self.percents[self.step] if self.state in ACTIVE else 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["percent"] = self.percent
        for key in ("step_started_at", "updated_at"):
            out[key] = out[key].isoformat()
        return out


def steps_problems(percents: Sequence[int]) -> list[str]:
    out = []
    if not 1 <= len(percents) <= 10:
        out.append(f"{len(percents)} steps; give 1 to 10")
    if any(isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 100 for p in percents):
        out.append(f"steps {list(percents)}: each a whole percentage in 1..100")
    elif list(percents) != sorted(set(percents)):
        out.append(f"steps {list(percents)} must rise")
    if percents and percents[-1] != 100:
        out.append("the last step must be 100 (the candidate takes all of the alias's traffic)")
    return out


class Rollouts:
    def __init__(self, db: Engine, catalog: Catalog, tenancy: Tenancy, *, actor: str) -> None:
        self.db = db
        self._catalog = catalog
        self._tenancy = tenancy
        self.actor = actor
        self._pruned: datetime | None = None

    def start(self, tenant_name: str, name: str, alias: str, candidate: int,
              percents: Sequence[int] = DEFAULT_STEPS, rules: RolloutRules | None = None) -> Rollout:
        """Roll ``candidate`` out under ``alias`` (whose version is the stable one)."""
        validate_name("alias", alias)
        rules = rules or RolloutRules()
        problems = steps_problems(percents) + rules.problems()
        if problems:
            raise ValidationError(f"invalid rollout for {tenant_name}/{name}:{alias}: "
                                  + "; ".join(problems))
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s, s.begin():
            adapter = self._adapter(s, tenant, name)
            active = self._active(s, adapter.id, alias)
            if active is not None:
                raise ConflictError(f"{tenant.name}/{name}:{alias} already has a rollout of "
                                    f"v{active.candidate_version} ({active.state}); abort it first")
            stable = self._catalog.alias_version(s, tenant, name, alias)
            if stable is None:
                raise NotFoundError(f"alias {tenant.name}/{name}:{alias} does not exist; point "
                                    "it at the stable version first (registry set-alias)")
            if split_labels(s, adapter.id, alias):
                raise ConflictError(f"{tenant.name}/{name}:{alias} is split by hand; set-alias "
                                    "it to the stable version first")
            if candidate == stable:
                raise ValidationError(f"v{candidate} is already {tenant.name}/{name}:{alias}'s version")
            gates_passed(s, adapter.id, candidate, f"{tenant.name}/{name}@v{candidate}")
            now = datetime.now(UTC)
            row = RolloutRow(adapter_id=adapter.id, alias=alias, stable_version=stable,
                             candidate_version=candidate, steps={"percents": list(percents)},
                             rules=asdict(rules), step=0, state="running", active=True,
                             reason="started", evidence={}, step_started_at=now, updated_at=now)
            row.evidence = {"baseline": baseline(s, tenant.name, name, row, now)}
            s.add(row)
            try:
                s.flush()
            except IntegrityError:  # another start won the race for this alias
                raise ConflictError(f"{tenant.name}/{name}:{alias} already has a rollout; "
                                    "abort it first") from None
            self._route(s, tenant, name, row, "rollout.start")
            return self._record(s, tenant, name, row)

    def get(self, tenant_name: str, name: str, alias: str) -> Rollout:
        """The alias's active rollout, else its latest one."""
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s:
            adapter = self._adapter(s, tenant, name)
            row = s.scalar(select(RolloutRow).filter_by(adapter_id=adapter.id, alias=alias)
                           .order_by(RolloutRow.active.is_(None), RolloutRow.id.desc()).limit(1))
            if row is None:
                raise NotFoundError(f"{tenant.name}/{name}:{alias} has no rollout")
            return self._record(s, tenant, name, row)

    def active(self) -> list[Rollout]:
        """Every running or paused rollout, of every tenant (what each replica shows)."""
        with Session(self.db) as s:
            rows = s.execute(select(RolloutRow, AdapterRow.name, TenantRow.id, TenantRow.name)
                             .join(AdapterRow, RolloutRow.adapter_id == AdapterRow.id)
                             .join(TenantRow, AdapterRow.tenant_id == TenantRow.id)
                             .where(RolloutRow.active.is_(True))).all()
            return [self._record(s, Tenant(tenant_id, tenant), name, row)
                    for row, name, tenant_id, tenant in rows]

    def pause(self, tenant_name: str, name: str, alias: str) -> Rollout:
        """Hold the current step: no advance and no automatic rollback until resumed."""
        return self._change(tenant_name, name, alias, "running", "paused", "rollout.pause")

    def resume(self, tenant_name: str, name: str, alias: str) -> Rollout:
        """Judge again; the current step's window starts over."""
        return self._change(tenant_name, name, alias, "paused", "running", "rollout.resume")

    def abort(self, tenant_name: str, name: str, alias: str) -> Rollout:
        """Everyone back on the stable version, by hand."""
        return self._change(tenant_name, name, alias, None, "aborted", "rollout.abort")

    def decide(self, holder: str, *, lease_s: float = 30.0,
               now: datetime | None = None) -> list[Rollout]:
        """Judge every running rollout once, if ``holder`` holds (or takes) the lease;
        returns the rollouts whose step or state changed."""
        now = now or datetime.now(UTC)
        if not self._lease(holder, lease_s, now):
            return []
        if self._pruned is None or now - self._pruned >= PRUNE_EVERY:
            self._prune(now)
        with Session(self.db) as s:
            ids = list(s.scalars(select(RolloutRow.id).filter_by(state="running")))
        changed = []
        for rollout_id in ids:
            try:
                with Session(self.db) as s, s.begin():
                    result = self._judge(s, rollout_id, now)
            except Exception:  # one rollout's failure (a version deleted under it) is its own
                logger.exception("rollout %d: the decision failed; tried again next time", rollout_id)
                continue
            if result is not None:
                changed.append(result)
        return changed

    # -- inside ------------------------------------------------------------------------

    def _prune(self, now: datetime) -> None:
        """Answer figures older than ``STATS_KEPT`` go (no rollout step looks back that far;
        the bill, ``usage_minutes``, is never pruned here)."""
        with Session(self.db) as s, s.begin():
            gone: int = getattr(s.execute(delete(AnswerStatsRow).where(
                AnswerStatsRow.minute < now - STATS_KEPT)), "rowcount", 0)
        self._pruned = now
        if gone:
            logger.info("rollouts: pruned %d row(s) of answer figures older than %d days",
                        gone, STATS_KEPT.days)

    def _judge(self, s: Session, rollout_id: int, now: datetime) -> Rollout | None:
        row = s.get(RolloutRow, rollout_id, with_for_update=True)
        if row is None or row.state != "running":
            return None
        adapter = s.get_one(AdapterRow, row.adapter_id)
        owner = s.get_one(TenantRow, adapter.tenant_id)
        tenant = Tenant(owner.id, owner.name)
        name = adapter.name
        expected = _weights(row)
        split = split_labels(s, adapter.id, row.alias)
        if len(expected) == 1:  # at 100 %: the alias names the candidate, unsplit
            moved = bool(split) or self._catalog.alias_version(
                s, tenant, name, row.alias) != row.candidate_version
        else:
            moved = split != _labels(expected)
        if moved:
            return self._finish(s, tenant, name, row, "superseded", "rollout.superseded", now,
                                "the alias was moved or split by hand")
        rules = RolloutRules(**row.rules)
        since = as_utc(row.step_started_at).replace(second=0, microsecond=0)
        start = (row.evidence or {}).get("baseline", {})
        stable = counts(s, tenant.name, ledger_ref(tenant, name, row.stable_version), since,
                         start.get("stable"))
        cand = counts(s, tenant.name, ledger_ref(tenant, name, row.candidate_version), since,
                       start.get("candidate"))
        reference = (row.evidence or {}).get("reference")
        evidence = {"window_from": as_utc(row.step_started_at).isoformat(),
                    "percent": row.steps["percents"][row.step], "candidate": summary(cand),
                    "stable": summary(stable), "baseline": start,
                    "step_seconds": round((now - as_utc(row.step_started_at)).total_seconds(), 1)}
        if stable["answers"] >= rules.min_requests:
            reference = summary(stable)  # what later steps compare with, when few are on stable
        if reference is not None:
            evidence["reference"] = reference
        why = breach(rules, cand, stable, reference)
        if why:
            return self._finish(s, tenant, name, row, "rolled_back", "rollout.rollback", now,
                                why, evidence)
        if cand["answers"] < rules.min_requests or shadow_short(rules, cand) or \
                evidence["step_seconds"] < rules.min_step_seconds:
            row.evidence = evidence  # not yet: figures kept for status
            return None
        percents = row.steps["percents"]
        if row.step + 1 >= len(percents):
            return self._finish(s, tenant, name, row, "promoted", "rollout.promote", now,
                                f"every step passed; v{row.candidate_version} takes the alias",
                                evidence)
        row.step += 1
        row.step_started_at = row.updated_at = now
        row.evidence = {**evidence, "baseline": baseline(s, tenant.name, name, row, now)}
        row.reason = (f"step {percents[row.step - 1]}% passed: {cand['answers']} answers, "
                      f"error rate {cand['error_rate']:.4f} (stable {stable['error_rate']:.4f})")
        self._route(s, tenant, name, row, "rollout.step", evidence=_shown(evidence))
        return self._record(s, tenant, name, row)

    def _finish(self, s: Session, tenant: Tenant, name: str, row: RolloutRow, state: str,
                action: str, now: datetime, reason: str,
                evidence: dict[str, Any] | None = None) -> Rollout:
        row.state, row.active, row.reason, row.updated_at = state, None, reason, now
        if evidence is not None:
            row.evidence = evidence
        if state != "superseded":
            version = row.candidate_version if state == "promoted" else row.stable_version
            self._catalog.move_alias(s, tenant, name, row.alias, version, rollout=row.id)
        record(s, self.actor, action, f"{tenant.name}/{name}:{row.alias}", rollout=row.id,
               candidate=row.candidate_version, stable=row.stable_version, reason=reason,
               evidence=_shown(row.evidence))
        logger.info("rollout %d of %s/%s:%s v%d: %s (%s)", row.id, tenant.name, name, row.alias,
                    row.candidate_version, state, reason)
        return self._record(s, tenant, name, row)

    def _route(self, s: Session, tenant: Tenant, name: str, row: RolloutRow, action: str,
               **details: Any) -> None:
        """The alias's split for the rollout's current step, and its audit entry."""
        weights = _weights(row)
        self._catalog.split_alias(s, tenant, name, row.alias, weights, rollout=row.id)
        record(s, self.actor, action, f"{tenant.name}/{name}:{row.alias}", rollout=row.id,
               candidate=row.candidate_version, percent=row.steps["percents"][row.step], **details)

    def _change(self, tenant_name: str, name: str, alias: str, from_state: str | None,
                to_state: str, action: str) -> Rollout:
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s, s.begin():
            adapter = self._adapter(s, tenant, name)
            row = self._active(s, adapter.id, alias)
            if row is None or (from_state is not None and row.state != from_state):
                state = "no active rollout" if row is None else f"its rollout is {row.state}"
                raise ConflictError(f"{tenant.name}/{name}:{alias}: {state}; cannot {action[8:]}")
            now = datetime.now(UTC)
            if to_state == "aborted":
                return self._finish(s, tenant, name, row, "aborted", action, now, "aborted by hand")
            row.state, row.updated_at = to_state, now
            if to_state == "running":  # a fresh window: nothing from the pause counts
                row.step_started_at = now
                reference = (row.evidence or {}).get("reference")
                row.evidence = {"baseline": baseline(s, tenant.name, name, row, now),
                                **({"reference": reference} if reference else {})}
            row.reason = f"{to_state} by hand"
            # What the alias resolves to carries the running rollout's shadow share: a paused
            # rollout compares nothing, so every replica's cached resolution must change.
            publish(s, Change("alias", tenant.id, tenant.name, name))
            record(s, self.actor, action, f"{tenant.name}/{name}:{alias}", rollout=row.id)
            return self._record(s, tenant, name, row)

    def _lease(self, holder: str, lease_s: float, now: datetime) -> bool:
        until = now + timedelta(seconds=lease_s)
        try:
            with Session(self.db) as s, s.begin():
                row = s.get(LeaseRow, LEASE, with_for_update=True)
                if row is None:
                    s.add(LeaseRow(name=LEASE, holder=holder, until=until))
                elif row.holder == holder or as_utc(row.until) <= now:
                    row.holder, row.until = holder, until
                else:
                    return False
        except IntegrityError:  # another process created it first
            return False
        return True

    def _adapter(self, s: Session, tenant: Tenant, name: str) -> AdapterRow:
        row = s.scalar(select(AdapterRow).filter_by(tenant_id=tenant.id, name=name))
        if row is None:
            raise NotFoundError(f"model {tenant.name}/{name} does not exist")
        return row

    def _active(self, s: Session, adapter_id: int, alias: str) -> RolloutRow | None:
        return s.scalar(select(RolloutRow).filter_by(adapter_id=adapter_id, alias=alias, active=True))

    def _record(self, s: Session, tenant: Tenant, name: str, row: RolloutRow) -> Rollout:
        return Rollout(row.id, tenant.name, name, row.alias, row.stable_version,
                       row.candidate_version, tuple(row.steps["percents"]), row.step, row.state,
                       RolloutRules(**row.rules), row.reason, _shown(row.evidence),
                       as_utc(row.step_started_at), as_utc(row.updated_at))


def _shown(evidence: dict[str, Any] | None) -> dict[str, Any]:
    """A judgement's figures as status and the audit trail show them: without the window's
    start-minute baseline (bookkeeping, histograms included)."""
    return {k: v for k, v in (evidence or {}).items() if k != "baseline"}


def _weights(row: RolloutRow) -> dict[int | None, int]:
    percent = row.steps["percents"][row.step]
    if percent >= 100:
        return {row.candidate_version: 100}
    return {row.stable_version: 100 - percent, row.candidate_version: percent}


def _labels(weights: dict[int | None, int]) -> dict[str, int]:
    return {} if len(weights) == 1 else {f"v{v}": w for v, w in sorted(weights.items())}
