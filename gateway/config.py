"""Gateway settings: one validated object, built at the entry point and passed in."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ByteSize, Field, SecretStr, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters_registry import LIMITS
from gateway.observability.logs import LogFormat

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
LoraRank = Literal[8, 16, 32, 64, 128, 256, 512]  # the ranks vLLM accepts
# How an English refusal opens; rollouts compare its rate between versions, not its truth.
DEFAULT_REFUSAL_PATTERN = (r"\s*(I'?m sorry|I am sorry|sorry, (but )?I|I apologi[sz]e|I can(no|')t "
                           r"(help|assist|do|provide|answer)|I'?m (not able|unable) to|"
                           r"I am (not able|unable) to|I won'?t|As an AI)")


class _Settings(BaseSettings):
    """Every knob of one gateway process. Environment variables use the ``LGW_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="LGW_", extra="forbid")

    database_url: str = Field(description="SQLAlchemy URL of the registry database.")
    artifacts_dir: str = Field(description="The registry's artifacts: a folder or s3://bucket/prefix.")
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (non-AWS servers).")
    s3_region: str = "us-east-1"
    cache_dir: Path = Field(description="Local, verified, content-addressed adapter cache.")
    base_model_id: str = Field(description="Registered base this gateway serves.")
    base_model_dir: Path = Field(description="Its checkpoint; must match the registered contract.")
    served_base_name: str | None = Field(
        default=None, description="`model` name for the bare base (default: base_model_id)."
    )
    expose_base: bool = Field(default=True, description="Let tenants call the bare base.")
    tool_call_parser: str | None = Field(
        default=None, description="vLLM tool parser for this base's chat template (e.g. hermes "
        "for Qwen2.5-style ChatML); unset: requests with tools are refused (400).")
    stored_responses: int = Field(
        default=1000, ge=0, description="Responses (`/v1/responses` with `store`, OpenAI's "
        "default) kept in this replica's memory for retrieval and `previous_response_id`, "
        "each visible to its tenant only; past it the oldest is forgotten. 0: store none (as "
        "vLLM's server by default). Not shared between replicas.")
    fine_tuning_template: str | None = Field(
        default=None, description="Template id fine-tuning jobs from the bare base train (every "
        "job's adapter has its shape); unset: the base's first registered template, its frozen one.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve /metrics on this port only (not to "
        "tenants on the API port); unset: /metrics on the API port.")
    metrics_host: str | None = Field(default=None, description="Address of the metrics port "
                                     "(default: host).")
    replica_name: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$",
        description="Returned on every answer as x-lora-gateway-replica, so a client behind a "
        "router can tell which replica served it (default: the host name, a pod's name).")
    log_format: LogFormat = Field(
        default="text", description="Log lines as text, or one JSON object per line with the "
        "request id, tenant, adapter version, tier, status and tokens (never keys or prompts).")
    drain_grace_seconds: float = Field(
        default=30.0, ge=0, description="On SIGTERM: readiness fails at once, requests in flight "
        "get this long to finish, then the process exits.")
    dtype: Dtype = "bfloat16"
    max_model_len: int = Field(default=2048, ge=16)
    max_num_seqs: int = Field(default=16, ge=1)
    max_loras: int = Field(default=4, ge=1, description="Adapters active in one batch (vLLM).")
    max_cpu_loras: int = Field(default=16, ge=1, description="Adapters held in engine memory.")
    max_lora_rank: LoraRank = Field(default=16, description="Largest adapter rank the engine takes.")
    cpu_kvcache_space_gib: int | None = Field(
        default=1, ge=1, description="vLLM CPU backend KV cache in GiB (VLLM_CPU_KVCACHE_SPACE, "
        "unless already set); ignored on GPUs.")
    disk_cache_max_bytes: ByteSize = Field(
        default=ByteSize(10 << 30), ge=1 << 20,
        description="Budget of the local adapter cache (e.g. 10GiB); LRU by bytes, never evicting "
        "an adapter in use, pinned or in engine memory.")
    pinned_adapters: list[str] = Field(
        default_factory=list, description="tenant/name[:alias|@vN] refs loaded at start and never "
        "evicted (JSON list in the environment).")
    prefetch_adapters: list[str] = Field(
        default_factory=list, description="Refs loaded into engine memory at start (evictable).")
    adapter_load_concurrency: int = Field(
        default=8, ge=1, description="Cold adapter loads (fetch, verify, add to the engine) run in "
        "parallel up to this many; 1 serialises them. A load waiting for an engine slot does not "
        "count.")
    adapter_slot_wait_seconds: float = Field(
        default=10.0, ge=0, description="How long a request for an adapter not in engine memory "
        "waits for a slot while every slot holds an adapter serving requests (none is ever "
        "evicted from under a request); past it, or at once with 0: 503 with Retry-After.")
    resolve_ttl_seconds: float = Field(
        default=2.0, ge=0, description="How long a name→version resolution or a key is cached."
    )
    usage_flush_seconds: float = Field(
        default=10.0, ge=0.1, le=3600, description="How often this replica writes its usage ledger "
        "(requests and tokens per tenant, model and minute) to the registry database; a replica "
        "killed without a shutdown loses at most this much.")
    rollout_decide_seconds: float = Field(
        default=5.0, ge=0, le=3600, description="How often this replica offers to judge running "
        "rollouts (one replica at a time holds the decision lease); 0: never.")
    refusal_pattern: str = Field(
        default=DEFAULT_REFUSAL_PATTERN, max_length=2000,
        description="A regular expression (Python, case-insensitive) matched at the start of "
        "each whole answer's first 160 characters: a match counts the answer as a refusal in "
        "its version's figures, which rollouts compare (max_refusal_rate_increase); empty: "
        "nothing is counted as one.")
    shadow_max_in_flight: int = Field(
        default=1, ge=0, le=64, description="Rollout shadow comparisons this replica runs at "
        "once (each: the stable and the candidate version answering one request again, "
        "greedily, only when no request waits and a slot is free); 0: this replica runs none.")
    shadow_max_tokens: int = Field(
        default=64, ge=1, le=4096, description="Longest answer of a shadow comparison, in tokens.")
    registry_outage_grace_seconds: float = Field(
        default=600.0, ge=0, description="While the registry database cannot be reached, keys, "
        "names and limits it answered before are used this long past resolve_ttl_seconds (nobody "
        "can change them in a database that is away); 0: every lookup after the TTL fails with "
        "503 until it is back.")
    registry_changes_channel: bool = Field(
        default=True, description="On a PostgreSQL registry: listen for its change notices "
        "(LISTEN/NOTIFY), so alias moves, deletions, key revocations and limit changes reach "
        "this replica at once; off, or on SQLite: within resolve_ttl_seconds.")
    registry_changes_retry_seconds: float = Field(
        default=1.0, gt=0, le=30, description="First reconnection delay after the change channel "
        "drops; doubles per failed attempt, up to 30 s.")
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    admin_api_key: SecretStr | None = Field(
        default=None, min_length=32,
        description="Bearer key of the admin API (/admin/v1); unset disables it.")
    exit_on_engine_death: bool = Field(
        default=True, description="Exit the process when the engine dies (the supervisor restarts it)."
    )
    startup_wait_seconds: float = Field(
        default=300.0, ge=0, description="How long a starting gateway waits for a registry database "
        "it cannot reach (a replica starting while PostgreSQL restarts), saying so at each try, "
        "before it gives up; 0: not at all.")
    migrate_on_start: bool = Field(
        default=True, description="Bring the registry database's schema up to date at start; "
        "off when migrations run once per release (`lora-gateway registry migrate`, Helm hook).")
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="Fraction of GPU memory the engine may use (vLLM).")
    redis_url: SecretStr | None = Field(
        default=None, description="Redis URL for quotas and cross-replica invalidation (optional for "
        "one process).")
    # Quotas: default_<limit>, one for every tenant limit, are added below (_with_limit_defaults).
    quota_failure_mode: Literal["open", "closed"] = Field(
        default="open", description="When Redis fails: 'open' serves without quotas (logged and "
        "metered), 'closed' answers 503 with Retry-After.")
    fair_scheduling: bool = Field(default=True, description="Serve waiting requests by tenant "
                                  "weight; off: first come, first served.")
    engine_priority: bool = Field(
        default=True, description="With fair_scheduling: the engine runs vLLM's priority "
        "scheduling policy and each request carries its tenant's fair share in tokens, so a "
        "light tenant's request goes ahead of a heavy tenant's waiting in the engine (and the "
        "heavy tenant's is preempted first when the KV cache runs short); off: the engine's "
        "own queue is first come, first served.")
    admission_max_in_flight: int | None = Field(
        default=None, ge=1, description="Requests generating at once; the rest wait in per-tenant "
        "queues (default: max_num_seqs).")
    admission_tpot_target_ms: float | None = Field(
        default=None, gt=0, description="Adapt how many requests generate at once (up to "
        "admission_max_in_flight) to keep the time per output token near this target: fewer "
        "sequences per engine step make every step, and a newcomer's first token, faster, at "
        "the cost of throughput (unset: a fixed limit, the most throughput).")
    queue_max_per_tenant: int = Field(default=64, ge=0, description="Requests one tenant may have "
                                      "waiting; past it: 429 with Retry-After at once.")
    queue_max_total: int = Field(default=256, ge=0, description="Requests waiting in all; past it: "
                                 "503 with Retry-After at once.")
    queue_deadline_seconds: float = Field(default=30.0, gt=0, description="Longest wait for the "
                                          "engine; past it: 503 with Retry-After.")

    @field_validator("refusal_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"refusal_pattern is not a regular expression: {exc}") from None
        return value

    @property
    def refusal(self) -> re.Pattern[str] | None:
        return re.compile(self.refusal_pattern, re.IGNORECASE) if self.refusal_pattern else None

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("metrics_port must differ from port")
        if len(set(self.pinned_adapters)) >= self.max_cpu_loras:
            raise ValueError(f"{len(set(self.pinned_adapters))} pinned adapters need max_cpu_loras "
                             "above that: one engine slot must stay free for the others")
        return self

    @property
    def max_in_flight(self) -> int:
        return self.admission_max_in_flight or self.max_num_seqs

    @property
    def scheduling_policy(self) -> Literal["fcfs", "priority"]:
        """vLLM's scheduling policy for this gateway's engine."""
        return "priority" if self.fair_scheduling and self.engine_priority else "fcfs"

    @property
    def base_name(self) -> str:
        return self.served_base_name or self.base_model_id


def _with_limit_defaults(settings: type[_Settings]) -> type[_Settings]:
    """``settings`` plus ``default_<name>`` for every tenant limit (``adapters_registry.limits``):
    what applies to a tenant whose own limits (``registry set-limits``) leave it unset."""
    fields: dict[str, Any] = {}
    for spec in LIMITS:
        unset = "unlimited" if spec.default is None else f"{spec.default:g}"
        kind = spec.kind if spec.default is not None else spec.kind | None
        fields[f"default_{spec.name}"] = (kind, Field(
            default=spec.default, **spec.bounds(),
            description=f"Per tenant: {spec.help}, unless the registry sets its own "
                        f"(unset: {unset})."))
    return create_model("GatewaySettings", __base__=settings, __module__=__name__,
                        __doc__=settings.__doc__, **fields)


if TYPE_CHECKING:
    GatewaySettings = _Settings
else:
    GatewaySettings = _with_limit_defaults(_Settings)
