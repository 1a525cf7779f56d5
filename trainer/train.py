"""Train one LoRA adapter of a registered template on a chat dataset, on CPU or GPU.

A plain PyTorch loop (AdamW, linear warm-up then decay, padded batches): the HF
Trainer's machinery costs more than the training itself for adapters this small.
The adapter directory appears whole or not at all: it is built under a temporary
name beside ``out_dir`` and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_registry.contract import BaseContract, derive_contract
from adapters_registry.hashing import sha256_bytes
from adapters_registry.manifest import AdapterManifest
from adapters_registry.template import AdapterTemplate
from trainer.config import RunConfig
from trainer.data import ChatDataset
from trainer.errors import TrainError
from trainer.sft import IGNORE_INDEX, EncodedExample, encode_example, render_golden

logger = logging.getLogger(__name__)

TRAINING_CONFIG_FILE = "training_config.json"
GOLDEN_RENDER_FILE = "golden_render.txt"
# Used when running from a source tree, where the distribution's metadata is absent.
_SOURCE_VERSION = "0.1.0"
_PARALLEL_MIN_PARAMS = 20_000_000


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    final_loss: float  # mean token loss of the last epoch
    seconds: float  # the training loop only
    manifest: AdapterManifest
    epoch_losses: tuple[float, ...] = ()


def train_adapter(
    base_dir: Path,
    base_model_id: str,
    template: AdapterTemplate,
    dataset: ChatDataset,
    config: RunConfig,
    out_dir: Path,
) -> TrainResult:
    """Train an adapter of ``template`` on ``dataset``; write it and its manifest to out_dir."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; adapter versions are never overwritten")
    contract = derive_contract(base_dir, base_model_id)
    _check_template(contract, template)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _check_chat_template(tokenizer, contract)
    usable, truncated = _encode(tokenizer, dataset, config.max_length)

    torch.manual_seed(config.seed)  # LoRA A init and dropout draw from it
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        **template.peft_config_kwargs(),
        lora_dropout=config.lora_dropout,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    pad_id = _pad_id(tokenizer)
    with _torch_threads(_threads_for(model)):
        started = time.perf_counter()
        epoch_losses = _train_loop(model, usable, config, pad_id)
        seconds = time.perf_counter() - started
        model.eval()

    manifest = AdapterManifest(
        base_model_id=contract.model_id,
        base_revision=contract.revision,
        template_id=template.template_id,
        tokenizer_sha256=contract.tokenizer_sha256,
        chat_template_sha256=contract.chat_template_sha256,
        rope=contract.rope,
        dataset_sha256=dataset.sha256,
        seed=config.seed,
        versions=_versions(),
        run_config=config.to_dict(),
        metrics={
            "final_train_loss": epoch_losses[-1],
            "train_seconds": round(seconds, 3),
            "examples": len(usable),
            "truncated": truncated,
            "trained_tokens": sum(e.trained_tokens for e in usable),
            "epochs": len(epoch_losses),
        },
    )
    training_config = {
        "run_config": config.to_dict(),
        "template": template.to_dict(),
        "dataset": {
            "sha256": dataset.sha256,
            "examples": len(dataset.examples),
            "duplicates_removed": dataset.duplicates_removed,
        },
    }
    # the artifact names the base by id, not by this machine's path to it
    model.peft_config["default"].base_model_name_or_path = base_model_id
    with _atomic_dir(out_dir) as tmp:
        # Templates never target embeddings; saying so also stops PEFT from asking the
        # Hugging Face hub about base_model_name_or_path.
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card stub
        (tmp / TRAINING_CONFIG_FILE).write_text(
            json.dumps(training_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        (tmp / GOLDEN_RENDER_FILE).write_text(render_golden(tokenizer, dataset.examples[0]), encoding="utf-8")
        manifest.write(tmp)
    logger.info("adapter written to %s (loss %.4f, %.1fs)", out_dir, epoch_losses[-1], seconds)
    return TrainResult(out_dir, epoch_losses[-1], seconds, manifest, tuple(epoch_losses))


def _encode(tokenizer: Any, dataset: ChatDataset, max_length: int) -> tuple[list[EncodedExample], int]:
    """The examples that still train something after truncation, and how many were cut."""
    encoded = [encode_example(tokenizer, m, max_length) for m in dataset.examples]
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


def _train_loop(model: Any, examples: list[EncodedExample], config: RunConfig, pad_id: int) -> list[float]:
    plan = _plan_steps(len(examples), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    epochs = plan[-1][0] + 1
    epoch_loss, epoch_tokens, epoch_started = 0.0, 0, time.perf_counter()
    losses: list[float] = []
    model.train()
    for step, (epoch, micro_batches) in enumerate(plan):
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * _lr_factor(step, len(plan), config.warmup_steps)
        step_tokens = sum(examples[i].trained_tokens for batch in micro_batches for i in batch)
        for batch in micro_batches:
            input_ids, attention_mask, labels = _collate([examples[i] for i in batch], pad_id)
            # Position t predicts token t + 1. Only positions that predict a trained token
            # need logits: skipping the rest saves much of a large vocabulary's LM head.
            targets = labels[:, 1:]
            keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
            loss_sum = F.cross_entropy(
                logits.flatten(0, 1).float(),
                targets[:, keep].flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            (loss_sum / step_tokens).backward()
            epoch_loss += loss_sum.item()
        epoch_tokens += step_tokens
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 == len(plan) or plan[step + 1][0] != epoch:
            losses.append(epoch_loss / epoch_tokens)
            if not math.isfinite(losses[-1]):
                raise TrainError(
                    f"training diverged in epoch {epoch + 1} (loss {losses[-1]}); "
                    "lower learning_rate or max_grad_norm"
                )
            logger.info(
                "epoch %d/%d: loss %.4f (step %d/%d, %.1fs)",
                epoch + 1,
                epochs,
                losses[-1],
                step + 1,
                len(plan),
                time.perf_counter() - epoch_started,
            )
            epoch_loss, epoch_tokens, epoch_started = 0.0, 0, time.perf_counter()
    return losses


def _plan_steps(n: int, config: RunConfig) -> list[tuple[int, list[list[int]]]]:
    """Every optimiser step as (epoch, its micro-batches of example indices), seeded order."""
    rng = random.Random(config.seed)
    per_epoch = math.ceil(math.ceil(n / config.batch_size) / config.grad_accumulation)
    total = config.max_steps or config.epochs * per_epoch
    plan: list[tuple[int, list[list[int]]]] = []
    epoch = 0
    while len(plan) < total:
        order = list(range(n))
        rng.shuffle(order)
        batches = [order[i : i + config.batch_size] for i in range(0, n, config.batch_size)]
        for i in range(0, len(batches), config.grad_accumulation):
            plan.append((epoch, batches[i : i + config.grad_accumulation]))
        epoch += 1
    return plan[:total]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    # linear warm-up to the peak, then linear decay; no executed step gets a zero rate
    return min((step + 1) / (warmup + 1), (total - step) / max(total - warmup, 1))


def _collate(batch: Sequence[EncodedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return ids, mask, labels


def _check_template(contract: BaseContract, template: AdapterTemplate) -> None:
    if (contract.model_id, contract.revision) != (template.base_model_id, template.base_revision):
        raise TrainError(
            f"template {template.template_id} is for base {template.base_model_id!r} revision "
            f"{template.base_revision[:12]}, but the base directory is {contract.model_id!r} "
            f"revision {contract.revision[:12]}; train with the template registered for this base"
        )


def _check_chat_template(tokenizer: Any, contract: BaseContract) -> None:
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


def _threads_for(model: Any) -> int:
    # Matrices of a few-million-parameter model are too small to split: on 2 shared cores
    # two OpenMP threads mostly wait on each other (measured 10-40x slower than one).
    if sum(p.numel() for p in model.parameters()) < _PARALLEL_MIN_PARAMS:
        return 1
    return _available_cpus()


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """A fresh directory beside ``final`` that becomes ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _versions() -> dict[str, str]:
    try:
        project = metadata.version("lora-gateway")
    except metadata.PackageNotFoundError:
        project = _SOURCE_VERSION
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lora-gateway": project,
    }
