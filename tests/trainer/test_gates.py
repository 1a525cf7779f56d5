"""Training runs against their gates: a bad run is refused and kept aside, a good one ships;
early stopping keeps the best epoch's weights; QLoRA fails fast where it cannot run."""

from __future__ import annotations

import importlib.util
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_registry.compat import check_adapter
from adapters_registry.contract import derive_contract
from adapters_registry.prompts import stop_token_ids
from trainer import loop as loop_module
from trainer.config import RunConfig
from trainer.data import load_chat_jsonl
from trainer.errors import GateFailedError, QuantizationUnavailableError, TrainError
from trainer.evals import EvalSet, load_golden_jsonl, load_regression_jsonl, regression_eval
from trainer.loop import EarlyStopping, lr_factor
from trainer.qlora import require_quantization_support
from trainer.train import EVAL_REPORT_FILE, FAILED_SUFFIX, train_adapter

from .conftest import INLINE_BASE_ID

ANSWERS = {
    "Who are you?": "I am a tiny model trained for tests.",
    "What are your opening hours?": "We are open from nine to five.",
}
FAST = RunConfig(learning_rate=1e-2, max_steps=40, batch_size=2, warmup_steps=2, validation_fraction=0.0)


def chat(question: str, answer: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


@pytest.fixture
def dataset(write_jsonl):
    return load_chat_jsonl(write_jsonl([{"messages": chat(q, a)} for q, a in ANSWERS.items()]))


def golden_set(write_jsonl, expected: dict[str, str]) -> EvalSet:
    lines = [{"messages": chat(q), "expected": a} for q, a in expected.items()]
    return load_golden_jsonl(write_jsonl(lines, name="golden.jsonl"))


def train(base_dir: Path, template, dataset, config: RunConfig, out: Path, **kw: Any):
    return train_adapter(base_dir, INLINE_BASE_ID, template, dataset, config, out, **kw)


def test_a_run_that_misses_the_golden_gate_is_refused_and_kept_aside(
    tmp_path, write_jsonl, dataset, inline_base_dir, inline_template
) -> None:
    # Golden prompts the data never taught (contamination would drop taught ones).
    wrong = golden_set(write_jsonl, {"Hello there, how are you today?": "The quick brown fox."})
    out = tmp_path / "v1"
    with pytest.raises(GateFailedError) as info:
        train(inline_base_dir, inline_template, dataset, FAST, out, golden=wrong)
    assert not out.exists()
    kept = Path(str(out) + FAILED_SUFFIX)
    assert info.value.kept_at == kept and kept.is_dir()
    assert "golden_score: FAILED, measured 0, required >= 1" in str(info.value)
    report = json.loads((kept / EVAL_REPORT_FILE).read_text())
    assert report["passed"] is False
    assert report["golden"]["items"][0]["expected"] == "The quick brown fox."
    assert report["golden"]["items"][0]["ok"] is False
    # the refused adapter cannot be registered by mistake: the registry check refuses it
    violations = check_adapter(kept, derive_contract(inline_base_dir, INLINE_BASE_ID), inline_template)
    assert any(EVAL_REPORT_FILE in v.message for v in violations)

    # a second failed attempt replaces the scratch folder; the version folder stays absent
    with pytest.raises(GateFailedError):
        train(inline_base_dir, inline_template, dataset, replace(FAST, seed=1), out, golden=wrong)
    assert kept.is_dir() and not out.exists()


def test_golden_gate_passes_on_a_learned_answer(
    tmp_path, write_jsonl, inline_base_dir, inline_template
) -> None:
    # One answer taught under several prompts is a style the model applies to new ones; the
    # golden set asks a prompt the data also holds (dropped as contaminated) and a new one.
    answer = "I am a tiny model trained for tests."
    taught = ["Who are you?", "Hello there, how are you today?", "What are your opening hours?",
              "How do I reset my password?"]
    data = load_chat_jsonl(write_jsonl([{"messages": chat(q, answer)} for q in taught]))
    golden = load_golden_jsonl(write_jsonl([
        {"messages": chat("Who are you?"), "expected": answer},
        {"messages": chat("The quick brown fox?"), "expected": "I am a tiny model", "match": "prefix"}],
        name="golden.jsonl"))
    config = replace(FAST, max_steps=60, on_contamination="drop")
    result = train(inline_base_dir, inline_template, data, config, tmp_path / "v1", golden=golden)
    report = result.report
    assert report is not None and report.data.contaminated == 1
    assert report.data.train == 3
    assert [str(g) for g in report.gates] == ["golden_score: passed, measured 1, required >= 1"]
    evals = result.manifest.metrics["evals"]
    assert evals["passed"] is True and evals["golden"]["score"] == 1.0
    assert evals["golden"]["sha256"] == golden.sha256


def test_regression_gate_refuses_an_adapter_that_rewrites_the_base(
    tmp_path, write_jsonl, dataset, inline_base_dir, inline_template
) -> None:
    prompts = load_regression_jsonl(write_jsonl([{"messages": chat(q)} for q in ANSWERS], name="reg.jsonl"))
    config = replace(FAST, regression_max_kl=0.5, regression_min_agreement=1.0)
    with pytest.raises(GateFailedError) as info:
        train(inline_base_dir, inline_template, dataset, config, tmp_path / "v1", regression=prompts)
    failed = {g.name for g in info.value.gates if not g.passed}
    assert failed == {"regression_kl", "regression_agreement"}
    assert info.value.report.regression.mean_kl > 0.5


def test_regression_eval_of_an_untrained_adapter_is_the_base(
    write_jsonl, inline_base_dir, inline_template
) -> None:
    # PEFT initialises B = 0: the adapter is exactly the base, so KL is 0 and every answer agrees.
    prompts = load_regression_jsonl(write_jsonl([{"messages": chat(q)} for q in ANSWERS], name="reg.jsonl"))
    tokenizer = AutoTokenizer.from_pretrained(inline_base_dir)
    base = AutoModelForCausalLM.from_pretrained(inline_base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(**inline_template.peft_config_kwargs())).eval()
    result = regression_eval(model, tokenizer, prompts, replace(FAST, eval_max_new_tokens=8),
                             stop_token_ids(inline_base_dir, tokenizer))
    assert result.mean_kl == pytest.approx(0.0, abs=1e-6) and result.agreement == 1.0


def test_validation_perplexity_is_measured_each_epoch_and_gated(
    tmp_path, write_jsonl, inline_base_dir, inline_template
) -> None:
    many = [{"messages": chat(f"Question {i}: what is {i} plus {i}?", f"It is {2 * i}.")} for i in range(10)]
    data = load_chat_jsonl(write_jsonl(many))
    config = RunConfig(learning_rate=1e-2, epochs=3, batch_size=4, warmup_steps=1, validation_fraction=0.2,
                       early_stopping_patience=None, max_val_perplexity=1.0)
    with pytest.raises(GateFailedError) as info:
        train(inline_base_dir, inline_template, data, config, tmp_path / "v1")
    report = info.value.report
    assert (report.data.train, report.data.validation) == (8, 2)
    assert [e.epoch for e in report.epochs] == [1, 2, 3]
    assert all(e.val_loss is not None and e.val_perplexity > 1.0 for e in report.epochs)
    assert [str(g).split(",")[0] for g in report.gates] == ["val_perplexity: FAILED"]

    # asking for the gate with nothing held out is refused before training
    with pytest.raises(TrainError, match="no validation examples"):
        train(inline_base_dir, inline_template, data, replace(config, validation_fraction=0.0),
              tmp_path / "v2")


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch(monkeypatch) -> None:
    losses = iter([1.0, 0.5, 0.7, 0.6])
    monkeypatch.setattr(loop_module, "validation_loss", lambda *_a, **_k: next(losses))
    model = _Tiny()
    stopper = EarlyStopping(model, validation=[object()], config=RunConfig(early_stopping_patience=2),
                            pad_id=0)  # type: ignore[list-item]
    decisions = []
    for epoch in range(1, 5):
        with torch.no_grad():
            model.w.fill_(float(epoch))
        decisions.append(stopper.end_epoch(train_loss=1.0 / epoch))
    assert decisions == [False, False, False, True]
    assert stopper.best_epoch == 2 and stopper.stopped_early
    stopper.restore_best()
    assert model.w.tolist() == [2.0, 2.0, 2.0] and model.frozen.tolist() == [1.0, 1.0]
    assert stopper.kept_perplexity() == pytest.approx(1.6487, abs=1e-4)


def test_early_stopped_run_saves_the_best_epochs_weights(
    tmp_path, write_jsonl, monkeypatch, inline_base_dir, inline_template
) -> None:
    snapshots: list[dict[str, torch.Tensor]] = []
    losses = iter([0.5, 0.9, 1.2, 1.5])

    def fake_validation_loss(model, *_args: Any) -> float:
        snapshots.append({n.replace(".default", ""): p.detach().clone()
                          for n, p in model.named_parameters() if p.requires_grad})
        return next(losses)

    monkeypatch.setattr(loop_module, "validation_loss", fake_validation_loss)
    many = [{"messages": chat(f"Question {i}: what is {i} times three?", f"It is {3 * i}.")}
            for i in range(10)]
    config = RunConfig(learning_rate=1e-2, epochs=6, batch_size=4, warmup_steps=1, validation_fraction=0.2,
                       early_stopping_patience=2)
    result = train(inline_base_dir, inline_template, load_chat_jsonl(write_jsonl(many)), config,
                   tmp_path / "v1")
    report = result.report
    assert report is not None and report.stopped_early and report.best_epoch == 1
    assert len(report.epochs) == 3 and result.manifest.metrics["best_epoch"] == 1
    saved = load_file(str(tmp_path / "v1" / "adapter_model.safetensors"))
    assert saved.keys() == snapshots[0].keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, snapshots[0][name]), name
    assert any(not torch.equal(snapshots[0][n], snapshots[2][n]) for n in saved)  # training moved on


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_schedules_warm_up_then_never_reach_zero(scheduler: str) -> None:
    factors = [lr_factor(step, 20, 4, scheduler) for step in range(20)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert max(factors) == pytest.approx(1.0) and min(factors) > 0
    if scheduler == "constant":
        assert factors[4:] == [1.0] * 16
    else:
        assert all(a >= b for a, b in itertools.pairwise(factors[4:]))


def test_qlora_runs_only_where_cuda_and_bitsandbytes_are(
    tmp_path, dataset, inline_base_dir, inline_template
) -> None:
    available = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    config = replace(FAST, quantization="nf4", max_steps=5)
    if not available:
        with pytest.raises(QuantizationUnavailableError) as info:
            require_quantization_support("nf4")
        assert "a CUDA GPU" in str(info.value) or "bitsandbytes" in str(info.value)
        assert "set quantization: none" in str(info.value)
        with pytest.raises(QuantizationUnavailableError):
            train(inline_base_dir, inline_template, dataset, config, tmp_path / "v1")
        assert not (tmp_path / "v1").exists()
        return
    # With a GPU: a 4-bit NF4 base, and an fp32 adapter of exactly the template's shape.
    train(inline_base_dir, inline_template, dataset, config, tmp_path / "v1")
    contract = derive_contract(inline_base_dir, INLINE_BASE_ID)
    assert check_adapter(tmp_path / "v1", contract, inline_template) == []
