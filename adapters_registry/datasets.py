"""Chat data as tenants send it for training: one conversation, one preference pair, one
JSONL file in OpenAI's fine-tuning formats, checked line by line.

The trainer reads the same conversations (``trainer.data``, ``trainer.preference``) with
these checks, so a file the gateway accepts at upload is one the trainer accepts too. Two
formats of OpenAI's (https://platform.openai.com/docs/api-reference/fine-tuning):

- supervised: ``{"messages": [{"role", "content"}, ...]}``, an optional system message
  first, then user and assistant turns alternating, ending on an assistant turn;
- preference (DPO): ``{"input": {"messages": [...]}, "preferred_output": [{"role":
  "assistant", "content": ...}], "non_preferred_output": [...]}``, the input ending on a
  user turn.

``check_fine_tune_file`` says which one a file is, or every bad line with its number; a file
is one format throughout. What the trainer supports of OpenAI's richer lines (tools, function
calls, per-message weights, names, images) is refused by name, not dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = frozenset({"role", "content"})
FileFormat = Literal["supervised", "dpo"]
_DPO_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
MAX_PROBLEMS = 50  # reported by line; the count says how many more


def parse_json_object(line: bytes) -> tuple[dict[str, Any] | None, list[str]]:
    """One JSONL line as a JSON object, or None and why not."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, ["not valid UTF-8"]
    except json.JSONDecodeError as exc:
        return None, [f"invalid JSON ({exc.msg} at column {exc.colno})"]
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {type(record).__name__}"]
    return record, []


def validate_messages(messages: Any) -> list[str]:
    """Every problem with one conversation (empty when it is a valid training example)."""
    if not isinstance(messages, list) or not messages:
        return ["'messages' must be a non-empty list"]
    problems: list[str] = []
    roles: list[str | None] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(f"{where} must be an object, got {type(message).__name__}")
            roles.append(None)
            continue
        extra = sorted(set(message) - _MESSAGE_KEYS)
        if extra:
            problems.append(f"{where} has unsupported key(s) {extra}; only role and content")
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"{where}.role must be one of {list(ROLES)}, got {role!r}")
            role = None
        content = message.get("content")
        if not isinstance(content, str):
            problems.append(f"{where}.content must be a string, got {type(content).__name__}")
        elif not content.strip():
            problems.append(f"{where}.content is empty")
        roles.append(role)
    known = [role for role in roles if role is not None]
    if len(known) == len(roles):  # turn order is only meaningful when every role is valid
        problems.extend(order_problems(known))
    return problems


def order_problems(roles: list[str]) -> list[str]:
    """Turn order: optional system first, then user/assistant alternating, assistant last."""
    problems = [
        f"messages[{i}]: a system message may only come first"
        for i, role in enumerate(roles)
        if role == "system" and i > 0
    ]
    previous: tuple[int, str] | None = None
    for i, role in enumerate(roles):
        if role == "system":
            continue
        if previous is None and role != "user":
            problems.append(f"messages[{i}]: the first turn must be a user turn, got {role}")
        elif previous is not None and role == previous[1]:
            problems.append(f"messages[{i}]: two {role} turns in a row (after messages[{previous[0]}])")
        previous = (i, role)
    if "assistant" not in roles:
        problems.append("no assistant turn to train on")
    elif roles[-1] != "assistant":
        problems.append(f"the last turn must be an assistant turn, got {roles[-1]}")
    return problems


