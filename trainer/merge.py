"""Export an adapter merged into its base as a standalone Hugging Face checkpoint.

``merge_adapter`` folds the LoRA deltas into the base weights with PEFT's
``merge_and_unload`` and writes a plain model folder (safetensors weights, config,
the base's own tokenizer and chat template files, and a ``merge.json`` provenance
record). The folder appears whole or not at all, and never replaces an existing one.

``check_merge_parity`` proves an export computes what the adapter computes: the
logits of the merged checkpoint and of base + adapter (unmerged, through PEFT) must
agree within a stated tolerance on the same token ids. Everything runs in float32.

The helpers that load an adapter checked against its base and decode greedily are
shared with serving parity (``lora_gateway.parity``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_registry import (
    CONFIG_FILE,
    AdapterManifest,
    AdapterTemplate,
    BaseContract,
    ContractError,
    ManifestError,
    TemplateError,
    check_adapter,
    derive_contract,
    prompt_ids,
    stop_token_ids,
    template_from_adapter_config,
)
from trainer.errors import MergeError, ParityError
from trainer.provenance import content_sha256
from trainer.runtime import atomic_dir, library_versions, threads_for, torch_threads

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_TOLERANCE",
    "MERGE_RECORD_FILE",
    "CheckedAdapter",
    "LogitParityReport",
    "MergeResult",
    "check_merge_parity",
    "greedy_ids",
    "load_checked_adapter",
    "load_peft",
    "merge_adapter",
]

# Max |merged - unmerged| over every logit compared, in float32. Merging reorders the
# arithmetic (x·(W + sBA) instead of x·W + s·(x·A)·B), so the two differ by rounding
# only: on tiny-llama (logits up to ~20) we measure 5e-6 to 1e-5, i.e. fp32 rounding
# (~1e-6 relative). 1e-4 leaves ~10x headroom, while a wrongly scaled or missing delta
# moves logits by whole units (the adapter's own effect is ~20 there).
DEFAULT_TOLERANCE = 1e-4
# Greedy tokens appended to each prompt before comparing logits: the positions where
# the adapter's own answer is produced are the ones a bad merge would change most.
DEFAULT_CONTINUATION = 24
DEFAULT_PROMPTS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Who are you?"},),
    ({"role": "user", "content": "Hello"},),
    ({"role": "user", "content": "Summarise your purpose in one sentence."},),
)
MERGE_RECORD_FILE = "merge.json"
MERGE_RECORD_FORMAT = "lora-gateway/merged-model@1"
# What a served base needs besides weights and config: tokenizer, chat template, licence.
_TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
})  # fmt: skip
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "NOTICE")
# Contract fields a merged export legitimately changes (new weights, saved in fp32).
_CHANGED_BY_MERGE = frozenset({"model_id", "revision", "dtype", "license"})


@dataclass(frozen=True)
class CheckedAdapter:
    """An adapter folder that passed the registry's contract check against a base."""

    path: Path
    contract: BaseContract
    template: AdapterTemplate
    manifest: AdapterManifest


@dataclass(frozen=True)
class LogitParityReport:
    """Merged vs unmerged logits on the same token ids."""

    tolerance: float
    max_abs_diff: float  # the number held against the tolerance
    sequences: int
    positions: int  # token positions compared (each a full vocabulary row)
    argmax_agreement: float  # fraction of positions whose top token is the same
    logit_scale: float  # max |logit| of the unmerged model, to read the diff against
    adapter_effect: float  # max |unmerged - base alone|: a check that could fail

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    parity: LogitParityReport | None


