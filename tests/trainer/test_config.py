from __future__ import annotations

import dataclasses

import pytest

from trainer.config import ConfigError, RunConfig


def test_defaults_are_valid_and_every_field_has_help() -> None:
    config = RunConfig()
    assert config.learning_rate > 0
    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("help"), f.name


def test_from_mapping_round_trips() -> None:
    config = RunConfig(learning_rate=1e-3, max_steps=20, seed=7)
    assert RunConfig.from_mapping(config.to_dict()) == config


def test_yaml_style_numeric_strings_are_accepted_for_float_fields() -> None:
    # PyYAML reads `learning_rate: 1e-3` as the string "1e-3"
    assert RunConfig.from_mapping({"learning_rate": "1e-3"}).learning_rate == 1e-3


@pytest.mark.parametrize("key", ["r", "lora_alpha", "target_modules", "use_dora", "base_revision"])
def test_shape_keys_are_refused_as_template_fields(key: str) -> None:
    with pytest.raises(ConfigError, match=r"adapter template \(shape\) fields") as info:
        RunConfig.from_mapping({"learning_rate": 1e-3, key: 8})
    assert repr(key) in str(info.value)


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lr', 'num_epochs'\]"):
        RunConfig.from_mapping({"lr": 1e-3, "num_epochs": 3})


def test_shape_and_unknown_keys_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({"r": 16, "lr": 1e-3})
    assert "['r']" in str(info.value) and "['lr']" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"learning_rate": -1e-3}, "learning_rate must be positive"),
        ({"learning_rate": 0}, "learning_rate must be positive"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
        ({"learning_rate": "fast"}, "learning_rate must be a finite number"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"epochs": True}, "epochs must be an integer"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"max_steps": 2.0}, "max_steps must be an integer or null"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"grad_accumulation": 0}, "grad_accumulation must be >= 1"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"max_grad_norm": -1}, "max_grad_norm must be >= 0"),
        ({"max_length": 1}, "max_length must be at least 2"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_values_are_rejected(overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace(")", r"\)")):
        RunConfig(**overrides)
    with pytest.raises(ConfigError):
        RunConfig.from_mapping(overrides)


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig(learning_rate=-1.0, batch_size=0, seed=-3)
    message = str(info.value)
    assert "learning_rate" in message and "batch_size" in message and "seed" in message
