"""Run `lora-gateway serve` as a real process (real vLLM on the CPU) for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import REPO

STARTUP_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    startup_seconds: float

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


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; sysfs under-reports NUMA memory here
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def start_gateway(args: list[str], log: Path) -> GatewayProcess:
    """Start the gateway in its own process group and wait until /health says ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "lora_gateway.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), *args]
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=vllm_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    gp = GatewayProcess(proc, f"http://127.0.0.1:{port}", log, 0.0)
    deadline = started + STARTUP_TIMEOUT_S
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gp.log_tail()}")
        try:
            if httpx.get(gp.url + "/health", timeout=2).status_code == 200:
                gp.startup_seconds = time.perf_counter() - started
                return gp
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    gp.stop()
    raise RuntimeError(f"gateway not ready after {STARTUP_TIMEOUT_S}s:\n{gp.log_tail()}")
