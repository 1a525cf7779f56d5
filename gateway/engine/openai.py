"""vLLM's own OpenAI serving classes, in process, serving the gateway's adapters.

``OpenAIServingChat`` and ``OpenAIServingCompletion`` do everything after the gateway
has resolved a request: templating, sampling parameters, structured outputs, tool
parsing, logprobs, echo, batch prompts and the SSE shapes, exactly as vLLM's server
does. The gateway keeps what is its own (docs/dev-notes/vllm-openai-layer-reuse.md):

- Adapters: ``_check_model`` and ``_maybe_get_adapters`` are overridden to hand vLLM
  the ``LoRARequest`` the AdapterManager already added; vLLM's own loading paths
  (``load_lora_adapter``, ``resolve_lora``, static LoRAs) refuse to run.
- Names: the response's ``model`` is the caller's name, never the internal ref.
- Metering: vLLM sees the engine through ``_MeteredClient``, which counts the tokens of
  every prompt and every choice into the request's ``Meter``.
- Errors: vLLM's error values, exceptions and in-stream error events become the
  gateway's errors, so there is one envelope.

The classes' private hooks change between vLLM minors, so ``check_vllm_layer`` verifies
the signatures this module relies on at start-up and refuses to start otherwise.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

import vllm
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.openai.responses.protocol import ResponsesResponse
from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.renderers.inputs.preprocess import extract_prompt_len
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine import exceptions as vllm_exc
from vllm.v1.engine.async_llm import AsyncLLM

from gateway.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from gateway.engine.base import (
    LoraSpec,
    Meter,
    Route,
    ServingOptions,
    ServingResult,
)
from gateway.engine.metering import metered
from gateway.errors import (
    EngineDeadError,
    EngineUnavailableError,
    GatewayError,
    InvalidRequestError,
    ResponseNotFoundError,
    ServingLayerMismatchError,
)

logger = logging.getLogger(__name__)
_route: ContextVar[Route] = ContextVar("lgw_route")
_ERROR_EVENT = 'data: {"error":'
_OPENING_EVENTS = frozenset({"response.created", "response.in_progress"})
# What this module calls or overrides, by class: the parameters it passes, or () for a
# method it overrides (which must exist with that name).
_EXPECTED: dict[type, dict[str, tuple[str, ...]]] = {
    OpenAIServingChat: {
        "__init__": ("engine_client", "models", "response_role", "online_renderer",
                     "request_logger", "chat_template", "chat_template_content_format",
                     "enable_auto_tools", "tool_parser"),
        "create_chat_completion": ("request", "raw_request"),
        "_check_model": ("request",), "_maybe_get_adapters": ("request",)},
    OpenAIServingCompletion: {
        "__init__": ("engine_client", "models", "online_renderer", "request_logger"),
        "create_completion": ("request", "raw_request"),
        "_check_model": ("request",), "_maybe_get_adapters": ("request",)},
    OpenAIServingResponses: {
        "__init__": ("engine_client", "models", "online_renderer", "request_logger",
                     "chat_template", "chat_template_content_format", "enable_auto_tools",
                     "tool_parser"),
        "create_responses": ("request", "raw_request"),
        "retrieve_responses": ("response_id", "starting_after", "stream"),
        "cancel_responses": ("response_id",),
        "_check_model": ("request",), "_maybe_get_adapters": ("request",)},
    ServingTokenization: {
        "__init__": ("models", "online_renderer", "chat_template", "chat_template_content_format",
                     "request_logger"),
        "create_tokenize": ("request", "raw_request"),
        "create_detokenize": ("request", "raw_request"),
        "_check_model": ("request",), "_maybe_get_adapters": ("request",)},
    OpenAIServingModels: {
        "__init__": ("engine_client", "base_model_paths", "lora_modules"),
        "model_name": ("lora_request",), "load_lora_adapter": (), "resolve_lora": (),
        "init_static_loras": ()},
    OnlineRenderer: {
        "__init__": ("model_config", "renderer", "request_logger", "chat_template",
                     "chat_template_content_format", "enable_auto_tools", "tool_parser")},
}
# Either would let a request name, or load, adapters past the gateway.
_FORBIDDEN_ENV = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_SKIP_MODEL_NAME_VALIDATION")


def check_vllm_layer() -> None:
    """Fail loudly, at start-up, if vLLM's serving layer is not the one this code targets."""
    problems = []
    for cls, methods in _EXPECTED.items():
        for name, params in methods.items():
            method = getattr(cls, name, None)
            if method is None:
                problems.append(f"{cls.__name__}.{name} is missing")
                continue
            have = inspect.signature(method).parameters
            missing = [p for p in params if p not in have]
            if missing:
                problems.append(f"{cls.__name__}.{name} has no parameter(s) {', '.join(missing)}")
    problems += [f"{var} is set" for var in _FORBIDDEN_ENV if os.environ.get(var, "") not in ("", "0")]
    if problems:
        raise ServingLayerMismatchError(
            f"lora-gateway serves through vLLM 0.32's OpenAI layer; vllm {vllm.__version__} "
            f"differs: {'; '.join(problems)}. Install the vLLM minor pinned in pyproject.toml.")


