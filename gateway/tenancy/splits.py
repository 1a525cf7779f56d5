"""Which version of an alias's weighted split serves a caller (progressive delivery, A/B).

A caller named by the request (its ``user`` field, else the ``x-lora-gateway-session``
header) is assigned by weighted rendezvous hashing: each entry scores
``-ln(u) / weight`` with ``u`` a hash of (alias, caller, entry) in (0, 1], and the lowest
score wins. So the choice is a pure function of the alias, the caller and the weights:
every replica makes the same one with no coordination, a caller keeps its version while
the weights hold, and when they change only the callers the change must move move (those
of a shrinking entry, or won by a growing one). A request with no caller is assigned at
random, by weight.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from adapters_registry import SplitEntry

SESSION_HEADER = "x-lora-gateway-session"
MAX_CALLER_CHARS = 256  # longer ``user`` values are hashed whole; headers past it are ignored
_SCALE = float(1 << 64)


def choose(split: Sequence[SplitEntry], alias_key: str, caller: str | None,
           rng: random.Random | None = None) -> SplitEntry:
    """The entry that serves ``caller`` (``alias_key`` keeps aliases independent)."""
    if caller is None:
        return (rng or random).choices(list(split), weights=[e.weight for e in split])[0]
    return min(split, key=lambda e: _score(alias_key, caller, e))


def _score(alias_key: str, caller: str, entry: SplitEntry) -> float:
    digest = hashlib.blake2b(f"{alias_key}\0{caller}\0{entry.label}".encode(), digest_size=8)
    u = (int.from_bytes(digest.digest(), "big") + 1) / _SCALE  # (0, 1]
    return -math.log(u) / entry.weight
