"""Peers' adapter-lifecycle failures, each replayed against real vLLM through the gateway.

Issue 10, item 7. One `lora-gateway serve` process on the tiny base serves every test;
its engine holds ``ENGINE_CAPACITY`` adapters (``--max-cpu-loras``), fewer than the
adapters the tests ask for, so loads and evictions happen under live traffic. The
path-escape peers (vLLM #46287, AIBrix #2296) need no engine: tests/gateway has them.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from adapters_registry import Registry
from tests.conftest import ANSWERS, PROMPTS, copy_adapter
from tests.integration.conftest import (
    GatewayProcess,
    free_port,
    populated_registry,
    start_gateway,
    tiny_serve_args,
)

pytestmark = pytest.mark.integration

ENGINE_CAPACITY = 3  # --max-cpu-loras: adapters the engine holds
BATCH_LORAS = 2  # --max-loras: adapters one batch mixes
ADMIN_KEY = "p" * 40
WEIGHTS = "adapter_model.safetensors"
# Tokens of a "long" stream (min_tokens = max_tokens: no early EOS), as long as
# MAX_MODEL_LEN leaves room for the prompt: on an idle CPU the tiny base decodes one in
# a few milliseconds, and the tests need streams that outlast several adapter loads.
MAX_MODEL_LEN = 768
LONG = 704
STREAMS = 2  # concurrent long streams on one adapter
CHURN_LOADS = 400  # load/evict cycles of the memory test
CHURN_SECONDS = 60  # ... within this long
# The gateway's process tree may grow across the churn by less than half of what keeping
# every loaded adapter's weights would cost (vLLM #42207's leak), and never 32 MiB.
RSS_GROWTH_CAP = 32 << 20


@dataclass
class Env:
    gateway: GatewayProcess
    registry: Registry
    keys: dict[str, str]
    variants: list[str]  # acme's adapters beyond support-bot, never requested before a test
    cache_dir: Path
    disk_budget: int
    adapter_bytes: int
    metrics_url: str
    used: set[str] = field(default_factory=set)

    def fresh(self, n: int) -> list[str]:
        """``n`` of acme's adapters no test has requested yet (never loaded, never fetched)."""
        names = [v for v in self.variants if v not in self.used][:n]
        assert len(names) == n, "not enough variants registered for this test"
        self.used.update(names)
        return names

    def headers(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def chat(self, tenant: str, model: str, prompt: str = PROMPTS[0], tokens: int = 24,
             **extra: object) -> httpx.Response:
        body = {"model": model, "temperature": 0, "max_tokens": tokens,
                "messages": [{"role": "user", "content": prompt}], **extra}
        return httpx.post(self.gateway.url + "/v1/chat/completions", json=body,
                          headers=self.headers(tenant), timeout=180)

    def stream(self, tenant: str, model: str, prompt: str, tokens: int = LONG,
               started: threading.Event | None = None) -> tuple[str, float]:
        """The streamed text of a greedy request forced to ``tokens`` tokens, and when it
        ended; ``started`` is set once its first event arrived."""
        body = {"model": model, "temperature": 0, "max_tokens": tokens, "min_tokens": tokens,
                "stream": True, "messages": [{"role": "user", "content": prompt}]}
        text = []
        with httpx.stream("POST", self.gateway.url + "/v1/chat/completions", json=body,
                          headers=self.headers(tenant), timeout=180) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                text += [c["delta"].get("content") or "" for c in event["choices"]]
                if started is not None:
                    started.set()
        return "".join(text), time.monotonic()

    def admin(self, method: str, path: str, **kwargs: object) -> dict:
        r = httpx.request(method, self.gateway.url + "/admin/v1" + path, timeout=180,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)
        assert r.status_code == 200, r.text
        return r.json()

    def residency(self) -> tuple[dict[int, int], list[int]]:
        """The gateway's engine LRU (lora_int_id -> requests using it), and vLLM's own list."""
        state = self.admin("GET", "/cache")
        return ({a["lora_int_id"]: a["in_use"] for a in state["engine"]["adapters"]},
                state["engine_reports"])

    def samples(self, name: str) -> list:
        text = httpx.get(self.metrics_url, timeout=30).text
        return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]

    def counter(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples(name)
                   if all(s.labels.get(k) == v for k, v in labels.items()))

    def in_use(self) -> set[int]:
        """Adapters serving requests now (lora_int_ids), by the gateway's own count. Not the
        router's ``running_lora_adapters``: that lists residency in batch slots, not use."""
        return {i for i, n in self.residency()[0].items() if n > 0}


