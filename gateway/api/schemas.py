"""OpenAI-compatible request and response bodies.

The request bodies are vLLM's own protocol models (``vllm.entrypoints.openai``), made
strict: the gateway accepts exactly the parameters vLLM's OpenAI server serves, with
OpenAI's types and ranges, and refuses anything else with a 400 naming the parameter
(unknown fields, fields a tenant must not set, non-text content on a text base). They
are vLLM types on purpose: the serving layer (``gateway.engine.openai``) hands them to
vLLM's own serving classes, so what is validated here is exactly what is served.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    field_validator,
    model_validator,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as _VllmChatRequest,
)
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as _VllmCompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as _VllmResponsesRequest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest as _VllmDetokenize
from vllm.entrypoints.serve.tokenize.protocol import (
    TokenizeChatRequest as _VllmTokenizeChat,
)
from vllm.entrypoints.serve.tokenize.protocol import (
    TokenizeCompletionRequest as _VllmTokenizeCompletion,
)
from vllm.exceptions import VLLMValidationError

from gateway.errors import InvalidRequestError, InvalidValueError

# Fields vLLM's server takes that a tenant must not set: server-side templates and
# their variables, scheduling and cache controls across tenants, disaggregated-serving
# hand-offs, arbitrary engine arguments, multimodal processing, raw embeddings.
DENIED_FIELDS = frozenset({
    "chat_template", "chat_template_kwargs", "kv_transfer_params", "ec_transfer_params",
    "vllm_xargs", "priority", "request_id", "session_id", "cache_salt", "mm_processor_kwargs",
    "media_io_kwargs", "mm_payload", "return_mm_kwargs", "prompt_embeds",
    "routed_experts_prompt_start",
})
# vLLM 0.32 computes prompt logprobs with the wrong LoRA mapping when LoRA is enabled;
# on the CPU backend one such request kills the engine for every tenant
# (vllm-project/vllm#29955, #16668). Found by the differential tests.
_NO_PROMPT_LOGPROBS = ("prompt logprobs are not served: with adapters enabled vLLM computes them "
                       "wrongly and can crash the engine")
# vllm-router (0.1.x, SGLang-derived) re-serializes every body it routes and adds these
# SGLang fields at these values (vllm-project/router#110). At those values they change
# nothing, so they are dropped; any other value is refused like an unknown field.
ROUTER_NO_OPS: dict[str, bool] = {"no_stop_trim": False, "return_hidden_states": False,
                                  "separate_reasoning": True, "stream_reasoning": True}
_TEXT_PARTS = frozenset({"text", "input_text"})
_RESPONSE_TEXT_PARTS = frozenset({"input_text", "output_text", "refusal", "reasoning_text",
                                  "summary_text"})
# OpenAI's chat roles; vLLM's server also takes any other string, which the chat template
# then renders or fails on. Refused as OpenAI refuses them.
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_MAX_LOGPROBS = 20  # vLLM's default max_logprobs
_KEEP = object()


def _none_to_zero(v: Any) -> Any:
    return 0 if v is None else v


def _drop_denied(schema: dict[str, Any]) -> None:
    props = schema.get("properties", {})
    for name in DENIED_FIELDS:
        props.pop(name, None)


_STRICT = ConfigDict(extra="forbid", strict=True, json_schema_extra=_drop_denied)

# Shared fields: OpenAI's ranges, where vLLM's models leave them open.
Model = Annotated[str, Field(min_length=1, max_length=200, description="Adapter name in the "
                             "caller's namespace (`name`, `name:alias`, `name@vN`) or the base.")]
Penalty = Annotated[float | None, Field(default=None, ge=-2.0, le=2.0)]
Temperature = Annotated[float | None, Field(default=None, ge=0.0, le=2.0)]
TopP = Annotated[float | None, Field(default=None, gt=0.0, le=1.0)]
TopK = Annotated[int | None, Field(default=None, ge=-1, description="-1 or 0: all tokens.")]
MinP = Annotated[float | None, Field(default=None, ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float | None, Field(default=None, gt=0.0, le=2.0)]
MaxTokens = Annotated[int | None, Field(default=None, ge=1)]
TokenIds = list[Annotated[int, Field(ge=0)]]
PromptLogprobs = Annotated[int | None, Field(default=None, ge=0, le=_MAX_LOGPROBS)]


def _surrogate_at(value: Any, path: str) -> str | None:
    """The path of the first string (key or value) with a lone surrogate, if any."""
    if isinstance(value, str):
        return path if any("\ud800" <= ch <= "\udfff" for ch in value) else None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        here = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and _surrogate_at(key, here) is not None:
            return here
        found = _surrogate_at(item, here)
        if found is not None:
            return found
    return None


class _Checks(BaseModel):
    """What every tenant body is refused for before vLLM sees it."""

    @model_validator(mode="wrap")
    @classmethod
    def _vllm_errors(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        # vLLM's own validators raise an error pydantic does not collect; it names the
        # parameter, so it becomes the gateway's 400 with that ``param``.
        try:
            return handler(data)
        except VLLMValidationError as exc:
            message = str(exc.args[0]) if exc.args else "invalid value"
            if exc.parameter and exc.parameter not in message:
                message = f"{exc.parameter}: {message}"
            raise InvalidRequestError(message, param=exc.parameter) from None

    @model_validator(mode="before")
    @classmethod
    def _refuse_denied(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in sorted(DENIED_FIELDS & data.keys()):
                # Raised, not a ValueError: pydantic lets it through, the app's one
                # handler turns it into the envelope with ``param`` set.
                raise InvalidRequestError(f"Unrecognized request argument supplied: {name}",
                                          param=name)
        return data

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data: Any) -> Any:
        # JSON may carry "\ud800"; such text is not Unicode, and the tokenizer would fail
        # on it deep inside the engine's path. Refused here, naming where it was found.
        where = _surrogate_at(data, "")
        if where is not None:
            raise InvalidRequestError(f"{where or 'body'}: the text has a lone UTF-16 surrogate; "
                                      "send valid Unicode", param=where or None)
        return data


class _Strict(_Checks):
    """The generating endpoints' shared ranges, where vLLM's models leave them open."""

    model: Model
    frequency_penalty: Penalty
    presence_penalty: Penalty
    temperature: Temperature
    top_p: TopP
    top_k: TopK
    min_p: MinP
    repetition_penalty: RepetitionPenalty
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: TokenIds | None = Field(default_factory=list)
    allowed_token_ids: TokenIds | None = None
    prompt_logprobs: PromptLogprobs

    @model_validator(mode="before")
    @classmethod
    def _drop_router_no_ops(cls, data: Any) -> Any:
        if isinstance(data, dict) and not ROUTER_NO_OPS.keys().isdisjoint(data):
            data = {k: v for k, v in data.items() if ROUTER_NO_OPS.get(k, _KEEP) is not v}
        return data

    @field_validator("stop", check_fields=False)
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "" or (isinstance(v, list) and "" in v):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logit_bias", check_fields=False)
    @classmethod
    def _bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids; got {token[:40]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {token} must be between -100 and 100")
        return v


class ChatCompletionRequest(_Strict, _VllmChatRequest):  # type: ignore[misc]  # vLLM is untyped here (Any base)
    """``POST /v1/chat/completions``: every parameter vLLM's chat endpoint serves."""

    model_config = _STRICT

    @model_validator(mode="after")
    def _no_prompt_logprobs(self) -> ChatCompletionRequest:
        # Chat's echo always asks vLLM for prompt logprobs.
        for name, value in (("prompt_logprobs", self.prompt_logprobs), ("echo", self.echo or None)):
            if value is not None:
                raise InvalidRequestError(f"{name}: {_NO_PROMPT_LOGPROBS}", param=name)
        return self

    max_tokens: MaxTokens
    max_completion_tokens: MaxTokens
    n: int | None = Field(default=1, ge=1, le=128)
    top_logprobs: Annotated[int, BeforeValidator(_none_to_zero)] = Field(
        default=0, ge=0, le=_MAX_LOGPROBS, description="With logprobs: alternatives per token.")

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        return check_messages(data)


