"""Start and stop real servers for benchmarks: the gateway, or vLLM's own OpenAI server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; sysfs under-reports NUMA memory here
    # VLLM_CPU_NUM_OF_RESERVED_CPU stays vLLM's default (one core for the scheduler and
    # the server, as `lora-gateway serve` runs): forcing 0 bound the engine's OpenMP threads
    # to every core, where they spun against the processes feeding them.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    startup_seconds: float = 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def rss_by_process(self) -> dict[str, int]:
        """Resident bytes of the server and of every process it started (vLLM's engine core),
        keyed ``name:pid``."""
        return {f"{_name(pid)}:{pid}": _rss(pid) for pid in [self.proc.pid, *_descendants(self.proc.pid)]}


def start(cmd: Sequence[str], log: Path, *, cwd: Path | None = None,
          env: Mapping[str, str] | None = None, port: int, ready_path: str = "/health") -> ServerProcess:
    """Run ``cmd`` in its own process group; wait until ``ready_path`` answers 200.

    A process group, not a session: Linux schedules each session as one group
    (autogroup), and a server in a session of its own, its vLLM worker spinning on a
    pinned core, starved the measuring process for seconds at a time (runnable, not
    running), which showed up as server latency that was not the server's.
    """
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=vllm_env(env), stdout=out,
                                stderr=subprocess.STDOUT, process_group=0)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
    deadline = started + STARTUP_TIMEOUT_S
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2:4]} exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                server.startup_seconds = time.perf_counter() - started
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


def gateway_command(port: int, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "lora_gateway.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), *args]


def vllm_server_command(port: int, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
            "--port", str(port), *args]


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        # Each thread has its own children file: vLLM's engine core is started from a
        # worker thread of the gateway, not its main thread.
        kids = []
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids += [int(c) for c in children.read_text().split()]
            except OSError:
                continue
        found += kids
        frontier += kids
    return found


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
