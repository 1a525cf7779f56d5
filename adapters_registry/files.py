"""A tenant's fine-tuning files (OpenAI's ``/v1/files`` with ``purpose="fine-tune"``).

A file is checked whole before anything is kept (``datasets.check_fine_tune_file``: every
bad line with its number), then its bytes go to the artifact store as one blob named by
their sha256 (verified on every read) and its row to the database. Files belong to one
tenant: another tenant's id is NotFoundError, as an unknown one is. A deleted file's row
stays (jobs name it) but it is never listed or read again; its blob goes with garbage
collection once nothing else references it.
"""

from __future__ import annotations

import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from adapters_registry.datasets import FileFormat, check_fine_tune_file
from adapters_registry.db import FileRow, as_utc
from adapters_registry.errors import NotFoundError, TooLargeError, ValidationError
from adapters_registry.hashing import sha256_bytes
from adapters_registry.store import ArtifactStore
from adapters_registry.tenancy import Tenancy

PURPOSES = ("fine-tune",)
MAX_FILENAME = 255


@dataclass(frozen=True)
class FileObject:
    id: str
    tenant: str
    filename: str
    purpose: str
    size: int
    sha256: str
    format: FileFormat
    examples: int
    created_at: datetime

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's file object (``status`` is always ``processed``: files are checked at upload)."""
        return {"id": self.id, "object": "file", "bytes": self.size,
                "created_at": int(self.created_at.timestamp()), "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None,
                "expires_at": None}


class Files:
    def __init__(self, db: Engine, store: ArtifactStore, tenancy: Tenancy) -> None:
        self.db = db
        self.store = store
        self._tenancy = tenancy

    def create(self, tenant_name: str, filename: str, purpose: str, data: bytes, *,
               max_bytes: int) -> FileObject:
        """Check and keep one uploaded file; ValidationError (every bad line), TooLargeError."""
        tenant = self._tenancy.get_tenant(tenant_name)
        problems = []
        if purpose not in PURPOSES:
            problems.append(f"purpose {purpose!r} is not served here; use one of {list(PURPOSES)}")
        if not filename.lower().endswith(".jsonl"):
            problems.append(f"file {filename!r}: fine-tuning files are JSONL (a .jsonl name, one "
                            "JSON object per line)")
        if len(filename) > MAX_FILENAME or "/" in filename or "\x00" in filename:
            problems.append(f"filename must be a plain name of at most {MAX_FILENAME} characters")
        if problems:
            raise ValidationError("; ".join(problems))
        if len(data) > max_bytes:
            raise TooLargeError(f"file {filename!r} is {len(data)} bytes, over this tenant's "
                                f"{max_bytes}-byte limit for a fine-tuning file")
        check = check_fine_tune_file(data)
        if check.problems or check.format is None:
            raise ValidationError(f"file {filename!r} is not a valid fine-tuning file "
                                  f"({len(check.problems)} problem(s)): {check.summary()}")
        digest = sha256_bytes(data)
        with tempfile.TemporaryDirectory(prefix="lgw-file-") as scratch:
            path = Path(scratch) / "upload.jsonl"
            path.write_bytes(data)
            self.store.put(path, digest)
        row = FileRow(id=f"file-{secrets.token_hex(12)}", tenant_id=tenant.id, filename=filename,
                      purpose=purpose, size=len(data), sha256=digest, format=check.format,
                      examples=check.examples, created_at=datetime.now(UTC))
        with Session(self.db) as s, s.begin():
            s.add(row)
            return _object(row, tenant.name)

    def list(self, tenant_name: str, *, purpose: str | None = None, limit: int = 10000,
             after: str | None = None, order: str = "desc") -> list[FileObject]:
        tenant = self._tenancy.get_tenant(tenant_name)
        newest_first = order != "asc"
        with Session(self.db) as s:
            query = select(FileRow).filter_by(tenant_id=tenant.id, deleted_at=None)
            if purpose is not None:
                query = query.filter_by(purpose=purpose)
            if after is not None:
                cursor = self._row(s, tenant.id, after)
                key = (cursor.created_at, cursor.id)
                if newest_first:
                    query = query.where((FileRow.created_at < key[0])
                                        | ((FileRow.created_at == key[0]) & (FileRow.id < key[1])))
                else:
                    query = query.where((FileRow.created_at > key[0])
                                        | ((FileRow.created_at == key[0]) & (FileRow.id > key[1])))
            columns = (FileRow.created_at.desc(), FileRow.id.desc()) if newest_first else (
                FileRow.created_at, FileRow.id)
            rows = s.scalars(query.order_by(*columns).limit(limit)).all()
            return [_object(r, tenant.name) for r in rows]

    def get(self, tenant_name: str, file_id: str) -> FileObject:
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s:
            return _object(self._row(s, tenant.id, file_id), tenant.name)

    def read(self, tenant_name: str, file_id: str) -> bytes:
        """The file's bytes, verified against its sha256."""
        return self.read_object(self.get(tenant_name, file_id))

    def read_object(self, file: FileObject) -> bytes:
        with tempfile.TemporaryDirectory(prefix="lgw-file-") as scratch:
            path = Path(scratch) / "content"
            self.store.get(file.sha256, path)
            return path.read_bytes()

    def delete(self, tenant_name: str, file_id: str) -> FileObject:
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s, s.begin():
            row = self._row(s, tenant.id, file_id)
            row.deleted_at = datetime.now(UTC)
            return _object(row, tenant.name)

    def referenced_blobs(self) -> set[str]:
        """The blobs of files not deleted (garbage collection keeps them)."""
        with Session(self.db) as s:
            return set(s.scalars(select(FileRow.sha256).filter_by(deleted_at=None)))

    @staticmethod
    def _row(s: Session, tenant_id: int, file_id: str) -> FileRow:
        row = s.get(FileRow, file_id) if len(file_id) <= 40 else None
        if row is None or row.tenant_id != tenant_id or row.deleted_at is not None:
            raise NotFoundError(f"No such File object: {file_id}")
        return row


def _object(row: FileRow, tenant: str) -> FileObject:
    file_format: FileFormat = "dpo" if row.format == "dpo" else "supervised"
    return FileObject(row.id, tenant, row.filename, row.purpose, row.size, row.sha256, file_format,
                      row.examples, as_utc(row.created_at))


__all__ = ["PURPOSES", "FileObject", "Files"]
