"""The compatibility check: may this adapter directory be served on this base?

One pure function, :func:`check_adapter`, reads the adapter's files and returns every
:class:`Violation` it finds; like vLLM's ``PEFTHelper.validate_legal`` it does not stop
at the first. It never writes, never imports torch and never unpickles: pickle weights
are reported by name and left unread. An empty list is the only "compatible".
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adapters_registry._adapter_config import base_problems, config_problems
from adapters_registry._safetensors_header import Header, count_non_finite, read_header
from adapters_registry._tokenizer_files import TOKENIZER_FILES, check_tokenizer_files
from adapters_registry.contract import BaseContract
from adapters_registry.errors import ManifestError
from adapters_registry.manifest import MANIFEST_FILE, AdapterManifest
from adapters_registry.template import AdapterTemplate, expected_tensors
from adapters_registry.violations import Limits, Violation

__all__ = [
    "ALLOWED_EXTRA_FILES",
    "CONFIG_FILE",
    "REQUIRED_FILES",
    "TOKENIZER_FILES",
    "WEIGHTS_FILE",
    "Limits",
    "Violation",
    "check_adapter",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# What trainers outside ours ship beside an adapter: a saved tokenizer is checked against
# the base's (its hashes must match); the rest is bookkeeping and never read.
ALLOWED_EXTRA_FILES = frozenset(
    {MANIFEST_FILE, "README.md", "training_config.json", "golden_render.txt", "training_args.json"}
) | TOKENIZER_FILES
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def check_adapter(
    adapter_dir: Path,
    contract: BaseContract,
    template: AdapterTemplate,
    limits: Limits | None = None,
    *,
    refused: Iterable[Violation] = (),
) -> list[Violation]:
    """Every reason the adapter in ``adapter_dir`` cannot be served on ``contract``'s base
    with ``template``; ``[]`` means compatible.

    ``refused`` are the violations intake found for entries it did not stage (links,
    devices, oversized files): they are reported first, and a required file among them
    is not reported again as missing. Reads files only, and never raises for a bad
    adapter: each problem is a Violation. A manifest.json is optional (plain PEFT
    folders have none); when present, it is checked too.
    """
    adapter_dir = Path(adapter_dir)
    limits = limits or Limits()
    out = list(refused) + _check_template_base(contract, template)
    if not adapter_dir.is_dir():
        out.append(Violation("missing_file", f"adapter directory {adapter_dir} does not exist"))
        return out
    readable, layout = _check_files(adapter_dir, limits, {v.where for v in out if v.where})
    out += layout
    # A file that is missing, a symlink or too large was reported and is not read.
    if CONFIG_FILE in readable:
        out += _check_config(adapter_dir / CONFIG_FILE, contract, template)
    if WEIGHTS_FILE in readable:
        out += _check_weights(adapter_dir / WEIGHTS_FILE, contract, template, limits)
    if MANIFEST_FILE in readable:
        out += _check_manifest(adapter_dir, contract, template)
    out += check_tokenizer_files(adapter_dir, readable, contract)
    return out


def _check_template_base(contract: BaseContract, template: AdapterTemplate) -> list[Violation]:
    """The template itself must be the one for this base: a caller bug, but fail closed."""
    return [
        Violation(
            "template_base_mismatch",
            f"template {template.template_id} has {field}={ours!r}, but the served base has "
            f"{theirs!r}: use the template registered for this base",
            f"template.{field}",
        )
        for field, ours, theirs in (
            ("base_model_id", template.base_model_id, contract.model_id),
            ("base_revision", template.base_revision, contract.revision),
        )
        if ours != theirs
    ]


def _check_files(adapter_dir: Path, limits: Limits,
                 reported: set[str]) -> tuple[set[str], list[Violation]]:
    """Layout and size checks; returns the known files that are safe to read.

    ``reported``: names already explained by another violation (not reported missing).
    """
    out: list[Violation] = []
    readable: set[str] = set()
    total = 0
    try:
        entries = sorted(os.scandir(adapter_dir), key=lambda e: e.name)
    except OSError as exc:
        return set(), [Violation("unreadable_file", f"cannot list {adapter_dir}: {exc}")]
    allowed = ", ".join(sorted(ALLOWED_EXTRA_FILES))
    for entry in entries:
        name = entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            out.append(Violation("unreadable_file", f"cannot stat {name}: {exc}", name))
            reported.add(name)
            continue
        if stat.S_ISLNK(st.st_mode):
            # A link could point at another tenant's files, or at /dev/zero.
            out.append(
                Violation(
                    "symlink",
                    f"{name} is a symlink{_link_target(entry.path)}; copy the file in instead",
                    name,
                )
            )
            reported.add(name)
            continue
        if not stat.S_ISREG(st.st_mode):
            kind = "subdirectory" if stat.S_ISDIR(st.st_mode) else "special file"
            out.append(
                Violation(
                    "unexpected_file",
                    f"{kind} {name} is not allowed: an adapter is a flat directory of regular "
                    f"files ({', '.join(REQUIRED_FILES)}; optional: {allowed})",
                    name,
                )
            )
            reported.add(name)
            continue
        total += st.st_size
        if name.lower().endswith(_PICKLE_SUFFIXES):
            out.append(
                Violation(
                    "pickle_weights",
                    f"{name}: pickle weights are never loaded; save with safetensors "
                    "(PEFT save_pretrained(safe_serialization=True))",
                    name,
                )
            )
        elif name not in REQUIRED_FILES and name not in ALLOWED_EXTRA_FILES:
            out.append(
                Violation(
                    "unexpected_file",
                    f"unexpected file {name}; besides {', '.join(REQUIRED_FILES)} an adapter "
                    f"may contain only {allowed}",
                    name,
                )
            )
        elif st.st_size > limits.max_file_bytes:
            # Not read: the registration fails anyway, and reading is what costs.
            out.append(
                Violation(
                    "file_too_large",
                    f"{name} is {st.st_size} bytes, over the {limits.max_file_bytes}-byte per-file "
                    f"limit{limits.basis}",
                    name,
                )
            )
            reported.add(name)
        else:
            readable.add(name)
    if total > limits.max_total_bytes:
        out.append(
            Violation(
                "file_too_large",
                f"the adapter's files total {total} bytes, over the {limits.max_total_bytes}-byte "
                f"limit{limits.basis}",
            )
        )
    for name in REQUIRED_FILES:
        if name not in readable and name not in reported:
            hint = " (adapter weights must be in safetensors format)" if name == WEIGHTS_FILE else ""
            out.append(Violation("missing_file", f"required file {name} is missing{hint}", name))
    return readable, out


def _check_config(path: Path, contract: BaseContract, template: AdapterTemplate) -> list[Violation]:
    """adapter_config.json against the template's shape fields."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    # RecursionError: how json rejects absurdly nested input.
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return [Violation("adapter_config_invalid", f"{CONFIG_FILE} is not valid JSON: {exc}", CONFIG_FILE)]
    if not isinstance(cfg, dict):
        return [Violation("adapter_config_invalid", f"{CONFIG_FILE} is not a JSON object", CONFIG_FILE)]
    return [
        Violation(code, f"{CONFIG_FILE} {message}", f"{CONFIG_FILE}:{key}")
        for code, key, message in config_problems(cfg, template) + base_problems(cfg, contract)
    ]


