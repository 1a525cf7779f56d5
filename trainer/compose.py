"""Compose existing adapters of one template into a new adapter of the same template.

``compose_adapters`` wraps PEFT's ``add_weighted_adapter`` for the two methods that
keep the template's rank:

- ``linear``: A = Σ sign(wᵢ)·√|wᵢsᵢ|·Aᵢ and B = Σ √|wᵢsᵢ|·Bᵢ (sᵢ each source's
  scaling). Cheap, but B·A then holds cross terms Bᵢ·Aⱼ: it is the weighted sum of the
  sources' deltas only when one weight is non-zero. PEFT calls it "a very rough
  approximation".
- ``svd``: the exact weighted sum Σ wᵢ·ΔWᵢ per module, truncated to rank r by SVD.
  Exact when that sum has rank <= r, otherwise the best rank-r approximation.

PEFT gives the new adapter ``lora_alpha = r``; the result is rescaled to the
template's own alpha (and rsLoRA flag) so it passes the registry contract unchanged.
``cat`` (rank = sum of ranks) and the pruning methods are refused. The manifest
records every source's registry content hash, dataset hash and weight, and how far
the result is from the exact weighted sum of deltas (``metrics.relative_error``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from adapters_registry import (
    WEIGHTS_FILE,
    AdapterManifest,
    AdapterTemplate,
    BaseContract,
    check_adapter,
    derive_contract,
    sha256_json,
)
from trainer.errors import CompositionError
from trainer.provenance import (
    TRAINING_CONFIG_FILE,
    adapter_manifest,
    content_sha256,
    require_compatible,
    require_template_base,
)
from trainer.runtime import atomic_dir, threads_for, torch_threads

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "ComposeResult",
    "Method",
    "Source",
    "compose_adapters",
    "composed_dataset_sha256",
    "parse_source",
]

Method = Literal["linear", "svd"]
METHODS: tuple[str, ...] = get_args(Method)
_RANK_CHANGING = {
    "cat": "concatenates the sources, so its rank is the sum of their ranks",
}
_NEW = "composed"


@dataclass(frozen=True)
class Source:
    """One adapter folder and its weight in the composition."""

    path: Path
    weight: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True)
class ComposeResult:
    out_dir: Path
    manifest: AdapterManifest
    # ||composed - Σ wᵢ·ΔWᵢ||_F / ||Σ wᵢ·ΔWᵢ||_F over every LoRA module
    relative_error: float


def parse_source(spec: str) -> Source:
    """``DIR:WEIGHT`` (split at the last colon, so DIR may contain colons)."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        raise CompositionError(f"a source is DIR:WEIGHT, got {spec!r}")
    try:
        value = float(weight)
    except ValueError:
        raise CompositionError(f"source {spec!r}: weight {weight!r} is not a number") from None
    return Source(Path(path), value)


