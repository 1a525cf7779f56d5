"""Hygiene for one training run: near duplicates, contamination, the train/validation split.

The clean-up sees only :class:`HygieneItem` texts, so chat examples (``trainer.data``)
and preference pairs (``trainer.preference``) go through exactly the same steps. Near
duplicates are MinHash candidates over byte 5-grams, confirmed by exact Jaccard.
"""

from __future__ import annotations

import logging
import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import RunConfig
from trainer.errors import ContaminationError, DatasetError, LineProblem

logger = logging.getLogger(__name__)

Message = dict[str, str]  # one chat message: {"role": ..., "content": ...}


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
