"""Prometheus metrics, on a registry owned by one app (no process globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Every answer of the inference API by HTTP status, or "aborted" (client went away).
        self.requests = Counter("lgw_requests", "Inference API answers by status.",
                                ["tenant", "adapter", "status"], registry=r)
        # The same answers of adapter requests by the version that served ("v3"; "base" where
        # an alias's weighted split sent the caller to the bare base).
        self.version_requests = Counter("lgw_adapter_version_requests",
                                        "Adapter requests by the version that served and status.",
                                        ["tenant", "adapter", "version", "status"], registry=r)
        self.rollout_decisions = Counter(
            "lgw_rollout_decisions", "Rollout decisions this replica made (it held the lease), "
            "by the state they left: running (a step up), promoted, rolled_back, superseded.",
            ["tenant", "adapter", "alias", "state"], registry=r)
        # Every replica shows every active rollout's step, whoever holds the decision lease.
        self.rollout_percent = Gauge(
            "lgw_rollout_candidate_percent", "An active rollout's candidate share of the alias's "
            "callers now (its step), by state (running or paused); gone once it ends.",
            ["tenant", "adapter", "alias", "candidate", "state"], registry=r)
        self.shadow_comparisons = Counter(
            "lgw_shadow_comparisons", "A rollout's shadow comparisons (gateway.engine.shadow) by "
            "outcome: compared, skipped (no spare capacity), failed, timeout.",
            ["tenant", "adapter", "outcome"], registry=r)
        self.prompt_tokens = Counter("lgw_prompt_tokens", "Prompt tokens.",
                                     ["tenant", "adapter"], registry=r)
        self.completion_tokens = Counter("lgw_completion_tokens", "Completion tokens.",
                                         ["tenant", "adapter"], registry=r)
        self.ttft = Histogram("lgw_time_to_first_token_seconds", "Time to first token.",
                              ["tenant", "adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lgw_request_latency_seconds", "End-to-end request latency.",
                             ["tenant", "adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("lgw_requests_in_flight", "Requests being served.", registry=r)
        # Per request: the tier that served its adapter (slot_hit, engine_hit, disk_hit, remote_fetch).
        self.adapter_requests = Counter("lgw_adapter_requests", "Adapter requests by serving tier.",
                                        ["tier"], registry=r)
        self.adapter_ready_seconds = Histogram("lgw_adapter_ready_seconds",
                                               "Time to make a request's adapter ready, by tier.",
                                               ["tier"], buckets=_LATENCY_BUCKETS, registry=r)
        # Per cache (slot, engine, disk): what each LRU did.
        self.cache_hits = Counter("lgw_adapter_cache_hits", "Adapter cache hits.", ["cache"], registry=r)
        self.cache_misses = Counter("lgw_adapter_cache_misses", "Adapter cache misses.", ["cache"],
                                    registry=r)
        self.cache_loads = Counter("lgw_adapter_cache_loads", "Adapters loaded into a cache.", ["cache"],
                                   registry=r)
        self.cache_load_seconds = Histogram("lgw_adapter_cache_load_seconds",
                                            "Time to load an adapter into a cache.", ["cache"],
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.cache_evictions = Counter("lgw_adapter_cache_evictions", "Adapters evicted from a cache.",
                                       ["cache"], registry=r)
        self.cache_entries = Gauge("lgw_adapter_cache_entries", "Adapters held by a cache.", ["cache"],
                                   registry=r)
        self.disk_cache_bytes = Gauge("lgw_adapter_disk_cache_bytes",
                                      "Bytes of verified adapters on local disk.", registry=r)
        self.pinned = Gauge("lgw_adapter_pinned", "Adapters pinned in engine memory.", registry=r)
        # The Model Server Protocol's vllm:* gauges are gateway.observability.msp's, registered by the app.
        self.ready = Gauge("lgw_ready", "1 when the engine serves requests.", registry=r)
        # Quotas and fair admission.
        self.quota_rejections = Counter("lgw_quota_rejections", "Requests refused by a tenant's limit.",
                                        ["tenant", "limit"], registry=r)
        self.quota_backend_errors = Counter(
            "lgw_quota_backend_errors", "Quota store (Redis) failures, by what the gateway did.",
            ["outcome"], registry=r)
        self.queue_depth = Gauge("lgw_queue_depth", "Requests waiting for the engine.", ["tenant"],
                                 registry=r)
        self.queue_wait = Histogram("lgw_queue_wait_seconds", "Time waited for the engine.",
                                    ["tenant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_rejections = Counter("lgw_queue_rejections", "Requests refused by admission.",
                                        ["tenant", "reason"], registry=r)
        self.admitted = Gauge("lgw_admitted_in_flight", "Requests holding an engine slot.",
                              registry=r)
        self.admission_limit = Gauge("lgw_admission_limit", "Engine slots requests may hold now "
                                     "(below the configured limit while a latency target "
                                     "holds requests back).", registry=r)
        # Registry changes pushed to this replica (gateway.tenancy.invalidation).
        self.invalidation_channel_up = Gauge(
            "lgw_invalidation_channel_up", "1 while the registry change channel is connected, 0 "
            "while down (caches then rely on the resolve TTL); absent when there is none.",
            ["channel"], registry=r)
        self.invalidation_notices = Counter(
            "lgw_invalidation_notices", "Registry change notices applied, by kind ('all' on each "
            "channel (re)connection, 'unreadable' for a notice that could not be parsed).",
            ["kind"], registry=r)
