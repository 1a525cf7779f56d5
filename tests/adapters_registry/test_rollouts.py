"""Progressive rollouts in the registry: steps advance on the fleet's evidence (the usage
ledger), a breach rolls back at once, one decision-maker at a time, every decision in
the audit trail, and bad requests refused (issue 27, items 2, 4, 5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from adapters_registry import UsageCounts, UsageRecord
from adapters_registry.errors import ConflictError, NotFoundError, ValidationError
from adapters_registry.rollouts import RolloutRules
from lora_gateway.cli import main

RULES = RolloutRules(min_requests=10, min_step_seconds=30, max_error_rate=0.1,
                     max_error_rate_increase=0.05)


@pytest.fixture
def reg(registry_env, trained_adapters):
    registry_env.registry.push("acme", "support-bot", trained_adapters["globex"])  # v2
    return registry_env.registry


def answered(reg, version: int, ok: int, errors: int = 0, writer: str = "replica-a",
             at: datetime | None = None) -> None:
    """What a replica's ledger writes: ``ok`` 200s and ``errors`` 5xx for one version."""
    minute = (at or datetime.now(UTC)).replace(second=0, microsecond=0)
    reg.record_usage(writer, [UsageRecord("acme", f"acme/support-bot@v{version}", minute,
                                          UsageCounts(requests_2xx=ok, requests_5xx=errors))])


def split(reg) -> dict[str, int]:
    (info,) = [a for a in reg.list_adapters(reg.get_tenant("acme")) if a.name == "support-bot"]
    return info.splits.get("prod", {f"v{info.aliases['prod']}": 100})


def test_a_good_candidate_goes_step_by_step_to_100_percent(reg) -> None:
    r = reg.rollouts.start("acme", "support-bot", "prod", 2, [5, 50, 100], RULES)
    assert (r.state, r.percent, r.stable) == ("running", 5, 1)
    assert split(reg) == {"v1": 95, "v2": 5}
    t0 = r.step_started_at
    assert reg.rollouts.decide("a", now=t0 + timedelta(seconds=60)) == [], "no evidence yet"
    answered(reg, 2, ok=6, writer="replica-a")
    answered(reg, 2, ok=6, writer="replica-b")  # the fleet's evidence: both replicas count
    answered(reg, 1, ok=50)
    assert reg.rollouts.decide("a", now=t0 + timedelta(seconds=10)) == [], "too soon"
    (r,) = reg.rollouts.decide("a", now=t0 + timedelta(seconds=31))
    assert (r.state, r.percent) == ("running", 50) and split(reg) == {"v1": 50, "v2": 50}
    assert r.evidence["candidate"]["answers"] == 12
    # each step judges its own window (from its start minute): the next needs its own sample
    answered(reg, 2, ok=10, at=datetime.now(UTC) + timedelta(minutes=1))
    (r,) = reg.rollouts.decide("a", now=datetime.now(UTC) + timedelta(minutes=2))
    assert r.percent == 100 and split(reg) == {"v2": 100}
    answered(reg, 2, ok=10, at=datetime.now(UTC) + timedelta(minutes=3))
    (r,) = reg.rollouts.decide("a", now=datetime.now(UTC) + timedelta(minutes=4))
    assert (r.state, r.percent) == ("promoted", 100)
    assert reg.resolve(reg.get_tenant("acme"), "support-bot").version == 2
    actions = [e.action for e in reg.audit_log(subject_prefix="acme/support-bot:prod", limit=50)]
    assert actions.count("rollout.step") == 2 and "rollout.start" in actions
    assert "rollout.promote" in actions
    assert reg.rollouts.get("acme", "support-bot", "prod").state == "promoted"


def test_a_breach_rolls_back_at_once_with_its_figures(reg) -> None:
    r = reg.rollouts.start("acme", "support-bot", "prod", 2, [10, 100], RULES)
    answered(reg, 2, ok=1, errors=2)  # 2 errors > 10 % of the 10-answer minimum: no waiting
    answered(reg, 1, ok=40)
    (r,) = reg.rollouts.decide("a", now=r.step_started_at + timedelta(seconds=1))
    assert r.state == "rolled_back" and "2 server errors in 3 answers" in r.reason
    assert split(reg) == {"v1": 100}
    (entry,) = [e for e in reg.audit_log(subject_prefix="acme/support-bot:prod", limit=10)
                if e.action == "rollout.rollback"]
    assert entry.details["evidence"]["candidate"]["requests_5xx"] == 2


def test_worse_than_stable_by_more_than_allowed_rolls_back(reg) -> None:
    r = reg.rollouts.start("acme", "support-bot", "prod", 2, [50, 100],
                           RolloutRules(min_requests=20, min_step_seconds=0, max_error_rate=0.2,
                                        max_error_rate_increase=0.02))
    answered(reg, 2, ok=18, errors=2)  # 10 %: under the ceiling, 10 points over stable
    answered(reg, 1, ok=20)
    (r,) = reg.rollouts.decide("a", now=r.step_started_at)
    assert r.state == "rolled_back" and "exceeds the stable version's" in r.reason


