from __future__ import annotations

import copy

import pytest

from trainer.sft import IGNORE_INDEX, ChatTemplateError, encode_example, render_golden

MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am a tiny model trained for tests."},
    {"role": "user", "content": "What are your opening hours?"},
    {"role": "assistant", "content": "We are open from nine to five. Ünïcödé 🙂"},
]


def labelled_runs(example) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def test_only_assistant_content_and_end_of_turn_are_trained(inline_tokenizer) -> None:
    example = encode_example(inline_tokenizer, MULTI_TURN, max_length=1024)
    full = inline_tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    assert inline_tokenizer.decode(example.input_ids) == full
    assert not example.truncated
    # trained tokens are the input tokens themselves (the model shifts them)
    for token, label in zip(example.input_ids, example.labels, strict=True):
        assert label in (IGNORE_INDEX, token)
    decoded = [inline_tokenizer.decode(run) for run in labelled_runs(example)]
    assert decoded == [
        "I am a tiny model trained for tests.<|im_end|>",
        "We are open from nine to five. Ünïcödé 🙂<|im_end|>",
    ]


def test_truncation_keeps_the_start_and_its_mask(inline_tokenizer) -> None:
    full = encode_example(inline_tokenizer, MULTI_TURN, max_length=1024)
    # cut inside the second assistant answer
    cut = len(full.input_ids) - 6
    short = encode_example(inline_tokenizer, MULTI_TURN, max_length=cut)
    assert short.truncated
    assert short.input_ids == full.input_ids[:cut]
    assert short.labels == full.labels[:cut]
    second = inline_tokenizer.decode(labelled_runs(short)[1])
    assert "We are open from nine to five.".startswith(second[:10])
    assert "<|im_end|>" not in second

    # cut before any assistant token: nothing is trained
    prompt = inline_tokenizer.apply_chat_template(MULTI_TURN[:2], tokenize=False, add_generation_prompt=True)
    n_prompt = len(inline_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    early = encode_example(inline_tokenizer, MULTI_TURN, max_length=n_prompt)
    assert early.truncated and early.trained_tokens == 0


def test_golden_render_marks_the_trained_spans(inline_tokenizer) -> None:
    assert render_golden(inline_tokenizer, MULTI_TURN) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n"
        "<|im_start|>assistant\n⟦I am a tiny model trained for tests.<|im_end|>⟧\n"
        "<|im_start|>user\nWhat are your opening hours?<|im_end|>\n"
        "<|im_start|>assistant\n⟦We are open from nine to five. Ünïcödé 🙂<|im_end|>⟧\n"
    )


def test_template_that_rewrites_earlier_turns_is_refused(inline_tokenizer) -> None:
    tokenizer = copy.deepcopy(inline_tokenizer)
    # the header depends on the number of messages, so a longer render is not an extension
    tokenizer.chat_template = (
        "turns={{ messages | length }}\n"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="not prefix-stable at assistant message 2"):
        encode_example(tokenizer, MULTI_TURN, max_length=1024)


def test_template_without_end_marker_still_masks_by_prefix(inline_tokenizer) -> None:
    tokenizer = copy.deepcopy(inline_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}"
    )
    example = encode_example(tokenizer, MULTI_TURN, max_length=1024)
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == [
        "I am a tiny model trained for tests.",
        "We are open from nine to five. Ünïcödé 🙂",
    ]


def test_a_token_holding_prompt_text_is_not_trained(inline_tokenizer) -> None:
    tokenizer = copy.deepcopy(inline_tokenizer)
    # the generation prompt ends in a space that BPE merges with the answer's first word
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    example = encode_example(tokenizer, MULTI_TURN, max_length=1024)
    runs = [tokenizer.decode(run) for run in labelled_runs(example)]
    assert runs == [
        " am a tiny model trained for tests.",
        " are open from nine to five. Ünïcödé 🙂",
    ]


def test_failing_template_is_a_chat_template_error(inline_tokenizer) -> None:
    tokenizer = copy.deepcopy(inline_tokenizer)
    tokenizer.chat_template = "{{ raise_exception('no system messages') }}"
    with pytest.raises(ChatTemplateError, match="no system messages"):
        encode_example(tokenizer, MULTI_TURN, max_length=1024)