def lora_request(lora: LoraSpec) -> LoRARequest:
    """The request vLLM keys adapters by; equal (by name) to the one ``add_lora`` got."""
    return LoRARequest(lora_name=lora.name, lora_int_id=lora.int_id, lora_path=str(lora.path))


class _Models(OpenAIServingModels):
    """Names the response after the caller's ``model``; loads nothing itself."""

    def model_name(self, lora_request: LoRARequest | None = None) -> str:
        return _route.get().public_model

    async def load_lora_adapter(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("adapters are loaded by the gateway's AdapterManager only")

    async def resolve_lora(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("adapters are resolved by the gateway's TenantDirectory only")

    async def init_static_loras(self) -> None:
        raise RuntimeError("the gateway serves no static adapters")


class _Routing:
    """The gateway already resolved the tenant's ``model``: vLLM takes its word for it."""

    async def _check_model(self, request: Any) -> ErrorResponse | None:
        return None

    def _maybe_get_adapters(self, request: Any, supports_default_mm_loras: bool = False
                            ) -> LoRARequest | None:
        lora = _route.get().lora
        return None if lora is None else lora_request(lora)


class _Chat(_Routing, OpenAIServingChat):
    pass


class _Completion(_Routing, OpenAIServingCompletion):
    pass


class _Tokenization(_Routing, ServingTokenization):
    pass


class _Responses(_Routing, OpenAIServingResponses):
    pass


class _MeteredClient:
    """The engine as vLLM's serving classes see it; counts what ``generate`` returns."""

    def __init__(self, engine: AsyncLLM) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                 **kwargs: Any) -> AsyncGenerator[RequestOutput, None]:
        # A plain function: the route is read now, inside the request's context, not
        # whenever the stream happens to be iterated.
        route = _route.get()
        meter = route.meter
        if route.trace_headers is not None:
            kwargs["trace_headers"] = route.trace_headers  # vLLM's span: a child of the gateway's
        kind = getattr(sampling_params, "output_kind", None)
        final_only = kind == RequestOutputKind.FINAL_ONLY
        if final_only:
            # A non-streamed answer: the engine reports its tokens as they are generated, so
            # one whose client leaves is charged what it produced; only the final output
            # goes on to the serving class, as it asked.
            sampling_params = sampling_params.clone()
            sampling_params.output_kind = RequestOutputKind.CUMULATIVE
        try:
            prompt_len: int | None = extract_prompt_len(self._engine.model_config, prompt)
        except Exception:  # an input kind without a length: charged from its first output
            prompt_len = None
        return metered(self._engine.generate(prompt, sampling_params, request_id, **kwargs),
                       meter, kind != RequestOutputKind.DELTA, prompt_len, request_id, final_only)


class VllmOpenAI:
    """The chat and completions endpoints of vLLM's server, on the gateway's engine."""

    def __init__(self, engine: AsyncLLM, options: ServingOptions) -> None:
        check_vllm_layer()
        client: Any = _MeteredClient(engine)
        models = _Models(client, [BaseModelPath(options.base_name, str(options.base_dir))],
                         lora_modules=None)
        tools = options.tool_call_parser is not None
        common: dict[str, Any] = dict(request_logger=None, chat_template=None,
                                      chat_template_content_format="auto",
                                      enable_auto_tools=tools, tool_parser=options.tool_call_parser)
        renderer = OnlineRenderer(engine.model_config, engine.renderer, **common)
        renderer.warmup()
        self._chat = _Chat(client, models, "assistant", online_renderer=renderer,
                           default_chat_template_kwargs={}, **common)
        self._completion = _Completion(client, models, online_renderer=renderer, request_logger=None)
        self._responses = _Responses(client, models, renderer, **common)
        # vLLM keeps stored responses only with VLLM_ENABLE_RESPONSES_API_STORE, and then
        # forever; the gateway bounds the store and keeps it per tenant
        # (gateway.engine.serving), so it is on whenever the gateway stores any.
        self._responses.enable_store = options.stored_responses > 0
        self._tokenization = _Tokenization(models, renderer, chat_template=None,
                                           chat_template_content_format="auto",
                                           request_logger=None)

    async def chat(self, request: ChatCompletionRequest, route: Route) -> ServingResult:
        return await self._call(self._chat.create_chat_completion, request, route)

    async def completion(self, request: CompletionRequest, route: Route) -> ServingResult:
        return await self._call(self._completion.create_completion, request, route)

    async def responses(self, request: ResponsesRequest, route: Route) -> ServingResult:
        token = _route.set(route)
        try:
            result = await self._responses.create_responses(request, None)
            if isinstance(result, ErrorResponse) and _cancelling():
                raise asyncio.CancelledError
        except Exception as exc:
            raise route.meter.refusal or _translate(exc) from exc
        finally:
            _route.reset(token)
        if isinstance(result, ErrorResponse):
            raise route.meter.refusal or _from_error_response(result)
        if isinstance(result, ResponsesResponse):
            body: dict[str, Any] = result.model_dump(mode="json", by_alias=True)
            return body
        return _response_events(result, route)

    async def retrieve_response(self, response_id: str) -> dict[str, Any]:
        result = await self._responses.retrieve_responses(response_id, None, False)
        if isinstance(result, ErrorResponse):
            raise _from_error_response(result)
        assert isinstance(result, ResponsesResponse), "not streamed: one body"
        body: dict[str, Any] = result.model_dump(mode="json", by_alias=True)
        return body

    async def cancel_response(self, response_id: str) -> dict[str, Any]:
        result = await self._responses.cancel_responses(response_id)
        if isinstance(result, ErrorResponse):
            raise _from_error_response(result)
        body: dict[str, Any] = result.model_dump(mode="json", by_alias=True)
        return body

    def forget_response(self, response_id: str) -> None:
        """Drop a stored response and its conversation (the gateway bounds the store)."""
        self._responses.response_store.pop(response_id, None)
        self._responses.msg_store.pop(response_id, None)

    async def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest,
                       route: Route) -> dict[str, Any]:
        return await self._plain(self._tokenization.create_tokenize, request, route)

    async def detokenize(self, request: DetokenizeRequest, route: Route) -> dict[str, Any]:
        return await self._plain(self._tokenization.create_detokenize, request, route)

    async def _plain(self, create: Callable[[Any, Any], Awaitable[Any]], request: Any,
                     route: Route) -> dict[str, Any]:
        """A call that answers one JSON body and generates nothing (no engine request)."""
        result = await self._call(create, request, route)
        assert isinstance(result, dict), "tokenization answers one body"
        return result

    async def _call(self, create: Callable[[Any, None], Awaitable[Any]], request: Any,
                    route: Route) -> ServingResult:
        token = _route.set(route)
        try:
            result = await create(request, None)
            if isinstance(result, ErrorResponse) and _cancelling():
                # vLLM answers a non-streamed request cancelled mid-generation (its client
                # left) with an error value, "Client disconnected", after aborting it in the
                # engine. The cancellation stays one: a client that left, not a 400.
                raise asyncio.CancelledError
            return _result(result, route.meter)
        except Exception as exc:
            raise route.meter.refusal or _translate(exc) from exc
        finally:
            _route.reset(token)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _result(result: Any, meter: Meter) -> ServingResult:
    if isinstance(result, ErrorResponse):
        raise meter.refusal or _from_error_response(result)
    if isinstance(result, AsyncGenerator):
        return _events(result, meter)
    body: dict[str, Any] = result.model_dump()  # as vLLM's own router answers it
    return body


