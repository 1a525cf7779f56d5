"""What the compatibility check reports (Violation) and the limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "Violation"]


@dataclass(frozen=True)
class Violation:
    """One reason an adapter cannot be served on a base."""

    code: str  # stable snake_case identifier, for programs
    message: str  # what is wrong, expected vs found, for people
    where: str | None = None  # the file, tensor or field concerned


@dataclass(frozen=True)
class Limits:
    """Size and dtype limits an adapter must respect."""

    max_file_bytes: int = 2 * 1024**3
    max_total_bytes: int = 4 * 1024**3
    max_files: int = 64  # entries in a folder, members in an archive
    max_archive_bytes: int = 4 * 1024**3  # an archive or upload as it arrives (compressed)
    allowed_dtypes: frozenset[str] = frozenset({"F32", "F16", "BF16"})
