from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from trainer.data import DatasetError, load_chat_jsonl, validate_messages


def conv(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = conv(("user", "Hi"), ("assistant", "Hello!"))
GOOD_SYSTEM = conv(("system", "Be terse."), ("user", "Hi"), ("assistant", "Hi."))
MULTI = conv(("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye!"))


def test_valid_file_loads_with_hash_of_its_bytes(write_jsonl) -> None:
    path = write_jsonl([GOOD, GOOD_SYSTEM, MULTI])
    dataset = load_chat_jsonl(path)
    assert dataset.examples == [GOOD["messages"], GOOD_SYSTEM["messages"], MULTI["messages"]]
    assert dataset.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert dataset.path == path
    assert dataset.duplicates_removed == 0


def test_blank_lines_are_skipped(write_jsonl) -> None:
    assert len(load_chat_jsonl(write_jsonl([GOOD, "", "   ", GOOD_SYSTEM])).examples) == 2


def test_exact_duplicates_are_removed_and_counted(write_jsonl) -> None:
    # same content with different JSON spacing is still a duplicate
    spaced = '{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"}]}'
    dataset = load_chat_jsonl(write_jsonl([GOOD, MULTI, GOOD, spaced, GOOD_SYSTEM]))
    assert dataset.examples == [GOOD["messages"], MULTI["messages"], GOOD_SYSTEM["messages"]]
    assert dataset.duplicates_removed == 2


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({}, "missing 'messages'"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    (conv(("user", "Hi"), ("robot", "beep")), "messages[1].role must be one of"),
    (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        "messages[0].content must be a string, got int",
    ),
    (conv(("user", "Hi"), ("assistant", "  ")), "messages[1].content is empty"),
    (
        conv(("user", "Hi"), ("system", "late"), ("assistant", "x")),
        "messages[1]: a system message may only come first",
    ),
    (conv(("system", "s")), "no assistant turn"),
    (conv(("user", "Hi")), "no assistant turn"),
    (
        conv(("user", "Hi"), ("assistant", "Yo"), ("user", "And?")),
        "the last turn must be an assistant turn, got user",
    ),
    (
        conv(("user", "Hi"), ("user", "Hello?"), ("assistant", "Yes")),
        "messages[1]: two user turns in a row",
    ),
    (
        conv(("user", "Hi"), ("assistant", "A"), ("assistant", "B")),
        "messages[2]: two assistant turns in a row",
    ),
    (
        conv(("assistant", "I start"), ("user", "Hi"), ("assistant", "x")),
        "messages[0]: the first turn must be a user turn, got assistant",
    ),
    ({"messages": GOOD["messages"], "tools": []}, "unsupported key(s) ['tools']"),
    (
        {
            "messages": [
                {"role": "user", "content": "Hi", "name": "bob"},
                {"role": "assistant", "content": "x"},
            ]
        },
        "messages[0] has unsupported key(s) ['name']",
    ),
    (
        {"messages": ["hi", {"role": "assistant", "content": "x"}]},
        "messages[0] must be an object, got str",
    ),
]


@pytest.mark.parametrize(("line", "expected"), BAD_LINES)
def test_each_kind_of_bad_line_is_reported_with_its_line_number(write_jsonl, line, expected):
    with pytest.raises(DatasetError) as info:
        load_chat_jsonl(write_jsonl([GOOD, line]))
    [problem] = info.value.problems
    assert problem.line == 2
    assert expected in problem.message
    assert f"line 2: {expected}" in str(info.value)


def test_every_bad_line_is_collected(write_jsonl) -> None:
    lines = [GOOD, "{oops", GOOD_SYSTEM, "", conv(("user", "Hi")), MULTI, "42"]
    with pytest.raises(DatasetError) as info:
        load_chat_jsonl(write_jsonl(lines))
    assert [p.line for p in info.value.problems] == [2, 5, 7]
    assert "3 problem(s)" in str(info.value)


def test_every_problem_of_one_line_is_collected() -> None:
    problems = validate_messages([{"role": "user", "content": ""}, {"role": "bot", "content": None}])
    assert problems == [
        "messages[0].content is empty",
        "messages[1].role must be one of ['system', 'user', 'assistant'], got 'bot'",
        "messages[1].content must be a string, got NoneType",
    ]


def test_invalid_utf8_is_a_line_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"messages": "\xff"}\n')
    with pytest.raises(DatasetError, match="line 1: not valid UTF-8"):
        load_chat_jsonl(path)


def test_empty_and_missing_files_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="no examples"):
        load_chat_jsonl(empty)
    with pytest.raises(DatasetError, match="cannot read file"):
        load_chat_jsonl(tmp_path / "missing.jsonl")


def test_long_error_lists_are_capped_in_the_message(write_jsonl) -> None:
    with pytest.raises(DatasetError) as info:
        load_chat_jsonl(write_jsonl(["{"] * 60))
    assert len(info.value.problems) == 60
    assert "... and 10 more" in str(info.value)


DEMO_DATA = Path(__file__).resolve().parents[2] / "lora_gateway" / "demo_data"


def test_demo_datasets_are_valid_and_keep_their_tenant_style() -> None:
    support = load_chat_jsonl(DEMO_DATA / "support_desk.jsonl")
    pirate = load_chat_jsonl(DEMO_DATA / "pirate.jsonl")
    for dataset in (support, pirate):
        assert 24 <= len(dataset.examples) <= 40
        assert dataset.duplicates_removed == 0
    for messages in support.examples:
        answer = messages[-1]["content"]
        parsed = json.loads(answer)
        assert list(parsed) == ["status", "team", "answer"]
        assert answer == json.dumps({"status": "ok", "team": "support", "answer": parsed["answer"]})
    for messages in pirate.examples:
        assert messages[-1]["content"].startswith("Arr, matey! ")
    # the same questions go to both tenants, so a demo can show two styles side by side
    questions = [{m[0]["content"] for m in d.examples} for d in (support, pirate)]
    assert len(questions[0] & questions[1]) >= 10
