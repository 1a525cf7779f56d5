"""JSON logs: one object per line, a request's lines carry its id, tenant, adapter version,
tier, status and tokens, and no line ever carries the API key or the prompt text."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from gateway.app import create_app
from gateway.cli import settings_from_args
from gateway.observability.logs import REQUEST_FIELDS, log_handler
from lora_gateway.cli import build_parser
from tests.gateway.conftest import Gateway, make_settings, serving
from tests.gateway.fakes import FakeEngine

PROMPT = "Who are you? xyzzy-prompt-marker"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Every record from here on, as ``--log-format json`` writes it."""
    out = io.StringIO()
    handler = log_handler("json", out)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


def parsed(out: io.StringIO) -> list[dict]:
    lines = out.getvalue().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


@pytest.mark.parametrize("stream", [False, True])
def test_a_requests_lines_carry_its_fields_and_never_the_key_or_prompt(
        gw: Gateway, json_lines: io.StringIO, stream: bool) -> None:
    r = gw.chat("acme", "support-bot", PROMPT, stream=stream, max_tokens=5)
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    lines = parsed(json_lines)
    keys = {"time", "level", "logger", "message", "request_id", "tenant", *REQUEST_FIELDS}
    assert all(keys <= set(line) for line in lines)
    mine = [line for line in lines if line["request_id"] == rid]
    assert mine and all(line["tenant"] == "acme" for line in mine)
    served = [line for line in mine if line["message"].startswith("served ")]
    assert len(served) == 1, mine
    assert served[0]["adapter_version"] == "acme/support-bot@v1"
    assert served[0]["adapter_tier"] in ("remote_fetch", "disk_hit", "engine_hit", "slot_hit")
    assert served[0]["status"] == "200"
    assert served[0]["prompt_tokens"] > 0 and served[0]["completion_tokens"] > 0
    text = json_lines.getvalue()
    assert gw.env.keys["acme"] not in text  # type: ignore[attr-defined]
    assert "xyzzy-prompt-marker" not in text


def test_every_answer_has_an_access_line_without_key_or_prompt(
        registry_env, tmp_path, json_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``serve --log-format json`` runs uvicorn: its access line joins the request's lines."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # An earlier server in this process may have installed uvicorn's own logging config.
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    app = create_app(make_settings(registry_env, tmp_path), engine_factory=lambda _s: FakeEngine())
    key = registry_env.keys["acme"]
    body = {"model": "support-bot", "messages": [{"role": "user", "content": PROMPT}]}
    with serving(app, log_config=None, log_level="info") as url:
        answers = [httpx.post(f"{url}/v1/chat/completions", json={**body, **extra},
                              headers={"Authorization": f"Bearer {auth}"})
                   for extra, auth in (({}, key), ({"model": "not-mine"}, key), ({"n": 0}, key),
                                       ({}, "lgw_wrong"))]
    assert [a.status_code for a in answers] == [200, 404, 400, 401]
    lines = parsed(json_lines)
    for answer, tenant in zip(answers, ("acme", "acme", "acme", "-"), strict=True):
        access = [line for line in lines if line["logger"] == "uvicorn.access"
                  and line["request_id"] == answer.headers["x-request-id"]]
        assert len(access) == 1, lines
        assert access[0]["status"] == str(answer.status_code) and access[0]["tenant"] == tenant
    text = json_lines.getvalue()
    assert key not in text and "lgw_wrong" not in text
    assert "xyzzy-prompt-marker" not in text


def test_the_serve_flag_selects_json(tmp_path) -> None:
    required = ["--database-url", "sqlite://", "--artifacts-dir", str(tmp_path),
                "--cache-dir", str(tmp_path), "--base-model-id", "b", "--base-model-dir", str(tmp_path)]
    args = build_parser().parse_args(["serve", *required, "--log-format", "json"])
    assert settings_from_args(args).log_format == "json"
    args = build_parser().parse_args(["serve", *required])
    assert settings_from_args(args).log_format == "text"
