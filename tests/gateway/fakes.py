"""A fake engine with the real one's interface, and the invariants the real one needs."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.engine import (
    AdapterRejectedError,
    Delta,
    EngineDeadError,
    LoraSpec,
    SamplingSpec,
)
from gateway.engine.base import EngineStats, Route, ServingOptions, ServingResult
from gateway.errors import InvalidRequestError, ResponseNotFoundError


class Clock:
    """A monotonic clock the test moves by setting ``now``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Answers ``<adapter name or base> says hello world``, word by word.

    It fails the test outright if ``generate()`` gets an adapter that ``add_lora`` has
    not accepted (or that was removed): on vLLM that can kill the engine.
    """

    def __init__(self) -> None:
        self.loaded: dict[int, LoraSpec] = {}
        self.capacity: int | None = None  # vLLM's max_cpu_loras: never exceeded by the gateway
        self.add_gate: Callable[[], Awaitable[None]] | None = None  # runs inside add_lora
        self.add_calls: list[int] = []
        self.removed: list[int] = []
        self.reject: set[int] = set()
        self.die_on_generate = False
        self.dead = False
        # What the scheduler last reported; tests set it as vLLM's stat logger would.
        self.scheduler = EngineStats(cache_config={"block_size": "16", "num_gpu_blocks": "64"})

    @property
    def is_dead(self) -> bool:
        return self.dead

    def stats(self) -> EngineStats:
        return self.scheduler

    async def add_lora(self, lora: LoraSpec) -> None:
        self.add_calls.append(lora.int_id)
        if lora.int_id in self.reject:
            raise AdapterRejectedError(f"fake engine refuses {lora.name}")
        assert (lora.path / "adapter_model.safetensors").is_file(), "add_lora on missing files"
        if self.add_gate is not None:
            await self.add_gate()
        self.loaded[lora.int_id] = lora
        # Past its capacity vLLM would evict on its own, possibly an adapter in use.
        assert self.capacity is None or len(self.loaded) <= self.capacity, "engine over capacity"

    async def remove_lora(self, int_id: int) -> None:
        self.removed.append(int_id)
        self.loaded.pop(int_id, None)

    async def list_loras(self) -> set[int]:
        return set(self.loaded)

    async def generate(self, prompt_ids: list[int], sampling: SamplingSpec, request_id: str,
                       lora: LoraSpec | None) -> AsyncIterator[Delta]:
        if self.die_on_generate:
            self.dead = True
            raise EngineDeadError("fake engine died")
        if lora is not None:
            assert self.loaded.get(lora.int_id) == lora, "generate() with an unaccepted adapter"
        words = f"{lora.name if lora else 'base'} says hello world".split()
        n = min(len(words), sampling.max_tokens)
        for i in range(n):
            last = i == n - 1
            reason = ("stop" if n == len(words) else "length") if last else None
            yield Delta((" " if i else "") + words[i], i + 1, len(prompt_ids), reason)

    def openai(self, options: ServingOptions) -> FakeServing:
        self.serving = FakeServing(self, options)
        return self.serving

    def shutdown(self) -> None:
        pass


class FakeServing:
    """The OpenAI layer on the fake engine: every choice says the fake engine's words.

    It checks the invariants the real layer relies on (an accepted adapter, the caller's
    name echoed back) and fills the route's meter the way the real one does.
    """

    def __init__(self, engine: FakeEngine, options: ServingOptions) -> None:
        self.engine = engine
        self.options = options
        self.requests: list[Any] = []  # every request as the layer received it
        self.routes: list[Route] = []  # and the route the gateway resolved for it
        self.stored: dict[str, dict[str, Any]] = {}  # stored responses, as vLLM's dict
        self.die_mid_stream = False
        # Awaited after a stream's first content event is handed on, before the next is made.
        self.after_first_content: Callable[[], Awaitable[None]] | None = None

    async def chat(self, request: Any, route: Route) -> ServingResult:
        self.routes.append(route)
        prompt = sum(len(str(m.get("content", "")).split()) + 4 for m in request.messages)
        limit = request.max_completion_tokens or request.max_tokens
        await self._charge_prompts(route, [prompt])
        return self._answer(request, route, [prompt], limit, "chat.completion", "chatcmpl")

    async def completion(self, request: Any, route: Route) -> ServingResult:
        prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        sizes = [len(p) if isinstance(p, list) else len(str(p).split()) for p in prompts]
        await self._charge_prompts(route, sizes)
        return self._answer(request, route, sizes, request.max_tokens, "text_completion", "cmpl")

    async def responses(self, request: Any, route: Route) -> ServingResult:
        # The real layer's shapes, in brief: one message of the fake engine's words.
        if request.previous_response_id is not None and \
                request.previous_response_id not in self.stored:
            raise ResponseNotFoundError.of(request.previous_response_id)
        await self._charge_prompts(route, [len(str(request.input).split()) + 4])
        self.requests.append(request)
        words = f"{route.lora.name if route.lora else 'base'} says hello world".split()
        words = words[:request.max_output_tokens or len(words)]
        route.meter.completion_tokens[(route.request_id, 0)] = len(words)
        if route.meter.on_completion is not None:
            route.meter.on_completion(len(words))
        route.meter.first_token_at = time.perf_counter()
        body = {"id": request.request_id, "object": "response", "model": route.public_model,
                "status": "completed", "previous_response_id": request.previous_response_id,
                "output": [{"type": "message", "role": "assistant", "content": [
                    {"type": "output_text", "text": " ".join(words)}]}],
                "usage": {"input_tokens": 4, "output_tokens": len(words),
                          "total_tokens": 4 + len(words)}}
        if request.store:
            self.stored[request.request_id] = body
        if not request.stream:
            return body
        return self._response_events(body, words)

    async def _response_events(self, body: dict[str, Any], words: list[str]) -> AsyncIterator[str]:
        def event(kind: str, n: int, **fields: Any) -> str:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': n, **fields})}\n\n"

        yield event("response.created", 0, response={**body, "status": "in_progress", "output": []})
        for k, word in enumerate(words):
            if self.die_mid_stream:
                self.engine.dead = True
                raise EngineDeadError("fake engine died mid-stream")
            yield event("response.output_text.delta", k + 1, delta=(" " if k else "") + word)
            if k == 0 and self.after_first_content is not None:
                await self.after_first_content()
        yield event("response.completed", len(words) + 1, response=body)

    async def retrieve_response(self, response_id: str) -> dict[str, Any]:
        if response_id not in self.stored:
            raise ResponseNotFoundError.of(response_id)
        return self.stored[response_id]

    async def cancel_response(self, response_id: str) -> dict[str, Any]:
        await self.retrieve_response(response_id)
        raise InvalidRequestError("Cannot cancel a synchronous response.", param="response_id")

    def forget_response(self, response_id: str) -> None:
        self.stored.pop(response_id, None)

    async def tokenize(self, request: Any, route: Route) -> dict[str, Any]:
        # One token per character: enough to tell what was tokenized.
        self.requests.append(request)
        text = getattr(request, "prompt", None)
        if text is None:
            text = "".join(f"<{m['role']}>{m.get('content') or ''}" for m in request.messages)
        tokens = [ord(c) for c in text]
        return {"count": len(tokens), "max_model_len": 512, "tokens": tokens,
                "token_strs": list(text) if request.return_token_strs else None}

    async def detokenize(self, request: Any, route: Route) -> dict[str, Any]:
        self.requests.append(request)
        if any(t >= 0x110000 for t in request.tokens):  # the fake's vocabulary: Unicode
            raise InvalidRequestError("token id out of vocabulary", param="tokens")
        return {"prompt": "".join(chr(t) for t in request.tokens)}

    async def _charge_prompts(self, route: Route, sizes: list[int]) -> None:
        # As the real layer's metering client does: each prompt before it is generated.
        if route.meter.on_prompt is not None:
            for size in sizes:
                await route.meter.on_prompt(size)

    def _answer(self, request: Any, route: Route, prompt_sizes: list[int], limit: int | None,
                kind: str, prefix: str) -> ServingResult:
        self.requests.append(request)
        engine = self.engine
        if engine.die_on_generate:
            engine.dead = True
            raise EngineDeadError("fake engine died")
        if route.lora is not None:
            assert engine.loaded.get(route.lora.int_id) == route.lora, "unaccepted adapter"
        if request.temperature is not None and request.temperature > 2:
            raise InvalidRequestError("temperature out of range", param="temperature")
        words = f"{route.lora.name if route.lora else 'base'} says hello world".split()
        n_words = min(len(words), limit or len(words))
        text = " ".join(words[:n_words])
        finish = "stop" if n_words == len(words) else "length"
        choices = []
        for p, size in enumerate(prompt_sizes):
            route.meter.prompt_tokens[f"{route.request_id}-{p}"] = size
            for i in range(request.n or 1):
                route.meter.completion_tokens[(f"{route.request_id}-{p}", i)] = n_words
                if route.meter.on_completion is not None:
                    route.meter.on_completion(n_words)
                choices.append((p * (request.n or 1) + i, text))
        route.meter.first_token_at = time.perf_counter()
        route.meter.head = text[:160]
        usage = {"prompt_tokens": sum(prompt_sizes),
                 "completion_tokens": n_words * len(choices),
                 "total_tokens": sum(prompt_sizes) + n_words * len(choices)}
        head = {"id": f"{prefix}-{request.request_id}", "created": int(time.time()),
                "model": route.public_model}
        chat = kind == "chat.completion"
        logprobs = None
        if chat and request.logprobs:  # each word a token, sure of itself
            logprobs = {"content": [{"token": w, "logprob": -0.1, "top_logprobs": [
                {"token": w, "logprob": -0.1}, {"token": "<other>", "logprob": -2.5},
            ][:request.top_logprobs or 1]} for w in words[:n_words]]}
        if not request.stream:
            return {**head, "object": kind, "usage": usage, "choices": [
                {"index": i, "finish_reason": finish, "logprobs": logprobs,
                 **({"message": {"role": "assistant", "content": t}} if chat else {"text": t})}
                for i, t in choices]}
        return self._events(head, kind + (".chunk" if chat else ""), choices, words[:n_words],
                            finish, usage if request.stream_options and
                            request.stream_options.include_usage else None, chat)

    async def _events(self, head: dict[str, Any], kind: str, choices: list[tuple[int, str]],
                      words: list[str], finish: str, usage: dict[str, int] | None,
                      chat: bool) -> AsyncIterator[str]:
        def event(index: int, piece: str | None, reason: str | None) -> str:
            body = {"delta": {"content": piece} if piece is not None else {}} if chat else {
                "text": piece or ""}
            return _sse({**head, "object": kind, "choices": [
                {"index": index, **body, "finish_reason": reason, "logprobs": None}]})

        for index, _ in choices:
            if chat:
                yield _sse({**head, "object": kind, "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""},
                     "finish_reason": None, "logprobs": None}]})
            for k, word in enumerate(words):
                if self.die_mid_stream:
                    self.engine.dead = True
                    raise EngineDeadError("fake engine died mid-stream")
                yield event(index, (" " if k else "") + word, None)
                if k == 0 and index == 0 and self.after_first_content is not None:
                    await self.after_first_content()
            yield event(index, None if chat else "", finish)
        if usage is not None:
            yield _sse({**head, "object": kind, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
