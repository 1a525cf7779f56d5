"""The adapter template: the frozen, hashed shape every adapter of one base shares.

Only shape-defining fields live here (rank, alpha, target modules, bias, DoRA and
rsLoRA flags, and the base they are for). Run knobs such as learning rate, epochs or
dropout belong to the trainer's run config and never change an adapter's shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from adapters_registry._safetensors_header import DTYPE_SIZES
from adapters_registry.contract import BaseContract
from adapters_registry.errors import TemplateError
from adapters_registry.hashing import sha256_json

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
_SUBMODULE = {m: "self_attn" for m in ATTENTION_MODULES} | {m: "mlp" for m in MLP_MODULES}
# PEFT's adapter_config.json stores the base path, the task and bookkeeping too;
# these are the keys that change what the adapter's tensors mean.
SHAPE_KEYS = ("r", "lora_alpha", "target_modules", "bias", "use_dora", "use_rslora")


@dataclass(frozen=True)
class AdapterTemplate:
    """Shape of every LoRA adapter for one base model revision."""

    base_model_id: str = field(metadata={"help": "Base the adapters are for."})
    base_revision: str = field(metadata={"help": "Content revision of that base."})
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    target_modules: frozenset[str] = field(
        default=frozenset(ATTENTION_MODULES), metadata={"help": "Projections that get LoRA."}
    )
    bias: str = field(default="none", metadata={"help": "Only 'none' is served."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA is not served."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling."})

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be an integer, got {value!r}"
            for name, value in (("r", self.r), ("lora_alpha", self.lora_alpha))
            if not isinstance(value, int) or isinstance(value, bool)
        ] + [
            f"{name} must be true or false, got {value!r}"
            for name, value in (("use_dora", self.use_dora), ("use_rslora", self.use_rslora))
            if not isinstance(value, bool)
        ] + [
            f"{name} must be a non-empty string"
            for name, value in (("base_model_id", self.base_model_id),
                                ("base_revision", self.base_revision), ("bias", self.bias))
            if not isinstance(value, str) or not value
        ]
        if problems:
            raise TemplateError("invalid adapter template: " + "; ".join(problems))
        if not 1 <= self.r <= 512:
            problems.append(f"r must be in 1..512, got {self.r}")
        if self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be positive, got {self.lora_alpha}")
        unknown = set(self.target_modules) - set(_SUBMODULE)
        if unknown or not self.target_modules:
            problems.append(
                f"target_modules must be a non-empty subset of {sorted(_SUBMODULE)}; "
                f"unknown: {sorted(unknown)}"
            )
        if self.bias != "none":
            problems.append(f"bias must be 'none' (vLLM serves no LoRA bias), got {self.bias!r}")
        if self.use_dora:
            problems.append("use_dora must be false: vLLM does not serve DoRA adapters")
        if problems:
            raise TemplateError("invalid adapter template: " + "; ".join(problems))
        object.__setattr__(self, "target_modules", frozenset(self.target_modules))

    def shape_fields(self) -> dict[str, Any]:
        return {
            "base_model_id": self.base_model_id,
            "base_revision": self.base_revision,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": sorted(self.target_modules),
            "bias": self.bias,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        }

    @property
    def template_id(self) -> str:
        """Stable id of the shape: equal fields give an equal id, anywhere."""
        return "tpl-" + sha256_json(self.shape_fields())[:16]

    def to_dict(self) -> dict[str, Any]:
        return self.shape_fields() | {"template_id": self.template_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterTemplate:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__) - {"template_id"})
        if unknown:
            raise TemplateError(f"unknown adapter template fields: {unknown}")
        fields = {k: v for k, v in data.items() if k != "template_id"}
        if "target_modules" in fields:
            fields["target_modules"] = frozenset(fields["target_modules"])
        template = cls(**fields)
        if "template_id" in data and data["template_id"] != template.template_id:
            raise TemplateError(
                f"template_id {data['template_id']!r} does not match its fields "
                f"({template.template_id!r})"
            )
        return template

    def peft_config_kwargs(self) -> dict[str, Any]:
        """The LoraConfig arguments that fix the shape (the trainer adds run knobs)."""
        base = ("base_model_id", "base_revision")
        return {k: v for k, v in self.shape_fields().items() if k not in base}


def module_dims(contract: BaseContract, module: str) -> tuple[int, int]:
    """(in_features, out_features) of one projection of a Llama-like base."""
    q_out = contract.num_attention_heads * contract.head_dim
    kv_out = contract.num_key_value_heads * contract.head_dim
    dims = {
        "q_proj": (contract.hidden_size, q_out),
        "k_proj": (contract.hidden_size, kv_out),
        "v_proj": (contract.hidden_size, kv_out),
        "o_proj": (q_out, contract.hidden_size),
        "gate_proj": (contract.hidden_size, contract.intermediate_size),
        "up_proj": (contract.hidden_size, contract.intermediate_size),
        "down_proj": (contract.intermediate_size, contract.hidden_size),
    }
    return dims[module]


def expected_tensors(contract: BaseContract, template: AdapterTemplate) -> dict[str, tuple[int, ...]]:
    """Every tensor name PEFT saves for this base and template, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(contract.num_hidden_layers):
        for module in sorted(template.target_modules):
            fan_in, fan_out = module_dims(contract, module)
            prefix = f"base_model.model.model.layers.{layer}.{_SUBMODULE[module]}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (template.r, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, template.r)
    return shapes


def max_weights_bytes(contract: BaseContract, template: AdapterTemplate, dtypes: Iterable[str]) -> int:
    """The largest adapter_model.safetensors this base and template allow: every tensor in
    the widest of ``dtypes``, and a header with room for its names, shapes and metadata."""
    shapes = expected_tensors(contract, template)
    itemsize = max(DTYPE_SIZES[d] for d in dtypes)
    return sum(math.prod(s) for s in shapes.values()) * itemsize + 1024 * len(shapes) + 1024**2
