"""Run `lora-gateway serve` as a real process (real vLLM on the CPU) for integration tests.

The process helpers are the load-test tool's (loadtest.servers): one way to start a
server, wait for readiness and stop its whole process group.
"""

from __future__ import annotations

from pathlib import Path

from adapters_registry import AdapterTemplate, Registry
from adapters_registry.contract import BaseContract
from loadtest.servers import ServerProcess as GatewayProcess
from loadtest.servers import free_port, gateway_command, start, vllm_env
from tests.conftest import REPO, populate

__all__ = ["GatewayProcess", "free_port", "start_gateway", "tiny_gateway_args", "tiny_registry",
           "vllm_env"]


def start_gateway(args: list[str], log: Path) -> GatewayProcess:
    """Start the gateway in its own process group and wait until /health says ready."""
    port = free_port()
    return start(gateway_command(port, args), log, cwd=REPO, port=port)


def tiny_gateway_args(root: Path, db_url: str, base_dir: Path, base_id: str,
                      *extra: str) -> list[str]:
    """``serve`` arguments for the tiny base with its registry and caches under ``root``."""
    return ["--database-url", db_url, "--artifacts-dir", str(root / "artifacts"),
            "--cache-dir", str(root / "cache"), "--base-model-id", base_id,
            "--base-model-dir", str(base_dir), "--dtype", "float32", "--max-model-len", "512",
            "--max-lora-rank", "8", *extra]


def tiny_registry(root: Path, contract: BaseContract, template: AdapterTemplate,
                  adapters: dict[str, Path]) -> tuple[str, Registry, dict[str, str]]:
    """A SQLite registry under ``root`` populated as tests.conftest.populate does:
    (database URL, registry, API keys by tenant)."""
    db_url = f"sqlite:///{root / 'registry.db'}"
    registry = Registry.open(db_url, root / "artifacts")
    return db_url, registry, populate(registry, contract, template, adapters)
