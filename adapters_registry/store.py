"""Artifact storage: content-addressed blobs behind a small protocol.

A blob's key is the sha256 of its bytes, so uploads are idempotent, identical files
are stored once, and every read can be verified against the name it was asked by.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from adapters_registry.errors import ArtifactError, ChecksumMismatchError, ValidationError
from adapters_registry.hashing import sha256_file


class ArtifactStore(Protocol):
    """Where adapter files live: FilesystemStore here, S3Store in adapters_registry.s3."""

    def put(self, src: Path, sha256: str) -> None:
        """Store the file ``src`` whose content hash is ``sha256`` (no-op if present)."""
        ...

    def get(self, sha256: str, dest: Path) -> None:
        """Write the blob to ``dest``, verified; raises ChecksumMismatchError on bad bytes."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def describe(self) -> str: ...

    def list_blobs(self) -> Iterator[tuple[str, datetime]]:
        """Every stored blob's digest and last-modified time (for garbage collection)."""
        ...

    def delete(self, sha256: str) -> None: ...


class FilesystemStore:
    """Blobs under ``root/blobs/sha256/ab/abcdef…``; writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ArtifactError(f"not a sha256 digest: {sha256!r}")
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def describe(self) -> str:
        return f"file://{self.root}"

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def put(self, src: Path, sha256: str) -> None:
        dest = self._path(sha256)
        if dest.is_file():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        _copy_verified(src, dest, sha256, source=str(src))

    def list_blobs(self) -> Iterator[tuple[str, datetime]]:
        for p in (self.root / "blobs" / "sha256").glob("??/*"):
            if p.is_file() and not p.name.startswith(".partial-"):
                yield p.name, datetime.fromtimestamp(p.stat().st_mtime, UTC)

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def get(self, sha256: str, dest: Path) -> None:
        src = self._path(sha256)
        if not src.is_file():
            raise ArtifactError(f"blob {sha256} is missing from {self.describe()}")
        _copy_verified(src, dest, sha256, source=f"{self.describe()} blob {sha256[:12]}")


def _copy_verified(src: Path, dest: Path, sha256: str, *, source: str) -> None:
    """Copy to a temp file beside ``dest``, check its hash, then rename into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".partial-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            while chunk := inp.read(1 << 20):
                out.write(chunk)
        actual = sha256_file(tmp)
        if actual != sha256:
            raise ChecksumMismatchError(
                f"{source}: sha256 is {actual[:12]}…, expected {sha256[:12]}… "
                "(the stored bytes were changed or corrupted)"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def open_store(location: str | Path, *, s3_endpoint_url: str | None = None,
               s3_region: str = "us-east-1") -> ArtifactStore:
    """A store from a location: a folder, or ``s3://bucket/prefix`` (boto3's credential chain)."""
    text = str(location)
    if text.startswith("s3://"):
        from adapters_registry.s3 import S3Config, S3Store

        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValidationError(f"artifact location {text!r} names no bucket")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return S3Store(S3Config(bucket=bucket, prefix=prefix, endpoint_url=s3_endpoint_url,
                                region=s3_region))
    if "://" in text:
        raise ValidationError(f"artifact location {text!r}: use a folder or s3://bucket/prefix")
    return FilesystemStore(Path(text))
