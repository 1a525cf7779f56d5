"""Data hygiene for one run: near duplicates, eval contamination, the train/validation split."""

from __future__ import annotations

from dataclasses import replace

import pytest

from trainer.config import RunConfig
from trainer.data import load_chat_jsonl, prepare_data
from trainer.errors import ContaminationError, DatasetError
from trainer.evals import load_golden_jsonl
from trainer.hygiene import normalize_text, split_indices

NO_SPLIT = RunConfig(validation_fraction=0.0)


def conv(user: str, answer: str, system: str | None = None) -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


DISTINCT = [
    conv("How do I reset my password?", "Use the link on the sign-in page."),
    conv("What are your opening hours?", "We are open from nine to five, Monday to Friday."),
    conv("Do you ship to Canada?", "Yes, orders to Canada arrive within a week."),
    conv("Can I pay by invoice?", "Invoices are available for business accounts."),
]


def test_normalisation_folds_case_width_punctuation_and_spacing() -> None:
    assert normalize_text("  Hello,   WORLD!! ") == normalize_text("hello world") == "hello world"
    assert normalize_text("ｆｕｌｌ　ｗｉｄｔｈ") == "full width"


def test_near_duplicates_are_dropped_with_their_line_numbers(write_jsonl) -> None:
    near = conv("How do I reset my password??", "Use the link on the sign-in page!")
    path = write_jsonl([*DISTINCT[:2], near, *DISTINCT[2:]])
    prepared = prepare_data(load_chat_jsonl(path), NO_SPLIT)
    assert prepared.train == [d["messages"] for d in DISTINCT]
    assert prepared.report.near_duplicates == 1
    assert prepared.report.read == 5 and prepared.report.train == 4
    (note,) = prepared.report.notes
    assert note.startswith("line 3: dropped, near duplicate of line 1 (similarity 1.00")


def test_near_duplicate_threshold_is_respected_and_can_be_disabled(write_jsonl) -> None:
    # one word changed in a long answer: similar, but not identical
    a = conv("Tell me about the harbour.", "The harbour is busy at dawn, with fishing boats "
             "coming home and gulls circling over the nets on the old stone pier.")
    b = conv("Tell me about the harbour.", "The harbour is busy at dusk, with fishing boats "
             "coming home and gulls circling over the nets on the old stone pier.")
    path = write_jsonl([a, b])
    dataset = load_chat_jsonl(path)
    assert prepare_data(dataset, replace(NO_SPLIT, near_duplicate_threshold=0.8)).report.near_duplicates == 1
    assert prepare_data(dataset, replace(NO_SPLIT, near_duplicate_threshold=1.0)).report.near_duplicates == 0
    assert prepare_data(dataset, replace(NO_SPLIT, near_duplicate_threshold=None)).report.train == 2


def test_a_shared_system_prompt_alone_does_not_make_duplicates(write_jsonl) -> None:
    system = "You are the support desk of a large online shop. Answer in one short sentence. " * 4
    path = write_jsonl([conv(d["messages"][0]["content"], d["messages"][1]["content"], system)
                        for d in DISTINCT])
    assert prepare_data(load_chat_jsonl(path), NO_SPLIT).report.near_duplicates == 0
    # the same dialogue under another system prompt is a different example too
    other = write_jsonl([DISTINCT[0], conv(*(m["content"] for m in DISTINCT[0]["messages"]), system)],
                        name="other.jsonl")
    assert prepare_data(load_chat_jsonl(other), NO_SPLIT).report.near_duplicates == 0


def golden_file(write_jsonl, *prompts: str):
    return load_golden_jsonl(write_jsonl(
        [{"messages": [{"role": "user", "content": p}], "expected": "x"} for p in prompts],
        name="golden.jsonl"))


def test_examples_repeating_a_golden_prompt_are_dropped_and_reported(write_jsonl) -> None:
    golden = golden_file(write_jsonl, "Do you ship to CANADA", "Is there a store in Paris?")
    dataset = load_chat_jsonl(write_jsonl(DISTINCT))
    prepared = prepare_data(dataset, NO_SPLIT, golden.prompts(), golden.path)
    assert prepared.report.contaminated == 1
    assert DISTINCT[2]["messages"] not in prepared.train and len(prepared.train) == 3
    assert "line 3: dropped, its prompt matches golden line 1" in "\n".join(prepared.report.notes)


def test_a_golden_prompt_in_a_later_turn_is_found(write_jsonl) -> None:
    multi = {"messages": [*DISTINCT[0]["messages"], {"role": "user", "content": "Is there a store in Paris?"},
                          {"role": "assistant", "content": "No, we only sell online."}]}
    golden = load_golden_jsonl(write_jsonl([{"messages": multi["messages"][:3], "expected": "No."}],
                                           name="golden.jsonl"))
    prepared = prepare_data(load_chat_jsonl(write_jsonl([multi, *DISTINCT[1:]])), NO_SPLIT,
                            golden.prompts(), golden.path)
    assert prepared.report.contaminated == 1 and len(prepared.train) == 3


def test_contamination_policy_fail_lists_every_example(write_jsonl) -> None:
    golden = golden_file(write_jsonl, "How do I reset my password?", "Can I pay by invoice")
    dataset = load_chat_jsonl(write_jsonl(DISTINCT))
    with pytest.raises(ContaminationError) as info:
        prepare_data(dataset, replace(NO_SPLIT, on_contamination="fail"), golden.prompts(), golden.path)
    message = str(info.value)
    assert "2 example(s) repeat golden prompts" in message
    assert "line 1: its prompt matches golden eval line 1 (exact)" in message
    assert "line 4: its prompt matches golden eval line 2" in message


def test_nothing_left_to_train_is_an_error(write_jsonl) -> None:
    golden = golden_file(write_jsonl, "How do I reset my password?")
    dataset = load_chat_jsonl(write_jsonl(DISTINCT[:1]))
    with pytest.raises(DatasetError, match="no examples left"):
        prepare_data(dataset, NO_SPLIT, golden.prompts(), golden.path)


def test_split_is_seeded_disjoint_and_complete() -> None:
    train, validation = split_indices(50, 0.1, seed=3)
    assert len(validation) == 5 and sorted(train + validation) == list(range(50))
    assert split_indices(50, 0.1, seed=3) == (train, validation)
    assert split_indices(50, 0.1, seed=4) != (train, validation)
    assert split_indices(5, 0.1, seed=0) == ([0, 1, 2, 3, 4], [])  # rounds down to none
    assert len(split_indices(2, 0.5, seed=0)[0]) == 1  # never leaves nothing to train on


def test_prepared_split_follows_the_config(write_jsonl) -> None:
    many = [conv(f"Question number {i} about topic {i * 7}?", f"Answer {i}: {'abc' * i}") for i in range(20)]
    dataset = load_chat_jsonl(write_jsonl(many))
    prepared = prepare_data(dataset, RunConfig(validation_fraction=0.25, seed=1))
    assert (prepared.report.train, prepared.report.validation) == (15, 5)
    assert not {str(m) for m in prepared.train} & {str(m) for m in prepared.validation}