def _check_weights(
    path: Path, contract: BaseContract, template: AdapterTemplate, limits: Limits
) -> list[Violation]:
    """Header structure; tensor names, shapes and dtypes; then NaN/Inf in the values."""
    try:
        header = read_header(path)
    except OSError as exc:
        return [Violation("unreadable_file", f"cannot read {WEIGHTS_FILE}: {exc}", WEIGHTS_FILE)]
    out = [
        Violation(
            "invalid_safetensors",
            f"{WEIGHTS_FILE} is not a valid safetensors file: {problem}",
            WEIGHTS_FILE,
        )
        for problem in header.problems
    ]
    if header.problems and not header.tensors:
        return out  # the header could not be read: its tensors cannot be compared
    expected = expected_tensors(contract, template)
    found = header.tensors
    modules = sorted(template.target_modules)
    for name, _, _ in _group((n, None) for n in expected if n not in found):
        out.append(
            Violation(
                "missing_tensor",
                f"tensor {name} is missing: template {template.template_id} puts LoRA A and B "
                f"on {modules} in all {contract.num_hidden_layers} layers",
                name,
            )
        )
    for name, _, _ in _group((n, None) for n in found if n not in expected):
        out.append(
            Violation(
                "unexpected_tensor",
                f"tensor {name} is not part of template {template.template_id} "
                f"(LoRA A and B on {modules} only)",
                name,
            )
        )
    wrong = (
        (n, (t.shape, expected[n])) for n, t in found.items() if n in expected and t.shape != expected[n]
    )
    for name, (shape, want), _ in _group(wrong):
        out.append(
            Violation(
                "tensor_shape_mismatch",
                f"tensor {name} has shape {list(shape)}, expected {list(want)} for base "
                f"{contract.model_id} ({_base_dims(contract)}) with r={template.r}",
                name,
            )
        )
    by_dtype: dict[str, list[str]] = defaultdict(list)
    for info in found.values():
        if info.dtype not in limits.allowed_dtypes:
            by_dtype[info.dtype].append(info.name)
    for dtype, names in sorted(by_dtype.items()):
        out.append(
            Violation(
                "dtype_not_allowed",
                f"{len(names)} tensor(s) in {WEIGHTS_FILE} are {dtype} (e.g. {names[0]}); "
                f"allowed dtypes: {', '.join(sorted(limits.allowed_dtypes))}",
                names[0],
            )
        )
    return out + _check_finite(path, header)


