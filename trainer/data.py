"""Chat datasets: JSONL files in OpenAI's ``messages`` format, validated whole.

Each line is ``{"messages": [{"role": ..., "content": ...}, ...]}`` with an optional
leading system message, then user and assistant turns alternating, ending on an
assistant turn. Every bad line is reported at once, with its line number.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_registry.hashing import canonical_json, sha256_bytes
from trainer.errors import DatasetError, LineProblem

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = frozenset({"role", "content"})
_LINE_KEYS = frozenset({"messages"})
# DatasetError's message lists this many problems; .problems holds all of them.

Message = dict[str, str]


@dataclass(frozen=True)
class ChatDataset:
    """Validated conversations of one file, exact duplicates removed."""

    examples: list[list[Message]]
    sha256: str  # of the file's bytes, so the manifest names exactly what was read
    path: Path
    duplicates_removed: int = 0


def load_chat_jsonl(path: Path) -> ChatDataset:
    """Read and validate a chat JSONL file; raises DatasetError listing every bad line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(path, [LineProblem(0, f"cannot read file: {exc}")]) from None

    problems: list[LineProblem] = []
    examples: list[list[Message]] = []
    seen: set[bytes] = set()
    duplicates = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) carry no example
        messages, line_problems = _parse_line(line)
        problems.extend(LineProblem(number, p) for p in line_problems)
        if messages is None:
            continue
        key = canonical_json(messages)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        examples.append(messages)

    if problems:
        raise DatasetError(path, problems)
    if not examples:
        raise DatasetError(path, [LineProblem(0, "no examples")])
    if duplicates:
        logger.info("%s: removed %d exact duplicate example(s)", path, duplicates)
    return ChatDataset(examples=examples, sha256=sha256_bytes(raw), path=path, duplicates_removed=duplicates)


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
        problems.extend(_order_problems(known))
    return problems


def _parse_line(line: bytes) -> tuple[list[Message] | None, list[str]]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, ["not valid UTF-8"]
    except json.JSONDecodeError as exc:
        return None, [f"invalid JSON ({exc.msg} at column {exc.colno})"]
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {type(record).__name__}"]
    problems = []
    extra = sorted(set(record) - _LINE_KEYS)
    if extra:
        problems.append(f"unsupported key(s) {extra}; only 'messages'")
    if "messages" not in record:
        problems.append("missing 'messages'")
    else:
        problems.extend(validate_messages(record["messages"]))
    return (None if problems else record["messages"]), problems


def _order_problems(roles: list[str]) -> list[str]:
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
