"""The training loop: seeded batches, AdamW with a warm-up schedule, per-epoch validation.

Early stopping watches the validation loss after every epoch and keeps the best
epoch's LoRA weights (a copy of the trainable tensors only, a few MB at most).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trainer.config import RunConfig
from trainer.errors import TrainError
from trainer.sft import IGNORE_INDEX, EncodedExample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float  # mean token loss over the epoch's steps
    val_loss: float | None = None

    @property
    def val_perplexity(self) -> float | None:
        return None if self.val_loss is None else math.exp(min(self.val_loss, 700.0))

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "val_loss": self.val_loss,
                "val_perplexity": self.val_perplexity}


def loss_sum(model: Any, batch: Sequence[EncodedExample], pad_id: int) -> torch.Tensor:
    """Summed token cross-entropy of one padded batch (trained tokens only)."""
    device = next(model.parameters()).device
    input_ids, attention_mask, labels = (t.to(device) for t in collate(batch, pad_id))
    # Position t predicts token t + 1. Only positions that predict a trained token
    # need logits: skipping the rest saves much of a large vocabulary's LM head.
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def validation_loss(model: Any, examples: Sequence[EncodedExample], batch_size: int, pad_id: int) -> float:
    """Mean token loss over ``examples``, without gradients or dropout."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            total += float(loss_sum(model, batch, pad_id))
            tokens += sum(e.trained_tokens for e in batch)
    model.train(was_training)
    return total / tokens


class RunHooks:
    """What a caller sees of a run as it goes (a fine-tuning job's events, checkpoints and
    cancel): called after every optimizer step and every epoch. Either may raise to stop
    the run (``trainer.errors.RunStopped``); the defaults do nothing."""

    def step(self, step: int, total: int) -> None:
        """``step`` of ``total`` optimizer steps is done."""

    def epoch(self, stats: EpochStats, step: int, model: Any) -> None:
        """An epoch ended at optimizer step ``step``; ``model`` holds its LoRA weights."""


class EarlyStopping:
    """Validation after each epoch; remembers the best weights and says when to stop."""

    def __init__(self, model: Any, validation: Sequence[Any], config: RunConfig, pad_id: int,
                 hooks: RunHooks | None = None) -> None:
        self.model, self.validation, self.config, self.pad_id = model, validation, config, pad_id
        self.hooks = hooks or RunHooks()
        self.steps_done = 0  # optimizer steps, as the hooks count them
        self.history: list[EpochStats] = []
        self.best_epoch = 0
        self.stopped_early = False
        self._best_loss = math.inf
        self._best_state: dict[str, torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return bool(self.validation) and self.config.early_stopping_patience is not None

    def end_epoch(self, train_loss: float) -> bool:
        """Measure the validation loss and record the epoch; True when training should stop."""
        val = None
        if self.validation:
            val = validation_loss(self.model, self.validation, self.config.batch_size, self.pad_id)
        return self.record(train_loss, val)

    def record(self, train_loss: float, val: float | None) -> bool:
        """Record an epoch whose validation loss was measured elsewhere (DPO's, by TRL)."""
        self.history.append(EpochStats(len(self.history) + 1, train_loss, val))
        self.hooks.epoch(self.history[-1], self.steps_done, self.model)
        if not self.active or val is None:
            self.best_epoch = len(self.history)
            return False
        assert self.config.early_stopping_patience is not None
        if val < self._best_loss - self.config.early_stopping_min_delta:
            self._best_loss, self.best_epoch = val, len(self.history)
            self._best_state = {
                name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad
            }
        elif len(self.history) - self.best_epoch >= self.config.early_stopping_patience:
            self.stopped_early = True
            return True
        return False

    def restore_best(self) -> None:
        if self._best_state is None or self.best_epoch == len(self.history):
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self._best_state.items():
                params[name].copy_(value)
        logger.info(
            "kept the weights of epoch %d (best validation loss %.4f)", self.best_epoch, self._best_loss
        )

    def kept_perplexity(self) -> float | None:
        return self.history[self.best_epoch - 1].val_perplexity if self.history else None


def train_loop(
    model: Any,
    examples: list[EncodedExample],
    config: RunConfig,
    pad_id: int,
    stopper: EarlyStopping,
    progress: bool = False,
) -> None:
    plan = plan_steps(len(examples), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    epochs = plan[-1][0] + 1
    epoch_loss, epoch_tokens, epoch_started = 0.0, 0, time.perf_counter()
    model.train()
    bar = tqdm(total=len(plan), desc="training", unit="step", disable=not progress, file=sys.stderr)
    try:
        for step, (epoch, micro_batches) in enumerate(plan):
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * lr_factor(step, len(plan), config.warmup_steps,
                                                                config.scheduler)
            step_tokens = sum(examples[i].trained_tokens for batch in micro_batches for i in batch)
            for batch in micro_batches:
                batch_loss = loss_sum(model, [examples[i] for i in batch], pad_id)
                (batch_loss / step_tokens).backward()
                epoch_loss += batch_loss.item()
            epoch_tokens += step_tokens
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update()
            stopper.steps_done = step + 1
            stopper.hooks.step(step + 1, len(plan))
            if step + 1 < len(plan) and plan[step + 1][0] == epoch:
                continue
            loss = epoch_loss / epoch_tokens
            if not math.isfinite(loss):
                raise TrainError(
                    f"training diverged in epoch {epoch + 1} (loss {loss}); "
                    "lower learning_rate or max_grad_norm"
                )
            stop = stopper.end_epoch(loss)
            stats = stopper.history[-1]
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}",
                            **({"val": f"{stats.val_loss:.4f}"} if stats.val_loss is not None else {}))
            logger.info(
                "epoch %d/%d: loss %.4f%s (step %d/%d, %.1fs)",
                epoch + 1, epochs, loss,
                "" if stats.val_loss is None else f", validation {stats.val_loss:.4f}",
                step + 1, len(plan), time.perf_counter() - epoch_started,
            )
            if stop:
                logger.info("early stop after epoch %d: no validation improvement in %s epoch(s)",
                            epoch + 1, config.early_stopping_patience)
                break
            epoch_loss, epoch_tokens, epoch_started = 0.0, 0, time.perf_counter()
    finally:
        bar.close()


def plan_steps(n: int, config: RunConfig) -> list[tuple[int, list[list[int]]]]:
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


def lr_factor(step: int, total: int, warmup: int, scheduler: str = "linear") -> float:
    """Linear warm-up to the peak, then the schedule's decay; no executed step gets a zero rate."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if scheduler == "constant":
        return 1.0
    if scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    return min((step + 1) / (warmup + 1), (total - step) / max(total - warmup, 1))


def collate(batch: Sequence[EncodedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
