"""Exceptions raised by the trainer.

    TrainerError               any trainer failure (the CLI prints it, no traceback)
    ├── ConfigError            a run config has unknown, shape-defining or invalid keys
    ├── DatasetError           a chat JSONL file has invalid lines; lists every one
    ├── ChatTemplateError      the base's chat template cannot locate assistant turns
    └── TrainError             training cannot start or produced nothing usable
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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

    def __init__(self, path: Path, problems: Sequence[LineProblem]) -> None:
        self.path = path
        self.problems = list(problems)
        listed = "\n".join(f"  {p}" for p in self.problems[:_MAX_LISTED])
        more = len(self.problems) - _MAX_LISTED
        if more > 0:
            listed += f"\n  ... and {more} more"
        super().__init__(f"{path}: {len(self.problems)} problem(s):\n{listed}")


class ChatTemplateError(TrainerError, ValueError):
    """The chat template cannot be used to locate assistant turns."""


class TrainError(TrainerError, RuntimeError):
    """Training cannot start or produced nothing usable."""
