"""Run knobs for one training run: free to change between runs of the same template.

The adapter's *shape* (rank, alpha, target modules, base) is not here: it comes from
the registered AdapterTemplate, so every adapter of a base can be served side by side.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapters_registry.template import AdapterTemplate
from trainer.errors import ConfigError

_SHAPE_FIELDS = frozenset(f.name for f in dataclasses.fields(AdapterTemplate)) | {
    "template_id",
    # PEFT options that also change which tensors an adapter has
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
}


@dataclass(frozen=True)
class RunConfig:
    """How to train: optimiser, schedule, batching, regularisation, seed.

    The defaults suit small style datasets (tens of examples) on a ~100M-parameter
    base: 4 epochs of 32 examples teach SmolLM2-135M a clear style in ~30 s on 2 cores.
    """

    learning_rate: float = field(default=5e-3, metadata={"help": "Peak AdamW learning rate."})
    epochs: int = field(default=4, metadata={"help": "Passes over the data (if no max_steps)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Optimiser steps to run; overrides epochs when set."}
    )
    batch_size: int = field(default=4, metadata={"help": "Examples per forward pass."})
    grad_accumulation: int = field(default=1, metadata={"help": "Forward passes per optimiser step."})
    warmup_steps: int = field(
        default=5, metadata={"help": "Linear warm-up steps, then linear decay towards zero."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the gradient norm to this (0 disables)."}
    )
    max_length: int = field(default=512, metadata={"help": "Tokens kept per example (the start is kept)."})
    seed: int = field(default=0, metadata={"help": "Seeds LoRA init and data order."})

    def __post_init__(self) -> None:
        problems = _type_problems(self)
        if not problems:
            problems = _value_problems(self)
        if problems:
            raise ConfigError("invalid run config: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from a parsed file or CLI overrides; unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        shape = sorted(set(data) & _SHAPE_FIELDS)
        unknown = sorted(set(data) - known - _SHAPE_FIELDS)
        problems = []
        if shape:
            problems.append(
                f"{shape} are adapter template (shape) fields: they come from the base's "
                "registered template and cannot be set per run"
            )
        if unknown:
            problems.append(f"unknown key(s) {unknown}; known: {sorted(known)}")
        if problems:
            raise ConfigError("invalid run config: " + "; ".join(problems))
        return cls(**{k: _coerce(cls, k, v) for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(cls: type[RunConfig], key: str, value: Any) -> Any:
    # YAML 1.1 reads "1e-3" as a string; accept a numeric string for a float field only.
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    if kind == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # __post_init__ reports it
    return value


def _type_problems(config: RunConfig) -> list[str]:
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        # annotations are strings here (from __future__ import annotations)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if f.type == "float":
            ok, wanted = (is_int or isinstance(value, float)), "a finite number"
            ok = ok and math.isfinite(value)
        elif f.type == "int":
            ok, wanted = is_int, "an integer"
        else:  # "int | None"
            ok, wanted = (is_int or value is None), "an integer or null"
        if not ok:
            problems.append(f"{f.name} must be {wanted}, got {value!r}")
    return problems


def _value_problems(c: RunConfig) -> list[str]:
    checks = [
        (c.learning_rate > 0, f"learning_rate must be positive, got {c.learning_rate}"),
        (c.epochs >= 1, f"epochs must be at least 1, got {c.epochs}"),
        (c.max_steps is None or c.max_steps >= 1, f"max_steps must be >= 1, got {c.max_steps}"),
        (c.batch_size >= 1, f"batch_size must be at least 1, got {c.batch_size}"),
        (c.grad_accumulation >= 1, f"grad_accumulation must be >= 1, got {c.grad_accumulation}"),
        (c.warmup_steps >= 0, f"warmup_steps must be >= 0, got {c.warmup_steps}"),
        (0 <= c.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {c.lora_dropout}"),
        (c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}"),
        (c.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {c.max_grad_norm}"),
        (c.max_length >= 2, f"max_length must be at least 2, got {c.max_length}"),
        (c.seed >= 0, f"seed must be >= 0, got {c.seed}"),
    ]
    return [message for ok, message in checks if not ok]
