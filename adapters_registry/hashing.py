"""Content hashes shared by the registry, the trainer and the gateway."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from adapters_registry.errors import ArtifactError, ChecksumMismatchError, TamperedRecordError

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_chunks(file_chunks(path))


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace: equal values give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(value: Any) -> str:
    return sha256_bytes(canonical_json(value))


def sha256_tree(files: dict[str, str]) -> str:
    """One digest for a set of files, from their relative names and per-file sha256."""
    return sha256_json(sorted(files.items()))


_HEX = frozenset("0123456789abcdef")


def check_digest(text: str) -> str:
    """``text`` if it is a lowercase hex sha256 digest; ArtifactError otherwise."""
    if not is_digest(text):
        raise ArtifactError(f"not a sha256 digest: {str(text)[:80]!r}")
    return text


def is_digest(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and _HEX.issuperset(text)


def check_record(content_sha256: str, files: Mapping[str, str]) -> None:
    """A version's stored record as the registry wrote it, else TamperedRecordError.

    Its digests name paths (the gateway's cache folder, the store's blob) and its file
    names are joined to folders, so a row altered in the database must reach neither:
    every digest is a sha256, every name one plain file name (an adapter is a flat
    folder), and the files hash to the recorded content digest.
    """
    for digest in (content_sha256, *files.values()):
        if not is_digest(digest):
            raise TamperedRecordError(f"not a sha256 digest: {str(digest)[:80]!r}")
    for name in files:
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise TamperedRecordError(f"not a plain file name: {name[:80]!r}")
    if sha256_tree(dict(files)) != content_sha256:
        raise TamperedRecordError(
            f"its files do not hash to its content sha256 {content_sha256[:12]}…")


def sha256_chunks(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def write_verified(chunks: Iterable[bytes], dest: Path, sha256: str, *, source: str,
                   mode: int | None = None) -> None:
    """Write ``chunks`` to a temp file beside ``dest``, hashing as they pass, and rename it
    into place only if they hash to ``sha256``; ChecksumMismatchError otherwise. ``mode``:
    the file's permissions (default: the temp file's own, 0600).

    Both stores read and write blobs through this, so a corrupted byte is caught the
    same way whether it came from a disk or from S3.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".partial-")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                h.update(chunk)
                out.write(chunk)
        raise_unless_digest(h.hexdigest(), sha256, source=source)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def raise_unless_digest(actual: str, expected: str, *, source: str) -> None:
    """ChecksumMismatchError naming ``source`` when ``actual`` is not ``expected``."""
    if actual != expected:
        raise ChecksumMismatchError(
            f"{source}: sha256 is {actual[:12]}…, expected {expected[:12]}… "
            "(the bytes were changed or corrupted)"
        )


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk
