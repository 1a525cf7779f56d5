"""The admin API's bodies and answers, so /openapi.json documents every one of them.

Records the registry hands out (keys, adapters, audit entries, reports) are answered as
they are: pydantic describes their dataclasses. A tenant's limits are built from the one
definition of every limit (``adapters_registry.limits``).
"""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from adapters_registry import (
    DEFAULT_ROLLOUT_STEPS,
    LIMITS,
    AdapterInfo,
    ApiKeyInfo,
    AuditEntry,
    BlobProblem,
    GcReport,
    Rollout,
    RolloutRules,
)
from gateway.errors import ErrorDetail
from gateway.residency.manager import CacheName, EvictTarget

# Past these a date or duration overflows (datetime ends at year 9999); nobody means them.
_MAX_DAYS = 100 * 365


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- bodies ------------------------------------------------------------------------------

class TenantIn(_Body):
    name: str


class KeyIn(_Body):
    expires_in_days: float | None = Field(default=None, gt=0, le=_MAX_DAYS)


def _limits_model(name: str, base: type[BaseModel], *, strict: bool) -> type[BaseModel]:
    """Every tenant limit, null (or missing) meaning the gateway's default."""
    fields: dict[str, Any] = {
        spec.name: (spec.kind | None, Field(default=None, description=f"{spec.help} ({spec.unit})",
                                            strict=strict and spec.kind is int, **spec.bounds()))
        for spec in LIMITS}
    return create_model(name, __base__=base, __module__=__name__,
                        __doc__="A tenant's quotas and weight; null: the gateway's default.", **fields)


if TYPE_CHECKING:
    LimitsIn = _Body
    LimitsOut = BaseModel
else:
    LimitsIn = _limits_model("LimitsIn", _Body, strict=True)
    LimitsOut = _limits_model("Limits", BaseModel, strict=False)


class AliasIn(_Body):
    """Either ``version`` (the alias names it; a split ends) or ``weights``, a weighted split:
    ``{"v1": 95, "v2": 5}``, ``"base"`` for the bare base, each caller sticky to one."""

    version: int | None = Field(default=None, ge=1)
    weights: dict[str, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> AliasIn:
        if (self.version is None) == (self.weights is None):
            raise ValueError("give either version or weights")
        return self


def _rules_model() -> type[_Body]:
    """Every rollout rule (adapters_registry.rollout_evidence.RolloutRules) as a body field."""
    fields_: dict[str, Any] = {
        rule.name: (type(rule.default), Field(rule.default, description=(
            RolloutRules.help(rule.name).capitalize() + ".")))
        for rule in fields(RolloutRules)}
    return create_model("RolloutRulesIn", __base__=_Body, __module__=__name__, **fields_)


if TYPE_CHECKING:
    _RulesIn = _Body
else:
    _RulesIn = _rules_model()


class RolloutIn(_RulesIn):
    """A candidate's rollout under the alias (adapters_registry.rollouts), with its rules."""

    version: int = Field(ge=1, description="The candidate.")
    steps: list[int] = Field(default=list(DEFAULT_ROLLOUT_STEPS), min_length=1, max_length=10,
                             description="The candidate's percentages, rising to 100.")

    def rules(self) -> RolloutRules:
        return RolloutRules(**{rule.name: getattr(self, rule.name) for rule in fields(RolloutRules)})


class RolloutOut(BaseModel):
    """A rollout's state: its step, the candidate's share now, the last judgement's figures."""

    id: int
    tenant: str
    adapter: str
    alias: str
    stable: int
    candidate: int
    percents: list[int]
    step: int
    percent: int  # the candidate's share of the alias's callers now
    state: str  # running, paused, promoted, rolled_back, aborted, superseded
    rules: dict[str, float]
    reason: str
    evidence: dict[str, Any]
    step_started_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, rollout: Rollout) -> RolloutOut:
        return cls(**rollout.as_dict())


class PrefetchIn(_Body):
    adapters: list[str] = Field(min_length=1, max_length=1000)
    into: CacheName = "engine"


class AdapterRefIn(_Body):
    adapter: str = Field(min_length=3)


class EvictIn(AdapterRefIn):
    # "from" is the natural word but a Python keyword; the JSON field is "from".
    where: EvictTarget = Field(default="engine", alias="from")


