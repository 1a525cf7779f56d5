"""`lora-gateway registry rollout ...`: start, watch and steer a candidate's rollout."""

from __future__ import annotations

import argparse
import json
import socket
from dataclasses import fields
from typing import Any

from adapters_registry.errors import ValidationError
from adapters_registry.names import parse_adapter_ref
from adapters_registry.rollouts import DEFAULT_STEPS, RolloutRules
from adapters_registry.service import Registry

_DEFAULTS = RolloutRules()


def add_rollout_commands(cmds: Any, common: argparse.ArgumentParser) -> None:
    p = cmds.add_parser("rollout", help="roll a candidate version out under an alias, step by "
                        "step, judged on every replica's answers (see docs/registry.md)")
    verbs = p.add_subparsers(dest="rollout_cmd", required=True)
    start = verbs.add_parser("start", parents=[common], help="start: the alias splits stable / "
                             "candidate at the first step")
    start.add_argument("ref", metavar="TENANT/NAME")
    start.add_argument("alias")
    start.add_argument("version", type=int, help="the candidate")
    start.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)),
                       help="the candidate's percentages, rising to 100 (default %(default)s)")
    for rule in fields(RolloutRules):
        default = getattr(_DEFAULTS, rule.name)
        start.add_argument(f"--{rule.name.replace('_', '-')}", type=type(default), default=default,
                           help=f"{RolloutRules.help(rule.name)} (default %(default)s)")
    start.set_defaults(run=_start)
    for verb, what in (("status", "the alias's active (else latest) rollout"),
                       ("pause", "hold the current step"), ("resume", "judge again"),
                       ("abort", "everyone back on the stable version")):
        q = verbs.add_parser(verb, parents=[common], help=what)
        q.add_argument("ref", metavar="TENANT/NAME")
        q.add_argument("alias")
        q.set_defaults(run=_verb)
    q = verbs.add_parser("decide", parents=[common], help="judge every running rollout once "
                         "(gateways do this themselves; for a cron job or a test)")
    q.add_argument("--holder", default=f"cli:{socket.gethostname()}",
                   help="who holds the decision lease (default %(default)s)")
    q.set_defaults(run=_decide)


def _start(r: Registry, a: argparse.Namespace) -> None:
    ref = parse_adapter_ref(a.ref)
    try:
        percents = [int(p) for p in a.steps.split(",")]
    except ValueError:
        raise ValidationError(f"--steps {a.steps!r}: whole percentages, comma-separated, e.g. "
                              "5,25,50,100") from None
    rules = RolloutRules(**{rule.name: getattr(a, rule.name) for rule in fields(RolloutRules)})
    _print(r.rollouts.start(ref.tenant, ref.name, a.alias, a.version, percents, rules).as_dict())


def _verb(r: Registry, a: argparse.Namespace) -> None:
    ref = parse_adapter_ref(a.ref)
    if a.rollout_cmd == "status":
        _print(r.rollouts.get(ref.tenant, ref.name, a.alias).as_dict())
        return
    _print(getattr(r.rollouts, a.rollout_cmd)(ref.tenant, ref.name, a.alias).as_dict())


def _decide(r: Registry, a: argparse.Namespace) -> None:
    _print([d.as_dict() for d in r.rollouts.decide(a.holder)])


def _print(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


__all__ = ["add_rollout_commands"]
