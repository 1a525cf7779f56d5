"""`lora-gateway train ...` and `lora-gateway base prepare ...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from adapters_registry.cli import add_registry_options
from adapters_registry.errors import IncompatibleAdapterError, RegistryError
from adapters_registry.service import Registry

DEFAULT_CACHE = Path(".cache")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("train", help="train a LoRA adapter from a registered template")
    add_registry_options(p)
    p.add_argument("--template", required=True, help="registered template id (fixes the shape)")
    p.add_argument("--base-dir", type=Path, required=True, help="the base model's directory")
    p.add_argument("--data", type=Path, required=True, help="chat JSONL in OpenAI messages format")
    p.add_argument("--out", type=Path, required=True, help="new folder for the adapter")
    p.add_argument("--config", type=Path, help="YAML file of run knobs (RunConfig fields)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run knob; repeatable")
    p.add_argument("--publish", metavar="TENANT/NAME", help="register the result")
    p.add_argument("--alias", action="append", default=[], help="with --publish: aliases to move")

    b = sub.add_parser("base", help="build or convert a local base model")
    bc = b.add_subparsers(dest="base_cmd", required=True)
    prep = bc.add_parser("prepare", help="build tiny-llama or convert smollm2-135m-instruct")
    prep.add_argument("name")
    prep.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "models")


def run_base(args: argparse.Namespace) -> int:
    from trainer.bases import prepare_base

    base = prepare_base(args.name, args.cache)
    print(base.path)
    return 0


def load_run_config(path: Path | None, overrides: list[str]) -> Any:
    """RunConfig from YAML and KEY=VALUE flags; unknown or shape keys are errors."""
    from trainer.config import RunConfig

    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{path}: expected a mapping of run knobs")
        data.update(loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        data[key] = yaml.safe_load(value)
    return RunConfig.from_mapping(data)


def run_train(args: argparse.Namespace) -> int:
    from trainer.data import load_chat_jsonl
    from trainer.errors import TrainerError
    from trainer.train import train_adapter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = Registry.open(args.db, args.artifacts)
    try:
        config = load_run_config(args.config, args.set)
        template = registry.get_template(args.template)
        dataset = load_chat_jsonl(args.data)
        result = train_adapter(args.base_dir, template.base_model_id, template, dataset,
                               config, args.out)
        print(json.dumps({"adapter": str(result.out_dir), "final_loss": result.final_loss,
                          "train_seconds": round(result.seconds, 1)}, indent=2))
        if args.publish:
            tenant, _, name = args.publish.partition("/")
            v = registry.push(tenant, name, result.out_dir, template_id=template.template_id,
                              aliases=args.alias)
            print(f"published {v.ref} (lora_int_id={v.lora_int_id})")
    except (TrainerError, IncompatibleAdapterError, RegistryError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        registry.close()
    return 0
