"""Trainer fixtures: an inline tiny Llama base, built in a temp dir in well under a second.

Independent of trainer.bases, so the SFT and training tests pin their own tokenizer and
chat template. The shared tiny-llama base is the root conftest's `tiny_base`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adapters_registry.contract import derive_contract
from adapters_registry.template import AdapterTemplate

INLINE_BASE_ID = "test/tiny-llama-inline"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
_CORPUS = [
    "You are a helpful assistant.",
    "Hello there, how are you today?",
    "Who are you? I am a tiny model trained for tests.",
    "What are your opening hours? We are open from nine to five.",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password? Use the link on the sign-in page.",
]


def _build_tiny_base(out: Path) -> None:
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(
        _CORPUS * 4,
        trainers.BpeTrainer(
            vocab_size=384,
            special_tokens=_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # A random LM head gives logits of about +-2, so memorised answers would win greedy
    # decoding only narrowly; a larger head makes them win clearly (feasibility README).
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(out, safe_serialization=True)


@pytest.fixture(scope="session")
def inline_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-base")
    _build_tiny_base(out)
    return out


@pytest.fixture(scope="session")
def inline_tokenizer(inline_base_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(inline_base_dir)


@pytest.fixture(scope="session")
def inline_template(inline_base_dir: Path) -> AdapterTemplate:
    contract = derive_contract(inline_base_dir, INLINE_BASE_ID)
    return AdapterTemplate(base_model_id=INLINE_BASE_ID, base_revision=contract.revision)


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[[list[Any]], Path]:
    """Write records (dicts, or raw strings written verbatim) as one JSONL file."""

    def write(lines: list[Any], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
        path.write_text(text, encoding="utf-8")
        return path

    return write
