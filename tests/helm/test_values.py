"""Values: secrets only by reference (a missing one fails with a clear message), bad values
refused by the schema in words an operator can act on, and the schema kept in step with
values.yaml."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.helm.chart import CHART, MINIMAL, PROFILES, merged, profile, render, schema

SECRET_ENV = {"LGW_DATABASE_URL", "LGW_REDIS_URL", "LGW_ADMIN_API_KEY", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY"}


def _without(values: dict[str, Any], *path: str) -> dict[str, Any]:
    out = merged(values)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = ""
    return out


def _render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as err:
        render(values)
    return str(err.value)


@pytest.mark.parametrize(("values", "message"), [
    (_without(MINIMAL, "secrets", "database", "existingSecret"),
     "secrets.database.existingSecret is required: create a Secret holding the registry's SQLAlchemy URL"),
    (_without(MINIMAL, "secrets", "s3", "existingSecret"),
     "secrets.s3.existingSecret is required: create a Secret with AWS_ACCESS_KEY_ID and "
     "AWS_SECRET_ACCESS_KEY"),
    (merged(MINIMAL, {"replicaCount": 2}),
     "secrets.redis.existingSecret is required when more than one replica can run"),
    (merged(MINIMAL, {"autoscaling": {"keda": {"enabled": True}}}),
     "secrets.redis.existingSecret is required when more than one replica can run"),
    (merged(MINIMAL, {"autoscaling": {"hpa": {"enabled": True}}}),
     "secrets.redis.existingSecret is required when more than one replica can run"),
])
def test_missing_secret_fails_rendering_with_what_to_create(values: dict[str, Any], message: str) -> None:
    error = _render_error(values)
    assert message in error
    assert "kubectl create secret generic" in error


@pytest.mark.parametrize(("values", "message"), [
    (_without(MINIMAL, "model", "id"), "model.id is required"),
    (_without(MINIMAL, "registry", "artifacts"), "registry.artifacts is required and must be s3://"),
    (_without(MINIMAL, "model", "pvc", "claimName"),
     "model.pvc.claimName is required when model.source is pvc"),
    (merged(MINIMAL, {"model": {"source": "s3"}}), "model.s3.uri is required when model.source is s3"),
    (merged(MINIMAL, {"engine": {"maxLoras": 8, "maxCpuLoras": 4}}),
     "engine.maxCpuLoras (4) must be at least engine.maxLoras (8)"),
    (merged(MINIMAL, {"gpu": {"count": 0}}), "image.flavor gpu needs gpu.count >= 1"),
    (merged(MINIMAL, {"image": {"flavor": "cpu"}}), "image.flavor cpu cannot use GPUs"),
    (merged(MINIMAL, {"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}},
                      "secrets": {"redis": {"existingSecret": "r"}}}),
     "enable at most one of autoscaling.hpa and autoscaling.keda"),
    (merged(MINIMAL, {"adapterCache": {"type": "pvc", "pvc": {"claimName": "c"}}, "replicaCount": 2,
                      "secrets": {"redis": {"existingSecret": "r"}}}),
     "adapterCache.type pvc serves one replica only"),
    (merged(MINIMAL, {"inferencePool": {"enabled": True}}),
     "inferencePool.endpointPicker.serviceName is required"),
    (merged(MINIMAL, {"gateway": {"extraEnv": [{"name": "LGW_DATABASE_URL", "value": "postgresql://x"}]}}),
     "gateway.extraEnv must not set LGW_DATABASE_URL"),
    (merged(MINIMAL, {"gateway": {"extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "k"}]}}),
     "must not carry AWS_SECRET_ACCESS_KEY in plain values"),
    (merged(MINIMAL, {"resources": {"limits": {"nvidia.com/gpu": 1}}}),
     "resources.limits must not name nvidia.com/gpu: set the GPUs per pod in gpu.count"),
    (merged(MINIMAL, {"autoscaling": {"keda": {"enabled": True}},
                      "secrets": {"redis": {"existingSecret": "r"}}}),
     "autoscaling.keda's default query reads what the ServiceMonitor scrapes"),
])
def test_inconsistent_values_fail_rendering_with_what_to_set(values: dict[str, Any], message: str) -> None:
    assert message in _render_error(values)


def test_workload_identity_needs_no_s3_secret() -> None:
    values = merged(_without(MINIMAL, "secrets", "s3", "existingSecret"),
                    {"secrets": {"s3": {"ambientCredentials": True}}})
    for obj in render(values):
        assert "AWS_SECRET_ACCESS_KEY" not in yaml.safe_dump(obj)


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


@pytest.mark.parametrize("name", PROFILES)
def test_secrets_come_only_from_secret_references(name: str) -> None:
    seen = set()
    for obj in render(profile(name)):
        assert obj["kind"] != "Secret"  # the chart never creates one
        for container in _containers(obj):
            for env in container.get("env", []):
                if env["name"] in SECRET_ENV:
                    seen.add(env["name"])
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env
    assert {"LGW_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= seen


def _schema_error(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    return str(err.value)


@pytest.mark.parametrize(("bad", "words"), [
    ({"replicaCount": -1}, ["/replicaCount", "minimum"]),
    ({"engine": {"maxLoraRank": 12}}, ["/engine/maxLoraRank", "8, 16, 32, 64, 128, 256, 512"]),
    ({"engine": {"dtype": "fp8"}}, ["/engine/dtype", "bfloat16"]),
    ({"engine": {"gpuMemoryUtilization": 1.5}}, ["/engine/gpuMemoryUtilization", "maximum"]),
    ({"enigne": {}}, ["additional properties 'enigne' not allowed"]),
    ({"gateway": {"settings": {"database_url": "postgresql://u:p@db/x"}}},
     ["/gateway/settings", "additional properties 'database_url' not allowed"]),
    ({"registry": {"artifacts": "/data/artifacts"}}, ["/registry/artifacts", "s3://"]),
    ({"image": {"flavor": "tpu"}}, ["/image/flavor", "gpu", "cpu"]),
    ({"adapterCache": {"sizeGiB": "20Gi"}}, ["/adapterCache/sizeGiB", "integer"]),
    ({"gpu": {"count": 2}}, ["/gpu/count", "maximum"]),  # no tensor parallelism: a 2nd GPU idles
    ({"model": {"s3": {"sizeLimit": "lots"}}}, ["/model/s3/sizeLimit"]),
    ({"secrets": {"database": {"password": "hunter2"}}},
     ["/secrets/database", "additional properties 'password' not allowed"]),
])
def test_schema_refuses_bad_values_readably(bad: dict[str, Any], words: list[str]) -> None:
    message = _schema_error(merged(MINIMAL, bad))
    for word in words:
        assert word in message, message
    # And an install (render) refuses them the same way, before any template runs.
    with pytest.raises(helm.HelmValuesError):
        render(merged(MINIMAL, bad))


def test_defaults_and_profiles_satisfy_the_schema() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})
        for name in PROFILES:
            chart.validate_schema(profile(name))


def _walk(values: Any, node: dict[str, Any], path: str) -> None:
    if not isinstance(values, dict) or "properties" not in node:
        return
    assert node.get("additionalProperties") is False, f"{path or '/'}: unknown keys must be refused"
    declared = set(node["properties"]) - ({"global"} if not path else set())
    if values:  # an empty map (gateway.settings) is filled in by the operator
        assert set(values) == declared, (
            f"{path or '/'}: values.yaml {sorted(values)} vs schema {sorted(declared)}")
    for key, child in values.items():
        _walk(child, node["properties"][key], f"{path}/{key}")


def test_schema_describes_exactly_the_keys_of_values_yaml() -> None:
    _walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema(), "")


def test_readme_values_table_is_values_yaml() -> None:
    from tests.helm.values_doc import BEGIN, END, table, undocumented

    text = (CHART / "values.yaml").read_text()
    assert undocumented(text) == [], "values.yaml keys without a `# --` description"
    readme = (CHART / "README.md").read_text()
    current = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert current == table(text), "regenerate it: python -m tests.helm.values_doc"
