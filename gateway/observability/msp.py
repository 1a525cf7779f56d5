"""The Model Server Protocol: the ``vllm:*`` gauges inference routers scrape.

The Gateway API Inference Extension's endpoint picker (and llm-d's, which is built on
it) reads ``vllm:num_requests_waiting``, ``vllm:num_requests_running``,
``vllm:kv_cache_usage_perc``, ``vllm:cache_config_info`` (labels ``block_size``,
``num_gpu_blocks``) and ``vllm:lora_requests_info``; llm-d's ``lora-load-state``
scorer reads the residency gauges ``vllm:lora_adapter_loaded{adapter_name,level,pinned}``,
``vllm:num_gpu_loaded_lora_adapters`` and ``vllm:max_gpu_lora_adapters``. Every value is
read when the metrics are scraped, from two sources and nothing else:

- the engine's scheduler (``Engine.stats``: vLLM's own per-step ``SchedulerStats``, the
  numbers vLLM's api_server publishes under the same names);
- the gateway's own state: its fair admission queue, and its adapter tiers
  (``AdapterManager.residency``), which own vLLM's adapter memory.

Semantics, where the gateway differs from a bare vLLM server:

- **waiting** is the engine's waiting requests plus the requests queued in the gateway's
  fair admission (they wait for this replica just the same). A request between admission
  and the engine (its adapter loading) is in neither count.
- **running_lora_adapters** / ``level="gpu"`` is residency: the adapters in vLLM's
  ``max_loras`` batch slots, whether or not a request uses them now. vLLM itself lists
  the adapters with requests in flight there (llm-d-router #2605); a request in flight
  never makes an adapter resident here. ``level="cpu"``: in engine memory only.
- **waiting_lora_adapters**: adapters some request waits for: being made ready (fetch,
  verify, ``add_lora``) or queued in the engine's scheduler.
- ``vllm:lora_requests_info`` is one series whose value is the scrape time (routers take
  the newest series); vLLM's keeps every label set it ever showed.
- Adapter names are routing keys (docs/replicas.md, "Affinity keys"): each version as
  ``tenant/name@vN``, plus the qualified names that resolved to it on this replica.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.engine import Engine
from gateway.protection.admission import FairAdmission
from gateway.residency.manager import AdapterManager
from gateway.tenancy.directory import TenantDirectory

_ENGINE = "0"  # one engine per gateway process; vLLM labels its gauges by engine index


class ModelServerProtocol(Collector):
    def __init__(self, engine: Engine, adapters: AdapterManager, admission: FairAdmission,
                 tenants: TenantDirectory, *, model_name: str) -> None:
        self._engine = engine
        self._adapters = adapters
        self._admission = admission
        self._tenants = tenants
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        where = self._adapters.residency()
        per_engine = ["model_name", "engine"]
        labels = [self._model_name, _ENGINE]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=per_engine)
            family.add_metric(labels, value)
            return family

        yield gauge("vllm:num_requests_running", "Requests in the engine's running batch.",
                    stats.running)
        yield gauge("vllm:num_requests_waiting",
                    "Requests waiting: in the engine's queue or the gateway's admission queue.",
                    stats.waiting + self._admission.queued())
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    stats.kv_cache_usage)
        if stats.cache_config:
            info = {**stats.cache_config, "engine": _ENGINE}
            family = GaugeMetricFamily("vllm:cache_config_info",
                                       "Information of the LLMEngine CacheConfig", labels=list(info))
            family.add_metric(list(info.values()), 1)
            yield family

        running = self._keys(v.ref for v, _ in where.gpu)
        waiting = self._keys(sorted({v.ref for v in where.loading} | stats.waiting_adapters))
        info_family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "LoRA adapters in the batch slots (running) and awaited (waiting); value: "
            "the time of this report.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info_family.add_metric([str(where.slot_capacity), ",".join(running), ",".join(waiting)],
                               time.time())
        yield info_family

        loaded = GaugeMetricFamily("vllm:lora_adapter_loaded",
                                   "1 per adapter resident in vLLM: level gpu (batch slot) or "
                                   "cpu (engine memory).",
                                   labels=["model_name", "adapter_name", "level", "pinned"])
        for level, residents in (("gpu", where.gpu), ("cpu", where.cpu)):
            for version, pinned in residents:
                for key in self._keys([version.ref]):
                    loaded.add_metric([self._model_name, key, level, str(pinned).lower()], 1)
        yield loaded
        yield gauge("vllm:num_gpu_loaded_lora_adapters", "Adapter versions in batch slots.",
                    len(where.gpu))
        yield gauge("vllm:num_cpu_loaded_lora_adapters",
                    "Adapter versions in engine memory, not in a batch slot.", len(where.cpu))
        yield gauge("vllm:max_gpu_lora_adapters", "Batch slots for adapters (max_loras).",
                    where.slot_capacity)

    def _keys(self, refs: Iterable[str]) -> list[str]:
        return [k for ref in refs for k in self._tenants.affinity_keys(ref)]
