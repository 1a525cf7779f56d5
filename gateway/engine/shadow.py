"""Shadow comparisons: what a rollout's candidate would have answered, never shown to anyone.

While an alias's rollout runs (``adapters_registry.rollouts``), ``percent`` of the requests
its split sends to the stable version (chat and completions) are answered again, off the
caller's path, by both versions: greedily (temperature 0), one choice, at most
``max_tokens`` tokens, with the top-5 logprobs of every token, one after the other (a pair
adds one sequence to the engine's batch at a time). The pair is compared as the trainer's
regression gate compares an adapter with its base (``trainer.evals``):

- agreement: the two greedy answers are the same tokens;
- prefix: the share of the stable answer the candidate's followed before they parted;
- KL: mean per-token KL(stable || candidate) along the tokens both answers share, and at
  the first one where they part (where both still saw the same context), each estimated
  from the two top-5 lists (a token missing from the candidate's list takes its lowest
  logprob). vLLM's prompt logprobs would give the candidate's distribution along the
  whole stable answer, but with adapters enabled vLLM 0.32 computes them wrongly
  (gateway.api.schemas), so the comparison stops where the answers part.

Each comparison goes to the usage ledger under the candidate's name (``record_shadow``),
where every replica's reach the rollout's decision. The caller never waits for it and
is never charged for it: no quota meter, no fair-share charge, no ledger usage. It costs
only spare capacity: a pair starts only while nobody waits at the door and a slot is
free, at most ``max_in_flight`` pairs at once on this replica, and under the engine's
``priority`` policy at the lowest priority there is (behind every tenant's request); a
pair that cannot run is skipped (``lgw_shadow_comparisons_total{outcome="skipped"}``),
never queued.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

from adapters_registry import AdapterVersion, Shadow, Tenant
from gateway.engine.base import Meter, OpenAIServing, Route
from gateway.observability.ledger import UsageLedger
from gateway.observability.logs import Throttled
from gateway.observability.metrics import GatewayMetrics
from gateway.residency.manager import AdapterManager

logger = logging.getLogger(__name__)
LOWEST_PRIORITY = 2**62  # vLLM serves lower first; fair-share priorities never come near
TOP_LOGPROBS = 5
Answer = list[tuple[str, dict[str, float]]]  # each token, and the top logprobs where it stood


class ShadowRunner:
    def __init__(self, serving: OpenAIServing, adapters: AdapterManager, ledger: UsageLedger,
                 metrics: GatewayMetrics, spare: Callable[[], bool], *, max_in_flight: int = 1,
                 max_tokens: int = 64, engine_priority: bool = False, timeout_s: float = 120.0,
                 rng: random.Random | None = None) -> None:
        self._serving = serving
        self._adapters = adapters
        self._ledger = ledger
        self._metrics = metrics
        self._spare = spare
        self.max_in_flight = max_in_flight
        self.max_tokens = max_tokens
        self._priority = engine_priority
        self.timeout_s = timeout_s
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures = Throttled(logger)

    def prepare(self, tenant: Tenant, kind: str, req: Any, shadow: Shadow) -> Callable[[], bool] | None:
        """Whether ``req`` (before the engine changes it) is one of the share to compare:
        then what starts the pair, to call once the caller's own request was accepted (past
        its quota checks: a refused request never costs a comparison). Starting returns
        True when a pair started, False when it was skipped for want of spare capacity."""
        if kind not in ("chat", "completion") or not self.max_in_flight or \
                self._rng.random() * 100 >= shadow.percent:
            return None
        body = self._greedy(tenant, kind, req)
        labels = (tenant.name, f"{tenant.name}/{shadow.candidate.adapter}")

        def start() -> bool:
            if len(self._tasks) >= self.max_in_flight or not self._spare():
                self._metrics.shadow_comparisons.labels(*labels, "skipped").inc()
                return False
            task = asyncio.create_task(self._pair(tenant, kind, body, shadow, labels),
                                       name=f"shadow {shadow.candidate.ref}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return True
        return start

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _greedy(self, tenant: Tenant, kind: str, req: Any) -> Any:
        limit = getattr(req, "max_completion_tokens", None) or getattr(req, "max_tokens", None)
        update: dict[str, Any] = dict(
            temperature=0.0, n=1, stream=False, stream_options=None, use_beam_search=False,
            max_tokens=min(self.max_tokens, limit or self.max_tokens), request_id="shadow",
            priority=LOWEST_PRIORITY if self._priority else 0,
            cache_salt=f"tenant-{tenant.id}")  # the tenant's prefix cache, as its requests
        if kind == "chat":
            update.update(logprobs=True, top_logprobs=TOP_LOGPROBS, max_completion_tokens=None)
        else:
            update.update(logprobs=TOP_LOGPROBS, echo=False)
        return req.model_copy(update=update, deep=True)

    async def _pair(self, tenant: Tenant, kind: str, body: Any, shadow: Shadow,
                    labels: tuple[str, str]) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                # One after the other: a pair adds one sequence to the engine's batch, not two
                # (and the second finds the prompt in the prefix cache).
                stable = await self._answer(kind, body, shadow.stable)
                candidate = await self._answer(kind, body.model_copy(deep=True), shadow.candidate)
        except TimeoutError:
            self._metrics.shadow_comparisons.labels(*labels, "timeout").inc()
            return
        except Exception as exc:  # a shadow's failure is its own (a broken candidate: each time)
            self._metrics.shadow_comparisons.labels(*labels, "failed").inc()
            self._failures.log(logging.WARNING, shadow.candidate.ref,
                               "shadow comparison of %s failed: %s", shadow.candidate.ref, exc)
            return
        agreed, prefix, kl = compare(stable, candidate)
        self._ledger.record_shadow(tenant.name, shadow.candidate.ref, agreed=agreed,
                                   prefix=prefix, kl=kl)
        self._metrics.shadow_comparisons.labels(*labels, "compared").inc()

    async def _answer(self, kind: str, body: Any, version: AdapterVersion) -> Answer:
        async with AsyncExitStack() as stack:
            acquired = await stack.enter_async_context(self._adapters.use(version))
            body.request_id = request_id = f"shadow-{uuid.uuid4().hex}"
            route = Route(version.ref, acquired.lora, Meter(), request_id)
            serve = self._serving.chat if kind == "chat" else self._serving.completion
            result = await serve(body, route)
        if not isinstance(result, dict):
            raise TypeError("a shadow request must not stream")
        return tokens(result)


def tokens(body: dict[str, Any]) -> Answer:
    """A chat or completions answer's first choice as (token, top logprobs) pairs."""
    choice = (body.get("choices") or [{}])[0]
    logprobs = choice.get("logprobs") or {}
    if "content" in logprobs:  # chat
        return [(t["token"], {x["token"]: x["logprob"] for x in t.get("top_logprobs") or ()}
                 or {t["token"]: t["logprob"]}) for t in logprobs.get("content") or ()]
    tops = logprobs.get("top_logprobs") or []
    return [(tok, dict(tops[i] or {}) if i < len(tops) and tops[i] else {tok: lp or 0.0})
            for i, (tok, lp) in enumerate(zip(logprobs.get("tokens") or [],
                                              logprobs.get("token_logprobs") or [], strict=False))]


def compare(stable: Answer, candidate: Answer) -> tuple[bool, float, float]:
    """(the same tokens, the share of the stable answer followed, mean per-token KL)."""
    common = 0
    while common < min(len(stable), len(candidate)) and stable[common][0] == candidate[common][0]:
        common += 1
    agreed = len(stable) == len(candidate) == common
    prefix = common / len(stable) if stable else float(not candidate)
    positions = min(common + 1, len(stable), len(candidate))
    kls = [_kl(stable[i][1], candidate[i][1]) for i in range(positions)]
    return agreed, prefix, sum(kls) / len(kls) if kls else 0.0


def _kl(p: dict[str, float], q: dict[str, float]) -> float:
    """KL(p || q) over p's top tokens; one missing from q's list takes q's lowest logprob."""
    if not p or not q:
        return 0.0
    floor = min(q.values())
    total = sum(math.exp(lp) * (lp - q.get(token, floor)) for token, lp in p.items()
                if math.isfinite(lp))
    return max(0.0, total)


__all__ = ["LOWEST_PRIORITY", "ShadowRunner", "compare", "tokens"]
