"""Every token the engine produces for a request, counted as it comes: ``metered`` wraps the
engine's output stream for the OpenAI layer (``gateway.engine.openai``), filling the
request's ``Meter`` (prompt and completion tokens per engine request and choice, the first
token's time, the opening of the first choice's text) and calling its quota hooks."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from vllm.outputs import RequestOutput

from gateway.engine.base import HEAD_CHARS, Meter

__all__ = ["metered"]


async def metered(outputs: AsyncGenerator[RequestOutput, None], meter: Meter, cumulative: bool,
                   prompt_len: int | None, request_id: str,
                   final_only: bool = False) -> AsyncGenerator[RequestOutput, None]:
    """``outputs``, metered. ``final_only``: they are cumulative but the caller wants only the
    finished one, with every choice (each cumulative output carries the choice that moved)."""
    latest: dict[int, Any] = {}  # choice index -> its newest output
    head_of: str | None = None  # the engine request whose first choice opens meter.head
    try:
        if prompt_len is not None:
            if meter.on_prompt is not None:
                try:
                    await meter.on_prompt(prompt_len)  # before the engine sees it
                except Exception as exc:
                    meter.refusal = exc
                    raise
            # Counted before any output: a non-streamed request has none until it finishes,
            # and one aborted (its client left) has none at all.
            meter.prompt_tokens[request_id] = prompt_len
        async for out in outputs:
            meter.prompt_tokens[out.request_id] = len(out.prompt_token_ids or ())
            for seq in out.outputs:
                key = (out.request_id, seq.index)
                n = len(seq.token_ids)
                before = meter.completion_tokens.get(key, 0)
                meter.completion_tokens[key] = total = n if cumulative else before + n
                if total > before and meter.on_completion is not None:
                    meter.on_completion(total - before)
                if n and meter.first_token_at is None:
                    meter.first_token_at = time.perf_counter()
                if seq.index == 0 and len(meter.head) < HEAD_CHARS and seq.text:
                    if head_of is None:
                        head_of = out.request_id  # a batch's: its first prompt to answer
                    if out.request_id == head_of:
                        text = seq.text if cumulative else meter.head + seq.text
                        meter.head = text[:HEAD_CHARS]
            if final_only:
                latest.update((seq.index, seq) for seq in out.outputs)
                if not out.finished:
                    continue
                out.outputs = [latest[i] for i in sorted(latest)]
            yield out
    finally:
        await outputs.aclose()  # a cancelled request is aborted in the engine
