"""Fine-tuning files and jobs in the registry (issue 26): files checked whole at upload and
kept per tenant; jobs checked before they queue, claimed by workers under a lease (SKIP
LOCKED on PostgreSQL, a tenant's running limit held across workers), cancelled at once,
failed cleanly when their worker is lost; garbage collection keeps their blobs."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest

from adapters_registry import JobLimits, JobRequest, sha256_file
from adapters_registry.datasets import check_fine_tune_file, to_trainer_jsonl
from adapters_registry.errors import (
    ConflictError,
    LimitReachedError,
    NotFoundError,
    TooLargeError,
    ValidationError,
)

LIMITS = JobLimits(max_queued_jobs=3, max_running_jobs=1, max_training_tokens=None)
BASE_NAMES = ("tiny-llama",)


def chat(answer: str = "Hi there.", n: int = 3) -> bytes:
    return b"".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                             {"role": "assistant", "content": answer}]}).encode() + b"\n"
                    for i in range(n))


def preference(n: int = 3) -> bytes:
    return b"".join(json.dumps({"input": {"messages": [{"role": "user", "content": f"Q{i}?"}]},
                                "preferred_output": [{"role": "assistant", "content": "Yes."}],
                                "non_preferred_output": [{"role": "assistant", "content": "No."}]})
                    .encode() + b"\n" for i in range(n))


@pytest.fixture
def reg(registry_env):
    return registry_env.registry


def create(reg, tenant: str = "acme", **request) -> object:
    base_model_id = reg.catalog.templates()[0][0].model_id
    request.setdefault("model", base_model_id)
    return reg.jobs.create(tenant, JobRequest(**request), base_model_id=base_model_id,
                           base_names=(base_model_id,), limits=LIMITS)


def upload(reg, data: bytes = b"", tenant: str = "acme", name: str = "train.jsonl") -> str:
    return reg.files.create(tenant, name, "fine-tune", data or chat(), max_bytes=10_000).id


# -- formats -------------------------------------------------------------------------------

def test_every_bad_line_is_reported_with_its_number() -> None:
    lines = [chat(n=1), b"not json\n", json.dumps({"messages": [{"role": "assistant",
                                                                  "content": "x"}]}).encode() + b"\n",
             b"\n", json.dumps({"messages": [{"role": "user", "content": "q", "weight": 1},
                                             {"role": "assistant", "content": "a"}],
                                "tools": []}).encode() + b"\n"]
    check = check_fine_tune_file(b"".join(lines))
    assert [line for line, _ in check.problems] == [2, 3, 5, 5]
    assert "invalid JSON" in check.problems[0][1]
    assert "first turn must be a user turn" in check.problems[1][1]
    line5 = " ".join(problem for line, problem in check.problems if line == 5)
    assert "tools" in line5 and "weight" in line5


def test_preference_lines_are_openais_format_and_convert_to_the_trainers() -> None:
    check = check_fine_tune_file(preference(2))
    assert (check.format, check.examples, check.problems) == ("dpo", 2, [])
    first = json.loads(to_trainer_jsonl(preference(1), "dpo"))
    assert first == {"prompt": [{"role": "user", "content": "Q0?"}],
                     "chosen": [{"role": "assistant", "content": "Yes."}],
                     "rejected": [{"role": "assistant", "content": "No."}]}
    same = json.dumps({"input": {"messages": [{"role": "user", "content": "q"}]},
                       "preferred_output": [{"role": "assistant", "content": "A"}],
                       "non_preferred_output": [{"role": "assistant", "content": "A "}]}).encode()
    assert "prefers nothing" in check_fine_tune_file(same).problems[0][1]
    mixed = check_fine_tune_file(chat(n=1) + preference(1))
    assert mixed.format is None and "one format per file" in mixed.problems[0][1]


# -- files ---------------------------------------------------------------------------------

def test_a_file_is_kept_per_tenant_and_read_back_verified(reg) -> None:
    f = reg.files.create("acme", "train.jsonl", "fine-tune", chat(), max_bytes=10_000)
    assert (f.format, f.examples, f.size) == ("supervised", 3, len(chat()))
    assert f.as_openai()["object"] == "file" and f.as_openai()["status"] == "processed"
    assert reg.files.read("acme", f.id) == chat()
    assert [x.id for x in reg.files.list("acme")] == [f.id]
    for call in (reg.files.get, reg.files.read, reg.files.delete):
        with pytest.raises(NotFoundError):
            call("globex", f.id)  # another tenant's file does not exist for it
    assert reg.files.list("globex") == []
    reg.files.delete("acme", f.id)
    with pytest.raises(NotFoundError):
        reg.files.get("acme", f.id)


def test_a_bad_file_is_refused_whole_and_nothing_is_kept(reg) -> None:
    blobs = set(b for b, _ in reg.store.list_blobs())
    with pytest.raises(ValidationError, match=r"line 2: invalid JSON.*line 3"):
        reg.files.create("acme", "t.jsonl", "fine-tune", chat(n=1) + b"{\n[1]\n", max_bytes=10_000)
    with pytest.raises(ValidationError, match="purpose 'assistants'"):
        reg.files.create("acme", "t.jsonl", "assistants", chat(), max_bytes=10_000)
    with pytest.raises(ValidationError, match="JSONL"):
        reg.files.create("acme", "t.csv", "fine-tune", chat(), max_bytes=10_000)
    with pytest.raises(TooLargeError, match="10-byte limit"):
        reg.files.create("acme", "t.jsonl", "fine-tune", chat(), max_bytes=10)
    assert set(b for b, _ in reg.store.list_blobs()) == blobs
    assert reg.files.list("acme") == []


def test_garbage_collection_keeps_files_and_checkpoints_but_not_deleted_files(reg, tmp_path) -> None:
    kept, gone = upload(reg), upload(reg, chat("Other."))
    job = create(reg, training_file=kept)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"checkpoint weights")
    digest = sha256_file(weights)
    reg.store.put(weights, digest)
    reg.job_queue.add_checkpoint(job.id, 4, 1, {"train_loss": 1.0}, {"adapter_model.safetensors": digest})
    gone_sha = reg.files.delete("acme", gone).sha256
    report = reg.collect_garbage(grace=timedelta(0))
    assert report.orphans == [gone_sha]
    assert reg.files.read("acme", kept) == chat() and reg.store.exists(digest)


# -- jobs ----------------------------------------------------------------------------------

def test_a_job_request_is_checked_whole_before_it_queues(reg) -> None:
    dpo_file = upload(reg, preference(), name="prefs.jsonl")
    with pytest.raises(ValidationError) as err:
        create(reg, training_file=dpo_file, hyperparameters={"n_epochs": 0, "lora_alpha": 32,
                                                             "beta": 0.1, "batch_size": "auto"},
               suffix="Not A Name", validation_file="file-nope")
    message = str(err.value)
    for part in ("preference pairs", "hyperparameters.n_epochs", "shape",
                 "hyperparameters.beta: not a supervised", "suffix", "validation_file: no such file"):
        assert part in message, part
    assert "hyperparameters.batch_size" not in message  # "auto" is always fine
    with pytest.raises(NotFoundError):
        create(reg, model="support-bot-nope", training_file=upload(reg))
    with pytest.raises(NotFoundError):  # another tenant's adapter is 404, never 403
        create(reg, model="pirate", training_file=upload(reg))
    assert reg.jobs.list("acme") == ([], False)


def test_a_job_continues_the_tenants_own_adapter_and_names_its_result(reg) -> None:
    job = create(reg, model="support-bot", training_file=upload(reg, preference(), name="p.jsonl"),
                 method="dpo", hyperparameters={"beta": 0.2, "n_epochs": 2}, suffix="support-bot",
                 metadata={"team": "a"})
    assert job.init_version == "acme/support-bot@v1" and job.adapter_name == "support-bot"
    out = job.as_openai()
    assert out["status"] == "validating_files" and out["object"] == "fine_tuning.job"
    assert out["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto", "beta": 0.2}}}
    assert reg.jobs.list("acme", metadata={"team": "a"})[0][0].id == job.id
    assert reg.jobs.list("acme", metadata={"team": "b"})[0] == []
    other = create(reg, training_file=upload(reg))
    assert other.adapter_name.startswith("ft-")


def test_waiting_jobs_are_limited_per_tenant_with_a_retry_after(reg) -> None:
    file_id = upload(reg)
    for _ in range(3):
        create(reg, training_file=file_id)
    with pytest.raises(LimitReachedError) as err:
        create(reg, training_file=file_id)
    assert err.value.retry_after > 0
    create(reg, "globex", training_file=upload(reg, tenant="globex"))  # its own limit


def claim(reg, worker: str = "w1", lease_s: float = 30.0):
    return reg.job_queue.claim(worker, template_ids=[reg.catalog.templates()[0][1].template_id],
                               lease_s=lease_s)


def test_a_worker_validates_then_runs_then_publishes_and_the_events_tell_it(reg) -> None:
    job = create(reg, training_file=upload(reg))
    got = claim(reg)
    assert got.id == job.id and got.status == "validating_files"
    assert claim(reg, "w2") is None, "a claimed validation is not handed out twice"
    assert reg.job_queue.validated(job.id, "w1", trained_tokens=120)
    running = claim(reg, "w2")
    assert running.status == "running" and running.worker == "w2"
    assert reg.job_queue.heartbeat(job.id, "w2", 30) and not reg.job_queue.heartbeat(job.id, "w1", 30)
    reg.job_queue.event(job.id, "Epoch 1", type="metrics", data={"step": 1, "train_loss": 2.0})
    assert reg.job_queue.begin_publish(job.id, "w2")
    with pytest.raises(ConflictError, match="publishing"):
        reg.jobs.cancel("acme", job.id)
    reg.job_queue.succeed(job.id, "w2", "support-bot@v2")
    done = reg.jobs.get("acme", job.id)
    assert (done.status, done.fine_tuned_model, done.trained_tokens) == ("succeeded", "support-bot@v2", 120)
    events, more = reg.jobs.events("acme", job.id, limit=3)
    assert events[0].message == "The job has successfully completed" and more
    older, _ = reg.jobs.events("acme", job.id, after=f"ftevent-{events[-1].id}", limit=50)
    assert older[-1].message.startswith("Validating training file")
    with pytest.raises(NotFoundError):
        reg.jobs.events("globex", job.id)


def test_the_operator_sees_the_queue_in_the_order_workers_take_it(reg, registry_env,
                                                                  capsys) -> None:
    first = create(reg, training_file=upload(reg))
    claim(reg)
    reg.job_queue.validated(first.id, "w1", 10)  # queued
    second = create(reg, "globex", training_file=upload(reg, tenant="globex"))  # validating
    done = create(reg, training_file=upload(reg))
    reg.jobs.cancel("acme", done.id)
    assert [j.id for j in reg.job_queue.pending()] == [second.id, first.id]
    assert [j.id for j in reg.job_queue.pending(tenant="acme")] == [first.id]
    assert reg.job_queue.depth() == {"validating_files": 1, "queued": 1, "running": 0}
    with pytest.raises(ValidationError, match="limit 0"):
        reg.job_queue.pending(limit=0)
    from lora_gateway.cli import main
    common = ["--db", registry_env.db_url, "--artifacts", str(registry_env.artifacts)]
    assert main(["registry", "jobs", *common]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "validating_files 1, queued 1, running 0"
    assert out[1].startswith(f"{second.id}\tglobex\tvalidating_files") and first.id in out[2]
    assert main(["registry", "jobs", "--format", "json", "--tenant", "acme", *common]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [j["id"] for j in doc["jobs"]] == [first.id] and doc["depth"]["queued"] == 1
    assert main(["registry", "jobs", "--limit", "0", *common]) != 0
    err = capsys.readouterr().err
    assert "limit 0 is outside 1..1000" in err and "Traceback" not in err


def test_cancel_is_at_once_and_the_worker_learns_it_on_its_next_heartbeat(reg) -> None:
    queued = create(reg, training_file=upload(reg))
    assert reg.jobs.cancel("acme", queued.id).status == "cancelled"
    assert claim(reg) is None
    with pytest.raises(ConflictError, match="already cancelled"):
        reg.jobs.cancel("acme", queued.id)
    job = create(reg, training_file=upload(reg))
    claim(reg)
    reg.job_queue.validated(job.id, "w1", 10)
    claim(reg)
    assert reg.jobs.cancel("acme", job.id).status == "cancelled"
    assert not reg.job_queue.heartbeat(job.id, "w1", 30)
    assert not reg.job_queue.begin_publish(job.id, "w1"), "a cancelled job publishes nothing"
    assert not reg.job_queue.fail(job.id, "w1", "x", "late"), "nor is it failed afterwards"


def test_a_lost_worker_s_validation_is_retried_and_its_run_resumes_once_then_fails(reg) -> None:
    a, b = (create(reg, training_file=upload(reg)) for _ in range(2))
    claim(reg)
    reg.job_queue.validated(a.id, "w1", 10)
    assert claim(reg, lease_s=0.0).id == b.id  # w1 validates b, then dies
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert reg.job_queue.reap(later) == 1
    assert claim(reg, "w2").id == b.id, "the validation is handed to the next worker"
    run = claim(reg, "w3", lease_s=0.0)
    assert run.id == a.id
    reg.job_queue.add_checkpoint(a.id, 3, 1, {"train_loss": 1.5}, {})
    reg.job_queue.reap(datetime.now(UTC) + timedelta(seconds=1))
    requeued = reg.jobs.get("acme", a.id)
    assert (requeued.status, requeued.worker) == ("queued", None)
    assert "queued again to resume from its last checkpoint" in reg.jobs.events("acme", a.id)[0][0].message
    assert claim(reg, "w4", lease_s=0.0).id == a.id  # the second attempt, lost again
    reg.job_queue.reap(datetime.now(UTC) + timedelta(seconds=1))
    failed = reg.jobs.get("acme", a.id)
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"
    message = failed.error["message"]
    assert "after epoch 1" in message and "attempt 2 of 2" in message and "nothing was published" in message
    assert [c.step for c in reg.jobs.checkpoints("acme", a.id)[0]] == [3]


def test_a_worker_lost_after_its_push_leaves_a_succeeded_job_not_a_failed_one(
        reg, trained_adapters, tmp_path) -> None:
    import shutil

    from adapters_registry import AdapterManifest
    from adapters_registry.job_queue import JOB_KEY

    def lost_while_publishing(suffix: str):
        job = create(reg, training_file=upload(reg), suffix=suffix)
        claim(reg)
        reg.job_queue.validated(job.id, "w1", 10)
        claim(reg, "w2", lease_s=0.0)
        assert reg.job_queue.begin_publish(job.id, "w2")
        return job

    pushed = lost_while_publishing("helper")
    out = tmp_path / "out"
    shutil.copytree(trained_adapters["acme"], out)
    manifest = AdapterManifest.read(out)
    AdapterManifest(**{**manifest.__dict__, "metrics": {**manifest.metrics, JOB_KEY: pushed.id}}).write(out)
    version = reg.push("acme", "helper", out)  # then the worker died before it said so
    unpushed = lost_while_publishing("other")
    reg.job_queue.reap(datetime.now(UTC) + timedelta(seconds=1))  # (claims reap too)
    done = reg.jobs.get("acme", pushed.id)
    assert (done.status, done.fine_tuned_model) == ("succeeded", f"helper@v{version.version}")
    assert "after it had published helper@v1" in reg.jobs.events("acme", pushed.id, limit=5)[0][2].message
    failed = reg.jobs.get("acme", unpushed.id)
    assert failed.status == "failed" and "no version was published" in failed.error["message"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_workers_claim_in_parallel_on_postgres_without_breaking_a_tenants_running_limit(reg) -> None:
    limits = JobLimits(max_queued_jobs=None, max_running_jobs=2, max_training_tokens=None)
    base = reg.catalog.templates()[0][0].model_id
    jobs = []
    for tenant in ("acme", "globex"):
        file_id = upload(reg, tenant=tenant)
        for _ in range(4):
            job = reg.jobs.create(tenant, JobRequest(model=base, training_file=file_id),
                                  base_model_id=base, base_names=(base,), limits=limits)
            jobs.append(job.id)
    for _ in jobs:  # validations come first: each job is validated once
        job = claim(reg, "validator")
        assert job.status == "validating_files"
        reg.job_queue.validated(job.id, "validator", 10)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := claim(reg, name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == len(set(claimed)), "no job was claimed twice"
    per_tenant = {"acme": 0, "globex": 0}
    for tenant in per_tenant:
        for job in reg.jobs.list(tenant)[0]:
            per_tenant[tenant] += job.status == "running"
    assert per_tenant == {"acme": 2, "globex": 2}, "each tenant runs at most its limit, and uses it"


def test_a_job_from_the_base_trains_its_frozen_template_even_beside_others(reg, registry_env) -> None:
    from adapters_registry import AdapterTemplate

    first = registry_env.template.template_id
    contract = registry_env.contract
    wider = reg.register_template(AdapterTemplate(contract.model_id, contract.revision, r=16, lora_alpha=32))
    file_id = upload(reg)
    assert create(reg, training_file=file_id).template_id == first
    base = contract.model_id
    chosen = reg.jobs.create("acme", JobRequest(model=base, training_file=file_id), base_model_id=base,
                             base_names=(base,), limits=LIMITS, template_id=wider.template_id)
    assert chosen.template_id == wider.template_id
    with pytest.raises(NotFoundError, match="not one of base"):
        reg.jobs.create("acme", JobRequest(model=base, training_file=file_id), base_model_id=base,
                        base_names=(base,), limits=LIMITS, template_id="tpl-nope")


def test_eval_files_are_the_tenants_chat_files_and_their_gates_need_them(reg) -> None:
    prefs = upload(reg, preference(), name="p.jsonl")
    with pytest.raises(ValidationError) as err:
        create(reg, training_file=upload(reg), gates={"golden_min_score": 0.5, "regression_max_kl": 0.1},
               eval_files={"golden_file": prefs, "bogus_file": "x"})
    message = str(err.value)
    assert "gates.golden_file " in message and "preference pairs" in message
    assert "gates.bogus_file: not an eval file" in message
    assert "the regression gates need gates.regression_file" in message
    with pytest.raises(ValidationError, match=r"gates\.regression_file: no such file"):
        create(reg, training_file=upload(reg), eval_files={"regression_file": "file-gone"})
    job = create(reg, training_file=upload(reg), eval_files={"golden_file": upload(reg)})
    assert set(job.eval_files) == {"golden_file"}