def _check_finite(path: Path, header: Header) -> list[Violation]:
    try:
        counts = count_non_finite(path, header, sorted(header.tensors))
    except OSError as exc:
        return [Violation("unreadable_file", f"cannot read {WEIGHTS_FILE}: {exc}", WEIGHTS_FILE)]
    return [
        Violation(
            "non_finite_values",
            f"tensor {name} contains {sum(counts[m] for m in members)} NaN/Inf value(s): "
            "training diverged; retrain (e.g. with a lower learning rate)",
            name,
        )
        for name, _, members in _group((n, None) for n in sorted(counts))
    ]


def _check_manifest(adapter_dir: Path, contract: BaseContract, template: AdapterTemplate) -> list[Violation]:
    """The trainer's provenance record against the base and template being served."""
    try:
        manifest = AdapterManifest.read(adapter_dir)
    except ManifestError as exc:
        return [Violation("manifest_invalid", str(exc), MANIFEST_FILE)]
    base = f"base {contract.model_id}'s"
    tpl = (
        f"template {template.template_id} (r={template.r}, lora_alpha={template.lora_alpha}, "
        f"target_modules={sorted(template.target_modules)})"
    )
    # field -> (code, the value the served base implies, why it matters)
    expected = {
        "base_model_id": ("base_model_mismatch", contract.model_id, "the base it is registered on"),
        "base_revision": ("base_revision_mismatch", contract.revision,
                          f"{base} served revision; retrain the adapter on it"),
        "template_id": ("template_mismatch", template.template_id, f"the id of {tpl}"),
        "tokenizer_sha256": ("tokenizer_mismatch", contract.tokenizer_sha256,
                             f"{base} tokenizer hash: it was trained with another tokenizer"),
        "chat_template_sha256": ("chat_template_mismatch", contract.chat_template_sha256,
                                 f"{base} chat template hash: it was trained on other prompts"),
    }  # fmt: skip
    return [
        Violation(
            code,
            f"{MANIFEST_FILE} has {field}={getattr(manifest, field)!r}, expected {want!r}, {why}",
            f"{MANIFEST_FILE}:{field}",
        )
        for field, (code, want, why) in expected.items()
        if getattr(manifest, field) != want
    ]


def _group(items: Iterable[tuple[str, Any]]) -> list[tuple[str, Any, list[str]]]:
    """Merge (tensor name, detail) pairs that differ only by layer index, so a problem
    repeated in every layer reads as one line: ``...layers.{0-31}.self_attn.q_proj...``.

    Returns (display name, detail, member names) in first-seen order.
    """
    groups: dict[tuple[str, str, Any], list[tuple[int | None, str]]] = {}
    for name, detail in items:
        m = _LAYER.search(name)
        prefix, suffix = (name[: m.start(1)], name[m.end(1) :]) if m else (name, "")
        layer = int(m.group(1)) if m else None
        groups.setdefault((prefix, suffix, detail), []).append((layer, name))
    result = []
    for (prefix, suffix, detail), members in groups.items():
        layers = [layer for layer, _ in members if layer is not None]
        display = prefix + _ranges(layers) + suffix if layers else prefix
        result.append((display, detail, [name for _, name in members]))
    return result


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '{0-2,5,7,8}'; a single number stays bare."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    text = ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)
    return text if len(runs) == 1 and len(runs[0]) == 1 else "{" + text + "}"


def _base_dims(contract: BaseContract) -> str:
    return (
        f"hidden_size={contract.hidden_size}, intermediate_size={contract.intermediate_size}, "
        f"{contract.num_attention_heads} heads and {contract.num_key_value_heads} KV heads "
        f"of head_dim {contract.head_dim}"
    )


def _link_target(path: str) -> str:
    try:
        return f" (to {os.readlink(path)})"
    except OSError:
        return ""