def make_variant(src: Path, dest: Path, k: int) -> Path:
    """A copy of ``src`` whose weights differ in one value: another adapter, same shape."""
    copy_adapter(src, dest)
    tensors = load_file(dest / WEIGHTS)
    name = sorted(n for n in tensors if "lora_B" in n)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3 * (k + 1)
    save_file(tensors, dest / WEIGHTS, metadata={"format": "pt"})
    (dest / "manifest.json").unlink(missing_ok=True)  # it hashes the original weights
    return dest


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base, tiny_contract, tiny_template, trained_adapters):
    root: Path = tmp_path_factory.mktemp("peers")
    registry, db_url, keys = populated_registry(root, tiny_contract, tiny_template, trained_adapters)
    size = folder_bytes(trained_adapters["acme"])
    # Disk holds a few adapters more than the engine does (those are never evicted from
    # disk); the variants are enough to overflow both, so the churn evicts from each.
    disk_budget = max(1 << 20, (ENGINE_CAPACITY + 2) * size)
    n_variants = max(16, math.ceil(2 * disk_budget / size))
    variants = []
    for k in range(n_variants):
        name = f"variant-{k}"
        registry.push("acme", name, make_variant(trained_adapters["acme"], root / name, k),
                      template_id=tiny_template.template_id)
        shutil.rmtree(root / name)
        variants.append(name)
    metrics_port = free_port()
    gateway = start_gateway(
        tiny_serve_args(root, db_url, tiny_base.path, tiny_contract,
                        "--max-loras", str(BATCH_LORAS), "--max-cpu-loras", str(ENGINE_CAPACITY),
                        "--disk-cache-max-bytes", str(disk_budget),
                        # A full engine refuses at once here (#14497's test); the wait for a
                        # slot (the default) is tests/gateway/test_adapter_cache.py's.
                        "--adapter-slot-wait-seconds", "0",
                        # First-come admission: fair admission holds a request whose adapter
                        # cannot join the batch (max_loras) at the door, so more adapters than
                        # that are never in use at once; the engine's adapter memory must stay
                        # safe without that help (gateway/protection/admission.py).
                        "--no-fair-scheduling",
                        "--metrics-port", str(metrics_port), max_model_len=MAX_MODEL_LEN),
        root / "gateway.log", env={"LGW_ADMIN_API_KEY": ADMIN_KEY})
    e = Env(gateway, registry, keys, variants, root / "cache", disk_budget, size,
            f"http://127.0.0.1:{metrics_port}/metrics")
    yield e
    rc = gateway.stop()
    registry.close()
    assert rc in (0, -15), f"gateway exit code {rc}:\n{gateway.log_tail()}"


