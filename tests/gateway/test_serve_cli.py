"""`lora-gateway serve` flags: one per setting (secrets excepted), validated like the environment."""

from __future__ import annotations

import pytest

from gateway.cli import FLAG_FIELDS, settings_from_args
from gateway.config import GatewaySettings
from lora_gateway.cli import build_parser, main

REQUIRED = ["--database-url", "sqlite:///x.db", "--artifacts-dir", "art", "--cache-dir", "cache",
            "--base-model-id", "tiny", "--base-model-dir", "models/tiny"]


def test_every_setting_but_secrets_has_a_flag() -> None:
    secrets = {"admin_api_key", "redis_url"}
    assert set(FLAG_FIELDS) == set(GatewaySettings.model_fields) - secrets


def test_serve_and_registry_take_each_others_names_for_the_database_and_artifacts() -> None:
    parser = build_parser()
    serve = settings_from_args(parser.parse_args(
        ["serve", *REQUIRED[4:], "--db", "sqlite:///y.db", "--artifacts", "s3://b/p"]))
    assert (serve.database_url, serve.artifacts_dir) == ("sqlite:///y.db", "s3://b/p")
    for cmd in (["migrate"], ["list", "acme"]):
        reg = parser.parse_args(["registry", *cmd, "--database-url", "sqlite:///z.db"])
        assert reg.db == "sqlite:///z.db"
    assert parser.parse_args(["registry", "list", "acme", "--artifacts-dir", "a"]).artifacts == "a"


def test_flags_become_typed_settings() -> None:
    args = build_parser().parse_args([
        "serve", *REQUIRED, "--max-lora-rank", "32", "--max-loras", "2", "--max-cpu-loras", "4",
        "--resolve-ttl-seconds", "0.5", "--no-expose-base", "--pinned-adapter", "acme/bot",
        "--disk-cache-max-bytes", "2GiB", "--dtype", "float32"])
    s = settings_from_args(args)
    assert (s.max_lora_rank, s.max_loras, s.resolve_ttl_seconds) == (32, 2, 0.5)
    assert s.expose_base is False and s.pinned_adapters == ["acme/bot"]
    assert s.disk_cache_max_bytes == 2 << 30 and s.dtype == "float32"


def test_flags_override_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("LGW_MAX_NUM_SEQS", "3")
    monkeypatch.setenv("LGW_MAX_LORAS", "2")
    s = settings_from_args(build_parser().parse_args(["serve", *REQUIRED, "--max-loras", "3"]))
    assert (s.max_num_seqs, s.max_loras) == (3, 3)


@pytest.mark.parametrize(("argv", "named"), [
    (["--max-lora-rank", "17"], "--max-lora-rank (LGW_MAX_LORA_RANK)"),
    (["--max-cpu-loras", "1", "--max-loras", "2"], "max_cpu_loras must be >= max_loras"),
    (["--dtype", "fp8"], "--dtype (LGW_DTYPE)"),
    (["--disk-cache-max-bytes", "lots"], "--disk-cache-max-bytes"),
])
def test_bad_settings_exit_2_naming_the_setting(argv, named, capsys) -> None:
    assert main(["serve", *REQUIRED, *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_missing_required_settings_are_listed(capsys) -> None:
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    for name in ("--database-url", "--artifacts-dir", "--cache-dir", "--base-model-id"):
        assert f"{name} (LGW_" in err


def test_a_non_number_for_a_number_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", *REQUIRED, "--max-loras", "abc"])
    assert exc.value.code == 2 and "--max-loras" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["unregistered base", "schema not migrated"])
def test_a_gateway_that_cannot_start_says_why_without_a_traceback(tmp_path, tiny_base, case) -> None:
    import subprocess
    import sys

    from adapters_registry import Registry

    db = tmp_path / "reg.db"
    args = ["--database-url", f"sqlite:///{db}", "--artifacts-dir", str(tmp_path / "art"),
            "--cache-dir", str(tmp_path / "cache"), "--base-model-id", "tiny-llama",
            "--base-model-dir", str(tiny_base.path), "--port", "1"]
    if case == "schema not migrated":
        db.touch()  # an empty database: no schema at all
        args.append("--no-migrate-on-start")
    else:
        Registry.open(f"sqlite:///{db}", tmp_path / "art").close()
    proc = subprocess.run([sys.executable, "-m", "lora_gateway.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot start:" in proc.stderr and "Traceback" not in proc.stderr
    expected = "register it first" if case == "unregistered base" else "lora-gateway registry migrate"
    assert expected in proc.stderr
