"""The README's main command on the real model: `lora-gateway demo` with SmolLM2-135M.

Runs the demo twice in one home folder: the first run converts the base (or reuses the
content-keyed cache), trains both tenants' adapters and serves; the second run must
reuse everything and serve the same tenants with the same keys.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODELS_CACHE, REPO
from tests.integration.conftest import free_port, vllm_env

pytestmark = pytest.mark.integration
TIMINGS = REPO / ".cache" / "reports" / "demo-smollm2-timings.json"
QUESTIONS = ("How do I reset my password?", "What are your opening hours?")


def run_demo(home: Path, port: int, log: Path,
             metrics_port: int) -> tuple[subprocess.Popen[bytes], float]:
    cmd = [sys.executable, "-m", "lora_gateway.cli", "demo", "--home", str(home),
           "--models-cache", str(MODELS_CACHE), "--port", str(port),
           "--metrics-port", str(metrics_port)]
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=vllm_env(), stdout=out,
                                stderr=subprocess.STDOUT, process_group=0)  # see loadtest.servers.start
    deadline = started + 900
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise AssertionError(f"demo not ready in 900s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ask(port: int, key: str, model: str, question: str) -> str:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                           timeout=180)
    r = client.chat.completions.create(model=model, temperature=0, max_tokens=48,
                                       messages=[{"role": "user", "content": question}])
    return r.choices[0].message.content or ""


def check_tenants(port: int, keys: dict[str, str]) -> dict[str, str]:
    seen = {}
    for q in QUESTIONS:
        support = ask(port, keys["acme"], "support-bot", q)
        answer = json.loads(support)  # the support desk always answers in JSON
        assert answer["status"] == "ok" and answer["team"] == "support", support
        pirate = ask(port, keys["blackbeard"], "pirate", q)
        assert pirate.startswith("Arr, matey!"), pirate
        base = ask(port, keys["acme"], "smollm2-135m-instruct", q)
        assert not base.startswith(("Arr", "{")), base
        seen[q] = f"support-bot: {support}\npirate: {pirate}\nbase: {base}"
    with pytest.raises(openai.NotFoundError):
        ask(port, keys["acme"], "pirate", QUESTIONS[0])
    return seen


def test_demo_first_and_second_run(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    port, metrics_port = free_port(), free_port()
    timings: dict[str, float] = {}

    proc, timings["first_run_ready_s"] = run_demo(home, port, tmp_path / "first.log", metrics_port)
    try:
        keys = json.loads((home / "smollm2-135m-instruct" / "keys.json").read_text())
        answers = check_tenants(port, keys)
        # the metrics name every tenant's adapters: on their own port, not the API's
        assert "lgw_requests_total" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        on_api = httpx.get(f"http://127.0.0.1:{port}/metrics",
                           headers={"Authorization": f"Bearer {keys['acme']}"})
        assert on_api.status_code == 404
    finally:
        stop(proc)
    first_log = (tmp_path / "first.log").read_text()
    assert "lora-gateway demo is serving" in first_log and keys["acme"] in first_log
    # each long step is announced before it starts; where the state lives is printed
    for tenant, adapter in (("acme", "support-bot"), ("blackbeard", "pirate")):
        assert f"==> training {tenant}/{adapter} on " in first_log
    assert f"lora-gateway registry list acme --db sqlite:///{home}" in first_log
    assert f"metrics    http://127.0.0.1:{metrics_port}/metrics" in first_log
    # the start-up warnings known to be harmless are gone, from vLLM's engine processes too
    assert "Model Runner V2 requires Triton" not in first_log
    assert "torch.distributed.reduce_op" not in first_log

    proc, timings["second_run_ready_s"] = run_demo(home, port, tmp_path / "second.log", metrics_port)
    try:
        again = json.loads((home / "smollm2-135m-instruct" / "keys.json").read_text())
        assert again == keys
        assert check_tenants(port, keys) == answers, "same adapters, same greedy answers"
    finally:
        stop(proc)
    second_log = (tmp_path / "second.log").read_text()
    assert second_log.count("is registered already") == 2
    assert "trained" not in second_log and "==> training" not in second_log
    assert "==> starting the gateway" in second_log and str(home / "smollm2-135m-instruct" / "keys.json") \
        in second_log

    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS.write_text(json.dumps({**timings, "answers": answers}, indent=2))
