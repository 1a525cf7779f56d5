"""`lora-gateway train ...` and `lora-gateway base prepare ...`.

``--method sft`` (the default) trains on chat JSONL; ``--method dpo`` on preference
JSONL (prompt, chosen, rejected), optionally continuing a registered adapter version
(``--init-from TENANT/NAME@vN``) with the base as the DPO reference.

Exit codes of ``train``: 0 trained (and published, if asked); 2 bad input (config,
data, eval sets, template, tenant, missing QLoRA requirements, existing --out);
3 the registry refused the adapter (compatibility check); 4 an eval gate failed
(nothing published, no alias moved; the adapter is kept at ``<out>.failed``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from adapters_registry import (
    IncompatibleAdapterError,
    Registry,
    RegistryError,
    add_registry_options,
    parse_adapter_ref,
    parse_qualified_model,
    validate_name,
)
from trainer.errors import ConfigError, GateFailedError, TrainerError, UsageError

DEFAULT_CACHE = Path(".cache")
EXIT_BAD_INPUT, EXIT_INCOMPATIBLE, EXIT_GATE_FAILED = 2, 3, 4
# What a trainer command reports as one `error: …` line and an exit code, never a traceback.
CLI_ERRORS = (TrainerError, RegistryError, FileExistsError)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train a LoRA adapter from a registered template",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_registry_options(p)
    p.add_argument("--template", required=True, help="registered template id (fixes the shape)")
    p.add_argument("--base-dir", type=Path, required=True, help="the base model's directory")
    p.add_argument("--method", choices=("sft", "dpo"), default="sft",
                   help="sft: chat JSONL, assistant-only loss (default); dpo: preference JSONL, TRL's DPO")
    p.add_argument("--data", type=Path, required=True,
                   help="chat JSONL in OpenAI messages format (sft) or preference JSONL (dpo)")
    p.add_argument("--init-from", metavar="TENANT/NAME@vN",
                   help="with --method dpo: continue this registered adapter version's LoRA "
                        "(same template); the base stays the reference")
    p.add_argument("--out", type=Path, required=True, help="new folder for the adapter")
    p.add_argument("--config", type=Path, help="YAML file of run knobs (RunConfig fields)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run knob (after --config); repeatable")
    p.add_argument("--eval-golden", type=Path, metavar="FILE",
                   help="golden prompts with expected answers (JSONL): the target gate")
    p.add_argument("--eval-regression", type=Path, metavar="FILE",
                   help="prompts the adapter must not change much vs the base (JSONL)")
    p.add_argument("--publish", metavar="TENANT/NAME",
                   help="register the result if every gate passes")
    p.add_argument("--alias", action="append", default=[],
                   help="with --publish: alias to point at the new version; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (off anyway without a TTY)")

    w = sub.add_parser("worker", help="run fine-tuning jobs from the registry's queue",
                       description="Take fine-tuning jobs (OpenAI's /v1/fine_tuning/jobs, created "
                       "through the gateway) for one base and run them: validate the files, train "
                       "from the base's frozen template, gate, publish.")
    add_registry_options(w)
    w.add_argument("--base-dir", type=Path, required=True, help="the base model's directory")
    w.add_argument("--base", required=True, metavar="MODEL_ID",
                   help="the registered base model id (the jobs this worker takes)")
    w.add_argument("--name", help="this worker's name in job rows (default: host and process id)")
    w.add_argument("--lease-seconds", type=float, default=30.0,
                   help="a job whose worker stops renewing its lease this long fails (default 30)")
    w.add_argument("--poll-seconds", type=float, default=2.0, help="wait between looks for work")
    w.add_argument("--scratch", type=Path, help="where runs write (default: the temporary folder)")
    w.add_argument("--once", action="store_true", help="run what is queued now, then exit")

    b = sub.add_parser("base", help="build or convert a local base model")
    bc = b.add_subparsers(dest="base_cmd", required=True)
    prep = bc.add_parser("prepare", help="build tiny-llama or convert smollm2-135m-instruct")
    prep.add_argument("name")
    prep.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "models")


def run_base(args: argparse.Namespace) -> int:
    from trainer.bases import prepare_base

    try:
        base = prepare_base(args.name, args.cache)
    except CLI_ERRORS as exc:
        return report_error(exc)
    print(base.path)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    import os
    import socket

    from trainer.worker import WorkerOptions
    from trainer.worker import run_worker as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.lease_seconds <= 0 or args.poll_seconds <= 0:
        return report_error(UsageError("--lease-seconds and --poll-seconds must be above 0"))
    if not (args.base_dir / "config.json").is_file():
        return report_error(UsageError(f"--base-dir {args.base_dir}: no model folder there (no config.json)"))
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    registry: Registry | None = None
    try:
        # The schema is the migration's business (`registry migrate`, the chart's hook Job), as
        # for the gateway: a worker never migrates on start.
        registry = Registry.open(args.db, args.artifacts, actor=f"worker:{name}",
                                 s3_endpoint_url=args.s3_endpoint, s3_region=args.s3_region,
                                 db_lock_timeout_s=args.db_lock_timeout, migrate=False)
        registry.get_base(args.base)
        options = WorkerOptions(name, args.base_dir, args.base, lease_s=args.lease_seconds,
                                heartbeat_s=min(2.0, args.lease_seconds / 3), poll_s=args.poll_seconds,
                                scratch=args.scratch)
        return run(registry, options, once=args.once)
    except CLI_ERRORS as exc:
        return report_error(exc)
    finally:
        if registry is not None:
            registry.close()


def load_run_config(path: Path | None, overrides: list[str], method: str = "sft") -> Any:
    """RunConfig from the method's defaults, YAML and KEY=VALUE flags (flags win); unknown or
    shape keys are errors, and so are DPO knobs for SFT."""
    from trainer.config import RunConfig

    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of run knobs, got {type(loaded).__name__}")
        data.update(loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            data[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse {value!r}: {exc}") from None
    return RunConfig.for_method(method, data)


def run_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry: Registry | None = None
    try:
        registry = Registry.open(args.db, args.artifacts, actor=args.actor,
                                 s3_endpoint_url=args.s3_endpoint, s3_region=args.s3_region,
                                 db_lock_timeout_s=args.db_lock_timeout)
        return _train(args, registry)
    except CLI_ERRORS as exc:
        return report_error(exc)
    finally:
        if registry is not None:
            registry.close()


def report_error(exc: Exception) -> int:
    """Print one of CLI_ERRORS as ``error: …`` (a failed gate with its table); its exit code."""
    code = EXIT_BAD_INPUT
    if isinstance(exc, GateFailedError):
        if exc.report is not None:
            print(summary_table(exc.report), file=sys.stderr)
        code = EXIT_GATE_FAILED
    elif isinstance(exc, IncompatibleAdapterError):
        code = EXIT_INCOMPATIBLE
    print(f"error: {exc}", file=sys.stderr)
    return code


def _train(args: argparse.Namespace, registry: Registry) -> int:
    from trainer.data import load_chat_jsonl
    from trainer.evals import load_golden_jsonl, load_regression_jsonl
    from trainer.qlora import require_quantization_support
    from trainer.train import train_adapter

    config = load_run_config(args.config, args.set, args.method)
    require_quantization_support(config.quantization)
    if args.init_from and args.method != "dpo":
        raise UsageError("--init-from continues a registered adapter with preference tuning: "
                         "it needs --method dpo")
    # Everything that can be checked is checked before minutes of training are spent.
    tenant = name = None
    if args.publish:
        ref = parse_adapter_ref(args.publish, what="--publish")
        tenant, name = ref.tenant, ref.name
        registry.get_tenant(tenant)
        for alias in args.alias:
            validate_name("alias", alias)
    elif args.alias:
        raise UsageError("--alias needs --publish: only a published version can be aliased")
    if args.out.exists():
        raise FileExistsError(f"{args.out} already exists; adapter versions are never overwritten")
    template = registry.get_template(args.template)
    golden = load_golden_jsonl(args.eval_golden) if args.eval_golden else None
    regression = load_regression_jsonl(args.eval_regression) if args.eval_regression else None
    progress = sys.stderr.isatty() and not args.no_progress
    if args.method == "dpo":
        result = _train_dpo(args, registry, template, config, golden, regression, progress)
    else:
        dataset = load_chat_jsonl(args.data)
        result = train_adapter(args.base_dir, template.base_model_id, template, dataset, config, args.out,
                               golden=golden, regression=regression, progress=progress)
    print(summary_table(result.report))
    print(f"adapter: {result.out_dir}")
    if tenant and name:
        v = registry.push(tenant, name, result.out_dir, template_id=template.template_id, aliases=args.alias)
        moved = f"; aliases moved: {', '.join(args.alias)}" if args.alias else ""
        print(f"published {v.ref} (lora_int_id={v.lora_int_id}){moved}")
    return 0


def _train_dpo(args: argparse.Namespace, registry: Registry, template: Any, config: Any, golden: Any,
               regression: Any, progress: bool) -> Any:
    from trainer.dpo import train_dpo_adapter
    from trainer.preference import load_preference_jsonl
    from trainer.train import InitAdapter

    dataset = load_preference_jsonl(args.data)
    with tempfile.TemporaryDirectory(prefix="lgw-init-") as scratch:
        init = None
        if args.init_from:
            tenant, model = parse_qualified_model(args.init_from)
            version = registry.resolve(registry.get_tenant(tenant), str(model))
            if version.template_id != template.template_id:
                raise UsageError(f"--init-from {version.ref} is an adapter of template "
                                 f"{version.template_id}, not {template.template_id}: a stage "
                                 "continues an adapter of its own shape")
            registry.fetch(version, Path(scratch))  # every file verified against its sha256
            init = InitAdapter(Path(scratch), version.ref, version.content_sha256)
        return train_dpo_adapter(args.base_dir, template.base_model_id, template, dataset, config, args.out,
                                 init_from=init, golden=golden, regression=regression, progress=progress)


def summary_table(report: Any) -> str:
    """A short plain-text summary of a trainer.train.RunReport."""
    dpo = report.method == "dpo"  # its losses are DPO losses: a perplexity would mean nothing
    rows = [("epoch", "DPO loss" if dpo else "train loss", "val DPO loss" if dpo else "val loss",
             "" if dpo else "val ppl", "")]
    for e in report.epochs:
        rows.append((
            str(e.epoch), f"{e.train_loss:.4f}",
            "-" if e.val_loss is None else f"{e.val_loss:.4f}",
            "" if dpo else "-" if e.val_perplexity is None else f"{e.val_perplexity:.2f}",
            "<- kept" if e.epoch == report.best_epoch and len(report.epochs) > 1 else "",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
             for r in rows]
    if len(rows) > 13:  # long max_steps runs: first and last epochs are enough
        lines = [*lines[:6], f"{'...'.rjust(widths[0])}", *lines[-6:]]
    d = report.data
    lines.append(
        f"data:  {d.read} read, {d.exact_duplicates} exact + {d.near_duplicates} near duplicates, "
        f"{d.contaminated} contaminated dropped -> {d.train} train / {d.validation} validation; "
        f"truncated {report.truncated} ({report.truncation_rate:.1%})"
    )
    if report.preference is not None:
        p = report.preference
        lines.append(f"held-out preference: accuracy {p.accuracy:.1%}, mean reward margin {p.margin:.4f} "
                     f"({p.total} pairs)")
    if report.stopped_early:
        lines.append(f"early stop: after epoch {len(report.epochs)}, kept epoch {report.best_epoch}")
    for gate in report.gates or []:
        lines.append(f"gate:  {gate}")
    if not report.gates:
        lines.append("gates: none configured")
    lines.append(f"time:  training {report.train_seconds:.1f}s, evals {report.eval_seconds:.1f}s")
    return "\n".join(line.rstrip() for line in lines)
