"""How many requests the door lets into the engine, adapted to a latency target.

Every sequence in the engine's batch makes every step slower: on a busy engine a new
request's prefill, and every running request's next token, wait for a step that carries
the whole batch. ``LatencyTarget`` keeps the time per output token (TPOT) of finished
requests near ``target_s`` by moving the admission limit: multiplicatively down when
their moving average is above the target, one up when it is well below and the limit is
what holds requests back (additive increase, multiplicative decrease, as TCP's window).
It trades throughput for latency (a smaller batch produces fewer tokens per second), so
it is off unless a target is configured (``admission_tpot_target_ms``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

_DECREASE = 0.75
_SMOOTHING = 0.2  # weight of the newest request's TPOT in the moving average
_HEADROOM = 0.8  # below this fraction of the target, the limit may grow


class LatencyTarget:
    def __init__(self, target_s: float, ceiling: int, floor: int = 1, cooldown_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if target_s <= 0 or not 1 <= floor <= ceiling:
            raise ValueError("target_s must be > 0 and 1 <= floor <= ceiling")
        self.target_s = target_s
        self.ceiling = ceiling
        self.floor = floor
        self.limit = ceiling
        self.tpot_s: float | None = None  # moving average of finished requests' TPOT
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._changed = -float("inf")

    def observe(self, tpot_s: float, saturated: bool) -> None:
        """A finished request's TPOT; ``saturated``: requests were waiting for the limit."""
        self.tpot_s = tpot_s if self.tpot_s is None else (
            self.tpot_s + _SMOOTHING * (tpot_s - self.tpot_s))
        now = self._clock()
        if now - self._changed < self._cooldown_s:
            return  # let the last change show in the requests that finish next
        if self.tpot_s > self.target_s and self.limit > self.floor:
            self.limit = max(self.floor, int(self.limit * _DECREASE))
            self._changed = now
        elif self.tpot_s < _HEADROOM * self.target_s and saturated and self.limit < self.ceiling:
            self.limit += 1
            self._changed = now
