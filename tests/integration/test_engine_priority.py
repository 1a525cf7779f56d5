"""The real engine serves a quiet tenant's request ahead of a flood's waiting requests.

One gateway process (real vLLM, tiny base) running one sequence at a time
(``--max-num-seqs 1``) but admitting eight (``--admission-max-in-flight 8``), so admitted
requests wait in vLLM's own queue, where only the priority each carries (its tenant's fair
share in tokens, vLLM's ``priority`` policy) decides who runs next. With the engine's
first-come order (``--no-engine-priority``) the quiet request runs after every flood
request admitted before it; with priorities it runs next.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from adapters_registry import Registry
from tests.integration.conftest import GatewayProcess, free_port, start_gateway, tiny_serve_args
from tests.msp import scrape, value

pytestmark = pytest.mark.integration
FLOOD = 5  # one runs, four wait in the engine
TOKENS = 120


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_base, tiny_contract):
    root: Path = tmp_path_factory.mktemp("priority")
    db_url = f"sqlite:///{root / 'registry.db'}"
    registry = Registry.open(db_url, root / "artifacts")
    registry.register_base(tiny_contract)
    keys = {}
    for tenant in ("flood", "quiet"):
        registry.create_tenant(tenant)
        keys[tenant] = registry.create_api_key(tenant)
    registry.close()
    metrics_port = free_port()
    process = start_gateway(
        tiny_serve_args(root, db_url, tiny_base.path, tiny_contract, "--max-num-seqs", "1",
                        "--admission-max-in-flight", "8", "--metrics-port", str(metrics_port)),
        root / "gateway.log")
    yield process, keys, f"http://127.0.0.1:{metrics_port}/metrics", tiny_contract.model_id
    rc = process.stop()
    assert rc in (0, -15), f"gateway exit code {rc}:\n{process.log_tail()}"


def _first_token_at(process: GatewayProcess, key: str, model: str, started: dict[str, float],
                    name: str, failures: list[BaseException]) -> None:
    client = openai.OpenAI(base_url=process.url + "/v1", api_key=key, max_retries=0, timeout=120)
    try:
        stream = client.chat.completions.create(
            model=model, temperature=0, max_tokens=TOKENS, stream=True,
            messages=[{"role": "user", "content": "Count."}],
            extra_body={"min_tokens": TOKENS})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                started.setdefault(name, time.monotonic())
    except BaseException as exc:  # reported by the test, not lost in a thread
        failures.append(exc)


def test_a_quiet_request_runs_before_the_floods_waiting_ones(gateway) -> None:
    process, keys, metrics_url, model = gateway
    started: dict[str, float] = {}
    failures: list[BaseException] = []
    # The flood has used the engine before: its share of recent tokens is everything.
    _first_token_at(process, keys["flood"], model, {}, "warm-up", failures)
    flood = [threading.Thread(target=_first_token_at,
                              args=(process, keys["flood"], model, started, f"flood-{i}", failures))
             for i in range(FLOOD)]
    for thread in flood:
        thread.start()
    deadline = time.monotonic() + 60
    while value(scrape(httpx.get(metrics_url, timeout=10).text), "vllm:num_requests_waiting") < FLOOD - 1:
        assert time.monotonic() < deadline, "the flood's requests never queued in the engine"
        time.sleep(0.05)
    quiet = threading.Thread(target=_first_token_at,
                             args=(process, keys["quiet"], model, started, "quiet", failures))
    quiet.start()
    for thread in [*flood, quiet]:
        thread.join(120)
    assert failures == []
    order = sorted(started, key=started.__getitem__)
    # The flood request running when the quiet one arrived finishes first; the quiet one is next.
    assert order.index("quiet") == 1, order
