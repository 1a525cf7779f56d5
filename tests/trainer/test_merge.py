"""Merged export of a trained tiny-llama adapter: parity with the unmerged adapter, refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_registry.contract import derive_contract
from adapters_registry.prompts import prompt_ids, stop_token_ids
from lora_gateway.cli import main
from tests.conftest import ANSWERS, PROMPTS
from trainer.errors import MergeError, ParityError
from trainer.merge import MERGE_RECORD_FILE, check_merge_parity, greedy_ids, merge_adapter
from trainer.provenance import content_sha256

# The tolerance this test holds the export to: max |merged - unmerged| logit in float32.
# Measured on tiny-llama: ~1e-5, with logits up to ~20 and an adapter effect of ~20.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def merged(tiny_base, trained_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "acme-merged"
    return merge_adapter(trained_adapters["acme"], tiny_base.path, out, check_parity=True,
                         tolerance=TOLERANCE)


def test_merged_logits_match_unmerged_within_tolerance(merged):
    report = merged.parity
    assert report is not None and report.passed
    assert report.tolerance == TOLERANCE
    assert report.max_abs_diff <= TOLERANCE
    assert report.argmax_agreement == 1.0
    assert report.sequences == 3 and report.positions > 3 * 10
    # A check that could fail: the adapter moves logits by whole units, 10^4 x the tolerance.
    assert report.adapter_effect > 1.0


def test_export_is_a_standalone_checkpoint_of_the_same_model(merged, tiny_base, tiny_contract,
                                                              trained_adapters):
    out = merged.out_dir
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            MERGE_RECORD_FILE} <= names
    assert not any(n.endswith(".bin") or n.startswith("adapter_") for n in names)
    exported = derive_contract(out, tiny_contract.model_id)
    assert exported.tokenizer_sha256 == tiny_contract.tokenizer_sha256
    assert exported.chat_template_sha256 == tiny_contract.chat_template_sha256
    assert exported.revision != tiny_contract.revision  # the weights did change
    record = json.loads((out / MERGE_RECORD_FILE).read_text())
    assert record["adapter_content_sha256"] == content_sha256(trained_adapters["acme"])
    assert record["base_revision"] == tiny_contract.revision
    assert record["parity"]["passed"] is True

    # Loaded on its own, with no PEFT, the export answers like the adapter.
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, finish = greedy_ids(model, prompt_ids(tok, [{"role": "user", "content": PROMPTS[0]}]), 40,
                             stop_token_ids(out, tok))
    assert finish == "stop"
    assert tok.decode(ids, skip_special_tokens=True) == ANSWERS["acme"]


def test_parity_fails_for_another_adapter(merged, tiny_base, trained_adapters):
    with pytest.raises(ParityError, match="differ by up to") as info:
        check_merge_parity(trained_adapters["globex"], tiny_base.path, merged.out_dir)
    assert not info.value.report.passed
    assert info.value.report.max_abs_diff > 1.0


def test_failed_parity_writes_nothing(tiny_base, trained_adapters, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(ParityError):
        # below float32 rounding: no real merge can meet it
        merge_adapter(trained_adapters["acme"], tiny_base.path, out, check_parity=True, tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(merged, tiny_base, trained_adapters):
    before = sorted(p.name for p in merged.out_dir.iterdir())
    with pytest.raises(FileExistsError, match="never overwritten"):
        merge_adapter(trained_adapters["acme"], tiny_base.path, merged.out_dir)
    assert sorted(p.name for p in merged.out_dir.iterdir()) == before


@pytest.mark.parametrize("tolerance", [0.0, -1.0, math.nan, math.inf])
def test_rejects_bad_tolerance(tiny_base, trained_adapters, tmp_path, tolerance):
    with pytest.raises(MergeError, match="tolerance must be a positive finite number"):
        merge_adapter(trained_adapters["acme"], tiny_base.path, tmp_path / "m", tolerance=tolerance)


def test_refuses_adapter_of_another_base(inline_base_dir, trained_adapters, tmp_path):
    with pytest.raises(MergeError, match="does not fit base") as info:
        merge_adapter(trained_adapters["acme"], inline_base_dir, tmp_path / "m")
    assert "base_revision_mismatch" in str(info.value)
    assert not (tmp_path / "m").exists()


def test_refuses_config_that_disagrees_with_manifest(tiny_base, trained_adapters, tmp_path):
    adapter = shutil.copytree(trained_adapters["acme"], tmp_path / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 32
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match=r"manifest\.json says"):
        merge_adapter(adapter, tiny_base.path, tmp_path / "m")


def test_refuses_missing_adapter(tiny_base, tmp_path):
    with pytest.raises(MergeError, match="does not exist"):
        merge_adapter(tmp_path / "nope", tiny_base.path, tmp_path / "m")


def test_cli_merge(tiny_base, trained_adapters, tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["adapter", "merge", "--adapter", str(trained_adapters["globex"]),
            "--base-dir", str(tiny_base.path), "--out", str(out), "--check-parity"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["merged"] == str(out) and printed["parity"]["passed"] is True
    assert (out / "model.safetensors").is_file()

    assert main(argv) == 2  # the folder exists now
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "never overwritten" in err and "Traceback" not in err


def test_cli_tolerance_needs_check_parity(tiny_base, trained_adapters, tmp_path, capsys):
    rc = main(["adapter", "merge", "--adapter", str(trained_adapters["acme"]), "--base-dir",
               str(tiny_base.path), "--out", str(tmp_path / "m"), "--tolerance", "1e-3"])
    assert rc == 2
    assert "--tolerance only applies with --check-parity" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
