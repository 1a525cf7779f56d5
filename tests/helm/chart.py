"""Render the chart with real Helm (helm-python-sdk) and validate what it renders.

Helpers only; the tests are in the ``test_*.py`` files beside this one.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "lora-gateway"
CRDS = Path(__file__).resolve().parent / "crds"
PROFILES = ("values-cpu-dev.yaml", "values-gpu.yaml")
# Two Kubernetes minors: the oldest the chart supports (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS = ("1.29", "1.34")
RELEASE, NAMESPACE = "lgw", "lora-gateway"

# The least a render needs: the required settings and secrets, by reference.
MINIMAL: dict[str, Any] = {
    "model": {"id": "tiny-llama", "pvc": {"claimName": "base-models"}},
    "registry": {"artifacts": "s3://bucket/artifacts"},
    "secrets": {"database": {"existingSecret": "lgw-database"}, "s3": {"existingSecret": "lgw-s3"}},
}

Manifest = dict[str, Any]


def profile(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / name).read_text())
    return loaded


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge value layers, later ones winning (what `-f a.yaml -f b.yaml --set` does)."""
    out: dict[str, Any] = {}
    for layer in layers:
        _merge_into(out, copy.deepcopy(layer))
    return out


def _merge_into(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(dst[key], value)
        else:
            dst[key] = value


def render_files(values: dict[str, Any], release: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text. Raises helm's HelmValuesError / HelmRenderError."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=release, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any], release: str = RELEASE) -> list[Manifest]:
    """Every Kubernetes object the chart renders for these values (NOTES.txt excluded)."""
    objects: list[Manifest] = []
    for path, text in sorted(render_files(values, release).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def kinds(objects: list[Manifest]) -> list[str]:
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)


def the(objects: list[Manifest], kind: str, component: str | None = None) -> Manifest:
    """The one object of ``kind`` (of that ``app.kubernetes.io/component``, when given)."""
    found = [o for o in objects if o["kind"] == kind
             and component in (None, o["metadata"]["labels"].get("app.kubernetes.io/component"))]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {kinds(objects)}"
    return found[0]


def gateway_container(objects: list[Manifest]) -> dict[str, Any]:
    pod = the(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    return dict(container)


def worker_container(objects: list[Manifest]) -> dict[str, Any]:
    pod = the(objects, "Deployment", "worker")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "worker"]
    return dict(container)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# -- validation ---------------------------------------------------------------------

CRD_FILES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_inferencepools.yaml",
}


def validate(obj: Manifest, kube_version: str) -> None:
    """Against the Kubernetes OpenAPI schema (strict: unknown fields are errors), or for
    custom resources against their vendored CRD."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_FILES:
        _crd_validator(key).validate(obj)
        return
    kubernetes_validate.validate(obj, kube_version, strict=True)


@functools.cache
def _crd_validator(key: tuple[str, str]) -> jsonschema.Validator:
    crd = yaml.safe_load((CRDS / CRD_FILES[key]).read_text())
    version = key[0].rsplit("/", 1)[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = _closed(served["schema"]["openAPIV3Schema"])
    return jsonschema.Draft202012Validator(schema)


def _closed(schema: Any) -> Any:
    """The API server prunes fields a structural schema does not declare: a typo in the chart
    would vanish silently on the cluster. Refuse them here instead."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return loaded
