"""Chat datasets: JSONL files in OpenAI's ``messages`` format, validated whole.

Each line is ``{"messages": [{"role": ..., "content": ...}, ...]}`` with an optional
leading system message, then user and assistant turns alternating, ending on an
assistant turn. Every bad line is reported at once, with its line number.

:func:`prepare_data` then cleans a loaded set for one run: near duplicates are dropped,
examples whose prompts repeat a golden eval prompt are dropped (or fail the run), and
the rest is split into train and validation sets, deterministically for a seed. The
clean-up itself (:func:`clean_and_split`) sees only :class:`HygieneItem` texts, so
preference pairs (``trainer.preference``) go through exactly the same steps.
"""

from __future__ import annotations

import json
import logging
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from adapters_registry.hashing import canonical_json, sha256_bytes
from trainer.config import RunConfig
from trainer.errors import ContaminationError, DatasetError, LineProblem

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = frozenset({"role", "content"})
_LINE_KEYS = frozenset({"messages"})
# DatasetError's message lists this many problems; .problems holds all of them.

Message = dict[str, str]
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


def validate_messages(messages: Any) -> list[str]:
    """Every problem with one conversation (empty when it is a valid training example)."""
    if not isinstance(messages, list) or not messages:
        return ["'messages' must be a non-empty list"]
    problems: list[str] = []
    roles: list[str | None] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(f"{where} must be an object, got {type(message).__name__}")
            roles.append(None)
            continue
        extra = sorted(set(message) - _MESSAGE_KEYS)
        if extra:
            problems.append(f"{where} has unsupported key(s) {extra}; only role and content")
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"{where}.role must be one of {list(ROLES)}, got {role!r}")
            role = None
        content = message.get("content")
        if not isinstance(content, str):
            problems.append(f"{where}.content must be a string, got {type(content).__name__}")
        elif not content.strip():
            problems.append(f"{where}.content is empty")
        roles.append(role)
    known = [role for role in roles if role is not None]
    if len(known) == len(roles):  # turn order is only meaningful when every role is valid
        problems.extend(_order_problems(known))
    return problems


def parse_json_object(line: bytes) -> tuple[dict[str, Any] | None, list[str]]:
    """One JSONL line as a JSON object, or None and why not."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, ["not valid UTF-8"]
    except json.JSONDecodeError as exc:
        return None, [f"invalid JSON ({exc.msg} at column {exc.colno})"]
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {type(record).__name__}"]
    return record, []


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


def _order_problems(roles: list[str]) -> list[str]:
    """Turn order: optional system first, then user/assistant alternating, assistant last."""
    problems = [
        f"messages[{i}]: a system message may only come first"
        for i, role in enumerate(roles)
        if role == "system" and i > 0
    ]
    previous: tuple[int, str] | None = None
    for i, role in enumerate(roles):
        if role == "system":
            continue
        if previous is None and role != "user":
            problems.append(f"messages[{i}]: the first turn must be a user turn, got {role}")
        elif previous is not None and role == previous[1]:
            problems.append(f"messages[{i}]: two {role} turns in a row (after messages[{previous[0]}])")
        previous = (i, role)
    if "assistant" not in roles:
        problems.append("no assistant turn to train on")
    elif roles[-1] != "assistant":
        problems.append(f"the last turn must be an assistant turn, got {roles[-1]}")
    return problems


# -- hygiene for one run: near duplicates, contamination, split ---------------------------

_NOTES_KEPT = 20  # notes a report carries; counts are always complete


@dataclass(frozen=True)
class DataReport:
    """What happened to a dataset on its way into a run, for the summary and manifest."""

    read: int  # valid, distinct examples in the file
    exact_duplicates: int
    near_duplicates: int
    contaminated: int  # dropped because a prompt repeats a golden eval prompt
    train: int
    validation: int
    notes: tuple[str, ...] = ()  # the first few "line N: why" explanations

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "contaminated": self.contaminated,
            "train": self.train,
            "validation": self.validation,
        }


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
) -> PreparedData:
    """Drop near duplicates and contaminated examples, then split train/validation.

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
    train, validation, report = clean_and_split(
        items, config, dataset.path, dataset.duplicates_removed, eval_prompts, eval_path
    )
    return PreparedData(
        train=[dataset.examples[i] for i in train],
        validation=[dataset.examples[i] for i in validation],
        report=report,
    )


