"""The Model Server Protocol gauges on the fake engine: names, labels and what they mean."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

from tests.msp import loaded, lora_info, scrape, value


def metrics(gw):
    response = gw.metrics()
    assert response.status_code == 200
    return scrape(response.text)


def test_an_idle_gateway_reports_every_gauge_and_no_adapter(gw) -> None:
    before = time.time()
    m = metrics(gw)
    assert value(m, "vllm:num_requests_running") == 0
    assert value(m, "vllm:num_requests_waiting") == 0
    assert value(m, "vllm:kv_cache_usage_perc") == 0
    [info] = m["vllm:cache_config_info"]
    assert (info.labels["block_size"], info.labels["num_gpu_blocks"], info.value) == ("16", "64", 1)
    assert len(m["vllm:lora_requests_info"]) == 1  # one series, not one per label set ever seen
    max_lora, running, waiting, stamp = lora_info(m)
    assert (max_lora, running, waiting) == (2, [], [])  # max_loras=2 in the test settings
    assert before <= stamp <= time.time()
    assert loaded(m) == {}
    assert value(m, "vllm:num_gpu_loaded_lora_adapters") == 0
    assert value(m, "vllm:max_gpu_lora_adapters") == 2
    assert m["vllm:num_requests_running"][0].labels == {"model_name": "tiny-llama", "engine": "0"}


def test_engine_numbers_come_from_the_scheduler_and_waiting_adds_the_admission_queue(
        gateway_factory) -> None:
    gw = gateway_factory(admission_max_in_flight=1)
    gw.engine.scheduler = replace(gw.engine.scheduler, running=2, waiting=3, kv_cache_usage=0.25)
    admission = gw.client.app.state.services.admission
    portal = gw.client.portal
    slot = portal.call(admission.acquire, "acme")
    queued = portal.start_task_soon(admission.acquire, "globex")
    deadline = time.monotonic() + 5
    while admission.queued() != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    m = metrics(gw)
    assert value(m, "vllm:num_requests_running") == 2
    assert value(m, "vllm:num_requests_waiting") == 3 + 1
    assert value(m, "vllm:kv_cache_usage_perc") == 0.25
    portal.call(slot.release)
    portal.call(queued.result(timeout=5).release)
    assert value(metrics(gw), "vllm:num_requests_waiting") == 3


def test_residency_follows_the_tiers_through_loads_and_evictions(
        gateway_factory, trained_adapters) -> None:
    gw = gateway_factory(max_loras=1, max_cpu_loras=2)
    gw.env.registry.push("acme", "other", trained_adapters["acme"])
    assert gw.chat("acme", "support-bot").status_code == 200
    m = metrics(gw)
    assert loaded(m) == {"acme/support-bot@v1": ("gpu", "false"), "acme/support-bot": ("gpu", "false")}
    assert lora_info(m)[1] == ["acme/support-bot@v1", "acme/support-bot"]
    assert value(m, "vllm:num_gpu_loaded_lora_adapters") == 1
    assert value(m, "vllm:max_gpu_lora_adapters") == 1

    assert gw.chat("globex", "globex/pirate").status_code == 200  # takes the only batch slot
    m = metrics(gw)
    assert loaded(m) == {"globex/pirate@v1": ("gpu", "false"), "globex/pirate": ("gpu", "false"),
                         "acme/support-bot@v1": ("cpu", "false"), "acme/support-bot": ("cpu", "false")}
    assert lora_info(m)[1] == ["globex/pirate@v1", "globex/pirate"]
    assert value(m, "vllm:num_cpu_loaded_lora_adapters") == 1

    assert gw.chat("acme", "other").status_code == 200  # engine full: support-bot is evicted
    m = metrics(gw)
    assert set(loaded(m)) == {"acme/other@v1", "acme/other", "globex/pirate@v1", "globex/pirate"}
    assert loaded(m)["acme/other"] == ("gpu", "false")
    assert value(m, "vllm:num_gpu_loaded_lora_adapters") + value(
        m, "vllm:num_cpu_loaded_lora_adapters") == 2


def test_pinned_adapters_say_so(gateway_factory) -> None:
    gw = gateway_factory(pinned_adapters=["globex/pirate"])
    m = metrics(gw)
    # Pinned at start, never requested: vLLM's add_lora also activates it in a batch slot.
    assert loaded(m) == {"globex/pirate@v1": ("gpu", "true"), "globex/pirate": ("gpu", "true")}
    assert lora_info(m)[1] == ["globex/pirate@v1", "globex/pirate"]
    assert gw.chat("acme", "support-bot").status_code == 200
    assert gw.chat("acme", "support-bot@v1").status_code == 200  # slots: 2, so both stay
    assert loaded(metrics(gw))["globex/pirate@v1"] == ("gpu", "true")


def test_a_request_in_flight_is_not_residency(gw) -> None:
    release = threading.Event()

    async def gate() -> None:
        while not release.is_set():
            await asyncio.sleep(0.01)

    gw.engine.add_gate = gate
    answer: list[int] = []
    caller = threading.Thread(target=lambda: answer.append(gw.chat("acme", "support-bot").status_code))
    caller.start()
    try:
        deadline = time.monotonic() + 5
        while not gw.engine.add_calls and time.monotonic() < deadline:
            time.sleep(0.01)
        m = metrics(gw)
        _max, running, waiting, _ = lora_info(m)
        assert running == []
        assert waiting == ["acme/support-bot@v1", "acme/support-bot"]  # awaited, not resident
        assert loaded(m) == {}
        assert value(m, "vllm:num_gpu_loaded_lora_adapters") == 0
    finally:
        release.set()
        caller.join(10)
    assert answer == [200]
    _max, running, waiting, _ = lora_info(metrics(gw))
    assert (running, waiting) == (["acme/support-bot@v1", "acme/support-bot"], [])


def test_adapters_waiting_in_the_engine_are_listed_by_their_keys(gw) -> None:
    assert gw.chat("acme", "support-bot:prod").status_code == 200
    gw.engine.scheduler = replace(gw.engine.scheduler, waiting=1,
                                  waiting_adapters=frozenset({"acme/support-bot@v1"}))
    assert lora_info(metrics(gw))[2] == ["acme/support-bot@v1", "acme/support-bot:prod"]
