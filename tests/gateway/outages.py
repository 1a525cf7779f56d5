"""Real services that a test can take away and give back, and a mixed load that records
what every request got, second by second (tests/gateway/test_outages.py).

Redis is a private ``redis-server`` process: stopped, it is gone (and comes back empty,
as Redis here keeps nothing on disk). PostgreSQL and S3 (moto's server) are the real
servers behind ``Cut``, a TCP relay that can make them unreachable: every open
connection is reset and new ones are refused, which is what a client sees of a restart,
without stopping the machine's shared PostgreSQL under other tests.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.servers import free_port


class Cut:
    """A TCP relay from a local port to ``target``; ``down()`` makes the target unreachable
    (open connections reset, new ones refused) until ``up()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.up()

    @property
    def url_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._open = self._open, set()
        for conn in conns:
            # shutdown() wakes the relay thread blocked on it and ends the client's stream
            # at once, as a server process that went away does (close() alone would wait).
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                conn.close()

    def close(self) -> None:
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)


class RedisServer:
    """A private redis-server on its own port; ``stop()`` kills it, ``start()`` brings a
    new (empty) one back on the same port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (the machine's Redis comes from Debian's package)"
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@dataclass(frozen=True)
class Call:
    """One request the load sent: what it asked for and what it got."""

    t: float  # seconds since the load started, when the answer (or failure) came
    tenant: str
    model: str
    stream: bool
    cold: bool  # a model whose files are not on the gateway's disk when it is asked for
    status: int  # 0: no HTTP answer at all (a refused or broken connection)
    code: str | None = None  # the error body's code
    complete: bool = True  # a 200 stream ended with [DONE] (or an error event)
    tier: str = ""  # where the adapter came from (slot_hit, engine_hit, disk_hit, remote_fetch)
    detail: str = ""


@dataclass
class Load:
    """Threads sending chat requests (streamed and not) for ``mix`` until stopped."""

    url: str
    mix: list[tuple[str, str, str, bool]]  # (tenant, api key, model, cold)
    threads: int = 4
    pause_s: float = 0.02
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    t0: float = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        for n in range(self.threads):
            w = threading.Thread(target=self._run, args=(n,), daemon=True)
            w.start()
            self._workers.append(w)

    def stop(self) -> list[Call]:
        self._stop.set()
        for w in self._workers:
            w.join(60)
            assert not w.is_alive(), "a load thread is stuck"
        return self.calls

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = n
            while not self._stop.is_set():
                tenant, key, model, cold = self.mix[i % len(self.mix)]
                stream = (i // len(self.mix)) % 2 == 1
                self.calls.append(self._one(client, tenant, key, model, cold, stream))
                i += self.threads
                time.sleep(self.pause_s)

    def _one(self, client: httpx.Client, tenant: str, key: str, model: str, cold: bool,
             stream: bool) -> Call:
        body = {"model": model, "messages": [{"role": "user", "content": "Who are you?"}],
                "max_tokens": 4, "stream": stream}
        headers = {"Authorization": f"Bearer {key}"}
        try:
            with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                raw = r.read().decode()
        except httpx.HTTPError as exc:
            return Call(self.now(), tenant, model, stream, cold, 0, detail=repr(exc))
        code, complete = None, True
        if r.status_code != 200:
            with suppress(ValueError, KeyError, TypeError):
                code = json.loads(raw)["error"]["code"]
        elif stream:
            complete = raw.rstrip().endswith("data: [DONE]")
        return Call(self.now(), tenant, model, stream, cold, r.status_code, code, complete,
                    r.headers.get("x-lora-gateway-adapter-tier", ""),
                    raw[:300] if r.status_code >= 500 or not complete else "")


def timeline(calls: list[Call], marks: dict[str, tuple[float, float]], title: str) -> str:
    """Statuses per second, with the outage's seconds marked: the note's table."""
    per: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for c in calls:
        label = str(c.status) if c.status != 200 or c.complete else "200-cut"
        if c.code and c.status != 200:
            label += f" {c.code}"
        per[int(c.t)][label + (f" {c.tier}" if c.tier else "")] += 1
    lines = [f"{title}", "| second | state | answers |", "|---|---|---|"]
    for second in sorted(per):
        state = next((name for name, (a, b) in marks.items() if a <= second + 0.5 < b), "")
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(per[second].items()))
        lines.append(f"| {second} | {state} | {shown} |")
    return "\n".join(lines)


@contextmanager
def running(load: Load) -> Iterator[Load]:
    load.start()
    try:
        yield load
    finally:
        load.stop()


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``check`` until true; the seconds it took (AssertionError naming ``what``)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"{what} within {timeout_s}s"
        time.sleep(0.1)
    return time.monotonic() - started
