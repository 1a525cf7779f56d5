"""S3 artifact store (boto3): content-addressed blobs, every read verified.

Everything is configured explicitly through ``S3Config``; nothing is read from the
environment here (boto3's credential chain applies only when no keys are given).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from adapters_registry.errors import ArtifactError, ChecksumMismatchError
from adapters_registry.hashing import check_digest, sha256_chunks, sha256_file, write_verified
from adapters_registry.store import BlobState, PutResult

_CHUNK = 1 << 20


@dataclass(frozen=True)
class S3Config:
    bucket: str = field(metadata={"help": "Bucket holding the blobs."})
    prefix: str = field(default="", metadata={"help": "Key prefix, e.g. 'lora-gateway/'."})
    endpoint_url: str | None = field(default=None, metadata={"help": "Non-AWS endpoint."})
    region: str = field(default="us-east-1", metadata={"help": "Signing region."})
    max_attempts: int = field(default=3, metadata={"help": "Attempts per call (standard retries)."})
    connect_timeout_s: float = field(default=5.0, metadata={"help": "TCP connect timeout."})
    read_timeout_s: float = field(default=60.0, metadata={"help": "Socket read timeout."})
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)


class S3Store:
    """Blobs at ``s3://bucket/prefix/blobs/sha256/ab/abcdef…``."""

    def __init__(self, config: S3Config, client: Any | None = None) -> None:
        self.config = config
        self._client = client if client is not None else _make_client(config)

    def describe(self) -> str:
        return f"s3://{self.config.bucket}/{self.config.prefix}"

    def _key(self, sha256: str) -> str:
        check_digest(sha256)
        return f"{self.config.prefix}blobs/sha256/{sha256[:2]}/{sha256}"

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("check", sha256, self._client.head_object,
                       Bucket=self.config.bucket, Key=self._key(sha256))
        except ArtifactError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in (
                    "404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def verify(self, sha256: str) -> BlobState:
        if not self.exists(sha256):
            return "missing"
        obj = self._call("download", sha256, self._client.get_object,
                         Bucket=self.config.bucket, Key=self._key(sha256))
        actual = self._call("download", sha256, lambda: sha256_chunks(obj["Body"].iter_chunks(_CHUNK)))
        return "ok" if actual == sha256 else "corrupt"

    def put(self, src: Path, sha256: str) -> PutResult:
        if sha256_file(src) != sha256:
            raise ChecksumMismatchError(f"{src} does not hash to {sha256[:12]}…; refusing to store it")
        state = self.verify(sha256)
        if state == "ok":
            return "present"
        with src.open("rb") as body:
            self._call("upload", sha256, self._client.put_object, Bucket=self.config.bucket,
                       Key=self._key(sha256), Body=body, Metadata={"sha256": sha256})
        return "stored" if state == "missing" else "repaired"

    def list_blobs(self) -> Iterator[tuple[str, datetime]]:
        pages = self._call("list", "*", self._client.get_paginator("list_objects_v2").paginate,
                           Bucket=self.config.bucket, Prefix=f"{self.config.prefix}blobs/sha256/")
        for page in pages:
            for obj in page.get("Contents", ()):
                yield obj["Key"].rsplit("/", 1)[-1], obj["LastModified"]

    def delete(self, sha256: str) -> None:
        self._call("delete", sha256, self._client.delete_object, Bucket=self.config.bucket,
                   Key=self._key(sha256))

    def get(self, sha256: str, dest: Path) -> None:
        obj = self._call("download", sha256, self._client.get_object,
                         Bucket=self.config.bucket, Key=self._key(sha256))
        self._call("download", sha256, lambda: write_verified(
            obj["Body"].iter_chunks(_CHUNK), dest, sha256, source=f"{self.describe()} blob {sha256[:12]}"))

    def _call(self, action: str, sha256: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise ArtifactError(f"S3 {action} of blob {sha256[:12]} at {self.describe()} "
                                f"failed: {code}") from exc
        except BotoCoreError as exc:  # endpoint unreachable, timeouts, bad credentials
            raise ArtifactError(f"S3 {action} at {self.describe()} "
                                f"(endpoint {self.config.endpoint_url or 'AWS'}) failed: {exc}") from exc


def _make_client(config: S3Config) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region,
        aws_access_key_id=config.access_key_id, aws_secret_access_key=config.secret_access_key,
        config=Config(retries={"max_attempts": config.max_attempts, "mode": "standard"},
                      connect_timeout=config.connect_timeout_s,
                      read_timeout=config.read_timeout_s),
    )
