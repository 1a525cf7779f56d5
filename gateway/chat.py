"""Chat completions: render with the base's pinned template, generate, shape the answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_registry.errors import ChatTemplateRenderError
from adapters_registry.prompts import prompt_ids
from adapters_registry.records import AdapterVersion, Tenant
from gateway.adapters import AdapterManager
from gateway.engine import Delta, Engine, LoraSpec, SamplingSpec
from gateway.errors import (
    ContextLengthError,
    EngineDeadError,
    EngineError,
    EngineRequestError,
    EngineUnavailableError,
    GatewayError,
    InvalidRequestError,
)
from gateway.metrics import GatewayMetrics
from gateway.quotas import charge_completion, charge_prompt
from gateway.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ResponseMessage,
    Usage,
    chunk,
)
from gateway.tenancy import TenantDirectory

logger = logging.getLogger(__name__)
# A short chat renders and tokenizes in well under a millisecond: cheaper on the event
# loop than a hop to a worker thread, which under load waits up to the interpreter's
# switch interval (5 ms) for the GIL the loop holds. Longer prompts go to a thread.
_INLINE_RENDER_CHARS = 2048


class PromptRenderer:
    """The base's own tokenizer and chat template, loaded once per process."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    @classmethod
    def load(cls, model_dir: Path) -> PromptRenderer:
        from transformers import AutoTokenizer  # heavy import, only where a tokenizer is needed

        return cls(AutoTokenizer.from_pretrained(str(model_dir)))

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return prompt_ids(self._tok, messages)
        except ChatTemplateRenderError as exc:
            raise InvalidRequestError(str(exc), param="messages") from None


@dataclass
class _Call:
    """One request's resolved pieces."""

    tenant: Tenant
    request: ChatCompletionRequest
    request_id: str
    version: AdapterVersion | None
    prompt_ids: list[int]
    sampling: SamplingSpec
    created: int
    label: str
    tier: str = "base"


