"""The usage ledger (issue 28, item 3): what every replica served, per tenant, model and
minute, in the registry database, equal to the sum of the answers' own ``usage``."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from adapters_registry import Registry, UsageCounts, UsageRecord
from adapters_registry.errors import DatabaseError
from adapters_registry.records import Tenant
from gateway.api.request import RequestEdge, RequestScope
from gateway.observability.ledger import UsageLedger
from gateway.observability.metrics import GatewayMetrics
from lora_gateway.cli import main

ADMIN = "u" * 40
BOT, PIRATE, BASE = "acme/support-bot@v1", "globex/pirate@v1", "tiny-llama"


def _usage_of(r) -> dict[str, int]:
    """The answer's own usage: the body's, or a stream's final usage chunk."""
    if r.headers["content-type"].startswith("text/event-stream"):
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        return next(c["usage"] for c in reversed(chunks) if c.get("usage"))
    return r.json()["usage"]


class Tally:
    """What the clients saw, per (tenant, model): the ledger must say the same."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], Counter[str]] = {}

    def add(self, tenant: str, model: str, r) -> None:
        c = self.seen.setdefault((tenant, model), Counter())
        if r.status_code == 200:
            usage = _usage_of(r)
            c["requests_2xx"] += 1
            c["prompt_tokens"] += usage["prompt_tokens"]
            c["completion_tokens"] += usage["completion_tokens"]
        else:
            c[f"requests_{r.status_code // 100}xx"] += 1


def mixed_run(gw, tally: Tally) -> None:
    """Chat and completions, streamed (with usage) and not, n=2, three models, a refusal."""
    stream_usage = {"stream": True, "stream_options": {"include_usage": True}}
    for tenant, model, shown in (("acme", "support-bot", BOT), ("globex", "pirate", PIRATE),
                                 ("acme", BASE, BASE)):
        for extra in ({}, stream_usage, {"n": 2}, {**stream_usage, "n": 2}):
            chat = {"model": model, "messages": [{"role": "user", "content": "Who are you?"}], **extra}
            tally.add(tenant, shown, gw.client.post("/v1/chat/completions", json=chat,
                                                    headers=gw.headers(tenant)))
            text = {"model": model, "prompt": ["Hello", "Hi there"], "max_tokens": 3, **extra}
            tally.add(tenant, shown, gw.client.post("/v1/completions", json=text,
                                                    headers=gw.headers(tenant)))
    # Refused before its model was resolved: the ledger's "-" (never the text the tenant sent).
    refused = {"model": "support-bot", "messages": [{"role": "user", "content": "x"}], "temperature": 2.5}
    tally.add("acme", "-", gw.client.post("/v1/chat/completions", json=refused, headers=gw.headers("acme")))
    missing = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
    tally.add("acme", "-", gw.client.post("/v1/chat/completions", json=missing, headers=gw.headers("acme")))


def ledger_totals(gw, start: datetime) -> dict[tuple[str, str], Counter[str]]:
    r = gw.client.get("/admin/v1/usage", headers={"Authorization": f"Bearer {ADMIN}"},
                      params={"from": start.isoformat(), "to": (start + timedelta(hours=1)).isoformat()})
    assert r.status_code == 200, r.text
    out: dict[tuple[str, str], Counter[str]] = {}
    for row in r.json()["data"]:
        c = out.setdefault((row["tenant"], row["model"]), Counter())
        c.update({k: v for k, v in row.items() if k not in ("tenant", "model", "minute") and v})
    return out


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_the_ledger_is_the_sum_of_the_answers_usage_across_replicas_and_a_restart(
        gateway_factory, db_url) -> None:
    start = datetime.now(UTC).replace(second=0, microsecond=0)
    settings = {"admin_api_key": ADMIN, "usage_flush_seconds": 0.2}
    a = gateway_factory(replica_name="a", **settings)
    b = gateway_factory(replica_name="b", **settings)
    tally = Tally()
    mixed_run(a, tally)
    mixed_run(b, tally)
    a.client.__exit__(None, None, None)  # replica a stops (its last flush) ...
    a = gateway_factory(replica_name="a", **settings)  # ... and starts again: a new writer
    mixed_run(a, tally)
    time.sleep(0.6)  # three flush periods of the replicas still running
    assert tally.seen[("acme", "-")]["requests_4xx"] == 6
    assert ledger_totals(b, start) == tally.seen
    with a.env.registry.db.connect() as conn:  # type: ignore[attr-defined]
        writers = {w for (w,) in conn.exec_driver_sql("SELECT DISTINCT writer FROM usage_minutes")}
    assert len(writers) == 3 and {w.split(":")[0] for w in writers} == {"a", "b"}


def test_a_retried_flush_counts_nothing_twice_and_a_failed_one_loses_nothing(
        registry_env, tmp_path) -> None:
    registry: Registry = registry_env.registry

    class Flaky:
        """Commits, then raises (as a connection lost after COMMIT looks), then refuses."""

        def __init__(self) -> None:
            self.calls = 0

        def record_usage(self, writer: str, records: list[UsageRecord]) -> None:
            self.calls += 1
            if self.calls == 2:
                raise DatabaseError("database x: it is unreachable (refused)")
            registry.record_usage(writer, records)
            if self.calls == 1:
                raise DatabaseError("database x: it is unreachable (connection lost after COMMIT)")

    async def main() -> None:
        ledger = UsageLedger("r", flush_s=3600)
        ledger.start(Flaky())
        for _ in range(3):
            ledger.record("acme", BOT, "200", prompt_tokens=5, completion_tokens=7)
        assert await ledger.flush() is False  # written, but its caller saw an error
        ledger.record("acme", BOT, "aborted", prompt_tokens=5, completion_tokens=2)
        assert await ledger.flush() is False  # refused: kept
        assert ledger.pending() == 1
        await ledger.stop()  # the final flush writes the whole totals again
        assert ledger.pending() == 0

    asyncio.run(main())
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=2)
    (row,) = registry.usage(start, start + timedelta(minutes=5))
    assert (row.tenant, row.model) == ("acme", BOT)
    assert row.counts == UsageCounts(requests_2xx=3, aborted=1, prompt_tokens=20, completion_tokens=23)


def test_a_database_that_refuses_for_days_costs_bounded_memory(monkeypatch, caplog) -> None:
    from gateway.observability import ledger as module

    monkeypatch.setattr(module, "MAX_PENDING_ROWS", 3)

    class Refusing:
        def record_usage(self, writer: str, records: list[UsageRecord]) -> None:
            raise DatabaseError("database x: it is read-only for this user")

    async def main() -> None:
        ledger = UsageLedger("r")
        ledger._sink = Refusing()
        for model in ("m1", "m2", "m3", "m4", "m5"):
            ledger.record("acme", model, "200", prompt_tokens=2, completion_tokens=3)
        assert await ledger.flush() is False
        assert sorted(k[1] for k in ledger._totals) == ["m3", "m4", "m5"]

    asyncio.run(main())
    assert "dropped the 2 oldest (2 requests, 4 prompt and 6 completion tokens)" in caplog.text


async def test_an_abandoned_stream_is_in_the_ledger_as_aborted() -> None:
    ledger = UsageLedger("r")

    async def half_stream(scope, receive, send) -> None:
        req: RequestScope = scope["lgw.request"]
        req.identify(Tenant(1, "acme"))
        req.label, req.prompt_tokens, req.completion_tokens = "acme/bot", 4, 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await receive()  # the client went away

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    edge = RequestEdge(half_stream, GatewayMetrics(), lambda p: True, ledger=ledger)
    await edge({"type": "http", "path": "/v1/chat/completions", "headers": []}, receive, send)
    (counts,) = ledger._totals.values()
    assert counts == UsageCounts(aborted=1, prompt_tokens=4, completion_tokens=1)


def test_usage_from_the_cli_as_csv_and_json(registry_env, capsys) -> None:
    registry: Registry = registry_env.registry
    minute = datetime(2026, 12, 7, 10, 31, tzinfo=UTC)
    for writer, n, tokens in (("a:1", 2, 9), ("b:1", 1, 1), ("a:1", 3, 9)):  # a's 2nd replaces its 1st
        counts = UsageCounts(requests_2xx=n, prompt_tokens=tokens)
        registry.record_usage(writer, [UsageRecord("acme", BOT, minute, counts)])
    common = ["--db", registry_env.db_url, "--from", "2026-12-07T10:00Z", "--to", "2026-12-07T11:00"]
    assert main(["registry", "usage", *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["minute,tenant,model,requests_2xx,requests_4xx,requests_5xx,aborted,prompt_tokens,"
                     "completion_tokens", f"2026-12-07T10:31:00+00:00,acme,{BOT},4,0,0,0,10,0"]
    assert main(["registry", "usage", *common, "--format", "json", "--tenant", "globex"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["registry", "usage", "--db", registry_env.db_url, "--from", "2026-12-07",
                 "--to", "2026-12-01"]) == 2
    assert "the end must come after the start" in capsys.readouterr().err