def prompt_problems(key: str, prompt: Any) -> list[str]:
    if not isinstance(prompt, list) or not prompt:
        return [f"{key!r} must be a non-empty list of messages or a string"]
    last = prompt[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        return [f"{key!r} must end on a user turn (the answers are the assistant's)"]
    # a prompt is valid when answering it would make a valid conversation
    return [f"{key}: {p}" for p in validate_messages([*prompt, {"role": "assistant", "content": "-"}])]


def read_answer(key: str, value: Any) -> tuple[str, list[str]]:
    """The text of a one-message assistant answer, or why it is not one."""
    if isinstance(value, str):
        return "", [f"{key!r} is a string but 'prompt' is a list of messages: use "
                    f"[{{\"role\": \"assistant\", \"content\": ...}}] or make all three strings"]
    if not isinstance(value, list) or len(value) != 1:
        got = f"{len(value)} messages" if isinstance(value, list) else type(value).__name__
        return "", [f"{key!r} must be exactly one assistant message, got {got}"]
    message = value[0]
    if not isinstance(message, dict):
        return "", [f"{key}[0] must be an object, got {type(message).__name__}"]
    problems = []
    extra = sorted(set(message) - {"role", "content"})
    if extra:
        problems.append(f"{key}[0] has unsupported key(s) {extra}; only role and content")
    if message.get("role") != "assistant":
        problems.append(f"{key}[0].role must be 'assistant', got {message.get('role')!r}")
    content = message.get("content")
    if not isinstance(content, str):
        problems.append(f"{key}[0].content must be a string, got {type(content).__name__}")
    elif not content.strip():
        problems.append(f"{key}[0].content is empty")
    return (content if isinstance(content, str) else ""), problems


@dataclass(frozen=True)
class FileCheck:
    """What a fine-tuning file holds, or why it cannot train."""

    format: FileFormat | None  # None when no line could be read as either
    examples: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, problem)

    def summary(self) -> str:
        shown = [f"line {line}: {problem}" for line, problem in self.problems[:MAX_PROBLEMS]]
        more = len(self.problems) - len(shown)
        return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def check_fine_tune_file(raw: bytes) -> FileCheck:
    """Every problem of a fine-tuning JSONL file, by line; its format and example count."""
    problems: list[tuple[int, str]] = []
    formats: dict[FileFormat, int] = {}  # format -> first line of it
    examples = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        record, line_problems = parse_json_object(line)
        if record is None:
            problems += [(number, p) for p in line_problems]
            continue
        kind: FileFormat = "dpo" if "input" in record and "messages" not in record else "supervised"
        formats.setdefault(kind, number)
        line_problems = _dpo_problems(record) if kind == "dpo" else _supervised_problems(record)
        problems += [(number, p) for p in line_problems]
        examples += not line_problems
    if len(formats) > 1:
        problems.append((formats["dpo"], f"a preference (DPO) example in a file whose line "
                                         f"{formats['supervised']} is a supervised one: one "
                                         "format per file"))
    if not formats and not problems:
        problems.append((0, "the file holds no examples"))
    kind_of = next(iter(formats)) if len(formats) == 1 else None
    return FileCheck(kind_of, examples, sorted(problems))


def to_trainer_jsonl(raw: bytes, file_format: FileFormat) -> bytes:
    """A checked file in the trainer's own forms: chat lines as they are, OpenAI's preference
    lines as ``{"prompt", "chosen", "rejected"}`` (``trainer.preference``'s messages form)."""
    if file_format == "supervised":
        return raw
    out = []
    for line in raw.split(b"\n"):
        if line.strip():
            r = json.loads(line)
            out.append(json.dumps({"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                                   "rejected": r["non_preferred_output"]}, ensure_ascii=False))
    return ("\n".join(out) + "\n").encode()


def _supervised_problems(record: dict[str, Any]) -> list[str]:
    problems = _unsupported(record, {"messages"})
    if "messages" not in record:
        return [*problems, "missing 'messages'"]
    return problems + validate_messages(record["messages"])


def _dpo_problems(record: dict[str, Any]) -> list[str]:
    problems = _unsupported(record, _DPO_KEYS)
    problems += [f"missing {key!r}" for key in sorted(_DPO_KEYS) if key not in record]
    if problems:
        return problems
    given = record["input"]
    if not isinstance(given, dict):
        return [f"'input' must be an object with 'messages', got {type(given).__name__}"]
    problems += [f"input: {p}" for p in _unsupported(given, {"messages"})]
    if "messages" not in given:
        return [*problems, "input: missing 'messages'"]
    problems += prompt_problems("input.messages", given["messages"])
    answers = []
    for key in ("preferred_output", "non_preferred_output"):
        text, answer_problems = read_answer(key, record[key])
        answers.append(text)
        problems += answer_problems
    if not problems and answers[0].strip() == answers[1].strip():
        problems.append("'preferred_output' and 'non_preferred_output' are the same answer: "
                        "the pair prefers nothing")
    return problems


def _unsupported(record: dict[str, Any], allowed: set[str] | frozenset[str]) -> list[str]:
    extra = sorted(set(record) - allowed)
    if not extra:
        return []
    return [f"unsupported key(s) {extra}: this trainer takes only {sorted(allowed)} (no tools, "
            "function calls or other fields)"]
