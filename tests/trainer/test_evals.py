"""Eval sets (golden, regression): loading with line-numbered errors, matching, gate checks."""

from __future__ import annotations

import math

import pytest

from trainer.config import RunConfig
from trainer.errors import DatasetError
from trainer.evals import (
    GoldenResult,
    RegressionResult,
    check_gates,
    is_match,
    load_golden_jsonl,
    load_regression_jsonl,
)

USER = {"role": "user", "content": "Who are you?"}


def test_golden_lines_take_expected_or_a_final_assistant_turn(write_jsonl) -> None:
    path = write_jsonl([
        {"messages": [USER], "expected": "A bot.", "match": "prefix"},
        {"messages": [USER, {"role": "assistant", "content": "A tiny bot."}]},
    ], name="golden.jsonl")
    golden = load_golden_jsonl(path)
    assert [(i.line, i.expected, i.match) for i in golden.items] == [(1, "A bot.", "prefix"),
                                                                      (2, "A tiny bot.", "exact")]
    assert golden.items[1].messages == [USER]
    assert golden.prompts() == [(1, [USER]), (2, [USER])]
    assert len(golden.sha256) == 64


def test_every_bad_golden_line_is_reported_with_its_number(write_jsonl) -> None:
    path = write_jsonl([
        {"messages": [USER]},                                         # 1: no expected answer
        {"messages": [USER], "expected": "x", "match": "regex"},     # 2: unknown match kind
        {"messages": [USER], "expected": "x", "score": 1},           # 3: unknown key
        {"messages": [{"role": "assistant", "content": "hi"}], "expected": "x"},  # 4: ends on assistant
        "not json",                                                   # 5
        {"messages": [{"role": "user", "content": ""}], "expected": "x"},  # 6: empty turn
        {"messages": [USER], "expected": "   "},                      # 7: blank expected
    ], name="golden.jsonl")
    with pytest.raises(DatasetError) as info:
        load_golden_jsonl(path)
    lines = {p.line for p in info.value.problems}
    assert lines == {1, 2, 3, 4, 5, 6, 7}
    message = str(info.value)
    assert "'match' must be one of" in message and "unsupported key(s) ['score']" in message
    assert "the last turn must be a user turn" in message and "invalid JSON" in message


def test_regression_lines_are_prompts_only(write_jsonl) -> None:
    ok = load_regression_jsonl(write_jsonl([{"messages": [USER]}], name="reg.jsonl"))
    assert ok.items[0].expected is None
    with pytest.raises(DatasetError, match=r"line 1: unsupported key\(s\) \['expected'\]"):
        load_regression_jsonl(write_jsonl([{"messages": [USER], "expected": "x"}], name="bad.jsonl"))
    with pytest.raises(DatasetError, match="no prompts"):
        load_regression_jsonl(write_jsonl([], name="empty.jsonl"))


@pytest.mark.parametrize(("got", "expected", "match", "ok"), [
    ("A tiny bot.", "A tiny bot.", "exact", True),
    (" A tiny bot.\n", "A tiny bot.", "exact", True),
    ("A tiny bot. And more.", "A tiny bot.", "exact", False),
    ("A tiny bot. And more.", "A tiny bot.", "prefix", True),
    ("I am A tiny bot.", "A tiny bot.", "prefix", False),
    ("I am A tiny bot.", "A tiny bot.", "contains", True),
    ("I am a bot.", "A tiny bot.", "contains", False),
])
def test_match_kinds(got: str, expected: str, match: str, ok: bool) -> None:
    assert is_match(got, expected, match) is ok


def golden(score: float) -> GoldenResult:
    return GoldenResult(score, int(score * 4), 4, [])


def regression(mean_kl: float, agreement: float) -> RegressionResult:
    return RegressionResult(mean_kl, mean_kl, agreement, 4, [])


def verdicts(gates) -> dict[str, bool]:
    return {g.name: g.passed for g in gates}


def test_gates_are_configured_by_their_eval_sets_and_thresholds() -> None:
    config = RunConfig()
    assert check_gates(config, 3.0, None, None) == []  # no threshold, no eval set: no gate
    assert verdicts(check_gates(config, 3.0, golden(1.0), regression(0.1, 0.0))) == {
        "golden_score": True, "regression_kl": True}
    strict = RunConfig(max_val_perplexity=2.0, golden_min_score=0.75, regression_max_kl=0.05,
                       regression_min_agreement=0.5)
    assert verdicts(check_gates(strict, 3.0, golden(0.5), regression(0.1, 0.25))) == {
        "val_perplexity": False, "golden_score": False, "regression_kl": False,
        "regression_agreement": False}
    assert all(verdicts(check_gates(strict, 2.0, golden(0.75), regression(0.05, 0.5))).values())


def test_a_non_finite_measurement_never_passes() -> None:
    (gate,) = check_gates(RunConfig(regression_max_kl=1e9), None, None, regression(math.nan, 1.0))
    assert not gate.passed
    assert str(gate) == "regression_kl: FAILED, measured nan, required <= 1e+09"
