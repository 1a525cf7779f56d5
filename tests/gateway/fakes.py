"""A fake engine with the real one's interface, and the invariants the real one needs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from gateway.engine import (
    AdapterRejectedError,
    Delta,
    EngineDeadError,
    LoraSpec,
    SamplingSpec,
)


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

    @property
    def is_dead(self) -> bool:
        return self.dead

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

    def shutdown(self) -> None:
        pass
