"""vLLM, through the gateway's engine, decodes trained and composed adapters exactly as PEFT.

One engine start-up (float32, in process) for the whole module; every comparison runs
in one event loop, then the tests read the results.
"""

from __future__ import annotations

import asyncio
import gc
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.engine import Engine, LoraSpec
from lora_gateway.parity import (
    Generation,
    ServingParityReport,
    check_serving_parity,
    peft_greedy,
    served_greedy,
)
from tests.conftest import ANSWERS, PROMPTS
from tests.integration.conftest import vllm_env
from trainer.compose import Source, compose_adapters
from trainer.errors import ParityError

pytestmark = pytest.mark.integration

MAX_TOKENS = 32
# The trained prompts, plus prompts the adapters never saw (less peaked logits).
MESSAGES = tuple(({"role": "user", "content": p},) for p in
                 (*PROMPTS, "Tell me about the weather today.", "Écris une phrase en français."))


@dataclass
class ParityRun:
    reports: dict[str, ServingParityReport | ParityError]
    # acme's PEFT answer vs the engine serving globex, on the same prompt ids
    crossed: tuple[Generation, Generation]


async def _run(engine: Engine, adapters: dict[str, Path], base_dir: Path) -> ParityRun:
    reports: dict[str, ServingParityReport | ParityError] = {}
    specs = {name: LoraSpec(name, 1000 + i, path) for i, (name, path) in enumerate(adapters.items())}
    for name, spec in specs.items():
        try:
            reports[name] = await check_serving_parity(engine, spec, base_dir, MESSAGES, MAX_TOKENS)
        except ParityError as exc:
            reports[name] = exc
    # A control that must differ, so equality above means something.
    ok = reports["acme"]
    assert isinstance(ok, ServingParityReport), ok
    ids = ok.prompts[0].prompt_ids
    peft_acme = await asyncio.to_thread(peft_greedy, adapters["acme"], base_dir, [ids], MAX_TOKENS)
    served_globex = await served_greedy(engine, specs["globex"], ids, MAX_TOKENS)
    return ParityRun(reports, (peft_acme[0], served_globex))


@pytest.fixture(scope="module")
def parity_run(tiny_base, tiny_template, trained_adapters, tmp_path_factory) -> ParityRun:
    composed = compose_adapters(
        tiny_base.path, tiny_template,
        [Source(trained_adapters["acme"], 0.5), Source(trained_adapters["globex"], 0.5)],
        "svd", tmp_path_factory.mktemp("parity") / "mix",
    )
    adapters = {**trained_adapters, "mix": composed.out_dir}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in vllm_env().items():
            if key not in os.environ:
                mp.setenv(key, value)
        from gateway.engine.vllm import VllmEngine, VllmOptions

        engine = VllmEngine.start(VllmOptions(
            model_dir=tiny_base.path, dtype="float32", max_model_len=512, max_num_seqs=4,
            max_loras=2, max_cpu_loras=4, max_lora_rank=8,
        ))  # fmt: skip
        try:
            return asyncio.run(_run(engine, adapters, tiny_base.path))
        finally:
            engine.shutdown()
            # Collect vLLM's engine now: left to interpreter exit, its __del__ runs
            # against half-torn-down modules and prints a TypeError.
            del engine
            gc.collect()


def _passed(run: ParityRun, name: str) -> ServingParityReport:
    report = run.reports[name]
    if isinstance(report, ParityError):
        pytest.fail(str(report))
    assert report.passed
    return report


@pytest.mark.parametrize("tenant", sorted(ANSWERS))
def test_trained_adapter_decodes_like_peft(parity_run, tenant):
    report = _passed(parity_run, tenant)
    assert len(report.prompts) == len(MESSAGES)
    for p in report.prompts:
        assert p.peft.completion_tokens == p.served.completion_tokens == len(p.peft.token_ids)
        assert p.peft.text == p.served.text and p.peft.finish_reason == p.served.finish_reason
    # the adapter is really in effect on both sides: the trained answer, to the trained prompts
    for p in report.prompts[: len(PROMPTS)]:
        assert p.served.text == ANSWERS[tenant] and p.served.finish_reason == "stop"


def test_composed_adapter_decodes_like_peft(parity_run):
    report = _passed(parity_run, "mix")
    sources = [_passed(parity_run, t) for t in ANSWERS]
    texts = [p.served.text for p in report.prompts]
    for source in sources:
        assert texts != [p.served.text for p in source.prompts]


def test_comparison_tells_adapters_apart(parity_run):
    peft_acme, served_globex = parity_run.crossed
    assert peft_acme.text == ANSWERS["acme"]
    assert served_globex.text == ANSWERS["globex"]
    assert not peft_acme.same_output(served_globex)
