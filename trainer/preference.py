"""Preference datasets for DPO: JSONL pairs of a prompt, a chosen and a rejected answer.

Each line takes one of the forms TRL's ``DPOTrainer`` accepts:

- messages: ``{"prompt": [chat messages ending on a user turn], "chosen": [{"role":
  "assistant", "content": ...}], "rejected": [{"role": "assistant", "content": ...}]}``
- flat strings: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; the prompt
  is one user turn and each answer one assistant turn, so both forms are rendered with
  the base's own chat template, as the gateway serves them
- implicit prompt: ``{"chosen": [conversation], "rejected": [conversation]}`` whose
  turns before the final assistant turn (the prompt) must be the same in both.

Every bad line is reported at once, with its number. Then :func:`prepare_preferences`
cleans a set for one run through the same steps as chat data (``trainer.hygiene``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_registry import (
    canonical_json,
    parse_json_object,
    prompt_problems,
    read_answer,
    validate_messages,
)
from trainer.config import RunConfig
from trainer.data import read_jsonl
from trainer.hygiene import (
    DataReport,
    HygieneItem,
    Message,
    clean_and_split,
    dialogue_text,
    normalize_text,
    system_text,
)

_KEYS = frozenset({"prompt", "chosen", "rejected"})
_ANSWERS = ("chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[Message]  # ends on a user turn
    chosen: str  # the preferred assistant answer
    rejected: str

    def conversation(self, answer: str) -> list[Message]:
        return [*self.prompt, {"role": "assistant", "content": answer}]


@dataclass(frozen=True)
class PreferenceDataset:
    """Validated pairs of one file, exact duplicates removed."""

    pairs: list[PreferencePair]
    sha256: str  # of the file's bytes
    path: Path
    duplicates_removed: int = 0
    lines: list[int] = field(default_factory=list)  # the file line of each pair


def load_preference_jsonl(path: Path) -> PreferenceDataset:
    """Read and validate a preference JSONL file; DatasetError lists every bad line."""
    path = Path(path)
    pairs, lines, duplicates, sha256 = read_jsonl(
        path, _parse_line, lambda p: canonical_json([p.prompt, p.chosen, p.rejected]), "preference pair"
    )
    return PreferenceDataset(pairs, sha256, path, duplicates, lines)


@dataclass(frozen=True)
class PreparedPreferences:
    train: list[PreferencePair]
    validation: list[PreferencePair]
    report: DataReport


def prepare_preferences(
    dataset: PreferenceDataset,
    config: RunConfig,
    eval_prompts: Sequence[tuple[int, Sequence[Message]]] = (),
    eval_path: Path | None = None,
    held_out: PreferenceDataset | None = None,
) -> PreparedPreferences:
    """Near duplicates and pairs whose prompt repeats a golden prompt dropped, then split
    (or, with ``held_out``, all trained on and ``held_out`` kept for validation).

    Two pairs are near duplicates when prompt, chosen and rejected together are; the
    contamination check compares the prompt, as for a chat example.
    """
    items = [
        HygieneItem(
            line=dataset.lines[i] if dataset.lines else i + 1,
            dialogue=dialogue_text(pair.conversation(pair.chosen))
            + "\nrejected: " + normalize_text(pair.rejected),
            system=system_text(pair.prompt),
            prompts=(dialogue_text(pair.prompt),),
        )
        for i, pair in enumerate(dataset.pairs)
    ]
    split = config if held_out is None else dataclasses.replace(config, validation_fraction=0.0)
    train, validation, report = clean_and_split(
        items, split, dataset.path, dataset.duplicates_removed, eval_prompts, eval_path
    )
    if held_out is not None:
        return PreparedPreferences([dataset.pairs[i] for i in train], list(held_out.pairs),
                                   dataclasses.replace(report, validation=len(held_out.pairs)))
    return PreparedPreferences(
        [dataset.pairs[i] for i in train], [dataset.pairs[i] for i in validation], report
    )


def _parse_line(line: bytes) -> tuple[PreferencePair | None, list[str]]:
    record, problems = parse_json_object(line)
    if record is None:
        return None, problems
    extra = sorted(set(record) - _KEYS)
    if extra:
        problems.append(f"unsupported key(s) {extra}; only 'prompt', 'chosen', 'rejected'")
    problems += [f"missing {key!r}" for key in _ANSWERS if key not in record]
    if problems:
        return None, problems
    if "prompt" not in record:
        prompt, answers, problems = _implicit_prompt(record["chosen"], record["rejected"])
    elif isinstance(record["prompt"], str):
        prompt, answers, problems = _flat(record)
    else:
        prompt, answers, problems = _messages(record)
    if not problems:
        chosen, rejected = answers
        if normalize_text(chosen) == normalize_text(rejected):
            problems.append("'chosen' and 'rejected' are the same answer (up to case, punctuation "
                            "and spacing): the pair prefers nothing")
    if problems:
        return None, problems
    return PreferencePair(prompt, *answers), []


def _flat(record: dict[str, Any]) -> tuple[list[Message], tuple[str, str], list[str]]:
    problems = []
    for key in ("prompt", *_ANSWERS):
        value = record[key]
        if not isinstance(value, str):
            problems.append(f"{key!r} must be a string like 'prompt' (the flat form), got "
                            f"{type(value).__name__}")
        elif not value.strip():
            problems.append(f"{key!r} is empty")
    prompt = [{"role": "user", "content": record["prompt"]}]
    return prompt, (record["chosen"], record["rejected"]), problems


def _messages(record: dict[str, Any]) -> tuple[list[Message], tuple[str, str], list[str]]:
    prompt = record["prompt"]
    problems = prompt_problems("prompt", prompt)
    answers = []
    for key in _ANSWERS:
        answer, answer_problems = read_answer(key, record[key])
        answers.append(answer)
        problems += answer_problems
    return (prompt if isinstance(prompt, list) else []), (answers[0], answers[1]), problems


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[list[Message], tuple[str, str], list[str]]:
    """The implicit-prompt form: two whole conversations that differ in their last turn only."""
    problems = []
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list) or len(value) < 2:
            problems.append(f"without 'prompt', {key!r} must be a conversation (a list of at least "
                            "a user turn and the assistant's answer)")
    if problems:
        return [], ("", ""), problems
    answers = []
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        problems += [f"{key}: {p}" for p in validate_messages(value)]
        answer, answer_problems = read_answer(key, value[-1:])
        answers.append(answer)
        problems += answer_problems
    if not problems and chosen[:-1] != rejected[:-1]:
        differ = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b),
                      min(len(chosen), len(rejected)) - 1)
        problems.append(f"'chosen' and 'rejected' have different prompts (they differ at message "
                        f"{differ}); only the last, assistant turn may differ")
    return list(chosen[:-1]), (answers[0], answers[1]), problems
