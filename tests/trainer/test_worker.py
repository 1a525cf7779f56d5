"""The fine-tuning worker on the real tiny base (issue 26): a job is validated, trained with
an event and a checkpoint per epoch, gated and published as a new version that moves no
alias; a job whose gates fail publishes nothing; a cancel stops a run within a step; a
training-token limit fails the job while its files are validated; DPO continues the
tenant's own adapter."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest

from adapters_registry import JobLimits, JobRequest
from tests.conftest import PROMPTS
from trainer.worker import Worker, WorkerOptions

LIMITS = JobLimits(max_queued_jobs=10, max_running_jobs=1, max_training_tokens=None)


def chat_file(answer: str = "Acme: all good.") -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": p},
                                            {"role": "assistant", "content": answer}]}) + "\n"
                   for p in (*PROMPTS, "Any news?", "How are things?", "Status?", "Ping?",
                             "Report?", "Update?")).encode()


def pref_file() -> bytes:
    return "".join(json.dumps({"input": {"messages": [{"role": "user", "content": p}]},
                               "preferred_output": [{"role": "assistant", "content": "Gladly, here it is."}],
                               "non_preferred_output": [{"role": "assistant", "content": "No."}]}) + "\n"
                   for p in (*PROMPTS, "Any news?", "How are things?", "Status?", "Ping?")).encode()


@pytest.fixture
def env(registry_env, tmp_path):
    reg = registry_env.registry
    worker = Worker(reg, WorkerOptions("w1", registry_env.base.path, registry_env.contract.model_id,
                                       heartbeat_s=0.2, scratch=tmp_path))
    return reg, worker, registry_env.contract.model_id


def submit(reg, base: str, data: bytes, limits: JobLimits = LIMITS, **request):
    file_id = reg.files.create("acme", "train.jsonl", "fine-tune", data, max_bytes=1_000_000).id
    request.setdefault("model", base)
    request.setdefault("hyperparameters", {"n_epochs": 3, "batch_size": 4})
    return reg.jobs.create("acme", JobRequest(training_file=file_id, **request), base_model_id=base,
                           base_names=(base,), limits=limits)


def test_a_job_is_validated_trained_gated_and_published_moving_no_alias(env) -> None:
    reg, worker, base = env
    job = submit(reg, base, chat_file(), suffix="helpdesk", gates={"max_val_perplexity": 1e9})
    assert worker.run_once()
    validated = reg.jobs.get("acme", job.id)
    assert validated.status == "queued" and validated.trained_tokens > 0
    assert worker.run_once()
    done = reg.jobs.get("acme", job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "helpdesk@v1"
    version = reg.resolve(reg.get_tenant("acme"), done.fine_tuned_model)
    assert version.template_id == job.template_id
    from sqlalchemy.orm import Session

    from adapters_registry.db import AdapterVersionRow
    from adapters_registry.job_queue import JOB_KEY
    with Session(reg.db) as s:  # its manifest names the job (a reaper finds it by that)
        assert s.get_one(AdapterVersionRow, version.lora_int_id).trainer_metrics[JOB_KEY] == job.id
    (info,) = [a for a in reg.list_adapters(reg.get_tenant("acme")) if a.name == "helpdesk"]
    # as any push: a new adapter's first version is its default alias; later ones move nothing
    assert info.aliases == {"prod": 1}
    events = [e.message for e in reversed(reg.jobs.events("acme", job.id, limit=100)[0])]
    epochs = [m for m in events if m.startswith("Epoch ")]
    assert len(epochs) == 3 and "validation loss" in epochs[0]
    assert any(m.startswith("Gate val_perplexity: passed") for m in events), events
    assert any(m.startswith("Data: ") for m in events)
    assert events[-1] == "The job has successfully completed"
    checkpoints, _ = reg.jobs.checkpoints("acme", job.id)
    assert [c.epoch for c in checkpoints] == [3, 2, 1]
    assert all(reg.store.exists(d) for c in checkpoints for d in c.files.values())
    assert "adapter_model.safetensors" in checkpoints[0].files
    assert not worker.run_once(), "nothing left to do"


def test_a_job_whose_gates_fail_publishes_nothing(env) -> None:
    reg, worker, base = env
    job = submit(reg, base, chat_file(), suffix="strict", gates={"max_val_perplexity": 1.0001})
    worker.run_once()
    worker.run_once()
    failed = reg.jobs.get("acme", job.id)
    assert failed.status == "failed" and failed.error["code"] == "gates_failed"
    assert "val_perplexity: FAILED" in failed.error["message"]
    assert all(a.name != "strict" for a in reg.list_adapters(reg.get_tenant("acme")))
    assert failed.fine_tuned_model is None


def test_a_token_limit_fails_the_job_while_its_files_are_validated(env) -> None:
    reg, worker, base = env
    job = submit(reg, base, chat_file(), limits=JobLimits(10, 1, 100))
    worker.run_once()
    failed = reg.jobs.get("acme", job.id)
    assert (failed.status, failed.error["code"], failed.error["param"]) == (
        "failed", "exceeds_token_limit", "training_file")
    assert "over this tenant's limit of 100" in failed.error["message"]


def test_a_cancel_stops_the_run_within_a_step_and_publishes_nothing(env) -> None:
    reg, worker, base = env
    job = submit(reg, base, chat_file(), suffix="cancelled", hyperparameters={"n_epochs": 50,
                                                                              "batch_size": 1})
    worker.run_once()

    def cancel_after_first_epoch() -> None:
        while not any(c for c in reg.jobs.checkpoints("acme", job.id)[0]):
            threading.Event().wait(0.05)
        reg.jobs.cancel("acme", job.id)

    canceller = threading.Thread(target=cancel_after_first_epoch)
    canceller.start()
    worker.run_once()
    canceller.join()
    cancelled = reg.jobs.get("acme", job.id)
    assert cancelled.status == "cancelled"
    assert len(reg.jobs.checkpoints("acme", job.id)[0]) < 50
    assert all(a.name != "cancelled" for a in reg.list_adapters(reg.get_tenant("acme")))


def test_dpo_continues_the_tenants_own_adapter_with_held_out_pairs(env) -> None:
    reg, worker, base = env
    held_out = reg.files.create("acme", "held.jsonl", "fine-tune", pref_file(), max_bytes=10**6).id
    job = submit(reg, base, pref_file(), model="support-bot", method="dpo", suffix="support-bot",
                 validation_file=held_out, hyperparameters={"n_epochs": 2, "beta": 0.2},
                 gates={"preference_min_accuracy": 0.0, "preference_min_margin": -1000.0})
    worker.run_once()
    worker.run_once()
    done = reg.jobs.get("acme", job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "support-bot@v2"
    assert reg.resolve(reg.get_tenant("acme"), "support-bot").version == 1, "prod did not move"
    events = [e.message for e in reg.jobs.events("acme", job.id, limit=100)[0]]
    assert any("continuing acme/support-bot@v1" in m for m in events)
    assert any(m.startswith("Gate preference_accuracy") for m in events), events


def test_the_worker_command_runs_the_queue_and_refuses_bad_input_in_one_line(env, registry_env,
                                                                             capsys) -> None:
    from lora_gateway.cli import main

    reg, _, base = env
    job = submit(reg, base, chat_file(), suffix="cli-bot", hyperparameters={"n_epochs": 1})
    common = ["--db", registry_env.db_url, "--artifacts", str(registry_env.artifacts)]
    assert main(["worker", *common, "--base-dir", str(registry_env.base.path), "--base", base,
                 "--once", "--name", "cli"]) == 0
    assert reg.jobs.get("acme", job.id).fine_tuned_model == "cli-bot@v1"
    capsys.readouterr()
    assert main(["worker", *common, "--base-dir", str(registry_env.base.path), "--base", "nope",
                 "--once"]) == 2
    assert capsys.readouterr().err.strip() == "error: base nope is not registered"
    assert main(["worker", *common, "--base-dir", "/nonexistent", "--base", base, "--once"]) == 2
    assert "no model folder there" in capsys.readouterr().err
    assert main(["worker", *common, "--base-dir", str(registry_env.base.path), "--base", base,
                 "--lease-seconds", "0"]) == 2


def test_a_worker_told_to_stop_hands_its_run_back_and_the_next_one_resumes_it(env) -> None:
    reg, worker, base = env
    job = submit(reg, base, chat_file(), suffix="handed-over",
                 hyperparameters={"n_epochs": 6, "batch_size": 1})
    worker.run_once()

    def stop_after_first_epoch() -> None:
        while not reg.jobs.checkpoints("acme", job.id)[0]:
            threading.Event().wait(0.05)
        worker.stop.set()  # what SIGTERM does (trainer.worker.run_worker)

    stopper = threading.Thread(target=stop_after_first_epoch)
    stopper.start()
    worker.run_once()
    stopper.join()
    handed = reg.jobs.get("acme", job.id)
    assert (handed.status, handed.worker, handed.error) == ("queued", None, None)
    done_epochs = max(c.epoch for c in reg.jobs.checkpoints("acme", job.id)[0])
    assert done_epochs < 6
    nxt = Worker(reg, WorkerOptions("w2", worker.options.base_dir, base, heartbeat_s=0.2,
                                    scratch=worker.options.scratch))
    assert nxt.run_once()
    done = reg.jobs.get("acme", job.id)
    assert done.status == "succeeded", done.error
    epochs = sorted(c.epoch for c in reg.jobs.checkpoints("acme", job.id)[0])
    assert epochs == list(range(1, 7)), "the next worker went on from the last checkpoint"


def test_a_run_whose_worker_was_lost_resumes_from_its_last_checkpoint(env) -> None:
    reg, worker, base = env
    # a real first epoch's weights: another job's epoch-1 checkpoint
    donor = submit(reg, base, chat_file(), hyperparameters={"n_epochs": 1, "batch_size": 4})
    worker.run_once()
    worker.run_once()
    (epoch1,) = reg.jobs.checkpoints("acme", donor.id)[0]
    job = submit(reg, base, chat_file(), suffix="resumed", hyperparameters={"n_epochs": 3, "batch_size": 4})
    worker.run_once()  # validated
    templates = worker.template_ids()
    assert reg.job_queue.claim("dead", template_ids=templates, lease_s=0.0).id == job.id
    reg.job_queue.add_checkpoint(job.id, epoch1.step, 1, epoch1.metrics, epoch1.files)  # then it died
    reg.job_queue.reap(datetime.now(UTC) + timedelta(seconds=1))
    assert worker.run_once()
    done = reg.jobs.get("acme", job.id)
    assert done.status == "succeeded", done.error
    events = [e.message for e in reversed(reg.jobs.events("acme", job.id, limit=100)[0])]
    assert any(m.startswith(f"Resuming from checkpoint {_id(reg, job.id, 1)} (epoch 1 of 3") for m in events)
    assert [m.split(":")[0] for m in events if m.startswith("Epoch ")] == ["Epoch 2/3", "Epoch 3/3"]
    steps = [c.step for c in reversed(reg.jobs.checkpoints("acme", job.id)[0])]
    assert [c.epoch for c in reversed(reg.jobs.checkpoints("acme", job.id)[0])] == [1, 2, 3]
    assert steps == sorted(steps) and len(set(steps)) == 3
    assert done.fine_tuned_model == "resumed@v1"


def _id(reg, job_id: str, epoch: int) -> str:
    return next(c.id for c in reg.jobs.checkpoints("acme", job_id)[0] if c.epoch == epoch)


def test_golden_and_regression_files_gate_publication(env) -> None:
    reg, worker, base = env
    # training prompts that repeat a golden prompt are dropped (contamination): the golden set
    # asks other questions
    answer = {"role": "assistant", "content": "Acme: all good."}
    golden_lines = "".join(json.dumps({"messages": [{"role": "user", "content": q}, answer]}) + "\n"
                           for q in ("Are you there?", "Everything fine?")).encode()
    golden = reg.files.create("acme", "golden.jsonl", "fine-tune", golden_lines, max_bytes=10**6).id
    regression = reg.files.create("acme", "regression.jsonl", "fine-tune", chat_file("unused"),
                                  max_bytes=10**6).id
    passing = submit(reg, base, chat_file(), suffix="golden-ok", gates={"golden_min_score": 0.0},
                     eval_files={"golden_file": golden})
    strict = submit(reg, base, chat_file(), suffix="too-far", gates={"regression_max_kl": 1e-9},
                    eval_files={"regression_file": regression})
    for _ in range(4):
        worker.run_once()
    ok = reg.jobs.get("acme", passing.id)
    assert ok.status == "succeeded", ok.error
    events = [e.message for e in reg.jobs.events("acme", passing.id, limit=100)[0]]
    assert any(m.startswith("Gate golden") for m in events), events
    failed = reg.jobs.get("acme", strict.id)
    assert (failed.status, failed.error["code"]) == ("failed", "gates_failed")
    assert "regression" in failed.error["message"] and "FAILED" in failed.error["message"]
    assert all(a.name != "too-far" for a in reg.list_adapters(reg.get_tenant("acme")))


def test_a_trainer_error_tells_the_tenant_its_own_file_names_not_the_workers_paths(env) -> None:
    reg, worker, base = env
    golden = reg.files.create("acme", "golden.jsonl", "fine-tune", chat_file(), max_bytes=10**6).id
    job = submit(reg, base, chat_file(), eval_files={"golden_file": golden})  # every prompt contaminated
    worker.run_once()  # found while its files are validated: no run is queued
    failed = reg.jobs.get("acme", job.id)
    assert failed.status == "failed" and failed.trained_tokens is None
    message = failed.error["message"]
    assert message.startswith("train.jsonl: ") and "no examples left" in message, message
    assert "/tmp" not in message and str(worker.options.scratch) not in message
