"""One request's use of its tenant's quotas.

:class:`UsageMeter` takes the request (and an in-flight lease) from ``gateway.protection.quotas``, checks
the prompt against the tenant's ceiling and token budget before generation, charges completion
tokens as they are generated, and keeps the ``x-ratelimit-*`` headers of the answer. The
request's scope holds it; the engine seam's ``Meter`` calls ``prompt`` and ``completion``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Mapping
from typing import Any, Protocol, Self, TypeVar

from adapters_registry import Tenant
from gateway.errors import ContextLengthError, InvalidRequestError, RateLimitError
from gateway.protection.quotas import FLUSH_TOKENS, Limits, Quotas, Verdict, bucket

logger = logging.getLogger(__name__)


def _unmetered(limits: Limits) -> bool:
    return limits.rpm is None and limits.tpm is None and limits.concurrency is None


def _refusal(verdict: Verdict, limits: Limits) -> RateLimitError:
    if verdict.refused == "concurrency":
        return RateLimitError(f"Too many requests in flight: this key allows {limits.concurrency} at "
                              "once. Retry when one finishes.", retry_after=verdict.retry_after)
    if verdict.refused == "requests":
        return RateLimitError(f"Rate limit reached: {limits.rpm} requests per minute.",
                              retry_after=verdict.retry_after)
    return RateLimitError(f"Rate limit reached: {limits.tpm} tokens per minute.", kind="tokens",
                          retry_after=verdict.retry_after)


class UsageMeter:
    """One request's lease on its tenant's quotas; closed when the answer is complete."""

    @classmethod
    async def open(cls, quotas: Quotas, tenant: Tenant) -> UsageMeter:
        """A meter for one of ``tenant``'s requests, with its limits; ``admit`` it next."""
        return cls(quotas, tenant, await quotas.limits(tenant), uuid.uuid4().hex)

    def __init__(self, quotas: Quotas, tenant: Tenant, limits: Limits, lease: str) -> None:
        self._quotas = quotas
        self.tenant = tenant
        self.limits = limits
        self.lease = lease
        self.holds_lease = False
        self.metered = not _unmetered(limits)
        self.headers: dict[str, str] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._pending = 0
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False
        # The token bucket's level as the store last reported it, less what this request
        # charged since: a prompt within it fits for sure (see ``prompt``).
        self._tokens_left = 0.0

    async def admit(self) -> None:
        """Take a request (and an in-flight lease); RateLimitError (429) over a limit."""
        if not self.metered:
            return
        q = self._quotas
        verdict = await q.call(q.store.admit(self.tenant.id, self.limits, self.lease))
        if verdict is None:
            self.metered = False  # the store failed and the mode is open
            return
        self.note(verdict)
        if verdict.refused is not None:
            q.metrics.quota_rejections.labels(self.tenant.name, verdict.refused).inc()
            raise _refusal(verdict, self.limits)
        self.holds_lease = self.limits.concurrency is not None
        if verdict.tokens is not None:
            self._tokens_left = verdict.tokens.remaining

    def note(self, verdict: Verdict) -> None:
        """Remember the buckets for the ``x-ratelimit-*`` headers."""
        for kind, b in (("requests", verdict.requests), ("tokens", verdict.tokens)):
            if b is not None:
                self.headers[f"x-ratelimit-limit-{kind}"] = str(b.limit)
                self.headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(b.remaining)))
                self.headers[f"x-ratelimit-reset-{kind}"] = duration(b.reset_s)

    async def prompt(self, tokens: int) -> None:
        """Before generation: the prompt against the tenant's ceiling and its token budget."""
        ceiling = self.limits.max_prompt_tokens
        if ceiling is not None and tokens > ceiling:
            raise ContextLengthError(f"the prompt is {tokens} tokens; this key allows prompts of at "
                                     f"most {ceiling} tokens")
        self.prompt_tokens += tokens
        if not self.metered or self.limits.tpm is None:
            return
        if tokens <= self._tokens_left:
            # It fits the budget the admission just read: no round trip before the first
            # token. The charge goes to the store in the background, as completion tokens
            # do; concurrent requests can take the bucket into debt by at most their
            # prompts, which later requests wait out, as with completion tokens.
            self._tokens_left -= tokens
            self.note(Verdict(tokens=bucket(self._tokens_left, self.limits.tpm)))
            self._pending += tokens
            self._flush_in_background()
            return
        q = self._quotas
        verdict = await q.call(q.store.charge(self.tenant.id, self.limits, self.lease, tokens,
                                              check=True))
        if verdict is None:
            return
        self.note(verdict)
        if verdict.refused is not None:
            q.metrics.quota_rejections.labels(self.tenant.name, "tokens").inc()
            if verdict.retry_after is None:
                raise RateLimitError(f"Request too large: the prompt is {tokens} tokens, over this "
                                     f"key's limit of {self.limits.tpm} tokens per minute.",
                                     kind="tokens")
            raise _refusal(verdict, self.limits)
        if verdict.tokens is not None:
            self._tokens_left = verdict.tokens.remaining

    def completion(self, tokens: int) -> None:
        """``tokens`` more were generated (any choice, any prompt of a batch); charged in batches."""
        self.completion_tokens += tokens
        if not self.metered or self.limits.tpm is None or tokens <= 0:
            return
        self._pending += tokens
        if self._pending >= FLUSH_TOKENS:
            self._flush_in_background()

    def _flush_in_background(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush())

    async def close(self) -> None:
        """Charge what is left and give the in-flight lease back (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        try:
            await self._flush()
            if self.holds_lease:
                await self._quotas.store.release(self.tenant.id, self.lease)
        except (ConnectionError, TimeoutError) as exc:
            self._quotas.metrics.quota_backend_errors.labels("charge_lost").inc()
            logger.warning("could not settle %s's quota lease: %s", self.tenant.name, exc)

    async def _flush(self) -> None:
        tokens, self._pending = self._pending, 0
        if tokens <= 0:
            return
        try:
            await self._quotas.store.charge(self.tenant.id, self.limits, self.lease, tokens,
                                            check=False)
        except (ConnectionError, TimeoutError) as exc:
            self._quotas.metrics.quota_backend_errors.labels("charge_lost").inc()
            logger.warning("could not charge %d tokens to %s: %s", tokens, self.tenant.name, exc)


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


class Copyable(Protocol):
    """A request body: a pydantic model (vLLM's request classes, ours)."""

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self: ...


B = TypeVar("B", bound=Copyable)


def apply_ceilings(body: B, limits: Limits) -> B:
    """The tenant's max_tokens ceiling: a larger ask is a 400; no ask gets the ceiling.
    (``max_output_tokens`` in the Responses API.)"""
    ceiling = limits.max_tokens
    if ceiling is None:
        return body
    field = "max_output_tokens" if hasattr(body, "max_output_tokens") else "max_tokens"
    asked = getattr(body, "max_completion_tokens", None) or getattr(body, field, None)
    if asked is None:
        return body.model_copy(update={field: ceiling})
    if asked > ceiling:
        raise InvalidRequestError(f"{field} is {asked}; this key allows at most {ceiling}",
                                  param=field)
    return body
    asked = getattr(body, "max_completion_tokens", None) or getattr(body, "max_tokens", None)
    if asked is None:
        return body.model_copy(update={"max_tokens": ceiling})
    if asked > ceiling:
        raise InvalidRequestError(f"max_tokens is {asked}; this key allows at most {ceiling}",
                                  param="max_tokens")
    return body
