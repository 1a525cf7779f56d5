"""Preference tuning (DPO) of one LoRA adapter of a registered template, by TRL's DPOTrainer.

The run is an SFT run with another objective: the same template (shapes), the same
chat template and rendering (``trainer.sft``, so the tokens a pair trains on are the
tokens the gateway serves), the same data hygiene, evals, gates, manifest and atomic
write (``trainer.train``). What differs:

- the loss is TRL's (``loss_type="sigmoid"``, the DPO paper's), with PEFT: the reference
  policy is the base itself, the adapter disabled, so no second model is loaded;
- a stage can start from a registered adapter version (``init_from``): its LoRA weights
  are loaded into the new adapter and trained on, the base staying the reference;
- early stopping watches the held-out DPO loss, and two more gates read the held-out
  pairs: preference accuracy and mean reward margin (``trainer.evals.preference_eval``).

TRL is imported here only, lazily: the gateway never needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from transformers import AutoTokenizer, TrainerCallback

from adapters_registry import AdapterTemplate, derive_contract
from trainer.config import RunConfig
from trainer.errors import TrainError
from trainer.evals import EncodedPair, EvalSet, check_gates, preference_eval
from trainer.loop import EarlyStopping, RunHooks
from trainer.preference import PreferenceDataset, PreferencePair, prepare_preferences
from trainer.provenance import adapter_manifest, require_compatible, require_template_base
from trainer.qlora import load_base_for_training, require_quantization_support
from trainer.runtime import threads_for, torch_threads
from trainer.sft import render_golden, split_completion
from trainer.train import (
    InitAdapter,
    RunReport,
    TrainResult,
    check_chat_template,
    eval_metrics,
    load_lora_weights,
    run_evals,
    write_adapter,
)

logger = logging.getLogger(__name__)

LOSS_TYPE = "sigmoid"  # the DPO paper's loss, TRL's default
REFERENCE_POLICY = "base"  # the adapter disabled: the usual reference for a LoRA policy
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def train_dpo_adapter(
    base_dir: Path,
    base_model_id: str,
    template: AdapterTemplate,
    dataset: PreferenceDataset,
    config: RunConfig,
    out_dir: Path,
    *,
    init_from: InitAdapter | None = None,
    golden: EvalSet | None = None,
    regression: EvalSet | None = None,
    progress: bool = False,
    validation: PreferenceDataset | None = None,
    hooks: RunHooks | None = None,
) -> TrainResult:
    """DPO-train an adapter of ``template`` on ``dataset``, evaluate, gate and write it.

    Raises GateFailedError (after keeping the adapter at ``<out_dir>.failed``) when a gate
    is missed; ``out_dir`` then does not exist.
    """
    require_quantization_support(config.quantization)
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; adapter versions are never overwritten")
    contract = derive_contract(base_dir, base_model_id)
    require_template_base(contract, template)
    if init_from is not None:
        require_compatible(init_from.path, contract, template)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    check_chat_template(tokenizer, contract)
    data = prepare_preferences(dataset, config, golden.prompts() if golden else (),
                               golden.path if golden else None, held_out=validation)
    train_rows, truncated = encode_pairs(tokenizer, data.train, config.max_length)
    if not train_rows:
        raise TrainError(f"no pair has answer tokens within max_length={config.max_length}")
    val_rows, _ = encode_pairs(tokenizer, data.validation, config.max_length)
    if (config.preference_min_accuracy is not None or config.preference_min_margin is not None) \
            and not val_rows:
        raise TrainError(
            f"the preference gates need held-out pairs, but none exist ({data.report.train} pairs, "
            f"validation_fraction={config.validation_fraction}); raise validation_fraction, add pairs, "
            "or set preference_min_accuracy and preference_min_margin to null"
        )

    torch.manual_seed(config.seed)
    base = load_base_for_training(base_dir, config.quantization)
    with tempfile.TemporaryDirectory(prefix="lgw-dpo-") as scratch:
        trainer = _dpo_trainer(base, tokenizer, template, config, train_rows, val_rows, Path(scratch),
                               progress)
        model = trainer.model
        if init_from is not None:
            load_lora_weights(model, init_from.path)
        stopper = EarlyStopping(model, val_rows, config, pad_id=0, hooks=hooks)
        trainer.add_callback(_EpochEnd(stopper, has_validation=bool(val_rows)))
        with torch_threads(threads_for(model)):
            started = time.perf_counter()
            trainer.train()
            stopper.restore_best()
            seconds = time.perf_counter() - started
            model.eval()
            started = time.perf_counter()
            labels = [pair.prompt[-1]["content"] for pair in data.validation]
            preference = preference_eval(model, [_pair(r) for r in val_rows], config.beta, labels) \
                if val_rows else None
            golden_result, regression_result = run_evals(model, tokenizer, base_dir, config, golden,
                                                         regression, progress)
            eval_seconds = time.perf_counter() - started

    report = RunReport(
        data=data.report, truncated=truncated, skipped=len(data.train) - len(train_rows),
        epochs=stopper.history, best_epoch=stopper.best_epoch, stopped_early=stopper.stopped_early,
        gates=check_gates(config, None, golden_result, regression_result, preference),
        golden=golden_result, regression=regression_result,
        train_seconds=seconds, eval_seconds=eval_seconds, method="dpo", preference=preference,
    )
    stage = {
        "method": "dpo",
        "loss_type": LOSS_TYPE,
        "beta": config.beta,
        "reference_policy": REFERENCE_POLICY,
        "init_from": None if init_from is None else {"ref": init_from.ref,
                                                     "content_sha256": init_from.content_sha256},
    }
    manifest = adapter_manifest(
        contract, template, dataset_sha256=dataset.sha256, seed=config.seed,
        run_config=config.to_dict() | stage, metrics=_metrics(report, train_rows, golden, regression),
    )
    manifest = dataclasses.replace(manifest, versions=manifest.versions | {"trl": _trl_version()})
    training_config = {
        "run_config": config.to_dict(),
        "stage": stage,
        "template": template.to_dict(),
        "dataset": {"path_name": dataset.path.name, "sha256": dataset.sha256, "pairs": len(dataset.pairs),
                    "duplicates_removed": dataset.duplicates_removed},
        "data": data.report.to_dict(),
        "eval_sets": {name: {"path_name": s.path.name, "sha256": s.sha256, "prompts": len(s.items)}
                      for name, s in (("golden", golden), ("regression", regression)) if s is not None},
    }
    first = dataset.pairs[0]
    render = "\n".join([
        "chosen:", render_golden(tokenizer, first.conversation(first.chosen)),
        "rejected:", render_golden(tokenizer, first.conversation(first.rejected)),
    ])
    write_adapter(model, out_dir, report, base_model_id=base_model_id, contract=contract, template=template,
                  manifest=manifest, training_config=training_config, golden_render=render)
    logger.info("DPO adapter written to %s (loss %.4f, %.1fs)", out_dir, report.kept.train_loss, seconds)
    losses = tuple(e.train_loss for e in report.epochs)
    return TrainResult(out_dir, report.kept.train_loss, seconds, manifest, losses, report)


def encode_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """TRL's pre-tokenized rows (prompt_ids, chosen_ids, rejected_ids), rendered as for SFT,
    and how many pairs ``max_length`` cuts. Pairs whose prompt fills max_length are left out."""
    rows, truncated = [], 0
    for pair in pairs:
        prompt, chosen = split_completion(tokenizer, pair.conversation(pair.chosen))
        prompt_r, rejected = split_completion(tokenizer, pair.conversation(pair.rejected))
        if prompt_r != prompt:  # the template rendered one prompt two ways: refuse, never mis-train
            raise TrainError(f"the chat template renders the prompt {pair.prompt[-1]['content'][:80]!r} "
                             "differently before the chosen and the rejected answer")
        if len(prompt) >= max_length:
            continue
        truncated += len(prompt) + max(len(chosen), len(rejected)) > max_length
        # TRL's collator cuts each sequence to max_length; the preference eval sees the same tokens
        room = max_length - len(prompt)
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen[:room], "rejected_ids": rejected[:room]})
    if len(rows) < len(pairs):
        logger.warning("%d pair(s) have no answer tokens left within max_length=%d; skipped",
                       len(pairs) - len(rows), max_length)
    return rows, truncated


def _pair(row: dict[str, list[int]]) -> EncodedPair:
    return row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]


def _dpo_trainer(base: Any, tokenizer: Any, template: AdapterTemplate, config: RunConfig,
                 train_rows: list[dict[str, list[int]]], val_rows: list[dict[str, list[int]]],
                 scratch: Path, progress: bool) -> Any:
    from datasets import Dataset
    from transformers import PrinterCallback

    # TRL's package namespace is lazy and re-exports nothing to a type checker
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    class _PreTokenized(DPOTrainer):
        # The rows are tokenized already, with the trainer's own renderer (trainer.sft), which
        # the gateway serves with; TRL's own preparation would render them a second way.
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    on_gpu = config.quantization == "nf4"
    args = DPOConfig(
        output_dir=str(scratch),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accumulation,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=_SCHEDULERS[config.scheduler],
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        beta=config.beta,
        loss_type=[LOSS_TYPE],
        max_length=config.max_length,
        gradient_checkpointing=on_gpu,
        bf16=on_gpu,
        fp16=False,
        eval_strategy="epoch" if val_rows else "no",
        logging_strategy="epoch",
        save_strategy="no",
        report_to=[],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    lora = LoraConfig(**template.peft_config_kwargs(), lora_dropout=config.lora_dropout,
                      task_type="CAUSAL_LM")
    trainer = _PreTokenized(
        model=base,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    return trainer


class _EpochEnd(TrainerCallback):
    """Feeds each epoch's train and held-out DPO loss to the trainer's EarlyStopping."""

    def __init__(self, stopper: EarlyStopping, has_validation: bool) -> None:
        self.stopper, self.has_validation = stopper, has_validation
        self.train_loss = math.nan

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stopper.steps_done = state.global_step
        self.stopper.hooks.step(state.global_step, state.max_steps)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:  # logging_strategy="epoch": the epoch's mean DPO loss
            self.train_loss = float(logs["loss"])
            if not math.isfinite(self.train_loss):
                raise TrainError(f"DPO training diverged (loss {self.train_loss}); lower learning_rate")
            if not self.has_validation:
                self.stopper.record(self.train_loss, None)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if metrics is not None and "eval_loss" in metrics and \
                self.stopper.record(self.train_loss, float(metrics["eval_loss"])):
            logger.info("early stop after epoch %d: no held-out DPO loss improvement in %s epoch(s)",
                        len(self.stopper.history), self.stopper.config.early_stopping_patience)
            control.should_training_stop = True


def _metrics(report: RunReport, rows: list[dict[str, list[int]]], golden: EvalSet | None,
             regression: EvalSet | None) -> dict[str, Any]:
    kept = report.kept
    return {
        "final_train_loss": kept.train_loss,
        "val_loss": kept.val_loss,
        "train_seconds": round(report.train_seconds, 3),
        "eval_seconds": round(report.eval_seconds, 3),
        "pairs": len(rows),
        "validation_pairs": report.data.validation,
        "truncated": report.truncated,
        "truncation_rate": round(report.truncation_rate, 4),
        "epochs": len(report.epochs),
        "best_epoch": report.best_epoch,
        "stopped_early": report.stopped_early,
        "epoch_metrics": [{"epoch": e.epoch, "train_loss": e.train_loss, "val_loss": e.val_loss}
                          for e in report.epochs],
        "data": report.data.to_dict(),
        "evals": eval_metrics(report, golden, regression),
    }


def _trl_version() -> str:
    import trl

    return str(trl.__version__)
