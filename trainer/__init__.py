"""trainer: turns a tenant's data into a LoRA adapter, always from the base's frozen template.

``train`` runs a whole job (``data`` and ``hygiene``: the dataset; ``sft`` and ``dpo``:
the methods, over ``loop``; ``evals``: the gates; ``provenance``: the manifest), ``merge``
and ``compose`` work on finished adapters, ``bases`` builds the local base models, and
``qlora`` the 4-bit path on a GPU. A new training method goes beside ``sft`` and ``dpo``,
named in ``config.RunConfig`` and dispatched in ``train``.

Other parts use only the names below. They load on first use, so importing ``trainer``
(for its command or its errors) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_PROMPTS": "trainer.merge",
    "MergeError": "trainer.errors",
    "ParityError": "trainer.errors",
    "RunConfig": "trainer.config",
    "greedy_ids": "trainer.merge",
    "load_chat_jsonl": "trainer.data",
    "load_checked_adapter": "trainer.merge",
    "load_peft": "trainer.merge",
    "prepare_base": "trainer.bases",
    "threads_for": "trainer.runtime",
    "torch_threads": "trainer.runtime",
    "train_adapter": "trainer.train",
    "Worker": "trainer.worker",
    "WorkerOptions": "trainer.worker",
}

if TYPE_CHECKING:
    from trainer.bases import prepare_base
    from trainer.config import RunConfig
    from trainer.data import load_chat_jsonl
    from trainer.errors import MergeError, ParityError
    from trainer.merge import DEFAULT_PROMPTS, greedy_ids, load_checked_adapter, load_peft
    from trainer.runtime import threads_for, torch_threads
    from trainer.train import train_adapter
    from trainer.worker import Worker, WorkerOptions


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_PROMPTS",
    "MergeError",
    "ParityError",
    "RunConfig",
    "Worker",
    "WorkerOptions",
    "greedy_ids",
    "load_chat_jsonl",
    "load_checked_adapter",
    "load_peft",
    "prepare_base",
    "threads_for",
    "torch_threads",
    "train_adapter",
]
