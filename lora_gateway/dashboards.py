"""The Grafana dashboards the chart ships, built with Grafana's own foundation SDK.

    python -m lora_gateway.dashboards [--out helm/lora-gateway/dashboards]

writes one JSON file per dashboard; the chart turns each into a ConfigMap labelled for
Grafana's dashboard sidecar (``dashboards.*`` values). The files are generated, never
edited: tests/helm/test_dashboards.py fails when they differ from what this module builds,
and tests/integration/test_dashboards.py evaluates every panel's query on a real Prometheus
scraping a live gateway.

- **Tenants**: per tenant and adapter, requests, errors by status, TTFT and latency
  percentiles, tokens, quota refusals, queue depth, waits and refusals.
- **Adapters and engine**: the tier that served each adapter, cold-load latency,
  residency (engine slots, CPU cache, disk), the engine's KV cache and batch, admission.
- **Fleet**: every replica side by side: readiness, traffic, TTFT, KV usage, queues, and
  the health of the quota store and the registry change channel.

Every query is filtered by the dashboard's ``job`` and ``instance`` variables (a replica
is an ``instance``), so one Grafana serves several releases.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "helm" / "lora-gateway" / "dashboards"
RATE = "[$__rate_interval]"
SEL = 'job=~"$job", instance=~"$instance"'
TENANT_SEL = f'{SEL}, tenant=~"$tenant"'
ADAPTER_SEL = f'{TENANT_SEL}, adapter=~"$adapter"'
NOT_2XX = f'{ADAPTER_SEL}, status!~"2.."'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    stat: bool = False  # one number (a stat panel), else a time series
    stacked: bool = False


@dataclass(frozen=True)
class Board:
    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[Chart, ...]], ...]
    tenant_variables: bool = False


def _rate(metric: str, by: str, sel: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{sel}}}{RATE}))"


def _quantile(q: float, metric: str, by: str, sel: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}{RATE})))"


def _percentiles(metric: str, by: str, sel: str, legend: str) -> tuple[Query, ...]:
    return (Query(_quantile(0.5, metric, by, sel), f"p50 {legend}"),
            Query(_quantile(0.99, metric, by, sel), f"p99 {legend}"))


TA = "{{tenant}}/{{adapter}}"
TENANTS = Board(
    "lora-gateway-tenants", "lora-gateway / Tenants",
    "Per tenant and adapter: traffic, errors, latency, tokens, quotas and fair admission.",
    (("Traffic", (
        Chart("Requests by tenant and adapter", "reqps",
              (Query(_rate("lgw_requests_total", "tenant, adapter", ADAPTER_SEL), TA),),
              "Every answer of the inference API, whatever its status."),
        Chart("Requests by adapter version", "reqps",
              (Query(_rate("lgw_adapter_version_requests_total", "tenant, adapter, version",
                           ADAPTER_SEL), "{{tenant}}/{{adapter}} {{version}}"),),
              "The version that served each request: an alias's weighted split (canary, A/B) "
              "shows one series per version ('base': the split's share of the bare base)."),
        Chart("Errors by status", "reqps",
              (Query(_rate("lgw_requests_total", "tenant, status", NOT_2XX),
                     "{{tenant}} {{status}}"),),
              "Answers that were not 2xx; 'aborted': the client left before the answer was "
              "complete."),
        Chart("Share of answers that were not 2xx", "percentunit",
              (Query(f'{_rate("lgw_requests_total", "tenant", NOT_2XX)} / '
                     f'{_rate("lgw_requests_total", "tenant", ADAPTER_SEL)}', "{{tenant}}"),)),
    )), ("Latency", (
        Chart("Time to first token", "s",
              _percentiles("lgw_time_to_first_token_seconds", "tenant, adapter", ADAPTER_SEL, TA),
              "From the gateway taking the request (after admission) to the engine's first token."),
        Chart("Request latency (answered 200)", "s",
              _percentiles("lgw_request_latency_seconds", "tenant, adapter", ADAPTER_SEL, TA)),
    )), ("Tokens", (
        Chart("Prompt tokens", "short",
              (Query(_rate("lgw_prompt_tokens_total", "tenant, adapter", ADAPTER_SEL), TA),),
              "Per second."),
        Chart("Completion tokens", "short",
              (Query(_rate("lgw_completion_tokens_total", "tenant, adapter", ADAPTER_SEL), TA),),
              "Per second."),
    )), ("Quotas and fair admission", (
        Chart("Quota refusals by limit", "reqps",
              (Query(_rate("lgw_quota_rejections_total", "tenant, limit", TENANT_SEL),
                     "{{tenant}} {{limit}}"),),
              "Requests refused (429) by one of the tenant's limits."),
        Chart("Waiting for the engine", "short",
              (Query(f"sum by (tenant) (lgw_queue_depth{{{TENANT_SEL}}})", "{{tenant}}"),),
              "Requests queued at the gateway's fair admission."),
        Chart("Wait for an engine slot", "s",
              _percentiles("lgw_queue_wait_seconds", "tenant", TENANT_SEL, "{{tenant}}")),
        Chart("Admission refusals by reason", "reqps",
              (Query(_rate("lgw_queue_rejections_total", "tenant, reason", TENANT_SEL),
                     "{{tenant}} {{reason}}"),),
              "Queue full, or the queue deadline passed."),
    ))),
    tenant_variables=True)

ADAPTERS = Board(
    "lora-gateway-adapters", "lora-gateway / Adapters and engine",
    "Where each request's adapter came from, what loading costs, what is resident, and the "
    "engine's batch and KV cache.",
    (("Adapter tiers", (
        Chart("Requests by adapter tier", "reqps",
              (Query(_rate("lgw_adapter_requests_total", "tier", SEL), "{{tier}}"),),
              "slot_hit: already in an engine batch slot; engine_hit: in engine (CPU) memory; "
              "disk_hit: verified on local disk; remote_fetch: fetched from the store.",
              stacked=True),
        Chart("Time to make the adapter ready", "s",
              _percentiles("lgw_adapter_ready_seconds", "tier", SEL, "{{tier}}"),
              "Cold-load latency as a request saw it, by the tier that served it."),
        Chart("Load time by cache", "s",
              _percentiles("lgw_adapter_cache_load_seconds", "cache", SEL, "{{cache}}")),
    )), ("Residency", (
        Chart("Adapters held", "short",
              (Query(f"sum by (cache) (lgw_adapter_cache_entries{{{SEL}}})", "{{cache}}"),
               Query(f"sum(lgw_adapter_pinned{{{SEL}}})", "pinned"))),
        Chart("Cache hits and misses", "ops",
              (Query(_rate("lgw_adapter_cache_hits_total", "cache", SEL), "hit {{cache}}"),
               Query(_rate("lgw_adapter_cache_misses_total", "cache", SEL), "miss {{cache}}"))),
        Chart("Evictions", "ops",
              (Query(_rate("lgw_adapter_cache_evictions_total", "cache", SEL), "{{cache}}"),)),
        Chart("Verified adapters on local disk", "bytes",
              (Query(f"sum by (instance) (lgw_adapter_disk_cache_bytes{{{SEL}}})", "{{instance}}"),)),
    )), ("Engine", (
        Chart("KV cache usage", "percentunit",
              (Query(f"max by (instance) (vllm:kv_cache_usage_perc{{{SEL}}})", "{{instance}}"),)),
        Chart("Engine batch", "short",
              (Query(f"sum(vllm:num_requests_running{{{SEL}}})", "running"),
               Query(f"sum(vllm:num_requests_waiting{{{SEL}}})", "waiting"))),
        Chart("Admission", "short",
              (Query(f"sum(lgw_admitted_in_flight{{{SEL}}})", "holding an engine slot"),
               Query(f"sum(lgw_admission_limit{{{SEL}}})", "limit"),
               Query(f"sum(lgw_requests_in_flight{{{SEL}}})", "being served"))),
    ))))

FLEET = Board(
    "lora-gateway-fleet", "lora-gateway / Fleet",
    "Every replica side by side.",
    (("Replicas", (
        Chart("Ready replicas", "short",
              (Query(f"sum(lgw_ready{{{SEL}}})", "ready"),), stat=True),
        Chart("Requests per replica", "reqps",
              (Query(_rate("lgw_requests_total", "instance", SEL), "{{instance}}"),)),
        Chart("Time to first token p99 per replica", "s",
              (Query(_quantile(0.99, "lgw_time_to_first_token_seconds", "instance", SEL),
                     "{{instance}}"),)),
        Chart("KV cache usage per replica", "percentunit",
              (Query(f"max by (instance) (vllm:kv_cache_usage_perc{{{SEL}}})", "{{instance}}"),)),
        Chart("Queued per replica", "short",
              (Query(f"sum by (instance) (lgw_queue_depth{{{SEL}}})", "{{instance}}"),
               Query(f"sum by (instance) (vllm:num_requests_waiting{{{SEL}}})",
                     "{{instance}} in the engine"))),
    )), ("Dependencies", (
        Chart("Quota store failures", "ops",
              (Query(f"{_rate('lgw_quota_backend_errors_total', 'instance, outcome', SEL)}"
                     f" or sum by (instance) (lgw_ready{{{SEL}}}) * 0", "{{instance}} {{outcome}}"),),
              "Redis errors by what the gateway did (fail open or closed); 0 while none."),
        Chart("Registry changes applied", "ops",
              (Query(_rate("lgw_invalidation_notices_total", "instance, kind", SEL),
                     "{{instance}} {{kind}}"),),
              "Notices pushed by the registry (PostgreSQL LISTEN/NOTIFY); 'all' on each "
              "(re)connection."),
        Chart("Registry change channel up", "short",
              (Query(f"min by (instance) (lgw_invalidation_channel_up{{{SEL}}})", "{{instance}}"),),
              "0 while the channel is down: caches then rely on the resolve TTL."),
    ))))

BOARDS = (TENANTS, ADAPTERS, FLEET)


def build(board: Board) -> dict[str, Any]:
    """The dashboard's JSON model, as Grafana imports it."""
    from grafana_foundation_sdk.builders import prometheus, stat, timeseries
    from grafana_foundation_sdk.builders.common import StackingConfig
    from grafana_foundation_sdk.builders.dashboard import (
        Dashboard,
        DatasourceVariable,
        QueryVariable,
        Row,
    )
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.common import StackingMode
    from grafana_foundation_sdk.models.dashboard import (
        DataSourceRef,
        VariableOption,
        VariableRefresh,
    )

    source = DataSourceRef(type_val="prometheus", uid="${datasource}")

    def variable(name: str, label: str, query: str) -> QueryVariable:
        return (QueryVariable(name).label(label).datasource(source).query(query)
                .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
                .all_value(".*").current(VariableOption(selected=True, text="All", value="$__all")))

    dash = (Dashboard(board.title).uid(board.uid).description(board.description)
            .tags(["lora-gateway", "generated"]).refresh("30s").time("now-1h", "now")
            .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
            .with_variable(variable("job", "Job", "label_values(lgw_ready, job)"))
            .with_variable(variable("instance", "Replica",
                                    'label_values(lgw_ready{job=~"$job"}, instance)')))
    if board.tenant_variables:
        dash = (dash.with_variable(variable("tenant", "Tenant",
                                            f"label_values(lgw_requests_total{{{SEL}}}, tenant)"))
                .with_variable(variable("adapter", "Adapter", "label_values(lgw_requests_total"
                                        f"{{{TENANT_SEL}}}, adapter)")))
    for row, charts in board.rows:
        dash = dash.with_row(Row(row))
        for chart in charts:
            panel: Any = stat.Panel() if chart.stat else timeseries.Panel()
            panel = (panel.title(chart.title).unit(chart.unit).datasource(source)
                     .height(4 if chart.stat else 8).span(6 if chart.stat else 12))
            if chart.description:
                panel = panel.description(chart.description)
            if chart.stacked:
                panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL))
            for ref, query in zip("ABCDEFGH", chart.queries, strict=False):
                panel = panel.with_target(prometheus.Dataquery().expr(query.expr)
                                          .legend_format(query.legend).ref_id(ref).datasource(source))
            dash = dash.with_panel(panel)
    built: dict[str, Any] = json.loads(json.dumps(dash.build(), cls=JSONEncoder))
    return built


def queries(model: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title · query ref, expression) of every query in a dashboard's JSON model."""
    return [(f"{panel['title']} · {target['refId']}", target["expr"])
            for panel in model.get("panels", []) for target in panel.get("targets", [])]


def write(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for board in BOARDS:
        path = out / f"{board.uid}.json"
        path.write_text(json.dumps(build(board), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"folder for the JSON files (default {OUT})")
    args = p.parse_args(argv)
    for path in write(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
