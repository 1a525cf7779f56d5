"""Failure isolation and lifecycle with real vLLM on the tiny base.

- A client that disconnects aborts its engine request, streamed or not: vLLM's own count
  of unfinished requests (``AsyncLLM.get_num_unfinished_requests``) drops back to 0. The
  gateway runs in this process for it (uvicorn in a thread), so the test can read the
  engine directly.
- SIGTERM drains a real ``lora-gateway serve`` process: readiness fails at once, liveness
  answers, new inference is refused with 503, the stream in flight finishes and the
  process exits 0; with a short grace, the stream is cut and the process still exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from adapters_registry import BaseContract
from tests.integration.conftest import (
    GatewayProcess,
    free_port,
    populated_registry,
    start_gateway,
    tiny_serve_args,
    vllm_env,
)

pytestmark = pytest.mark.integration
MAX_MODEL_LEN = 512
LONG = 400  # tokens of a long answer (min_tokens too, so EOS cannot end it early)


@dataclass
class Env:
    root: Path
    db_url: str
    keys: dict[str, str]
    contract: BaseContract
    base_dir: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base, tiny_contract, tiny_template, trained_adapters) -> Env:
    root: Path = tmp_path_factory.mktemp("lifecycle")
    registry, db_url, keys = populated_registry(root, tiny_contract, tiny_template, trained_adapters)
    registry.close()
    return Env(root, db_url, keys, tiny_contract, Path(tiny_base.path))


def chat_body(stream: bool, tokens: int = LONG) -> dict[str, object]:
    return {"model": "support-bot", "stream": stream, "max_tokens": tokens, "min_tokens": tokens,
            "temperature": 0, "messages": [{"role": "user", "content": "Who are you?"}],
            **({"stream_options": {"include_usage": True}} if stream else {})}


def raw_post(url: str, key: str, body: dict[str, object]) -> socket.socket:
    """Send a request and return the open socket, unread (the client may then just leave)."""
    host, port = url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode()
                 + b"\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    return sock


def wait_for(predicate, timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout``."""
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.02)
    return time.perf_counter() - started


def sample(metrics: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(prefix))


# ---------------------------------------------------------------- client disconnect

INPROC_ADMIN_KEY = "lgw-admin-" + "i" * 32


@dataclass
class InProcess:
    url: str
    engine: object  # gateway.engine.vllm.VllmEngine

    def unfinished(self) -> int:
        """vLLM's own count of requests it has not finished (its output processor's)."""
        return int(self.engine._engine.get_num_unfinished_requests())  # type: ignore[attr-defined]

    def metrics(self) -> str:
        # no metrics port here: on the API port, the admin's only
        return httpx.get(self.url + "/metrics", timeout=10,
                         headers={"Authorization": f"Bearer {INPROC_ADMIN_KEY}"}).text


@pytest.fixture(scope="module")
def inproc(env: Env) -> Iterator[InProcess]:
    import uvicorn

    from gateway.app import create_app, vllm_engine_factory
    from gateway.config import GatewaySettings

    saved = dict(os.environ)
    os.environ.update(vllm_env())
    engines: list[object] = []

    def factory(settings: GatewaySettings):  # the real engine, kept for the test to read
        engines.append(vllm_engine_factory(settings))
        return engines[-1]

    # As tiny_serve_args has it, with a cache of its own (it runs beside the processes).
    settings = GatewaySettings(
        database_url=env.db_url, artifacts_dir=str(env.root / "artifacts"),
        cache_dir=env.root / "inproc-cache", base_model_id=env.contract.model_id,
        base_model_dir=env.base_dir, dtype="float32", max_model_len=MAX_MODEL_LEN,
        max_lora_rank=8, admin_api_key=INPROC_ADMIN_KEY)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, engine_factory=factory),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url) or not thread.is_alive(), 420, "in-process gateway ready")
        assert thread.is_alive(), "the in-process gateway failed to start"
        yield InProcess(url, engines[0])
    finally:
        server.should_exit = True
        thread.join(60)
        os.environ.clear()
        os.environ.update(saved)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_a_client_that_leaves_aborts_its_engine_request(inproc: InProcess, env: Env,
                                                        stream: bool) -> None:
    key = env.keys["acme"]
    warm = httpx.post(inproc.url + "/v1/chat/completions", json=chat_body(False, 4),
                      headers={"Authorization": f"Bearer {key}"}, timeout=120)
    assert warm.status_code == 200, warm.text  # adapter resident: the long request starts at once
    before = inproc.metrics()
    labels = {"tenant": "acme", "adapter": "acme/support-bot"}

    sock = raw_post(inproc.url, key, chat_body(stream))
    wait_for(lambda: inproc.unfinished() == 1, 30, "the engine runs the request")
    received = b""
    if stream:  # a few events arrive, then the client leaves mid-answer
        while received.count(b"data: ") < 5:
            received += sock.recv(65536)
    else:
        time.sleep(0.5)
    sock.close()
    aborted_in = wait_for(lambda: inproc.unfinished() == 0, 5, "the engine dropped the request")

    after = inproc.metrics()
    delta = {name: sample(after, name, **labels) - sample(before, name, **labels)
             for name in ("lgw_completion_tokens_total", "lgw_prompt_tokens_total")}
    assert sample(after, "lgw_requests_total", status="aborted", **labels) \
        - sample(before, "lgw_requests_total", status="aborted", **labels) == 1
    assert sample(after, "lgw_requests_total", status="200", **labels) \
        == sample(before, "lgw_requests_total", status="200", **labels)
    assert sample(after, "lgw_requests_in_flight") == 0
    assert delta["lgw_prompt_tokens_total"] > 0
    # Charged what the engine produced before the abort, never the max_tokens asked for.
    assert delta["lgw_completion_tokens_total"] < LONG
    if stream:  # at least every token the client received (one per content event)
        assert delta["lgw_completion_tokens_total"] >= received.count(b'"content":"') - 1
    else:  # nothing reached the client, but the engine had been generating for 0.5 s
        assert delta["lgw_completion_tokens_total"] > 0
    print(f"{'streamed' if stream else 'non-streamed'}: engine dropped the request "
          f"{aborted_in:.2f}s after the disconnect; completion tokens charged "
          f"{delta['lgw_completion_tokens_total']:.0f} of {LONG}")


