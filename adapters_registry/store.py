"""Artifact storage: content-addressed blobs behind a small protocol.

A blob's key is the sha256 of its bytes, so uploads are idempotent, identical files
are stored once, and every read can be verified against the name it was asked by.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from adapters_registry.errors import ArtifactError
from adapters_registry.hashing import check_digest, file_chunks, sha256_file, write_verified

BlobState = Literal["ok", "missing", "corrupt"]
PutResult = Literal["stored", "present", "repaired"]


class ArtifactStore(Protocol):
    """Where adapter files live: FilesystemStore here, S3Store in adapters_registry.s3."""

    def put(self, src: Path, sha256: str) -> PutResult:
        """Store the file ``src``, which must hash to ``sha256``. A blob already stored under
        that digest is re-hashed and rewritten when its bytes no longer match ("repaired"),
        so pushing the same content again repairs a corrupted blob."""
        ...

    def get(self, sha256: str, dest: Path) -> None:
        """Write the blob to ``dest``, verified; raises ChecksumMismatchError on bad bytes."""
        ...

    def verify(self, sha256: str) -> BlobState:
        """Re-hash the stored blob: "ok", "missing" or "corrupt"."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def describe(self) -> str: ...

    def list_blobs(self) -> Iterator[tuple[str, datetime]]:
        """Every stored blob's digest and last-modified time (for garbage collection)."""
        ...

    def delete(self, sha256: str) -> None: ...


# Blobs are readable by their owner's group: a gateway running as another user of that group
# (a service account beside the operator who pushed) can read them; nobody else can.
BLOB_MODE = 0o640


class FilesystemStore:
    """Blobs under ``root/blobs/sha256/ab/abcdef…``; writes are atomic renames. ``mode``: each
    blob's permissions."""

    def __init__(self, root: Path, *, mode: int = BLOB_MODE) -> None:
        self.root = Path(root)
        self.mode = mode
        with self._io("create the blob folder in"):
            (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        check_digest(sha256)
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def describe(self) -> str:
        return f"file://{self.root}"

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def verify(self, sha256: str) -> BlobState:
        path = self._path(sha256)
        if not path.is_file():
            return "missing"
        with self._io("read"):
            return "ok" if sha256_file(path) == sha256 else "corrupt"

    def put(self, src: Path, sha256: str) -> PutResult:
        dest = self._path(sha256)
        state = self.verify(sha256)
        if state == "ok":
            return "present"
        with self._io("write to"):
            write_verified(file_chunks(src), dest, sha256, source=str(src), mode=self.mode)
        return "stored" if state == "missing" else "repaired"

    def list_blobs(self) -> Iterator[tuple[str, datetime]]:
        with self._io("list"):
            for p in (self.root / "blobs" / "sha256").glob("??/*"):
                if p.is_file() and not p.name.startswith(".partial-"):
                    yield p.name, datetime.fromtimestamp(p.stat().st_mtime, UTC)

    def delete(self, sha256: str) -> None:
        with self._io("delete from"):
            self._path(sha256).unlink(missing_ok=True)

    def get(self, sha256: str, dest: Path) -> None:
        src = self._path(sha256)
        if not src.is_file():
            raise ArtifactError(f"blob {sha256} is missing from {self.describe()}")
        write_verified(self._read(src), dest, sha256, source=f"{self.describe()} blob {sha256[:12]}")

    def _read(self, path: Path) -> Iterator[bytes]:
        # A blob that cannot be read (permissions, I/O) is the store's error, never a bare
        # OSError; what fails while writing the copy is the caller's.
        with self._io("read"):
            yield from file_chunks(path)

    @contextmanager
    def _io(self, action: str) -> Iterator[None]:
        """OSError (read-only, full, permission) as an ArtifactError naming the store."""
        try:
            yield
        except OSError as exc:
            raise ArtifactError(
                f"cannot {action} the artifact store {self.describe()}: {describe_os_error(exc)}"
            ) from exc


def describe_os_error(exc: OSError) -> str:
    """An OSError in words an operator acts on: which condition, on which path."""
    hint = {
        errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted", errno.EFBIG: "file too large for this system",
    }.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{hint}{where}"
