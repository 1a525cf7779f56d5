"""gateway: the OpenAI-compatible server in front of vLLM, one shared base, many tenants.

A request's path, and where each responsibility lives:

- ``api/``: the HTTP edge. Routes (``routes``, the admin API ``admin``), request bodies
  (``schemas``), per-request state (``request``), the middleware, and the ``guard`` that
  runs every check below in order.
- ``tenancy/``: who is calling and what their ``model`` names (``directory``), how long
  those answers are trusted (``freshness``), the registry's change notices (``invalidation``).
- ``protection/``: what keeps tenants from hurting each other: quotas and their stores,
  fair admission, the engine priorities, a request's metering.
- ``residency/``: an adapter's verified files on disk and its place in the engine's
  memory and batch slots.
- ``engine/``: the seam to the inference engine (vLLM in process) and the OpenAI serving.
- ``observability/``: metrics, logs, the model-server protocol routers scrape.
- ``app`` composes them; ``config`` is every setting; ``cli`` is ``lora-gateway serve``;
  ``errors`` is the one error vocabulary, on the wire as OpenAI's error envelope.

Other parts use only the names below. They load on first use, so importing ``gateway``
(for its command) does not import FastAPI or vLLM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Engine": "gateway.engine",
    "GatewaySettings": "gateway.config",
    "LoraSpec": "gateway.engine",
    "SamplingSpec": "gateway.engine",
    "configure_logging": "gateway.observability.logs",
    "create_app": "gateway.app",
    "quiet_known_harmless": "gateway.observability.logs",
    "serve_settings": "gateway.server",
}

if TYPE_CHECKING:
    from gateway.app import create_app
    from gateway.config import GatewaySettings
    from gateway.engine import Engine, LoraSpec, SamplingSpec
    from gateway.observability.logs import configure_logging, quiet_known_harmless
    from gateway.server import serve_settings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Engine",
    "GatewaySettings",
    "LoraSpec",
    "SamplingSpec",
    "configure_logging",
    "create_app",
    "quiet_known_harmless",
    "serve_settings",
]
