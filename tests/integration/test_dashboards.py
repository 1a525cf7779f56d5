"""Every panel of the chart's Grafana dashboards, evaluated on a real Prometheus (Debian's
``prometheus``) scraping a live gateway (real vLLM on the CPU, registry on PostgreSQL)
after a short mixed load: each query parses and returns data, each variable has values.

The table of every query with its result count is written to
.cache/reports/dashboard-queries.md (and printed).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from adapters_registry import Registry, TenantLimits
from loadtest.servers import ServerProcess, start
from lora_gateway.dashboards import BOARDS, build, queries
from tests.conftest import PROMPTS, REPO, populate
from tests.integration.conftest import free_port, start_gateway, tiny_serve_args

pytestmark = pytest.mark.integration
REPORT = REPO / ".cache" / "reports" / "dashboard-queries.md"
SCRAPE_S = 1
# What Grafana puts in place of the dashboard's variables when "All" is chosen.
ALL = {"$job": ".*", "$instance": ".*", "$tenant": ".*", "$adapter": ".*",
       "$__rate_interval": "2m"}


def start_prometheus(root: Path, target: str) -> ServerProcess:
    binary = shutil.which("prometheus")
    assert binary, "no prometheus binary: `./dev test` installs Debian's `prometheus` package"
    config = root / "prometheus.yml"
    config.write_text(f"global: {{scrape_interval: {SCRAPE_S}s, evaluation_interval: {SCRAPE_S}s}}\n"
                      "scrape_configs:\n  - job_name: lora-gateway\n"
                      f"    static_configs: [{{targets: ['{target}']}}]\n")
    port = free_port()
    return start([binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                 root / "prometheus.log", port=port, ready_path="/-/ready")


def mixed_load(url: str, keys: dict[str, str]) -> dict[str, int]:
    """Streams and plain answers for two tenants, a 404, an aborted stream, quota refusals
    (globex's rpm), admission refusals (a burst past the queue), adapters evicted."""
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def chat(tenant: str, model: str, stream: bool = False, max_tokens: int = 8) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}],
                "max_tokens": max_tokens, "stream": stream}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120,
                       headers={"Authorization": f"Bearer {keys[tenant]}"})
        with lock:
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

    for i in range(4):  # one engine slot, one adapter slot: each switch evicts
        chat("acme", "support-bot", stream=i % 2 == 0)
        chat("globex", "pirate", stream=i % 2 == 1)
    chat("acme", "no-such-adapter")
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {keys['acme']}"},
                      json={"model": "support-bot", "stream": True, "max_tokens": 200,
                            "messages": [{"role": "user", "content": PROMPTS[1]}]}) as r:
        next(r.iter_lines())  # the client leaves after the first event
    burst = [threading.Thread(target=chat, args=("acme", "support-bot", False, 32)) for _ in range(6)]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    for _ in range(3):  # past globex's requests per minute
        chat("globex", "pirate")
    return statuses


def scrapes(prometheus: str) -> int:
    answer = httpx.get(prometheus + "/api/v1/query", params={"query": "count_over_time(up[10m])"},
                       timeout=30).json()
    return int(float(answer["data"]["result"][0]["value"][1])) if answer["data"]["result"] else 0


def scraped_after(prometheus: str, more: int, deadline_s: float = 90.0) -> None:
    """Wait for ``more`` scrapes past now: Prometheus's scrape loop keeps its own time (on a
    busy machine its first scrapes came seconds late, and a fixed sleep left one sample)."""
    target = scrapes(prometheus) + more
    deadline = time.monotonic() + deadline_s
    while scrapes(prometheus) < target:
        assert time.monotonic() < deadline, f"Prometheus scraped {scrapes(prometheus)} times, not {target}"
        time.sleep(SCRAPE_S / 2)


def evaluate(prometheus: str, expr: str) -> tuple[str, int]:
    for name, value in ALL.items():
        expr = expr.replace(name, value)
    answer = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=30).json()
    if answer["status"] != "success":
        return f"error: {answer.get('error')}", 0
    return "ok", len(answer["data"]["result"])


def variable_values(prometheus: str, query: str) -> int:
    """Grafana's ``label_values(selector, label)``, through Prometheus's label API."""
    inner = query.removeprefix("label_values(").removesuffix(")")
    selector, _, label = inner.rpartition(",")
    params = {"match[]": selector.strip()} if selector else {}
    for name, value in ALL.items():
        params = {k: v.replace(name, value) for k, v in params.items()}
    if not selector:  # label_values(label)
        label = inner
    answer = httpx.get(f"{prometheus}/api/v1/label/{label.strip()}/values", params=params,
                       timeout=30).json()
    return len(answer["data"])


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_every_dashboard_query_returns_data_from_a_live_gateway(
        tmp_path, db_url, tiny_base, tiny_contract, tiny_template, trained_adapters) -> None:
    registry = Registry.open(db_url, tmp_path / "artifacts")
    keys = populate(registry, tiny_contract, tiny_template, trained_adapters)
    registry.set_limits("globex", TenantLimits(rpm=6))
    metrics_port = free_port()
    gateway = start_gateway(
        tiny_serve_args(tmp_path, db_url, tiny_base.path, tiny_contract, "--max-loras", "1",
                        "--max-cpu-loras", "1", "--admission-max-in-flight", "1",
                        "--queue-max-per-tenant", "1", "--metrics-port", str(metrics_port)),
        tmp_path / "gateway.log")
    prometheus = None
    try:
        prometheus = start_prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
        statuses = mixed_load(gateway.url, keys)
        for status in ("200", "404", "429"):
            assert statuses.get(status), statuses
        scraped_after(prometheus.url, 3)  # a rate needs two samples of each series after the load
        rows, empty = [], []
        for board in BOARDS:
            model = build(board)
            for variable in model["templating"]["list"]:
                if variable["type"] == "query":
                    n = variable_values(prometheus.url, variable["query"])
                    rows.append(f"| {board.uid} | variable `{variable['name']}` | ok | {n} |")
                    if n == 0:
                        empty.append(f"{board.uid}: variable {variable['name']}")
            for title, expr in queries(model):
                outcome, n = evaluate(prometheus.url, expr)
                rows.append(f"| {board.uid} | {title} | {outcome} | {n} |")
                if outcome != "ok" or n == 0:
                    empty.append(f"{board.uid}: {title}: {outcome}, {n} series: {expr}")
        table = ("| dashboard | panel (or variable) | query | series |\n|---|---|---|---|\n"
                 + "\n".join(rows) + f"\n\nLoad: {statuses} (HTTP status: answers)\n")
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(table)
        print(table)
        assert not empty, "\n".join(empty)
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert gateway.stop() in (0, -15), gateway.log_tail()
        registry.close()