def test_cold_loads_while_generations_run_leave_them_intact(env: Env) -> None:
    """vLLM #13698: loading an adapter while generations run crashed the server.

    Two long greedy generations on acme/support-bot must produce exactly what the same
    request produces alone, while other adapters are cold-loaded (fetched, verified,
    added to vLLM, and used in the same batches) before the long ones end.
    """
    prompt = "Tell me a long story."
    long = {"min_tokens": LONG}

    def generation() -> tuple[str, float]:
        r = env.chat("acme", "support-bot", prompt, tokens=LONG, **long)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], time.monotonic()

    alone, _ = generation()
    assert len(alone) > 0
    cold = env.fresh(4)
    loads_before = env.counter("lgw_adapter_cache_loads_total", cache="engine")
    support_bot = _lora_id(env, "acme", "support-bot")

    def cold_load(name: str) -> float:
        """Fetched, verified, added to vLLM and prefilled beside the long ones: one token."""
        r = env.chat("acme", name, PROMPTS[1], tokens=1)
        assert r.status_code == 200, r.text
        assert r.headers["x-lora-gateway-adapter-tier"] == "remote_fetch"
        return time.monotonic()

    with ThreadPoolExecutor(STREAMS) as pool:
        running = [pool.submit(generation) for _ in range(STREAMS)]
        _wait_until(lambda: env.residency()[0].get(support_bot, 0) >= STREAMS,
                    "the long generations to start")
        # One at a time: with support-bot, two adapters, as many as one batch mixes
        # (--max-loras), so each is generated beside the long ones, not after them.
        loaded_at = [cold_load(name) for name in cold]
        results = [g.result() for g in running]
    loads = env.counter("lgw_adapter_cache_loads_total", cache="engine") - loads_before

    assert loads == len(cold)
    for text, _ended in results:
        assert text == alone
    for name in cold:  # and each answers as itself (acme's answer, whole) once loaded
        r = env.chat("acme", name, PROMPTS[1])
        assert r.json()["choices"][0]["message"]["content"] == ANSWERS["acme"], name
    ended = min(t for _text, t in results)
    overlapped = sum(t < ended for t in loaded_at)
    print(f"cold loads done {[round(ended - t, 2) for t in loaded_at]} s before the generations ended")
    assert overlapped >= 2, f"only {overlapped} cold loads finished while the generations ran"
    assert httpx.get(env.gateway.url + "/health", timeout=10).status_code == 200


def _lora_id(env: Env, tenant: str, model: str) -> int:
    return env.registry.resolve(env.registry.get_tenant(tenant), model).lora_int_id


def _wait_until(check, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_no_adapter_in_flight_is_evicted_and_one_too_many_is_a_503(env: Env) -> None:
    """vLLM #14497: its LRU could remove an adapter a running request still used.

    Three streams (two tenants) hold every engine slot; a fourth adapter is refused with
    503 overloaded and Retry-After instead of evicting one of them; the gateway's LRU and
    vLLM's own list_loras both still hold the three; each stream completes with its own
    adapter's answer, and the refused adapter is served once a slot frees up.
    """
    held = [("acme", "support-bot"), ("globex", "pirate"), ("acme", env.fresh(1)[0])]
    ids = {_lora_id(env, t, m) for t, m in held}
    extra = env.fresh(1)[0]
    for tenant, model in held:  # resident before the streams: they hold slots from the start
        assert env.chat(tenant, model).status_code == 200

    with ThreadPoolExecutor(3 * len(held)) as pool:
        # Three streams per adapter; vLLM batches two adapters at a time, so the third
        # adapter's streams wait in its queue (still holding their slot) for a whole round.
        streams = [pool.submit(env.stream, t, m, PROMPTS[0]) for t, m in held for _ in range(3)]
        _wait_until(lambda: ids <= env.in_use(), "three adapters in use")
        refused = env.chat("acme", extra)
        ours, theirs = env.residency()
        results = [s.result() for s in streams]

    # Still in use after the refusal, so in use all through it: the refusal was the test.
    assert all(ours.get(i, 0) > 0 for i in ids), f"a stream ended too early: {ours}"
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert ids <= set(ours) and ids <= set(theirs), (ours, theirs, ids)
    assert len(theirs) <= ENGINE_CAPACITY and set(theirs) == set(ours)
    for (tenant, _), (text, _) in zip([h for h in held for _ in range(3)], results, strict=True):
        assert text.startswith(ANSWERS[tenant]), (tenant, text[:80])
    later = env.chat("acme", extra)
    assert later.status_code == 200, later.text
    assert later.json()["choices"][0]["message"]["content"] == ANSWERS["acme"]
    assert later.headers["x-lora-gateway-adapter-tier"] == "disk_hit"  # fetched, then refused


def test_concurrent_first_requests_load_an_adapter_once(env: Env) -> None:
    """Dynamo #5184: concurrent first requests for one LoRA raced to load it.

    32 simultaneous first requests for a never-loaded adapter: one download, one
    add_lora, 32 answers, all 200 and identical under greedy decoding.
    """
    name = env.fresh(1)[0]
    disk, engine = (env.counter("lgw_adapter_cache_loads_total", cache=c) for c in ("disk", "engine"))
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: env.chat("acme", name), range(32)))
    assert [r.status_code for r in answers] == [200] * 32, [r.text for r in answers if r.status_code != 200]
    texts = {r.json()["choices"][0]["message"]["content"] for r in answers}
    assert texts == {ANSWERS["acme"]}
    assert env.counter("lgw_adapter_cache_loads_total", cache="disk") - disk == 1
    assert env.counter("lgw_adapter_cache_loads_total", cache="engine") - engine == 1
    assert {r.headers["x-lora-gateway-adapter-tier"] for r in answers} <= {"remote_fetch", "slot_hit"}


