"""`lora-gateway adapter merge ...` and `lora-gateway adapter compose ...`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from adapters_registry import Registry, add_registry_options, parse_adapter_ref
from trainer.cli import CLI_ERRORS, report_error
from trainer.errors import UsageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("adapter", help="merge an adapter into its base, or compose adapters")
    cmds = a.add_subparsers(dest="adapter_cmd", required=True)

    m = cmds.add_parser("merge", help="export base + adapter merged as a standalone float32 checkpoint")
    m.add_argument("--adapter", type=Path, required=True, help="the adapter folder")
    m.add_argument("--base-dir", type=Path, required=True, help="the base model's directory")
    m.add_argument("--out", type=Path, required=True, help="new folder for the merged model")
    m.add_argument("--check-parity", action="store_true",
                   help="compare merged vs unmerged logits before writing; refuse on a mismatch")
    m.add_argument("--tolerance", type=float, default=None,
                   help="with --check-parity: max |logit difference| allowed (default 1e-4)")

    c = cmds.add_parser("compose", help="weighted composition of adapters of one template")
    add_registry_options(c)
    c.add_argument("--template", required=True, help="registered template id of every source")
    c.add_argument("--base-dir", type=Path, required=True, help="the base model's directory")
    c.add_argument("--source", action="append", required=True, metavar="DIR:WEIGHT",
                   help="a source adapter folder and its weight; repeat for each source")
    c.add_argument("--method", default="svd",
                   help="svd (exact weighted sum, truncated to the template's rank; default) or linear")
    c.add_argument("--out", type=Path, required=True, help="new folder for the composed adapter")
    c.add_argument("--publish", metavar="TENANT/NAME", help="register the result")
    c.add_argument("--alias", action="append", default=[], help="with --publish: aliases to move")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.adapter_cmd == "merge":
            return _merge(args)
        return _compose(args)
    except CLI_ERRORS as exc:
        return report_error(exc)


def _merge(args: argparse.Namespace) -> int:
    from trainer.merge import DEFAULT_TOLERANCE, merge_adapter

    if args.tolerance is not None and not args.check_parity:
        raise UsageError("--tolerance only applies with --check-parity")
    result = merge_adapter(args.adapter, args.base_dir, args.out, check_parity=args.check_parity,
                           tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance)
    print(json.dumps({"merged": str(result.out_dir),
                      "parity": result.parity.to_dict() if result.parity else None}, indent=2))
    return 0


def _compose(args: argparse.Namespace) -> int:
    from trainer.compose import compose_adapters, parse_source

    publish = parse_adapter_ref(args.publish, what="--publish") if args.publish else None
    if args.alias and publish is None:
        raise UsageError("--alias only applies with --publish")
    sources = [parse_source(s) for s in args.source]
    registry = Registry.open(args.db, args.artifacts, actor=args.actor,
                             s3_endpoint_url=args.s3_endpoint, s3_region=args.s3_region)
    try:
        template = registry.get_template(args.template)
        result = compose_adapters(args.base_dir, template, sources, args.method, args.out)
        print(json.dumps({"adapter": str(result.out_dir), "relative_error": result.relative_error,
                          "dataset_sha256": result.manifest.dataset_sha256}, indent=2))
        if publish is not None:
            v = registry.push(publish.tenant, publish.name, result.out_dir,
                              template_id=template.template_id, aliases=args.alias)
            print(f"published {v.ref} (lora_int_id={v.lora_int_id})")
    finally:
        registry.close()
    return 0