# ---------------------------------------------------------------- SIGTERM drain

@dataclass
class Stream:
    """A streamed request read in a thread: its events as they come, and how it ended."""

    events: list[str] = field(default_factory=list)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def run(self, url: str, key: str, body: dict[str, object]) -> None:
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {key}"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()


def start_stream(gw: GatewayProcess, key: str, tokens: int) -> Stream:
    stream = Stream()
    threading.Thread(target=stream.run, args=(gw.url, key, chat_body(True, tokens)),
                     daemon=True).start()
    wait_for(lambda: len(stream.events) >= 2 or stream.done.is_set(), 60, "the stream started")
    assert not stream.done.is_set(), stream.error or stream.events
    return stream


# The drain tests' streams use the tiny base's whole context, so they outlast the checks
# made while they run on a quiet machine too (400 tokens took 1.5 s there, 50 s on 2 busy cores).
DRAIN_CONTEXT = 2048
DRAIN_TOKENS = DRAIN_CONTEXT - 64


def serve_drained(env: Env, grace: float, name: str) -> GatewayProcess:
    gw = start_gateway(tiny_serve_args(env.root, env.db_url, env.base_dir, env.contract,
                                       "--drain-grace-seconds", str(grace),
                                       max_model_len=DRAIN_CONTEXT),
                       env.root / f"{name}.log")
    warm = httpx.post(gw.url + "/v1/chat/completions", json=chat_body(False, 4), timeout=120,
                      headers={"Authorization": f"Bearer {env.keys['acme']}"})
    assert warm.status_code == 200, warm.text
    return gw


def ends_then_exits_0(gw: GatewayProcess, stream: Stream, signalled: float,
                      within: float) -> tuple[float, float]:
    """Seconds from the signal until the stream ended (with ``[DONE]``) and until the
    process exited 0 (vLLM's engine shutdown takes up to 5 s of that)."""
    assert stream.done.wait(within), f"the stream did not end within {within}s"
    ended_in = time.perf_counter() - signalled
    assert stream.error is None and stream.events[-1] == "[DONE]", stream.error
    rc = gw.proc.wait(60)
    assert rc == 0, gw.log_tail()
    return ended_in, time.perf_counter() - signalled


def test_sigterm_drains_the_stream_in_flight_then_exits_0(env: Env) -> None:
    gw = serve_drained(env, 600, "drain")
    try:
        key = env.keys["acme"]
        stream = start_stream(gw, key, DRAIN_TOKENS)
        signalled = time.perf_counter()
        gw.proc.send_signal(signal.SIGTERM)  # the gateway only, as Kubernetes does

        wait_for(lambda: httpx.get(gw.url + "/health/ready", timeout=5).status_code == 503, 1,
                 "readiness fails at once")
        assert httpx.get(gw.url + "/health/ready", timeout=5).json() == {"status": "draining"}
        assert httpx.get(gw.url + "/health/live", timeout=5).status_code == 200
        refused = httpx.post(gw.url + "/v1/chat/completions", json=chat_body(False, 4),
                             headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "shutting down" in refused.json()["error"]["message"]
        assert not stream.done.is_set(), "the stream ended before the drain was checked"

        finished_in, exited_in = ends_then_exits_0(gw, stream, signalled, 600)
        usage = json.loads(stream.events[-2])["usage"]  # the whole answer was generated
        assert usage["completion_tokens"] == DRAIN_TOKENS, usage
        print(f"drain: stream finished {finished_in:.1f}s after SIGTERM, process exited 0 "
              f"{exited_in:.1f}s after it")
    finally:
        gw.stop()


def test_a_stream_longer_than_the_grace_is_cut_and_the_process_exits(env: Env) -> None:
    grace = 1.0
    gw = serve_drained(env, grace, "cut")
    try:
        stream = start_stream(gw, env.keys["acme"], DRAIN_TOKENS)
        signalled = time.perf_counter()
        gw.proc.send_signal(signal.SIGTERM)
        cut_in, exited_in = ends_then_exits_0(gw, stream, signalled, grace + 5)
        # Cut at its next event, in the envelope, not by a dropped connection.
        assert json.loads(stream.events[-2])["error"]["code"] == "overloaded", stream.events[-2]
        print(f"cut: stream cut after {len(stream.events)} events {cut_in:.1f}s after SIGTERM "
              f"(grace {grace}s), process exited 0 {exited_in:.1f}s after it")
    finally:
        gw.stop()
