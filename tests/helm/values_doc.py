"""The values table of helm/lora-gateway/README.md, made from values.yaml.

Every key preceded by a ``# -- description`` comment is one row (helm-docs' convention);
keys under it are part of its default. Print the table with
``python -m tests.helm.values_doc``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.helm.chart import CHART

BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"
_KEY = re.compile(r"^(\s*)([A-Za-z0-9_./-]+|\"[^\"]+\"):")


def documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) in file order."""
    rows: list[tuple[str, str]] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    pending: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# -- "):
            pending = stripped[len("# -- "):]
            continue
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        match = _KEY.match(line)
        if not match:
            continue
        indent, key = len(match[1]), match[2].strip('"')
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if any(documented for _, _, documented in stack):
            continue  # part of a documented key's default
        stack.append((indent, key, pending is not None))
        if pending is not None:
            rows.append((".".join(k for _, k, _ in stack), pending))
            pending = None
    return rows


def _type(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__)


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        node = node[part]
    return node


def table(text: str) -> str:
    values = yaml.safe_load(text)
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for key, description in documented_keys(text):
        value = _lookup(values, key)
        default = json.dumps(value, separators=(", ", ": ")).replace("|", r"\|")
        description = description.replace("|", r"\|")
        lines.append(f"| `{key}` | {_type(value)} | `{default}` | {description} |")
    return "\n".join(lines)


def undocumented(text: str) -> list[str]:
    """Leaves of values.yaml that no row covers."""
    covered = {key for key, _ in documented_keys(text)}
    missing: list[str] = []

    def walk(node: Any, path: str) -> None:
        if path in covered:
            return
        if isinstance(node, dict) and node:
            for key, child in node.items():
                walk(child, f"{path}.{key}" if path else key)
        else:
            missing.append(path)

    walk(yaml.safe_load(text), "")
    return missing


if __name__ == "__main__":
    print(table((CHART / "values.yaml").read_text()))
