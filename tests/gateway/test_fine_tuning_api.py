"""OpenAI's files and fine-tuning jobs API through the official SDK (issue 26): a tenant
uploads, creates a job, follows its events, and calls the model a worker published;
every bad input is refused with OpenAI's envelope and keeps nothing; tenants never see
each other's files or jobs."""

from __future__ import annotations

import io
import json

import openai
import pytest

from adapters_registry import TenantLimits
from tests.conftest import PROMPTS
from tests.gateway.conftest import Gateway
from trainer.worker import Worker, WorkerOptions


def sdk(gw: Gateway, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(api_key=gw.env.keys[tenant], base_url="http://testserver/v1",
                         http_client=gw.client, max_retries=0)


def chat_lines(answer: str = "Helpdesk here.") -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": p},
                                            {"role": "assistant", "content": answer}]}) + "\n"
                   for p in (*PROMPTS, "Any news?", "Status?", "Ping?", "Update?")).encode()


def upload(client: openai.OpenAI, data: bytes | None = None, name: str = "train.jsonl"):
    return client.files.create(file=(name, io.BytesIO(data or chat_lines())), purpose="fine-tune")


def test_files_round_trip_per_tenant(gw: Gateway) -> None:
    acme, globex = sdk(gw), sdk(gw, "globex")
    f = upload(acme)
    assert (f.object, f.purpose, f.bytes, f.filename, f.status) == (
        "file", "fine-tune", len(chat_lines()), "train.jsonl", "processed")
    assert [x.id for x in acme.files.list()] == [f.id]
    assert acme.files.retrieve(f.id).id == f.id
    assert acme.files.content(f.id).content == chat_lines()
    for call in (globex.files.retrieve, globex.files.content, globex.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(f.id)
    assert list(globex.files.list()) == []
    assert acme.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(f.id)


def test_a_bad_file_is_refused_with_every_line_and_nothing_is_kept(gw: Gateway) -> None:
    acme = sdk(gw)
    bad = chat_lines() + b"{oops\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode()
    with pytest.raises(openai.BadRequestError) as err:
        upload(acme, bad)
    message = err.value.body["message"]
    assert "line 9: invalid JSON" in message and "line 10" in message
    with pytest.raises(openai.BadRequestError, match="purpose"):
        acme.files.create(file=("t.jsonl", io.BytesIO(chat_lines())), purpose="assistants")
    with pytest.raises(openai.BadRequestError, match="JSONL"):
        upload(acme, name="train.csv")
    gw.env.registry.set_limits("acme", TenantLimits(max_file_bytes=100))
    with pytest.raises(openai.APIStatusError) as err:
        upload(acme)
    assert err.value.status_code == 413
    assert list(acme.files.list()) == []
    r = gw.client.post("/v1/files", headers=gw.headers("acme"), content=b"x")
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]


