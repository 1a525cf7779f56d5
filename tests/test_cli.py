"""The operator's path through `lora-gateway`: base, template, tenant, key, train --publish,
aliases, rollback, and clear errors (exit codes, no tracebacks) for bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from lora_gateway.cli import main
from tests.conftest import write_chat_jsonl


@pytest.fixture
def run(tmp_path, capsys):
    common = ["--db", f"sqlite:///{tmp_path / 'reg.db'}", "--artifacts", str(tmp_path / "art")]

    def call(*args: str) -> tuple[int, str, str]:
        argv = list(args)
        # registry options belong to the subcommand that owns them
        at = 2 if argv[0] == "registry" else 1
        code = main([*argv[:at], *common, *argv[at:]] if argv[0] in ("registry", "train") else argv)
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_operator_flow(run, tmp_path, tiny_base) -> None:
    code, out, _ = run("registry", "add-base", "tiny-llama", str(tiny_base.path))
    assert code == 0 and json.loads(out)["num_key_value_heads"] == 2
    code, out, _ = run("registry", "add-template", "tiny-llama", "--r", "8", "--alpha", "16")
    template_id = out.strip()
    assert code == 0 and template_id.startswith("tpl-")
    assert run("registry", "add-tenant", "acme")[0] == 0
    code, key, _ = run("registry", "create-key", "acme")
    assert code == 0 and key.strip().startswith("lgw-")
    code, key2, _ = run("registry", "create-key", "acme", "--expires-in-days", "30")
    assert code == 0
    assert run("registry", "revoke-key", "acme", key.strip()[:12])[1].strip() == "revoked 1 key(s)"
    listing = run("registry", "list-keys", "acme")[1]
    assert f"{key.strip()[:10]}…\trevoked" in listing and f"{key2.strip()[:10]}…\tactive" in listing
    assert key.strip() not in listing and key2.strip() not in listing

    data = write_chat_jsonl(tmp_path / "d.jsonl", "Hello from the CLI.")
    for n, out_dir in enumerate(("a1", "a2"), start=1):
        code, out, err = run("train", "--template", template_id, "--base-dir", str(tiny_base.path),
                             "--data", str(data), "--out", str(tmp_path / out_dir),
                             "--set", "max_steps=3", "--set", f"seed={n}",
                             "--publish", "acme/bot")
        assert code == 0, err
        assert f"published acme/bot@v{n}" in out
    code, out, _ = run("registry", "list", "acme")
    assert "bot\tversions=[1, 2]\taliases: prod->v1" in out
    assert run("registry", "set-alias", "acme/bot", "prod", "2")[0] == 0
    assert "prod->v2" in run("registry", "list", "acme")[1]
    assert run("registry", "set-alias", "acme/bot", "prod", "1")[0] == 0  # rollback
    assert "prod->v1" in run("registry", "list", "acme")[1]
    code, _, err = run("registry", "delete", "acme/bot", "1")
    assert code == 2 and "move them first" in err
    assert run("registry", "deprecate", "acme/bot", "2", "--actor", "ops-bob")[0] == 0
    audit = run("registry", "audit", "--subject", "acme/bot")[1].splitlines()
    assert audit[0].split("\t")[1:4] == ["ops-bob", "version.deprecate", "acme/bot@v2"]
    assert sum("alias.set" in line for line in audit) == 2

    # An incompatible push is refused whole, listing every violation, exit code 3.
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "a1", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] = 4
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    code, _, err = run("registry", "push", "acme/bot", str(bad))
    assert code == 3
    assert "rank_mismatch" in err and "pickle_weights" in err and "Traceback" not in err
    assert "versions=[1, 2]" in run("registry", "list", "acme")[1]


def test_bad_inputs_are_clear_errors(run, tmp_path, tiny_base) -> None:
    assert run("registry", "add-tenant", "Bad Name")[0] == 2
    assert run("registry", "create-key", "nobody")[0] == 2
    run("registry", "add-base", "tiny-llama", str(tiny_base.path))
    template_id = run("registry", "add-template", "tiny-llama")[1].strip()
    data = write_chat_jsonl(tmp_path / "d.jsonl", "x")
    code, _, err = run("train", "--template", template_id, "--base-dir", str(tiny_base.path),
                       "--data", str(data), "--out", str(tmp_path / "o"), "--set", "r=64")
    assert code == 2 and "template" in err and "Traceback" not in err
    (tmp_path / "broken.jsonl").write_text('{"messages": [{"role": "user"}]}\nnot json\n')
    code, _, err = run("train", "--template", template_id, "--base-dir", str(tiny_base.path),
                       "--data", str(tmp_path / "broken.jsonl"), "--out", str(tmp_path / "o"))
    assert code == 2 and "line 1" in err and "line 2" in err


def test_train_gates_decide_whether_anything_is_published(run, tmp_path, tiny_base) -> None:
    run("registry", "add-base", "tiny-llama", str(tiny_base.path))
    template_id = run("registry", "add-template", "tiny-llama", "--r", "8", "--alpha", "16")[1].strip()
    run("registry", "add-tenant", "acme")
    data = write_chat_jsonl(tmp_path / "d.jsonl", "Hello from the CLI.")
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"messages": [{"role": "user", "content": "Tell me a story."}],
                                  "expected": "Something it was never taught."}) + "\n")
    common = ["--template", template_id, "--base-dir", str(tiny_base.path), "--data", str(data),
              "--set", "max_steps=30", "--set", "learning_rate=1e-2", "--publish", "acme/bot"]

    # A missed gate: exit 4, the summary and every gate on stderr, nothing registered.
    code, out, err = run("train", *common, "--out", str(tmp_path / "v1"), "--eval-golden", str(golden),
                         "--alias", "canary")
    assert code == 4, err
    assert "golden_score: FAILED" in err and "train loss" in err and "Traceback" not in err
    assert "not published" in err and (tmp_path / "v1.failed").is_dir() and not (tmp_path / "v1").exists()
    assert run("registry", "list", "acme")[1].strip() == ""

    # The same run without the gate publishes and moves the alias; the summary is printed.
    code, out, err = run("train", *common, "--out", str(tmp_path / "v1"), "--alias", "canary")
    assert code == 0, err
    assert "gates: none configured" in out and "published acme/bot@v1" in out
    assert "aliases: canary->v1, prod->v1" in run("registry", "list", "acme")[1]


@pytest.mark.parametrize(("extra", "message"), [
    (["--publish", "acme"], "--publish expects TENANT/NAME"),
    (["--publish", "nobody/bot"], "nobody"),
    (["--alias", "canary"], "--alias needs --publish"),
    (["--set", "quantization=nf4"], "quantization='nf4'"),
    (["--set", "scheduler=steep"], "scheduler must be one of"),
    (["--eval-golden", "missing.jsonl"], "cannot read file"),
])
def test_train_refuses_bad_requests_before_training(run, tmp_path, tiny_base, extra, message) -> None:
    run("registry", "add-base", "tiny-llama", str(tiny_base.path))
    template_id = run("registry", "add-template", "tiny-llama")[1].strip()
    run("registry", "add-tenant", "acme")
    data = write_chat_jsonl(tmp_path / "d.jsonl", "x")
    code, out, err = run("train", "--template", template_id, "--base-dir", str(tiny_base.path),
                         "--data", str(data), "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and "train loss" not in out  # nothing was trained


def test_registry_migrate_applies_migrations_and_exits(tmp_path, capsys) -> None:
    from adapters_registry.database import current_revision, head_revision, make_engine

    db = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert main(["registry", "migrate", "--db", db]) == 0
    assert capsys.readouterr().out.strip().endswith(f"is at revision {head_revision()}")
    engine = make_engine(db, migrate=False)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    assert main(["registry", "migrate", "--db", db]) == 0  # idempotent: once per release, any number of times


def test_registry_migrate_failure_is_a_clear_error_without_the_password(capsys) -> None:
    code = main(["registry", "migrate", "--db", "postgresql+psycopg://lgw:s3cret@127.0.0.1:1/nope"])
    err = capsys.readouterr().err
    assert code == 6 and err.startswith("error: could not migrate ")
    assert "s3cret" not in err and "***" in err
    assert main(["registry", "migrate", "--db", "not a url"]) == 2
    assert "not a SQLAlchemy database URL" in capsys.readouterr().err


def test_set_limits_changes_only_the_given_flags(run) -> None:
    assert run("registry", "add-tenant", "acme")[0] == 0
    code, out, err = run("registry", "set-limits", "acme", "--rpm", "60", "--weight", "2.5",
                         "--max-tokens", "256")
    assert code == 0, err
    assert json.loads(out) == {"rpm": 60, "tpm": None, "concurrency": None, "max_tokens": 256,
                               "max_prompt_tokens": None, "weight": 2.5, "max_file_bytes": None,
                               "max_running_jobs": None, "max_queued_jobs": None,
                               "max_training_tokens": None}
    code, out, _ = run("registry", "set-limits", "acme", "--tpm", "10000", "--rpm", "default")
    assert code == 0 and json.loads(out)["rpm"] is None and json.loads(out)["max_tokens"] == 256
    assert json.loads(run("registry", "get-limits", "acme")[1])["tpm"] == 10000
    code, _, err = run("registry", "set-limits", "acme", "--concurrency", "0")
    assert code == 2 and "concurrency must be a whole number >= 1" in err
    assert run("registry", "set-limits", "nobody", "--rpm", "1")[0] == 2
    assert "limits.set" in run("registry", "audit", "--subject", "acme")[1]
def write_preferences(path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


PREFS = [{"prompt": q, "chosen": "ACME support desk: ticket opened.", "rejected": "No idea, sorry."}
         for q in ("Who are you?", "Hello", "Say something.", "What is your name?", "Can you help me?",
                   "Is anyone there?", "I need support.", "Open a ticket please.")]


def test_dpo_stage_on_a_registered_sft_adapter_is_published_like_any_adapter(run, tmp_path,
                                                                             tiny_base) -> None:
    run("registry", "add-base", "tiny-llama", str(tiny_base.path))
    template_id = run("registry", "add-template", "tiny-llama", "--r", "8", "--alpha", "16")[1].strip()
    run("registry", "add-tenant", "acme")
    common = ["--template", template_id, "--base-dir", str(tiny_base.path), "--publish", "acme/bot"]
    data = write_chat_jsonl(tmp_path / "d.jsonl", "ACME support desk: ticket opened.")
    assert run("train", *common, "--data", str(data), "--out", str(tmp_path / "sft"),
               "--set", "max_steps=20", "--set", "learning_rate=1e-2")[0] == 0
    prefs = write_preferences(tmp_path / "p.jsonl", PREFS)
    code, out, err = run("train", *common, "--method", "dpo", "--init-from", "acme/bot@v1",
                         "--data", prefs, "--out", str(tmp_path / "dpo"), "--set", "validation_fraction=0.25",
                         "--set", "max_steps=4", "--alias", "canary")
    assert code == 0, err
    assert "DPO loss" in out and "held-out preference: accuracy" in out and "val ppl" not in out
    assert "gate:  preference_accuracy: passed" in out and "published acme/bot@v2" in out
    assert "aliases: canary->v2, prod->v1" in run("registry", "list", "acme")[1]
    manifest = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert manifest["run_config"]["init_from"]["ref"] == "acme/bot@v1"
    assert manifest["run_config"]["method"] == "dpo" and manifest["run_config"]["learning_rate"] == 5e-4


@pytest.mark.parametrize(("extra", "message"), [
    (["--init-from", "acme/bot@v1"], "--init-from continues a registered adapter"),
    (["--set", "beta=0.2"], "['beta'] only apply to --method dpo"),
    (["--method", "dpo", "--init-from", "acme/nothing@v1"], "does not exist"),
    (["--method", "dpo", "--init-from", "acme"], "must be TENANT/NAME"),
])
def test_stage_requests_that_make_no_sense_are_refused(run, tmp_path, tiny_base, extra, message) -> None:
    run("registry", "add-base", "tiny-llama", str(tiny_base.path))
    template_id = run("registry", "add-template", "tiny-llama")[1].strip()
    run("registry", "add-tenant", "acme")
    data = write_preferences(tmp_path / "p.jsonl", PREFS) if "dpo" in extra else \
        str(write_chat_jsonl(tmp_path / "d.jsonl", "x"))
    code, _, err = run("train", "--template", template_id, "--base-dir", str(tiny_base.path),
                       "--data", data, "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_bad_preference_data_is_refused_before_training_with_line_numbers(run, tmp_path, tiny_base) -> None:
    run("registry", "add-base", "tiny-llama", str(tiny_base.path))
    template_id = run("registry", "add-template", "tiny-llama")[1].strip()
    run("registry", "add-tenant", "acme")
    bad = write_preferences(tmp_path / "bad.jsonl", [
        PREFS[0],
        {"prompt": "Hi", "chosen": "Hello."},  # missing field
        {"prompt": "Hi", "chosen": "Same answer.", "rejected": "same answer"},  # chosen == rejected
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "Yes."}],
         "rejected": [{"role": "assistant", "content": "No."}]},  # wrong role
    ])
    code, out, err = run("train", "--template", template_id, "--base-dir", str(tiny_base.path),
                         "--method", "dpo", "--data", bad, "--out", str(tmp_path / "o"),
                         "--publish", "acme/bot")
    assert code == 2 and "Traceback" not in err
    assert "line 2: missing 'rejected'" in err and "line 3: 'chosen' and 'rejected' are the same" in err
    assert "line 4: chosen[0].role must be 'assistant', got 'user'" in err and "line 1:" not in err
    assert not (tmp_path / "o").exists() and "DPO loss" not in out
    assert run("registry", "list", "acme")[1].strip() == ""
