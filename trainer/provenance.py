"""What an adapter folder written by the trainer records about where it came from.

Training and composition both write a ``manifest.json`` built from the base contract
and the template, and a ``training_config.json``; merge and composition name their
sources by the registry's content hash.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapters_registry import (
    AdapterManifest,
    AdapterTemplate,
    BaseContract,
    check_adapter,
    sha256_file,
    sha256_tree,
)
from trainer.errors import TrainError
from trainer.runtime import library_versions

__all__ = [
    "TRAINING_CONFIG_FILE",
    "adapter_manifest",
    "content_sha256",
    "require_compatible",
    "require_template_base",
]

TRAINING_CONFIG_FILE = "training_config.json"


def require_template_base(contract: BaseContract, template: AdapterTemplate) -> None:
    """TrainError unless ``template`` is registered for exactly this base and revision."""
    if (contract.model_id, contract.revision) != (template.base_model_id, template.base_revision):
        raise TrainError(
            f"template {template.template_id} is for base {template.base_model_id!r} revision "
            f"{template.base_revision[:12]}, but the base directory is {contract.model_id!r} "
            f"revision {contract.revision[:12]}; train with the template registered for this base"
        )


def require_compatible(adapter_dir: Path, contract: BaseContract, template: AdapterTemplate) -> None:
    """TrainError listing every violation when a folder the trainer wrote fails the contract."""
    # The registry would refuse it anyway; failing here names the trainer as the culprit.
    violations = check_adapter(adapter_dir, contract, template)
    if violations:
        listed = "\n".join(f"  {v.code}: {v.message}" for v in violations)
        raise TrainError(f"the written adapter does not match template {template.template_id}:\n{listed}")


def adapter_manifest(
    contract: BaseContract,
    template: AdapterTemplate,
    *,
    dataset_sha256: str,
    seed: int,
    run_config: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> AdapterManifest:
    """The manifest of a new adapter of ``template`` on the base ``contract`` describes."""
    return AdapterManifest(
        base_model_id=contract.model_id,
        base_revision=contract.revision,
        template_id=template.template_id,
        tokenizer_sha256=contract.tokenizer_sha256,
        chat_template_sha256=contract.chat_template_sha256,
        rope=contract.rope,
        dataset_sha256=dataset_sha256,
        seed=seed,
        versions=library_versions(),
        run_config=dict(run_config),
        metrics=dict(metrics),
    )


def content_sha256(adapter_dir: Path) -> str:
    """The adapter's content hash as the registry computes it when the folder is pushed."""
    files = {p.name: sha256_file(p) for p in sorted(Path(adapter_dir).iterdir()) if p.is_file()}
    return sha256_tree(files)
