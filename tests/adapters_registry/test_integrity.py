"""A corrupted or missing blob is found by `registry verify`, with the versions that use
it, and repaired by re-pushing the same content or by `verify --repair PATH`."""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path

import pytest

from adapters_registry import Registry
from adapters_registry.errors import ChecksumMismatchError, ConflictError
from lora_gateway.cli import main

WEIGHTS = "adapter_model.safetensors"


def cli(env, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["registry", args[0], "--db", env.db_url, "--artifacts", str(env.artifacts), *args[1:]])
    return code, out.getvalue(), err.getvalue()


def blob_path(env, digest: str) -> Path:
    return env.artifacts / "blobs" / "sha256" / digest[:2] / digest


def test_corrupt_blob_round_trip_on_the_filesystem(registry_env, trained_adapters, tmp_path) -> None:
    reg: Registry = registry_env.registry
    version = reg.resolve(reg.get_tenant("acme"), "support-bot")
    digest = version.files[WEIGHTS]
    blob_path(registry_env, digest).write_bytes(b"bit rot")
    with pytest.raises(ChecksumMismatchError):
        reg.fetch(version, tmp_path / "f1")

    code, out, err = cli(registry_env, "verify")
    assert code == 5, err
    assert f"corrupt\t{digest}\tused by acme/support-bot@v1:{WEIGHTS}" in out
    assert "lora-gateway registry verify --repair PATH" in err

    # Re-pushing the same content repairs the blob it shares (and says so).
    with pytest.raises(ConflictError, match=r"identical content is already v1; its corrupted .* repaired"):
        reg.push("acme", "support-bot", trained_adapters["acme"])
    reg.fetch(version, tmp_path / "f2")

    # verify --repair from an archive of the original files.
    blob_path(registry_env, digest).unlink()
    archive = tmp_path / "acme.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(trained_adapters["acme"], arcname="acme")
    code, out, err = cli(registry_env, "verify", "--repair", str(archive))
    assert code == 0, err
    assert f"repaired\t{digest}" in out and "1 corrupted or missing, 1 repaired" in out
    reg.fetch(version, tmp_path / "f3")
    assert cli(registry_env, "verify")[0] == 0


def test_repair_from_unrelated_files_repairs_nothing(registry_env, trained_adapters) -> None:
    version = registry_env.registry.resolve(registry_env.registry.get_tenant("acme"), "support-bot")
    blob_path(registry_env, version.files[WEIGHTS]).write_bytes(b"bit rot")
    code, _, err = cli(registry_env, "verify", "--repair", str(trained_adapters["globex"]))
    assert code == 5 and "the supplied files do not contain them" in err
