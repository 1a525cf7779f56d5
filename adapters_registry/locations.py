"""Which artifact store a location names: a folder, or ``s3://bucket/prefix``.

Above both implementations (``store.FilesystemStore``, ``s3.S3Store``), so neither imports
the other and boto3 is imported only where S3 is configured.
"""

from __future__ import annotations

from pathlib import Path

from adapters_registry.errors import ValidationError
from adapters_registry.store import ArtifactStore, FilesystemStore


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