class ChatService:
    def __init__(self, engine: Engine, tenants: TenantDirectory, adapters: AdapterManager,
                 renderer: PromptRenderer, *,
                 base_name: str, expose_base: bool, max_model_len: int,
                 metrics: GatewayMetrics, on_engine_dead: Callable[[], None]) -> None:
        self._engine = engine
        self._tenants = tenants
        self._adapters = adapters
        self._renderer = renderer
        self._base_name = base_name
        self._expose_base = expose_base
        self._max_model_len = max_model_len
        self._metrics = metrics
        self._on_engine_dead = on_engine_dead

    async def complete(
        self, tenant: Tenant, req: ChatCompletionRequest
    ) -> tuple[ChatCompletionResponse, str]:
        call = await self._prepare(tenant, req)
        async with AsyncExitStack() as stack:
            lora = await self._acquire(call, stack)
            text, last = [], None
            async for delta in self._generate(call, lora):
                text.append(delta.text)
                last = delta
        assert last is not None
        response = ChatCompletionResponse(
            id=call.request_id, created=call.created, model=req.model,
            choices=[Choice(message=ResponseMessage(content="".join(text)),
                            finish_reason=last.finish_reason)],
            usage=_usage(last),
        )
        return response, call.tier

    async def stream(self, tenant: Tenant, req: ChatCompletionRequest) -> tuple[AsyncIterator[str], str]:
        """Resolve and acquire now (errors are plain HTTP errors), then stream SSE lines."""
        call = await self._prepare(tenant, req)
        stack = AsyncExitStack()
        try:
            lora = await self._acquire(call, stack)
        except BaseException:
            await stack.aclose()
            raise
        return self._sse(call, lora, stack), call.tier

    async def _sse(self, call: _Call, lora: LoraSpec | None, stack: AsyncExitStack) -> AsyncIterator[str]:
        include_usage = bool(call.request.stream_options and call.request.stream_options.include_usage)
        model = call.request.model
        async with stack:
            try:
                yield _data(chunk(call.request_id, call.created, model,
                                  {"role": "assistant", "content": ""}, None))
                last = None
                async for delta in self._generate(call, lora):
                    last = delta
                    if delta.text:
                        yield _data(chunk(call.request_id, call.created, model,
                                          {"content": delta.text}, None))
                assert last is not None
                yield _data(chunk(call.request_id, call.created, model, {}, last.finish_reason))
                if include_usage:
                    yield _data({"id": call.request_id, "object": "chat.completion.chunk",
                                 "created": call.created, "model": model, "choices": [],
                                 "usage": _usage(last).model_dump()})
            except GatewayError as exc:
                # Headers are gone: the error travels as the last event, then [DONE].
                yield _data(exc.body())
            except Exception:
                logger.exception("stream %s failed", call.request_id)
                yield _data(GatewayError("internal error; see the gateway log").body())
            yield "data: [DONE]\n\n"

    def engine_alive(self) -> bool:
        """False once the engine died; noticing it here also triggers the restart."""
        if self._engine.is_dead:
            self._on_engine_dead()
            return False
        return True

    async def _prepare(self, tenant: Tenant, req: ChatCompletionRequest) -> _Call:
        if not self.engine_alive():
            raise EngineUnavailableError("the inference engine is not running")
        version: AdapterVersion | None = None
        if req.model == self._base_name and self._expose_base:
            label = self._base_name
        else:
            version = await self._tenants.resolve(tenant, req.model)
            label = f"{version.tenant}/{version.adapter}"
        messages = [m.for_template() for m in req.messages]
        if sum(len(m["content"]) for m in messages) <= _INLINE_RENDER_CHARS:
            prompt_ids = self._renderer.render(messages)
        else:
            prompt_ids = await asyncio.to_thread(self._renderer.render, messages)
        sampling = self._sampling(req, len(prompt_ids))
        await charge_prompt(len(prompt_ids))  # quotas: prompt ceiling and token budget, before generating
        return _Call(tenant, req, f"chatcmpl-{uuid.uuid4().hex}", version, prompt_ids,
                     sampling, int(time.time()), label)

    def _sampling(self, req: ChatCompletionRequest, prompt_len: int) -> SamplingSpec:
        room = self._max_model_len - prompt_len
        if room < 1:
            raise ContextLengthError(
                f"the prompt is {prompt_len} tokens; this model's context is "
                f"{self._max_model_len} tokens", param="messages")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > room:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({asked}) exceeds the model's "
                f"context of {self._max_model_len} tokens", param="max_tokens")
        return SamplingSpec(max_tokens=asked or room, temperature=req.temperature,
                            top_p=req.top_p, seed=req.seed, stop=req.stop_list())

    async def _acquire(self, call: _Call, stack: AsyncExitStack) -> LoraSpec | None:
        if call.version is None:
            return None
        try:
            acquired = await stack.enter_async_context(self._adapters.use(call.version))
        except EngineDeadError:
            logger.critical("inference engine died while loading %s", call.version.ref)
            self._on_engine_dead()
            raise EngineUnavailableError("the inference engine stopped; retry shortly") from None
        call.tier = acquired.tier
        return acquired.lora

    async def _generate(self, call: _Call, lora: LoraSpec | None) -> AsyncIterator[Delta]:
        m = self._metrics
        labels = (call.tenant.name, call.label)
        started = time.perf_counter()
        first = True
        last: Delta | None = None
        m.in_flight.inc()
        try:
            async for delta in self._engine.generate(call.prompt_ids, call.sampling,
                                                     call.request_id, lora):
                if first and delta.completion_tokens:
                    m.ttft.labels(*labels).observe(time.perf_counter() - started)
                    first = False
                charge_completion(delta.completion_tokens - (last.completion_tokens if last else 0))
                last = delta
                yield delta
        except EngineDeadError:
            logger.critical("inference engine died during %s", call.request_id)
            self._on_engine_dead()
            raise EngineUnavailableError("the inference engine stopped; retry shortly") from None
        except EngineRequestError as exc:
            raise InvalidRequestError(f"the engine refused the request: {exc}") from None
        except EngineError as exc:
            logger.error("generation %s failed: %s", call.request_id, exc)
            raise EngineUnavailableError("generation failed; retry shortly") from None
        finally:
            m.in_flight.dec()
        e2e = time.perf_counter() - started
        m.e2e.labels(*labels).observe(e2e)
        completion = last.completion_tokens if last is not None else 0
        # One access record per request: which tier served its adapter, and how fast.
        logger.info("served model=%s adapter_tier=%s completion_tokens=%d latency_ms=%.1f",
                    call.label, call.tier, completion, e2e * 1000,
                    extra={"adapter_tier": call.tier})
        if last is not None:
            m.prompt_tokens.labels(*labels).inc(last.prompt_tokens)
            m.completion_tokens.labels(*labels).inc(last.completion_tokens)


def _usage(d: Delta) -> Usage:
    return Usage(prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens,
                 total_tokens=d.prompt_tokens + d.completion_tokens)


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
