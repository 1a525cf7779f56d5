"""check_adapter: one table of broken adapters, each with the violations it must produce.

Every case asserts the exact set of violation codes and that each code's message names
the problem, so a message that stops saying what is wrong fails as loudly as a missed
check. The adapters are PEFT's own output for the tiny base built in conftest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from adapters_registry.compat import Limits, Violation, check_adapter
from adapters_registry.manifest import AdapterManifest
from adapters_registry.template import AdapterTemplate

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Mutation = Callable[[Path, Any], None]


# --- mutations: each breaks a copy of the good adapter in one way -------------------------


def manifest(**changes: Any) -> Mutation:
    def mutate(adapter: Path, kit: Any) -> None:
        dataclasses.replace(AdapterManifest.read(adapter), **changes).write(adapter)

    return mutate


def peft(**lora: Any) -> Mutation:
    """Replace the PEFT files with ones saved from a LoraConfig with ``lora`` changed."""

    def mutate(adapter: Path, kit: Any) -> None:
        variant = kit.save_peft(adapter.parent / "variant", **lora)
        for name in os.listdir(variant):
            if name != "README.md":
                shutil.copy(variant / name, adapter / name)

    return mutate


def config(**changes: Any) -> Mutation:
    def mutate(adapter: Path, kit: Any) -> None:
        cfg = json.loads((adapter / CONFIG).read_text())
        (adapter / CONFIG).write_text(json.dumps(cfg | changes))

    return mutate


def remove(name: str) -> Mutation:
    return lambda adapter, kit: (adapter / name).unlink()


def write(name: str, data: bytes = b"x") -> Mutation:
    return lambda adapter, kit: (adapter / name).write_bytes(data)


def both(*mutations: Mutation) -> Mutation:
    def mutate(adapter: Path, kit: Any) -> None:
        for m in mutations:
            m(adapter, kit)

    return mutate


def pickle_weights_only(adapter: Path, kit: Any) -> None:
    peft(safe=False)(adapter, kit)
    (adapter / WEIGHTS).unlink()


def truncate(adapter: Path, kit: Any) -> None:
    path = adapter / WEIGHTS
    os.truncate(path, path.stat().st_size // 2)


def put_nan(adapter: Path, kit: Any) -> None:
    tensors = load_numpy(adapter / WEIGHTS)
    tensors[Q_A][0, 0] = np.nan
    save_numpy(tensors, adapter / WEIGHTS, metadata={"format": "pt"})


def to_float64(adapter: Path, kit: Any) -> None:
    tensors = {k: v.astype(np.float64) for k, v in load_numpy(adapter / WEIGHTS).items()}
    save_numpy(tensors, adapter / WEIGHTS, metadata={"format": "pt"})


def link_extra_file(adapter: Path, kit: Any) -> None:
    (adapter / "training_config.json").symlink_to(kit.base_dir / "config.json")


def subdirectory(adapter: Path, kit: Any) -> None:
    (adapter / "checkpoint-10").mkdir()


def narrow_base_weights(adapter: Path, kit: Any) -> None:
    variant = kit.save_peft(adapter.parent / "variant", narrow=True)
    shutil.copy(variant / WEIGHTS, adapter / WEIGHTS)


CASES = [
    # manifest vs contract and template
    pytest.param(manifest(base_revision="0" * 64),
                 {"base_revision_mismatch": "base_revision='000000"}, id="wrong-base-revision"),
    pytest.param(manifest(base_model_id="other-base"),
                 {"base_model_mismatch": "base_model_id='other-base', expected 'tiny-llama'"},
                 id="wrong-base-model"),
    pytest.param(manifest(tokenizer_sha256="f" * 64),
                 {"tokenizer_mismatch": "tokenizer_sha256='ffffff"}, id="tokenizer-hash"),
    pytest.param(manifest(chat_template_sha256="e" * 64),
                 {"chat_template_mismatch": "chat_template_sha256='eeeeee"}, id="chat-template-hash"),
    pytest.param(manifest(template_id="tpl-0000000000000000"),
                 {"template_mismatch": "template_id='tpl-0000000000000000'"}, id="template-id"),
    pytest.param(write("manifest.json", b"{not json"),
                 {"manifest_invalid": "manifest.json is not valid JSON"}, id="manifest-not-json"),
    # adapter_config.json and the tensors it implies, as PEFT saves them
    pytest.param(peft(r=16), {"rank_mismatch": "has r=16, but template",
                              "tensor_shape_mismatch": "has shape [16, 64], expected [8, 64]"},
                 id="rank-16"),
    pytest.param(peft(lora_alpha=32), {"alpha_mismatch": "lora_alpha=32"}, id="alpha-32"),
    pytest.param(peft(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]),
                 {"target_modules_mismatch": "extra: ['gate_proj'], missing: []",
                  "unexpected_tensor": "layers.{0,1}.mlp.gate_proj.lora_A.weight is not part"},
                 id="extra-target-module"),
    pytest.param(peft(target_modules=["q_proj", "v_proj"]),
                 {"target_modules_mismatch": "missing: ['k_proj', 'o_proj']",
                  "missing_tensor": "layers.{0,1}.self_attn.k_proj.lora_B.weight is missing"},
                 id="missing-target-modules"),
    pytest.param(narrow_base_weights,
                 {"tensor_shape_mismatch": "q_proj.lora_A.weight has shape [8, 32], expected "
                  "[8, 64] for base tiny-llama (hidden_size=64"}, id="trained-for-hidden-32"),
    pytest.param(peft(use_dora=True),
                 {"dora_not_allowed": "use_dora=True",
                  "unexpected_tensor": "lora_magnitude_vector"}, id="dora"),
    pytest.param(peft(use_rslora=True), {"rslora_mismatch": "use_rslora=True"}, id="rslora"),
    pytest.param(peft(modules_to_save=["lm_head"]),
                 {"modules_to_save_not_allowed": "modules_to_save=",
                  "unexpected_tensor": "lm_head"}, id="modules-to-save"),
    pytest.param(peft(rank_pattern={"q_proj": 4}),
                 {"rank_pattern_not_allowed": "rank_pattern={'q_proj': 4}",
                  "tensor_shape_mismatch": "q_proj.lora_A.weight has shape [4, 64]"},
                 id="rank-pattern"),
    pytest.param(config(alpha_pattern={"q_proj": 4}),
                 {"alpha_pattern_not_allowed": "alpha_pattern={'q_proj': 4}"}, id="alpha-pattern"),
    pytest.param(config(layers_to_transform=0),
                 {"layer_selection_not_allowed": "layers_to_transform=0"}, id="layers-to-transform"),
    pytest.param(config(bias="all"), {"bias_not_none": "bias='all'"}, id="bias"),
    pytest.param(config(target_modules=".*_proj"),
                 {"target_modules_mismatch": "'.*_proj', a pattern"}, id="target-modules-regex"),
    pytest.param(config(peft_type="IA3"), {"peft_type_not_lora": "peft_type='IA3'"}, id="ia3"),
    pytest.param(config(r="8"), {"adapter_config_invalid": "r='8', expected an integer"},
                 id="r-not-int"),
    pytest.param(write(CONFIG, b"[1, 2]"), {"adapter_config_invalid": "not a JSON object"},
                 id="config-not-object"),
    pytest.param(write(CONFIG, b"[" * 100_000), {"adapter_config_invalid": "not valid JSON"},
                 id="config-nested-too-deep"),
    pytest.param(write("manifest.json", b"[" * 100_000), {"manifest_invalid": "nested too deeply"},
                 id="manifest-nested-too-deep"),
    pytest.param(config(lora_bias=True), {"bias_not_none": "lora_bias=True"}, id="lora-bias"),
    # files
    pytest.param(pickle_weights_only,
                 {"pickle_weights": "adapter_model.bin: pickle weights are never loaded; save "
                  "with safetensors",
                  "missing_file": "adapter_model.safetensors is missing"}, id="pickle-instead"),
    pytest.param(write("optimizer.pt"), {"pickle_weights": "optimizer.pt"}, id="pickle-extra"),
    pytest.param(remove(CONFIG), {"missing_file": "adapter_config.json is missing"},
                 id="no-config"),
    pytest.param(link_extra_file, {"symlink": "training_config.json is a symlink"},
                 id="symlink"),
    pytest.param(write("notes.txt"), {"unexpected_file": "unexpected file notes.txt"},
                 id="unexpected-file"),
    pytest.param(subdirectory, {"unexpected_file": "subdirectory checkpoint-10"}, id="subdir"),
    # weights content
    pytest.param(truncate, {"invalid_safetensors": "is truncated"}, id="truncated"),
    pytest.param(write(WEIGHTS, b""), {"invalid_safetensors": "8-byte header length"},
                 id="empty-weights"),
    pytest.param(put_nan, {"non_finite_values": f"{Q_A} contains 1 NaN/Inf"}, id="nan"),
    pytest.param(to_float64, {"dtype_not_allowed": "16 tensor(s) in adapter_model.safetensors "
                              "are F64"}, id="float64"),
]  # fmt: skip


def codes(violations: list[Violation]) -> set[str]:
    return {v.code for v in violations}


def assert_reports(violations: list[Violation], expected: dict[str, str]) -> None:
    """Exactly the expected codes, each with a message containing its needle."""
    assert codes(violations) == set(expected), [(v.code, v.message) for v in violations]
    for code, needle in expected.items():
        messages = [v.message for v in violations if v.code == code]
        assert any(needle in m for m in messages), (code, needle, messages)


def test_good_adapter_has_no_violations(kit: Any) -> None:
    assert check_adapter(kit.good, kit.contract, kit.template) == []


def test_plain_peft_folder_without_a_manifest_is_compatible(kit: Any, adapter: Path) -> None:
    (adapter / "manifest.json").unlink()
    assert check_adapter(adapter, kit.contract, kit.template) == []


@pytest.mark.parametrize(("mutate", "expected"), CASES)
def test_each_problem_is_reported(
    kit: Any, adapter: Path, mutate: Mutation, expected: dict[str, str]
) -> None:
    mutate(adapter, kit)
    assert_reports(check_adapter(adapter, kit.contract, kit.template), expected)


def test_every_violation_is_collected_not_just_the_first(kit: Any, adapter: Path) -> None:
    both(
        peft(r=16),
        manifest(base_revision="0" * 64, tokenizer_sha256="f" * 64),
        write("adapter_model.bin"),
        write("notes.txt"),
        put_nan,
    )(adapter, kit)
    violations = check_adapter(adapter, kit.contract, kit.template)
    assert_reports(
        violations,
        {
            "rank_mismatch": "r=16",
            "tensor_shape_mismatch": "[16, 64]",
            "base_revision_mismatch": "base_revision='000000",
            "tokenizer_mismatch": "tokenizer_sha256='ffffff",
            "pickle_weights": "adapter_model.bin",
            "unexpected_file": "notes.txt",
            "non_finite_values": "NaN/Inf",
        },
    )
    # Wrong shapes repeat in every layer: one line per tensor kind, naming the layers.
    shapes = [v for v in violations if v.code == "tensor_shape_mismatch"]
    assert len(shapes) == 8  # 4 modules x (A, B)
    assert all(".layers.{0,1}." in (v.where or "") for v in shapes)
    assert check_adapter(adapter, kit.contract, kit.template) == violations  # deterministic


def test_check_writes_nothing_and_never_unpickles(kit: Any, adapter: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    before = _snapshot(adapter)
    violations = check_adapter(adapter, kit.contract, kit.template)
    assert codes(violations) == {"pickle_weights"}
    assert not marker.exists()
    assert _snapshot(adapter) == before


def test_size_limits(kit: Any, adapter: Path) -> None:
    size = (adapter / WEIGHTS).stat().st_size
    limits = Limits(max_file_bytes=size - 1, max_total_bytes=size)
    violations = check_adapter(adapter, kit.contract, kit.template, limits)
    assert codes(violations) == {"file_too_large"}
    wheres = {v.where: v.message for v in violations}
    assert f"{WEIGHTS} is {size} bytes, over the {size - 1}-byte" in wheres[WEIGHTS]
    assert "the adapter's files total" in wheres[None]


def test_bf16_adapter_is_accepted_and_its_nan_found(kit: Any, adapter: Path) -> None:
    tensors = {k: v.to(torch.bfloat16) for k, v in load_torch(adapter / WEIGHTS).items()}
    save_torch(tensors, adapter / WEIGHTS, metadata={"format": "pt"})
    assert check_adapter(adapter, kit.contract, kit.template) == []
    tensors[Q_A][0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    save_torch(tensors, adapter / WEIGHTS, metadata={"format": "pt"})
    assert_reports(
        check_adapter(adapter, kit.contract, kit.template),
        {"non_finite_values": f"{Q_A} contains 3 NaN/Inf"},
    )


def test_template_for_another_base_is_a_violation(kit: Any, adapter: Path) -> None:
    other = dataclasses.replace(kit.template, base_revision="r" * 64)
    assert isinstance(other, AdapterTemplate)
    violations = check_adapter(adapter, kit.contract, other)
    assert_reports(
        violations,
        {
            "template_base_mismatch": "base_revision='rrrr",
            "template_mismatch": f"expected {other.template_id!r}",
        },
    )


def test_template_fields_missing_from_config_use_peft_defaults(kit: Any, adapter: Path) -> None:
    cfg = json.loads((adapter / CONFIG).read_text())
    for key in ("use_rslora", "use_dora", "bias", "lora_bias"):
        del cfg[key]
    (adapter / CONFIG).write_text(json.dumps(cfg))
    assert check_adapter(adapter, kit.contract, kit.template) == []
    rslora = dataclasses.replace(kit.template, use_rslora=True)
    assert_reports(
        check_adapter(adapter, kit.contract, rslora),
        {"rslora_mismatch": "use_rslora=False", "template_mismatch": rslora.template_id},
    )


def test_missing_directory(kit: Any, tmp_path: Path) -> None:
    assert_reports(
        check_adapter(tmp_path / "nope", kit.contract, kit.template),
        {"missing_file": "does not exist"},
    )


def test_registry_stays_torch_free() -> None:
    code = "import sys, adapters_registry.compat; assert 'torch' not in sys.modules"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


class _Boom:
    """Unpickling this creates ``marker``: proof that nobody unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()
    }
