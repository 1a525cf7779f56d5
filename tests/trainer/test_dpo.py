"""DPO on the inline tiny base: TRL's DPOTrainer learns a held-out preference, the run is
gated, written and recorded like an SFT run, and a stage continues a trained adapter."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_registry.manifest import AdapterManifest
from trainer.config import RunConfig
from trainer.data import load_chat_jsonl
from trainer.dpo import InitAdapter, _dpo_trainer, encode_pairs, train_dpo_adapter
from trainer.errors import GateFailedError, TrainError
from trainer.evals import _answer_logp, preference_eval
from trainer.preference import load_preference_jsonl, prepare_preferences
from trainer.provenance import content_sha256
from trainer.runtime import torch_threads
from trainer.train import EVAL_REPORT_FILE, FAILED_SUFFIX, train_adapter

from .conftest import INLINE_BASE_ID

WORDS = ("quick", "brown", "fox", "lazy", "dog", "hours", "open", "nine", "five", "password", "reset",
         "link", "page", "model", "tests", "tiny")
# 32 pairs train, 8 held out; two epochs at the DPO defaults take ~2 s on one core
CONFIG = RunConfig.for_method("dpo", {"validation_fraction": 0.2})


def synthetic_pairs(n: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """A learnable preference: the same answer, but 'Yes, …' preferred to 'No, …'."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        question, answer = " ".join(rng.sample(WORDS, 4)), " ".join(rng.sample(WORDS, 2))
        pairs.append({"prompt": f"Tell me about {question}?", "chosen": f"Yes, the {answer}.",
                      "rejected": f"No, the {answer}."})
    return pairs


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # what the trainer itself uses for a model this small (trainer.runtime.threads_for)
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs()))
    return path


def held_out(base_dir: Path, prefs: Path, config: RunConfig) -> list[Any]:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    validation = prepare_preferences(load_preference_jsonl(prefs), config).validation
    rows, _ = encode_pairs(tokenizer, validation, config.max_length)
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]


def fresh_adapter(base_dir: Path, template) -> Any:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(**template.peft_config_kwargs(), task_type="CAUSAL_LM")).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, inline_base_dir, inline_template, prefs) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dpo") / "v1"
    dataset = load_preference_jsonl(prefs)
    result = train_dpo_adapter(inline_base_dir, INLINE_BASE_ID, inline_template, dataset, CONFIG, out)
    return {"result": result, "out": out, "dataset": dataset}


def test_dpo_raises_held_out_preference_accuracy(trained, inline_base_dir, inline_template, prefs) -> None:
    pairs = held_out(inline_base_dir, prefs, CONFIG)
    assert len(pairs) == 8
    untrained = fresh_adapter(inline_base_dir, inline_template)
    before = preference_eval(untrained, pairs, CONFIG.beta)
    # the untrained adapter is the base: every reward is 0, every pair a tie (counted half)
    assert before.accuracy == 0.5 and before.margin == 0.0
    # the base itself does not prefer 'chosen' already (on this tiny base it prefers 'No' on all 8)
    base_prefers = sum(_answer_logp(untrained, p, c) > _answer_logp(untrained, p, r) for p, c, r in pairs)
    assert base_prefers <= len(pairs) // 2
    after = trained["result"].report.preference
    assert after.total == 8 and after.accuracy >= 0.9 and after.margin > 0.1, after.summary()
    assert all(g.passed for g in trained["result"].report.gates)
    assert [g.name for g in trained["result"].report.gates] == ["preference_accuracy", "preference_margin"]


def test_the_manifest_records_the_stage_and_the_adapter_has_the_template_shape(
    trained, inline_template
) -> None:
    out = trained["out"]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "golden_render.txt", "manifest.json",
        "training_config.json",
    ]
    manifest = AdapterManifest.read(out)
    assert manifest.template_id == inline_template.template_id
    assert manifest.dataset_sha256 == trained["dataset"].sha256
    assert manifest.run_config == CONFIG.to_dict() | {
        "method": "dpo", "loss_type": "sigmoid", "beta": 0.1, "reference_policy": "base", "init_from": None}
    assert set(manifest.versions) == {"torch", "transformers", "peft", "lora-gateway", "trl"}
    evals = manifest.metrics["evals"]
    assert evals["passed"] and evals["preference"]["accuracy"] == trained["result"].report.preference.accuracy
    assert manifest.metrics["pairs"] == 32 and manifest.metrics["validation_pairs"] == 8
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (inline_template.r, inline_template.lora_alpha)
    assert config["base_model_name_or_path"] == INLINE_BASE_ID
    render = (out / "golden_render.txt").read_text()
    assert render.startswith("chosen:\n") and "⟦Yes, the" in render and "⟦No, the" in render


