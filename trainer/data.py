"""Chat datasets: JSONL files in OpenAI's ``messages`` format, validated whole.

Each line is ``{"messages": [{"role": ..., "content": ...}, ...]}`` with an optional
leading system message, then user and assistant turns alternating, ending on an
assistant turn. Every bad line is reported at once, with its line number.

:func:`prepare_data` then cleans a loaded set for one run with ``trainer.hygiene``: near
duplicates are dropped, examples whose prompts repeat a golden eval prompt are dropped
(or fail the run), and the rest is split into train and validation sets, deterministically
for a seed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from adapters_registry import canonical_json, parse_json_object, sha256_bytes, validate_messages
from trainer.config import RunConfig
from trainer.errors import DatasetError, LineProblem
from trainer.hygiene import DataReport, HygieneItem, Message, clean_and_split, dialogue_text, system_text

logger = logging.getLogger(__name__)

_LINE_KEYS = frozenset({"messages"})
# DatasetError's message lists this many problems; .problems holds all of them.

T = TypeVar("T")


@dataclass(frozen=True)
class ChatDataset:
    """Validated conversations of one file, exact duplicates removed."""

    examples: list[list[Message]]
    sha256: str  # of the file's bytes, so the manifest names exactly what was read
    path: Path
    duplicates_removed: int = 0
    lines: list[int] = field(default_factory=list)  # the file line of each example

    def line_of(self, index: int) -> int:
        return self.lines[index] if self.lines else index + 1


def load_chat_jsonl(path: Path) -> ChatDataset:
    """Read and validate a chat JSONL file; raises DatasetError listing every bad line."""
    path = Path(path)
    examples, lines, duplicates, sha256 = read_jsonl(path, _parse_line, canonical_json, "example")
    return ChatDataset(
        examples=examples, sha256=sha256, path=path, duplicates_removed=duplicates, lines=lines
    )


def read_jsonl(
    path: Path,
    parse: Callable[[bytes], tuple[T | None, list[str]]],
    key: Callable[[T], bytes],
    what: str,
) -> tuple[list[T], list[int], int, str]:
    """(records, their line numbers, exact duplicates removed, sha256 of the file's bytes).

    ``parse`` turns one line into a record or says every problem with it; ``key`` says
    when two records are the same. DatasetError lists every bad line.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(path, [LineProblem(0, f"cannot read file: {exc}")]) from None
    problems: list[LineProblem] = []
    records: list[T] = []
    lines: list[int] = []
    seen: set[bytes] = set()
    duplicates = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) carry no example
        record, line_problems = parse(line)
        problems.extend(LineProblem(number, p) for p in line_problems)
        if record is None:
            continue
        record_key = key(record)
        if record_key in seen:
            duplicates += 1
            continue
        seen.add(record_key)
        records.append(record)
        lines.append(number)
    if problems:
        raise DatasetError(path, problems)
    if not records:
        raise DatasetError(path, [LineProblem(0, f"no {what}s")])
    if duplicates:
        logger.info("%s: removed %d exact duplicate %s(s)", path, duplicates, what)
    return records, lines, duplicates, sha256_bytes(raw)


def _parse_line(line: bytes) -> tuple[list[Message] | None, list[str]]:
    record, problems = parse_json_object(line)
    if record is None:
        return None, problems
    problems = []
    extra = sorted(set(record) - _LINE_KEYS)
    if extra:
        problems.append(f"unsupported key(s) {extra}; only 'messages'")
    if "messages" not in record:
        problems.append("missing 'messages'")
    else:
        problems.extend(validate_messages(record["messages"]))
    return (None if problems else record["messages"]), problems


@dataclass(frozen=True)
class PreparedData:
    train: list[list[Message]]
    validation: list[list[Message]]
    report: DataReport


def prepare_data(
    dataset: ChatDataset,
    config: RunConfig,
    eval_prompts: Sequence[tuple[int, Sequence[Message]]] = (),
    eval_path: Path | None = None,
    held_out: ChatDataset | None = None,
) -> PreparedData:
    """Drop near duplicates and contaminated examples, then split train/validation (or,
    with ``held_out``, train on all of them and validate on ``held_out``).

    ``eval_prompts`` are (line, prompt messages) of the golden eval set: a training
    example containing the same prompt (normalised, or near it) would make the golden
    gate measure memory instead of skill.
    """
    items = [
        HygieneItem(
            line=dataset.line_of(i),
            dialogue=dialogue_text(messages),
            system=system_text(messages),
            # every prompt the example trains an answer to: the turns before each assistant turn
            prompts=tuple(dialogue_text(messages[:end]) for end, m in enumerate(messages)
                          if m["role"] == "assistant"),
        )
        for i, messages in enumerate(dataset.examples)
    ]
    split = config if held_out is None else dataclasses.replace(config, validation_fraction=0.0)
    train, validation, report = clean_and_split(
        items, split, dataset.path, dataset.duplicates_removed, eval_prompts, eval_path
    )
    if held_out is not None:
        return PreparedData([dataset.examples[i] for i in train], list(held_out.examples),
                            dataclasses.replace(report, validation=len(held_out.examples)))
    return PreparedData(
        train=[dataset.examples[i] for i in train],
        validation=[dataset.examples[i] for i in validation],
        report=report,
    )
