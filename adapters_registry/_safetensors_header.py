"""Read a safetensors file's header without torch and without trusting it.

The format is an 8-byte little-endian header length, a JSON header mapping tensor
names to ``{"dtype", "shape", "data_offsets"}`` (plus an optional ``__metadata__``
map of strings), then the tensor bytes. The safetensors library refuses a file whose
offsets leave gaps, overlap or do not end exactly at the end of the file; we report
the same conditions, but as readable problems instead of a single exception, so the
compatibility check can list all of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Bytes per element of every dtype the format defines with a whole-byte size.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# The safetensors library's own cap; a larger "length" means this is not a safetensors file.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; offsets are relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Header:
    """What could be read of a header, and everything wrong with it."""

    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_start: int = 0
    # Tensors whose bytes lie inside the file and match dtype × shape: safe to scan.
    readable: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def read_header(path: Path) -> Header:
    """Parse and validate the header of ``path``; never raises for a malformed file."""
    out = Header()
    size = path.stat().st_size
    if size < 8:
        out.problems.append(
            f"the file is {size} bytes; a safetensors file starts with an 8-byte header length"
        )
        return out
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES:
            out.problems.append(
                f"the header length prefix says {header_len} bytes, more than the format's "
                f"{MAX_HEADER_BYTES}-byte limit: this is not a safetensors file"
            )
            return out
        if 8 + header_len > size:
            out.problems.append(
                f"the header length prefix says {header_len} bytes but only {size - 8} bytes "
                "follow it: the file is truncated or not a safetensors file"
            )
            return out
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        out.problems.append(f"the header is not valid UTF-8 JSON ({exc})")
        return out
    if not isinstance(header, dict):
        out.problems.append(f"the header is a JSON {type(header).__name__}, expected an object")
        return out
    out.data_start = 8 + header_len
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        out.problems.append("__metadata__ must be an object mapping strings to strings")
    for name, entry in header.items():
        info, problem = _parse_entry(name, entry)
        if problem:
            out.problems.append(problem)
        if info is not None:
            out.tensors[name] = info
    _check_layout(out, data_len=size - out.data_start)
    return out


def count_non_finite(path: Path, header: Header, names: Iterable[str]) -> dict[str, int]:
    """Number of NaN/Inf values in each named float tensor (only readable ones are read)."""
    counts: dict[str, int] = {}
    with path.open("rb") as f:
        for name in names:
            info = header.tensors[name]
            if name not in header.readable or info.dtype not in _FLOAT_VIEWS:
                continue
            f.seek(header.data_start + info.begin)
            raw = f.read(info.end - info.begin)
            if len(raw) != info.end - info.begin:  # the file shrank since its header was read
                continue
            values = np.frombuffer(raw, dtype=_FLOAT_VIEWS[info.dtype])
            if info.dtype == "BF16":
                # bfloat16 is the top half of a float32: all-ones exponent means NaN or Inf.
                bad = int(np.count_nonzero((values & 0x7F80) == 0x7F80))
            else:
                bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                counts[name] = bad
    return counts


_FLOAT_VIEWS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _parse_entry(name: str, entry: Any) -> tuple[TensorInfo | None, str | None]:
    if not isinstance(entry, dict):
        return None, f"tensor {name}: header entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return None, f"tensor {name}: dtype {dtype!r} is not a string"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return None, f"tensor {name}: shape {shape!r} is not a list of non-negative integers"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        return (
            None,
            f"tensor {name}: data_offsets {offsets!r} is not [begin, end] with begin <= end",
        )
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    item = DTYPE_SIZES.get(dtype)
    if item is not None and info.end - info.begin != math.prod(shape) * item:
        return info, (
            f"tensor {name}: data_offsets [{info.begin}, {info.end}] span "
            f"{info.end - info.begin} bytes, but {dtype} {list(shape)} needs "
            f"{math.prod(shape) * item}"
        )
    return info, None


def _check_layout(out: Header, data_len: int) -> None:
    """Tensors must tile the data section exactly: no gap, no overlap, no tail, no shortfall."""
    pos, previous = 0, None
    for info in sorted(out.tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < pos and previous is not None:
            out.problems.append(
                f"tensor {info.name} (bytes {info.begin}-{info.end}) overlaps tensor "
                f"{previous.name} (bytes {previous.begin}-{previous.end})"
            )
        elif info.begin > pos:
            out.problems.append(f"data bytes {pos}-{info.begin} belong to no tensor (gap before {info.name})")
        pos, previous = max(pos, info.end), info
    beyond = [t.name for t in out.tensors.values() if t.end > data_len]
    if beyond:
        out.problems.append(
            f"the file is truncated: the header places tensor data up to byte {pos} of the "
            f"data section, but the file holds only {data_len} data bytes "
            f"({len(beyond)} tensor(s) end past the end of the file)"
        )
    elif pos < data_len:
        out.problems.append(f"{data_len - pos} trailing bytes follow the last tensor")
    for info in out.tensors.values():
        item = DTYPE_SIZES.get(info.dtype)
        if (
            item is not None
            and info.end <= data_len
            and info.end - info.begin == math.prod(info.shape) * item
        ):
            out.readable.add(info.name)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
