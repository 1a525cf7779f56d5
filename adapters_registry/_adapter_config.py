"""Check PEFT's adapter_config.json against an adapter template.

Returns plain ``(code, key, message)`` problems; ``compat`` turns them into Violations.
PEFT writes many bookkeeping keys (base path, task type, peft_version, ...); only the
keys that change which tensors exist or what they mean are checked.
"""

from __future__ import annotations

from typing import Any

from adapters_registry.contract import BaseContract
from adapters_registry.names import shown
from adapters_registry.template import AdapterTemplate

Problem = tuple[str, str, str]  # (violation code, config key, message)

# Keys that add weights or change which modules/layers carry them, with the code used
# when one is set. PEFT writes them as null or empty when unused.
MUST_BE_EMPTY = {
    "modules_to_save": "modules_to_save_not_allowed",
    "rank_pattern": "rank_pattern_not_allowed",
    "alpha_pattern": "alpha_pattern_not_allowed",
    "layers_to_transform": "layer_selection_not_allowed",
    "layers_pattern": "layer_selection_not_allowed",
    "layer_replication": "unsupported_option",
    "trainable_token_indices": "unsupported_option",
    "target_parameters": "unsupported_option",
}


def config_problems(cfg: dict[str, Any], template: AdapterTemplate) -> list[Problem]:
    """Every way ``cfg`` (a parsed adapter_config.json) departs from ``template``."""
    tid = template.template_id
    out: list[Problem] = []

    def add(code: str, key: str, message: str) -> None:
        out.append((code, key, message))

    if cfg.get("peft_type") != "LORA":
        add(
            "peft_type_not_lora",
            "peft_type",
            f"has peft_type={cfg.get('peft_type')!r}; only 'LORA' adapters are served",
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            add("adapter_config_invalid", key, f"has no {key!r} field")
    r = cfg.get("r", template.r)
    if not _is_int(r):
        add("adapter_config_invalid", "r", f"has r={r!r}, expected an integer")
    elif r != template.r:
        add("rank_mismatch", "r", f"has r={r}, but template {tid} requires r={template.r}")
    alpha = cfg.get("lora_alpha", template.lora_alpha)
    if not (_is_int(alpha) or isinstance(alpha, float)):
        add("adapter_config_invalid", "lora_alpha", f"has lora_alpha={alpha!r}, expected a number")
    elif alpha != template.lora_alpha:
        add(
            "alpha_mismatch",
            "lora_alpha",
            f"has lora_alpha={alpha}, but template {tid} requires lora_alpha={template.lora_alpha}",
        )
    modules = _target_modules_problem(cfg.get("target_modules", sorted(template.target_modules)), template)
    if modules:
        add(modules[0], "target_modules", modules[1])
    bias, lora_bias = cfg.get("bias", "none"), cfg.get("lora_bias")
    dora, rslora = cfg.get("use_dora", False), cfg.get("use_rslora", False)
    if bias != template.bias:
        add(
            "bias_not_none",
            "bias",
            f"has bias={bias!r}; vLLM serves no LoRA bias, so the template requires bias={template.bias!r}",
        )
    if lora_bias not in (None, False):
        add(
            "bias_not_none",
            "lora_bias",
            f"has lora_bias={lora_bias!r}; vLLM serves no LoRA bias, train with lora_bias=False",
        )
    if dora != template.use_dora:
        add(
            "dora_not_allowed",
            "use_dora",
            f"has use_dora={dora!r}; vLLM does not "
            f"serve DoRA adapters, train with use_dora={template.use_dora}",
        )
    if rslora != template.use_rslora:
        add(
            "rslora_mismatch",
            "use_rslora",
            f"has use_rslora={rslora!r}, but template {tid} requires use_rslora={template.use_rslora}",
        )
    for key, code in MUST_BE_EMPTY.items():
        value = cfg.get(key)
        # Not a truthiness test: layers_to_transform=0 means "layer 0 only".
        if value is not None and value not in ({}, [], ""):
            add(
                code,
                key,
                f"sets {key}={value!r}; it must be null or empty: template {tid} "
                f"gives every layer's {sorted(template.target_modules)} rank {template.r} "
                "and trains nothing else",
            )
    return out


def _target_modules_problem(value: Any, template: AdapterTemplate) -> tuple[str, str] | None:
    """(code, message) when target_modules does not name exactly the template's modules."""
    tid, wanted = template.template_id, sorted(template.target_modules)
    if isinstance(value, str):
        # PEFT treats a string as a regex over module paths; only a bare name is unambiguous.
        if not value.isidentifier():
            return "target_modules_mismatch", (
                f"has target_modules={value!r}, a pattern; template {tid} requires the explicit list {wanted}"
            )
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        return "adapter_config_invalid", (f"has target_modules={value!r}, expected a list of module names")
    found = set(value)
    if found == template.target_modules:
        return None
    extra = sorted(found - template.target_modules)
    missing = sorted(template.target_modules - found)
    return "target_modules_mismatch", (
        f"has target_modules={sorted(found)}, but template {tid} requires {wanted} "
        f"(extra: {extra}, missing: {missing})"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def base_problems(cfg: dict[str, Any], contract: BaseContract) -> list[Problem]:
    """The base the config itself names (``base_model_name_or_path``, ``revision``) against
    the served base's registered id, its aliases and its revision.

    An unset field makes no claim (the operator named the base); any other value must be
    one the registry knows, so a local path or another model's id is refused with a fix.
    """
    out: list[Problem] = []
    known = [contract.model_id, *contract.aliases]
    declared = cfg.get("base_model_name_or_path")
    if declared not in (None, "") and declared not in known:
        out.append((
            "base_model_mismatch", "base_model_name_or_path",
            f"has base_model_name_or_path={shown(declared)}, but the adapter is being registered "
            f"on base {contract.model_id!r} (known as {known}); if it was trained on that base, "
            f"set base_model_name_or_path to {contract.model_id!r}, else register it on its own base",
        ))
    revision = cfg.get("revision")
    if revision not in (None, "") and revision != contract.revision:
        out.append((
            "base_revision_mismatch", "revision",
            f"has revision={shown(revision)}, but base {contract.model_id} is registered at "
            f"revision {contract.revision[:12]}…; retrain on that revision, or set revision to null "
            "if the adapter was trained on it",
        ))
    return out
