"""S3Store against a real S3-protocol server process (moto's server mode) on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters_registry import Registry
from adapters_registry.database import make_engine
from adapters_registry.errors import ArtifactError, ChecksumMismatchError
from adapters_registry.hashing import sha256_file
from adapters_registry.s3 import S3Config, S3Store
from tests.integration.conftest import free_port


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            if proc.poll() is not None:
                raise RuntimeError(f"S3 server exited: {log.read_text()}")
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.25)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


@pytest.fixture
def store(s3_endpoint) -> S3Store:
    config = S3Config(bucket=f"lgw-{uuid.uuid4().hex[:8]}", prefix="tests/",
                      endpoint_url=s3_endpoint, access_key_id="test", secret_access_key="test",
                      max_attempts=2)
    s = S3Store(config)
    s._client.create_bucket(Bucket=config.bucket)
    return s


def blob(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    p = tmp_path / uuid.uuid4().hex
    p.write_bytes(data)
    return p, sha256_file(p)


def test_round_trip_is_verified_and_idempotent(store: S3Store, tmp_path: Path) -> None:
    src, digest = blob(tmp_path, b"adapter bytes" * 1000)
    assert not store.exists(digest)
    store.put(src, digest)
    store.put(src, digest)
    assert store.exists(digest)
    store.get(digest, tmp_path / "out" / "file")
    assert (tmp_path / "out" / "file").read_bytes() == src.read_bytes()


def test_corrupted_object_is_detected(store: S3Store, tmp_path: Path) -> None:
    src, digest = blob(tmp_path, b"good bytes")
    store.put(src, digest)
    store._client.put_object(Bucket=store.config.bucket, Key=store._key(digest), Body=b"evil")
    with pytest.raises(ChecksumMismatchError, match="changed or corrupted"):
        store.get(digest, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_missing_object_and_mismatched_source_are_errors(store: S3Store, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="NoSuchKey"):
        store.get("0" * 64, tmp_path / "x")
    src, _ = blob(tmp_path, b"abc")
    with pytest.raises(ChecksumMismatchError, match="refusing"):
        store.put(src, "1" * 64)


def test_unreachable_endpoint_is_a_clear_error(tmp_path: Path) -> None:
    dead = S3Store(S3Config(bucket="b", endpoint_url=f"http://127.0.0.1:{free_port()}",
                            access_key_id="t", secret_access_key="t", max_attempts=1,
                            connect_timeout_s=1, read_timeout_s=1))
    started = time.perf_counter()
    with pytest.raises(ArtifactError, match=r"endpoint http://127\.0\.0\.1:\d+.*failed"):
        dead.exists("a" * 64)
    assert time.perf_counter() - started < 10


@pytest.fixture
def s3_registry(store: S3Store, tmp_path: Path, tiny_contract, tiny_template) -> Iterator[Registry]:
    """A registry on ``store`` with the tiny base, its template and tenant acme."""
    reg = Registry(make_engine(f"sqlite:///{tmp_path / 'r.db'}"), store)
    try:
        reg.register_base(tiny_contract)
        reg.register_template(tiny_template)
        reg.create_tenant("acme")
        yield reg
    finally:
        reg.close()


def test_registry_on_s3(s3_registry: Registry, tmp_path: Path, trained_adapters) -> None:
    version = s3_registry.push("acme", "bot", trained_adapters["acme"])
    s3_registry.fetch(version, tmp_path / "fetched")
    for rel, digest in version.files.items():
        assert sha256_file(tmp_path / "fetched" / rel) == digest


def test_registry_opens_an_s3_location(s3_endpoint, tmp_path, monkeypatch, tiny_contract) -> None:
    from adapters_registry.errors import ValidationError
    from adapters_registry.locations import open_store

    # No keys in the config: boto3's own credential chain applies (here, the environment).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    store = open_store("s3://lgw-open/some/prefix", s3_endpoint_url=s3_endpoint)
    assert isinstance(store, S3Store) and store.describe() == "s3://lgw-open/some/prefix/"
    store._client.create_bucket(Bucket="lgw-open")
    reg = Registry.open(f"sqlite:///{tmp_path / 'r.db'}", "s3://lgw-open/some/prefix",
                        s3_endpoint_url=s3_endpoint)
    try:
        src, digest = blob(tmp_path, b"through Registry.open")
        reg.store.put(src, digest)
        assert reg.store.exists(digest)
    finally:
        reg.close()
    for bad in ("s3://", "gs://bucket/x"):
        with pytest.raises(ValidationError):
            open_store(bad)


def test_s3_lists_and_deletes_blobs(store: S3Store, tmp_path: Path) -> None:
    digests = []
    for data in (b"one", b"two"):
        src, digest = blob(tmp_path, data)
        store.put(src, digest)
        digests.append(digest)
    listed = dict(store.list_blobs())
    assert sorted(listed) == sorted(digests)
    assert all(t.tzinfo is not None for t in listed.values())
    store.delete(digests[0])
    assert [d for d, _ in store.list_blobs()] == [digests[1]]


def test_corrupt_blob_round_trip_on_s3(s3_registry: Registry, store: S3Store, tmp_path: Path,
                                       trained_adapters) -> None:
    """Re-pushing identical content re-uploads a corrupted object; verify with a repair
    source restores a deleted one."""
    from adapters_registry.errors import ConflictError

    reg = s3_registry
    version = reg.push("acme", "bot", trained_adapters["acme"])
    digest = version.files["adapter_model.safetensors"]
    store._client.put_object(Bucket=store.config.bucket, Key=store._key(digest), Body=b"rot")
    report = reg.verify_blobs()
    assert [(p.digest, p.state) for p in report.problems] == [(digest, "corrupt")]
    assert report.problems[0].used_by == ["acme/bot@v1:adapter_model.safetensors"]
    with pytest.raises(ChecksumMismatchError):
        reg.fetch(version, tmp_path / "broken")
    with pytest.raises(ConflictError, match="repaired"):
        reg.push("acme", "bot", trained_adapters["acme"])
    reg.fetch(version, tmp_path / "fetched")
    store.delete(digest)
    assert reg.verify_blobs().problems[0].state == "missing"
    repaired = reg.verify_blobs(repair_from=trained_adapters["acme"])
    assert repaired.problems[0].repaired and repaired.unrepaired == []
    assert reg.verify_blobs().problems == []
