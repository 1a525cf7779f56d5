"""loadtest: an HTTP client that measures a gateway (or vLLM's server) from outside.

``client`` sends one streamed request and records what came back (time to first token,
the tier header, errors); ``runner`` drives a scenario's load (closed or open loop) and
prepares the caches it needs through the admin API; ``report`` summarises a run;
``servers`` starts the processes the benchmarks compare; ``cli`` is ``lora-gateway loadtest``.
It imports nothing of ours: it sees the gateway only as HTTP.
"""

__all__: list[str] = []  # nothing: other parts reach it only as the ``lora-gateway loadtest`` command
