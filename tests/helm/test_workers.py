"""Fine-tuning workers (issue 26, item 5): their own Deployment running a `lora-gateway
worker` the real CLI accepts, on the gateway's database, store, secrets and base, scaled by
KEDA on the jobs table through a TriggerAuthentication; off by default."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import sqlalchemy as sa

from adapters_registry.db import BaseModelRow, JobRow, TemplateRow
from adapters_registry.job_records import ACTIVE, FINISHED
from lora_gateway.cli import build_parser
from tests.helm.chart import (
    CHART,
    KUBE_VERSIONS,
    MINIMAL,
    Manifest,
    env_of,
    gateway_container,
    merged,
    profile,
    render,
    the,
    validate,
    worker_container,
)

WORKERS = {"worker": {"enabled": True}}
KEDA = {"worker": {"enabled": True, "keda": {"enabled": True, "connection": {"existingSecret": "lgw-keda"}}}}
S3_BASE = {"model": {"source": "s3", "s3": {"uri": "s3://b/bases/tiny/"}},
           "registry": {"s3EndpointUrl": "http://minio:9000", "s3Region": "eu-west-1"}}
# What the Secrets would hold, by the variable they feed.
SECRET_VALUES = {"LGW_DATABASE_URL": "postgresql+psycopg://lgw:pw@db:5432/lgw"}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "gpu": profile("values-gpu.yaml"),
    "cpu-dev": profile("values-cpu-dev.yaml"),
    "keda, s3 base, extras": merged(MINIMAL, KEDA, S3_BASE, {"worker": {
        "extraArgs": ["--once"], "leaseSeconds": 45, "pollSeconds": 0.5,
        "keda": {"scaleDownOnlyWhenIdle": False, "minReplicaCount": 1},
        "nodeSelector": {"pool": "train"}, "priorityClassName": "training"}}),
}


def _workers(objects: list[Manifest]) -> list[Manifest]:
    return [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]


def _pod(objects: list[Manifest], component: str) -> dict[str, Any]:
    spec: dict[str, Any] = the(objects, "Deployment", component)["spec"]["template"]["spec"]
    return spec


def _parse(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The container's command as the real CLI parses it in that container's environment
    (the registry options read LGW_* when the parser is built)."""
    assert container["command"] == ["lora-gateway"]
    for name in [n for n in os.environ if n.startswith("LGW_")]:
        monkeypatch.delenv(name)
    for name, env in env_of(container).items():
        if name.startswith("LGW_"):
            monkeypatch.setenv(name, env["value"] if "value" in env else SECRET_VALUES[name])
    return build_parser().parse_args(container["args"])  # SystemExit on any unknown flag


