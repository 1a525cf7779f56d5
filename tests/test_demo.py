"""`lora-gateway demo` preparation on tiny-llama: each long step announced before it
starts, nothing redone on a second run, and a banner whose CLI line really works."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

from lora_gateway.cli import main
from lora_gateway.demo import DEMO_TENANTS, banner, prepare

FAST = {"max_steps": 2, "epochs": 1, "validation_fraction": 0.0}


def test_prepare_announces_long_steps_once_and_banner_says_where_state_lives(
    tmp_path: Path, capsys
) -> None:
    said: list[str] = []
    home, models = tmp_path / "demo", tmp_path / "models"
    setup = prepare(home, "tiny-llama", models, FAST, announce=said.append)
    assert said[0].startswith("building base tiny-llama from ") and "≈" in said[0]
    assert [s.split(" on ")[0] for s in said[1:]] == [
        f"training {d.tenant}/{d.adapter}" for d in DEMO_TENANTS]
    assert all(s.endswith(" s on 2 CPU cores)") for s in said[1:])

    said.clear()
    again = prepare(home, "tiny-llama", models, FAST, announce=said.append)
    assert said == [] and again.keys == setup.keys

    assert "metrics " not in banner(setup, "127.0.0.1", 8000, serving=False)
    text = banner(setup, "127.0.0.1", 8000, serving=False, metrics_port=8001)
    assert "  metrics    http://127.0.0.1:8001/metrics (Prometheus; not on the API port)" in text
    assert setup.database_url in text and str(setup.artifacts_dir) in text
    assert str(home / "keys.json") in text and setup.keys_file.stat().st_mode & 0o777 == 0o600
    command = next(line.strip() for line in text.splitlines()
                   if line.strip().startswith("lora-gateway registry list"))
    capsys.readouterr()
    assert main(shlex.split(command)[1:]) == 0
    listed = capsys.readouterr().out
    assert "support-bot\tversions=[1]\taliases: prod->v1" in listed


def test_the_banner_shows_fine_tuning_with_a_file_that_uploads(tmp_path: Path) -> None:
    from adapters_registry import check_fine_tune_file
    from lora_gateway.demo import DemoSetup

    setup = DemoSetup("sqlite:///x.db", tmp_path, "tiny-llama", tmp_path, {"acme": "k1", "blackbeard": "k2"},
                      tmp_path / "keys.json")
    text = banner(setup, "127.0.0.1", 8000)
    assert "client.fine_tuning.jobs.create(model='tiny-llama', training_file=f.id," in text
    upload = next(line.strip() for line in text.splitlines() if "client.files.create(" in line)
    call = ast.parse(upload).body[0].value  # the line runs as Python: f = client.files.create(...)
    opened = next(k.value for k in call.keywords if k.arg == "file")
    path = Path(ast.literal_eval(opened.args[0]))
    check = check_fine_tune_file(path.read_bytes())
    assert check.problems == [] and check.format == "supervised"
    assert "fine_tuning" not in banner(setup, "127.0.0.1", 8000, serving=False)