async def _events(lines: AsyncGenerator[str, None], meter: Meter) -> AsyncIterator[str]:
    """vLLM's SSE lines; its in-stream error event becomes the gateway's error, raised."""
    try:
        async for line in lines:
            if line.startswith(_ERROR_EVENT):
                payload = json.loads(line[len("data: "):])
                raise meter.refusal or _from_error_response(ErrorResponse.model_validate(payload))
            yield line
    finally:
        await lines.aclose()


async def _response_events(events: AsyncGenerator[Any, None], route: Route) -> AsyncIterator[str]:
    """The Responses stream's events as vLLM's server frames them (``event:`` and ``data:``).

    vLLM's stream starts the engine request only when it is iterated, after its first two
    events (``response.created``, ``response.in_progress``): each step runs with the
    request's route set, and those two are held until the engine's first output, so that
    a refusal (the prompt over the key's token quota, too long for the model) is still a
    plain HTTP error, as for chat, and not a stream that fails at once.
    """
    held: list[str] = []
    try:
        while True:
            token = _route.set(route)
            try:
                event = await anext(events, None)
            finally:
                _route.reset(token)
            if event is None:
                break
            kind = getattr(event, "type", "unknown")
            line = f"event: {kind}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
            if kind in _OPENING_EVENTS:
                held.append(line)
                continue
            while held:
                yield held.pop(0)
            yield line
        while held:
            yield held.pop(0)
    finally:
        await events.aclose()


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, (GatewayError, EngineDeadError)):
        return exc
    if isinstance(exc, vllm_exc.EngineDeadError):
        return EngineDeadError(str(exc))
    return _from_error_response(create_error_response(exc))


def _from_error_response(err: ErrorResponse) -> GatewayError:
    info = err.error
    if info.code == HTTPStatus.NOT_FOUND and info.param == "response_id":
        return ResponseNotFoundError(info.message)
    if info.code < 500:
        return InvalidRequestError(info.message, param=info.param)
    logger.error("vLLM's serving layer failed a request (%s): %s", info.type, info.message)
    if info.code == HTTPStatus.SERVICE_UNAVAILABLE:
        return EngineUnavailableError("generation failed; retry shortly")
    return GatewayError("internal error; see the gateway log")
