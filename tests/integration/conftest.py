"""Run `lora-gateway serve` as a real process (real vLLM on the CPU) for integration tests.

The process helpers are the load-test tool's (loadtest.servers): one way to start a
server, wait for readiness and stop its whole process group.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from loadtest.servers import ServerProcess as GatewayProcess
from loadtest.servers import free_port, gateway_command, start, vllm_env
from tests.conftest import REPO

__all__ = ["GatewayProcess", "free_port", "start_gateway", "vllm_env"]


def start_gateway(args: list[str], log: Path, env: Mapping[str, str] | None = None) -> GatewayProcess:
    """Start the gateway in its own process group and wait until /health says ready.

    ``env``: extra environment, e.g. secrets that are never flags (LGW_ADMIN_API_KEY)."""
    port = free_port()
    return start(gateway_command(port, args), log, cwd=REPO, env=env, port=port)
