"""A rollout step's evidence and rules: what each version answered, from the usage ledger
and the answer figures beside it (every replica's answers per version and minute:
``usage``, ``answer_stats``), and when the candidate must go back. Used by
``rollouts.Rollouts``.

The candidate is compared with the stable version over the same window; where the stable
version has too few answers in it to compare with (at 100 %, nobody is on it), with the
stable figures of the last step that had enough (``reference``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters_registry.answer_stats import merged, percentile, without
from adapters_registry.db import AdapterVersionRow, AnswerStatsRow, RolloutRow, UsageRow
from adapters_registry.errors import ValidationError
from adapters_registry.records import Tenant

__all__ = ["RULE_HELP", "RolloutRules", "baseline", "breach", "counts", "gates_passed", "ledger_ref",
           "shadow_short", "summary"]


@dataclass(frozen=True)
class RolloutRules:
    """What each step must show. Ratios compare the candidate's figure with the stable
    version's (0 turns a rule off); a latency difference under ``latency_slack_ms`` never
    breaches (it is within one histogram bucket of small times)."""

    min_requests: int = 20
    min_step_seconds: float = 60.0
    max_error_rate: float = 0.05
    max_error_rate_increase: float = 0.02
    max_ttft_p95_ratio: float = 1.5
    max_latency_p95_ratio: float = 2.0
    latency_slack_ms: float = 50.0
    max_tokens_per_answer_ratio: float = 2.0  # either way: longer, or shorter
    max_refusal_rate_increase: float = 0.05
    # Shadow comparisons (see answer_stats): the share of the stable version's requests
    # answered again by both versions, greedily, off the caller's path.
    shadow_percent: float = 5.0
    min_shadow_pairs: int = 10  # a step advances only with this many (0: never waits for them)
    min_shadow_agreement: float = 0.0  # share of pairs whose greedy answers are equal
    max_shadow_kl: float = 1.0  # mean per-token KL(stable || candidate), nats (0: off)

    @staticmethod
    def help(name: str) -> str:
        """What the rule ``name`` asks, for a command line or an API schema."""
        return RULE_HELP[name]

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.min_requests <= 1_000_000:
            out.append(f"min_requests {self.min_requests} is outside 1..1000000")
        if not 0 <= self.min_shadow_pairs <= 1_000_000:
            out.append(f"min_shadow_pairs {self.min_shadow_pairs} is outside 0..1000000")
        if not 0 <= self.min_step_seconds <= 7 * 86400:
            out.append(f"min_step_seconds {self.min_step_seconds} is outside 0..604800")
        for name in ("max_error_rate", "max_error_rate_increase", "max_refusal_rate_increase",
                     "min_shadow_agreement"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"{name} {getattr(self, name)} is outside 0..1")
        for name in ("max_ttft_p95_ratio", "max_latency_p95_ratio", "max_tokens_per_answer_ratio"):
            value = getattr(self, name)
            if value != 0 and not 1 <= value <= 100:
                out.append(f"{name} {value} is outside 1..100 (0 turns it off)")
        if not 0 <= self.latency_slack_ms <= 60_000:
            out.append(f"latency_slack_ms {self.latency_slack_ms} is outside 0..60000")
        if not 0 <= self.shadow_percent <= 100:
            out.append(f"shadow_percent {self.shadow_percent} is outside 0..100")
        if not 0 <= self.max_shadow_kl <= 100:
            out.append(f"max_shadow_kl {self.max_shadow_kl} is outside 0..100 (0 turns it off)")
        return out


RULE_HELP = {
    "min_requests": "candidate answers a step needs before it advances",
    "min_step_seconds": "seconds a step lasts at least",
    "max_error_rate": "the candidate's highest share of server errors",
    "max_error_rate_increase": "how far its share of server errors may exceed the stable version's",
    "max_ttft_p95_ratio": "its time to first token p95 over the stable version's, at most (0: off)",
    "max_latency_p95_ratio": "its latency p95 over the stable version's, at most (0: off)",
    "latency_slack_ms": "latency differences under this never breach",
    "max_tokens_per_answer_ratio": "how many times longer or shorter its answers may be on "
                                   "average (0: off)",
    "max_refusal_rate_increase": "how far its share of refusals may exceed the stable version's",
    "shadow_percent": "share of the stable version's requests both versions answer again, "
                      "greedily, off the caller's path, to compare (0: none)",
    "min_shadow_pairs": "shadow comparisons a step needs before it advances or is judged on them",
    "min_shadow_agreement": "share of comparisons whose greedy answers must be equal",
    "max_shadow_kl": "mean per-token KL(stable || candidate) in nats, at most (0: off)",
}


def gates_passed(s: Session, adapter_id: int, version: int, ref: str) -> None:
    """A version made by the trainer carries its eval gates in its manifest: a failed report
    never takes traffic. (One registered from elsewhere has none to check.)"""
    row = s.scalar(select(AdapterVersionRow).filter_by(adapter_id=adapter_id, version=version))
    evals = row.trainer_metrics.get("evals") if row is not None else None
    if isinstance(evals, dict) and evals.get("passed") is False:
        failed = ", ".join(g.get("name", "?") for g in evals.get("gates", []) if not g.get("passed"))
        raise ValidationError(f"{ref}'s trainer gates failed ({failed or 'see its manifest'}): "
                              "a version whose gates failed is never rolled out")


_ANSWERS = ("requests_2xx", "requests_4xx", "requests_5xx", "aborted")
_COUNTS = (*_ANSWERS, "completion_tokens")


def ledger_ref(tenant: Tenant, name: str, version: int) -> str:
    return f"{tenant.name}/{name}@v{version}"  # as the ledger names what served


def _sums(s: Session, tenant: str, model: str, *where: Any) -> dict[str, int]:
    row = s.execute(select(*(func.coalesce(func.sum(getattr(UsageRow, n)), 0) for n in _COUNTS))
                    .where(UsageRow.tenant == tenant, UsageRow.model == model, *where)).one()
    return dict(zip(_COUNTS, (int(v) for v in row), strict=True))


def _stats(s: Session, tenant: str, model: str, *where: Any) -> dict[str, Any]:
    return merged(s.scalars(select(AnswerStatsRow.stats).where(
        AnswerStatsRow.tenant == tenant, AnswerStatsRow.model == model, *where)))


def baseline(s: Session, tenant: str, name: str, row: RolloutRow,
              now: datetime) -> dict[str, dict[str, Any]]:
    """What the step's start minute already holds of each version (not the step's)."""
    minute = now.replace(second=0, microsecond=0)
    out = {}
    for side, version in (("stable", row.stable_version), ("candidate", row.candidate_version)):
        model = f"{tenant}/{name}@v{version}"
        out[side] = {**_sums(s, tenant, model, UsageRow.minute == minute),
                     "stats": _stats(s, tenant, model, AnswerStatsRow.minute == minute)}
    return out


def counts(s: Session, tenant: str, model: str, since: datetime,
            baseline: dict[str, Any] | None) -> dict[str, Any]:
    """A version's answers from every writer since ``since`` (a minute's start), less what
    that minute held when the step began: counts, rates and the figures rules read."""
    baseline = baseline or {}
    counts = _sums(s, tenant, model, UsageRow.minute >= since)
    counts = {k: max(0, v - baseline.get(k, 0)) for k, v in counts.items()}
    stats = without(_stats(s, tenant, model, AnswerStatsRow.minute >= since), baseline.get("stats"))
    answers = sum(counts[k] for k in _ANSWERS)
    ok = counts["requests_2xx"]
    pairs = stats["shadow_pairs"]
    return {**counts, "answers": answers,
            "error_rate": counts["requests_5xx"] / answers if answers else 0.0,
            "ttft_p50_ms": percentile(stats["ttft"], 0.5),
            "ttft_p95_ms": percentile(stats["ttft"], 0.95),
            "latency_p95_ms": percentile(stats["latency"], 0.95),
            "tokens_per_answer": round(counts["completion_tokens"] / ok, 2) if ok else None,
            "refusals": stats["refusals"],
            "refusal_rate": stats["refusals"] / ok if ok else 0.0,
            "shadow_pairs": pairs,
            "shadow_agreement": round(stats["shadow_agreed"] / pairs, 4) if pairs else None,
            "shadow_prefix": round(stats["shadow_prefix"] / pairs, 4) if pairs else None,
            "shadow_kl": round(stats["shadow_kl"] / pairs, 4) if pairs else None,
            "stats": stats}


def summary(figures: dict[str, Any]) -> dict[str, Any]:
    """What a status shows of a version's figures (the histograms stay in the baseline)."""
    return {k: v for k, v in figures.items() if k != "stats"}


