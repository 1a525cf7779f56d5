"""What each version's answers looked like, beside the bill: per tenant, model and minute,
written by every gateway process (``usage.write``, the same writers and transaction as the
usage ledger), read by rollouts (``rollout_evidence``) to compare a candidate with the
stable version across every replica.

- time to first token and latency of whole answers, as histograms of geometric buckets
  (bucket ``i`` holds values in (2^((i-1)/4), 2^(i/4)] ms: each bucket 19 % wider than the
  last, so a percentile read back is at most 19 % high, the same for both versions);
- refusals: answers whose text opens as the gateway's ``refusal_pattern`` says a refusal
  does;
- shadow comparisons: a share of the stable version's requests answered again, greedily,
  by the candidate and by the stable version, off the caller's path
  (``gateway.engine.shadow``): how many pairs, how many agreed exactly, the share of the
  stable answer the candidate's followed, and the mean per-token KL(stable || candidate)
  along the tokens both answers share.

A writer replaces its own rows (as the usage ledger does), so sums over writers are exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AnswerStats", "bucket", "merged", "percentile", "without"]

_PER_DOUBLING = 4
_TOP = 100  # 2^25 ms: nine hours; anything longer counts there


def bucket(seconds: float) -> str:
    """The histogram bucket of a duration (JSON object keys are strings)."""
    ms = max(seconds * 1000.0, 1.0)
    return str(min(_TOP, math.ceil(_PER_DOUBLING * math.log2(ms))))


def percentile(hist: Mapping[str, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) in ms: the upper bound of the bucket that holds it."""
    total = sum(hist.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for key in sorted(hist, key=int):
        seen += hist[key]
        if seen >= rank and hist[key] > 0:
            return round(2 ** (int(key) / _PER_DOUBLING), 1)
    return round(2 ** (max(int(k) for k in hist) / _PER_DOUBLING), 1)


@dataclass
class AnswerStats:
    """One (tenant, model, minute)'s figures; ``changes`` counts updates (what to flush)."""

    ttft: dict[str, int] = field(default_factory=dict)
    latency: dict[str, int] = field(default_factory=dict)  # whole answers (status 200)
    refusals: int = 0
    shadow_pairs: int = 0
    shadow_agreed: int = 0
    shadow_prefix: float = 0.0  # sum over pairs of the share of the stable answer followed
    shadow_kl: float = 0.0  # sum over pairs of the mean per-token KL (nats)
    changes: int = 0

    def answer(self, ttft_s: float | None, latency_s: float | None, refused: bool) -> None:
        if ttft_s is not None:
            key = bucket(ttft_s)
            self.ttft[key] = self.ttft.get(key, 0) + 1
        if latency_s is not None:
            key = bucket(latency_s)
            self.latency[key] = self.latency.get(key, 0) + 1
        self.refusals += refused
        self.changes += 1

    def shadow(self, agreed: bool, prefix: float, kl: float) -> None:
        self.shadow_pairs += 1
        self.shadow_agreed += agreed
        self.shadow_prefix += prefix
        self.shadow_kl += kl
        self.changes += 1

    def as_json(self) -> dict[str, Any]:
        return {"ttft": dict(self.ttft), "latency": dict(self.latency), "refusals": self.refusals,
                "shadow_pairs": self.shadow_pairs, "shadow_agreed": self.shadow_agreed,
                "shadow_prefix": self.shadow_prefix, "shadow_kl": self.shadow_kl}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> AnswerStats:
        doc = doc or {}
        return cls({str(k): int(v) for k, v in (doc.get("ttft") or {}).items()},
                   {str(k): int(v) for k, v in (doc.get("latency") or {}).items()},
                   int(doc.get("refusals", 0)), int(doc.get("shadow_pairs", 0)),
                   int(doc.get("shadow_agreed", 0)), float(doc.get("shadow_prefix", 0.0)),
                   float(doc.get("shadow_kl", 0.0)))


def merged(docs: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Several rows' figures summed (every writer, every minute of a window)."""
    out = AnswerStats()
    for doc in docs:
        one = AnswerStats.from_json(doc)
        for hist in ("ttft", "latency"):
            target = getattr(out, hist)
            for key, n in getattr(one, hist).items():
                target[key] = target.get(key, 0) + n
        for name in ("refusals", "shadow_pairs", "shadow_agreed", "shadow_prefix", "shadow_kl"):
            setattr(out, name, getattr(out, name) + getattr(one, name))
    return out.as_json()


def without(total: Mapping[str, Any], before: Mapping[str, Any] | None) -> dict[str, Any]:
    """``total`` less what ``before`` already held (never below zero)."""
    a, b = AnswerStats.from_json(total), AnswerStats.from_json(before)
    ttft, latency = ({k: n - getattr(b, h).get(k, 0) for k, n in getattr(a, h).items()
                      if n > getattr(b, h).get(k, 0)} for h in ("ttft", "latency"))
    out = AnswerStats(ttft, latency)
    for name in ("refusals", "shadow_pairs", "shadow_agreed", "shadow_prefix", "shadow_kl"):
        setattr(out, name, max(type(getattr(a, name))(0), getattr(a, name) - getattr(b, name)))
    return out.as_json()
