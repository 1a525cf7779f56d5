"""The engine seam: what the gateway needs from an inference engine, and nothing more.

``VllmEngine`` (``gateway.engine.vllm``) is the real one; tests use a fake with the
same interface. vLLM types never leak past this package.
"""

from gateway.engine.base import (
    AdapterRejectedError,
    Delta,
    Engine,
    EngineDeadError,
    EngineError,
    EngineRequestError,
    LoraSpec,
    SamplingSpec,
)

__all__ = [
    "AdapterRejectedError",
    "Delta",
    "Engine",
    "EngineDeadError",
    "EngineError",
    "EngineRequestError",
    "LoraSpec",
    "SamplingSpec",
]