def _tree_rss(env: Env) -> int:
    by_process = env.gateway.rss_by_process()
    assert len(by_process) >= 2, f"no engine core process under the gateway: {by_process}"
    return sum(by_process.values())


def test_load_evict_churn_keeps_memory_and_disk_bounded(env: Env) -> None:
    """vLLM #42207 and #54839: unloaded adapters stayed in engine memory, RSS grew.

    Every variant in turn, round after round, through an engine of ENGINE_CAPACITY slots:
    each prefetch is a load and an eviction. After CHURN_LOADS cycles the gateway's
    process tree (API process + vLLM engine core) has grown since warm-up by less than
    half the weights it loaded (and under RSS_GROWTH_CAP), vLLM holds exactly what the
    gateway's LRU says, and the disk cache is within its byte budget.
    """
    refs = [f"acme/{v}" for v in env.variants]

    def one_round() -> int:
        body = env.admin("POST", "/cache/prefetch", json={"adapters": refs, "into": "engine"})
        assert body["failed"] == 0, body
        assert not {d["was"] for d in body["data"]} & {"slot_hit", "engine_hit"}, body
        return len(refs)

    one_round()  # warm-up: every variant loaded once, every code path taken
    one_round()
    rss_before, loads_before = _tree_rss(env), env.counter("lgw_adapter_cache_loads_total",
                                                            cache="engine")
    started, cycles = time.monotonic(), 0
    while cycles < CHURN_LOADS:
        assert time.monotonic() - started < CHURN_SECONDS, f"{cycles} cycles in {CHURN_SECONDS}s"
        cycles += one_round()
    seconds = time.monotonic() - started
    growth = _tree_rss(env) - rss_before
    bound = min(RSS_GROWTH_CAP, cycles * env.adapter_bytes // 2)

    ours, theirs = env.residency()
    state = env.admin("GET", "/cache")
    report = {"cycles": cycles, "seconds": round(seconds, 1), "rss_before": rss_before,
              "rss_growth": growth, "rss_bound": bound, "disk_bytes": state["disk"]["bytes"],
              "disk_budget": env.disk_budget}
    print(f"churn: {report}")
    assert env.counter("lgw_adapter_cache_loads_total", cache="engine") - loads_before == cycles
    assert set(theirs) == set(ours) and len(theirs) <= ENGINE_CAPACITY, (ours, theirs)
    assert growth < bound, report
    assert state["disk"]["bytes"] <= env.disk_budget, report
    assert folder_bytes(env.cache_dir) <= env.disk_budget, report
    assert env.chat("acme", "support-bot").json()["choices"][0]["message"]["content"] == ANSWERS["acme"]
