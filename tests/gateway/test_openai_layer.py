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


def _output(request_id: str, prompt: int, seqs: list[tuple[int, int]],
            finished: bool = False) -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, prompt_token_ids=list(range(prompt)),
                           outputs=[SimpleNamespace(index=i, token_ids=list(range(n)), text="w" * n)
                                    for i, n in seqs],
                           finished=finished)


@pytest.mark.parametrize("cumulative, steps, expected", [
    (False, [[(0, 1), (1, 1)], [(0, 2)], [(1, 3)]], {0: 3, 1: 4}),  # deltas add up
    (True, [[(0, 1), (1, 1)], [(0, 3), (1, 4)]], {0: 3, 1: 4}),  # final/cumulative: the last
])
def test_meter_counts_every_choice(cumulative: bool, steps: list, expected: dict) -> None:
    from gateway.engine.metering import metered

    async def outputs():
        for seqs in steps:
            yield _output("r1", 5, seqs)

    async def drain(meter: Meter) -> None:
        async for _ in metered(outputs(), meter, cumulative, None, "r1"):
            pass

    meter = Meter()
    asyncio.run(drain(meter))
    assert meter.prompt_tokens == {"r1": 5}
    assert {i: n for (_, i), n in meter.completion_tokens.items()} == expected
    assert meter.first_token_at is not None
    assert meter.head == "w" * expected[0]  # the first choice's text so far, deltas joined


# vLLM's cumulative outputs for n=2: each step reports the choice that moved.
TWO_CHOICES = [([(0, 1)], False), ([(1, 1)], False), ([(0, 2)], False), ([(1, 3)], True)]


def test_a_non_streamed_answer_is_metered_as_generated_and_passed_on_whole() -> None:
    """The serving class asked for the final output only: it gets one, with both choices,
    while the meter saw every token as it came."""
    from gateway.engine.metering import metered

    async def outputs():
        for seqs, finished in TWO_CHOICES:
            yield _output("r1", 5, seqs, finished)

    async def collect(meter: Meter) -> list:
        return [out async for out in metered(outputs(), meter, True, None, "r1", final_only=True)]

    meter = Meter()
    passed = asyncio.run(collect(meter))
    assert len(passed) == 1 and passed[0].finished
    assert [(seq.index, len(seq.token_ids)) for seq in passed[0].outputs] == [(0, 2), (1, 3)]
    assert {i: n for (_, i), n in meter.completion_tokens.items()} == {0: 2, 1: 3}


def test_a_non_streamed_answer_left_mid_way_is_charged_what_was_generated() -> None:
    from gateway.engine.metering import metered

    charged: list[int] = []
    closed = asyncio.Event()

    async def outputs():
        try:
            for seqs, finished in TWO_CHOICES:
                yield _output("r1", 5, seqs, finished)
                if not finished and seqs[0] == (0, 2):
                    await asyncio.sleep(3600)  # still generating when the client leaves
        finally:
            closed.set()  # the engine request is aborted

    async def leave() -> None:
        meter = Meter(on_completion=charged.append)
        task = asyncio.create_task(anext(metered(outputs(), meter, True, None, "r1", final_only=True)))
        while sum(charged) < 3:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert closed.is_set()

    asyncio.run(leave())
    assert sum(charged) == 3  # 2 tokens of choice 0 and 1 of choice 1, none of them answered


