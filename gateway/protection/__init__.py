"""What keeps one tenant from hurting the others: each tenant's quotas (``quotas``: the
limits and their stores, in process or ``redis_quotas``; ``usage``: a request's metering
against them), fair admission to the engine (``admission``, with ``admission_limit``'s
latency target) and the engine's per-request priorities (``fair_share``).

A new quota kind is a limit in ``adapters_registry.limits`` plus its check here: in the
stores' admit/charge (``quotas``, ``redis_quotas``) when it is counted across replicas,
in ``usage`` when it is a per-request ceiling."""
