"""What the compatibility check reports (Violation) and the limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["OTHER_FILES_BYTES", "Limits", "Violation"]

# What an adapter may hold beside its weights, all together: its config, a manifest, a
# README, a copy of the base's tokenizer (the largest tokenizer.json files are ~35 MB).
OTHER_FILES_BYTES = 64 * 1024**2


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
    # Why the size limits are what they are, appended to a refusal (set by ``within``).
    basis: str = ""

    def within(self, weights_bytes: int, basis: str) -> Limits:
        """These limits, tightened to an adapter whose weights file holds at most
        ``weights_bytes`` (and whose other files hold at most ``OTHER_FILES_BYTES``)."""
        total = weights_bytes + OTHER_FILES_BYTES
        # An archive adds headers per member, and compressing random bytes grows them a little.
        archive = total + total // 64 + 1024**2
        return replace(self, max_file_bytes=min(self.max_file_bytes, max(weights_bytes, OTHER_FILES_BYTES)),
                       max_total_bytes=min(self.max_total_bytes, total),
                       max_archive_bytes=min(self.max_archive_bytes, archive), basis=f" ({basis})")
