"""Engine interface types."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.api.schemas import (
        ChatCompletionRequest,
        CompletionRequest,
        DetokenizeRequest,
        ResponsesRequest,
        TokenizeChatRequest,
        TokenizeCompletionRequest,
    )


@dataclass(frozen=True)
class LoraSpec:
    """One adapter version as the engine sees it: a stable id and a verified local folder."""

    name: str
    int_id: int
    path: Path


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Delta:
    """New text since the previous delta, with running token counts."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class EngineStats:
    """The engine scheduler's latest report (vLLM sends one with every step's outputs).

    Between steps nothing changes in the engine, so the last report stands; before the
    first step nothing ran yet. ``waiting_adapters`` names (``LoraSpec.name``) the adapters
    of requests the engine has accepted but not yet scheduled.
    """

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    waiting_adapters: frozenset[str] = frozenset()
    cache_config: dict[str, str] = field(default_factory=dict)  # vLLM's cache_config_info labels


class Engine(Protocol):
    @property
    def is_dead(self) -> bool: ...

    def stats(self) -> EngineStats:
        """The scheduler's latest state (no awaiting: read on every metrics scrape)."""
        ...

    async def add_lora(self, lora: LoraSpec) -> None:
        """Load and validate an adapter; raises AdapterRejectedError, never kills the engine."""
        ...

    async def remove_lora(self, int_id: int) -> None: ...

    async def list_loras(self) -> set[int]:
        """The ``lora_int_id``s the engine itself holds (its own view, not the gateway's)."""
        ...

    def generate(
        self, prompt_ids: list[int], sampling: SamplingSpec, request_id: str, lora: LoraSpec | None
    ) -> AsyncIterator[Delta]:
        """Stream deltas; raises EngineDeadError if the engine died, EngineError otherwise.

        The raw decode that serving parity compares with PEFT; tenants' requests go
        through ``openai()``."""
        ...

    def openai(self, options: ServingOptions) -> OpenAIServing:
        """vLLM's OpenAI serving layer on this engine (built once per engine)."""
        ...

    def shutdown(self) -> None: ...


HEAD_CHARS = 160


@dataclass
class Meter:
    """Every token the engine produced for one API request: each prompt, each choice.

    Filled in by the serving layer as outputs arrive (streamed or not), so a caller can
    charge quotas or fairness for all ``n`` choices and every prompt of a batch.
    """

    prompt_tokens: dict[str, int] = field(default_factory=dict)  # engine request id -> tokens
    completion_tokens: dict[tuple[str, int], int] = field(default_factory=dict)  # (id, choice)
    first_token_at: float | None = None  # time.perf_counter() of the first generated token
    # The opening of the first prompt's first choice (at most HEAD_CHARS), to tell a refusal.
    head: str = ""
    # Quota hooks: each prompt's length before it is generated (may refuse it), and each
    # increment of generated tokens (any choice, any prompt of a batch).
    on_prompt: Callable[[int], Awaitable[None]] | None = None
    on_completion: Callable[[int], None] | None = None
    refusal: Exception | None = None  # what on_prompt raised, to answer with as it is

    @property
    def total_prompt_tokens(self) -> int:
        return sum(self.prompt_tokens.values())

    @property
    def total_completion_tokens(self) -> int:
        return sum(self.completion_tokens.values())


@dataclass(frozen=True)
class ServingOptions:
    """How the OpenAI layer serves this base."""

    base_name: str  # the base's public ``model`` name
    base_dir: Path
    tool_call_parser: str | None = None  # vLLM tool parser for the base's chat template
    stored_responses: int = 0  # Responses kept for retrieval and previous_response_id


@dataclass(frozen=True)
class Route:
    """What the gateway resolved for one request: the engine only serves it."""

    public_model: str  # the name the caller used, echoed as ``model``
    lora: LoraSpec | None  # already accepted by ``add_lora``; None for the base
    meter: Meter
    request_id: str
    # The request's trace context for the engine's own spans (W3C headers); None: untraced.
    trace_headers: dict[str, str] | None = None


# A finished body (JSON-ready) or the SSE lines of a stream, ending with ``data: [DONE]``.
ServingResult = dict[str, Any] | AsyncIterator[str]


class OpenAIServing(Protocol):
    """The OpenAI endpoints on an engine. Raises ``GatewayError``s (and ``EngineDeadError``);
    an error after a stream started ends the stream by raising one."""

    async def chat(self, request: ChatCompletionRequest, route: Route) -> ServingResult: ...

    async def completion(self, request: CompletionRequest, route: Route) -> ServingResult: ...

    async def responses(self, request: ResponsesRequest, route: Route) -> ServingResult: ...

    async def retrieve_response(self, response_id: str) -> dict[str, Any]: ...

    async def cancel_response(self, response_id: str) -> dict[str, Any]: ...

    def forget_response(self, response_id: str) -> None: ...

    async def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest,
                       route: Route) -> dict[str, Any]: ...

    async def detokenize(self, request: DetokenizeRequest, route: Route) -> dict[str, Any]: ...
