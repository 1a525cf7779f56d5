"""Exceptions raised by the registry.

    RegistryError                 any registry failure
    ├── ValidationError           a name or argument is malformed
    │   └── TooLargeError         an upload is over its tenant's size limit
    ├── LimitReachedError         a tenant is at a count limit (jobs waiting); retry later
    ├── ContractError             a base model directory cannot be described exactly
    ├── TemplateError             an adapter template is invalid or does not match
    ├── ManifestError             an adapter's manifest.json is missing or malformed
    ├── ChatTemplateRenderError   the base's chat template refuses a list of messages
    ├── IncompatibleAdapterError  registration refused; carries every Violation
    ├── NotFoundError             no such base, template, tenant, adapter or version
    ├── ConflictError             the name or content already exists
    ├── AuthenticationError       an API key is unknown, revoked or malformed
    ├── SourceError               the adapter to register cannot be read or staged: missing or
    │                             dangling path, not a folder or archive, unreadable file,
    │                             no room to stage it
    ├── DatabaseError             the metadata database refused: read-only, locked, unreachable
    │   └── DatabaseUnreachableError  it cannot be reached now (refused, reset, restarting):
    │                             worth retrying
    └── ArtifactError             the artifact store failed: read-only, full, S3 unreachable or
        │                         denied, a blob missing
        ├── ChecksumMismatchError the bytes do not match the recorded sha256
        └── TamperedRecordError   a version's stored record is not one the registry wrote: a
                                  digest that is not a sha256, a file name that is not a plain
                                  name (``..``, ``/``, NUL), files that do not hash to its content

Each maps to one CLI exit code in ``adapters_registry.cli`` and one HTTP status in the
gateway; none is ever told apart by its text.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters_registry.violations import Violation


class RegistryError(Exception):
    """Base of every registry error."""


class ValidationError(RegistryError):
    pass


class TooLargeError(ValidationError):
    pass


class LimitReachedError(RegistryError):
    """A tenant is at one of its count limits; ``retry_after`` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ContractError(RegistryError):
    pass


class TemplateError(RegistryError):
    pass


class ManifestError(RegistryError):
    pass


class ChatTemplateRenderError(RegistryError):
    pass


class IncompatibleAdapterError(RegistryError):
    def __init__(self, adapter: str, violations: Sequence[Violation]) -> None:
        self.adapter = adapter
        self.violations = list(violations)
        lines = "\n".join(f"  - [{v.code}] {v.message}" for v in self.violations)
        super().__init__(
            f"adapter {adapter} is incompatible with the served base "
            f"({len(self.violations)} violation(s)):\n{lines}"
        )


class NotFoundError(RegistryError):
    pass


class ConflictError(RegistryError):
    pass


class AuthenticationError(RegistryError):
    pass


class SourceError(RegistryError):
    """The adapter folder, archive or upload could not be read or staged (I/O, not content)."""


class DatabaseError(RegistryError):
    """The metadata database could not be opened, written or locked in time."""


class DatabaseUnreachableError(DatabaseError):
    """The database server cannot be reached now: a refused or broken connection, or a
    server starting up or shutting down. The same operation may succeed later."""


class ArtifactError(RegistryError):
    pass


class ChecksumMismatchError(ArtifactError):
    pass


class TamperedRecordError(ArtifactError):
    pass