def test_one_decision_maker_at_a_time(reg) -> None:
    r = reg.rollouts.start("acme", "support-bot", "prod", 2, [5, 100], RULES)
    answered(reg, 2, ok=20)
    now = r.step_started_at + timedelta(seconds=31)
    assert reg.rollouts.decide("replica-b", lease_s=30, now=now - timedelta(seconds=20)) == []
    assert reg.rollouts.decide("replica-a", now=now) == [], "b holds the lease"
    (r,) = reg.rollouts.decide("replica-a", now=now + timedelta(seconds=11))  # b's lease expired
    assert r.percent == 100


def test_pause_resume_abort_and_restart_keep_state(reg, registry_env) -> None:
    r = reg.rollouts.start("acme", "support-bot", "prod", 2, [5, 100], RULES)
    assert reg.rollouts.pause("acme", "support-bot", "prod").state == "paused"
    answered(reg, 2, ok=0, errors=9)
    assert reg.rollouts.decide("a", now=r.step_started_at + timedelta(hours=1)) == []
    with pytest.raises(ConflictError, match="paused; cannot pause"):
        reg.rollouts.pause("acme", "support-bot", "prod")
    from adapters_registry import Registry
    again = Registry.open(registry_env.db_url, registry_env.artifacts)  # a restart
    assert again.rollouts.get("acme", "support-bot", "prod").state == "paused"
    assert again.rollouts.resume("acme", "support-bot", "prod").state == "running"
    r = again.rollouts.abort("acme", "support-bot", "prod")
    assert r.state == "aborted" and split(reg) == {"v1": 100}
    again.close()


def test_bad_rollouts_are_refused_with_every_reason(reg) -> None:
    with pytest.raises(ValidationError) as err:
        reg.rollouts.start("acme", "support-bot", "prod", 2, [50, 20, 90],
                           RolloutRules(min_requests=0, max_error_rate=2))
    text = str(err.value)
    assert "must rise" in text and "last step must be 100" in text
    assert "min_requests 0" in text and "max_error_rate 2" in text
    with pytest.raises(ValidationError, match="already"):
        reg.rollouts.start("acme", "support-bot", "prod", 1)
    with pytest.raises(NotFoundError, match="alias acme/support-bot:nope does not exist"):
        reg.rollouts.start("acme", "support-bot", "nope", 2)
    with pytest.raises(NotFoundError):
        reg.rollouts.start("acme", "support-bot", "prod", 7)
    with pytest.raises(NotFoundError):
        reg.rollouts.start("acme", "pirate", "prod", 1)  # globex's, not acme's
    reg.rollouts.start("acme", "support-bot", "prod", 2)
    with pytest.raises(ConflictError, match="already has a rollout of v2"):
        reg.rollouts.start("acme", "support-bot", "prod", 2)
    # moved by hand: the rollout stops as superseded at its next judgement
    reg.set_alias("acme", "support-bot", "prod", 1)
    (r,) = reg.rollouts.decide("a")
    assert r.state == "superseded"


def test_the_command_line_drives_a_rollout(reg, registry_env, capsys) -> None:
    common = ["--db", registry_env.db_url, "--artifacts", str(registry_env.artifacts)]
    assert main(["registry", "rollout", "start", "acme/support-bot", "prod", "2",
                 "--steps", "10,100", "--min-requests", "5", *common]) == 0
    assert main(["registry", "rollout", "status", "acme/support-bot", "prod", *common]) == 0
    out = capsys.readouterr().out
    assert '"state": "running"' in out and '"percent": 10' in out
    assert main(["registry", "rollout", "resume", "acme/support-bot", "prod", *common]) != 0
    err = capsys.readouterr().err
    assert "cannot resume" in err and "Traceback" not in err
    assert main(["registry", "rollout", "start", "acme/support-bot", "prod", "2",
                 "--steps", "10,x", *common]) != 0
    assert "Traceback" not in capsys.readouterr().err
    assert main(["registry", "rollout", "abort", "acme/support-bot", "prod", *common]) == 0


def test_a_version_whose_trainer_gates_failed_is_never_rolled_out(reg) -> None:
    from sqlalchemy.orm import Session

    from adapters_registry.db import AdapterVersionRow

    with Session(reg.db) as s, s.begin():
        row = s.query(AdapterVersionRow).filter_by(version=2).one()
        row.manifest = {**row.manifest, "metrics": {"evals": {"passed": False, "gates": [
            {"name": "golden_accuracy", "passed": False}, {"name": "val_perplexity", "passed": True}]}}}
    with pytest.raises(ValidationError, match=r"gates failed \(golden_accuracy\)"):
        reg.rollouts.start("acme", "support-bot", "prod", 2)
    with pytest.raises(NotFoundError):
        reg.rollouts.get("acme", "support-bot", "prod")  # nothing was started
