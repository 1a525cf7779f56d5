"""The chart's Grafana dashboards: generated (never hand-edited), every query well formed
and on a metric the gateway exports, shipped as ConfigMaps Grafana's sidecar finds.
(Every query evaluated on a real Prometheus: tests/integration/test_dashboards.py.)"""

from __future__ import annotations

import json
import re

import promql_parser
import pytest
import yaml

from gateway.observability.metrics import GatewayMetrics
from lora_gateway.dashboards import BOARDS, OUT, build, queries
from tests.helm.chart import MINIMAL, NAMESPACE, merged, render, validate

# What the gateway's /metrics carries besides GatewayMetrics: the Model Server Protocol's
# gauges (gateway.observability.msp).
MSP = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
       "vllm:cache_config_info", "vllm:lora_requests_info", "vllm:lora_adapter_loaded"}
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")


def exported() -> set[str]:
    names = set(MSP)
    for family in GatewayMetrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(
            family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


def test_the_committed_dashboards_are_what_the_builder_makes() -> None:
    files = sorted(p.name for p in OUT.glob("*.json"))
    assert files == sorted(f"{b.uid}.json" for b in BOARDS)
    for board in BOARDS:
        on_disk = json.loads((OUT / f"{board.uid}.json").read_text())
        assert on_disk == build(board), f"regenerate: python -m lora_gateway.dashboards ({board.uid})"


@pytest.mark.parametrize("board", BOARDS, ids=lambda b: b.uid)
def test_every_query_parses_and_reads_a_metric_the_gateway_exports(board) -> None:
    model = build(board)
    found = queries(model)
    assert len(found) >= 8
    known = exported()
    for title, expr in found:
        promql_parser.parse(expr.replace("$__rate_interval", "1m"))
        metrics = set(_SELECTOR.findall(expr)) - {"by", "sum", "rate"}
        assert metrics, f"{title}: no metric in {expr}"
        assert metrics <= known, f"{title}: {sorted(metrics - known)} are not exported"
        assert 'job=~"$job"' in expr and 'instance=~"$instance"' in expr, title
    variables = {v["name"] for v in model["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps([e for _, e in found]))) - {"__rate_interval"}
    assert used <= variables and "datasource" in variables
    assert {p["datasource"]["uid"] for p in model["panels"] if p["type"] != "row"} == {"${datasource}"}


def test_the_dashboards_cover_what_operators_look_for() -> None:
    text = json.dumps([queries(build(b)) for b in BOARDS])
    for metric in ("lgw_requests_total", "lgw_time_to_first_token_seconds_bucket",
                   "lgw_request_latency_seconds_bucket", "lgw_prompt_tokens_total",
                   "lgw_completion_tokens_total", "lgw_quota_rejections_total", "lgw_queue_depth",
                   "lgw_queue_wait_seconds_bucket", "lgw_adapter_requests_total",
                   "lgw_adapter_ready_seconds_bucket", "lgw_adapter_cache_entries",
                   "vllm:kv_cache_usage_perc", "lgw_ready"):
        assert metric in text, metric


def test_the_chart_ships_them_as_configmaps_for_grafanas_sidecar() -> None:
    objects = render(MINIMAL)
    maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"
            and o["metadata"]["labels"].get("grafana_dashboard") == "1"}
    assert sorted(maps) == ["lgw-lora-gateway-dashboard-adapters", "lgw-lora-gateway-dashboard-fleet",
                            "lgw-lora-gateway-dashboard-tenants"]
    for cm in maps.values():
        validate(cm, "1.34")
        assert cm["metadata"]["namespace"] == NAMESPACE
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((OUT / name).read_text())
        assert len(yaml.safe_dump(cm)) < 1024 * 1024  # a ConfigMap's limit


def test_label_namespace_annotations_and_off() -> None:
    objects = render(merged(MINIMAL, {"dashboards": {
        "label": "grafana.example.com/dashboard", "labelValue": "lora", "namespace": "monitoring",
        "annotations": {"grafana_folder": "LoRA"}}}))
    maps = [o for o in objects if o["kind"] == "ConfigMap"
            and o["metadata"]["labels"].get("grafana.example.com/dashboard") == "lora"]
    assert len(maps) == 3
    assert {m["metadata"]["namespace"] for m in maps} == {"monitoring"}
    assert all(m["metadata"]["annotations"] == {"grafana_folder": "LoRA"} for m in maps)
    off = render(merged(MINIMAL, {"dashboards": {"enabled": False}}))
    assert not [o for o in off if o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]]
