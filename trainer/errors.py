"""Exceptions raised by the trainer.

    TrainerError                    any trainer failure (the CLI prints it, no traceback)
    ├── ConfigError                 a run config has unknown, shape-defining or invalid keys
    ├── DatasetError                a JSONL file has invalid lines; lists every one
    │   └── ContaminationError      training examples match golden eval prompts (policy 'fail')
    ├── ChatTemplateError           the base's chat template cannot locate assistant turns
    ├── QuantizationUnavailableError  QLoRA asked for where CUDA or bitsandbytes is missing
    ├── TrainError                  training cannot start or produced nothing usable
    └── GateFailedError             the trained adapter missed an eval gate; never published
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.evals import GateResult

_MAX_LISTED = 50


class TrainerError(Exception):
    """Base of every trainer error."""


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