def test_preference_eval_matches_trls_own_reward_metrics(inline_base_dir, inline_template, prefs) -> None:
    tokenizer = AutoTokenizer.from_pretrained(inline_base_dir)
    config = replace(CONFIG, max_steps=6)
    prepared = prepare_preferences(load_preference_jsonl(prefs), config)
    train_rows, _ = encode_pairs(tokenizer, prepared.train, config.max_length)
    val_rows, _ = encode_pairs(tokenizer, prepared.validation, config.max_length)
    base = AutoModelForCausalLM.from_pretrained(inline_base_dir, dtype=torch.float32)
    trainer = _dpo_trainer(base, tokenizer, inline_template, config, train_rows, val_rows,
                           inline_base_dir.parent / "scratch", progress=False)
    trainer.train()
    trainer.args.per_device_eval_batch_size = len(val_rows)  # one batch: TRL's means are exact
    metrics = trainer.evaluate()
    ours = preference_eval(trainer.model.eval(), [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
                                                  for r in val_rows], config.beta)
    assert ours.margin == pytest.approx(metrics["eval_rewards/margins"], abs=1e-4)
    assert ours.accuracy == pytest.approx(metrics["eval_rewards/accuracies"], abs=1e-6)
    assert ours.margin > 0  # not a comparison of zeros


def test_a_missed_preference_gate_publishes_nothing(
    tmp_path, inline_base_dir, inline_template, prefs
) -> None:
    out = tmp_path / "v1"
    starved = replace(CONFIG, learning_rate=1e-9, max_steps=1, preference_min_margin=0.1)
    with pytest.raises(GateFailedError) as info:
        train_dpo_adapter(inline_base_dir, INLINE_BASE_ID, inline_template, load_preference_jsonl(prefs),
                          starved, out)
    assert "preference_margin: FAILED" in str(info.value) and not out.exists()
    report = json.loads((Path(str(out) + FAILED_SUFFIX) / EVAL_REPORT_FILE).read_text())
    assert report["passed"] is False and len(report["preference"]["items"]) == 8
    assert report["preference"]["items"][0]["pair"].startswith("Tell me about")


def test_preference_gates_without_held_out_pairs_stop_before_training(
    tmp_path, inline_base_dir, inline_template, prefs
) -> None:
    with pytest.raises(TrainError, match="the preference gates need held-out pairs"):
        train_dpo_adapter(inline_base_dir, INLINE_BASE_ID, inline_template, load_preference_jsonl(prefs),
                          replace(CONFIG, validation_fraction=0.0), tmp_path / "v1")
    assert not any(tmp_path.iterdir())


def test_early_stopping_watches_the_held_out_dpo_loss(tmp_path, inline_base_dir, inline_template,
                                                      prefs) -> None:
    # no later epoch can beat the first by 100 nats: stop after `patience` more, keep epoch 1
    config = replace(CONFIG, epochs=4, early_stopping_patience=1, early_stopping_min_delta=100.0)
    result = train_dpo_adapter(inline_base_dir, INLINE_BASE_ID, inline_template,
                               load_preference_jsonl(prefs), config, tmp_path / "v1")
    report = result.report
    assert report.stopped_early and report.best_epoch == 1 and len(report.epochs) == 2
    assert all(e.val_loss is not None for e in report.epochs)
    assert result.final_loss == report.epochs[0].train_loss


def test_a_stage_continues_a_trained_adapter_with_the_base_as_reference(
    tmp_path, write_jsonl, inline_base_dir, inline_template, prefs
) -> None:
    chats = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant",
                                                                      "content": p["chosen"]}]}
             for p in synthetic_pairs(8, seed=1)]
    sft = train_adapter(inline_base_dir, INLINE_BASE_ID, inline_template, load_chat_jsonl(write_jsonl(chats)),
                        RunConfig(learning_rate=1e-2, max_steps=10, validation_fraction=0.0),
                        tmp_path / "sft")
    init = InitAdapter(sft.out_dir, "acme/bot@v1", content_sha256(sft.out_dir))
    # a learning rate too small to move anything: the stage's adapter is the SFT adapter
    frozen = replace(CONFIG, learning_rate=1e-9, max_steps=1, preference_min_accuracy=None,
                     preference_min_margin=None)
    result = train_dpo_adapter(inline_base_dir, INLINE_BASE_ID, inline_template,
                               load_preference_jsonl(prefs), frozen, tmp_path / "dpo", init_from=init)
    before = load_file(sft.out_dir / "adapter_model.safetensors")
    after = load_file(tmp_path / "dpo" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert any(before[k].abs().sum() > 0 for k in before if "lora_B" in k)  # really trained weights
    # rewards are measured against the base, so the SFT shift already shows in them
    assert any(abs(item["chosen_reward"]) > 1e-3 for item in result.report.preference.items)
    stage = AdapterManifest.read(tmp_path / "dpo").run_config
    assert stage["init_from"] == {"ref": "acme/bot@v1", "content_sha256": init.content_sha256}
    assert stage["reference_policy"] == "base"