@pytest.fixture(scope="module")
def vllm_layer(tiny_base):
    """vLLM's real serving classes on a stand-in engine client: no engine process."""
    from vllm import AsyncEngineArgs
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.renderers.registry import renderer_from_config
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.input_processor import InputProcessor

    from gateway.engine.base import ServingOptions
    from gateway.engine.openai import VllmOpenAI

    config = AsyncEngineArgs(model=str(tiny_base.path), dtype="float32", max_model_len=512,
                             enable_lora=True, max_lora_rank=8).create_engine_config()
    renderer = renderer_from_config(config)
    calls: list[tuple] = []

    async def generate(prompt, params, request_id, lora_request=None, **_kw):
        """Three tokens per choice, reported as vLLM's output kinds report them: DELTA and
        CUMULATIVE one output per choice that moved (a choice per output once n > 1),
        FINAL_ONLY one output with every choice at the end."""
        calls.append((request_id, lora_request, params.output_kind))
        delta = params.output_kind == RequestOutputKind.DELTA
        final_only = params.output_kind == RequestOutputKind.FINAL_ONLY

        def seq(i: int, k: int) -> CompletionOutput:
            return CompletionOutput(index=i, text="x" * (1 if delta else k),
                                    token_ids=[40 + k] if delta else [41, 42, 43][:k],
                                    cumulative_logprob=None, logprobs=None,
                                    finish_reason="length" if k == 3 else None)

        for k in (1, 2, 3):
            if final_only and k < 3:
                continue
            n = params.n
            groups = [list(range(n))] if final_only or n == 1 else [[i] for i in range(n)]
            for g, group in enumerate(groups):
                yield RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[1, 2],
                                    prompt_logprobs=None, outputs=[seq(i, k) for i in group],
                                    finished=k == 3 and g == len(groups) - 1)

    client = SimpleNamespace(model_config=config.model_config, renderer=renderer, vllm_config=config,
                             input_processor=InputProcessor(config, renderer), errored=False,
                             generate=generate, check_admission=lambda n: None)

    async def build():  # on a loop, as the app's lifespan builds it
        return VllmOpenAI(client, ServingOptions("tiny-llama", tiny_base.path, "hermes"))  # type: ignore[arg-type]

    return asyncio.run(build()), calls


def test_vllm_serving_classes_serve_the_gateways_adapter_under_the_callers_name(vllm_layer) -> None:
    from pathlib import Path

    from gateway.api.schemas import ChatCompletionRequest, CompletionRequest
    from gateway.engine.base import LoraSpec, Route
    from gateway.engine.openai import lora_request

    layer, calls = vllm_layer
    lora = LoraSpec("acme/support-bot@v1", 7, Path("/nowhere"))

    async def go():
        chat = ChatCompletionRequest.model_validate(
            {"model": "support-bot", "n": 2, "messages": [{"role": "user", "content": "hi"}]})
        chat.request_id = "r1"
        meter = Meter()
        body = await layer.chat(chat, Route("support-bot", lora, meter, "r1"))
        assert body["id"] == "chatcmpl-r1" and body["model"] == "support-bot"
        assert calls[-1][1] == lora_request(lora)  # the very adapter add_lora accepted
        # not streamed: asked of the engine token by token (metered as generated, so a
        # client that leaves is charged), answered whole with both choices
        assert calls[-1][2] == RequestOutputKind.CUMULATIVE
        assert [c["message"]["content"] for c in body["choices"]] == ["xxx", "xxx"]
        assert meter.total_completion_tokens == body["usage"]["completion_tokens"] == 6
        stream = CompletionRequest.model_validate(
            {"model": "support-bot", "prompt": ["a", "b c"], "stream": True})
        meter = Meter()
        lines = [line async for line in await layer.completion(stream, Route("support-bot", None,
                                                                             meter, "r2"))]
        assert lines[-1] == "data: [DONE]\n\n" and calls[-1][1] is None
        assert len(meter.prompt_tokens) == 2 and meter.total_completion_tokens == 6
        too_long = ChatCompletionRequest.model_validate(
            {"model": "support-bot", "messages": [{"role": "user", "content": "hello " * 600}]})
        with pytest.raises(InvalidRequestError, match="context length"):
            await layer.chat(too_long, Route("support-bot", None, Meter(), "r3"))

    from vllm.sampling_params import RequestOutputKind

    from gateway.errors import InvalidRequestError

    asyncio.run(go())
