"""check_adapter on malformed safetensors headers: each one a violation, never an exception."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapters_registry.compat import check_adapter
from tests.adapters_registry.test_compat import WEIGHTS, assert_reports, codes


def _rewrite_header(path: Path, edit: Callable[[dict[str, Any]], None], tail: bytes = b"") -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :] + tail)


def _tensor(header: dict[str, Any], index: int) -> dict[str, Any]:
    return header[sorted(k for k in header if k != "__metadata__")[index]]


def _second_tensor(header: dict[str, Any]) -> dict[str, Any]:
    return _tensor(header, 1)


def _overlap(header: dict[str, Any]) -> None:
    _second_tensor(header)["data_offsets"] = _tensor(header, 0)["data_offsets"]


@pytest.mark.parametrize(
    ("edit", "tail", "needle"),
    [
        pytest.param(lambda h: _second_tensor(h).update(shape=[8, 65]), b"",
                     "needs 2080", id="size-vs-shape"),
        pytest.param(_overlap, b"", "overlaps tensor", id="overlap"),
        pytest.param(lambda h: None, b"\0" * 16, "16 trailing bytes", id="trailing-bytes"),
        pytest.param(lambda h: _second_tensor(h).update(data_offsets=[9, 3]), b"",
                     "is not [begin, end]", id="reversed-offsets"),
        pytest.param(lambda h: h.update(__metadata__={"format": 1}), b"",
                     "__metadata__ must be", id="metadata-not-strings"),
    ],
)  # fmt: skip
def test_malformed_headers_are_reported_not_raised(
    kit: Any, adapter: Path, edit: Callable[[dict[str, Any]], None], tail: bytes, needle: str
) -> None:
    _rewrite_header(adapter / WEIGHTS, edit, tail)
    violations = check_adapter(adapter, kit.contract, kit.template)
    assert "invalid_safetensors" in codes(violations)
    assert any(needle in v.message for v in violations if v.code == "invalid_safetensors"), [
        v.message for v in violations
    ]


@pytest.mark.parametrize(
    ("prefix", "needle"),
    [
        (struct.pack("<Q", 10**12), "not a safetensors file"),
        (struct.pack("<Q", 50_000), "only"),
        (struct.pack("<Q", 4) + b"nope", "not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"[]", "expected an object"),
    ],
    ids=["huge-length", "length-past-end", "not-json", "not-object"],
)
def test_unreadable_headers(kit: Any, adapter: Path, prefix: bytes, needle: str) -> None:
    (adapter / WEIGHTS).write_bytes(prefix)
    assert_reports(check_adapter(adapter, kit.contract, kit.template), {"invalid_safetensors": needle})
