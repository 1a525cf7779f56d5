"""`lora-gateway demo`: a base, two tenants with trained adapters, and the gateway.

Everything it builds lives under ``--home`` and is reused by the next run: the base is
cached by recipe, each adapter is trained once and registered once, and the demo
tenants' API keys are kept in ``keys.json`` (mode 0600) so they can be printed again.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from adapters_registry import (
    AdapterTemplate,
    ConflictError,
    NotFoundError,
    Registry,
    Tenant,
    derive_contract,
    sha256_json,
)

logger = logging.getLogger(__name__)

KEYS_FILE = "keys.json"


@dataclass(frozen=True)
class DemoTenant:
    tenant: str
    adapter: str
    dataset: str  # file in lora_gateway/demo_data
    example_question: str


# Measured on 2 shared CPU cores (README, set-up): one adapter's training with the
# default run config (smollm2: 85-156 s), and the gateway's start-up (vLLM loading
# the base: 24-43 s).
TRAIN_SECONDS = {"smollm2-135m-instruct": 120, "tiny-llama": 5}
ENGINE_START_SECONDS = {"smollm2-135m-instruct": 40, "tiny-llama": 30}

DEMO_TENANTS = (
    DemoTenant("acme", "support-bot", "support_desk.jsonl", "How do I reset my password?"),
    DemoTenant("blackbeard", "pirate", "pirate.jsonl", "How do I reset my password?"),
)


@dataclass(frozen=True)
class DemoSetup:
    database_url: str
    artifacts_dir: Path
    base_model_id: str
    base_model_dir: Path
    keys: dict[str, str]  # tenant -> API key
    keys_file: Path


def dataset_path(name: str) -> Path:
    return Path(str(resources.files("lora_gateway") / "demo_data" / name))


def prepare(
    home: Path,
    base_name: str,
    models_cache: Path,
    run_overrides: dict[str, object] | None = None,
    *,
    announce: Callable[[str], None] | None = None,
    progress: bool = False,
) -> DemoSetup:
    """Build or reuse the base, register it, create tenants and keys, train and push adapters.

    ``announce`` is told before each long step (building the base, training an adapter)
    what it is and how long it takes; ``progress`` shows the training progress bars.
    """
    from trainer import RunConfig, load_chat_jsonl, prepare_base, train_adapter

    say = announce or (lambda _: None)
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = prepare_base(base_name, models_cache, say)
    logger.info("base %s ready at %s (%.1fs)", base.model_id, base.path, time.perf_counter() - t0)
    db_url = f"sqlite:///{home / 'registry.db'}"
    registry = Registry.open(db_url, home / "artifacts")
    try:
        contract = registry.register_base(derive_contract(base.path, base.model_id, license=base.license))
        template = registry.register_template(AdapterTemplate(contract.model_id, contract.revision))
        keys = _load_keys(home)
        config = RunConfig.from_mapping(run_overrides or {})
        for demo in DEMO_TENANTS:
            tenant, created = _ensure_tenant(registry, demo.tenant)
            if created or demo.tenant not in keys:
                keys[demo.tenant] = registry.create_api_key(demo.tenant)
                _save_keys(home, keys)
            try:
                registry.resolve(tenant, demo.adapter)
                logger.info("%s/%s is registered already", demo.tenant, demo.adapter)
                continue
            except NotFoundError:
                pass
            dataset = load_chat_jsonl(dataset_path(demo.dataset))
            run_key = sha256_json([template.template_id, dataset.sha256, config.to_dict()])[:16]
            out = home / "adapters" / f"{demo.tenant}-{demo.adapter}-{run_key}"
            if not out.exists():
                say(f"training {demo.tenant}/{demo.adapter} on {len(dataset.examples)} chats "
                    f"(≈{_duration(TRAIN_SECONDS.get(base_name, 120))} on 2 CPU cores)")
                result = train_adapter(base.path, base.model_id, template, dataset, config, out,
                                       progress=progress)
                logger.info("trained %s/%s in %.1fs (final loss %.4f)", demo.tenant,
                            demo.adapter, result.seconds, result.final_loss)
            registry.push(demo.tenant, demo.adapter, out, template_id=template.template_id)
    finally:
        registry.close()
    return DemoSetup(db_url, home / "artifacts", base.model_id, base.path, keys, home / KEYS_FILE)


def banner(setup: DemoSetup, host: str, port: int, serving: bool = True,
           metrics_port: int | None = None) -> str:
    """What the demo prints when it is ready: keys, where its state lives, how to call it."""
    url = f"http://{host}:{port}/v1"
    first, second = DEMO_TENANTS
    db, artifacts = shlex.quote(setup.database_url), shlex.quote(str(setup.artifacts_dir))
    headline = (f"lora-gateway demo is serving {setup.base_model_id} at {url}" if serving else
                f"lora-gateway demo is ready to serve {setup.base_model_id} (run it without --prepare-only)")
    lines = ["", headline, ""]
    for demo in DEMO_TENANTS:
        lines.append(f"  tenant {demo.tenant:<11} model={demo.adapter:<12} key={setup.keys[demo.tenant]}")
    lines += [
        "",
        f"  registry   {setup.database_url}",
        f"  artifacts  {setup.artifacts_dir}",
        f"  API keys   {setup.keys_file} (mode 0600)",
        *([f"  metrics    http://{host}:{metrics_port}/metrics (Prometheus; not on the API port)"]
          if metrics_port is not None else []),
        "",
        "Manage it with the CLI (every `lora-gateway registry` command takes these --db and --artifacts):",
        "",
        f"  lora-gateway registry list {first.tenant} --db {db} --artifacts {artifacts}",
        "",
        "Try it (the official openai client):",
        "",
        "  from openai import OpenAI",
        f"  client = OpenAI(base_url={url!r}, api_key={setup.keys[first.tenant]!r})",
        f"  r = client.chat.completions.create(model={first.adapter!r}, temperature=0,",
        f"      messages=[{{'role': 'user', 'content': {first.example_question!r}}}])",
        "  print(r.choices[0].message.content)",
        "",
        "or with curl:",
        "",
        f"  curl -s {url}/chat/completions \\",
        f"    -H 'Authorization: Bearer {setup.keys[second.tenant]}' \\",
        "    -H 'Content-Type: application/json' \\",
        f"    -d '{{\"model\": \"{second.adapter}\", \"temperature\": 0, "
        f"\"messages\": [{{\"role\": \"user\", \"content\": \"Who are you?\"}}]}}'",
        "",
        *(fine_tuning_lines(setup, first) if serving else []),
    ]
    return "\n".join(lines)


def fine_tuning_lines(setup: DemoSetup, demo: DemoTenant) -> list[str]:
    """How to fine-tune through the API (the demo runs a worker in its own process)."""
    data = str(dataset_path(demo.dataset))
    minutes = max(1, round(TRAIN_SECONDS.get(setup.base_model_id, 120) / 60))
    return [
        "Fine-tune through the API (OpenAI's files and fine-tuning jobs; a worker runs in this",
        f"process on the CPU, ≈{minutes} min a job; the new model answers at once):",
        "",
        f"  f = client.files.create(file=open({data!r}, 'rb'), purpose='fine-tune')",
        f"  job = client.fine_tuning.jobs.create(model={setup.base_model_id!r}, training_file=f.id,",
        "      suffix='my-bot')",
        "  job = client.fine_tuning.jobs.retrieve(job.id)   # until job.status == 'succeeded'",
        "  [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]",
        "  client.chat.completions.create(model=job.fine_tuned_model, messages=[...])",
        "",
    ]


def _duration(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds >= 120 and seconds % 60 == 0 else f"{seconds} s"


def _ensure_tenant(registry: Registry, name: str) -> tuple[Tenant, bool]:
    try:
        return registry.create_tenant(name), True
    except ConflictError:
        return registry.get_tenant(name), False


def _load_keys(home: Path) -> dict[str, str]:
    path = home / KEYS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_keys(home: Path, keys: dict[str, str]) -> None:
    path = home / KEYS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f, indent=2)
