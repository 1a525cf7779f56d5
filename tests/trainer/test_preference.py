"""Preference JSONL: the three forms TRL accepts, every bad line refused with its number,
and the same clean-up as chat data (dedup, near duplicates, contamination, split)."""

from __future__ import annotations

import pytest

from trainer.config import RunConfig
from trainer.errors import ContaminationError, DatasetError
from trainer.evals import load_golden_jsonl
from trainer.preference import PreferencePair, load_preference_jsonl, prepare_preferences


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def said(text: str, role: str = "assistant") -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


MESSAGES = {"prompt": user("How do I reset my password?"),
            "chosen": said("Settings > Security > Reset password."), "rejected": said("Try somewhere.")}
FLAT = {"prompt": "How do I reset my password?", "chosen": "Settings > Security > Reset password.",
        "rejected": "Try somewhere."}
IMPLICIT = {"chosen": user("How do I reset my password?") + said("Settings > Security > Reset password."),
            "rejected": user("How do I reset my password?") + said("Try somewhere.")}
PAIR = PreferencePair(user("How do I reset my password?"), "Settings > Security > Reset password.",
                      "Try somewhere.")


@pytest.mark.parametrize("line", [MESSAGES, FLAT, IMPLICIT], ids=["messages", "flat", "implicit"])
def test_every_form_reads_as_the_same_pair(write_jsonl, line) -> None:
    assert load_preference_jsonl(write_jsonl([line])).pairs == [PAIR]


def test_a_system_prompt_and_earlier_turns_stay_in_the_prompt(write_jsonl) -> None:
    prompt = [*said("Answer with the menu path.", "system"), *user("Hi"), *said("Hello."), *user("Invoices?")]
    dataset = load_preference_jsonl(write_jsonl([{"prompt": prompt, "chosen": said("Billing > Invoices."),
                                                  "rejected": said("Somewhere in billing.")}]))
    assert dataset.pairs[0].prompt == prompt


BAD_LINES = [
    ({"prompt": "Hi", "chosen": "Hello."}, "missing 'rejected'"),
    ({"prompt": user("Hi"), "chosen": said("Same."), "rejected": said("same")}, "the same answer"),
    ({"prompt": user("Hi"), "chosen": said("Yes.", "user"), "rejected": said("No.")},
     "chosen[0].role must be 'assistant', got 'user'"),
    ({"prompt": said("Hi"), "chosen": said("Yes."), "rejected": said("No.")}, "must end on a user turn"),
    ({"prompt": user("Hi"), "chosen": said("Yes.") * 2, "rejected": said("No.")},
     "'chosen' must be exactly one assistant message, got 2 messages"),
    ({"prompt": "Hi", "chosen": " ", "rejected": "No."}, "'chosen' is empty"),
    ({"prompt": user("Hi"), "chosen": "Yes.", "rejected": said("No.")}, "'chosen' is a string but"),
    ({"prompt": "Hi", "chosen": said("Yes."), "rejected": "No."}, "'chosen' must be a string like"),
    ({"chosen": user("Hi") + said("Yes."), "rejected": user("Hello") + said("No.")},
     "different prompts (they differ at message 0)"),
    ({**FLAT, "score": 3}, "unsupported key(s) ['score']"),
    ("[1]", "expected a JSON object"),
]


def test_every_bad_line_is_reported_with_its_number(write_jsonl) -> None:
    path = write_jsonl([FLAT, *(line for line, _ in BAD_LINES)])
    with pytest.raises(DatasetError) as info:
        load_preference_jsonl(path)
    listed = str(info.value)
    for number, (_, message) in enumerate(BAD_LINES, start=2):
        assert any(p.line == number and message in p.message for p in info.value.problems), (number, listed)
    assert "line 1:" not in listed


def near(text: str) -> dict[str, str]:
    return {"prompt": text, "chosen": "Open Settings > Security, then Reset password.",
            "rejected": "Look around the app until you find it."}


QUESTIONS = ["How do I reset my password?", "Where are my invoices kept?", "How can I change my email?",
             "Can I export my data to a spreadsheet?", "How do I delete my account for good?"]


def test_dedup_near_duplicates_contamination_and_split_as_for_chats(write_jsonl) -> None:
    lines = [near(q) for q in QUESTIONS]
    lines.insert(2, near(QUESTIONS[0]))  # exact duplicate of line 1
    lines.insert(3, near(QUESTIONS[0].upper() + "!!"))  # near duplicate of line 1
    dataset = load_preference_jsonl(write_jsonl(lines))
    assert dataset.duplicates_removed == 1 and len(dataset.pairs) == 6
    golden = load_golden_jsonl(write_jsonl([{"messages": user(QUESTIONS[1]), "expected": "x"}], "g.jsonl"))
    config = RunConfig(validation_fraction=0.25, seed=3)
    prepared = prepare_preferences(dataset, config, golden.prompts(), golden.path)
    report = prepared.report
    assert (report.read, report.exact_duplicates, report.near_duplicates, report.contaminated) == (6, 1, 1, 1)
    assert (report.train, report.validation) == (3, 1)
    assert "line 4: dropped, near duplicate of line 1" in report.notes[0]
    assert any("line 2: dropped, its prompt matches golden line 1" in n for n in report.notes)
    kept = {p.prompt[0]["content"] for p in prepared.train + prepared.validation}
    assert kept == {q for i, q in enumerate(QUESTIONS) if i != 1}
    assert prepare_preferences(dataset, config, golden.prompts()).validation == prepared.validation  # seeded
    with pytest.raises(ContaminationError, match="line 2: its prompt matches golden eval line 1"):
        prepare_preferences(dataset, RunConfig(on_contamination="fail"), golden.prompts(), golden.path)