def test_job_requests_are_checked_and_the_queue_is_limited(gw: Gateway) -> None:
    acme = sdk(gw)
    f = upload(acme)
    with pytest.raises(openai.BadRequestError) as err:
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                     method={"type": "supervised", "supervised": {"hyperparameters": {
                                         "n_epochs": 0, "lora_r": 64}}})
    assert "hyperparameters.n_epochs" in err.value.body["message"]
    assert "shape" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        acme.fine_tuning.jobs.create(model="pirate", training_file=f.id)  # globex's adapter
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: rank"):
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, extra_body={"rank": 8})
    gw.env.registry.set_limits("acme", TenantLimits(max_queued_jobs=2))
    jobs = [acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, metadata={"n": str(i)})
            for i in range(2)]
    with pytest.raises(openai.RateLimitError) as err:
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    assert int(err.value.response.headers["retry-after"]) > 0
    page = acme.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [jobs[1].id] and page.has_more
    assert [j.id for j in acme.fine_tuning.jobs.list(after=jobs[1].id)] == [jobs[0].id]
    assert acme.fine_tuning.jobs.cancel(jobs[0].id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        acme.fine_tuning.jobs.cancel(jobs[0].id)
    with pytest.raises(openai.NotFoundError):
        sdk(gw, "globex").fine_tuning.jobs.retrieve(jobs[1].id)


def test_the_sdk_drives_the_whole_loop_to_a_model_it_can_call(gw: Gateway, tmp_path) -> None:
    acme = sdk(gw)
    f, held_out = upload(acme), upload(acme, chat_lines("Helpdesk: fine."), name="held-out.jsonl")
    job = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, suffix="helpdesk",
                                       validation_file=held_out.id,
                                       method={"type": "supervised", "supervised": {
                                           "hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
                                       extra_body={"gates": {"max_val_perplexity": 1e9}})
    assert job.status == "validating_files"
    assert job.method.type == "supervised" and job.hyperparameters.n_epochs == 2
    env = gw.env
    worker = Worker(env.registry, WorkerOptions("w1", env.base.path, env.contract.model_id,
                                                heartbeat_s=0.2, scratch=tmp_path))
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "validating_files"
    worker.run_once()
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "queued"
    worker.run_once()
    done = acme.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "helpdesk@v1" and done.trained_tokens > 0
    events = acme.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed"
    assert sum(e.type == "metrics" for e in events) == 2
    checkpoints = acme.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == sorted((c.step_number for c in checkpoints), reverse=True)
    assert len(checkpoints) == 2 and checkpoints[0].metrics.train_loss is not None
    assert "helpdesk" in {m.id for m in acme.models.list()}
    answer = acme.chat.completions.create(model=done.fine_tuned_model,
                                          messages=[{"role": "user", "content": "Status?"}])
    assert answer.model == done.fine_tuned_model
    assert not {m.id for m in sdk(gw, "globex").models.list()} & {"helpdesk", "helpdesk@v1"}


def test_gates_are_a_documented_object_and_eval_files_are_the_tenants(gw: Gateway) -> None:
    acme = sdk(gw)
    f = upload(acme)
    with pytest.raises(openai.BadRequestError) as err:
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                     extra_body={"gates": {"max_val_perplexity": 2, "min_vibes": 1}})
    assert err.value.body["param"] == "gates.min_vibes" or "min_vibes" in err.value.body["message"]
    other = upload(sdk(gw, "globex"))
    with pytest.raises(openai.BadRequestError, match="no such file"):
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                     extra_body={"gates": {"golden_file": other.id}})
    job = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                       extra_body={"gates": {"golden_file": f.id, "golden_min_score": 0.5}})
    assert job.status == "validating_files"
    schema = gw.client.get("/openapi.json").json()["components"]["schemas"]["JobGates"]
    assert {"golden_file", "regression_file", "max_val_perplexity"} <= set(schema["properties"])


ADMIN = "lgw-admin-" + "q" * 32


def test_the_admin_api_shows_every_tenants_queue(gateway_factory) -> None:
    gw = gateway_factory(admin_api_key=ADMIN)
    acme, globex = sdk(gw), sdk(gw, "globex")
    first = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=upload(acme).id)
    second = globex.fine_tuning.jobs.create(model="tiny-llama", training_file=upload(globex).id)
    admin = {"Authorization": "Bearer " + ADMIN}
    r = gw.client.get("/admin/v1/fine_tuning/jobs", headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(j["id"], j["tenant"]) for j in body["data"]] == [(first.id, "acme"), (second.id, "globex")]
    assert body["depth"] == {"validating_files": 2, "queued": 0, "running": 0}
    only = gw.client.get("/admin/v1/fine_tuning/jobs?tenant=globex", headers=admin).json()
    assert [j["id"] for j in only["data"]] == [second.id]
    bad = gw.client.get("/admin/v1/fine_tuning/jobs?limit=5000", headers=admin)
    assert bad.status_code == 400 and "limit 5000" in bad.text
    assert gw.client.get("/admin/v1/fine_tuning/jobs", headers=gw.headers("acme")).status_code in (401, 403)
