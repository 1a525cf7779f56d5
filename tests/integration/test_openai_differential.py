"""The gateway against vLLM's own OpenAI server, the oracle: same base, same adapters.

One gateway and one vLLM server (``vllm.entrypoints.openai.api_server``) serve this
module, on the tiny base in float32 with its tool-aware ChatML template (hermes tool
parser on both), the oracle with the tenants' adapters as ``--lora-modules`` under the
names the tenants use. Every parameter set of the table goes to both endpoints,
streamed and not, and must give the same tokens, finish reasons, usage, logprobs
(within float tolerance) and tool calls. Only ids and timestamps may differ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.servers import free_port, start, vllm_server_command
from tests.conftest import ANSWERS, PROMPTS, REPO
from tests.integration.conftest import GatewayProcess, populated_registry, start_gateway

pytestmark = pytest.mark.integration
REPORT = REPO / ".cache" / "reports" / "openai-differential.json"
ENGINE = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
          "--max-loras", "2", "--max-cpu-loras", "4", "--max-lora-rank", "8"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}}}}
FORECAST = {"type": "object", "additionalProperties": False, "required": ["city", "sunny"],
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                           "sunny": {"type": "boolean"}}}

# name -> (chat parameters, completion parameters); None: not served by that endpoint.
CASES: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {
    "greedy": ({"temperature": 0, "max_tokens": 16}, {"temperature": 0, "max_tokens": 16}),
    "penalties": ({"temperature": 0, "max_tokens": 16, "presence_penalty": 0.5,
                   "frequency_penalty": 0.7, "repetition_penalty": 1.3},
                  {"temperature": 0, "max_tokens": 16, "presence_penalty": 0.5,
                   "frequency_penalty": 0.7, "repetition_penalty": 1.3}),
    "logprobs": ({"temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 3},
                 {"temperature": 0, "max_tokens": 8, "logprobs": 3}),
    "ignore_eos+min_tokens": ({"temperature": 0, "max_completion_tokens": 24, "ignore_eos": True,
                               "min_tokens": 20},
                              {"temperature": 0, "max_tokens": 24, "ignore_eos": True,
                               "min_tokens": 20}),
    "stop": ({"temperature": 0, "max_tokens": 16, "stop": [":", "!"], "stop_token_ids": [3]},
             {"temperature": 0, "max_tokens": 16, "stop": [" the"], "include_stop_str_in_output": True}),
    "seeded n=2 top_k min_p": ({"temperature": 0.9, "seed": 7, "n": 2, "top_k": 8, "min_p": 0.05,
                                "top_p": 0.9, "max_tokens": 12},
                               {"temperature": 0.9, "seed": 7, "n": 2, "top_k": 8, "min_p": 0.05,
                                "top_p": 0.9, "max_tokens": 12}),
    "logit_bias": ({"temperature": 0, "max_tokens": 6, "logit_bias": {"100": 100}},
                   {"temperature": 0, "max_tokens": 6, "logit_bias": {"100": 100}}),
    "json_schema": ({"temperature": 0, "max_tokens": 60, "response_format": {
                        "type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST}}},
                    {"temperature": 0, "max_tokens": 60, "response_format": {
                        "type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST}}}),
    "json_object": ({"temperature": 0, "max_tokens": 30, "response_format": {"type": "json_object"}},
                    None),
    "tool named": ({"temperature": 0, "max_tokens": 40, "tools": [WEATHER],
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, None),
    "tool auto": ({"temperature": 0, "max_tokens": 16, "tools": [WEATHER]}, None),
    "echo+batch": (None, {"temperature": 0, "max_tokens": 6, "echo": True,
                          "prompt": ["Hello", "Who are you?"]}),
    "batch+logprobs": (None, {"temperature": 0, "max_tokens": 6, "logprobs": 2,
                              "prompt": ["Hello", "Who are you?"]}),
}
TABLE = [(name, endpoint, stream) for name, (chat, comp) in CASES.items()
         for endpoint, params in (("chat", chat), ("completions", comp)) if params is not None
         for stream in (False, True)]


class Env:
    gateway: GatewayProcess
    oracle: GatewayProcess
    keys: dict[str, str]
    results: dict[str, bool]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base, tiny_contract, tiny_template, trained_adapters):
    root: Path = tmp_path_factory.mktemp("differential")
    e = Env()
    registry, db_url, e.keys = populated_registry(root, tiny_contract, tiny_template, trained_adapters)
    e.results = {}
    registry.close()
    port = free_port()
    e.oracle = start(vllm_server_command(port, [
        "--model", str(tiny_base.path), "--served-model-name", tiny_contract.model_id, *ENGINE,
        "--enable-lora", "--lora-modules", f"support-bot={trained_adapters['acme']}",
        f"pirate={trained_adapters['globex']}", "--enable-auto-tool-choice",
        "--tool-call-parser", "hermes"]), root / "oracle.log", port=port,
        env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"})  # what the gateway stores, per tenant
    try:
        e.gateway = start_gateway(
            ["--database-url", db_url, "--artifacts-dir", str(root / "artifacts"),
             "--cache-dir", str(root / "cache"), "--base-model-id", tiny_contract.model_id,
             "--base-model-dir", str(tiny_base.path), "--tool-call-parser", "hermes", *ENGINE],
            root / "gateway.log")
    except BaseException:
        e.oracle.stop()
        raise
    yield e
    rc, orc = e.gateway.stop(), e.oracle.stop()
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(e.results, indent=2))
    assert rc in (0, -15), f"gateway exit code {rc}:\n{e.gateway.log_tail()}"
    assert orc in (0, -15), f"oracle exit code {orc}"


def post(env: Env, server: str, path: str, body: dict[str, Any], tenant: str = "acme") -> httpx.Response:
    url = (env.gateway.url if server == "gateway" else env.oracle.url) + path
    headers = {"Authorization": f"Bearer {env.keys[tenant]}"} if server == "gateway" else {}
    return httpx.post(url, json=body, headers=headers, timeout=120)


def request(endpoint: str, params: dict[str, Any], stream: bool, model: str) -> tuple[str, dict]:
    body = {"model": model, **params}
    if endpoint == "chat":
        body.setdefault("messages", [{"role": "user", "content": PROMPTS[0]}])
    else:
        body.setdefault("prompt", "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions"), body


def answer(r: httpx.Response) -> dict[str, Any]:
    """The comparable content of a response: streams are folded into one body per choice."""
    assert r.status_code == 200, r.text
    if not r.headers["content-type"].startswith("text/event-stream"):
        body = r.json()
        return {"choices": sorted(body["choices"], key=lambda c: c["index"]), "usage": body["usage"],
                "model": body["model"], "object": body["object"]}
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in map(json.loads, events[:-1]):
        assert "error" not in chunk, chunk
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            acc = choices.setdefault(c["index"], {"text": "", "logprobs": [], "tool_calls": {}})
            delta = c.get("delta", {})
            acc["text"] += delta.get("content") or c.get("text") or ""
            for tc in delta.get("tool_calls") or []:
                slot = acc["tool_calls"].setdefault(tc["index"], {"name": "", "arguments": ""})
                fn = tc.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            lp = c.get("logprobs") or {}
            acc["logprobs"] += lp.get("content") or lp.get("token_logprobs") or []
            if c.get("finish_reason"):
                acc["finish_reason"] = c["finish_reason"]
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def same(a: Any, b: Any, path: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ (floats within 1e-4), ignoring ids and timestamps."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (a.keys() | b.keys()) - {"id", "created", "system_fingerprint"}
        return [d for k in sorted(keys) for d in same(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in same(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, abs_tol=1e-4) or a == b else [f"{path}: {a} vs {b}"]
    if isinstance(a, str) and isinstance(b, str) and path.endswith(".id"):
        return []
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def _drop_call_ids(body: dict[str, Any]) -> dict[str, Any]:
    for c in body["choices"]:
        for tc in (c.get("message") or {}).get("tool_calls") or []:
            tc.pop("id", None)
    return body


@pytest.mark.parametrize("name, endpoint, stream", TABLE,
                         ids=[f"{n}-{e}-{'stream' if s else 'full'}" for n, e, s in TABLE])
def test_gateway_answers_as_vllm_does(env: Env, name: str, endpoint: str, stream: bool) -> None:
    params = CASES[name][0 if endpoint == "chat" else 1]
    assert params is not None
    path, body = request(endpoint, dict(params), stream, "support-bot")
    ours, theirs = (_drop_call_ids(answer(post(env, s, path, body))) for s in ("gateway", "oracle"))
    diff = same(ours, theirs)
    env.results[f"{name} | {endpoint} | {'stream' if stream else 'non-stream'}"] = not diff
    assert not diff, diff[:10]


def test_each_tenant_gets_its_own_adapter_as_the_oracle_does(env: Env) -> None:
    for tenant, model in (("acme", "support-bot"), ("globex", "pirate")):
        path, body = request("chat", {"temperature": 0, "max_tokens": 24}, False, model)
        ours = post(env, "gateway", path, body, tenant).json()
        assert ours["choices"][0]["message"]["content"] == ANSWERS[tenant]
        assert not same(answer(post(env, "oracle", path, body)), _drop_call_ids(
            {k: ours[k] for k in ("choices", "usage", "model", "object")}))


def no_whitespace(base_dir: Path) -> dict[str, int]:
    """A logit_bias that bans whitespace-only tokens: the grammar allows any amount of
    whitespace in JSON, and the tiny random model would spend every token on it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    return {str(i): -100 for i in range(tok.get_vocab_size())
            if (s := tok.decode([i], skip_special_tokens=False)) and not s.strip()}


