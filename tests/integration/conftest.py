"""Run `lora-gateway serve` as a real process (real vLLM on the CPU) for integration tests.

The process helpers are the load-test tool's (loadtest.servers): one way to start a
server, wait for readiness and stop its whole process group.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from adapters_registry import AdapterTemplate, BaseContract, Registry
from loadtest.servers import ServerProcess as GatewayProcess
from loadtest.servers import free_port, gateway_command, start, vllm_env
from tests.conftest import REPO, populate

__all__ = ["GatewayProcess", "free_port", "populated_registry", "start_gateway", "tiny_serve_args",
           "vllm_env"]


def start_gateway(args: list[str], log: Path, env: Mapping[str, str] | None = None) -> GatewayProcess:
    """Start the gateway in its own process group and wait until /health says ready.

    ``env``: extra environment, e.g. secrets that are never flags (LGW_ADMIN_API_KEY)."""
    port = free_port()
    return start(gateway_command(port, args), log, cwd=REPO, env=env, port=port)


def populated_registry(root: Path, contract: BaseContract, template: AdapterTemplate,
                       adapters: dict[str, Path]) -> tuple[Registry, str, dict[str, str]]:
    """A SQLite registry in ``root`` as ``tests.conftest.populate`` fills it: (registry, its
    URL, each tenant's key)."""
    db_url = f"sqlite:///{root / 'registry.db'}"
    registry = Registry.open(db_url, root / "artifacts")
    return registry, db_url, populate(registry, contract, template, adapters)


def tiny_serve_args(root: Path, db_url: str, base_dir: Path, contract: BaseContract,
                    *more: str, max_model_len: int = 512) -> list[str]:
    """`serve` flags for the tiny base on the registry made by ``populated_registry``."""
    return ["--database-url", db_url, "--artifacts-dir", str(root / "artifacts"),
            "--cache-dir", str(root / "cache"), "--base-model-id", contract.model_id,
            "--base-model-dir", str(base_dir), "--dtype", "float32",
            "--max-model-len", str(max_model_len), "--max-lora-rank", "8", *more]
