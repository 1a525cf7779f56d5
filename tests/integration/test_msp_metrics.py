"""The Model Server Protocol on a running gateway with real vLLM (tiny base), read as a router.

One gateway process for the module: one batch slot (``--max-loras 1``), two adapters in
engine memory (``--max-cpu-loras 2``) and one engine sequence (``--max-num-seqs 1``), so
three adapters force an eviction and a second request waits in the admission queue.
The tests run in order; each one leaves the residency the next one starts from.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import PROMPTS
from tests.integration.conftest import (
    GatewayProcess,
    free_port,
    populated_registry,
    start_gateway,
    tiny_serve_args,
)
from tests.msp import loaded, lora_info, scrape, value

pytestmark = pytest.mark.integration
LONG = 300  # tokens: a request that stays in flight for a while on the tiny base


class Env:
    gateway: GatewayProcess
    keys: dict[str, str]
    metrics_url: str

    def client(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key=self.keys[tenant],
                             max_retries=0, timeout=120)

    def metrics(self):
        response = httpx.get(self.metrics_url, timeout=10)
        assert response.status_code == 200
        return scrape(response.text)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base, tiny_contract, tiny_template, trained_adapters):
    root: Path = tmp_path_factory.mktemp("msp")
    e = Env()
    registry, db_url, e.keys = populated_registry(root, tiny_contract, tiny_template, trained_adapters)
    registry.push("acme", "other", trained_adapters["acme"])  # a third adapter version
    metrics_port = free_port()
    e.gateway = start_gateway(
        tiny_serve_args(root, db_url, tiny_base.path, tiny_contract,
                        "--max-loras", "1", "--max-cpu-loras", "2", "--max-num-seqs", "1",
                        "--metrics-port", str(metrics_port)),
        root / "gateway.log")
    e.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield e
    rc = e.gateway.stop()
    registry.close()
    assert rc in (0, -15), f"gateway exit code {rc}:\n{e.gateway.log_tail()}"


def ask(env: Env, tenant: str, model: str, max_tokens: int = 8) -> None:
    env.client(tenant).chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens,
        extra_body={"min_tokens": max_tokens},
        messages=[{"role": "user", "content": PROMPTS[0]}])


def test_before_any_adapter_every_gauge_is_there_and_empty(env: Env) -> None:
    m = env.metrics()
    assert value(m, "vllm:num_requests_running") == 0
    assert value(m, "vllm:num_requests_waiting") == 0
    assert value(m, "vllm:kv_cache_usage_perc") == 0
    [info] = m["vllm:cache_config_info"]
    # The picker parses both as integers; vLLM sized the KV cache before we could serve.
    assert int(info.labels["block_size"]) > 0 and int(info.labels["num_gpu_blocks"]) > 0
    assert info.value == 1
    max_lora, running, waiting, stamp = lora_info(m)
    assert (max_lora, running, waiting) == (1, [], [])
    assert abs(stamp - time.time()) < 60  # a timestamp: the newest series wins
    assert loaded(m) == {}
    assert value(m, "vllm:num_gpu_loaded_lora_adapters") == 0
    assert value(m, "vllm:max_gpu_lora_adapters") == 1


def test_loads_and_evictions_move_adapters_between_levels(env: Env) -> None:
    ask(env, "acme", "support-bot")
    m = env.metrics()
    assert loaded(m) == {"acme/support-bot@v1": ("gpu", "false"),
                         "acme/support-bot": ("gpu", "false")}
    # Still listed with nothing in flight: residency, not request activity (llm-d-router #2605).
    assert lora_info(m)[1:3] == (["acme/support-bot@v1", "acme/support-bot"], [])
    assert value(m, "vllm:num_requests_running") == 0

    ask(env, "globex", "globex/pirate")  # the qualified name is the routing key as sent
    m = env.metrics()
    assert loaded(m) == {"globex/pirate@v1": ("gpu", "false"), "globex/pirate": ("gpu", "false"),
                         "acme/support-bot@v1": ("cpu", "false"),
                         "acme/support-bot": ("cpu", "false")}
    assert lora_info(m)[1] == ["globex/pirate@v1", "globex/pirate"]
    assert value(m, "vllm:num_gpu_loaded_lora_adapters") == 1

    ask(env, "acme", "other")  # engine memory holds two: support-bot, least recent, goes
    m = env.metrics()
    assert loaded(m) == {"acme/other@v1": ("gpu", "false"), "acme/other": ("gpu", "false"),
                         "globex/pirate@v1": ("cpu", "false"), "globex/pirate": ("cpu", "false")}
    assert lora_info(m)[1] == ["acme/other@v1", "acme/other"]
    assert value(m, "vllm:kv_cache_usage_perc") == 0  # nothing in flight holds KV blocks


def test_requests_in_flight_run_and_queued_ones_wait(env: Env) -> None:
    failures: list[BaseException] = []

    def call(tenant: str, model: str) -> None:
        try:
            ask(env, tenant, model, LONG)
        except BaseException as exc:  # reported by the test below, not lost in a thread
            failures.append(exc)

    first = threading.Thread(target=call, args=("acme", "other"))
    first.start()
    m = _wait_for(env, lambda m: value(m, "vllm:num_requests_running") == 1)
    assert value(m, "vllm:kv_cache_usage_perc") > 0
    # One engine sequence: the next request waits in the gateway's admission queue.
    second = threading.Thread(target=call, args=("globex", "tiny-llama"))
    second.start()
    m = _wait_for(env, lambda m: value(m, "vllm:num_requests_waiting") == 1)
    assert value(m, "vllm:num_requests_running") == 1
    # Neither request makes residency: the base needs no adapter, other was resident before.
    assert set(loaded(m)) == {"acme/other@v1", "acme/other", "globex/pirate@v1", "globex/pirate"}
    first.join(120)
    second.join(120)
    assert failures == []
    m = _wait_for(env, lambda m: value(m, "vllm:num_requests_running") == 0)
    assert value(m, "vllm:num_requests_waiting") == 0
    assert lora_info(m)[2] == []


def _wait_for(env: Env, ready, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        m = env.metrics()
        if ready(m) or time.monotonic() > deadline:
            assert ready(m), "the metrics never showed the expected state"
            return m
        time.sleep(0.05)
