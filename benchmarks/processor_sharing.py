"""Cores shared by several servers' jobs, by processor sharing (for benchmarks.fleet_model)."""

from __future__ import annotations


class SharedCores:
    """``k`` cores the replicas' engines share (processor sharing): while ``n`` steps run, each
    advances at ``min(1, k / n)`` of a core, so a step's length depends on every other step
    and load that overlaps it."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.left: dict[int, float] = {}  # replica -> core-seconds its running step still needs
        self.t = 0.0
        self.version = 0  # changes whenever the running set does: older end events are stale

    def _advance(self, now: float) -> None:
        if self.left:
            done = (now - self.t) * min(1.0, self.k / len(self.left))
            for rep in self.left:
                self.left[rep] -= done
        self.t = now

    def start(self, now: float, rep: int, work: float) -> None:
        self._advance(now)
        self.left[rep] = work
        self.version += 1

    def end(self, now: float, rep: int) -> None:
        self._advance(now)
        del self.left[rep]
        self.version += 1

    def next_end(self) -> tuple[float, int] | None:
        """(time, replica) of the next step to end, if any runs."""
        if not self.left:
            return None
        rep = min(self.left, key=self.left.__getitem__)
        rate = min(1.0, self.k / len(self.left))
        return self.t + max(0.0, self.left[rep]) / rate, rep