@dataclass(frozen=True)
class HygieneItem:
    """What the clean-up compares of one example (a conversation or a preference pair)."""

    line: int  # in the file, for the notes
    dialogue: str  # normalised text that near duplicates are judged on
    system: str  # normalised system prompt: near duplicates must share it
    prompts: tuple[str, ...]  # normalised prompts the example trains answers to


def clean_and_split(
    items: Sequence[HygieneItem],
    config: RunConfig,
    path: Path,
    exact_duplicates: int,
    eval_prompts: Sequence[tuple[int, Sequence[Message]]] = (),
    eval_path: Path | None = None,
) -> tuple[list[int], list[int], DataReport]:
    """(train, validation) indices into ``items`` and the report: near duplicates and
    contaminated items dropped (or ContaminationError), the rest split, seeded."""
    kept, notes = _drop_near_duplicates(items, config.near_duplicate_threshold)
    near = len(items) - len(kept)
    contaminated = _contaminated(items, kept, eval_prompts, config.near_duplicate_threshold)
    if contaminated and config.on_contamination == "fail":
        problems = [
            LineProblem(items[i].line, f"its prompt matches golden eval line {line} ({how})")
            for i, (line, how) in sorted(contaminated.items())
        ]
        raise ContaminationError(
            path, problems, f"example(s) repeat golden prompts of {eval_path} (on_contamination=fail)"
        )
    notes += [
        f"line {items[i].line}: dropped, its prompt matches golden line {line} ({how})"
        for i, (line, how) in sorted(contaminated.items())
    ]
    kept = [i for i in kept if i not in contaminated]
    if not kept:
        problem = LineProblem(0, "no examples left after the dedup and contamination checks")
        raise DatasetError(path, [problem])
    train, validation = split_indices(len(kept), config.validation_fraction, config.seed)
    for note in notes[:_NOTES_KEPT]:
        logger.info("%s: %s", path, note)
    report = DataReport(
        read=len(items),
        exact_duplicates=exact_duplicates,
        near_duplicates=near,
        contaminated=len(contaminated),
        train=len(train),
        validation=len(validation),
        notes=tuple(notes[:_NOTES_KEPT]),
    )
    return [kept[i] for i in train], [kept[i] for i in validation], report


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) positions: a seeded shuffle, ``floor(n * fraction)`` held out."""
    n_validation = int(n * fraction)
    if n_validation >= n:
        n_validation = n - 1  # never leave nothing to train on
    order = list(range(n))
    random.Random(f"lora-gateway-split:{seed}").shuffle(order)
    return sorted(order[n_validation:]), sorted(order[:n_validation])


def normalize_text(text: str) -> str:
    """Case, width, punctuation and spacing folded away: what near-duplicate checks compare."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def dialogue_text(messages: Sequence[Message]) -> str:
    """The non-system turns, normalised, one ``role: text`` line each: what hygiene compares."""
    turns = (f"{m['role']}: {normalize_text(m['content'])}" for m in messages if m["role"] != "system")
    return "\n".join(turns)


def system_text(messages: Sequence[Message]) -> str:
    """The leading system prompt, normalised ("" without one)."""
    return normalize_text(messages[0]["content"]) if messages and messages[0]["role"] == "system" else ""


def _drop_near_duplicates(
    items: Sequence[HygieneItem], threshold: float | None
) -> tuple[list[int], list[str]]:
    """Indices kept (the first of each group) and a note per dropped item."""
    if threshold is None:
        return list(range(len(items))), []
    index = _MinHashIndex(threshold)
    kept: list[int] = []
    notes: list[str] = []
    for i, item in enumerate(items):
        # A shared system prompt is boilerplate: two examples are near duplicates only when
        # their system prompts are equal and their dialogues are near each other.
        match = index.first_match(_shingles(item.dialogue), item.system, key=i)
        if match is None:
            kept.append(i)
        else:
            other, similarity = match
            notes.append(
                f"line {item.line}: dropped, near duplicate of line {items[other].line} "
                f"(similarity {similarity:.2f})"
            )
    return kept, notes


