"""Intake: bring an adapter folder or archive into a private staging folder, safely.

Everything about the source is decided from metadata before a byte is copied: entry
types (links, FIFOs and devices are never opened), per-file and total sizes (a sparse
2 GiB file is refused by its size, not after writing it), the number of entries. What
is not staged is reported as a Violation so the check can list it with the rest; a
source that cannot be read at all is a SourceError. Archives go through
``adapters_registry._archives`` with the same limits, checked while streaming.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from adapters_registry._archives import archive_kind, copy_capped, extract
from adapters_registry.errors import SourceError
from adapters_registry.names import shown
from adapters_registry.store import describe_os_error
from adapters_registry.violations import Limits, Violation

__all__ = ["Staged", "copy_capped", "stage", "staging_folder"]

_CHUNK = 1 << 20


@dataclass
class Staged:
    """What intake put in ``path``, and what it refused to."""

    path: Path
    kind: str  # "folder", "tar" or "zip"
    refused: list[Violation] = field(default_factory=list)
    # False when a limit stopped intake part-way: what was staged must not be checked.
    complete: bool = True


@contextmanager
def staging_folder() -> Iterator[Path]:
    """A private (0700) temporary folder, removed on every path out."""
    try:
        tmp = tempfile.TemporaryDirectory(prefix="lgw-stage-")
    except OSError as exc:
        raise SourceError(f"cannot create a staging folder: {describe_os_error(exc)}") from None
    with tmp:
        yield Path(tmp.name)


def stage(source: Path, dest: Path, limits: Limits) -> Staged:
    """Stage ``source`` (a folder, .tar, .tar.gz or .zip) into the new folder ``dest``."""
    source = Path(source)
    st = _source_stat(source)
    try:
        dest.mkdir(mode=0o700)
    except OSError as exc:
        raise SourceError(f"cannot create the staging folder {dest}: {describe_os_error(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        staged = Staged(dest, "folder")
        _stage_folder(source, staged, limits)
        return staged
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{shown(str(source))} is a {_kind_name(st.st_mode)}, not an adapter "
                          "folder or a .tar, .tar.gz or .zip archive")
    if st.st_size > limits.max_archive_bytes:
        raise SourceError(f"{shown(str(source))} is {st.st_size} bytes, over the "
                          f"{limits.max_archive_bytes}-byte archive limit{limits.basis}")
    kind = archive_kind(source)
    if kind is None:
        raise SourceError(f"{shown(str(source))} is a file, but not a folder or a .tar, .tar.gz or "
                          ".zip archive")
    staged = Staged(dest, kind)
    staged.complete = extract(source, kind, dest, limits, staged.refused)
    return staged


def _source_stat(source: Path) -> os.stat_result:
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        raise SourceError(f"adapter path {shown(str(source))} does not exist") from None
    except OSError as exc:
        raise _unreadable(source, exc) from None
    if not stat.S_ISLNK(st.st_mode):
        return st
    # The operator's own path may be a link; following it is theirs to decide.
    try:
        return os.stat(source)
    except FileNotFoundError:
        raise SourceError(f"adapter path {shown(str(source))} is a dangling symlink (to "
                          f"{shown(os.readlink(source))})") from None
    except OSError as exc:
        raise _unreadable(source, exc) from None


def _stage_folder(src: Path, staged: Staged, limits: Limits) -> None:
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError as exc:
        raise SourceError(f"cannot list {shown(str(src))}: {describe_os_error(exc)}") from None
    if len(entries) > limits.max_files:
        staged.refused.append(Violation(
            "too_many_files", f"{src} holds {len(entries)} entries; an adapter has at most "
            f"{limits.max_files} files"))
        staged.complete = False
        return
    to_copy: list[tuple[str, int]] = []
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            raise _unreadable(Path(entry.path), exc) from None
        problem = entry_problem(entry.name, st.st_mode, st.st_size, limits,
                                link_target=_link_target(entry.path))
        if problem is not None:
            staged.refused.append(problem)
        else:
            to_copy.append((entry.name, st.st_size))
    total = sum(size for _, size in to_copy)
    if total > limits.max_total_bytes:
        staged.refused.append(Violation(
            "file_too_large", f"the adapter's files total {total} bytes, over the "
            f"{limits.max_total_bytes}-byte limit{limits.basis}; nothing was copied"))
        staged.complete = False
        return
    for name, _ in to_copy:
        _copy_entry(src / name, staged, limits)


def entry_problem(name: str, mode: int, size: int, limits: Limits, *,
                  link_target: str = "") -> Violation | None:
    """Why an entry of a folder or archive is not staged, or None to stage it."""
    if stat.S_ISLNK(mode):
        # A link could point at another tenant's files, or at /dev/zero.
        return Violation("symlink", f"{name} is a symlink{link_target}; copy the file in instead", name)
    if stat.S_ISDIR(mode):
        return Violation("unexpected_file", f"subdirectory {name} is not allowed: an adapter is a "
                         "flat folder of regular files", name)
    if not stat.S_ISREG(mode):
        return Violation("unexpected_file", f"{name} is a {_kind_name(mode)}, not a regular file; "
                         "an adapter is a flat folder of regular files", name)
    if size > limits.max_file_bytes:
        return Violation("file_too_large", f"{name} is {size} bytes, over the {limits.max_file_bytes}-"
                         f"byte per-file limit{limits.basis}; it was not copied", name)
    return None


def _copy_entry(path: Path, staged: Staged, limits: Limits) -> None:
    # O_NOFOLLOW and O_NONBLOCK: a file swapped for a link or a FIFO since it was listed
    # is refused instead of followed or blocked on; fstat decides on what was opened.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        problem = entry_problem(path.name, st.st_mode, st.st_size, limits)
        if problem is not None:
            staged.refused.append(problem)
            return
        if copy_capped(iter(lambda: src.read(_CHUNK), b""), staged.path / path.name,
                       limits.max_file_bytes) is None:
            staged.refused.append(Violation(
                "file_too_large", f"{path.name} grew past the {limits.max_file_bytes}-byte "
                f"per-file limit{limits.basis} while being copied", path.name))


def _unreadable(path: Path, exc: OSError) -> SourceError:
    return SourceError(f"cannot read {shown(str(path))}: {describe_os_error(exc)}")


def _kind_name(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "special file"


def _link_target(path: str) -> str:
    try:
        return f" (to {shown(os.readlink(path))})"
    except OSError:
        return ""
