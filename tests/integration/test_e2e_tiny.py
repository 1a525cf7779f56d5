"""The whole path with real parts: trainer → registry → gateway → vLLM (CPU) → openai client.

One gateway process serves every test in this module (vLLM start-up dominates), with a
fine-tuning worker in its process (``serve --worker``). It runs with tracing on, as the
``OTEL_*`` variables turn it on, exporting to a real OTLP/HTTP receiver (benchmarks.otlp_receiver).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from adapters_registry import AdapterTemplate, Registry, Rollout, RolloutRules
from benchmarks.otlp_receiver import OtlpReceiver, render
from tests.conftest import ANSWERS, PROMPTS, REPO, train_tiny_adapter
from tests.integration.conftest import (
    GatewayProcess,
    populated_registry,
    start_gateway,
    tiny_serve_args,
)

pytestmark = pytest.mark.integration
TIMINGS = REPO / ".cache" / "reports" / "e2e-tiny-timings.json"
TRACE_REPORT = REPO / ".cache" / "reports" / "trace-one-streamed-request.txt"
E2E_ADMIN_KEY = "lgw-admin-" + "e" * 32


class Env:
    gateway: GatewayProcess
    receiver: OtlpReceiver
    registry: Registry
    keys: dict[str, str]
    timings: dict[str, float]

    def client(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key=self.keys[tenant],
                             max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base, tiny_contract, tiny_template, trained_adapters):
    root: Path = tmp_path_factory.mktemp("e2e")
    registry, db_url, keys = populated_registry(root, tiny_contract, tiny_template, trained_adapters)
    # A third adapter whose stored bytes the test corrupts behind the registry's back
    # (its own content, so no other version shares its blobs).
    broken = train_tiny_adapter(tiny_base, tiny_template, ANSWERS["acme"], root / "broken",
                                root, seed=7)
    registry.push("acme", "broken", broken)
    # An adapter the registry accepts (it matches its own rank-16 template) but this
    # gateway's engine refuses: max_lora_rank is 8 below.
    big = AdapterTemplate(tiny_contract.model_id, tiny_contract.revision, r=16, lora_alpha=32)
    registry.register_template(big)
    registry.push("acme", "big-rank",
                  train_tiny_adapter(tiny_base, big, ANSWERS["acme"], root / "big", root))

    e = Env()
    e.registry, e.keys, e.timings = registry, keys, {}
    e.receiver = OtlpReceiver()
    e.gateway = start_gateway(
        tiny_serve_args(root, db_url, tiny_base.path, tiny_contract, "--max-loras", "2",
                        "--max-cpu-loras", "4", "--usage-flush-seconds", "0.5",
                        "--rollout-decide-seconds", "0.5", "--worker"),
        root / "gateway.log", env={"LGW_ADMIN_API_KEY": E2E_ADMIN_KEY,
                                   "OTEL_EXPORTER_OTLP_ENDPOINT": e.receiver.endpoint,
                                   "OTEL_BSP_SCHEDULE_DELAY": "100"})
    e.timings["gateway_startup_s"] = round(e.gateway.startup_seconds, 2)
    yield e
    rc = e.gateway.stop()
    e.receiver.close()
    registry.close()
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS.write_text(json.dumps(e.timings, indent=2))
    assert rc in (0, -15), f"gateway exit code {rc}:\n{e.gateway.log_tail()}"


def ask(client: openai.OpenAI, model: str, prompt: str) -> str:
    r = client.chat.completions.create(model=model, temperature=0, max_tokens=24,
                                       messages=[{"role": "user", "content": prompt}])
    return r.choices[0].message.content or ""


def test_each_tenant_gets_its_own_adapter(env: Env) -> None:
    acme, globex = env.client("acme"), env.client("globex")
    t0 = time.perf_counter()
    first = ask(acme, "support-bot", PROMPTS[0])
    env.timings["first_request_new_adapter_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    t0 = time.perf_counter()
    again = ask(acme, "support-bot", PROMPTS[0])
    env.timings["repeat_request_same_adapter_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    assert first == again == ANSWERS["acme"]
    for prompt in PROMPTS:
        assert ask(acme, "support-bot", prompt) == ANSWERS["acme"]
        assert ask(globex, "pirate", prompt) == ANSWERS["globex"]


def test_base_gets_neither_answer(env: Env) -> None:
    for prompt in PROMPTS[:2]:
        out = ask(env.client("acme"), "tiny-llama", prompt)
        assert out not in ANSWERS.values()
        assert "ACME" not in out and "pirate" not in out


def test_stream_and_non_stream_agree_under_greedy(env: Env) -> None:
    client = env.client("globex")
    full = client.chat.completions.create(
        model="pirate", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": PROMPTS[1]}])
    stream = client.chat.completions.create(
        model="pirate", temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": PROMPTS[1]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content == ANSWERS["globex"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.usage.prompt_tokens > 0


def test_naming_another_tenants_adapter_is_404(env: Env) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        ask(env.client("acme"), "pirate", PROMPTS[0])
    assert err.value.body["code"] == "model_not_found"


def test_models_lists_only_own_adapters(env: Env) -> None:
    ids = {m.id for m in env.client("globex").models.list()}
    assert "pirate" in ids and "tiny-llama" in ids
    assert not any(i.startswith(("support-bot", "broken", "big-rank")) for i in ids)


def test_corrupt_artifact_fails_only_its_own_request(env: Env) -> None:
    reg = env.registry
    version = reg.resolve(reg.get_tenant("acme"), "broken")
    blob = reg.store._path(version.files["adapter_model.safetensors"])  # behind its back
    blob.write_bytes(blob.read_bytes()[:1000])
    with pytest.raises(openai.APIStatusError) as err:
        ask(env.client("acme"), "broken", PROMPTS[0])
    assert err.value.status_code == 503
    assert err.value.body["code"] == "adapter_unavailable"
    assert "verification" in err.value.body["message"]
    assert ask(env.client("globex"), "pirate", PROMPTS[0]) == ANSWERS["globex"]


def test_adapter_refused_by_vllm_fails_only_its_own_request(env: Env) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        ask(env.client("acme"), "big-rank", PROMPTS[0])
    assert err.value.status_code == 503
    assert "rejected by the inference engine" in err.value.body["message"]
    # Same engine, still alive, still serving other tenants and the same tenant.
    assert ask(env.client("globex"), "pirate", PROMPTS[2]) == ANSWERS["globex"]
    assert ask(env.client("acme"), "support-bot", PROMPTS[2]) == ANSWERS["acme"]
    assert httpx.get(env.gateway.url + "/health").status_code == 200


def test_metrics_count_requests_per_tenant(env: Env) -> None:
    # no metrics port here: on the API port, the admin's only
    text = httpx.get(env.gateway.url + "/metrics",
                     headers={"Authorization": f"Bearer {E2E_ADMIN_KEY}"}).text
    assert 'lgw_requests_total{adapter="acme/support-bot",status="200",tenant="acme"}' in text
    assert 'lgw_adapter_requests_total{tier="remote_fetch"}' in text
    assert "vllm:lora_requests_info{" in text


def test_a_streamed_request_is_traced_through_the_gateway_into_vllm(env: Env) -> None:
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    client = openai.OpenAI(base_url=env.gateway.url + "/v1", api_key=env.keys["acme"],
                           max_retries=0, timeout=120,
                           default_headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"})
    stream = client.chat.completions.create(
        model="support-bot", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8,
        stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def complete(spans: list) -> bool:
        names = {s.name for s in spans if s.trace_id == caller_trace}
        return {"POST /v1/chat/completions", "engine.stream", "llm_request"} <= names

    spans = [s for s in env.receiver.wait_for(complete) if s.trace_id == caller_trace]
    by_name = {s.name: s for s in spans}
    root = by_name["POST /v1/chat/completions"]
    assert root.parent_id == caller_span and root.service == "lora-gateway"
    assert root.attributes["http.response.status_code"] == 200
    assert {"auth", "quota", "admission", "resolve", "adapter.acquire",
            "engine.time_to_first_token", "engine.stream"} <= set(by_name)
    # vLLM's own span, exported by vLLM's tracer, is the gateway's engine span's child.
    vllm_span = by_name["llm_request"]
    assert vllm_span.parent_id == by_name["engine.time_to_first_token"].span_id
    assert vllm_span.service == "lora-gateway"  # one process: the gateway's, vLLM's frontend in it
    assert vllm_span.attributes["gen_ai.usage.completion_tokens"] == \
        by_name["engine.stream"].attributes["gen_ai.usage.output_tokens"]
    assert not any(PROMPTS[0] in str(s.attributes) or env.keys["acme"] in str(s.attributes)
                   for s in spans)
    TRACE_REPORT.parent.mkdir(parents=True, exist_ok=True)
    TRACE_REPORT.write_text(render(spans, caller_trace))


def test_a_rollout_promotes_a_good_version_and_rolls_back_diverging_and_broken_ones(
        env: Env, tiny_base, tiny_template, trained_adapters, tmp_path) -> None:
    """The gateway decides on its own: answers and shadow comparisons reach the ledger, the
    replica holding the lease judges them, and the alias moves (issue 27)."""
    reg = env.registry
    reg.push("acme", "canary-bot", trained_adapters["acme"])  # v1: prod
    agreeing = train_tiny_adapter(tiny_base, tiny_template, ANSWERS["acme"], tmp_path / "v2",
                                  tmp_path, seed=12)
    reg.push("acme", "canary-bot", agreeing)  # v2: a good candidate, trained again
    client = env.client("acme")
    # Every stable answer shadowed: both versions answer it again, greedily, off the path.
    rules = RolloutRules(min_requests=3, min_step_seconds=0, max_error_rate=0.1,
                         shadow_percent=100, min_shadow_pairs=2, max_shadow_kl=1.0)

    def drive(until: set[str], tag: str) -> Rollout:
        deadline = time.monotonic() + 120
        i = 0
        while time.monotonic() < deadline:
            for _ in range(4):
                i += 1
                with contextlib.suppress(openai.APIStatusError):
                    client.chat.completions.create(
                        model="canary-bot", user=f"{tag}-{i}", max_tokens=8,
                        messages=[{"role": "user", "content": PROMPTS[0]}])
            rollout = reg.rollouts.get("acme", "canary-bot", "prod")
            if rollout.state in until:
                return rollout
        raise AssertionError(f"rollout still {rollout.state} at {rollout.percent}%: {rollout}")

    def settled(answer: str, what: str) -> None:
        # Every replica sees the alias move within its resolve TTL (no push channel on SQLite).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(openai.APIStatusError):
                if {ask(client, "canary-bot", PROMPTS[0]) for _ in range(4)} == {answer}:
                    return
            time.sleep(0.5)
        raise AssertionError(f"callers are not all on {what}")

    reg.rollouts.start("acme", "canary-bot", "prod", 2, [25, 50, 100], rules)
    done = drive({"promoted", "rolled_back"}, "good")
    assert done.state == "promoted", done
    settled(ANSWERS["acme"], "v2 after the promotion")
    actions = [e.action for e in reg.audit_log(subject_prefix="acme/canary-bot:prod", limit=50)]
    assert actions.count("rollout.step") == 2 and "rollout.promote" in actions
    steps = [e.details["evidence"]["candidate"] for e in reg.audit_log(
        subject_prefix="acme/canary-bot:prod", limit=50) if e.action == "rollout.step"]
    assert all(c["shadow_pairs"] >= 2 and c["shadow_kl"] < 1.0 for c in steps), steps
    assert all(c["ttft_p95_ms"] is not None and c["tokens_per_answer"] for c in steps), steps

    # v3 answers otherwise (another tenant's data): no request fails, its shadows diverge
    v3 = reg.push("acme", "canary-bot", trained_adapters["globex"])
    assert v3.version == 3
    reg.rollouts.start("acme", "canary-bot", "prod", 3, [25, 100], rules)
    done = drive({"promoted", "rolled_back"}, "diverging")
    assert done.state == "rolled_back" and done.reason.startswith("shadow"), done
    assert done.evidence["candidate"]["requests_5xx"] == 0
    settled(ANSWERS["acme"], "v2 again after the rollback")

    broken = train_tiny_adapter(tiny_base, tiny_template, ANSWERS["acme"], tmp_path / "v4",
                                tmp_path, seed=13)
    v4 = reg.push("acme", "canary-bot", broken)
    blob = reg.store._path(v4.files["adapter_model.safetensors"])  # corrupted behind its back
    blob.write_bytes(blob.read_bytes()[:1000])
    reg.rollouts.start("acme", "canary-bot", "prod", 4, [50, 100], rules)
    done = drive({"promoted", "rolled_back"}, "bad")
    assert done.state == "rolled_back" and "server errors" in done.reason, done
    settled(ANSWERS["acme"], "v2 again after the rollback")
    assert [e.action for e in reg.audit_log(subject_prefix="acme/canary-bot:prod", limit=50)
            ].count("rollout.rollback") == 2


FINE_TUNED_ANSWER = "Fine-tuned through the API."


def test_a_tenant_fine_tunes_through_the_api_and_calls_the_result(env: Env, tiny_contract) -> None:
    # The SDK's five calls against the real server; the worker runs inside it (serve --worker).
    acme = env.client("acme")
    data = "".join(json.dumps({"messages": [{"role": "user", "content": p},
                                            {"role": "assistant", "content": FINE_TUNED_ANSWER}]}) + "\n"
                   for p in PROMPTS)
    f = acme.files.create(file=("api.jsonl", data.encode()), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(
        model=tiny_contract.model_id, training_file=f.id, suffix="api-bot", seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 50, "batch_size": 4, "learning_rate_multiplier": 2}}})
    deadline = time.monotonic() + 240
    while (job := acme.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(1)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "api-bot@v1"
    assert ask(acme, job.fine_tuned_model, PROMPTS[0]) == FINE_TUNED_ANSWER
    assert ask(acme, "api-bot", PROMPTS[1]) == FINE_TUNED_ANSWER  # a new adapter's first version is prod
    with pytest.raises(openai.NotFoundError):
        ask(env.client("globex"), job.fine_tuned_model, PROMPTS[0])
