"""Progressive rollouts in the registry: steps advance on the fleet's evidence (the usage
ledger), a breach rolls back at once, one decision-maker at a time, every decision in
the audit trail, and bad requests refused (issue 27, items 2, 4, 5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from adapters_registry import UsageCounts, UsageRecord
from adapters_registry.answer_stats import AnswerStats, bucket, merged, percentile, without
from adapters_registry.errors import ConflictError, NotFoundError, ValidationError
from adapters_registry.rollouts import RolloutRules
from lora_gateway.cli import main

RULES = RolloutRules(min_requests=10, min_step_seconds=30, max_error_rate=0.1,
                     max_error_rate_increase=0.05, shadow_percent=0)


@pytest.fixture
def reg(registry_env, trained_adapters):
    registry_env.registry.push("acme", "support-bot", trained_adapters["globex"])  # v2
    return registry_env.registry


def answered(reg, version: int, ok: int, errors: int = 0, writer: str = "replica-a",
             at: datetime | None = None, ttft_ms: float = 20.0, tokens: int = 10,
             refusals: int = 0, shadows: tuple[tuple[bool, float, float], ...] = ()) -> None:
    """What a replica's ledger writes for one version: ``ok`` 200s of ``tokens`` tokens each,
    their first token after ``ttft_ms``, and ``errors`` 5xx; ``shadows``: comparisons."""
    minute = (at or datetime.now(UTC)).replace(second=0, microsecond=0)
    stats = AnswerStats()
    for i in range(ok):
        stats.answer(ttft_ms / 1000, (ttft_ms + 100) / 1000, i < refusals)
    for pair in shadows:
        stats.shadow(*pair)
    reg.record_usage(writer, [UsageRecord(
        "acme", f"acme/support-bot@v{version}", minute,
        UsageCounts(requests_2xx=ok, requests_5xx=errors, completion_tokens=ok * tokens),
        stats.as_json())])


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

    with Session(reg.db) as s, s.begin():  # as the trainer's manifest says it, in the intake record
        row = s.query(AdapterVersionRow).filter_by(version=2).one()
        shipped = row.manifest["manifest"]
        assert shipped is not None and "evals" in shipped["metrics"], "a trainer-made adapter's"
        row.manifest = {**row.manifest, "manifest": {**shipped, "metrics": {**shipped["metrics"], "evals": {
            "passed": False, "gates": [{"name": "golden_accuracy", "passed": False},
                                       {"name": "val_perplexity", "passed": True}]}}}}
    with pytest.raises(ValidationError, match=r"gates failed \(golden_accuracy\)"):
        reg.rollouts.start("acme", "support-bot", "prod", 2)
    with pytest.raises(NotFoundError):
        reg.rollouts.get("acme", "support-bot", "prod")  # nothing was started


FIGURES = RolloutRules(min_requests=10, min_step_seconds=0, shadow_percent=0)


@pytest.mark.parametrize(("candidate", "why"), [
    (dict(ttft_ms=200), "ttft p95 2"),  # 20 ms stable: ten times slower to start
    (dict(tokens=40), "40.0 tokens per answer against the stable version's 10.0"),
    (dict(tokens=3), "3.0 tokens per answer"),
    (dict(refusals=4), "refusal rate 0.4000 exceeds the stable version's 0.0000"),
])
def test_a_candidate_slower_wordier_terser_or_refusing_rolls_back(reg, candidate, why) -> None:
    r = reg.rollouts.start("acme", "support-bot", "prod", 2, [50, 100], FIGURES)
    answered(reg, 1, ok=10)
    answered(reg, 2, ok=10, **candidate)
    (r,) = reg.rollouts.decide("a", now=r.step_started_at)
    assert r.state == "rolled_back" and why in r.reason, r.reason
    assert r.evidence["candidate"]["answers"] == 10 and "stats" not in r.evidence["candidate"]


def test_small_latency_differences_and_a_like_candidate_pass(reg) -> None:
    r = reg.rollouts.start("acme", "support-bot", "prod", 2, [50, 100], FIGURES)
    answered(reg, 1, ok=10, ttft_ms=10)
    answered(reg, 2, ok=10, ttft_ms=40, tokens=15)  # 4x, but 30 ms: under the slack
    (r,) = reg.rollouts.decide("a", now=r.step_started_at)
    assert r.percent == 100, r.reason
    stable = r.evidence["stable"]
    assert stable["ttft_p50_ms"] == pytest.approx(10, rel=0.2) and stable["tokens_per_answer"] == 10
    assert r.evidence["reference"] == stable


def test_at_100_percent_the_candidate_is_compared_with_the_last_stable_figures(reg) -> None:
    r = reg.rollouts.start("acme", "support-bot", "prod", 2, [50, 100], FIGURES)
    answered(reg, 1, ok=10)
    answered(reg, 2, ok=10)
    (r,) = reg.rollouts.decide("a", now=r.step_started_at)
    assert r.percent == 100
    later = datetime.now(UTC) + timedelta(minutes=1)
    answered(reg, 2, ok=10, ttft_ms=400, at=later)  # nobody on stable now: its last figures count
    (r,) = reg.rollouts.decide("a", now=later + timedelta(minutes=1))
    assert r.state == "rolled_back" and "ttft p95" in r.reason and split(reg) == {"v1": 100}


def test_a_shadowing_step_waits_for_its_comparisons_and_a_diverging_candidate_goes_back(
        reg) -> None:
    rules = RolloutRules(min_requests=10, min_step_seconds=0, shadow_percent=20,
                         min_shadow_pairs=4, max_shadow_kl=0.5, min_shadow_agreement=0.25)
    r = reg.rollouts.start("acme", "support-bot", "prod", 2, [10, 50, 100], rules)
    resolution = reg.resolve_split(reg.get_tenant("acme"), "support-bot:prod")
    assert resolution.shadow is not None and resolution.shadow.percent == 20
    assert (resolution.shadow.stable.version, resolution.shadow.candidate.version) == (1, 2)
    answered(reg, 1, ok=30)
    answered(reg, 2, ok=10, shadows=((True, 1.0, 0.01),) * 3)
    assert reg.rollouts.decide("a", now=r.step_started_at) == [], "3 of 4 comparisons"
    assert reg.rollouts.get("acme", "support-bot", "prod").evidence["candidate"]["shadow_pairs"] == 3
    answered(reg, 2, ok=10, shadows=((False, 0.5, 0.2),) * 3, writer="replica-b")
    (r,) = reg.rollouts.decide("a", now=r.step_started_at)
    assert r.percent == 50, r.reason
    later = datetime.now(UTC) + timedelta(minutes=1)
    answered(reg, 1, ok=10, at=later)
    answered(reg, 2, ok=10, at=later, shadows=((True, 1.0, 2.5),) * 4)  # agree, far apart
    (r,) = reg.rollouts.decide("a", now=later + timedelta(minutes=1))
    assert r.state == "rolled_back" and "KL(stable || candidate) 2.500" in r.reason
    assert reg.resolve_split(reg.get_tenant("acme"), "support-bot:prod").shadow is None


def test_a_paused_rollout_or_a_hand_split_has_no_shadow(reg) -> None:
    reg.rollouts.start("acme", "support-bot", "prod", 2, [10, 100])
    acme = reg.get_tenant("acme")
    assert reg.resolve_split(acme, "support-bot:prod").shadow is not None  # 5 % by default
    seen = reg.generation()
    reg.rollouts.pause("acme", "support-bot", "prod")
    assert reg.resolve_split(acme, "support-bot:prod").shadow is None
    assert reg.generation() > seen, "every replica's cached resolution must change"
    seen = reg.generation()
    reg.rollouts.resume("acme", "support-bot", "prod")
    assert reg.resolve_split(acme, "support-bot:prod").shadow is not None
    assert reg.generation() > seen
    reg.rollouts.pause("acme", "support-bot", "prod")
    reg.rollouts.abort("acme", "support-bot", "prod")
    reg.set_split("acme", "support-bot", "prod", {1: 50, 2: 50})
    assert reg.resolve_split(acme, "support-bot:prod").shadow is None


def test_bad_figure_rules_are_refused_with_every_reason(reg) -> None:
    with pytest.raises(ValidationError) as err:
        reg.rollouts.start("acme", "support-bot", "prod", 2, [50, 100], RolloutRules(
            max_ttft_p95_ratio=0.5, shadow_percent=101, min_shadow_agreement=2, max_shadow_kl=-1))
    text = str(err.value)
    for part in ("max_ttft_p95_ratio 0.5 is outside 1..100 (0 turns it off)",
                 "shadow_percent 101", "min_shadow_agreement 2", "max_shadow_kl -1"):
        assert part in text


def test_answer_stats_histograms_merge_subtract_and_read_back() -> None:
    a, b = AnswerStats(), AnswerStats()
    for ms in range(1, 101):
        a.answer(ms / 1000, None, False)
    b.answer(5.0, 5.0, True)
    both = merged([a.as_json(), b.as_json(), None])
    assert sum(both["ttft"].values()) == 101 and both["refusals"] == 1
    assert percentile(both["ttft"], 0.5) == pytest.approx(50, rel=0.2)
    assert percentile(both["ttft"], 1.0) == pytest.approx(5000, rel=0.2)
    assert percentile({}, 0.5) is None
    assert without(both, b.as_json()) == merged([a.as_json()])
    assert int(bucket(0.0)) == 0 and int(bucket(1e9)) == 100


def test_the_decision_maker_prunes_old_answer_figures_but_never_the_bill(reg) -> None:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from adapters_registry.db import AnswerStatsRow

    now = datetime.now(UTC)
    answered(reg, 1, ok=3, at=now - timedelta(days=20))
    answered(reg, 1, ok=3, at=now)
    reg.rollouts.decide("a", now=now)
    with Session(reg.db) as s:
        kept = s.scalars(select(AnswerStatsRow.minute)).all()
    assert len(kept) == 1 and kept[0].replace(tzinfo=UTC) > now - timedelta(days=1)
    bill = reg.usage(now - timedelta(days=21), now + timedelta(minutes=1), tenant="acme")
    assert sum(r.counts.requests_2xx for r in bill) == 6
