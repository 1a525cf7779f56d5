"""Build the intake corpus: one valid plain PEFT adapter and every defect issue 12 names.

    python -m tests.adapters_registry.corpus BASE_DIR OUT_DIR

BASE_DIR is a Llama-like base folder (the tests use tiny-llama); adapters are PEFT's
own output for it with the template r=8, lora_alpha=16, q/k/v/o_proj, then broken one
way each. Nothing is trained: freshly initialised LoRA weights have exactly the names,
shapes and dtypes a trained adapter has, which is all the registry reads. None of the
folders carries our trainer's manifest.json: this is the "adapter from anywhere" path.

``CASES`` maps each case to the violation codes the registry must report; ``ARCHIVES``
the same for archives. A case whose codes are empty must be accepted.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASE_ID = "tiny-llama"
TEMPLATE = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
OVERSIZED_BYTES = int(2.3 * 1024**3)  # sparse: costs nothing on disk
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

# case -> violation codes (every one must be reported; [] = must be accepted)
CASES: dict[str, list[str]] = {
    "valid": [],
    "valid_with_tokenizer": [],
    "wrong_rank": ["rank_mismatch", "tensor_shape_mismatch"],
    "rank_pattern": ["rank_pattern_not_allowed", "tensor_shape_mismatch"],
    "extra_module": ["target_modules_mismatch", "unexpected_tensor"],
    "missing_module": ["target_modules_mismatch", "missing_tensor"],
    "dora": ["dora_not_allowed", "unexpected_tensor"],
    "modules_to_save": ["modules_to_save_not_allowed", "unexpected_tensor"],
    "bias": ["bias_not_none"],
    "wrong_base": ["base_model_mismatch"],
    "wrong_revision": ["base_revision_mismatch"],
    "smaller_hidden": ["tensor_shape_mismatch"],
    "larger_hidden": ["tensor_shape_mismatch"],
    "transposed": ["tensor_shape_mismatch"],
    "nan": ["non_finite_values"],
    "inf": ["non_finite_values"],
    "fp64": ["dtype_not_allowed"],
    "extra_tensor": ["unexpected_tensor"],
    "missing_tensor": ["missing_tensor"],
    "oversized": ["file_too_large"],
    "pickle": ["pickle_weights", "missing_file"],
    "both_formats": ["pickle_weights"],
    "corrupt_safetensors": ["invalid_safetensors"],
    "header_bomb": ["invalid_safetensors"],
    "no_config": ["missing_file"],
    "bad_config": ["adapter_config_invalid"],
    "not_lora": ["peft_type_not_lora"],
    "symlink": ["symlink"],
    "fifo": ["unexpected_file"],
    "other_tokenizer": ["tokenizer_mismatch"],
    "other_chat_template": ["chat_template_mismatch"],
}
ARCHIVES: dict[str, list[str]] = {
    "valid.tar.gz": [],
    "valid.zip": [],
    "valid_in_folder.tar": [],
    "traversal.tar.gz": ["archive_unsafe_member"],
    "absolute.tar": ["archive_unsafe_member"],
    "link.tar.gz": ["archive_unsafe_member"],
    "device.tar": ["archive_unsafe_member"],
    "bomb.zip": ["file_too_large"],
    "huge_member.tar": ["file_too_large"],
    "nested.zip": ["unexpected_file"],
    "truncated.tar.gz": ["archive_invalid"],
}


def build(base_dir: Path, out: Path) -> Path:
    """Write every case into ``out`` (a new folder); returns it."""
    import torch  # noqa: F401  (heavy: only the builder needs it)

    out.mkdir(parents=True)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    valid = _save_peft(base_cfg, out / "valid")
    for case in CASES:
        if case != "valid":
            _BUILDERS[case](base_cfg, base_dir, valid, out / case)
    _build_archives(valid, out)
    return out


# --- builders -------------------------------------------------------------------------


def _save_peft(base_cfg: dict[str, Any], dest: Path, hidden: int | None = None, **lora: Any) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in base_cfg.items() if k not in ("architectures", "transformers_version")}
    if hidden is not None:
        cfg |= {"hidden_size": hidden, "head_dim": hidden // cfg["num_attention_heads"],
                "intermediate_size": 2 * hidden}
    safe = lora.pop("safe", True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    peft_model = get_peft_model(model, LoraConfig(**(TEMPLATE | lora), task_type="CAUSAL_LM"))
    peft_model.save_pretrained(dest, safe_serialization=safe)
    (dest / "README.md").unlink(missing_ok=True)
    # Named after saving: PEFT would look the name up on the hub while saving.
    config = json.loads((dest / CONFIG).read_text())
    (dest / CONFIG).write_text(json.dumps(config | {"base_model_name_or_path": BASE_ID}, indent=2))
    return dest


def _copy(valid: Path, dest: Path) -> Path:
    return Path(shutil.copytree(valid, dest, symlinks=True))


def _peft(**lora: Any) -> Callable[..., None]:
    def build(cfg: dict[str, Any], base: Path, valid: Path, dest: Path) -> None:
        _save_peft(cfg, dest, **lora)

    return build


def _hidden(factor: float) -> Callable[..., None]:
    def build(cfg: dict[str, Any], base: Path, valid: Path, dest: Path) -> None:
        _save_peft(cfg, dest, hidden=int(cfg["hidden_size"] * factor))

    return build


def _config(**changes: Any) -> Callable[..., None]:
    def build(cfg: dict[str, Any], base: Path, valid: Path, dest: Path) -> None:
        _copy(valid, dest)
        data = json.loads((dest / CONFIG).read_text())
        (dest / CONFIG).write_text(json.dumps(data | changes))

    return build


def _tensors(edit: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
    def build(cfg: dict[str, Any], base: Path, valid: Path, dest: Path) -> None:
        from safetensors.numpy import load_file, save_file

        _copy(valid, dest)
        tensors = load_file(dest / WEIGHTS)
        edit(tensors)
        save_file(tensors, dest / WEIGHTS, metadata={"format": "pt"})

    return build


def _set(tensors: dict[str, Any], value: float) -> None:
    tensors[Q_A][0, 0] = value


def _files(edit: Callable[[Path, Path, Path], None]) -> Callable[..., None]:
    def build(cfg: dict[str, Any], base: Path, valid: Path, dest: Path) -> None:
        _copy(valid, dest)
        edit(dest, base, valid)

    return build


def _oversized(dest: Path, base: Path, valid: Path) -> None:
    with (dest / WEIGHTS).open("r+b") as f:
        f.truncate(OVERSIZED_BYTES)


def _pickle(cfg: dict[str, Any], base: Path, valid: Path, dest: Path) -> None:
    _save_peft(cfg, dest, safe=False)


def _both(dest: Path, base: Path, valid: Path) -> None:
    (dest / "adapter_model.bin").write_bytes(b"\x80\x04K\x00.")  # pickle of 0; never loaded


def _truncate(dest: Path, base: Path, valid: Path) -> None:
    os.truncate(dest / WEIGHTS, (dest / WEIGHTS).stat().st_size // 2)


def _header_bomb(dest: Path, base: Path, valid: Path) -> None:
    (dest / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + b"{")  # claims a 1 TiB header


def _symlink(dest: Path, base: Path, valid: Path) -> None:
    (dest / WEIGHTS).unlink()
    (dest / WEIGHTS).symlink_to((valid / WEIGHTS).resolve())


def _fifo(dest: Path, base: Path, valid: Path) -> None:
    os.mkfifo(dest / "training_args.json")


def _tokenizer(chat_template: str | None = None,
               vocab_edit: bool = False) -> Callable[[Path, Path, Path], None]:
    def edit(dest: Path, base: Path, valid: Path) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (base / name).is_file():
                shutil.copy(base / name, dest / name)
        if vocab_edit:
            tok = json.loads((dest / "tokenizer.json").read_text())
            tok["added_tokens"] = [*tok.get("added_tokens", []), {
                "id": 99999, "content": "<extra>", "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True}]
            (dest / "tokenizer.json").write_text(json.dumps(tok))
        if chat_template is not None:
            (dest / "chat_template.jinja").write_text(chat_template)

    return edit


_BUILDERS: dict[str, Callable[..., None]] = {
    "valid_with_tokenizer": _files(_tokenizer()),
    "wrong_rank": _peft(r=16),
    "rank_pattern": _peft(rank_pattern={"q_proj": 4}),
    "extra_module": _peft(target_modules=[*TEMPLATE["target_modules"], "gate_proj"]),
    "missing_module": _peft(target_modules=["q_proj", "v_proj"]),
    "dora": _peft(use_dora=True),
    "modules_to_save": _peft(modules_to_save=["lm_head"]),
    "bias": _peft(bias="lora_only"),
    "wrong_base": _config(base_model_name_or_path="meta-llama/Llama-3.2-1B"),
    "wrong_revision": _config(revision="0123456789abcdef0123456789abcdef01234567"),
    "smaller_hidden": _hidden(0.5),
    "larger_hidden": _hidden(2),
    "transposed": _tensors(lambda t: t.update({k: v.T.copy() for k, v in t.items() if "lora_A" in k})),
    "nan": _tensors(lambda t: _set(t, float("nan"))),
    "inf": _tensors(lambda t: _set(t, float("inf"))),
    "fp64": _tensors(lambda t: t.update({k: v.astype("float64") for k, v in t.items()})),
    "extra_tensor": _tensors(lambda t: t.update({"base_model.model.lm_head.lora_A.weight": t[Q_A].copy()})),
    "missing_tensor": _tensors(lambda t: t.pop(Q_A)),
    "oversized": _files(_oversized),
    "pickle": _pickle,
    "both_formats": _files(_both),
    "corrupt_safetensors": _files(_truncate),
    "header_bomb": _files(_header_bomb),
    "no_config": _files(lambda d, b, v: (d / CONFIG).unlink()),
    "bad_config": _files(lambda d, b, v: (d / CONFIG).write_text("{not json")),
    "not_lora": _config(peft_type="IA3"),
    "symlink": _files(_symlink),
    "fifo": _files(_fifo),
    "other_tokenizer": _files(_tokenizer(vocab_edit=True)),
    "other_chat_template": _files(_tokenizer(chat_template="{{ messages }}")),
}


# --- archives -------------------------------------------------------------------------


def _build_archives(valid: Path, out: Path) -> None:
    files = sorted(valid.iterdir())
    with tarfile.open(out / "valid.tar.gz", "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    with zipfile.ZipFile(out / "valid.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f.name)
    with tarfile.open(out / "valid_in_folder.tar", "w") as tar:
        tar.add(valid, arcname="my-adapter")
    with tarfile.open(out / "traversal.tar.gz", "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
        _add_bytes(tar, "../../escaped.txt", b"outside")
    with tarfile.open(out / "absolute.tar", "w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
        _add_bytes(tar, "/tmp/lgw-absolute.txt", b"outside")
    with tarfile.open(out / "link.tar.gz", "w:gz") as tar:
        for f in files:
            if f.name != CONFIG:
                tar.add(f, arcname=f.name)
        link = tarfile.TarInfo(CONFIG)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with tarfile.open(out / "device.tar", "w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
        dev = tarfile.TarInfo("zero")
        dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 5
        tar.addfile(dev)
    _zip_bomb(out / "bomb.zip", files)
    with tarfile.open(out / "huge_member.tar", "w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
        huge = tarfile.TarInfo("training_args.json")
        huge.size = OVERSIZED_BYTES  # the header alone: the data is never read
        tar.fileobj.write(huge.tobuf(tar.format, tar.encoding, tar.errors))  # type: ignore[union-attr]
    with zipfile.ZipFile(out / "nested.zip", "w") as zf:
        for f in files:
            zf.write(f, f.name)
        zf.writestr("checkpoints/step-10/notes.txt", "x")
    raw = (out / "valid.tar.gz").read_bytes()
    (out / "truncated.tar.gz").write_bytes(raw[: len(raw) // 2])


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _zip_bomb(path: Path, files: list[Path]) -> None:
    """A zip whose extra member declares 2.3 GiB: real bombs say so in their headers
    (zipfile itself refuses a member that inflates past its declared size)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f.name)
        zf.writestr("training_args.json", b"\0" * 1024)
    raw = bytearray(path.read_bytes())
    # (signature, offset of the name length, of the name, of the uncompressed size)
    for sig, name_len_at, name_at, size_at in ((b"PK\x03\x04", 26, 30, 22), (b"PK\x01\x02", 28, 46, 24)):
        at = raw.find(sig)
        while at != -1:
            name_len = struct.unpack_from("<H", raw, at + name_len_at)[0]
            if raw[at + name_at: at + name_at + name_len] == b"training_args.json":
                raw[at + size_at: at + size_at + 4] = struct.pack("<I", OVERSIZED_BYTES)
            at = raw.find(sig, at + 4)
    path.write_bytes(bytes(raw))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
