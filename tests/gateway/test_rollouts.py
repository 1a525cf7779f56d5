"""A rollout through the gateway (fake engine): a good candidate takes the alias step by
step on the answers the replicas wrote to the ledger; a candidate whose requests fail is
rolled back at once, and callers are on the stable version again (issue 27)."""

from __future__ import annotations

from adapters_registry import RolloutRules
from tests.conftest import ANSWERS, train_tiny_adapter
from tests.gateway.conftest import Gateway

VERSION = "x-lora-gateway-adapter-version"
RULES = RolloutRules(min_requests=4, min_step_seconds=0, max_error_rate=0.1,
                     max_error_rate_increase=0.05, shadow_percent=0)


def send(gw: Gateway, n: int, tag: str) -> list[tuple[int, str]]:
    out = []
    for i in range(n):
        body = {"model": "support-bot", "user": f"{tag}-{i}",
                "messages": [{"role": "user", "content": "Hi"}]}
        r = gw.client.post("/v1/chat/completions", json=body, headers=gw.headers("acme"))
        out.append((r.status_code, r.headers.get(VERSION, "")))
    return out


def judge(gw: Gateway) -> list:
    """What the replica's driver does each round: its ledger written, then a decision."""
    app = gw.client.app
    assert gw.client.portal is not None
    gw.client.portal.call(app.state.ledger.flush)  # type: ignore[attr-defined]
    return gw.client.portal.call(app.state.rollouts.once)  # type: ignore[attr-defined]


def test_a_good_candidate_is_promoted_and_a_failing_one_rolled_back(
        registry_env, trained_adapters, gateway_factory, tiny_base, tiny_template, tmp_path) -> None:
    reg = registry_env.registry
    reg.push("acme", "support-bot", trained_adapters["globex"])  # v2: good
    gw = gateway_factory(rollout_decide_seconds=0)
    reg.rollouts.start("acme", "support-bot", "prod", 2, [50, 100], RULES)
    answers = send(gw, 16, "a")
    assert {v for _, v in answers} == {"acme/support-bot@v1", "acme/support-bot@v2"}
    (r,) = judge(gw)
    assert (r.state, r.percent) == ("running", 100)
    step = ('lgw_rollout_candidate_percent{adapter="support-bot",alias="prod",candidate="v2",'
            'state="running",tenant="acme"} 100.0')
    assert step in gw.metrics().text
    other = gateway_factory(rollout_decide_seconds=0, replica_name="replica-b")
    assert judge(other) == [], "the other replica does not hold the decision lease..."
    assert step in other.metrics().text, "...and shows the step all the same"
    assert {v for _, v in send(gw, 6, "b")} == {"acme/support-bot@v2"}
    (r,) = judge(gw)
    assert r.state == "promoted"
    assert "lgw_rollout_candidate_percent{" not in gw.metrics().text, "an ended rollout leaves the gauge"
    assert 'lgw_rollout_decisions_total{adapter="support-bot",alias="prod",state="promoted",' \
           'tenant="acme"} 1.0' in gw.metrics().text

    # v3 fails every request (the engine refuses it): rolled back at once
    third = train_tiny_adapter(tiny_base, tiny_template, ANSWERS["acme"], tmp_path / "v3",
                               tmp_path, seed=11)
    v3 = reg.push("acme", "support-bot", third)
    assert v3.version == 3
    gw.engine.reject.add(v3.lora_int_id)
    reg.rollouts.start("acme", "support-bot", "prod", 3, [50, 100], RULES)
    answers = send(gw, 12, "c")
    assert {s for s, v in answers if v.endswith("@v3")} == {503}
    (r,) = judge(gw)
    assert r.state == "rolled_back" and "server errors" in r.reason
    assert {v for _, v in send(gw, 4, "d")} == {"acme/support-bot@v2"}
    assert reg.rollouts.get("acme", "support-bot", "prod").state == "rolled_back"


ADMIN = "lgw-admin-" + "r" * 32


def test_the_admin_api_starts_steers_and_reports_a_rollout(
        registry_env, trained_adapters, gateway_factory) -> None:
    registry_env.registry.push("acme", "support-bot", trained_adapters["globex"])
    gw = gateway_factory(admin_api_key=ADMIN, rollout_decide_seconds=0)
    admin = {"Authorization": "Bearer " + ADMIN}
    url = "/admin/v1/tenants/acme/adapters/support-bot/aliases/prod/rollout"
    r = gw.client.post(url, json={"version": 2, "steps": [10, 100], "min_requests": 3},
                       headers=admin)
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["percent"]) == ("running", 10)
    r = gw.client.post(url, json={"version": 2}, headers=admin)
    assert r.status_code == 409 and "already has a rollout" in r.json()["error"]["message"]
    assert gw.client.post(url + "/pause", headers=admin).json()["state"] == "paused"
    assert gw.client.get(url, headers=admin).json()["state"] == "paused"
    r = gw.client.post(url + "/pause", headers=admin)
    assert r.status_code == 409
    assert gw.client.post(url + "/abort", headers=admin).json()["state"] == "aborted"
    r = gw.client.post(url, json={"version": 2, "steps": [60, 30]}, headers=admin)
    assert r.status_code == 400 and "must rise" in r.json()["error"]["message"]
    assert gw.client.post(url + "/explode", headers=admin).status_code in (400, 404)
