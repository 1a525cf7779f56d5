"""Names and references: full-string matching in one place, echoes cut short."""

from __future__ import annotations

import pytest

from adapters_registry.errors import NotFoundError, ValidationError
from adapters_registry.names import (
    AdapterRef,
    ModelRef,
    parse_adapter_ref,
    parse_qualified_model,
    shown,
    validate_name,
)

KINDS = ("tenant", "adapter", "alias")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["bot\n", "bot\r\n", "\nbot", "b\not", "Bot", "", "-bot", "b" * 64,
                                 "bot ", "bo/t", "bøt"])
def test_slug_names_match_the_whole_string(kind: str, bad: str) -> None:
    with pytest.raises(ValidationError, match=f"{kind} name"):
        validate_name(kind, bad)  # type: ignore[arg-type]


def test_valid_names() -> None:
    assert validate_name("tenant", "acme-2.eu_west") == "acme-2.eu_west"
    assert validate_name("template", "tpl-0123456789abcdef") == "tpl-0123456789abcdef"
    assert validate_name("base", "HuggingFaceTB/SmolLM2-135M-Instruct")
    for kind, bad in (("template", "tpl-0123456789abcdef\n"), ("template", "tpl-XYZ"),
                      ("base", "tiny-llama\n"), ("base", "a/b/c"), ("base", "../etc")):
        with pytest.raises(ValidationError):
            validate_name(kind, bad)  # type: ignore[arg-type]


def test_messages_cut_what_they_echo() -> None:
    with pytest.raises(ValidationError) as err:
        validate_name("adapter", "x" * 10_000)
    assert len(str(err.value)) < 300 and "(10000 characters)" in str(err.value)
    assert shown("short") == "'short'"


def test_refs() -> None:
    assert parse_adapter_ref("acme/bot") == AdapterRef("acme", "bot")
    assert str(parse_adapter_ref("acme/bot")) == "acme/bot"
    for bad in ("acme", "acme/", "/bot", "acme/bot\n", "acme\n/bot", "acme/b/c"):
        with pytest.raises(ValidationError):
            parse_adapter_ref(bad)
    with pytest.raises(ValidationError, match="--publish expects TENANT/NAME"):
        parse_adapter_ref("acme", what="--publish")
    assert parse_qualified_model("acme/bot:canary") == ("acme", ModelRef("bot", alias="canary"))
    assert parse_qualified_model("acme/bot@v3") == ("acme", ModelRef("bot", version=3))


@pytest.mark.parametrize(("text", "ref"), [
    ("bot", ModelRef("bot")), ("bot:canary", ModelRef("bot", "canary")),
    ("bot@v12", ModelRef("bot", None, 12)),
])
def test_model_forms_round_trip(text: str, ref: ModelRef) -> None:
    assert ModelRef.parse(text) == ref and str(ref) == text


@pytest.mark.parametrize("bad", ["bot\n", "bot:canary\n", "bot@v3\n", "bot@v0", "bot@v", "bot:a:b",
                                 "bot@v1:prod", "x" * 5000])
def test_malformed_models_read_as_unknown(bad: str) -> None:
    with pytest.raises(NotFoundError) as err:
        ModelRef.parse(bad)
    assert len(str(err.value)) < 200


def test_newline_names_are_refused_by_the_cli(registry_env, tmp_path, capsys) -> None:
    """`add-tenant $'acme\\n'` and `push acme/$'bot\\n'` used to create look-alikes."""
    from lora_gateway.cli import main

    common = ["--db", registry_env.db_url, "--artifacts", str(registry_env.artifacts)]
    assert main(["registry", "add-tenant", *common, "acme\n"]) == 2
    assert main(["registry", "push", *common, "acme/support-bot\n", str(tmp_path)]) == 2
    assert main(["registry", "set-alias", *common, "acme/support-bot", "prod\n", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("is invalid") == 3 and "Traceback" not in err
    assert [t.name for t in registry_env.registry.list_tenants()] == ["acme", "globex"]