def breach(rules: RolloutRules, cand: dict[str, Any], stable: dict[str, Any],
           reference: dict[str, Any] | None = None) -> str:
    """Why the candidate must go back now, or "". ``stable`` is compared with while it has
    ``min_requests`` answers of its own in the window, else ``reference`` (if any)."""
    errors = cand["requests_5xx"]
    if errors > rules.max_error_rate * rules.min_requests:
        return (f"{errors} server errors in {cand['answers']} answers: more than "
                f"{rules.max_error_rate:.2%} of the {rules.min_requests}-answer minimum sample")
    why = _shadow_breach(rules, cand)
    if why or cand["answers"] < rules.min_requests:
        return why
    if cand["error_rate"] > rules.max_error_rate:
        return f"error rate {cand['error_rate']:.4f} > max_error_rate {rules.max_error_rate}"
    base = stable if stable["answers"] >= rules.min_requests else reference
    if base is None:
        return ""
    if cand["error_rate"] - base["error_rate"] > rules.max_error_rate_increase:
        return (f"error rate {cand['error_rate']:.4f} exceeds the stable version's "
                f"{base['error_rate']:.4f} by more than {rules.max_error_rate_increase}")
    if cand["refusal_rate"] - base["refusal_rate"] > rules.max_refusal_rate_increase:
        return (f"refusal rate {cand['refusal_rate']:.4f} exceeds the stable version's "
                f"{base['refusal_rate']:.4f} by more than {rules.max_refusal_rate_increase}")
    for figure, ratio in (("ttft_p95_ms", rules.max_ttft_p95_ratio),
                          ("latency_p95_ms", rules.max_latency_p95_ratio)):
        c, b = cand.get(figure), base.get(figure)
        if ratio and c is not None and b is not None and c > ratio * b \
                and c - b > rules.latency_slack_ms:
            return (f"{figure[:-3].replace('_', ' ')} {c:.0f} ms > {ratio} x the stable "
                    f"version's {b:.0f} ms")
    c, b = cand.get("tokens_per_answer"), base.get("tokens_per_answer")
    ratio = rules.max_tokens_per_answer_ratio
    if ratio and c and b and not b / ratio <= c <= b * ratio:
        return (f"{c:.1f} tokens per answer against the stable version's {b:.1f}: more than "
                f"{ratio}x apart")
    return ""


def _shadow_breach(rules: RolloutRules, cand: dict[str, Any]) -> str:
    pairs = cand["shadow_pairs"]
    if not pairs or pairs < rules.min_shadow_pairs:
        return ""
    if cand["shadow_agreement"] < rules.min_shadow_agreement:
        return (f"shadow: greedy answers agreed in {cand['shadow_agreement']:.2%} of {pairs} "
                f"pairs < min_shadow_agreement {rules.min_shadow_agreement:.2%}")
    if rules.max_shadow_kl and cand["shadow_kl"] > rules.max_shadow_kl:
        return (f"shadow: mean per-token KL(stable || candidate) {cand['shadow_kl']:.3f} nats "
                f"over {pairs} pairs > max_shadow_kl {rules.max_shadow_kl}")
    return ""


def shadow_short(rules: RolloutRules, cand: dict[str, Any]) -> bool:
    """The step still waits for shadow comparisons (only when the rollout shadows)."""
    return rules.shadow_percent > 0 and cand["shadow_pairs"] < rules.min_shadow_pairs

