"""What no schema catches: objects an API server would refuse as a whole, and references
that point at nothing (issue 28, item 4). Every check runs over the profiles and the value
sets operators reach for, and each has a value set it must catch."""

from __future__ import annotations

import re
from typing import Any

import promql_parser
import pytest
import yaml

from tests.helm.chart import MINIMAL, NAMESPACE, Manifest, merged, profile, render, render_files
from tests.helm.test_render import _NoDuplicateKeys

REDIS = {"secrets": {"redis": {"existingSecret": "lgw-redis"}}}
EVERYTHING = {
    "ingress": {"enabled": True, "hosts": ["llm.example.com"]}, "serviceMonitor": {"enabled": True},
    "podDisruptionBudget": {"enabled": True}, "networkPolicy": {"enabled": True}, **REDIS,
    "inferencePool": {"enabled": True, "endpointPicker": {"serviceName": "lgw-epp"}},
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "minimal": MINIMAL,
    "cpu-dev": profile("values-cpu-dev.yaml"),
    "gpu": profile("values-gpu.yaml"),
    "gpu, everything": merged(profile("values-gpu.yaml"), EVERYTHING),
    "gpu, hpa": merged(profile("values-gpu.yaml"), EVERYTHING,
                       {"autoscaling": {"keda": {"enabled": False}, "hpa": {"enabled": True}}}),
    "recreate": merged(MINIMAL, {"strategy": {"type": "Recreate"}}),
    "public API": merged(MINIMAL, {"service": {"type": "LoadBalancer"}}),
    "node port, metrics scraped": merged(MINIMAL, {"service": {"type": "NodePort"},
                                                   "serviceMonitor": {"enabled": True}}),
    "keda, own ports": merged(MINIMAL, REDIS, {"autoscaling": {"keda": {"enabled": True}},
                                               "serviceMonitor": {"enabled": True},
                                               "gateway": {"port": 8080, "metricsPort": 9100}}),
    "s3 base, emptyDir cache": merged(MINIMAL, {"model": {"source": "s3", "s3": {"uri": "s3://b/m/"}}}),
    "workers, keda, s3 base": merged(MINIMAL, {
        "model": {"source": "s3", "s3": {"uri": "s3://b/m/"}},
        "worker": {"enabled": True,
                   "keda": {"enabled": True, "connection": {"existingSecret": "lgw-keda"}}}}),
    "extras": merged(MINIMAL, {
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway"}],
        "extraVolumes": [{"name": "ca", "secret": {"secretName": "ca"}}],
        "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ca", "readOnly": True}],
        "migrations": {"nodeSelector": {"pool": "cpu"},
                       "tolerations": [{"key": "x", "operator": "Exists"}]}}),
}


def _mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi|Ti)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2}[unit]