def check_messages(data: Any) -> Any:
    """OpenAI's roles, and text only (a text base): other content parts are refused before
    vLLM fetches them. For every body that takes ``messages``."""
    messages = data.get("messages") if isinstance(data, dict) else None
    if messages == []:
        raise InvalidRequestError("messages: at least one message is required", param="messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        if isinstance(message, dict) and "role" not in message:
            # vLLM's union also takes openai-harmony's Message (`author`, no `role`):
            # not OpenAI's API, and its chat path expects every message to have a role.
            raise InvalidRequestError(f"messages[{i}]: 'role' is required", param="messages")
        if isinstance(message, dict):
            check_turn(message, f"messages[{i}]", "messages", ROLES, _TEXT_PARTS)
    return data


def check_turn(turn: dict[str, Any], where: str, param: str, roles: Iterable[str],
               parts: Iterable[object]) -> None:
    """One message (or Responses input item): a known role, and text content parts only."""
    role = turn.get("role")
    if isinstance(role, str) and role not in roles:
        raise InvalidValueError(f"{where}.role: invalid value {role[:40]!r}; supported values are "
                                f"{', '.join(repr(r) for r in roles)}", param=f"{where}.role")
    content = turn.get("content")
    for part in content if isinstance(content, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in parts:
            raise InvalidRequestError(f"{where}: content parts of type {str(kind)[:40]!r} are not "
                                      "supported: this model takes text only", param=param)


class CompletionRequest(_Strict, _VllmCompletionRequest):  # type: ignore[misc]  # vLLM is untyped here (Any base)
    """``POST /v1/completions``: plain prompts (one, a batch, or token ids), as vLLM serves them."""

    model_config = _STRICT

    max_tokens: int | None = Field(default=16, ge=1)
    n: int = Field(default=1, ge=1, le=128)
    logprobs: int | None = Field(default=None, ge=0, le=_MAX_LOGPROBS)

    @model_validator(mode="after")
    def _no_prompt_logprobs(self) -> CompletionRequest:
        if self.prompt_logprobs is not None:
            raise InvalidRequestError(f"prompt_logprobs: {_NO_PROMPT_LOGPROBS}", param="prompt_logprobs")
        if self.echo and self.logprobs is not None:  # echo with logprobs scores the prompt
            raise InvalidRequestError(f"echo with logprobs: {_NO_PROMPT_LOGPROBS}", param="echo")
        return self


OptionalModel = Annotated[str | None, Field(default=None, min_length=1, max_length=200,
                          description="As `model` elsewhere; absent: the base, where it is served.")]


# The roles of a Responses ``input`` message (OpenAI's EasyInputMessage and Message).
RESPONSE_ROLES = ("user", "assistant", "system", "developer")
# Responses fields vLLM serves only for gpt-oss (harmony) or for background requests,
# neither of which this gateway serves.
_RESPONSES_DENIED = frozenset({"previous_input_messages"})


class ResponsesRequest(_Checks, _VllmResponsesRequest):
    """``POST /v1/responses``: OpenAI's Responses API, as vLLM's server serves it."""

    model_config = _STRICT

    model: OptionalModel
    temperature: Temperature
    top_p: TopP
    top_k: TopK
    min_p: MinP
    frequency_penalty: Penalty
    presence_penalty: Penalty
    repetition_penalty: RepetitionPenalty
    max_output_tokens: MaxTokens
    top_logprobs: Annotated[int, BeforeValidator(_none_to_zero)] = Field(
        default=0, ge=0, le=_MAX_LOGPROBS, description="Alternatives per token, with "
        "`include: [\"message.output_text.logprobs\"]`.")
    stop_token_ids: TokenIds | None = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _served(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name in sorted(_RESPONSES_DENIED & data.keys()):
            raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name)
        if data.get("background"):
            raise InvalidRequestError("background responses are not served: send the request "
                                      "and keep the connection (stream to see progress)",
                                      param="background")
        items = data.get("input")
        for i, item in enumerate(items if isinstance(items, list) else ()):
            if isinstance(item, dict):
                check_turn(item, f"input[{i}]", "input", RESPONSE_ROLES, _RESPONSE_TEXT_PARTS)
        return data


class TokenizeCompletionRequest(_Checks, _VllmTokenizeCompletion):
    """``POST /tokenize`` with a ``prompt``: its token ids, as vLLM's server tokenizes it."""

    model_config = _STRICT
    model: OptionalModel


class TokenizeChatRequest(_Checks, _VllmTokenizeChat):
    """``POST /tokenize`` with ``messages``: the chat template's prompt, tokenized."""

    model_config = _STRICT
    model: OptionalModel

    @model_validator(mode="before")
    @classmethod
    def _messages(cls, data: Any) -> Any:
        return check_messages(data)


class DetokenizeRequest(_Checks, _VllmDetokenize):
    """``POST /detokenize``: token ids back to text."""

    model_config = _STRICT
    model: OptionalModel


TokenizeRequest = Annotated[TokenizeCompletionRequest | TokenizeChatRequest,
                            Field(union_mode="left_to_right")]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
