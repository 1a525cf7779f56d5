"""The gateway's local disk tier: verified adapter folders, content-addressed, LRU by bytes.

Each entry is ``<root>/<content sha256>/`` (one folder per distinct artifact, shared by
versions with identical files). Recency is the folder's mtime, touched on every use, so
the LRU order survives a restart: the cache is rebuilt from the folders at start-up.
Entries the caller protects (in use, pinned) are never evicted; if only protected entries
remain the cache stays over its budget until they are released, and says so in the log.
``download`` fills an entry from the registry's store; ``matches_record`` re-checks one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapters_registry import (
    REPAIR_COMMAND,
    AdapterVersion,
    ArtifactError,
    ChecksumMismatchError,
    check_digest,
    is_digest,
    sha256_file,
)
from gateway.errors import AdapterUnavailableError
from gateway.observability.logs import Throttled

logger = logging.getLogger(__name__)
_failures = Throttled(logger)  # a store that is away fails every cold request: a line per 10s

FETCH_PREFIX = ".fetch-"  # downloads in progress; never entries
STORE_RETRY_AFTER_S = 5  # Retry-After when the artifact store cannot be reached


@dataclass(frozen=True)
class DiskEviction:
    sha: str
    size: int


class DiskCache:
    """Thread-safe: downloads admit entries from worker threads."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # sha -> bytes, oldest first
        self.root.mkdir(parents=True, exist_ok=True)
        self._rebuild()

    def _rebuild(self) -> None:
        found: list[tuple[float, str, int]] = []
        for child in self.root.iterdir():
            if child.name.startswith(FETCH_PREFIX):
                shutil.rmtree(child, ignore_errors=True)  # a download a crash interrupted
            elif is_digest(child.name) and child.is_dir() and not child.is_symlink():
                found.append((child.stat().st_mtime, child.name, _folder_bytes(child)))
            elif child.is_dir() or child.is_symlink():  # never ours: neither served nor
                # evicted (a link could lead anywhere); plain files are left alone quietly
                logger.warning("disk cache: ignoring %s, not an adapter folder", child)
        for _mtime, sha, size in sorted(found):
            self._entries[sha] = size
        if found:
            logger.info("disk cache: %d adapter folder(s), %d bytes, from an earlier run",
                        len(found), self.total_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sha: object) -> bool:
        return sha in self._entries

    def path(self, sha: str) -> Path:
        return self.root / check_digest(sha)  # a digest, never a path that leaves the root

    def lookup(self, sha: str) -> Path | None:
        """The folder if cached (and marks it most recently used), else None."""
        with self._lock:
            if sha not in self._entries:
                return None
            path = self.path(sha)
            if not path.is_dir():  # removed behind our back
                del self._entries[sha]
                return None
            self._entries.move_to_end(sha)
        # Recency on disk is a hint for the next start; the order in memory is exact.
        with contextlib.suppress(OSError):
            os.utime(path)
        return path

    def admit(self, sha: str, protected: Collection[str]) -> list[DiskEviction]:
        """Record a folder just renamed into place, then shrink to the budget."""
        size = _folder_bytes(self.path(sha))
        with self._lock:
            self._entries[sha] = size
            self._entries.move_to_end(sha)
        return self.shrink(protected)

    def shrink(self, protected: Collection[str]) -> list[DiskEviction]:
        evicted: list[DiskEviction] = []
        with self._lock:
            for sha in list(self._entries):
                if self.total_bytes <= self.max_bytes:
                    break
                if sha in protected:
                    continue
                evicted.append(DiskEviction(sha, self._entries.pop(sha)))
            over = self.total_bytes - self.max_bytes
        for e in evicted:
            shutil.rmtree(self.path(e.sha), ignore_errors=True)
        if over > 0:
            logger.warning("disk cache is %d bytes over its %d-byte budget: every remaining "
                           "folder is in use or pinned", over, self.max_bytes)
        return evicted

    def discard(self, sha: str) -> int:
        """Remove one entry now; returns the bytes freed (0 if it was not cached)."""
        with self._lock:
            size = self._entries.pop(sha, 0)
        shutil.rmtree(self.path(sha), ignore_errors=True)
        return size


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Fetcher(Protocol):
    """Writes a version's files into a folder, each verified (the registry's artifacts)."""

    def fetch(self, version: AdapterVersion, dest: Path) -> None: ...


def download(registry: Fetcher, disk: DiskCache, version: AdapterVersion) -> Path:
    """Fetch ``version``'s files into its cache folder, each verified against its sha256.

    A failed verification or an unreachable store is an ``AdapterUnavailableError`` that
    tells the caller what to do (repair, or retry); nothing half-written stays behind."""
    path = disk.path(version.content_sha256)
    try:
        tmp = Path(tempfile.mkdtemp(dir=disk.root, prefix=FETCH_PREFIX))
    except OSError as exc:
        raise _local_cache_failed(version, disk, exc) from exc
    try:
        registry.fetch(version, tmp)  # verifies every file against its sha256
        try:
            tmp.rename(path)
        except OSError as exc:  # fine if an earlier fetch won; a link was never ours
            if path.is_symlink() or not path.is_dir():
                raise ArtifactError(f"cannot place it in the cache at {path}: {exc}") from exc
    except ChecksumMismatchError as exc:
        logger.error("artifact of %s failed verification: %s", version.ref, exc)
        raise AdapterUnavailableError(
            f"adapter {version.ref} cannot be served: its stored artifact failed sha256 "
            f"verification; the operator can repair it with `{REPAIR_COMMAND}`"
        ) from exc
    except ArtifactError as exc:  # missing object, store unreachable: may pass on retry
        _failures.log(logging.ERROR, "fetch", "could not fetch %s: %s", version.ref, exc)
        if isinstance(exc.__cause__, PermissionError):  # the operator's to fix, not a retry's
            raise AdapterUnavailableError(
                f"adapter {version.ref} cannot be fetched: this gateway may not read the artifact "
                "store; the operator must make its blobs readable by the gateway's user or group",
                retry_after=STORE_RETRY_AFTER_S) from exc
        raise AdapterUnavailableError(
            f"adapter {version.ref} could not be fetched from the artifact store; retry shortly",
            retry_after=STORE_RETRY_AFTER_S) from exc
    except OSError as exc:  # this gateway's own cache folder: full, read-only, removed
        raise _local_cache_failed(version, disk, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("fetched %s into the local cache", version.ref)
    return path


def _local_cache_failed(version: AdapterVersion, disk: DiskCache,
                        exc: OSError) -> AdapterUnavailableError:
    logger.error("could not write %s into the local cache %s: %s", version.ref, disk.root, exc)
    return AdapterUnavailableError(
        f"adapter {version.ref} could not be placed in this gateway's local cache; retry shortly",
        retry_after=STORE_RETRY_AFTER_S)


def matches_record(version: AdapterVersion, path: Path) -> bool:
    """Whether the folder holds every file of ``version`` with its recorded sha256."""
    return all(
        (path / rel).is_file() and sha256_file(path / rel) == digest
        for rel, digest in version.files.items()
    )
