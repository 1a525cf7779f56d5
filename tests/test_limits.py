"""Tenant limits are defined once (adapters_registry.limits): every surface that names them
is built from that definition and carries each limit, with its type and bounds."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest
from pydantic import ValidationError

from adapters_registry import LIMITS, TenantLimits
from adapters_registry.db import TenantLimitsRow
from gateway.api.admin_models import LimitsIn, LimitsOut
from gateway.config import GatewaySettings
from gateway.protection.quotas import Limits
from lora_gateway.cli import build_parser

NAMES = [spec.name for spec in LIMITS]


def test_the_definition_is_the_records_fields() -> None:
    assert [f.name for f in fields(TenantLimits)] == NAMES
    assert [f.name for f in fields(Limits)] == NAMES
    assert Limits().weight == 1.0


def test_the_table_has_a_nullable_column_per_limit() -> None:
    columns = TenantLimitsRow.__table__.columns
    for spec in LIMITS:
        assert columns[spec.name].nullable
        assert columns[spec.name].type.python_type is spec.kind


def test_the_registry_cli_has_a_flag_per_limit() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    registry = next(a for a in sub.choices["registry"]._actions
                    if isinstance(a, argparse._SubParsersAction))
    flags = {o for a in registry.choices["set-limits"]._actions for o in a.option_strings}
    assert {f"--{spec.flag}" for spec in LIMITS} <= flags


@pytest.mark.parametrize("spec", LIMITS, ids=NAMES)
def test_the_admin_api_and_the_settings_take_each_limit_within_its_bounds(spec, tmp_path) -> None:
    good = 2 if spec.kind is int else 2.5
    bad = spec.minimum - 1 if spec.kind is int else spec.minimum
    assert getattr(LimitsIn(**{spec.name: good}), spec.name) == good
    assert set(LimitsOut.model_fields) == set(NAMES)
    with pytest.raises(ValidationError):
        LimitsIn(**{spec.name: bad})
    base = {"database_url": "sqlite://", "artifacts_dir": str(tmp_path), "cache_dir": tmp_path,
            "base_model_id": "b", "base_model_dir": tmp_path}
    assert getattr(GatewaySettings(**base), f"default_{spec.name}") == spec.default
    assert getattr(GatewaySettings(**base, **{f"default_{spec.name}": good}),
                   f"default_{spec.name}") == good
    with pytest.raises(ValidationError):
        GatewaySettings(**base, **{f"default_{spec.name}": bad})
    assert TenantLimits(**{spec.name: good}).problems() == []
    assert TenantLimits(**{spec.name: bad}).problems() != []
    assert TenantLimits(**{spec.name: True}).problems() != []  # a bool is not a number here
