"""SFT -> DPO stages on SmolLM2-135M, the second registered and served like any adapter.

The demo's support-desk SFT adapter is published as acme/support-bot@v1; `lora-gateway
train --method dpo --init-from acme/support-bot@v1` continues it on the bundled preference
set and publishes v2; vLLM, through the gateway's engine, decodes v2 exactly as PEFT does
(lora_gateway.parity, as in test_trainer_parity). Bounded: a one-epoch SFT stage, the
DPO defaults, one engine start-up.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from pathlib import Path

import pytest

from adapters_registry import AdapterTemplate, Registry, derive_contract
from gateway.engine import LoraSpec
from lora_gateway.cli import main
from lora_gateway.demo import dataset_path
from lora_gateway.parity import ServingParityReport, check_serving_parity
from tests.conftest import MODELS_CACHE, REPO
from tests.integration.conftest import vllm_env

pytestmark = pytest.mark.integration
TIMINGS = REPO / ".cache" / "reports" / "dpo-smollm2.json"
MAX_TOKENS = 32
QUESTIONS = ("How do I enable two-factor authentication?", "How do I change my phone number?",
             "How do I see my order history?", "What are your opening hours?")


@pytest.fixture(scope="module")
def smollm2():  # -> trainer.bases.PreparedBase
    from trainer.bases import prepare_base

    return prepare_base("smollm2-135m-instruct", MODELS_CACHE)


def test_dpo_stage_on_the_demo_sft_adapter_is_served_like_peft(smollm2, tmp_path, capsys) -> None:
    db, artifacts = f"sqlite:///{tmp_path / 'reg.db'}", tmp_path / "artifacts"
    registry = Registry.open(db, artifacts)
    contract = registry.register_base(derive_contract(smollm2.path, smollm2.model_id,
                                                      license=smollm2.license))
    template = registry.register_template(AdapterTemplate(contract.model_id, contract.revision))
    registry.create_tenant("acme")
    registry.close()
    common = ["train", "--db", db, "--artifacts", str(artifacts), "--template", template.template_id,
              "--base-dir", str(smollm2.path), "--publish", "acme/support-bot", "--no-progress"]
    timings: dict[str, float] = {}

    started = time.perf_counter()
    assert main([*common, "--data", str(dataset_path("support_desk.jsonl")), "--out", str(tmp_path / "sft"),
                 "--set", "epochs=1", "--set", "validation_fraction=0"]) == 0
    timings["sft_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    code = main([*common, "--method", "dpo", "--init-from", "acme/support-bot@v1",
                 "--data", str(dataset_path("support_desk_preferences.jsonl")),
                 "--out", str(tmp_path / "dpo")])
    timings["dpo_seconds"] = time.perf_counter() - started
    out = capsys.readouterr().out
    assert code == 0, out
    assert "published acme/support-bot@v2" in out and "gate:  preference_accuracy: passed" in out
    metrics = json.loads((tmp_path / "dpo" / "manifest.json").read_text())["metrics"]
    timings["dpo_train_seconds"] = metrics["train_seconds"]
    preference = metrics["evals"]["preference"]

    # serve v2 from the registry's verified copy, as the gateway would
    registry = Registry.open(db, artifacts)
    try:
        version = registry.resolve(registry.get_tenant("acme"), "support-bot@v2")
        served_dir = tmp_path / "served"
        registry.fetch(version, served_dir)
    finally:
        registry.close()
    report = _parity(smollm2.path, LoraSpec(version.ref, version.lora_int_id, served_dir))
    assert report.passed and len(report.prompts) == len(QUESTIONS)
    for p in report.prompts:
        assert p.peft.text == p.served.text and p.peft.completion_tokens == p.served.completion_tokens
    # the stage kept the support desk's JSON envelope and learned to name the menu path
    answers = [p.served.text for p in report.prompts]
    assert all(a.startswith('{"status": "ok", "team": "support", "answer": ') for a in answers), answers
    assert sum('"answer": "Go to ' in a for a in answers) >= 2, answers

    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    shown = {p.messages[0]["content"]: p.served.text for p in report.prompts}
    TIMINGS.write_text(json.dumps({**timings, "preference": preference, "answers": shown}, indent=2))


def _parity(base_dir: Path, spec: LoraSpec) -> ServingParityReport:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in vllm_env().items():
            if key not in os.environ:
                mp.setenv(key, value)
        from gateway.engine.vllm import VllmEngine, VllmOptions

        engine = VllmEngine.start(VllmOptions(
            model_dir=base_dir, dtype="float32", max_model_len=512, max_num_seqs=4,
            max_loras=1, max_cpu_loras=2, max_lora_rank=8,
        ))  # fmt: skip
        try:
            messages = [({"role": "user", "content": q},) for q in QUESTIONS]
            return asyncio.run(check_serving_parity(engine, spec, base_dir, messages, MAX_TOKENS))
        finally:
            engine.shutdown()
            del engine  # collected now, not at interpreter exit (see test_trainer_parity)
            gc.collect()
