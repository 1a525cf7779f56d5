"""Every environmental failure of a push is a clear error with its exit code, never a
traceback, and registers nothing: read-only artifacts and database (real permissions,
as nobody), a locked database, a full disk (a real tmpfs), S3 unreachable or denied."""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_gateway.cli import main
from tests.integration.conftest import free_port


def setup(common: list[str], tiny_base) -> None:
    """tiny-llama, its template and tenant acme, registered through the CLI."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["registry", "add-base", *common, "tiny-llama", str(tiny_base.path)]) == 0
        assert main(["registry", "add-template", *common, "tiny-llama"]) == 0
        assert main(["registry", "add-tenant", *common, "acme"]) == 0


def push(common: list[str], adapter: Path, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["registry", "push", *common, *extra, "acme/bot", str(adapter), "--base", "tiny-llama"])
    return code, err.getvalue()


def versions(db_file: Path) -> int:
    with contextlib.closing(sqlite3.connect(db_file)) as conn:
        return int(conn.execute("SELECT count(*) FROM adapter_versions").fetchone()[0])


def test_read_only_artifact_folder_exits_5(nobody, corpus: Path) -> None:
    for path in [nobody.artifacts, *nobody.artifacts.rglob("*")]:
        os.chown(path, 0, 0)  # root's, 0755: nobody may read, not write
    code, err = nobody.cli("push", "acme/bot", str(nobody.copy(corpus / "valid")), "--base", "tiny-llama")
    assert code == 5, err
    assert "cannot write to the artifact store" in err and "permission denied" in err
    assert "Traceback" not in err
    assert versions(nobody.dir / "reg.db") == 0


def test_read_only_database_exits_6_after_upload(nobody, corpus: Path) -> None:
    """Reads work, the version row cannot be written: the blobs already uploaded stay
    unreferenced (gc collects them) and nothing is registered."""
    os.chown(nobody.dir / "reg.db", 0, 0)
    os.chmod(nobody.dir / "reg.db", 0o644)
    code, err = nobody.cli("push", "acme/bot", str(nobody.copy(corpus / "valid")), "--base", "tiny-llama")
    assert code == 6, err
    assert "it is read-only for this user" in err and "registry gc" in err and "Traceback" not in err
    assert versions(nobody.dir / "reg.db") == 0


def test_read_only_database_says_nothing_was_left_when_no_blob_was_uploaded(nobody,
                                                                          corpus: Path) -> None:
    adapter = str(nobody.copy(corpus / "valid"))
    code, err = nobody.cli("push", "acme/bot", adapter, "--base", "tiny-llama")
    assert code == 0, err
    os.chown(nobody.dir / "reg.db", 0, 0)
    os.chmod(nobody.dir / "reg.db", 0o644)
    # the same files under another name: every blob is stored already
    code, err = nobody.cli("push", "acme/bot2", adapter, "--base", "tiny-llama")
    assert code == 6, err
    assert "it is read-only for this user" in err and "nothing was left behind" in err
    assert "registry gc" not in err and "Traceback" not in err


def test_database_that_cannot_be_opened_exits_6(nobody, corpus: Path) -> None:
    os.chown(nobody.dir, 0, 0)  # no -wal/-shm can be created beside it
    os.chown(nobody.dir / "reg.db", 0, 0)
    os.chmod(nobody.dir / "reg.db", 0o644)
    code, err = nobody.cli("list", "acme")
    assert code == 6, err
    assert err.startswith("error: database sqlite:///") and "Traceback" not in err


def test_locked_database_exits_6(tmp_path: Path, tiny_base, corpus: Path) -> None:
    common = ["--db", f"sqlite:///{tmp_path / 'r.db'}", "--artifacts", str(tmp_path / "art")]
    setup(common, tiny_base)
    holder = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        code, err = push(common, corpus / "valid", "--db-lock-timeout", "0.2")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 6, err
    assert "another process holds its lock" in err
    assert versions(tmp_path / "r.db") == 0


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_lock_held_on_postgres_fails_the_push_instead_of_hanging(
        db_url: str, tmp_path: Path, tiny_base, corpus: Path) -> None:
    from sqlalchemy import create_engine, text

    common = ["--db", db_url, "--artifacts", str(tmp_path / "art")]
    setup(common, tiny_base)
    holder = create_engine(db_url)
    with holder.connect() as conn:
        conn.execute(text("LOCK TABLE adapters IN ACCESS EXCLUSIVE MODE"))  # a stuck transaction
        code, err = push(common, corpus / "valid", "--db-lock-timeout", "0.3")
        conn.rollback()
    holder.dispose()
    assert code == 6, err
    assert "another process holds its lock" in err and "Traceback" not in err
    code, err = push(common, corpus / "valid")
    assert code == 0, err  # nothing was left half-registered


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 KiB tmpfs: full after the first blob."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_exits_5(tiny_disk: Path, tmp_path: Path, tiny_base, corpus: Path) -> None:
    common = ["--db", f"sqlite:///{tmp_path / 'r.db'}", "--artifacts", str(tiny_disk)]
    setup(common, tiny_base)
    code, err = push(common, corpus / "valid")
    assert code == 5, err
    assert "disk full" in err
    assert versions(tmp_path / "r.db") == 0
    assert not list(tiny_disk.rglob(".partial-*"))  # no half-written blob left behind


def _s3_push(tmp_path: Path, tiny_base, corpus: Path, endpoint: str, monkeypatch) -> tuple[int, str]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    common = ["--db", f"sqlite:///{tmp_path / 'r.db'}", "--artifacts", "s3://lgw-failures/x",
              "--s3-endpoint", endpoint]
    setup(common, tiny_base)
    return push(common, corpus / "valid")


def test_s3_unreachable_exits_5(tmp_path: Path, tiny_base, corpus: Path, monkeypatch) -> None:
    code, err = _s3_push(tmp_path, tiny_base, corpus, f"http://127.0.0.1:{free_port()}", monkeypatch)
    assert code == 5 and "failed" in err and "127.0.0.1" in err, err
    assert versions(tmp_path / "r.db") == 0


def test_s3_denied_exits_5(tmp_path: Path, tiny_base, corpus: Path, monkeypatch) -> None:
    """A real S3-protocol server that checks credentials (moto with IAM auth on)."""
    from loadtest.servers import start

    port = free_port()
    server = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                    "-p", str(port)], tmp_path / "moto.log", port=port, ready_path="/moto-api/",
                   env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        code, err = _s3_push(tmp_path, tiny_base, corpus, server.url, monkeypatch)
    finally:
        server.stop()
    assert code == 5 and "403" in err, err
    assert versions(tmp_path / "r.db") == 0
