"""The vLLM serving layer's own seams, without an engine: the start-up check and the meter."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from gateway.engine.base import Meter
from gateway.engine.openai import check_vllm_layer
from gateway.errors import ServingLayerMismatchError


def test_the_installed_vllm_has_the_serving_layer_the_gateway_targets() -> None:
    check_vllm_layer()


def test_a_changed_serving_layer_refuses_to_start(monkeypatch) -> None:
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    monkeypatch.delattr(OpenAIServingChat, "create_chat_completion")
    with pytest.raises(ServingLayerMismatchError, match="create_chat_completion is missing"):
        check_vllm_layer()


def test_runtime_lora_loading_by_name_refuses_to_start(monkeypatch) -> None:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    with pytest.raises(ServingLayerMismatchError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        check_vllm_layer()


def _output(request_id: str, prompt: int, seqs: list[tuple[int, int]]) -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, prompt_token_ids=list(range(prompt)),
                           outputs=[SimpleNamespace(index=i, token_ids=list(range(n))) for i, n in seqs])


@pytest.mark.parametrize("cumulative, steps, expected", [
    (False, [[(0, 1), (1, 1)], [(0, 2)], [(1, 3)]], {0: 3, 1: 4}),  # deltas add up
    (True, [[(0, 1), (1, 1)], [(0, 3), (1, 4)]], {0: 3, 1: 4}),  # final/cumulative: the last
])
def test_meter_counts_every_choice(cumulative: bool, steps: list, expected: dict) -> None:
    from gateway.engine.openai import _metered

    async def outputs():
        for seqs in steps:
            yield _output("r1", 5, seqs)

    async def drain(meter: Meter) -> None:
        async for _ in _metered(outputs(), meter, cumulative):
            pass

    meter = Meter()
    asyncio.run(drain(meter))
    assert meter.prompt_tokens == {"r1": 5}
    assert {i: n for (_, i), n in meter.completion_tokens.items()} == expected
    assert meter.first_token_at is not None
