"""What a fine-tuning job trains on, read from the registry for a worker (``trainer.worker``):
its run settings, its training and validation sets and its eval sets (copies of the
tenant's files in the run's scratch folder, named as the tenant named them, read by the
trainer's own loaders), and the adapter it continues. A file that is gone or does not
load is a ``JobInputError``: the job fails with its code, message and parameter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters_registry import Files, Job, NotFoundError, Registry, parse_qualified_model, to_trainer_jsonl
from trainer.config import RunConfig
from trainer.errors import TrainerError

__all__ = ["JobInputError", "datasets", "eval_sets", "init_adapter", "items", "run_config"]


class JobInputError(Exception):
    """The job cannot run on its inputs: fail it with ``code``, ``message`` and ``param``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def run_config(job: Job) -> RunConfig:
    """The job's run settings: its method's defaults with its hyperparameters and gates."""
    method = "dpo" if job.method == "dpo" else "sft"
    defaults = RunConfig.for_method(method, {})
    hp = job.hyperparameters
    knobs: dict[str, Any] = {"seed": job.seed, **job.gates}
    if "n_epochs" in hp:
        knobs["epochs"] = hp["n_epochs"]
    if "batch_size" in hp:
        knobs["batch_size"] = hp["batch_size"]
    if "learning_rate_multiplier" in hp:
        knobs["learning_rate"] = defaults.learning_rate * hp["learning_rate_multiplier"]
    if "beta" in hp:
        knobs["beta"] = hp["beta"]
    return RunConfig.for_method(method, knobs)


def datasets(files: Files, job: Job, scratch: Path) -> tuple[Any, Any]:
    """The job's training and validation sets (None without one), read by the trainer's own
    loaders from copies in ``scratch``; JobInputError when a file is gone or does not load."""
    from trainer.data import load_chat_jsonl
    from trainer.preference import load_preference_jsonl

    load: Any = load_preference_jsonl if job.method == "dpo" else load_chat_jsonl
    loaded: list[Any] = []
    for param, file_id in (("training_file", job.training_file),
                           ("validation_file", job.validation_file)):
        if file_id is None:
            loaded.append(None)
            continue
        try:
            file = files.get(job.tenant, file_id)
        except NotFoundError:
            raise JobInputError("invalid_file", f"{param} {file_id} was deleted", param) from None
        # named as the tenant named it: the manifest and any error message show that name
        path = scratch / param / Path(file.filename).name
        path.parent.mkdir()
        path.write_bytes(to_trainer_jsonl(files.read_object(file), file.format))
        try:
            loaded.append(load(path))
        except TrainerError as exc:
            message = str(exc).replace(str(path), file.filename)
            raise JobInputError("invalid_file", f"{param} {file_id}: {message}", param) from None
    return loaded[0], loaded[1]


def eval_sets(files: Files, job: Job, scratch: Path) -> tuple[Any, Any]:
    """(golden, regression): the job's eval sets as the trainer reads them (None without
    one); JobInputError when a file is gone or does not load. A regression set is the
    prompts of a chat file (each line without its final assistant turn)."""
    from trainer.evals import load_golden_jsonl, load_regression_jsonl

    sets: dict[str, Any] = {}
    for key, load in (("golden_file", load_golden_jsonl), ("regression_file", load_regression_jsonl)):
        file_id = job.eval_files.get(key)
        if file_id is None:
            continue
        param = f"gates.{key}"
        try:
            file = files.get(job.tenant, file_id)
        except NotFoundError:
            raise JobInputError("invalid_file", f"{param} {file_id} was deleted", param) from None
        data = files.read_object(file)
        if key == "regression_file":
            data = b"".join(json.dumps({"messages": json.loads(line)["messages"][:-1]}).encode() + b"\n"
                            for line in data.split(b"\n") if line.strip())
        path = scratch / key / Path(file.filename).name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        try:
            sets[key] = load(path)
        except TrainerError as exc:
            message = str(exc).replace(str(path), file.filename)
            raise JobInputError("invalid_file", f"{param} {file_id}: {message}", param) from None
    return sets.get("golden_file"), sets.get("regression_file")


def init_adapter(registry: Registry, job: Job, folder: Path) -> Any:
    """The tenant's adapter the job continues, fetched (verified) into ``folder``."""
    from trainer.train import InitAdapter

    assert job.init_version is not None
    tenant, model = parse_qualified_model(job.init_version)
    version = registry.resolve(registry.get_tenant(tenant), str(model))
    registry.fetch(version, folder)  # every file verified against its sha256
    return InitAdapter(folder, version.ref, version.content_sha256)


def items(dataset: Any) -> list[Any]:
    """A training set's examples (SFT) or pairs (DPO)."""
    return list(getattr(dataset, "pairs", None) or getattr(dataset, "examples", []))