def test_structured_output_parses_against_the_schema(env: Env, tiny_base) -> None:
    params = {**(CASES["json_schema"][0] or {}), "logit_bias": no_whitespace(tiny_base.path)}
    path, body = request("chat", params, False, "pirate")
    r = post(env, "gateway", path, body, "globex")
    value = json.loads(r.json()["choices"][0]["message"]["content"])
    assert set(value) == {"city", "sunny"}
    assert value["city"] in ("Paris", "Rome", "Oslo") and isinstance(value["sunny"], bool)


def test_tool_call_round_trip(env: Env, tiny_base) -> None:
    """The model calls the tool; the tool's answer goes back through the template."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    # Room for the forced <tool_call>{"name": …, "arguments": …}</tool_call> (small tokens).
    path, body = request("chat", {"temperature": 0, "max_tokens": 120, "messages": messages,
                                  "logit_bias": no_whitespace(tiny_base.path),
                                  **{k: v for k, v in (CASES["tool named"][0] or {}).items()
                                     if k != "max_tokens"}}, False, "support-bot")
    first = post(env, "gateway", path, body).json()["choices"][0]
    assert first["message"].get("tool_calls"), first
    call = first["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
    _, follow = request("chat", {"temperature": 0, "max_tokens": 12, "messages": messages,
                                 "tools": [WEATHER]}, False, "support-bot")
    ours, theirs = post(env, "gateway", path, follow), post(env, "oracle", path, follow)
    assert ours.status_code == 200, ours.text
    assert not same(answer(ours), answer(theirs))
    assert ours.json()["usage"]["prompt_tokens"] > post(
        env, "gateway", path, {**follow, "messages": messages[:1]}).json()["usage"]["prompt_tokens"]


def test_errors_are_the_gateway_envelope_where_vllm_refuses(env: Env) -> None:
    long_prompt = {"temperature": 0, "messages": [{"role": "user", "content": "hello " * 600}]}
    path, body = request("chat", long_prompt, False, "support-bot")
    ours, theirs = post(env, "gateway", path, body), post(env, "oracle", path, body)
    assert ours.status_code == theirs.status_code == 400
    assert ours.json()["error"]["type"] == "invalid_request_error"
    path, body = request("chat", {"max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        False, "support-bot")
    ours, theirs = post(env, "gateway", path, body), post(env, "oracle", path, body)
    assert ours.status_code == theirs.status_code == 400, (ours.text, theirs.text)
    assert set(ours.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("endpoint, params", [
    ("completions", {"echo": True, "logprobs": 1}), ("completions", {"prompt_logprobs": 1}),
    ("chat", {"echo": True}), ("chat", {"prompt_logprobs": 1})])
def test_prompt_logprobs_are_refused_before_they_reach_the_engine(env: Env, endpoint: str,
                                                                  params: dict) -> None:
    """vLLM 0.32 on the CPU dies computing prompt logprobs with an adapter (found here)."""
    path, body = request(endpoint, {"max_tokens": 2, **params}, False, "support-bot")
    r = post(env, "gateway", path, body)
    assert r.status_code == 400 and "prompt logprobs" in r.json()["error"]["message"]
    assert httpx.get(env.gateway.url + "/health").status_code == 200


def test_other_tenants_adapter_is_404_on_completions_too(env: Env) -> None:
    path, body = request("completions", {"max_tokens": 2}, False, "pirate")
    r = post(env, "gateway", path, body, "acme")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_vllm_bench_serve_runs_unmodified_against_the_gateway(env: Env, tiny_base, tmp_path,
                                                             endpoint: str) -> None:
    from benchmarks.vllm_bench import bench_command, run_bench

    result = tmp_path / f"bench-{endpoint}.json"
    out = run_bench(bench_command(env.gateway.url, "support-bot", tiny_base.path, result,
                                  endpoint=endpoint, api_key=env.keys["acme"], num_prompts=4,
                                  concurrency=2, input_len=16, output_len=8), result)
    assert out["completed"] == 4 and out.get("failed", 0) == 0
    assert out["total_output_tokens"] == 4 * 8  # ignore_eos honoured


TOKENIZER_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "prompt": ("/tokenize", {"prompt": "Who are you? <|im_end|> héllo"}),
    "prompt, no special tokens, strings": ("/tokenize", {
        "prompt": "Who are you?", "add_special_tokens": False, "return_token_strs": True}),
    "chat": ("/tokenize", {"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": PROMPTS[0]}]}),
    "chat, continue final message": ("/tokenize", {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}],
        "add_generation_prompt": False, "continue_final_message": True}),
    "chat with tools": ("/tokenize", {"messages": [{"role": "user", "content": "Weather?"}],
                                      "tools": [WEATHER]}),
    "detokenize": ("/detokenize", {"tokens": [1, 2, 100, 200, 300]}),
}


@pytest.mark.parametrize("name", list(TOKENIZER_CASES))
@pytest.mark.parametrize("model", ["support-bot", "base"])
def test_tokenizer_endpoints_answer_as_vllm_does(env: Env, tiny_contract, name: str,
                                                 model: str) -> None:
    path, params = TOKENIZER_CASES[name]
    body = {"model": tiny_contract.model_id if model == "base" else model, **params}
    ours, theirs = post(env, "gateway", path, body), post(env, "oracle", path, body)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    diff = same(ours.json(), theirs.json())
    env.results[f"{name} | {path} | {model}"] = not diff
    assert not diff, diff[:10]


def test_tokenizer_endpoints_refuse_what_vllm_refuses(env: Env) -> None:
    for path, body in (("/tokenize", {"model": "support-bot", "messages": [
            {"role": "user", "content": "x"}], "add_generation_prompt": True,
            "continue_final_message": True}),):
        ours, theirs = post(env, "gateway", path, body), post(env, "oracle", path, body)
        assert ours.status_code == theirs.status_code == 400, (ours.text, theirs.text)
        assert ours.json()["error"]["code"]


RESPONSE_CASES: dict[str, dict[str, Any]] = {
    "greedy": {"input": PROMPTS[0], "temperature": 0, "max_output_tokens": 16},
    "instructions + messages": {
        "instructions": "Answer briefly.", "temperature": 0, "max_output_tokens": 16,
        "input": [{"role": "developer", "content": "Be kind."},
                  {"role": "user", "content": [{"type": "input_text", "text": PROMPTS[0]}]}]},
    "penalties + stop": {"input": PROMPTS[0], "temperature": 0, "max_output_tokens": 16,
                         "presence_penalty": 0.5, "frequency_penalty": 0.7, "stop": [":"]},
    "logprobs": {"input": PROMPTS[0], "temperature": 0, "max_output_tokens": 6, "top_logprobs": 2,
                 "include": ["message.output_text.logprobs"]},
    "seeded sampling": {"input": PROMPTS[0], "temperature": 0.9, "top_p": 0.9, "top_k": 8,
                        "seed": 7, "max_output_tokens": 12},
    "json_schema": {"input": PROMPTS[0], "temperature": 0, "max_output_tokens": 60, "text": {
        "format": {"type": "json_schema", "name": "forecast", "schema": FORECAST}}},
    "function tool": {"input": "Weather in Paris?", "temperature": 0, "max_output_tokens": 24,
                      "tools": [{"type": "function", "name": "get_weather",
                                 "parameters": WEATHER["function"]["parameters"]}]},
}
# Differ between two servers for reasons other than the model: ids, clocks, their own ids.
_VOLATILE = {"id", "item_id", "created_at", "completed_at", "call_id", "previous_response_id",
             "sequence_number", "output_index_id"}


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def response_answer(r: httpx.Response) -> dict[str, Any]:
    """A response's comparable content; a stream: its event types, text and final response."""
    assert r.status_code == 200, r.text
    if not r.headers["content-type"].startswith("text/event-stream"):
        return _stable(r.json())
    kinds, text, final = [], "", None
    for block in r.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        event = json.loads(fields["data"])
        assert fields["event"] == event["type"] != "error", event
        # How many tokens one delta carries depends on when the engine's outputs are read
        # (a busy machine coalesces them, on either server): runs of deltas count as one.
        if not (event["type"].endswith(".delta") and kinds and kinds[-1] == event["type"]):
            kinds.append(event["type"])
        text += event.get("delta", "") if event["type"] == "response.output_text.delta" else ""
        if event["type"] == "response.completed":
            final = _stable(event["response"])
    return {"events": kinds, "text": text, "response": final}


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
@pytest.mark.parametrize("name", list(RESPONSE_CASES))
def test_responses_answer_as_vllm_does(env: Env, name: str, stream: bool) -> None:
    body = {"model": "support-bot", **RESPONSE_CASES[name], "stream": stream}
    ours, theirs = (response_answer(post(env, s, "/v1/responses", body))
                    for s in ("gateway", "oracle"))
    diff = same(ours, theirs)
    env.results[f"{name} | responses | {'stream' if stream else 'non-stream'}"] = not diff
    assert not diff, diff[:10]