def load_checked_adapter(adapter_dir: Path, base_dir: Path) -> CheckedAdapter:
    """The adapter's manifest, base contract and template, after the registry's full check.

    The template is rebuilt from the adapter's own shape fields and must hash to the
    manifest's ``template_id``; then ``check_adapter`` must find no violation.
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if not adapter_dir.is_dir():
        raise MergeError(f"adapter directory {adapter_dir} does not exist")
    try:
        manifest = AdapterManifest.read(adapter_dir)
        template = template_from_adapter_config(adapter_dir, manifest.base_model_id,
                                                manifest.base_revision)
    except (ManifestError, TemplateError) as exc:
        raise MergeError(f"{adapter_dir}: {exc}") from None
    try:
        contract = derive_contract(base_dir, manifest.base_model_id)
    except ContractError as exc:
        raise MergeError(f"base directory: {exc}") from None
    if template.template_id != manifest.template_id:
        raise MergeError(
            f"{adapter_dir}: {CONFIG_FILE} describes template {template.template_id}, but "
            f"manifest.json says {manifest.template_id}; the files do not belong together"
        )
    violations = check_adapter(adapter_dir, contract, template)
    if violations:
        listed = "\n".join(f"  - [{v.code}] {v.message}" for v in violations)
        raise MergeError(
            f"{adapter_dir} does not fit base {contract.model_id} in {base_dir} "
            f"({len(violations)} violation(s)):\n{listed}"
        )
    return CheckedAdapter(adapter_dir, contract, template, manifest)


@torch.no_grad()
def greedy_ids(model: Any, prompt_ids: Sequence[int], max_new_tokens: int,
               stop_ids: frozenset[int]) -> tuple[list[int], str]:
    """Greedy decoding by full forward passes: (new token ids incl. a stop id, finish reason)."""
    ids = list(prompt_ids)
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(torch.argmax(logits))
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            return out, "stop"
    return out, "length"


def load_peft(checked: CheckedAdapter, base_dir: Path) -> Any:
    """Base + adapter in float32, unmerged, in eval mode."""
    base = AutoModelForCausalLM.from_pretrained(Path(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(checked.path)).eval()


def merge_adapter(
    adapter_dir: Path,
    base_dir: Path,
    out_dir: Path,
    *,
    check_parity: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    prompts: Sequence[Sequence[dict[str, str]]] = DEFAULT_PROMPTS,
) -> MergeResult:
    """Write base + adapter merged as a standalone float32 checkpoint to ``out_dir``.

    With ``check_parity`` the export is reloaded from disk and compared with the
    unmerged adapter before it is put in place; a failure raises ParityError and
    leaves nothing behind.
    """
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; a merged export is never overwritten")
    _check_tolerance(tolerance)
    checked = load_checked_adapter(adapter_dir, base_dir)
    model = load_peft(checked, base_dir)
    with torch_threads(threads_for(model)), atomic_dir(out_dir) as tmp:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(tmp), safe_serialization=True)
        _copy_tokenizer_files(base_dir, tmp)
        _check_export_contract(checked.contract, tmp)
        del model, merged
        report = None
        if check_parity:
            report = check_merge_parity(adapter_dir, base_dir, tmp, tolerance=tolerance, prompts=prompts)
        record = {
            "format": MERGE_RECORD_FORMAT,
            "base_model_id": checked.contract.model_id,
            "base_revision": checked.contract.revision,
            "template_id": checked.template.template_id,
            "adapter_content_sha256": content_sha256(checked.path),
            "adapter_dataset_sha256": checked.manifest.dataset_sha256,
            "dtype": "float32",
            "parity": report.to_dict() if report else None,
            "versions": library_versions(),
        }
        (tmp / MERGE_RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    logger.info("merged %s into %s", adapter_dir, out_dir)
    return MergeResult(out_dir, report)


def check_merge_parity(
    adapter_dir: Path,
    base_dir: Path,
    merged_dir: Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    prompts: Sequence[Sequence[dict[str, str]]] = DEFAULT_PROMPTS,
    continuation: int = DEFAULT_CONTINUATION,
) -> LogitParityReport:
    """Compare the merged checkpoint in ``merged_dir`` with base + adapter, unmerged.

    Each prompt is rendered with the base's chat template, extended by the unmerged
    model's greedy answer, and both models' logits are compared at every position.
    Raises ParityError (carrying the report) when max |diff| exceeds ``tolerance``.
    """
    _check_tolerance(tolerance)
    if not prompts:
        raise MergeError("parity needs at least one prompt")
    base_dir = Path(base_dir)
    checked = load_checked_adapter(adapter_dir, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    stops = stop_token_ids(base_dir, tokenizer)
    unmerged = load_peft(checked, base_dir)
    merged = AutoModelForCausalLM.from_pretrained(Path(merged_dir), dtype=torch.float32).eval()
    worst = scale = effect = 0.0
    agree = positions = 0
    with torch_threads(threads_for(merged)), torch.no_grad():
        for messages in prompts:
            ids = prompt_ids(tokenizer, messages)
            ids += greedy_ids(unmerged, ids, continuation, stops)[0]
            batch = torch.tensor([ids])
            a = unmerged(input_ids=batch).logits[0]
            with unmerged.disable_adapter():
                alone = unmerged(input_ids=batch).logits[0]
            b = merged(input_ids=batch).logits[0]
            worst = max(worst, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
            effect = max(effect, float((a - alone).abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            positions += len(ids)
    report = LogitParityReport(tolerance, worst, len(prompts), positions, agree / positions, scale, effect)
    logger.info("merge parity: max|diff| %.3g (tolerance %.3g) over %d positions",
                worst, tolerance, positions)
    if not report.passed:
        raise ParityError(
            f"merged and unmerged logits differ by up to {worst:.3g} (tolerance {tolerance:g}, "
            f"logits up to {scale:.3g}); the export does not compute what the adapter computes",
            report,
        )
    return report


def _check_tolerance(tolerance: float) -> None:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
        math.isfinite(tolerance) and tolerance > 0
    ):
        raise MergeError(f"tolerance must be a positive finite number, got {tolerance!r}")


def _copy_tokenizer_files(base_dir: Path, dest: Path) -> None:
    for path in sorted(base_dir.iterdir()):
        wanted = path.name in _TOKENIZER_FILES or path.name.upper().startswith(_LICENSE_PREFIXES)
        if wanted and path.is_file():
            shutil.copyfile(path, dest / path.name)


def _check_export_contract(base: BaseContract, export_dir: Path) -> None:
    """The export must describe the same model as the base except for its weights."""
    try:
        exported = derive_contract(export_dir, base.model_id)
    except ContractError as exc:
        raise MergeError(f"the merged export is not a complete model folder: {exc}") from None
    problems = [p for p in base.mismatches(exported) if p.split(":", 1)[0] not in _CHANGED_BY_MERGE]
    if problems:
        raise MergeError("the merged export differs from its base beyond the weights: " + "; ".join(problems))
