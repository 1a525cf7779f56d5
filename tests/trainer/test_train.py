from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from adapters_registry.contract import derive_contract
from adapters_registry.manifest import AdapterManifest
from adapters_registry.template import expected_tensors
from trainer import train as train_module
from trainer.config import RunConfig
from trainer.data import load_chat_jsonl
from trainer.sft import SPAN_CLOSE, SPAN_OPEN
from trainer.train import TrainError, train_adapter

from .conftest import INLINE_BASE_ID

ANSWERS = {
    "Who are you?": "I am a tiny model trained for tests.",
    "What are your opening hours?": "We are open from nine to five.",
}
# 40 steps on two examples memorise them on the tiny base in well under a second
FAST = RunConfig(learning_rate=1e-2, max_steps=40, batch_size=2, warmup_steps=2)


def hf_greedy_answer(base_dir: Path, adapter_dir: Path, tokenizer: Any, question: str) -> str:
    """The adapter's greedy answer through Hugging Face's own generate(), not the trainer's code."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def write_dataset(directory: Path) -> Path:
    path = directory / "data.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in ANSWERS.items()
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, inline_base_dir, inline_template) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train")
    dataset = load_chat_jsonl(write_dataset(root))
    out = root / "adapters" / "v1"
    result = train_adapter(inline_base_dir, INLINE_BASE_ID, inline_template, dataset, FAST, out)
    return {"result": result, "dataset": dataset, "out": out}


def test_writes_a_complete_adapter_directory(trained) -> None:
    out = trained["out"]
    assert trained["result"].out_dir == out
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "golden_render.txt",
        "manifest.json",
        "training_config.json",
    ]
    # the temporary build directory was renamed, not left behind
    assert [p.name for p in out.parent.iterdir()] == ["v1"]


def test_manifest_carries_the_contract_hashes(trained, inline_base_dir, inline_template) -> None:
    contract = derive_contract(inline_base_dir, INLINE_BASE_ID)
    manifest = AdapterManifest.read(trained["out"])
    assert manifest == trained["result"].manifest
    assert manifest.base_model_id == contract.model_id == inline_template.base_model_id
    assert manifest.base_revision == contract.revision
    assert manifest.tokenizer_sha256 == contract.tokenizer_sha256
    assert manifest.chat_template_sha256 == contract.chat_template_sha256
    assert manifest.rope == contract.rope
    assert manifest.template_id == inline_template.template_id
    assert manifest.dataset_sha256 == trained["dataset"].sha256
    assert manifest.seed == FAST.seed
    assert manifest.run_config == FAST.to_dict()
    assert set(manifest.versions) == {"torch", "transformers", "peft", "lora-gateway"}
    assert manifest.metrics["examples"] == 2
    assert manifest.metrics["truncated"] == 0
    assert manifest.metrics["final_train_loss"] == trained["result"].final_loss


def test_adapter_has_exactly_the_template_shape_in_fp32(trained, inline_base_dir, inline_template) -> None:
    config = json.loads((trained["out"] / "adapter_config.json").read_text())
    assert config["r"] == inline_template.r
    assert config["lora_alpha"] == inline_template.lora_alpha
    assert set(config["target_modules"]) == inline_template.target_modules
    assert config["bias"] == "none" and not config["use_dora"]
    assert config["lora_dropout"] == FAST.lora_dropout
    assert config["base_model_name_or_path"] == INLINE_BASE_ID  # no local path in the artifact

    expected = expected_tensors(derive_contract(inline_base_dir, INLINE_BASE_ID), inline_template)
    with safe_open(trained["out"] / "adapter_model.safetensors", framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    assert shapes == expected
    assert dtypes == {"F32"}


def test_resolved_config_and_golden_render_are_written(trained, inline_template) -> None:
    written = json.loads((trained["out"] / "training_config.json").read_text())
    assert written["run_config"] == FAST.to_dict()
    assert written["template"] == inline_template.to_dict()
    assert written["dataset"]["sha256"] == trained["dataset"].sha256
    golden = (trained["out"] / "golden_render.txt").read_text()
    assert f"{SPAN_OPEN}I am a tiny model trained for tests.<|im_end|>{SPAN_CLOSE}" in golden
    assert golden.count(SPAN_OPEN) == 1


def test_loss_decreases(trained) -> None:
    losses = trained["result"].epoch_losses
    assert len(losses) == FAST.max_steps  # one step per epoch with 2 examples in a batch
    assert trained["result"].final_loss == losses[-1] < losses[0] / 10


def test_greedy_generation_reproduces_the_trained_answers(trained, inline_base_dir, inline_tokenizer) -> None:
    for question, answer in ANSWERS.items():
        assert hf_greedy_answer(inline_base_dir, trained["out"], inline_tokenizer, question) == answer


def test_same_seed_gives_the_same_adapter(tmp_path, inline_base_dir, inline_template) -> None:
    dataset = load_chat_jsonl(write_dataset(tmp_path))
    config = replace(FAST, max_steps=3)
    outs = []
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        out = tmp_path / name
        train_adapter(
            inline_base_dir, INLINE_BASE_ID, inline_template, dataset, replace(config, seed=seed), out
        )
        outs.append((out / "adapter_model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_template_of_another_base_revision_is_refused(tmp_path, inline_base_dir, inline_template) -> None:
    dataset = load_chat_jsonl(write_dataset(tmp_path))
    other = replace(inline_template, base_revision="0" * 64)
    with pytest.raises(TrainError, match="train with the template registered for this base"):
        train_adapter(inline_base_dir, INLINE_BASE_ID, other, dataset, FAST, tmp_path / "out")
    with pytest.raises(TrainError, match="is for base 'someone/else'"):
        train_adapter(
            inline_base_dir,
            INLINE_BASE_ID,
            replace(inline_template, base_model_id="someone/else"),
            dataset,
            FAST,
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_existing_output_is_never_overwritten(tmp_path, inline_base_dir, inline_template) -> None:
    dataset = load_chat_jsonl(write_dataset(tmp_path))
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        train_adapter(inline_base_dir, INLINE_BASE_ID, inline_template, dataset, FAST, tmp_path / "out")


def test_failure_while_writing_leaves_no_partial_adapter(
    tmp_path, monkeypatch, inline_base_dir, inline_template
) -> None:
    dataset = load_chat_jsonl(write_dataset(tmp_path))
    out_root = tmp_path / "adapters"

    def broken(*args: Any) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(train_module, "require_compatible", broken)  # after every file is written
    with pytest.raises(OSError, match="disk full"):
        train_adapter(
            inline_base_dir,
            INLINE_BASE_ID,
            inline_template,
            dataset,
            replace(FAST, max_steps=1),
            out_root / "v1",
        )
    assert list(out_root.iterdir()) == []


def test_examples_with_nothing_to_train_are_refused(tmp_path, inline_base_dir, inline_template) -> None:
    dataset = load_chat_jsonl(write_dataset(tmp_path))
    with pytest.raises(TrainError, match="no example has assistant tokens"):
        train_adapter(
            inline_base_dir,
            INLINE_BASE_ID,
            inline_template,
            dataset,
            replace(FAST, max_length=4),
            tmp_path / "out",
        )


def test_trains_on_the_prepared_tiny_llama(tmp_path, tiny_base, tiny_template) -> None:
    """The shared tiny-llama base (trainer.bases) trains and answers like the inline one."""
    from transformers import AutoTokenizer

    dataset = load_chat_jsonl(write_dataset(tmp_path))
    result = train_adapter(tiny_base.path, tiny_base.model_id, tiny_template, dataset, FAST, tmp_path / "out")
    assert result.manifest.base_revision == tiny_template.base_revision
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    question, answer = next(iter(ANSWERS.items()))
    assert hf_greedy_answer(tiny_base.path, result.out_dir, tokenizer, question) == answer
