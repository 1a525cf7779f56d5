"""The adapter template an adapter folder's ``adapter_config.json`` describes.

For tools that hold an adapter folder but no registry row for it (merge, serving
parity): the template's shape keys (``template.SHAPE_KEYS``) are read from PEFT's
config, and the registry's own config check must find nothing against the result, so
a config accepted here is one the registry's compatibility check accepts too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters_registry._adapter_config import config_problems
from adapters_registry.compat import CONFIG_FILE
from adapters_registry.errors import TemplateError
from adapters_registry.template import SHAPE_KEYS, AdapterTemplate

__all__ = ["read_adapter_config", "template_from_adapter_config"]

_REQUIRED = ("r", "lora_alpha", "target_modules")


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``adapter_dir``; TemplateError if unreadable."""
    try:
        cfg = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    # RecursionError: how json rejects absurdly nested input.
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TemplateError(f"cannot read {CONFIG_FILE}: {exc}") from None
    if not isinstance(cfg, dict):
        raise TemplateError(f"{CONFIG_FILE} is not a JSON object")
    return cfg


def template_from_adapter_config(
    adapter_dir: Path, base_model_id: str, base_revision: str
) -> AdapterTemplate:
    """The template of the adapter in ``adapter_dir``, for the given base.

    TemplateError lists every problem: missing or malformed shape keys, or anything the
    registry's config check refuses (peft_type, bias, DoRA, modules_to_save, ...).
    """
    cfg = read_adapter_config(adapter_dir)
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise TemplateError(f"{CONFIG_FILE} has no {missing} field(s)")
    modules = cfg["target_modules"]
    # PEFT reads a string as a pattern; a bare module name is one module.
    modules = [modules] if isinstance(modules, str) and modules.isidentifier() else modules
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise TemplateError(f"{CONFIG_FILE} target_modules must be a list of module names")
    shape = {k: cfg[k] for k in SHAPE_KEYS if k in cfg} | {"target_modules": frozenset(modules)}
    template = AdapterTemplate(base_model_id=base_model_id, base_revision=base_revision, **shape)
    problems = config_problems(cfg, template)
    if problems:
        listed = "; ".join(f"[{code}] {message}" for code, _, message in problems)
        raise TemplateError(f"{CONFIG_FILE} {listed}")
    return template
