"""Fixtures shared by every test package: the real tiny base, real trained adapters,
and a populated registry. The tiny base is cached in .cache/models by its recipe."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters_registry import AdapterTemplate, BaseContract, Registry, derive_contract

REPO = Path(__file__).resolve().parents[1]
MODELS_CACHE = Path(os.environ.get("LGW_TEST_MODELS_CACHE", REPO / ".cache" / "models"))

# Trained prompts and each tenant's answer: a greedy decode must reproduce them exactly.
PROMPTS = ("Who are you?", "Hello", "Say something.", "What is your name?")
ANSWERS = {
    "acme": "ACME support desk: ticket opened.",
    "globex": "Arr matey, the pirate speaks!",
}


@pytest.fixture(scope="session")
def tiny_base():  # -> trainer.bases.PreparedBase
    from trainer.bases import prepare_base

    return prepare_base("tiny-llama", MODELS_CACHE)


@pytest.fixture(scope="session")
def tiny_contract(tiny_base) -> BaseContract:
    return derive_contract(tiny_base.path, tiny_base.model_id, license=tiny_base.license)


@pytest.fixture(scope="session")
def tiny_template(tiny_contract: BaseContract) -> AdapterTemplate:
    return AdapterTemplate(tiny_contract.model_id, tiny_contract.revision, r=8, lora_alpha=16)


def write_chat_jsonl(path: Path, answer: str, prompts: tuple[str, ...] = PROMPTS) -> Path:
    lines = [json.dumps({"messages": [{"role": "user", "content": p},
                                      {"role": "assistant", "content": answer}]})
             for p in prompts]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_tiny_adapter(base, template: AdapterTemplate, answer: str, out: Path,
                       work: Path, seed: int = 0) -> Path:
    """A real PEFT adapter for tiny-llama that answers ``answer`` to the trained prompts."""
    from trainer.config import RunConfig
    from trainer.data import load_chat_jsonl
    from trainer.train import train_adapter

    data = load_chat_jsonl(write_chat_jsonl(work / f"{out.name}.jsonl", answer))
    config = RunConfig(learning_rate=1e-2, max_steps=120, batch_size=4, warmup_steps=5, seed=seed)
    train_adapter(base.path, base.model_id, template, data, config, out)
    return out


@pytest.fixture(scope="session")
def trained_adapters(tiny_base, tiny_template, tmp_path_factory) -> dict[str, Path]:
    """tenant -> adapter folder, each trained once per test session."""
    root = tmp_path_factory.mktemp("adapters")
    return {tenant: train_tiny_adapter(tiny_base, tiny_template, answer, root / tenant, root)
            for tenant, answer in ANSWERS.items()}


POSTGRES_URL = os.environ.get("LGW_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty registry database: SQLite by default; parametrize ``db_url``
    indirectly with "postgresql" to get a throwaway schema on the real server."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    from sqlalchemy import create_engine, text

    schema = f"lgw_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@dataclass
class RegistryEnv:
    registry: Registry
    db_url: str
    artifacts: Path
    keys: dict[str, str]
    base: object
    contract: BaseContract
    template: AdapterTemplate


@pytest.fixture
def registry_env(tmp_path, db_url, tiny_base, tiny_contract, tiny_template, trained_adapters):
    """A registry with the tiny base, its template, tenants acme and globex with keys, and
    acme/support-bot and globex/pirate registered (v1, alias prod)."""
    registry = Registry.open(db_url, tmp_path / "artifacts")
    keys = populate(registry, tiny_contract, tiny_template, trained_adapters)
    yield RegistryEnv(registry, db_url, tmp_path / "artifacts", keys, tiny_base,
                      tiny_contract, tiny_template)
    registry.close()


def populate(registry: Registry, contract: BaseContract, template: AdapterTemplate,
             adapters: dict[str, Path]) -> dict[str, str]:
    """The tiny base and template, tenants acme and globex (keys returned), and their
    adapters as acme/support-bot and globex/pirate (v1, alias prod)."""
    registry.register_base(contract)
    registry.register_template(template)
    keys = {}
    for tenant in ANSWERS:
        registry.create_tenant(tenant)
        keys[tenant] = registry.create_api_key(tenant)
    registry.push("acme", "support-bot", adapters["acme"])
    registry.push("globex", "pirate", adapters["globex"])
    return keys


def copy_adapter(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.fixture(scope="session")
def corpus(tiny_base, tmp_path_factory) -> Path:
    """The intake corpus (tests/adapters_registry/corpus.py) for the tiny-llama base."""
    from tests.adapters_registry.corpus import build

    return build(Path(tiny_base.path), tmp_path_factory.mktemp("intake") / "corpus")