def _of(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def problems(objects: list[Manifest]) -> list[str]:
    """Every reference in ``objects`` that points at nothing, and every field pair a
    cluster would refuse or act on wrongly; [] when there is none."""
    out: list[str] = []
    deployments = _of(objects, "Deployment")
    for deployment in deployments:
        out += _pod_problems(deployment)
    gateway = _deployment(objects)
    labels, spec = gateway["spec"]["template"]["metadata"]["labels"], gateway["spec"]["template"]["spec"]
    named = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
    numbers = set(named.values())
    others = [d["spec"]["template"]["metadata"]["labels"] for d in deployments if d is not gateway]
    services = {s["metadata"]["name"]: s for s in _of(objects, "Service")}
    for name, svc in services.items():
        if not svc["spec"]["selector"].items() <= labels.items():
            out.append(f"Service {name} selects no gateway pod")
        if any(svc["spec"]["selector"].items() <= other.items() for other in others):
            out.append(f"Service {name} also selects pods that are not the gateway's")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if target not in named if isinstance(target, str) else target not in numbers:
                out.append(f"Service {name}: targetPort {target!r} is not a container port")
            public = svc["spec"].get("type", "ClusterIP") != "ClusterIP"
            if public and target in ("metrics", named.get("metrics")):
                out.append(f"Service {name} is {svc['spec']['type']} and carries the metrics port")
    scraped: list[str] = []
    for monitor in _of(objects, "ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        chosen = [s for n, s in services.items() if wanted.items() <= s["metadata"]["labels"].items()]
        if not chosen:
            out.append("ServiceMonitor selects no Service")
        scraped += [s["metadata"]["name"] for s in chosen]
        for endpoint in monitor["spec"]["endpoints"]:
            if not any(endpoint["port"] == p.get("name") for s in chosen for p in s["spec"]["ports"]):
                out.append(f"ServiceMonitor: port {endpoint['port']!r} is on no Service it selects")
    for policy in _of(objects, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if isinstance(port["port"], str) and port["port"] not in named:
                    out.append(f"NetworkPolicy: port {port['port']!r} is not a container port")
    for pool in _of(objects, "InferencePool"):
        out += [f"InferencePool: target port {t['number']} is not a container port"
                for t in pool["spec"]["targetPorts"] if t["number"] not in numbers]
    rendered = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for scaled in _of(objects, "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]
        if (target["kind"], target["name"]) not in rendered:
            out.append(f"ScaledObject {scaled['metadata']['name']}: scales {target['name']!r}, not rendered")
        for trigger in scaled["spec"]["triggers"]:
            auth = trigger.get("authenticationRef")
            if auth and (auth.get("kind", "TriggerAuthentication"), auth["name"]) not in rendered:
                out.append(f"ScaledObject {scaled['metadata']['name']}: authenticationRef {auth['name']!r} "
                           "is not rendered")
            if trigger["type"] == "prometheus":
                out += _query_problems(trigger["metadata"]["query"], scraped)
    return out


def _pod_problems(deployment: Manifest) -> list[str]:
    """What a cluster would refuse or act on wrongly in one Deployment's pods."""
    out: list[str] = []
    name = deployment["metadata"]["name"]
    strategy = deployment["spec"].get("strategy", {})
    if strategy.get("type") == "Recreate" and "rollingUpdate" in strategy:
        out.append(f"Deployment {name}: strategy Recreate with rollingUpdate (an API server refuses it)")
    spec = deployment["spec"]["template"]["spec"]
    named = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
    numbers = set(named.values())
    disk = sum(_mib(v["emptyDir"]["sizeLimit"]) for v in spec.get("volumes", [])
               if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
               and "sizeLimit" in v["emptyDir"])
    for c in spec["containers"]:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            if port is not None and (port not in named if isinstance(port, str) else port not in numbers):
                out.append(f"{c['name']}.{probe}: port {port!r} is not a container port")
        requests = c.get("resources", {}).get("requests", {})
        if _mib_of(requests.get("ephemeral-storage")) < disk:
            out.append(f"{c['name']}: ephemeral-storage request {requests.get('ephemeral-storage')} is below "
                       f"its emptyDirs' {disk:.0f}Mi")
    mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"] for v in spec.get("volumes", [])}
    out += [f"{name}: volumeMount {mount!r} has no volume" for mount in sorted(mounts - volumes)]
    return out


def _mib_of(quantity: str | None) -> float:
    return 0 if quantity is None else _mib(quantity)


def _query_problems(query: str, scraped: list[str]) -> list[str]:
    """KEDA's query must be satisfiable by what the chart scrapes: every selector's
    ``service`` label one of the Services a ServiceMonitor scrapes, in the release's namespace."""
    out: list[str] = []
    selectors = []
    stack = [promql_parser.parse(query)]
    while stack:
        node = stack.pop()
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        for attr in ("expr", "lhs", "rhs"):
            child = getattr(node, attr, None)
            if child is not None:
                stack.append(child)
    for selector in selectors:
        labels = {m.name: m.value for m in selector.matchers.matchers}
        if labels.get("namespace") != NAMESPACE:
            out.append(f"KEDA query {query!r}: namespace is not the release's")
        if labels.get("service") not in scraped:
            out.append(f"KEDA query {query!r}: service {labels.get('service')!r} is not a scraped "
                       f"Service ({scraped})")
    return out or ([] if selectors else [f"KEDA query {query!r} selects no series"])


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_reference_resolves_and_nothing_is_refused(name: str) -> None:
    values = VALUE_SETS[name]
    assert problems(render(values)) == []
    for path, text in render_files(values).items():  # a resource named twice, any key twice
        if not path.endswith("NOTES.txt"):
            list(yaml.load_all(text, Loader=_NoDuplicateKeys))


def _deployment(objects: list[Manifest]) -> Manifest:
    """The gateway's (the fine-tuning workers have their own)."""
    (deployment,) = [d for d in _of(objects, "Deployment")
                     if d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    return deployment


def _gateway(objects: list[Manifest]) -> dict[str, Any]:
    containers = _deployment(objects)["spec"]["template"]["spec"]["containers"]
    (c,) = [c for c in containers if c["name"] == "gateway"]
    return c


@pytest.mark.parametrize("case", ["recreate with rollingUpdate", "renamed metrics port",
                                  "metrics on a public Service", "KEDA query on another service",
                                  "no ephemeral-storage request", "mount without a volume",
                                  "worker mount without a volume", "worker scratch outgrows its request",
                                  "Service selects the workers", "worker trigger without its authentication",
                                  "ScaledObject scales nothing"])
def test_the_checks_catch_what_they_are_for(case: str) -> None:
    """Each check, given the defect it exists for, reports it (so none passes vacuously)."""
    if case.startswith(("worker", "Service selects", "ScaledObject")):
        objects = render(VALUE_SETS["workers, keda, s3 base"])
        assert problems(objects) == []
        _break_workers(objects, case)
        assert problems(objects), case
        return
    objects = render(VALUE_SETS["node port, metrics scraped"] if case == "metrics on a public Service"
                     else VALUE_SETS["keda, own ports"])
    spec = _deployment(objects)["spec"]
    if case == "recreate with rollingUpdate":
        spec["strategy"] = {"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}
    elif case == "renamed metrics port":
        next(p for p in _gateway(objects)["ports"] if p["name"] == "metrics")["name"] = "prom"
    elif case == "metrics on a public Service":
        (svc,) = [s for s in _of(objects, "Service") if s["spec"]["type"] == "NodePort"]
        svc["spec"]["ports"].append({"name": "metrics", "port": 9090, "targetPort": "metrics"})
    elif case == "KEDA query on another service":
        (scaled,) = _of(objects, "ScaledObject")
        scaled["spec"]["triggers"][0]["metadata"]["query"] = (
            f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",service="lgw-lora-gateway"}})')
    elif case == "no ephemeral-storage request":
        del _gateway(objects)["resources"]["requests"]["ephemeral-storage"]
    else:
        _gateway(objects)["volumeMounts"].append({"name": "nowhere", "mountPath": "/x"})
    assert problems(objects), case


def _break_workers(objects: list[Manifest], case: str) -> None:
    (workers,) = [d for d in _of(objects, "Deployment") if d is not _deployment(objects)]
    (worker,) = workers["spec"]["template"]["spec"]["containers"]
    (scaled,) = [o for o in _of(objects, "ScaledObject") if o["metadata"]["name"].endswith("-worker")]
    if case == "worker mount without a volume":
        worker["volumeMounts"].append({"name": "nowhere", "mountPath": "/x"})
    elif case == "worker scratch outgrows its request":
        (scratch,) = [v for v in workers["spec"]["template"]["spec"]["volumes"] if v["name"] == "scratch"]
        scratch["emptyDir"]["sizeLimit"] = "500Gi"
    elif case == "Service selects the workers":
        (svc,) = [s for s in _of(objects, "Service") if not s["metadata"]["name"].endswith("-metrics")]
        del svc["spec"]["selector"]["app.kubernetes.io/component"]
    elif case == "worker trigger without its authentication":
        scaled["spec"]["triggers"][0]["authenticationRef"]["name"] = "lgw-lora-gateway"
    else:
        scaled["spec"]["scaleTargetRef"]["name"] = "lgw-lora-gateway-workers"


def test_gpus_are_named_once_in_requests_and_limits() -> None:
    resources = _gateway(render(profile("values-gpu.yaml")))["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    text = render_files(profile("values-gpu.yaml"))["lora-gateway/templates/deployment.yaml"]
    assert text.count("nvidia.com/gpu: 1") == 2  # once in requests, once in limits


def test_ephemeral_storage_request_is_the_sum_of_the_disk_emptydirs() -> None:
    requests = _gateway(render(VALUE_SETS["s3 base, emptyDir cache"]))["resources"]["requests"]
    assert requests["ephemeral-storage"] == f"{(40 + 20 + 4) * 1024}Mi"  # base, adapter cache, /tmp
    own = merged(MINIMAL, {"resources": {"requests": {"ephemeral-storage": "10Gi"}}})
    assert _gateway(render(own))["resources"]["requests"]["ephemeral-storage"] == "10Gi"


def test_escape_hatches_reach_the_pods() -> None:
    objects = render(VALUE_SETS["extras"])
    spec = _deployment(objects)["spec"]["template"]["spec"]
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert {"name": "ca", "secret": {"secretName": "ca"}} in spec["volumes"]
    assert {"name": "ca", "mountPath": "/etc/ca", "readOnly": True} in _gateway(objects)["volumeMounts"]
    (job,) = _of(objects, "Job")
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert job["spec"]["activeDeadlineSeconds"] == 1800  # room to pull a multi-GB image


def test_helm_test_checks_readiness_and_models_with_a_key_from_a_secret() -> None:
    (pod,) = _of(render(merged(MINIMAL, {"helmTest": {"apiKeySecret": "lgw-test-key"}})), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["LGW_TEST_URL"]["value"] == f"http://lgw-lora-gateway.{NAMESPACE}.svc:8000"
    assert env["LGW_TEST_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "lgw-test-key", "key": "api-key"}
    script = c["args"][0]
    assert "/health/ready" in script and "/v1/models" in script
    compile(script, "helm-test", "exec")  # the check itself is valid Python
