"""Safe extraction of .tar, .tar.gz and .zip adapters into a private staging folder.

Safe by construction rather than by cleaning up afterwards: each member's name and type
are judged before anything is written (no absolute paths, no ``..``, no links, devices
or FIFOs, at most one wrapping folder), and the member count and per-file/total sizes
are enforced while streaming, on the bytes actually decompressed, so a zip bomb stops
at the limit. Files are created with O_EXCL|O_NOFOLLOW directly in the staging folder:
nothing can be written anywhere else.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from adapters_registry.errors import SourceError
from adapters_registry.names import shown
from adapters_registry.store import describe_os_error
from adapters_registry.violations import Limits, Violation

_CHUNK = 1 << 20
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def archive_kind(path: Path) -> str | None:
    """"tar" (plain or gzip) or "zip" by the file's first bytes, else None."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise SourceError(f"cannot read {shown(str(path))}: {exc.strerror}") from None
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar":
        return "tar"
    return None


class _Extraction:
    def __init__(self, dest: Path, limits: Limits, refused: list[Violation]) -> None:
        self.dest, self.limits, self.refused = dest, limits, refused
        self.count = 0
        self.total = 0
        self.wrapper: str | None = None  # the one folder everything may sit in
        self.flat = False
        self.stopped = False  # a count or size limit was reached: extract nothing more

    def refuse(self, code: str, name: str, why: str) -> None:
        self.refused.append(Violation(code, f"archive member {shown(name)} {why}", name))

    def admit(self, name: str, mode: int, declared: int) -> str | None:
        """The file name to stage this member as, or None (refused or a folder)."""
        self.count += 1
        if self.count > self.limits.max_files:
            self.refused.append(Violation(
                "too_many_files", f"the archive has more than {self.limits.max_files} members; "
                "extraction stopped there"))
            self.stopped = True
            return None
        path = PurePosixPath(name)
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            self.refuse("archive_unsafe_member", name, "has an absolute path")
            return None
        parts = [p for p in path.parts if p not in ("", ".")]
        if ".." in parts or any("\\" in p for p in parts):
            self.refuse("archive_unsafe_member", name, "points outside the archive ('..')")
            return None
        if stat.S_ISLNK(mode):
            self.refuse("archive_unsafe_member", name, "is a link; links are never extracted")
            return None
        if stat.S_ISDIR(mode):
            if len(parts) > 1:
                self.refuse("unexpected_file", name, "is a nested folder; an adapter is flat")
            return None
        if not stat.S_ISREG(mode):
            self.refuse("archive_unsafe_member", name, "is a device, FIFO or other special file")
            return None
        if not parts or len(parts) > 2 or not self._one_wrapper(parts):
            self.refuse("unexpected_file", name, "is not at the top of the archive (or of its "
                        "one folder); an adapter is a flat folder of files")
            return None
        if declared > self.limits.max_file_bytes:
            self.refuse("file_too_large", name, f"is {declared} bytes, over the "
                        f"{self.limits.max_file_bytes}-byte per-file limit{self.limits.basis}; it was not "
                        "extracted")
            return None
        if self.total + declared > self.limits.max_total_bytes:
            self.refused.append(Violation(
                "file_too_large", f"the archive's files total more than "
                f"{self.limits.max_total_bytes} bytes{self.limits.basis}; extraction stopped at the limit"))
            self.stopped = True
            return None
        return parts[-1]

    def _one_wrapper(self, parts: list[str]) -> bool:
        if len(parts) == 1:
            self.flat = True
            return self.wrapper is None
        if self.wrapper is None and not self.flat:
            self.wrapper = parts[0]
        return self.wrapper == parts[0]

    def write(self, name: str, member: str, stream: IO[bytes]) -> None:
        budget = min(self.limits.max_file_bytes, self.limits.max_total_bytes - self.total)
        written = copy_capped(_chunks(stream), self.dest / name, budget)
        if written is None:
            # The member decompressed past its limit (a bomb, or a lying header).
            self.refused.append(Violation(
                "file_too_large", f"archive member {shown(member)} decompresses past the "
                f"{budget}-byte limit{self.limits.basis}; extraction stopped at the limit", member))
            self.stopped = True
        else:
            self.total += written


def extract(archive: Path, kind: str, dest: Path, limits: Limits, refused: list[Violation]) -> bool:
    """Extract into ``dest``; refusals go to ``refused``. False when a limit stopped it."""
    job = _Extraction(dest, limits, refused)
    try:
        if kind == "zip":
            _extract_zip(archive, job)
        else:
            _extract_tar(archive, job)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        refused.append(Violation("archive_invalid", f"{archive.name} is not a valid {kind} archive: "
                                 f"{shown(str(exc), 200)}"))
        return False
    except OSError as exc:
        raise SourceError(f"cannot read the archive {shown(str(archive))}: {exc.strerror or exc}") from None
    return not job.stopped


def _extract_tar(archive: Path, job: _Extraction) -> None:
    # "r|*": a forward-only stream (plain or gzip); nothing is seeked or buffered whole.
    with tarfile.open(archive, mode="r|*") as tar:
        for member in tar:
            name = job.admit(member.name, _tar_mode(member), member.size)
            if job.stopped:
                return
            if name is None:
                continue
            stream = tar.extractfile(member)
            if stream is None:  # pragma: no cover - admit() only passes regular files
                continue
            job.write(name, member.name, stream)
            if job.stopped:
                return


def _tar_mode(member: tarfile.TarInfo) -> int:
    if member.issym() or member.islnk():
        return stat.S_IFLNK
    if member.isdir():
        return stat.S_IFDIR
    if member.isreg() and not member.issparse():
        return stat.S_IFREG
    return stat.S_IFIFO if member.isfifo() else stat.S_IFCHR


def _extract_zip(archive: Path, job: _Extraction) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > job.limits.max_files:  # known from the central directory: stop now
            job.count = len(infos) - 1
            job.admit("", 0, 0)
            return
        for info in infos:
            kind = stat.S_IFMT(info.external_attr >> 16)
            mode = stat.S_IFDIR if info.is_dir() else (kind or stat.S_IFREG)
            name = job.admit(info.filename, mode, info.file_size)
            if job.stopped:
                return
            if name is None:
                continue
            if info.flag_bits & 0x1:
                job.refuse("archive_unsafe_member", info.filename, "is encrypted")
                continue
            with zf.open(info) as stream:
                job.write(name, info.filename, stream)
            if job.stopped:
                return


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK):
        yield chunk


def copy_capped(chunks: Iterable[bytes], dest: Path, cap: int) -> int | None:
    """Write ``chunks`` to the new file ``dest`` (never an existing one or a link); the
    bytes written, or None (and no file) past ``cap`` bytes. A full disk is a SourceError."""
    written = 0
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                written += len(chunk)
                if written > cap:
                    break
                out.write(chunk)
        if written > cap:
            dest.unlink()
            return None
    except FileExistsError:
        raise SourceError(f"{dest.name} appears twice in the adapter") from None
    except OSError as exc:
        raise SourceError(f"cannot stage {dest.name} in {dest.parent}: {describe_os_error(exc)}") from None
    return written