def test_previous_response_id_continues_as_vllm_does(env: Env) -> None:
    first = {"model": "support-bot", "input": PROMPTS[0], "temperature": 0, "max_output_tokens": 8}
    answers = {}
    for server in ("gateway", "oracle"):
        rid = post(env, server, "/v1/responses", first).json()["id"]
        follow = post(env, server, "/v1/responses", {**first, "input": "And then?",
                                                     "previous_response_id": rid})
        answers[server] = (response_answer(follow), follow.json()["previous_response_id"] == rid)
        stored = httpx.get(f"{env.gateway.url if server == 'gateway' else env.oracle.url}"
                           f"/v1/responses/{rid}", headers={"Authorization": f"Bearer {env.keys['acme']}"}
                           if server == "gateway" else {}, timeout=60)
        assert stored.status_code == 200 and stored.json()["id"] == rid
    diff = same(answers["gateway"], answers["oracle"])
    env.results["previous_response_id | responses | non-stream"] = not diff
    assert not diff, diff[:10]
    assert answers["gateway"][0]["usage"]["input_tokens"] > 20, "the first turn was rendered in"


def test_official_sdk_responses_with_a_tenants_adapter(env: Env) -> None:
    from openai import NotFoundError, OpenAI

    acme = OpenAI(base_url=env.gateway.url + "/v1", api_key=env.keys["acme"])
    made = acme.responses.create(model="support-bot", input=PROMPTS[0], temperature=0,
                                 max_output_tokens=24)
    assert made.output_text == ANSWERS["acme"][:len(made.output_text)] and made.output_text
    streamed = "".join(e.delta for e in acme.responses.create(
        model="support-bot", input=PROMPTS[0], temperature=0, max_output_tokens=24, stream=True)
        if e.type == "response.output_text.delta")
    assert streamed == made.output_text
    assert acme.responses.retrieve(made.id).id == made.id
    globex = OpenAI(base_url=env.gateway.url + "/v1", api_key=env.keys["globex"])
    with pytest.raises(NotFoundError):
        globex.responses.retrieve(made.id)
    with pytest.raises(NotFoundError):
        globex.responses.create(model="pirate", input="hi", previous_response_id=made.id)
