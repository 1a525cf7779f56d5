"""Train one LoRA adapter of a registered template on a chat dataset, then gate it.

A plain PyTorch loop (AdamW, warm-up then linear/cosine/constant decay, padded
batches): the HF Trainer's machinery costs more than the training itself for adapters
this small. Validation loss is measured every epoch (early stopping keeps the best
epoch's weights), then the golden and regression evals run and every gate is checked.

The adapter directory appears whole or not at all: it is built under a temporary name
beside ``out_dir``, checked with the registry's own compatibility check, and renamed at
the end. A run that misses a gate does not produce ``out_dir``: the adapter is kept for
inspection at ``<out_dir>.failed`` with an ``eval_report.json`` that the registry refuses
as an unexpected file, so it cannot be pushed by mistake, and GateFailedError is raised.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoTokenizer

from adapters_registry import (
    AdapterManifest,
    AdapterTemplate,
    BaseContract,
    derive_contract,
    sha256_bytes,
    stop_token_ids,
)
from trainer.config import RunConfig
from trainer.data import ChatDataset, prepare_data
from trainer.errors import GateFailedError, TrainError
from trainer.evals import (
    EvalSet,
    GoldenResult,
    PreferenceResult,
    RegressionResult,
    check_gates,
    eval_report,
    golden_eval,
    regression_eval,
)
from trainer.gate_result import GateResult
from trainer.hygiene import DataReport, Message
from trainer.loop import EarlyStopping, EpochStats, RunHooks, train_loop
from trainer.provenance import (
    TRAINING_CONFIG_FILE,
    adapter_manifest,
    require_compatible,
    require_template_base,
)
from trainer.qlora import load_base_for_training, require_quantization_support
from trainer.runtime import atomic_dir, threads_for, torch_threads
from trainer.sft import EncodedExample, encode_example, render_golden

logger = logging.getLogger(__name__)

GOLDEN_RENDER_FILE = "golden_render.txt"
EVAL_REPORT_FILE = "eval_report.json"  # only in a refused run's folder: the registry refuses it
FAILED_SUFFIX = ".failed"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class InitAdapter:
    """A registered adapter version a run continues (``--init-from``, a job's ``model``)."""

    path: Path  # a folder holding its verified files
    ref: str  # tenant/name@vN
    content_sha256: str


@dataclass(frozen=True)
class RunReport:
    """Everything the summary table and the manifest metrics say about one run."""

    data: DataReport
    truncated: int  # training examples cut by max_length
    skipped: int  # training examples with no assistant token left within max_length
    epochs: list[EpochStats]
    best_epoch: int  # the epoch whose weights were kept
    stopped_early: bool
    gates: list[GateResult]
    golden: GoldenResult | None
    regression: RegressionResult | None
    train_seconds: float
    eval_seconds: float
    method: str = "sft"  # or "dpo": its epoch losses are DPO losses, not token cross-entropy
    preference: PreferenceResult | None = None  # DPO: held-out preference accuracy and margin

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def truncation_rate(self) -> float:
        return self.truncated / max(self.data.train, 1)

    @property
    def kept(self) -> EpochStats:
        return self.epochs[self.best_epoch - 1]


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    final_loss: float  # mean token loss of the kept epoch
    seconds: float  # the training loop only
    manifest: AdapterManifest
    epoch_losses: tuple[float, ...] = ()
    report: RunReport | None = field(default=None, compare=False)


def train_adapter(
    base_dir: Path,
    base_model_id: str,
    template: AdapterTemplate,
    dataset: ChatDataset,
    config: RunConfig,
    out_dir: Path,
    *,
    golden: EvalSet | None = None,
    regression: EvalSet | None = None,
    progress: bool = False,
    validation: ChatDataset | None = None,
    init_from: InitAdapter | None = None,
    hooks: RunHooks | None = None,
) -> TrainResult:
    """Train an adapter of ``template`` on ``dataset``, evaluate it, and write it to out_dir.

    ``validation``: held-out examples (else ``validation_fraction`` of ``dataset``);
    ``init_from``: start from a registered version's LoRA weights; ``hooks``: see RunHooks.

    Raises GateFailedError (after keeping the adapter at ``<out_dir>.failed``) when an
    eval gate is missed; ``out_dir`` then does not exist.
    """
    require_quantization_support(config.quantization)  # before anything is loaded
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; adapter versions are never overwritten")
    contract = derive_contract(base_dir, base_model_id)
    require_template_base(contract, template)
    if init_from is not None:
        require_compatible(init_from.path, contract, template)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    check_chat_template(tokenizer, contract)
    data = prepare_data(dataset, config, golden.prompts() if golden else (), golden.path if golden else None,
                        held_out=validation)
    usable, truncated = _encode(tokenizer, data.train, config.max_length)
    held_out = [e for e in (encode_example(tokenizer, m, config.max_length) for m in data.validation)
                if e.trained_tokens > 0]
    if config.max_val_perplexity is not None and not held_out:
        raise TrainError(
            f"max_val_perplexity is set but no validation examples exist ({data.report.train} "
            f"examples, validation_fraction={config.validation_fraction}); raise validation_fraction "
            "or drop the gate"
        )

    torch.manual_seed(config.seed)  # LoRA A init and dropout draw from it
    base = load_base_for_training(base_dir, config.quantization)
    lora = LoraConfig(
        **template.peft_config_kwargs(),
        lora_dropout=config.lora_dropout,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    if init_from is not None:
        load_lora_weights(model, init_from.path)
    pad_id = _pad_id(tokenizer)
    with torch_threads(threads_for(model)):
        started = time.perf_counter()
        stopper = EarlyStopping(model, held_out, config, pad_id, hooks)
        train_loop(model, usable, config, pad_id, stopper, progress)
        stopper.restore_best()
        seconds = time.perf_counter() - started
        model.eval()
        started = time.perf_counter()
        golden_result, regression_result = run_evals(model, tokenizer, base_dir, config, golden, regression,
                                                     progress)
        eval_seconds = time.perf_counter() - started

    report = RunReport(
        data=data.report, truncated=truncated, skipped=len(data.train) - len(usable),
        epochs=stopper.history, best_epoch=stopper.best_epoch, stopped_early=stopper.stopped_early,
        gates=check_gates(config, stopper.kept_perplexity(), golden_result, regression_result),
        golden=golden_result, regression=regression_result,
        train_seconds=seconds, eval_seconds=eval_seconds,
    )
    stage = {} if init_from is None else {
        "init_from": {"ref": init_from.ref, "content_sha256": init_from.content_sha256}}
    manifest = adapter_manifest(
        contract, template, dataset_sha256=dataset.sha256, seed=config.seed,
        run_config=config.to_dict() | stage, metrics=_metrics(report, usable, golden, regression),
    )
    training_config = {
        "run_config": config.to_dict() | stage,
        "template": template.to_dict(),
        "dataset": {
            "path_name": dataset.path.name,
            "sha256": dataset.sha256,
            "examples": len(dataset.examples),
            "duplicates_removed": dataset.duplicates_removed,
        },
        **({} if validation is None else {"validation_dataset": {
            "path_name": validation.path.name, "sha256": validation.sha256,
            "examples": len(validation.examples)}}),
        "data": data.report.to_dict(),
        "eval_sets": {name: {"path_name": s.path.name, "sha256": s.sha256, "prompts": len(s.items)}
                      for name, s in (("golden", golden), ("regression", regression)) if s is not None},
    }
    write_adapter(model, out_dir, report, base_model_id=base_model_id, contract=contract, template=template,
                  manifest=manifest, training_config=training_config,
                  golden_render=render_golden(tokenizer, dataset.examples[0]))
    logger.info("adapter written to %s (loss %.4f, %.1fs)", out_dir, report.kept.train_loss, seconds)
    losses = tuple(e.train_loss for e in report.epochs)
    return TrainResult(out_dir, report.kept.train_loss, seconds, manifest, losses, report)


def run_evals(
    model: Any, tokenizer: Any, base_dir: Path, config: RunConfig, golden: EvalSet | None,
    regression: EvalSet | None, progress: bool = False,
) -> tuple[GoldenResult | None, RegressionResult | None]:
    """The golden and regression evals that are configured, with the stop ids the gateway uses."""
    stops = stop_token_ids(base_dir, tokenizer)
    golden_result = golden_eval(model, tokenizer, golden, config, stops, progress) if golden else None
    regression_result = (
        regression_eval(model, tokenizer, regression, config, stops, progress) if regression else None
    )
    return golden_result, regression_result


def write_adapter(
    model: Any,
    out_dir: Path,
    report: RunReport,
    *,
    base_model_id: str,
    contract: BaseContract,
    template: AdapterTemplate,
    manifest: AdapterManifest,
    training_config: dict[str, Any],
    golden_render: str,
) -> None:
    """Write the adapter whole to ``out_dir``, or, when a gate failed, to ``<out_dir>.failed``
    with ``eval_report.json`` and raise GateFailedError. Checked by the registry's contract."""
    # the artifact names the base by id, not by this machine's path to it
    model.peft_config["default"].base_model_name_or_path = base_model_id
    target = out_dir if report.passed else out_dir.with_name(out_dir.name + FAILED_SUFFIX)
    with atomic_dir(target, replace=not report.passed) as tmp:
        # Templates never target embeddings; saying so also stops PEFT from asking the
        # Hugging Face hub about base_model_name_or_path.
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card stub
        (tmp / TRAINING_CONFIG_FILE).write_text(
            json.dumps(training_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        (tmp / GOLDEN_RENDER_FILE).write_text(golden_render, encoding="utf-8")
        manifest.write(tmp)
        require_compatible(tmp, contract, template)
        if not report.passed:
            details = eval_report(report.gates, report.golden, report.regression, detailed=True,
                                  preference=report.preference)
            (tmp / EVAL_REPORT_FILE).write_text(json.dumps(details, indent=2) + "\n", encoding="utf-8")
    if not report.passed:
        raise GateFailedError(report.gates, target, report)


def load_lora_weights(model: Any, adapter_dir: Path) -> None:
    """Start from a registered adapter's LoRA weights (same template, so same tensors)."""
    state = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    result: Any = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise TrainError(f"{adapter_dir} does not fit the new adapter: unexpected "
                         f"{sorted(result.unexpected_keys)[:5]}, missing {missing[:5]}")



def _metrics(
    report: RunReport, usable: list[EncodedExample], golden: EvalSet | None, regression: EvalSet | None
) -> dict[str, Any]:
    kept = report.kept
    return {
        "final_train_loss": kept.train_loss,
        "val_loss": kept.val_loss,
        "val_perplexity": kept.val_perplexity,
        "train_seconds": round(report.train_seconds, 3),
        "eval_seconds": round(report.eval_seconds, 3),
        "examples": len(usable),
        "validation_examples": report.data.validation,
        "truncated": report.truncated,
        "truncation_rate": round(report.truncation_rate, 4),
        "trained_tokens": sum(e.trained_tokens for e in usable),
        "epochs": len(report.epochs),
        "best_epoch": report.best_epoch,
        "stopped_early": report.stopped_early,
        "epoch_metrics": [e.to_dict() for e in report.epochs],
        "data": report.data.to_dict(),
        "evals": eval_metrics(report, golden, regression),
    }


def eval_metrics(report: RunReport, golden: EvalSet | None, regression: EvalSet | None) -> dict[str, Any]:
    """The manifest's ``evals``: every gate, each eval's summary and the eval sets' sha256."""
    evals = eval_report(report.gates, report.golden, report.regression, detailed=False,
                        preference=report.preference)
    for name, eval_set in (("golden", golden), ("regression", regression)):
        if eval_set is not None:
            evals[name]["sha256"] = eval_set.sha256
    return evals


def _encode(
    tokenizer: Any, examples: Sequence[Sequence[Message]], max_length: int
) -> tuple[list[EncodedExample], int]:
    """The examples that still train something after truncation, and how many were cut."""
    encoded = [encode_example(tokenizer, m, max_length) for m in examples]
    usable = [e for e in encoded if e.trained_tokens > 0]
    if not usable:
        raise TrainError(f"no example has assistant tokens within max_length={max_length}")
    if len(usable) < len(encoded):
        logger.warning(
            "%d example(s) have no assistant tokens left within max_length=%d; skipped",
            len(encoded) - len(usable),
            max_length,
        )
    return usable, sum(e.truncated for e in encoded)


def check_chat_template(tokenizer: Any, contract: BaseContract) -> None:
    # Training must render with the very template the gateway will serve with.
    template = tokenizer.chat_template
    if not isinstance(template, str) or sha256_bytes(template.encode()) != (contract.chat_template_sha256):
        raise TrainError("the tokenizer's chat template differs from the one the base contract pins")


def _pad_id(tokenizer: Any) -> int:
    # Padded positions are masked and unlabelled, so any valid id will do.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
