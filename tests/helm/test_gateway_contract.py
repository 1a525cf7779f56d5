"""The rendered container is a `lora-gateway serve` the real CLI accepts, every flag and
LGW_* variable is an existing GatewaySettings field, and together they build the settings
the values asked for. Every gateway setting is reachable from values."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import settings_from_args
from gateway.config import GatewaySettings
from lora_gateway.cli import build_parser
from tests.helm.chart import (
    MINIMAL,
    PROFILES,
    env_of,
    gateway_container,
    merged,
    profile,
    render,
    schema,
    the,
)

FIELDS = set(GatewaySettings.model_fields)
# What the Secrets would hold, by the setting they feed.
SECRET_VALUES = {"database_url": "postgresql+psycopg://lgw:pw@db:5432/lgw", "redis_url": "redis://redis:6379/0",
                 "admin_api_key": "a" * 40}
# Parser dests that are not GatewaySettings fields (`worker`: serve --worker, which the chart never sets).
NOT_SETTINGS = {"command", "log_level", "worker"}
ALL_ON = {"secrets": {"redis": {"existingSecret": "lgw-redis"},
                      "adminApiKey": {"existingSecret": "lgw-admin"}},
          "registry": {"s3EndpointUrl": "http://minio:9000"}}


def _parse(container: dict[str, Any]) -> argparse.Namespace:
    assert container["command"] == ["lora-gateway"]
    return build_parser().parse_args(container["args"])  # SystemExit on any unknown flag


def _settings_env(container: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, env in env_of(container).items():
        if not name.startswith("LGW_"):
            continue
        field = name.removeprefix("LGW_").lower()
        assert field in FIELDS, f"{name} is not a GatewaySettings field"
        out[name] = env["value"] if "value" in env else SECRET_VALUES[field]
    return out


def _build(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> GatewaySettings:
    args = _parse(container)
    assert args.command == "serve"
    assert args.worker is False  # the gateway never trains: fine-tuning runs in the worker pods
    for dest in vars(args):
        assert dest in FIELDS | NOT_SETTINGS, f"flag --{dest} is not a GatewaySettings field"
    import os

    for name in [n for n in os.environ if n.startswith("LGW_")]:
        monkeypatch.delenv(name)
    for name, value in _settings_env(container).items():
        monkeypatch.setenv(name, value)
    return settings_from_args(args)


@pytest.mark.parametrize("name", PROFILES)
def test_rendered_command_builds_the_settings_the_values_ask_for(name: str, monkeypatch) -> None:
    values = merged(profile(name), ALL_ON)
    settings = _build(gateway_container(render(values)), monkeypatch)
    engine = values["engine"]
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 8000, 9090)
    assert settings.base_model_id == values["model"]["id"]
    assert settings.base_model_dir == Path("/models/base")
    assert settings.cache_dir == Path("/var/cache/lora-gateway")
    assert settings.artifacts_dir == values["registry"]["artifacts"]
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert (settings.dtype, settings.max_model_len, settings.max_num_seqs) == (
        engine["dtype"], engine["maxModelLen"], engine["maxNumSeqs"])
    assert (settings.max_loras, settings.max_cpu_loras, settings.max_lora_rank) == (
        engine["maxLoras"], engine["maxCpuLoras"], engine["maxLoraRank"])
    assert settings.database_url == SECRET_VALUES["database_url"]
    assert settings.redis_url is not None and settings.admin_api_key is not None
    assert settings.disk_cache_max_bytes == values["adapterCache"]["sizeGiB"] * 2**30 * 9 // 10
    assert settings.drain_grace_seconds == values.get("gateway", {}).get("drainGraceSeconds", 30)


def test_every_gateway_setting_is_reachable_from_values(monkeypatch) -> None:
    free = set(schema()["properties"]["gateway"]["properties"]["settings"]["properties"])
    assert free <= FIELDS, f"gateway.settings names unknown settings: {sorted(free - FIELDS)}"
    set_by_chart: set[str] = set()
    for name in PROFILES:
        values = merged(profile(name), ALL_ON)
        values.setdefault("gateway", {})["settings"] = {}  # only what the chart itself maps
        container = gateway_container(render(values))
        set_by_chart |= {d for d, v in vars(_parse(container)).items() if v is not None} - NOT_SETTINGS
        set_by_chart |= {n.removeprefix("LGW_").lower() for n in _settings_env(container)}
    assert not set_by_chart & free, "a setting the chart sets must not also be in gateway.settings"
    assert set_by_chart | free == FIELDS, (
        f"settings no value reaches: {sorted(FIELDS - set_by_chart - free)}; add them to the chart "
        "(gateway.settings in values.schema.json, or a value the templates map)")


def test_free_settings_reach_the_gateway_typed(monkeypatch) -> None:
    settings_values = {"served_base_name": "base", "expose_base": False,
                       "pinned_adapters": ["acme/bot", "globex/pirate:canary"],
                       "prefetch_adapters": ["acme/bot@v3"], "resolve_ttl_seconds": 0.5,
                       "max_request_bytes": 65536, "exit_on_engine_death": True,
                       "adapter_load_concurrency": 4, "adapter_slot_wait_seconds": 2.5,
                       "metrics_host": "0.0.0.0", "tool_call_parser": "hermes",
                       "default_rpm": 600, "default_tpm": 100000, "default_concurrency": 8,
                       "default_max_tokens": 512, "default_max_prompt_tokens": 1024,
                       "default_weight": 2.5, "quota_failure_mode": "closed", "fair_scheduling": False,
                       "engine_priority": False,
                       "admission_max_in_flight": 12, "admission_tpot_target_ms": 80.0,
                       "queue_max_per_tenant": 16, "queue_max_total": 64,
                       "queue_deadline_seconds": 7.5, "registry_changes_channel": False,
                       "registry_changes_retry_seconds": 2.5, "log_format": "json",
                       "replica_name": "gw-0", "stored_responses": 50,
                       "startup_wait_seconds": 60.0, "registry_outage_grace_seconds": 120.0,
                       "usage_flush_seconds": 5.0, "rollout_decide_seconds": 2.0,
                       "refusal_pattern": "(?:sorry|no)", "shadow_max_in_flight": 2,
                       "shadow_max_tokens": 32,
                       "default_max_file_bytes": 10_000_000, "default_max_running_jobs": 2,
                       "default_max_queued_jobs": 8, "default_max_training_tokens": 1_000_000,
                       "fine_tuning_template": "tpl-0123456789abcdef"}
    assert set(settings_values) == set(
        schema()["properties"]["gateway"]["properties"]["settings"]["properties"])
    container = gateway_container(render(merged(MINIMAL, {"gateway": {"settings": settings_values}})))
    settings = _build(container, monkeypatch)
    for key, value in settings_values.items():
        assert getattr(settings, key) == value, key


def test_migration_job_runs_a_real_command() -> None:
    job = the(render(MINIMAL), "Job")
    c = job["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(c["args"])
    assert (args.command, args.registry_cmd) == ("registry", "migrate")


def test_every_tenant_limit_has_a_default_in_the_values_schema_with_its_own_bounds() -> None:
    # adapters_registry.limits defines every limit once; the chart's schema is a static file,
    # so it is checked here: a new limit fails this test until its default_<name> is added.
    from adapters_registry import LIMITS

    settings = schema()["properties"]["gateway"]["properties"]["settings"]["properties"]
    for spec in LIMITS:
        entry = settings.get(f"default_{spec.name}")
        assert entry is not None, (f"values.schema.json: gateway.settings has no default_{spec.name}; "
                                   f"add {spec.json_schema()} with a description")
        assert {k: v for k, v in entry.items() if k != "description"} == spec.json_schema(), spec.name
