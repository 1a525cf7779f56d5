"""Turn a conversation into training tokens with the base's own chat template.

Only assistant turns are trained. Which characters belong to an assistant turn is
found without knowing the template: for assistant message ``i``, the render of
``messages[:i]`` with the generation prompt ends where the turn starts, and the
render of ``messages[:i + 1]`` ends where it stops (the end-of-turn token included).
That needs a *prefix-stable* template (rendering more messages only appends text);
templates that rewrite earlier turns are refused rather than mis-masked. A token that
also holds prompt text is not trained: that happens only when a generation prompt ends
in text BPE merges with the answer (a trailing space), never with ChatML-like templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters_registry import ChatTemplateRenderError, render_chat
from trainer.errors import ChatTemplateError

IGNORE_INDEX = -100  # label value PyTorch's cross-entropy skips
SPAN_OPEN, SPAN_CLOSE = "⟦", "⟧"

Message = dict[str, str]


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on assistant tokens
    truncated: bool

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_example(tokenizer: Any, messages: Sequence[Message], max_length: int) -> EncodedExample:
    """Token ids and labels for one conversation, keeping its first ``max_length`` tokens."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    _, ids, _, trained = _tokenize_with_spans(tokenizer, messages)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, trained, strict=True)]
    return EncodedExample(
        input_ids=ids[:max_length], labels=labels[:max_length], truncated=len(ids) > max_length
    )


def split_completion(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a conversation ending on an assistant turn, for DPO.

    The same render and the same trained tokens as :func:`encode_example`: the
    completion is the final assistant turn's tokens (its end-of-turn token included),
    the prompt everything before them.
    """
    text, spans = assistant_spans(tokenizer, messages)
    if messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end on an assistant turn")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    last = [_inside(int(start), int(end), spans[-1:]) for start, end in enc["offset_mapping"]]
    if not any(last):
        raise ChatTemplateError("the final assistant turn renders to no whole token")
    first = last.index(True)
    stop = first + sum(last)
    if not all(last[first:stop]):
        raise ChatTemplateError("the final assistant turn's tokens are not contiguous")
    return ids[:first], ids[first:stop]


def render_golden(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The rendered conversation with every trained token run wrapped in ⟦…⟧, for review."""
    text, _, offsets, trained = _tokenize_with_spans(tokenizer, messages)
    marks: list[tuple[int, str]] = []
    inside, run_end = False, 0
    for (start, end), keep in zip(offsets, trained, strict=True):
        if keep and not inside:
            marks.append((start, SPAN_OPEN))
        elif inside and not keep:
            marks.append((run_end, SPAN_CLOSE))
        if keep:
            run_end = end
        inside = keep
    if inside:
        marks.append((run_end, SPAN_CLOSE))
    out, cursor = [], 0
    for position, mark in marks:
        out += [text[cursor:position], mark]
        cursor = position
    out.append(text[cursor:])
    return "".join(out)


def assistant_spans(tokenizer: Any, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The full render and the character range of every assistant turn in it."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"the chat template is not prefix-stable at assistant message {i}: rendering "
                "more messages changes the text of earlier ones, so the assistant turn cannot "
                f"be located for loss masking.\n  prompt render: {before!r}\n"
                f"  render through the turn: {through!r}"
            )
        # whitespace after the end-of-turn marker is template layout the model never emits
        # (generation stops at the marker), so it is not trained
        end = len(through.rstrip())
        if end <= len(before):
            raise ChatTemplateError(f"assistant message {i} renders to no text")
        spans.append((len(before), end))
    return full, spans


def _tokenize_with_spans(
    tokenizer: Any, messages: Sequence[Message]
) -> tuple[str, list[int], list[tuple[int, int]], list[bool]]:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    trained = [_inside(start, end, spans) for start, end in offsets]
    return text, ids, offsets, trained


def _inside(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    # A token that straddles a span start also holds prompt text: training it would teach
    # the model to repeat the prompt's last characters, so only tokens wholly inside count.
    return any(lo <= start and end <= hi and start < hi for lo, hi in spans)


def _render(tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except ChatTemplateRenderError as exc:  # the trainer CLI reports its own error type
        raise ChatTemplateError(str(exc)) from exc
