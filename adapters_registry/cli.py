"""`lora-gateway registry ...`: bases, templates, tenants, keys, adapters, aliases.

Exit codes (one table, EXIT_CODES): 0 done; 2 invalid argument, unknown or conflicting
name; 3 adapter refused by the check (every violation listed); 4 the adapter path,
archive or upload cannot be read or staged; 5 artifact store failure (read-only, disk
full, S3 unreachable or denied, blobs corrupted or missing); 6 database failure
(read-only, locked, unreachable).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from adapters_registry.artifacts import REPAIR_COMMAND, VerifyReport
from adapters_registry.contract import derive_contract
from adapters_registry.database import current_revision, make_engine
from adapters_registry.errors import (
    ArtifactError,
    DatabaseError,
    IncompatibleAdapterError,
    RegistryError,
    SourceError,
    ValidationError,
)
from adapters_registry.limits import LIMITS
from adapters_registry.names import AdapterRef, parse_adapter_ref
from adapters_registry.options import add_database_option, add_registry_options
from adapters_registry.rollout_cli import add_rollout_commands
from adapters_registry.service import Registry
from adapters_registry.splits import split_from_labels
from adapters_registry.template import ATTENTION_MODULES, AdapterTemplate
from adapters_registry.usage import COUNTS

# Most specific first; anything else that is a RegistryError exits 2.
EXIT_CODES: tuple[tuple[type[RegistryError], int], ...] = (
    (IncompatibleAdapterError, 3),
    (SourceError, 4),
    (ArtifactError, 5),
    (DatabaseError, 6),
    (RegistryError, 2),
)


def _ref(a: argparse.Namespace) -> AdapterRef:
    return parse_adapter_ref(a.ref)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reg = sub.add_parser("registry", help="manage bases, templates, tenants, keys and adapters")
    cmds = reg.add_subparsers(dest="registry_cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_registry_options(common)

    p = cmds.add_parser("migrate", help="apply the database migrations, then exit (once per release, "
                        "before the gateways start)")
    add_database_option(p)

    p = cmds.add_parser("add-base", parents=[common], help="register a base model directory's contract")
    p.add_argument("model_id")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--license")
    p.add_argument("--alias", action="append", default=[], dest="base_aliases",
                   help="another id of the same weights, e.g. the hub id it was converted from")
    p.set_defaults(run=_add_base)

    p = cmds.add_parser("add-template", parents=[common],
                        help="register the frozen adapter template of a base")
    p.add_argument("model_id")
    p.add_argument("--revision", help="base revision (default: the latest registered)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--targets", default=",".join(ATTENTION_MODULES))
    p.set_defaults(run=_add_template)

    p = cmds.add_parser("add-tenant", parents=[common], help="create a tenant")
    p.add_argument("name")
    p.set_defaults(run=lambda r, a: print(r.create_tenant(a.name).name))

    p = cmds.add_parser("list-tenants", parents=[common], help="list tenants")
    p.set_defaults(run=lambda r, a: print("\n".join(t.name for t in r.list_tenants())))

    p = cmds.add_parser("set-limits", parents=[common],
                        help="set a tenant's quotas and fair-share weight (flags not given keep "
                        "their value; 'default' returns one to the gateway's default)")
    p.add_argument("tenant")
    for spec in LIMITS:
        shown_default = "" if spec.default is None else f" (the gateway's default: {spec.default:g})"
        p.add_argument(f"--{spec.flag}", type=_or_default(spec.kind), metavar="N|default",
                       help=spec.help + shown_default)
    p.set_defaults(run=_set_limits)

    p = cmds.add_parser("get-limits", parents=[common],
                        help="a tenant's quotas and weight (unset: the gateway's default)")
    p.add_argument("tenant")
    p.set_defaults(run=lambda r, a: print(json.dumps(asdict(r.get_limits(a.tenant)), indent=2)))

    p = cmds.add_parser("create-key", parents=[common],
                        help="create an API key for a tenant (shown once)")
    p.add_argument("tenant")
    p.add_argument("--expires-in-days", type=float, help="the key stops working after this")
    p.set_defaults(run=_create_key)

    p = cmds.add_parser("list-keys", parents=[common], help="a tenant's keys (prefixes only)")
    p.add_argument("tenant")
    p.set_defaults(run=_list_keys)

    p = cmds.add_parser("revoke-key", parents=[common], help="revoke a tenant's key by its prefix")
    p.add_argument("tenant")
    p.add_argument("prefix", help="the first 10+ characters of the key")
    p.set_defaults(run=lambda r, a: print(f"revoked {r.revoke_api_key(a.tenant, a.prefix)} key(s)"))

    p = cmds.add_parser("push", parents=[common], help="check and register a new adapter version")
    p.add_argument("ref", metavar="TENANT/NAME")
    p.add_argument("adapter", type=Path, metavar="PATH",
                   help="a PEFT adapter folder, or a .tar, .tar.gz or .zip of one")
    p.add_argument("--template", help="template id (default: the manifest's, else the base's only one)")
    p.add_argument("--base", help="base model id the adapter was trained on (checked against "
                   "adapter_config.json; picks the template when the base has one)")
    p.add_argument("--alias", action="append", default=[], help="aliases to point at it")
    p.set_defaults(run=_push)

    p = cmds.add_parser("verify", parents=[common],
                        help="re-hash every stored blob a live version uses; --repair fixes them")
    p.add_argument("--repair", type=Path, metavar="PATH",
                   help="a folder or archive holding the original files: bad blobs whose "
                   "content it has are rewritten")
    p.set_defaults(run=_verify)

    p = cmds.add_parser("set-alias", parents=[common],
                        help="point an alias at a version (rollback = point back)")
    p.add_argument("ref", metavar="TENANT/NAME")
    p.add_argument("alias")
    p.add_argument("version", type=int)
    p.set_defaults(run=lambda r, a: r.set_alias(*_ref_parts(a), a.alias, a.version))

    p = cmds.add_parser("split", parents=[common],
                        help="send an alias's callers to several versions (and the base) by "
                        "weight, each caller sticky to one (set-alias ends it)")
    p.add_argument("ref", metavar="TENANT/NAME")
    p.add_argument("alias")
    p.add_argument("weights", nargs="+", metavar="vN=WEIGHT",
                   help="e.g. v1=95 v2=5; base=W sends a share to the bare base")
    p.set_defaults(run=_split)

    add_rollout_commands(cmds, common)

    for verb in ("deprecate", "delete"):
        p = cmds.add_parser(verb, parents=[common],
                            help=f"{verb} a version (refused while an alias points at it)")
        p.add_argument("ref", metavar="TENANT/NAME")
        p.add_argument("version", type=int)
        p.set_defaults(run=_deprecate if verb == "deprecate" else _delete)

    p = cmds.add_parser("gc", parents=[common], help="delete blobs no version references")
    p.add_argument("--grace-minutes", type=float, default=60,
                   help="keep unreferenced blobs younger than this (pushes in flight)")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(run=_gc)

    p = cmds.add_parser("audit", parents=[common], help="who changed what, newest first")
    p.add_argument("--subject", help="only subjects starting with this, e.g. acme/bot")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(run=_audit)

    p = cmds.add_parser("usage", parents=[common], help="requests and tokens per tenant, model "
                        "and minute, from the usage ledger every gateway writes")
    p.add_argument("--from", dest="start", type=_moment, required=True,
                   help="first minute, ISO 8601 (e.g. 2026-12-07T00:00Z; no zone means UTC)")
    p.add_argument("--to", dest="end", type=_moment, required=True,
                   help="end (excluded), ISO 8601; at most 31 days after --from")
    p.add_argument("--tenant", help="one tenant only")
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.set_defaults(run=_usage)

    p = cmds.add_parser("jobs", parents=[common], help="the fine-tuning queue: every tenant's "
                        "unfinished jobs in the order workers take them, and the counts")
    p.add_argument("--tenant", help="one tenant only")
    p.add_argument("--limit", type=int, default=100, help="at most this many (1..1000)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=_jobs)

    p = cmds.add_parser("list", parents=[common], help="list a tenant's adapters")
    p.add_argument("tenant")
    p.set_defaults(run=_list)


def run(args: argparse.Namespace) -> int:
    if args.registry_cmd == "migrate":
        return _migrate(args.db)
    registry: Registry | None = None
    try:
        registry = Registry.open(args.db, args.artifacts, actor=args.actor,
                                 s3_endpoint_url=args.s3_endpoint, s3_region=args.s3_region,
                                 db_lock_timeout_s=args.db_lock_timeout)
        return int(args.run(registry, args) or 0)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    finally:
        if registry is not None:
            registry.close()


def exit_code(exc: RegistryError) -> int:
    return next(code for kind, code in EXIT_CODES if isinstance(exc, kind))


def _split(r: Registry, a: argparse.Namespace) -> None:
    labels: dict[str, object] = {}
    for item in a.weights:
        label, sep, weight = item.partition("=")
        if not sep:
            raise ValidationError(f"{item!r}: write each entry as vN=WEIGHT or base=WEIGHT")
        labels[label] = int(weight) if weight.strip().lstrip("-").isdigit() else weight
    r.set_split(*_ref_parts(a), a.alias, split_from_labels(labels))


def _ref_parts(a: argparse.Namespace) -> tuple[str, str]:
    ref = _ref(a)
    return ref.tenant, ref.name


def _migrate(db_url: str) -> int:
    # Only the database: a migration job needs no artifact store or its credentials.
    try:
        safe_url = make_url(db_url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        print("error: --db is not a SQLAlchemy database URL", file=sys.stderr)
        return 2
    try:
        engine = make_engine(db_url)
    except RegistryError as exc:  # a DatabaseError: the URL in it is already redacted
        print(f"error: could not migrate {safe_url}: {exc}", file=sys.stderr)
        return exit_code(exc)
    except SQLAlchemyError as exc:
        print(f"error: could not migrate {safe_url}: {type(exc).__name__}: {exc.__cause__ or exc}",
              file=sys.stderr)
        return 2
    try:
        print(f"{safe_url} is at revision {current_revision(engine)}")
    finally:
        engine.dispose()
    return 0


def _add_base(r: Registry, a: argparse.Namespace) -> None:
    contract = r.register_base(derive_contract(a.model_dir, a.model_id, license=a.license,
                                               aliases=a.base_aliases))
    print(json.dumps(contract.to_dict(), indent=2))


def _add_template(r: Registry, a: argparse.Namespace) -> None:
    base = r.get_base(a.model_id, a.revision)
    template = AdapterTemplate(base.model_id, base.revision, r=a.r, lora_alpha=a.alpha,
                               target_modules=frozenset(a.targets.split(",")))
    print(r.register_template(template).template_id)


def _create_key(r: Registry, a: argparse.Namespace) -> None:
    expires = None
    if a.expires_in_days is not None:
        expires = datetime.now(UTC) + timedelta(days=a.expires_in_days)
    print(r.create_api_key(a.tenant, expires_at=expires))


_DEFAULT = "default"


def _or_default(kind: type) -> Any:
    def parse(text: str) -> Any:
        if text == _DEFAULT:
            return _DEFAULT
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or '{_DEFAULT}', got {text!r}") from None
    return parse


def _set_limits(r: Registry, a: argparse.Namespace) -> None:
    given = {spec.name: getattr(a, spec.name) for spec in LIMITS}
    changes = {k: (None if v == _DEFAULT else v) for k, v in given.items() if v is not None}
    limits = r.set_limits(a.tenant, replace(r.get_limits(a.tenant), **changes))
    print(json.dumps(asdict(limits), indent=2))


def _list_keys(r: Registry, a: argparse.Namespace) -> None:
    for k in r.list_api_keys(a.tenant):
        state = "revoked" if k.revoked_at else (
            "expired" if k.expires_at and k.expires_at <= datetime.now(UTC) else "active")
        expiry = k.expires_at.isoformat() if k.expires_at else "never"
        print(f"{k.prefix}…\t{state}\tcreated {k.created_at.isoformat()}\texpires {expiry}")


def _push(r: Registry, a: argparse.Namespace) -> None:
    ref = _ref(a)
    v = r.push(ref.tenant, ref.name, a.adapter, template_id=a.template, base=a.base, aliases=a.alias)
    print(f"registered {v.ref} (lora_int_id={v.lora_int_id}, sha256={v.content_sha256[:12]})")


def _verify(r: Registry, a: argparse.Namespace) -> int:
    report: VerifyReport = r.verify_blobs(repair_from=a.repair)
    for p in report.problems:
        state = "repaired" if p.repaired else p.state
        print(f"{state}\t{p.digest}\tused by {', '.join(p.used_by)}")
    bad = report.unrepaired
    print(f"checked {report.checked} blob(s): {len(report.problems)} corrupted or missing, "
          f"{len(report.problems) - len(bad)} repaired")
    if bad:
        hint = ("the supplied files do not contain them" if a.repair else
                f"repair with: {REPAIR_COMMAND} (the adapter's folder or archive)")
        print(f"error: {len(bad)} blob(s) still corrupted or missing; {hint}", file=sys.stderr)
        return 5
    return 0


def _deprecate(r: Registry, a: argparse.Namespace) -> None:
    r.deprecate_version(*_ref_parts(a), a.version)


def _delete(r: Registry, a: argparse.Namespace) -> None:
    r.delete_version(*_ref_parts(a), a.version)


def _gc(r: Registry, a: argparse.Namespace) -> None:
    report = r.collect_garbage(grace=timedelta(minutes=a.grace_minutes), dry_run=a.dry_run)
    verb = "would delete" if report.dry_run else "deleted"
    print(f"{verb} {len(report.orphans)} unreferenced blob(s); kept {report.kept_young} younger "
          f"than the grace period; {report.referenced} referenced")


def _audit(r: Registry, a: argparse.Namespace) -> None:
    for e in r.audit_log(subject_prefix=a.subject, limit=a.limit):
        details = json.dumps(e.details, sort_keys=True) if e.details else ""
        print(f"{e.at.isoformat()}\t{e.actor}\t{e.action}\t{e.subject}\t{details}")


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time (e.g. 2026-12-07T00:00Z)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _usage(r: Registry, a: argparse.Namespace) -> None:
    rows = [record.as_dict() for record in r.usage(a.start, a.end, tenant=a.tenant)]
    if a.format == "json":
        print(json.dumps(rows, indent=2))
        return
    import csv

    columns = ["minute", "tenant", "model", *COUNTS]
    out = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
    out.writeheader()
    out.writerows(rows)


def _jobs(r: Registry, a: argparse.Namespace) -> None:
    jobs, depth = r.job_queue.pending(tenant=a.tenant, limit=a.limit), r.job_queue.depth()
    if a.format == "json":
        print(json.dumps({"depth": depth, "jobs": [
            {"id": j.id, "tenant": j.tenant, "status": j.status, "model": j.model,
             "method": j.method, "worker": j.worker, "trained_tokens": j.trained_tokens,
             "created_at": j.created_at.isoformat()} for j in jobs]}, indent=2))
        return
    print(", ".join(f"{status} {n}" for status, n in depth.items()))
    for j in jobs:
        print(f"{j.id}\t{j.tenant}\t{j.status}\t{j.method}\t{j.model}\t"
              f"{j.worker or '-'}\t{j.created_at.isoformat(timespec='seconds')}")


def _list(r: Registry, a: argparse.Namespace) -> None:
    for info in r.list_adapters(r.get_tenant(a.tenant)):
        aliases = ", ".join(f"{k}->v{v}" for k, v in sorted(info.aliases.items()))
        print(f"{info.name}\tversions={info.versions}\taliases: {aliases}\t{info.template_id}")
