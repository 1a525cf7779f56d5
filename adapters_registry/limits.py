"""Tenant limits, defined once.

``TenantLimits`` is the one definition of every limit a tenant can have: its name and
type, and in its field's ``limit(...)`` its unit, its help text, its bounds, the
gateway's default, and whether the quota store (Redis, or the in-process store) enforces
it or the gateway checks it on each request. Everything else is built from ``LIMITS``:
the registry's table columns (``db.TenantLimitsRow``) and validation, the registry
CLI's ``set-limits`` flags, the admin API's body and answer, the gateway's
``default_*`` settings, its effective limits (``gateway.protection.quotas.Limits``); the chart's
values schema is checked against it by ``tests/helm``. Adding a limit is one field here
plus a migration (and the code that enforces it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Enforcer = Literal["quota store", "request", "fine-tuning"]


@dataclass(frozen=True)
class LimitSpec:
    """One limit: ``kind`` int counts from 1, or a float in (``minimum``, ``maximum``]."""

    name: str
    kind: type[int] | type[float]
    unit: str
    help: str
    default: int | float | None  # the gateway's own default; None: unlimited
    enforced_by: Enforcer
    minimum: float = 1  # inclusive for int limits, exclusive for float ones
    maximum: float | None = None

    @property
    def flag(self) -> str:
        return self.name.replace("_", "-")

    def bounds(self) -> dict[str, Any]:
        """The bounds as pydantic's Field keywords (ge/gt/le)."""
        out: dict[str, Any] = {"ge" if self.kind is int else "gt": self.minimum}
        if self.maximum is not None:
            out["le"] = self.maximum
        return out

    def json_schema(self) -> dict[str, Any]:
        """The bounds as JSON Schema keywords, and the type (null allowed without a default)."""
        kind = "integer" if self.kind is int else "number"
        out: dict[str, Any] = {"type": kind if self.default is not None else [kind, "null"]}
        out["minimum" if self.kind is int else "exclusiveMinimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not a valid setting of this limit; None when it is (or unset)."""
        if value is None:
            return None
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
                return f"{self.name} must be a whole number >= {self.minimum:g} (or unset for the default)"
            return None
        if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                or value <= self.minimum or (self.maximum is not None and value > self.maximum)):
            top = "" if self.maximum is None else f" and at most {self.maximum:g}"
            return f"{self.name} must be a number above {self.minimum:g}{top}"
        return None


def limit(kind: type[int] | type[float], unit: str, help: str, *, enforced_by: Enforcer,
          default: float | None = None, minimum: float = 1, maximum: float | None = None) -> Any:
    """A ``TenantLimits`` field: None (the gateway's default applies) unless set."""
    return field(default=None, metadata={"limit": {
        "kind": kind, "unit": unit, "help": help, "default": default, "enforced_by": enforced_by,
        "minimum": minimum, "maximum": maximum}})


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's quotas and fair-share weight. None: the gateway's default applies."""

    rpm: int | None = limit(int, "requests/minute", "requests per minute",
                            enforced_by="quota store")
    tpm: int | None = limit(int, "tokens/minute", "tokens (prompt + completion) per minute",
                            enforced_by="quota store")
    concurrency: int | None = limit(int, "requests", "requests in flight at once",
                                    enforced_by="quota store")
    max_tokens: int | None = limit(int, "tokens", "ceiling on a request's max_tokens (also its "
                                   "default)", enforced_by="request")
    max_prompt_tokens: int | None = limit(int, "tokens", "ceiling on a request's prompt length, "
                                          "in tokens", enforced_by="request")
    weight: float | None = limit(float, "share", "share of the engine when tenants compete",
                                 enforced_by="request", default=1.0, minimum=0, maximum=1000)
    # Fine-tuning through the API (adapters_registry.files, adapters_registry.jobs).
    max_file_bytes: int | None = limit(int, "bytes", "size of one uploaded fine-tuning file",
                                       enforced_by="fine-tuning", default=100_000_000)
    max_running_jobs: int | None = limit(int, "jobs", "fine-tuning jobs the workers run at once "
                                         "for this tenant", enforced_by="fine-tuning", default=1)
    max_queued_jobs: int | None = limit(int, "jobs", "fine-tuning jobs waiting (validating or "
                                        "queued) at once", enforced_by="fine-tuning", default=4)
    max_training_tokens: int | None = limit(int, "tokens", "tokens one fine-tuning job trains "
                                            "on (the training file's trained tokens x epochs)",
                                            enforced_by="fine-tuning", default=5_000_000)

    def problems(self) -> list[str]:
        """Every invalid field, named."""
        return [p for spec in LIMITS if (p := spec.problem(getattr(self, spec.name))) is not None]


LIMITS: tuple[LimitSpec, ...] = tuple(LimitSpec(f.name, **f.metadata["limit"])
                                      for f in fields(TenantLimits))

__all__ = ["LIMITS", "LimitSpec", "TenantLimits"]