class GcIn(_Body):
    grace_minutes: float = Field(default=60, ge=0, le=_MAX_DAYS * 24 * 60)
    dry_run: bool = False


# -- answers -----------------------------------------------------------------------------

class TenantList(BaseModel):
    data: list[str]


class TenantOut(BaseModel):
    name: str


class KeyCreated(BaseModel):
    key: str = Field(description="The key itself: shown this once, never stored.")
    prefix: str
    expires_at: datetime | None
    note: Literal["shown once"] = "shown once"


class KeyList(BaseModel):
    data: list[ApiKeyInfo]


class Revoked(BaseModel):
    revoked: int = Field(description="How many keys were revoked.")


class AdapterList(BaseModel):
    data: list[AdapterInfo]


class AliasSet(BaseModel):
    alias: str
    version: int  # the alias's (stable) version
    weights: dict[str, int] | None = None  # its split, if it has one


class VersionCreated(BaseModel):
    version: str
    lora_int_id: int
    content_sha256: str
    files: dict[str, str]


class VersionState(BaseModel):
    version: str
    state: Literal["deprecated", "deleted"]


class AuditPage(BaseModel):
    data: list[AuditEntry]


class UsageRow(BaseModel):
    tenant: str
    model: str = Field(description="The adapter version that served (tenant/name@vN), or the base.")
    minute: datetime = Field(description="The minute's start, UTC.")
    requests_2xx: int
    requests_4xx: int
    requests_5xx: int
    aborted: int = Field(description="Answers the client left before they ended.")
    prompt_tokens: int
    completion_tokens: int


class UsagePage(BaseModel):
    data: list[UsageRow]


class QueuedJob(BaseModel):
    id: str
    tenant: str
    status: str = Field(description="validating_files, queued or running.")
    model: str
    method: str
    worker: str | None = Field(description="The worker running or validating it.")
    trained_tokens: int | None
    created_at: datetime


class JobQueueOut(BaseModel):
    """The fine-tuning queue: counts by status, and the jobs in the order workers take them."""

    depth: dict[str, int]
    data: list[QueuedJob]


class VerifyOut(BaseModel):
    checked: int
    problems: list[BlobProblem]
    repair: str


class EngineAdapter(BaseModel):
    adapter: str
    lora_int_id: int
    in_slot: bool
    pinned: bool
    in_use: int


class SlotState(BaseModel):
    capacity: int
    used: int


class EngineState(SlotState):
    adapters: list[EngineAdapter]
    loading: int


class DiskState(BaseModel):
    max_bytes: int
    bytes: int
    folders: int
    known_adapters: list[str]


class CacheState(BaseModel):
    slot: SlotState
    engine: EngineState
    disk: DiskState
    pinned: list[str]
    engine_reports: list[int] = Field(description="The lora_int_ids vLLM itself says it holds.")
    warmup_errors: dict[str, str] = Field(description="Start-up prefetches that failed: ref -> why.")


class PrefetchResult(BaseModel):
    adapter: str
    version: str | None
    was: str | None
    error: ErrorDetail | None


class PrefetchOut(BaseModel):
    into: CacheName
    data: list[PrefetchResult]
    failed: int


class PinOut(BaseModel):
    adapter: str
    pinned: Literal[True] = True
    was: str = Field(description="Where the adapter was before: a tier, or 'pinned'.")


class UnpinOut(BaseModel):
    adapter: str
    pinned: Literal[False] = False
    changed: bool


class EvictOut(BaseModel):
    adapter: str
    evicted_from: list[str]


__all__ = [
    "AdapterList",
    "AdapterRefIn",
    "AliasIn",
    "AliasSet",
    "AuditPage",
    "CacheState",
    "EvictIn",
    "EvictOut",
    "GcIn",
    "GcReport",
    "KeyCreated",
    "KeyIn",
    "KeyList",
    "LimitsIn",
    "LimitsOut",
    "PinOut",
    "PrefetchIn",
    "PrefetchOut",
    "Revoked",
    "TenantIn",
    "TenantList",
    "TenantOut",
    "UnpinOut",
    "VerifyOut",
    "VersionCreated",
    "VersionState",
]
