"""Weighted composition of trained tiny-llama adapters: contract, arithmetic, refusals.

The expected deltas are computed here from the files alone (ΔW = scaling · B·A per
module), independently of PEFT, from what PEFT 0.21 does (peft/tuners/lora/model.py):
- linear: A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ, new scaling 1, so B·A has
  cross terms and is Σ wᵢ·ΔWᵢ only when a single weight is non-zero;
- svd: Σ wᵢ·ΔWᵢ truncated to rank r by SVD (the best rank-r approximation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters_registry import AdapterManifest, AdapterTemplate, check_adapter
from lora_gateway.cli import main
from tests.conftest import ANSWERS, train_tiny_adapter
from trainer.compose import (
    ComposeResult,
    Source,
    compose_adapters,
    composed_dataset_sha256,
    parse_source,
)
from trainer.errors import CompositionError, TrainError
from trainer.provenance import content_sha256

# Max |ΔW_composed - ΔW_expected| relative to max |ΔW_expected|, in float32.
# Measured: linear ~2e-7, svd ~2e-6 (SVD round-off); a wrong scaling is off by ~1.
REL_TOL = 1e-5


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Module prefix -> scaling · B @ A, from the adapter's files only."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    t = load_file(adapter / "adapter_model.safetensors")
    return {k[: -len(".lora_A.weight")]: scaling * t[k.replace("lora_A", "lora_B")] @ t[k]
            for k in t if k.endswith(".lora_A.weight")}


def factors(adapter: Path) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    return cfg["lora_alpha"] / cfg["r"], {
        k[: -len(".lora_A.weight")]: (t[k], t[k.replace("lora_A", "lora_B")])
        for k in t if k.endswith(".lora_A.weight")}


def max_rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    scale = max(float(w.abs().max()) for w in want.values())
    return max(float((got[k] - want[k]).abs().max()) for k in want) / scale


@pytest.fixture(scope="module")
def sources(trained_adapters) -> tuple[Path, Path]:
    return trained_adapters["acme"], trained_adapters["globex"]


@pytest.fixture(scope="module")
def composed(tiny_base, tiny_template, sources, tmp_path_factory) -> dict[str, ComposeResult]:
    root = tmp_path_factory.mktemp("composed")
    acme, globex = sources
    return {method: compose_adapters(tiny_base.path, tiny_template, [Source(acme, 0.6), Source(globex, 0.4)],
                                     method, root / method)
            for method in ("linear", "svd")}


@pytest.mark.parametrize("method", ["linear", "svd"])
def test_composition_passes_the_contract(composed, method, tiny_contract, tiny_template, sources):
    result = composed[method]
    assert check_adapter(result.out_dir, tiny_contract, tiny_template) == []
    manifest = AdapterManifest.read(result.out_dir)
    assert manifest == result.manifest
    assert manifest.template_id == tiny_template.template_id
    src = [AdapterManifest.read(s) for s in sources]
    assert manifest.dataset_sha256 == composed_dataset_sha256([m.dataset_sha256 for m in src], [0.6, 0.4])
    assert manifest.dataset_sha256 not in {m.dataset_sha256 for m in src}
    record = manifest.run_config["composition"]
    assert record["method"] == method
    assert record["svd_rank"] == (tiny_template.r if method == "svd" else None)
    assert [(s["content_sha256"], s["dataset_sha256"], s["weight"]) for s in record["sources"]] == [
        (content_sha256(p), m.dataset_sha256, w) for p, m, w in zip(sources, src, (0.6, 0.4), strict=True)]
    assert manifest.metrics["relative_error"] == result.relative_error


@pytest.mark.parametrize("method", ["linear", "svd"])
def test_composition_differs_from_each_source(composed, method, sources):
    got = deltas(composed[method].out_dir)
    for source in sources:
        assert max_rel_diff(got, deltas(source)) > 0.1


def test_svd_is_the_best_rank_r_approximation_of_the_weighted_sum(composed, sources, tiny_template):
    acme, globex = deltas(sources[0]), deltas(sources[1])
    want = {}
    for k in acme:
        u, s, vh = torch.linalg.svd(0.6 * acme[k] + 0.4 * globex[k], full_matrices=False)
        r = tiny_template.r
        want[k] = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    assert max_rel_diff(deltas(composed["svd"].out_dir), want) <= REL_TOL
    # two rank-8 deltas sum to rank 16: truncation must lose something, and says how much
    assert 1e-3 < composed["svd"].relative_error < 1


@pytest.mark.parametrize("weights", [(0.6, 0.4), (1.0, -1.0)])
def test_linear_is_peft_factor_arithmetic(tiny_base, tiny_template, sources, tmp_path, weights):
    result = compose_adapters(tiny_base.path, tiny_template,
                              [Source(p, w) for p, w in zip(sources, weights, strict=True)],
                              "linear", tmp_path / "lin")
    (s_a, fa), (s_g, fg) = factors(sources[0]), factors(sources[1])
    want = {}
    for k in fa:
        a = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * f[k][0]
                for w, s, f in zip(weights, (s_a, s_g), (fa, fg), strict=True))
        b = sum(math.sqrt(abs(w * s)) * f[k][1]
                for w, s, f in zip(weights, (s_a, s_g), (fa, fg), strict=True))
        want[k] = b @ a
    assert max_rel_diff(deltas(result.out_dir), want) <= REL_TOL
    assert result.relative_error > 0.1  # the cross terms: far from Σ wᵢ·ΔWᵢ


@pytest.mark.parametrize("method", ["linear", "svd"])
def test_weights_one_zero_reproduce_the_first_source(tiny_base, tiny_template, sources, tmp_path, method):
    srcs = [Source(sources[0], 1.0), Source(sources[1], 0.0)]
    result = compose_adapters(tiny_base.path, tiny_template, srcs, method, tmp_path / method)
    assert max_rel_diff(deltas(result.out_dir), deltas(sources[0])) <= REL_TOL
    assert result.relative_error <= REL_TOL


@pytest.fixture(scope="module")
def rslora(tiny_base, tiny_contract, tmp_path_factory) -> tuple[AdapterTemplate, Path]:
    template = AdapterTemplate(tiny_contract.model_id, tiny_contract.revision, r=8, lora_alpha=16,
                               use_rslora=True)
    root = tmp_path_factory.mktemp("rslora")
    return template, train_tiny_adapter(tiny_base, template, ANSWERS["acme"], root / "a", root)


def test_rslora_template_keeps_its_scaling(tiny_base, tiny_contract, rslora, tmp_path):
    template, adapter = rslora
    result = compose_adapters(tiny_base.path, template, [Source(adapter, 1.0), Source(adapter, 0.0)],
                              "svd", tmp_path / "c")
    assert check_adapter(result.out_dir, tiny_contract, template) == []
    assert max_rel_diff(deltas(result.out_dir), deltas(adapter)) <= REL_TOL


def test_refuses_sources_of_another_template(tiny_base, tiny_template, sources, rslora, tmp_path):
    _, other = rslora
    with pytest.raises(CompositionError, match="template_mismatch") as info:
        compose_adapters(tiny_base.path, tiny_template, [Source(sources[0], 0.5), Source(other, 0.5)],
                         "svd", tmp_path / "c")
    assert "source 2" in str(info.value) and "source 1" not in str(info.value)
    assert not (tmp_path / "c").exists()


def test_refuses_a_base_that_is_not_the_templates(inline_base_dir, tiny_template, sources, tmp_path):
    with pytest.raises(TrainError, match="template"):
        compose_adapters(inline_base_dir, tiny_template, [Source(sources[0], 0.5), Source(sources[1], 0.5)],
                         "svd", tmp_path / "c")


@pytest.mark.parametrize(("method", "weights", "message"), [
    ("cat", (0.5, 0.5), "rank is the sum"),
    ("ties", (0.5, 0.5), "unknown composition method 'ties'"),
    ("magnitude_prune_svd", (0.5, 0.5), "unknown composition method"),
    ("svd", (), "at least one source"),
    ("svd", (math.nan, 1.0), "source 1 .* not a finite number"),
    ("linear", (1.0, math.inf), "source 2 .* not a finite number"),
    ("linear", (True, 1.0), "not a finite number"),
    ("svd", (0.0, 0.0), "every weight is 0"),
    ("svd", (1.0,), "svd needs at least two sources"),
])  # fmt: skip
def test_refusals(tiny_base, tiny_template, sources, tmp_path, method, weights, message):
    srcs = [Source(sources[i % 2], w) for i, w in enumerate(weights)]
    with pytest.raises(CompositionError, match=message):
        compose_adapters(tiny_base.path, tiny_template, srcs, method, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_refuses_to_overwrite(composed, tiny_base, tiny_template, sources):
    with pytest.raises(FileExistsError, match="never overwritten"):
        compose_adapters(tiny_base.path, tiny_template, [Source(sources[0], 1.0)], "linear",
                         composed["svd"].out_dir)


def test_parse_source():
    assert parse_source("adapters/a:0.25") == Source(Path("adapters/a"), 0.25)
    assert parse_source("c:/odd:dir:-1") == Source(Path("c:/odd:dir"), -1.0)
    for bad, message in [("adapters/a", "DIR:WEIGHT"), (":1", "DIR:WEIGHT"), ("a:heavy", "not a number")]:
        with pytest.raises(CompositionError, match=message):
            parse_source(bad)


def test_cli_compose_and_publish(registry_env, tmp_path, capsys, sources):
    env = registry_env
    out = tmp_path / "mix"
    argv = ["adapter", "compose", "--db", env.db_url, "--artifacts", str(env.artifacts),
            "--template", env.template.template_id, "--base-dir", str(env.base.path),
            "--source", f"{sources[0]}:0.7", "--source", f"{sources[1]}:0.3", "--method", "svd",
            "--out", str(out), "--publish", "acme/mix", "--alias", "canary"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "published acme/mix@v1" in printed
    acme = env.registry.get_tenant("acme")
    assert env.registry.resolve(acme, "mix:canary").content_sha256 == content_sha256(out)
    # the provenance names the very versions the registry holds
    record = AdapterManifest.read(out).run_config["composition"]
    assert record["sources"][0]["content_sha256"] == env.registry.resolve(acme, "support-bot").content_sha256


def test_cli_compose_errors(registry_env, tmp_path, capsys, sources):
    env = registry_env
    common = ["adapter", "compose", "--db", env.db_url, "--artifacts", str(env.artifacts),
              "--base-dir", str(env.base.path), "--out", str(tmp_path / "c")]
    cases = [
        (["--template", env.template.template_id, "--source", f"{sources[0]}:1", "--method", "cat"],
         "rank is the sum"),
        (["--template", "tpl-0000000000000000", "--source", f"{sources[0]}:1"], "tpl-0000000000000000"),
        (["--template", env.template.template_id, "--source", f"{sources[0]}:x"], "not a number"),
        (["--template", env.template.template_id, "--source", f"{sources[0]}:1", "--publish", "acme"],
         "TENANT/NAME"),
        (["--template", env.template.template_id, "--source", f"{sources[0]}:1", "--alias", "prod"],
         "--alias only applies with --publish"),
    ]
    for extra, message in cases:
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
        assert not (tmp_path / "c").exists()
