"""The engine seam: what the gateway needs from an inference engine, and nothing more.

``VllmEngine`` (``gateway.engine.vllm``) is the real one; tests use a fake with the
same interface. vLLM types never leak past this package.
"""

from gateway.engine.base import Delta, Engine, LoraSpec, SamplingSpec
from gateway.errors import AdapterRejectedError, EngineDeadError, EngineError, EngineRequestError

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
