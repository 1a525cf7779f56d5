"""Weighted alias splits in the registry: stored, resolved, audited, and every bad split
refused with every reason (issue 27, item 1)."""

from __future__ import annotations

import pytest

from adapters_registry import split_from_labels
from adapters_registry.errors import ConflictError, NotFoundError, ValidationError
from lora_gateway.cli import main


@pytest.fixture
def two_versions(registry_env, trained_adapters):
    """acme/support-bot v1 (alias prod) and v2 (another adapter's files, same template)."""
    reg = registry_env.registry
    reg.push("acme", "support-bot", trained_adapters["globex"])
    return reg


def test_a_split_resolves_with_its_weights_and_keeps_the_stable_version(two_versions) -> None:
    reg = two_versions
    acme = reg.get_tenant("acme")
    generation = reg.generation()
    reg.set_split("acme", "support-bot", "prod", {1: 90, 2: 10})
    assert reg.generation() > generation, "every replica hears of it"
    resolution = reg.resolve_split(acme, "support-bot")
    assert resolution.version.version == 1, "the alias's version stays the stable one"
    assert [(e.label, e.weight) for e in resolution.split] == [("v1", 90), ("v2", 10)]
    assert reg.resolve(acme, "support-bot").version == 1
    assert reg.resolve_split(acme, "support-bot@v2").split == (), "a pinned version has no split"
    (info,) = [a for a in reg.list_adapters(acme) if a.name == "support-bot"]
    assert info.splits == {"prod": {"v1": 90, "v2": 10}}
    # A/B against the bare base
    reg.set_split("acme", "support-bot", "prod", {2: 1, None: 1})
    resolution = reg.resolve_split(acme, "support-bot")
    assert [(e.label, e.weight) for e in resolution.split] == [("v2", 1), ("base", 1)]
    assert resolution.version.version == 2, "v1 left the split: the heaviest version is stable"
    # A plain move ends the split (the rollback), audited with what it ended.
    reg.set_alias("acme", "support-bot", "prod", 1)
    assert reg.resolve_split(acme, "support-bot").split == ()
    entries = reg.audit_log(subject_prefix="acme/support-bot:prod", limit=2)
    assert entries[0].action == "alias.set" and entries[0].details["split_ended"] == {"v2": 1, "base": 1}
    assert entries[1].action == "alias.split" and entries[1].details["weights"] == {"v2": 1, "base": 1}


def test_a_split_of_one_version_is_an_alias_move(two_versions) -> None:
    two_versions.set_split("acme", "support-bot", "prod", {2: 7})
    resolution = two_versions.resolve_split(two_versions.get_tenant("acme"), "support-bot")
    assert resolution.version.version == 2 and resolution.split == ()


def test_every_problem_of_a_bad_split_is_listed_and_nothing_changes(two_versions) -> None:
    reg = two_versions
    with pytest.raises(ValidationError) as err:
        reg.set_split("acme", "support-bot", "prod", {1: 0, 2: -3, None: 2.5})  # type: ignore[dict-item]
    text = str(err.value)
    assert "v1: weight 0" in text and "v2: weight -3" in text and "base: weight 2.5" in text
    with pytest.raises(ValidationError, match="at least one version"):
        reg.set_split("acme", "support-bot", "prod", {None: 1})
    with pytest.raises(ValidationError, match="at most 8"):
        reg.set_split("acme", "support-bot", "prod", {v: 1 for v in range(1, 10)})
    with pytest.raises(NotFoundError, match="v9 does not exist"):
        reg.set_split("acme", "support-bot", "prod", {1: 1, 9: 1})
    with pytest.raises(NotFoundError):  # another tenant's adapter is not in acme's namespace
        reg.set_split("acme", "pirate", "prod", {1: 1, 2: 1})
    reg.deprecate_version("acme", "support-bot", 2)
    with pytest.raises(ConflictError, match="deprecated"):
        reg.set_split("acme", "support-bot", "prod", {1: 1, 2: 1})
    assert reg.resolve_split(reg.get_tenant("acme"), "support-bot").split == ()
    with pytest.raises(ValidationError, match="'v0', 'prod'"):
        split_from_labels({"v1": 1, "v0": 1, "prod": 2})


def test_a_version_in_a_split_cannot_be_retired(two_versions) -> None:
    two_versions.set_split("acme", "support-bot", "canary", {1: 1, 2: 1})
    with pytest.raises(ConflictError, match=r"target of alias\(es\) \['canary'\]"):
        two_versions.delete_version("acme", "support-bot", 2)


def test_the_command_line_sets_and_refuses_splits(two_versions, registry_env, capsys) -> None:
    common = ["--db", registry_env.db_url, "--artifacts", str(registry_env.artifacts)]
    assert main(["registry", "split", "acme/support-bot", "prod", "v1=95", "v2=5", *common]) == 0
    acme = two_versions.get_tenant("acme")
    assert [e.weight for e in two_versions.resolve_split(acme, "support-bot").split] == [95, 5]
    capsys.readouterr()
    assert main(["registry", "split", "acme/support-bot", "prod", "v1=95", "v2=lots", "x", *common]) != 0
    err = capsys.readouterr().err
    assert "'x': write each entry as vN=WEIGHT" in err and "Traceback" not in err
    assert main(["registry", "split", "acme/support-bot", "prod", "v1=0", "v2=five", *common]) != 0
    err = capsys.readouterr().err
    assert "v1: weight 0" in err and "v2: weight 'five' is not an integer" in err
