"""A tiny Llama base, its contract and template, and one compatible PEFT adapter.

Built once per session (a few seconds, mostly importing torch); tests copy the adapter
before breaking it. Variants are trained by nobody: PEFT's freshly initialised weights
have exactly the names and shapes a trained adapter has, which is all the check reads.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adapters_registry.contract import BaseContract, derive_contract
from adapters_registry.hashing import sha256_bytes
from adapters_registry.manifest import AdapterManifest
from adapters_registry.template import AdapterTemplate

BASE_ID = "tiny-llama"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A registry checks every adapter against the base it is served on.",
    "Tenants own adapters; versions are immutable; aliases move.",
]


@dataclass(frozen=True)
class Kit:
    """The session's base, contract, template and known-good adapter."""

    base_dir: Path
    contract: BaseContract
    template: AdapterTemplate
    good: Path  # a compatible adapter directory: copy it, never mutate it
    model: LlamaForCausalLM  # the base (hidden 64) that `good` was made for
    narrow_model: LlamaForCausalLM  # same layout with hidden 32, for wrong-shape adapters

    def manifest(self, **changes: Any) -> AdapterManifest:
        """A manifest that matches this base and template, with ``changes`` applied."""
        fields: dict[str, Any] = {
            "base_model_id": self.contract.model_id,
            "base_revision": self.contract.revision,
            "template_id": self.template.template_id,
            "tokenizer_sha256": self.contract.tokenizer_sha256,
            "chat_template_sha256": self.contract.chat_template_sha256,
            "rope": self.contract.rope,
            "dataset_sha256": sha256_bytes(b"\n".join(s.encode() for s in SENTENCES)),
            "seed": 0,
            "versions": {"peft": peft.__version__, "transformers": transformers.__version__},
        }
        return AdapterManifest(**(fields | changes))

    def save_peft(self, out: Path, *, narrow: bool = False, safe: bool = True, **lora: Any) -> Path:
        """Save a fresh PEFT adapter for the template, with ``lora`` overriding its fields."""
        base = copy.deepcopy(self.narrow_model if narrow else self.model)
        config = LoraConfig(**(self.template.peft_config_kwargs() | lora), task_type="CAUSAL_LM")
        get_peft_model(base, config).save_pretrained(out, safe_serialization=safe)
        return out


def _tiny_llama(vocab_size: int, hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def _build_base(out: Path) -> LlamaForCausalLM:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    model = _tiny_llama(len(fast), hidden=64)
    model.save_pretrained(out, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    root = tmp_path_factory.mktemp("compat")
    base_dir = root / "base"
    model = _build_base(base_dir)
    contract = derive_contract(base_dir, BASE_ID)
    template = AdapterTemplate(
        base_model_id=contract.model_id,
        base_revision=contract.revision,
        r=8,
        lora_alpha=16,
        target_modules=frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}),
    )
    narrow = _tiny_llama(model.config.vocab_size, hidden=32)
    kit = Kit(base_dir, contract, template, root / "good", model, narrow)
    kit.save_peft(kit.good)
    kit.manifest().write(kit.good)
    return kit


@pytest.fixture
def adapter(kit: Kit, tmp_path: Path) -> Path:
    """A private copy of the good adapter, free to break."""
    return Path(shutil.copytree(kit.good, tmp_path / "adapter"))
