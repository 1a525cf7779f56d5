"""Engine interface types."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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


class Engine(Protocol):
    @property
    def is_dead(self) -> bool: ...

    async def add_lora(self, lora: LoraSpec) -> None:
        """Load and validate an adapter; raises AdapterRejectedError, never kills the engine."""
        ...

    async def remove_lora(self, int_id: int) -> None: ...

    def generate(
        self, prompt_ids: list[int], sampling: SamplingSpec, request_id: str, lora: LoraSpec | None
    ) -> AsyncIterator[Delta]:
        """Stream deltas; raises EngineDeadError if the engine died, EngineError otherwise."""
        ...

    def shutdown(self) -> None: ...
