"""The base's own tokenizer and chat template, for code that renders prompts itself.

Tenants' requests are rendered by vLLM's serving layer with the same template (the
tokenizer's, pinned by the base contract); serving parity renders with this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters_registry.errors import ChatTemplateRenderError
from adapters_registry.prompts import prompt_ids
from gateway.errors import InvalidRequestError


class PromptRenderer:
    """The base's own tokenizer and chat template, loaded once per process."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    @classmethod
    def load(cls, model_dir: Path) -> PromptRenderer:
        from transformers import AutoTokenizer  # heavy import, only where a tokenizer is needed

        return cls(AutoTokenizer.from_pretrained(str(model_dir)))

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return prompt_ids(self._tok, messages)
        except ChatTemplateRenderError as exc:
            raise InvalidRequestError(str(exc), param="messages") from None