def test_workers_are_off_by_default() -> None:
    assert _workers(render(MINIMAL)) == []
    # KEDA for workers that are not enabled renders nothing either (and needs no Secret).
    assert _workers(render(merged(MINIMAL, {"worker": {"keda": {"enabled": True}}}))) == []
    assert len(_workers(render(merged(MINIMAL, WORKERS)))) == 1


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_worker_object_is_valid(name: str, kube_version: str) -> None:
    workers = _workers(render(VALUE_SETS[name]))
    values = VALUE_SETS[name]
    keda = values["worker"].get("keda", {}).get("enabled")
    expected = ({"Deployment"} | ({"ScaledObject", "TriggerAuthentication"} if keda else set())
                | ({"NetworkPolicy"} if values.get("networkPolicy", {}).get("enabled") else set()))
    assert {o["kind"] for o in workers} == expected
    for obj in workers:
        validate(obj, kube_version)  # custom resources against the vendored KEDA CRDs


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_worker_runs_a_real_command_on_the_gateways_base(name: str, monkeypatch) -> None:
    values = VALUE_SETS[name]
    objects = render(values)
    args_of_gateway = gateway_container(objects)["args"]
    gateway = dict(zip(args_of_gateway[1::2], args_of_gateway[2::2], strict=True))  # serve --flag value ...
    container = worker_container(objects)
    args = _parse(container, monkeypatch)
    assert args.command == "worker"
    assert (args.base, str(args.base_dir)) == (gateway["--base-model-id"], gateway["--base-model-dir"])
    assert (args.base, args.base_dir) == (values["model"]["id"], Path("/models/base"))
    assert args.artifacts == gateway["--artifacts-dir"]
    assert args.s3_endpoint == gateway.get("--s3-endpoint-url")
    assert args.artifacts == values["registry"]["artifacts"]
    assert args.db == SECRET_VALUES["LGW_DATABASE_URL"]  # from the Secret, as the gateway's
    assert args.s3_region == values["registry"].get("s3Region", "us-east-1")
    worker = values["worker"]
    assert args.lease_seconds == worker.get("leaseSeconds", 30)
    assert args.poll_seconds == worker.get("pollSeconds", 2)
    assert args.once is ("--once" in worker.get("extraArgs", []))
    # Named by its pod: Kubernetes expands $(POD_NAME) from the downward API.
    assert args.name == "$(POD_NAME)"
    assert env_of(container)["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(args.base_dir)] == "base-model" and mounts[str(args.scratch)] == "scratch"


def test_worker_sees_the_gateways_database_store_and_base() -> None:
    for values in (*VALUE_SETS.values(), merged(MINIMAL, WORKERS, {"model": {"pvc": {"subPath": "tiny"}}})):
        objects = render(values)
        gateway, worker = env_of(gateway_container(objects)), env_of(worker_container(objects))
        for name in ("LGW_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LGW_S3_REGION"):
            assert worker[name] == gateway[name], name
        assert worker["LGW_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "lgw-database", "key": "database-url"}
        gateway_pod, worker_pod = _pod(objects, "gateway"), _pod(objects, "worker")
        assert worker_pod["serviceAccountName"] == gateway_pod["serviceAccountName"]

        def base(pod: dict[str, Any]) -> tuple[Any, ...]:
            (volume,) = [v for v in pod["volumes"] if v["name"] == "base-model"]
            (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == "base-model"]
            return volume, mount, pod.get("initContainers")

        assert base(worker_pod) == base(gateway_pod)  # the same claim, or the same fetch from S3
    ambient = merged(MINIMAL, WORKERS,
                     {"secrets": {"s3": {"existingSecret": "", "ambientCredentials": True}}})
    assert "AWS_SECRET_ACCESS_KEY" not in env_of(worker_container(render(ambient)))


def test_keda_scales_workers_on_waiting_and_running_jobs() -> None:
    objects = render(merged(MINIMAL, KEDA, {"worker": {"keda": {"maxReplicaCount": 3}}}))
    scaled = the(objects, "ScaledObject", "worker")
    deployment = the(objects, "Deployment", "worker")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": deployment["metadata"]["name"]}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 3)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert trigger["metadata"]["targetQueryValue"] == "1"  # one job per worker
    auth = the(objects, "TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    # The connection string comes from a Secret, never from values.
    assert auth["spec"] == {"secretTargetRef": [{"parameter": "connection", "name": "lgw-keda",
                                                 "key": "connection"}]}
    assert "connection" not in trigger["metadata"] and "connectionFromEnv" not in trigger["metadata"]
    assert _count(trigger["metadata"]["query"]) == len(ACTIVE)
    # KEDA owns the replica count; without KEDA the values do.
    assert "replicas" not in deployment["spec"]
    plain = the(render(merged(MINIMAL, WORKERS, {"worker": {"replicaCount": 3}})), "Deployment", "worker")
    assert plain["spec"]["replicas"] == 3


def _count(query: str) -> int:
    """What ``query`` counts over one job in each state for MINIMAL's base, and one in each
    state for another base, on the registry's own tables."""
    engine = sa.create_engine("sqlite://")
    for row in (BaseModelRow, TemplateRow, JobRow):
        row.__table__.create(engine)  # type: ignore[attr-defined]
    with engine.begin() as db:
        for base_id, (model_id, template) in enumerate([(MINIMAL["model"]["id"], "t"),
                                                         ("o'ther", "u")], start=1):
            db.execute(sa.insert(BaseModelRow).values(id=base_id, model_id=model_id, revision="r",
                                                      contract={}, created_at=datetime.now(UTC)))
            db.execute(sa.insert(TemplateRow).values(template_id=template, base_id=base_id, fields={},
                                                     created_at=datetime.now(UTC)))
            for i, status in enumerate((*ACTIVE, *FINISHED)):
                db.execute(sa.insert(JobRow).values(
                    id=f"ftjob-{template}{i}", tenant_id=1, model="acme/bot", template_id=template,
                    method="supervised", hyperparameters={}, training_file="file-1", seed=0, extra={},
                    status=status, cancel_requested=False, created_at=datetime.now(UTC)))
        return int(db.execute(sa.text(query)).scalar_one())


def test_the_default_query_counts_only_this_bases_jobs_and_quotes_its_name() -> None:
    other = merged(MINIMAL, KEDA, {"model": {"id": "o'ther"}})
    (trigger,) = the(render(other), "ScaledObject", "worker")["spec"]["triggers"]
    assert _count(trigger["metadata"]["query"]) == len(ACTIVE)  # the other base's, not both
    mine = "SELECT count(*) FROM fine_tuning_jobs WHERE status IN ('validating_files','queued','running')"
    custom = merged(MINIMAL, KEDA, {"worker": {"keda": {"query": mine}}})
    (trigger,) = the(render(custom), "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["metadata"]["query"] == mine and _count(mine) == 2 * len(ACTIVE)


def test_the_query_check_catches_a_query_that_misses_running_jobs() -> None:
    # two bases' jobs, each missing its running one
    assert _count("SELECT count(*) FROM fine_tuning_jobs WHERE status IN ('validating_files','queued')") \
        == 2 * (len(ACTIVE) - 1)


def test_busy_workers_are_removed_only_by_scaling_to_zero() -> None:
    scaled = the(render(merged(MINIMAL, KEDA)), "ScaledObject", "worker")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == {"scaleDown": {"selectPolicy": "Disabled"}}
    assert scaled["spec"]["minReplicaCount"] == 0 and scaled["spec"]["cooldownPeriod"] == 300
    free = the(render(merged(MINIMAL, KEDA, {"worker": {"keda": {"scaleDownOnlyWhenIdle": False}}})),
               "ScaledObject", "worker")
    assert "advanced" not in free["spec"]


def _render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as err:
        render(values)
    return str(err.value)


def test_keda_without_the_connection_secret_fails_with_what_to_create() -> None:
    values = merged(MINIMAL, KEDA, {"worker": {"keda": {"connection": {"existingSecret": ""}}}})
    error = _render_error(values)
    assert "worker.keda.connection.existingSecret is required when worker.keda.enabled" in error
    assert "kubectl create secret generic" in error and "postgresql+psycopg://" in error


@pytest.mark.parametrize(("values", "message"), [
    (merged(MINIMAL, WORKERS, {"secrets": {"database": {"existingSecret": ""}}}),
     "secrets.database.existingSecret is required"),
    (merged(MINIMAL, WORKERS, {"model": {"source": "s3"}}),
     "model.s3.uri is required when model.source is s3"),
    (merged(MINIMAL, WORKERS, {"image": {"flavor": "cpu"}, "gpu": {"count": 0}}),
     "worker.gpu.count must be 0 with image.flavor cpu"),
    (merged(MINIMAL, WORKERS, {"worker": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}),
     "worker.resources.limits must not name nvidia.com/gpu"),
    (merged(MINIMAL, KEDA, {"worker": {"keda": {"minReplicaCount": 3, "maxReplicaCount": 2,
                                                "scaleDownOnlyWhenIdle": False}}}),
     "worker.keda.minReplicaCount must not exceed worker.keda.maxReplicaCount"),
    (merged(MINIMAL, KEDA, {"worker": {"keda": {"minReplicaCount": 1}}}),
     "worker.keda.scaleDownOnlyWhenIdle needs worker.keda.minReplicaCount=0"),
])
def test_inconsistent_worker_values_fail_rendering_with_what_to_set(values: dict[str, Any],
                                                                    message: str) -> None:
    assert message in _render_error(values)


def test_workers_train_on_one_gpu_or_on_cpus() -> None:
    gpu = render(profile("values-gpu.yaml"))
    resources = worker_container(gpu)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    pod = _pod(gpu, "worker")
    assert pod["runtimeClassName"] == "nvidia" and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert worker_container(gpu)["image"] == gateway_container(gpu)["image"]
    cpu = render(profile("values-cpu-dev.yaml"))
    resources = worker_container(cpu)["resources"]
    assert "nvidia.com/gpu" not in resources["requests"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})
    assert worker_container(cpu)["image"].endswith(":0.1.0-cpu")
    own = render(merged(MINIMAL, WORKERS, {"worker": {"image": {"repository": "reg/trainer", "tag": "7"}}}))
    assert worker_container(own)["image"] == "reg/trainer:7"


def test_worker_pods_are_hardened_and_serve_nothing() -> None:
    objects = render(merged(MINIMAL, WORKERS, {"worker": {"terminationGracePeriodSeconds": 90}}))
    pod, container = _pod(objects, "worker"), worker_container(objects)
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["terminationGracePeriodSeconds"] == 90
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {"/models/base", "/scratch", "/tmp"} and mounts["/models/base"]["readOnly"] is True
    assert not {"ports", "livenessProbe", "readinessProbe", "startupProbe"} & set(container)
    # A replacement needs a GPU of its own: one out before one in.
    strategy = the(objects, "Deployment", "worker")["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


@pytest.mark.parametrize(("bad", "words"), [
    ({"worker": {"keda": {"connection": {"password": "hunter2"}}}},
     ["/worker/keda/connection", "additional properties 'password' not allowed"]),
    ({"worker": {"gpu": {"count": 2}}}, ["/worker/gpu/count", "maximum"]),
    ({"worker": {"leaseSeconds": 0}}, ["/worker/leaseSeconds"]),
    ({"worker": {"keda": {"targetQueryValue": 1}}}, ["/worker/keda/targetQueryValue", "string"]),
    ({"worker": {"keda": {"query": 7}}}, ["/worker/keda/query"]),
])
def test_schema_refuses_bad_worker_values(bad: dict[str, Any], words: list[str]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(merged(MINIMAL, bad))
    for word in words:
        assert word in str(err.value), str(err.value)
