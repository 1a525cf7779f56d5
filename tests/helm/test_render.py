"""The chart lints strictly, renders every profile, and every object it renders is valid
for two Kubernetes minors (custom resources against their vendored CRDs)."""

from __future__ import annotations

import copy

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helm.chart import (
    CHART,
    KUBE_VERSIONS,
    MINIMAL,
    PROFILES,
    kinds,
    merged,
    profile,
    render,
    render_files,
    the,
    validate,
)

# What each profile deploys: a change here is a change operators will see.
DASHBOARDS = ["ConfigMap/lgw-lora-gateway-dashboard-adapters", "ConfigMap/lgw-lora-gateway-dashboard-fleet",
              "ConfigMap/lgw-lora-gateway-dashboard-tenants"]
EXPECTED = {
    "values-cpu-dev.yaml": [
        *DASHBOARDS, "Deployment/lgw-lora-gateway", "Deployment/lgw-lora-gateway-worker",
        "Job/lgw-lora-gateway-migrate", "Pod/lgw-lora-gateway-test",
        "Service/lgw-lora-gateway", "Service/lgw-lora-gateway-metrics", "ServiceAccount/lgw-lora-gateway",
    ],
    "values-gpu.yaml": [
        *DASHBOARDS, "ConfigMap/lgw-lora-gateway-epp", "Deployment/lgw-lora-gateway",
        "Deployment/lgw-lora-gateway-worker", "InferencePool/lgw-lora-gateway",
        "Job/lgw-lora-gateway-migrate", "NetworkPolicy/lgw-lora-gateway",
        "NetworkPolicy/lgw-lora-gateway-worker", "Pod/lgw-lora-gateway-test",
        "PodDisruptionBudget/lgw-lora-gateway", "ScaledObject/lgw-lora-gateway",
        "ScaledObject/lgw-lora-gateway-worker",
        "Service/lgw-lora-gateway", "Service/lgw-lora-gateway-metrics", "ServiceAccount/lgw-lora-gateway",
        "ServiceMonitor/lgw-lora-gateway", "TriggerAuthentication/lgw-lora-gateway-worker",
    ],
}


def _lint(values: dict | None = None) -> dict:
    return helm.lint(str(CHART), values, strict=True, namespace="lora-gateway", kube_version="v1.30.0")


def test_strict_lint_passes_with_defaults_and_every_profile() -> None:
    for values in (None, MINIMAL, *(profile(p) for p in PROFILES)):
        report = _lint(values)
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings fail strict lint
        assert report["errors"] == [] and problems == [], report


def test_lint_catches_a_broken_template(tmp_path) -> None:
    import shutil

    broken = tmp_path / "lora-gateway"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "service.yaml").write_text("{{ if }}\n")
    report = helm.lint(str(broken), MINIMAL, strict=True)
    assert any(m["severity"] == 3 for m in report["messages"]), report


@pytest.mark.parametrize("name", PROFILES)
def test_profile_renders_the_expected_objects(name: str) -> None:
    assert kinds(render(profile(name))) == EXPECTED[name]


@pytest.mark.parametrize("name", PROFILES)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_rendered_object_is_valid(name: str, kube_version: str) -> None:
    # Everything on, so no template escapes validation.
    everything = merged(profile(name), {
        "ingress": {"enabled": True, "hosts": ["llm.example.com"]},
        "serviceMonitor": {"enabled": True}, "podDisruptionBudget": {"enabled": True},
        "networkPolicy": {"enabled": True}, "secrets": {"redis": {"existingSecret": "lgw-redis"}},
        "inferencePool": {"enabled": True, "endpointPicker": {"serviceName": "lgw-epp"}},
    })
    for variant in (everything, merged(everything, {"autoscaling": {"keda": {"enabled": False},
                                                                    "hpa": {"enabled": True}}})):
        for obj in render(variant):
            validate(obj, kube_version)


def test_the_validators_refuse_what_a_cluster_would_refuse_or_silently_drop() -> None:
    objects = render(merged(profile("values-gpu.yaml")))
    deployment = copy.deepcopy(the(objects, "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, KUBE_VERSIONS[0])
    monitor = copy.deepcopy(the(objects, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, KUBE_VERSIONS[0])
    scaled = copy.deepcopy(the(objects, "ScaledObject", "gateway"))
    scaled["spec"]["minReplicaCount"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled, KUBE_VERSIONS[0])
    auth = copy.deepcopy(the(objects, "TriggerAuthentication"))
    auth["spec"]["secretTargetRef"][0]["paramter"] = "connection"
    with pytest.raises(jsonschema.ValidationError):
        validate(auth, KUBE_VERSIONS[0])
    pool = copy.deepcopy(the(objects, "InferencePool"))
    del pool["spec"]["targetPorts"]
    with pytest.raises(jsonschema.ValidationError):
        validate(pool, KUBE_VERSIONS[0])


class _NoDuplicateKeys(yaml.SafeLoader):
    pass


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    duplicated = {k for k in keys if keys.count(k) > 1}
    assert not duplicated, f"duplicate keys {duplicated} at {node.start_mark}"
    return loader.construct_mapping(node, deep=deep)


_NoDuplicateKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@pytest.mark.parametrize("name", PROFILES)
def test_no_rendered_object_repeats_a_key(name: str) -> None:
    # Kubernetes' own YAML decoder refuses duplicate keys; PyYAML would keep the last one.
    for path, text in render_files(profile(name)).items():
        if not path.endswith("NOTES.txt"):
            list(yaml.load_all(text, Loader=_NoDuplicateKeys))  # a SafeLoader subclass


def test_names_stay_within_63_characters() -> None:
    everything = merged(MINIMAL, {"inferencePool": {"enabled": True,
                                                    "endpointPicker": {"serviceName": "epp"}}})
    for obj in render(everything, release="r" * 53):  # the longest release name Helm accepts
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        assert not obj["metadata"]["name"].endswith("-")
