"""One eval gate's verdict: what was measured, what was required, and whether it passed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateResult:
    name: str
    measured: float
    threshold: float
    comparison: str  # ">=", "<=" or ">": how measured must relate to threshold
    passed: bool

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{self.name}: {verdict}, measured {self.measured:.4g}, "
            f"required {self.comparison} {self.threshold:g}"
        )
