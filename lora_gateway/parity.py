"""Serving parity: the gateway's engine must decode an adapter exactly as PEFT does.

For each prompt, the token ids come from ``adapters_registry.prompts.prompt_ids`` with
the base's tokenizer and pinned chat template (the rendering the gateway serves with),
so both sides start from identical ids. PEFT (base +
adapter, float32, unmerged) decodes greedily by full forward passes; the engine
decodes greedily (temperature 0) through ``Engine.generate`` with the adapter's
``LoraSpec``, after ``add_lora`` as the gateway always does. Run the engine in
float32 too: in bf16 the two sides legitimately round apart.

The engine interface streams text and token counts, not token ids, so a prompt
matches when the generated text (special tokens skipped, as vLLM detokenizes), the
number of generated tokens and the finish reason are all equal.

It lives at the composition level because it needs both sides: the trainer's PEFT
reference (``trainer.merge``) and the gateway's engine (``gateway.engine``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from adapters_registry import prompt_ids, stop_token_ids
from gateway import Engine, LoraSpec, SamplingSpec
from trainer import (
    DEFAULT_PROMPTS,
    MergeError,
    ParityError,
    greedy_ids,
    load_checked_adapter,
    load_peft,
    threads_for,
    torch_threads,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Generation",
    "PromptParity",
    "ServingParityReport",
    "check_serving_parity",
    "peft_greedy",
    "served_greedy",
]

DEFAULT_MAX_TOKENS = 32


@dataclass(frozen=True)
class Generation:
    """One greedy completion. ``token_ids`` is known on the PEFT side only."""

    text: str
    completion_tokens: int
    finish_reason: str | None
    token_ids: tuple[int, ...] = ()

    def same_output(self, other: Generation) -> bool:
        return (self.text, self.completion_tokens, self.finish_reason) == (
            other.text, other.completion_tokens, other.finish_reason)  # fmt: skip


@dataclass(frozen=True)
class PromptParity:
    messages: tuple[dict[str, str], ...]
    prompt_ids: tuple[int, ...]
    peft: Generation
    served: Generation

    @property
    def matches(self) -> bool:
        return self.peft.same_output(self.served)


@dataclass(frozen=True)
class ServingParityReport:
    adapter: str
    max_tokens: int
    prompts: tuple[PromptParity, ...]

    @property
    def passed(self) -> bool:
        return all(p.matches for p in self.prompts)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "max_tokens": self.max_tokens, "passed": self.passed,
                "prompts": [asdict(p) | {"matches": p.matches} for p in self.prompts]}


def peft_greedy(
    adapter_dir: Path,
    base_dir: Path,
    prompt_token_ids: Sequence[Sequence[int]],
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> list[Generation]:
    """PEFT's greedy completions (base + adapter, float32, unmerged) of each prompt."""
    checked = load_checked_adapter(adapter_dir, base_dir)
    model = load_peft(checked, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    stops = stop_token_ids(Path(base_dir), tokenizer)
    out = []
    with torch_threads(threads_for(model)):
        for ids in prompt_token_ids:
            tokens, finish = greedy_ids(model, ids, max_tokens, stops)
            text = str(tokenizer.decode(tokens, skip_special_tokens=True))
            out.append(Generation(text, len(tokens), finish, tuple(tokens)))
    return out


async def served_greedy(engine: Engine, lora: LoraSpec, ids: Sequence[int],
                        max_tokens: int = DEFAULT_MAX_TOKENS) -> Generation:
    """The engine's greedy completion of one prompt with ``lora`` (already added)."""
    text: list[str] = []
    count, finish = 0, None
    sampling = SamplingSpec(max_tokens=max_tokens, temperature=0.0)
    async for delta in engine.generate(list(ids), sampling, f"parity-{uuid.uuid4().hex}", lora):
        text.append(delta.text)
        count, finish = delta.completion_tokens, delta.finish_reason
    return Generation("".join(text), count, finish)


async def check_serving_parity(
    engine: Engine,
    lora: LoraSpec,
    base_dir: Path,
    prompts: Sequence[Sequence[dict[str, str]]] = DEFAULT_PROMPTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> ServingParityReport:
    """Greedy outputs of ``engine`` with ``lora`` vs PEFT on each prompt; ParityError if any differ.

    ``lora.path`` must pass the registry contract against ``base_dir``, the folder the
    engine serves. Call from the engine's event loop.
    """
    if not prompts:
        raise MergeError("parity needs at least one prompt")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise MergeError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(base_dir))
    ids = [prompt_ids(tokenizer, messages) for messages in prompts]
    reference = await asyncio.to_thread(peft_greedy, lora.path, base_dir, ids, max_tokens)
    await engine.add_lora(lora)  # never hand the engine an adapter it has not accepted
    results = []
    for messages, one_prompt, peft in zip(prompts, ids, reference, strict=True):
        served = await served_greedy(engine, lora, one_prompt, max_tokens)
        results.append(PromptParity(tuple(dict(m) for m in messages), tuple(one_prompt), peft, served))
    report = ServingParityReport(str(lora.path), max_tokens, tuple(results))
    if not report.passed:
        lines = [f"  - {list(p.messages)!r}: PEFT {_show(p.peft)} vs engine {_show(p.served)}"
                 for p in results if not p.matches]
        raise ParityError(f"the engine's greedy output differs from PEFT's on {len(lines)} of "
                          f"{len(results)} prompt(s) for {lora.path}:\n" + "\n".join(lines), report)
    logger.info("serving parity: %d prompt(s) match for %s", len(results), lora.path)
    return report


def _show(g: Generation) -> str:
    return f"{g.text!r} ({g.completion_tokens} tokens, finish={g.finish_reason})"