def _contaminated(
    items: Sequence[HygieneItem],
    kept: list[int],
    eval_prompts: Sequence[tuple[int, Sequence[Message]]],
    threshold: float | None,
) -> dict[int, tuple[int, str]]:
    """Item index -> (golden line, "exact" or "similarity x") for each contaminated item."""
    if not eval_prompts:
        return {}
    exact: dict[str, list[int]] = {}
    index = _MinHashIndex(threshold or 1.0)
    owner: list[int] = []  # index entry -> item
    for i in kept:
        for text in items[i].prompts:
            exact.setdefault(text, []).append(i)
            if threshold is not None:
                index.add(len(owner), _shingles(text), "")
                owner.append(i)
    found: dict[int, tuple[int, str]] = {}
    for line, prompt in eval_prompts:
        text = dialogue_text(prompt)
        for i in exact.get(text, []):
            found.setdefault(i, (line, "exact"))
        if threshold is not None:
            for entry, similarity in index.matches(_shingles(text), ""):
                found.setdefault(owner[entry], (line, f"similarity {similarity:.2f}"))
    return found


_PUNCTUATION = re.compile(r"[^\w\s]")
_SHINGLE = 5  # bytes; short enough for one-line prompts, long enough to carry words
_BANDS, _ROWS = 20, 6  # 120 hashes; a pair at Jaccard 0.8 becomes a candidate with p > 0.99
_rng = np.random.default_rng(0x5EED)
_MULT = _rng.integers(1, 2**63, size=_BANDS * _ROWS, dtype=np.uint64) | np.uint64(1)
_ADD = _rng.integers(0, 2**63, size=_BANDS * _ROWS, dtype=np.uint64)
_SHIFTS = np.arange(_SHINGLE, dtype=np.uint64) * np.uint64(8)

Shingles = np.ndarray  # sorted unique uint64 codes of a text's byte 5-grams


def _shingles(text: str) -> Shingles:
    """Each byte 5-gram packed into one integer: exact (no hash collisions) and vectorised."""
    data = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint64)
    if len(data) < _SHINGLE:
        data = np.concatenate([data, np.zeros(_SHINGLE - len(data), dtype=np.uint64)])
    windows = np.lib.stride_tricks.sliding_window_view(data, _SHINGLE)
    return np.unique((windows << _SHIFTS).sum(axis=1, dtype=np.uint64))


class _MinHashIndex:
    """MinHash signatures in LSH bands: candidate pairs are found in ~O(n), then verified
    with the exact Jaccard similarity, so a reported match is never a hashing artefact."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._buckets: dict[tuple[int, str, bytes], list[int]] = {}
        self._items: dict[int, Shingles] = {}

    def add(self, key: int, shingles: Shingles, group: str, bands: list[Any] | None = None) -> None:
        for band in bands if bands is not None else self._bands(shingles, group):
            self._buckets.setdefault(band, []).append(key)
        self._items[key] = shingles

    def first_match(self, shingles: Shingles, group: str, key: int) -> tuple[int, float] | None:
        """The earliest match, or None after adding the text under ``key``."""
        bands = self._bands(shingles, group)
        matches = self._verified(shingles, bands)
        if matches:
            return min(matches)
        self.add(key, shingles, group, bands)
        return None

    def matches(self, shingles: Shingles, group: str) -> list[tuple[int, float]]:
        return self._verified(shingles, self._bands(shingles, group))

    def _verified(self, shingles: Shingles, bands: list[Any]) -> list[tuple[int, float]]:
        candidates = sorted({k for band in bands for k in self._buckets.get(band, ())})
        out = []
        for key in candidates:
            other = self._items[key]
            common = len(np.intersect1d(shingles, other, assume_unique=True))
            similarity = common / (len(shingles) + len(other) - common)
            if similarity >= self.threshold:
                out.append((key, similarity))
        return out

    @staticmethod
    def _bands(shingles: Shingles, group: str) -> list[tuple[int, str, bytes]]:
        # multiply-shift hashing: wrapping uint64 arithmetic is the point, not an accident
        signature = ((shingles[:, None] * _MULT[None, :] + _ADD[None, :]) >> np.uint64(32)).min(axis=0)
        packed = signature.astype(np.uint32).reshape(_BANDS, _ROWS)
        return [(b, group, packed[b].tobytes()) for b in range(_BANDS)]
