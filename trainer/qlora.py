"""Loading the base for training: full precision, or 4-bit NF4 for QLoRA.

QLoRA (``quantization: nf4``) loads the frozen base in 4-bit NF4 with bf16 compute
through bitsandbytes, on a CUDA GPU only. Where either is missing, the run stops
before anything is loaded, naming what is missing. The adapter's tensors are trained
in fp32 on top of the 4-bit base and keep the template's shapes, so QLoRA and plain
LoRA adapters of one template are interchangeable to the registry and the gateway.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from trainer.errors import QuantizationUnavailableError


def require_quantization_support(quantization: str) -> None:
    """Raise QuantizationUnavailableError listing what a quantized run needs and lacks."""
    if quantization == "none":
        return
    missing = []
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        missing.append(f"a CUDA GPU (torch {torch.__version__} is {build} and sees no GPU)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    else:
        try:
            importlib.import_module("bitsandbytes")
        except Exception as exc:  # a broken native library raises anything
            missing.append(f"a working bitsandbytes (importing it failed: {exc})")
    if missing:
        raise QuantizationUnavailableError(
            f"quantization={quantization!r} (QLoRA: 4-bit NF4 base, bf16 compute) needs "
            + " and ".join(missing)
            + "; set quantization: none to train in full precision on this machine"
        )


def load_base_for_training(base_dir: Path, quantization: str) -> Any:
    """The base model, frozen weights ready for LoRA: fp32 on CPU, or 4-bit NF4 on the GPU."""
    if quantization == "none":
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    require_quantization_support(quantization)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base_dir,
        quantization_config=bnb,
        dtype=torch.bfloat16,
        device_map={"": torch.cuda.current_device()},
    )
    # casts norms to fp32 and enables input gradients, so LoRA trains stably on 4-bit weights
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