def compose_adapters(
    base_dir: Path,
    template: AdapterTemplate,
    sources: Sequence[Source],
    method: str,
    out_dir: Path,
) -> ComposeResult:
    """Write the weighted composition of ``sources`` (adapters of ``template``) to ``out_dir``."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _validate_request(sources, method)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; adapter versions are never overwritten")
    contract = derive_contract(base_dir, template.base_model_id)
    require_template_base(contract, template)
    manifests = _check_sources(sources, contract, template)

    names = [f"source{i}" for i in range(len(sources))]
    weights = [float(s.weight) for s in sources]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(sources[0].path), adapter_name=names[0])
    for name, source in zip(names[1:], sources[1:], strict=True):
        model.load_adapter(str(source.path), adapter_name=name)
    with torch_threads(threads_for(model)), torch.no_grad():
        model.add_weighted_adapter(names, weights, _NEW, combination_type=method,
                                   svd_rank=template.r if method == "svd" else None)
        tensors = _rescaled_tensors(model, template)
        error = _relative_error(model, names, weights, tensors, template)

    provenance = {
        "method": method,
        "svd_rank": template.r if method == "svd" else None,
        "sources": [
            {"content_sha256": content_sha256(s.path), "dataset_sha256": m.dataset_sha256,
             "weight": s.weight, "name": s.path.name}
            for s, m in zip(sources, manifests, strict=True)
        ],
    }  # fmt: skip
    manifest = adapter_manifest(
        contract, template,
        dataset_sha256=composed_dataset_sha256([m.dataset_sha256 for m in manifests], weights),
        seed=0,  # composition draws no random numbers
        run_config={"composition": provenance},
        metrics={"relative_error": error, "sources": len(sources)},
    )
    config = LoraConfig(**template.peft_config_kwargs(), task_type="CAUSAL_LM",
                        base_model_name_or_path=template.base_model_id, inference_mode=True)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        (tmp / TRAINING_CONFIG_FILE).write_text(
            json.dumps({"composition": provenance, "template": template.to_dict()}, indent=2, sort_keys=True)
            + "\n", encoding="utf-8")
        manifest.write(tmp)
        require_compatible(tmp, contract, template)  # a bug here, never the caller's
    logger.info("composed %d adapter(s) with %s into %s (relative error %.3g)",
                len(sources), method, out_dir, error)
    return ComposeResult(out_dir, manifest, error)


def composed_dataset_sha256(dataset_hashes: Sequence[str], weights: Sequence[float]) -> str:
    """The composition's data identity: the sources' dataset hashes with their weights.

    Order-free (the same mixture listed differently hashes the same); the method and
    rank are run knobs, recorded in ``run_config``, not part of the data.
    """
    pairs = sorted([h, float(w)] for h, w in zip(dataset_hashes, weights, strict=True))
    return sha256_json({"composition_of": pairs})


def _validate_request(sources: Sequence[Source], method: str) -> None:
    if method in _RANK_CHANGING:
        raise CompositionError(
            f"method {method!r} {_RANK_CHANGING[method]}; the template fixes the rank, so use "
            f"one of {list(METHODS)}")
    if method not in METHODS:
        raise CompositionError(f"unknown composition method {method!r}; use one of {list(METHODS)}")
    if not sources:
        raise CompositionError("composition needs at least one source adapter")
    problems = [
        f"source {i + 1} ({s.path}): weight {s.weight!r} is not a finite number"
        for i, s in enumerate(sources)
        if isinstance(s.weight, bool) or not isinstance(s.weight, (int, float)) or not math.isfinite(s.weight)
    ]
    if problems:
        raise CompositionError("; ".join(problems))
    if all(s.weight == 0 for s in sources):
        raise CompositionError("every weight is 0: the result would be the base model alone")
    if method == "svd" and len(sources) < 2:
        # PEFT silently switches a single source to linear; say so instead.
        raise CompositionError("svd needs at least two sources; to rescale one adapter use linear")


def _check_sources(
    sources: Sequence[Source], contract: BaseContract, template: AdapterTemplate
) -> list[AdapterManifest]:
    """Every source must pass the registry contract for this very template and base."""
    problems: list[str] = []
    for i, source in enumerate(sources):
        violations = check_adapter(source.path, contract, template)
        problems += [f"source {i + 1} ({source.path}): [{v.code}] {v.message}" for v in violations]
    if problems:
        raise CompositionError(
            f"sources must be adapters of template {template.template_id} for base "
            f"{contract.model_id}; {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return [AdapterManifest.read(s.path) for s in sources]


def _template_scaling(template: AdapterTemplate) -> float:
    # PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA.
    return template.lora_alpha / (math.sqrt(template.r) if template.use_rslora else template.r)


def _rescaled_tensors(model: Any, template: AdapterTemplate) -> dict[str, torch.Tensor]:
    """The new adapter's A and B, such that template scaling × B·A equals PEFT's B·A.

    PEFT builds the composed A and B for a scaling of 1 (lora_alpha = r); splitting the
    template's scaling evenly over A and B keeps both factors of similar magnitude.
    """
    state = get_peft_model_state_dict(model, adapter_name=_NEW, save_embedding_layers=False)
    factor = 1.0 / math.sqrt(_template_scaling(template))
    return {k: (v.float() * factor).contiguous() for k, v in state.items()}


def _relative_error(model: Any, names: Sequence[str], weights: Sequence[float],
                    tensors: dict[str, torch.Tensor], template: AdapterTemplate) -> float:
    """How far the written adapter's deltas are from Σ wᵢ·ΔWᵢ, over all modules (Frobenius)."""
    scaling = _template_scaling(template)
    err = ref = 0.0
    for path, module in model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or _NEW not in module.lora_A:
            continue
        deltas = [w * module.get_delta_weight(n) for n, w in zip(names, weights, strict=True)]  # type: ignore[attr-defined]  # a PEFT LoRA layer, typed as nn.Module
        exact = torch.stack(deltas).sum(dim=0)
        prefix = f"base_model.model.{path}"
        got = scaling * tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
        err += float(((got - exact) ** 2).sum())
        ref += float((exact**2).sum())
    return math.sqrt(err / ref) if ref > 0 else 0.0
