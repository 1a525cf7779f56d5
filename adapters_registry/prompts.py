"""Chat prompts as the base renders them: one home for the trainer and the gateway.

Training (assistant-only loss), eval gates, serving parity and the gateway all turn
messages into token ids here, with the base's own chat template, so a prompt the
trainer learned is byte for byte the prompt the gateway serves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adapters_registry.errors import ChatTemplateRenderError

__all__ = ["prompt_ids", "render_chat", "stop_token_ids"]

Messages = Sequence[Mapping[str, Any]]


def render_chat(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool = True) -> str:
    """The chat template's text for ``messages``; ChatTemplateRenderError if it refuses them."""
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises its own types, and templates raise on purpose
        raise ChatTemplateRenderError(f"the base model's chat template rejected the messages: {exc}") \
            from None
    if not isinstance(text, str):
        raise ChatTemplateRenderError(f"apply_chat_template returned {type(text).__name__}, not str")
    return text


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of a chat prompt ending in the assistant's turn (no special tokens added twice)."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON's "\ud800"): not text at all
        raise ChatTemplateRenderError(
            f"the messages are not valid Unicode text: {text[exc.start]!a} (a lone UTF-16 "
            "surrogate) cannot be encoded") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(base_dir: Path, tokenizer: Any) -> frozenset[int]:
    """The ids that end a generation: the tokenizer's EOS and generation_config's eos ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = Path(base_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
    return frozenset(ids)
