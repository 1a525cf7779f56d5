"""Reading the Model Server Protocol's gauges as a router does (unit and integration tests)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

MSP_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
              "vllm:cache_config_info", "vllm:lora_requests_info", "vllm:lora_adapter_loaded",
              "vllm:num_gpu_loaded_lora_adapters", "vllm:max_gpu_lora_adapters")


def scrape(text: str) -> dict[str, list[Sample]]:
    """Every family of a /metrics text by name, each a gauge, with its samples."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in MSP_GAUGES:
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == "gauge", f"{name} is a {families[name].type}"
    return {name: f.samples for name, f in families.items()}


def value(samples: dict[str, list[Sample]], name: str) -> float:
    """The value of a gauge that must have exactly one series (as the picker reads it)."""
    assert len(samples[name]) == 1, samples[name]
    return samples[name][0].value


def lora_info(samples: dict[str, list[Sample]]) -> tuple[int, list[str], list[str], float]:
    """The newest ``vllm:lora_requests_info`` series, parsed as GIE's picker does:
    (max_lora, running adapters, waiting adapters, timestamp value)."""
    newest = max(samples["vllm:lora_requests_info"], key=lambda s: s.value)
    labels = newest.labels

    def names(csv: str) -> list[str]:
        return [n.strip() for n in csv.split(",") if n.strip()]

    return (int(labels["max_lora"]), names(labels["running_lora_adapters"]),
            names(labels["waiting_lora_adapters"]), newest.value)


def loaded(samples: dict[str, list[Sample]]) -> dict[str, tuple[str, str]]:
    """adapter_name -> (level, pinned) from ``vllm:lora_adapter_loaded`` (value 1 each)."""
    out = {}
    for s in samples["vllm:lora_adapter_loaded"]:
        assert s.value == 1, s
        assert s.labels["adapter_name"] not in out, f"{s.labels['adapter_name']} listed twice"
        out[s.labels["adapter_name"]] = (s.labels["level"], s.labels["pinned"])
    return out
