"""The start-up noise filter drops exactly the listed records, here and in vLLM's processes."""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest

from gateway.observability.logs import KNOWN_HARMLESS, KnownHarmlessFilter, quiet_known_harmless


def record(name: str, msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_filter_drops_listed_messages_only() -> None:
    f = KnownHarmlessFilter()
    for name, start in KNOWN_HARMLESS:
        assert not f.filter(record(name, start + " and the rest of the message"))
        # the same logger's other warnings still pass, as does the message from elsewhere
        assert f.filter(record(name, "KV cache is too small for max_model_len"))
        assert f.filter(record("vllm.engine.other", start))


def unset(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "")  # recorded, so whatever the test sets is undone after it
    monkeypatch.delenv(name)


def test_engine_processes_get_the_same_filter(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    unset(monkeypatch, "VLLM_LOGGING_CONFIG_PATH")
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    with warnings.catch_warnings():
        quiet_known_harmless(tmp_path)
    config = json.loads((tmp_path / "vllm-logging.json").read_text())
    assert os.environ["VLLM_LOGGING_CONFIG_PATH"] == str(tmp_path / "vllm-logging.json")
    assert config["filters"]["known_harmless"] == {"()": "gateway.observability.logs.KnownHarmlessFilter"}
    assert {name for name, _ in KNOWN_HARMLESS} <= set(config["loggers"])
    assert "vllm" in config["loggers"] and config["handlers"]  # vLLM's own set-up is kept
    assert os.environ["PYTHONWARNINGS"].startswith("default,ignore:")


def test_an_operators_logging_config_wins(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", "/etc/mine.json")
    unset(monkeypatch, "PYTHONWARNINGS")
    with warnings.catch_warnings():
        quiet_known_harmless(tmp_path)
    assert os.environ["VLLM_LOGGING_CONFIG_PATH"] == "/etc/mine.json"
    assert not (tmp_path / "vllm-logging.json").exists()
