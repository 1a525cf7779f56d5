"""helm-unittest in spirit: each optional feature renders nothing when off and the right
object when on; the Deployment carries the probes, drain, hardening and volumes."""

from __future__ import annotations

import pytest
import yaml

from tests.helm.chart import (
    MINIMAL,
    NAMESPACE,
    env_of,
    gateway_container,
    kinds,
    merged,
    profile,
    render,
    the,
)

REDIS = {"secrets": {"redis": {"existingSecret": "lgw-redis"}}}

# feature -> (values that turn it on, kind it renders)
OPTIONAL = {
    "serviceMonitor": ({"serviceMonitor": {"enabled": True}}, "ServiceMonitor"),
    "podDisruptionBudget": ({"podDisruptionBudget": {"enabled": True}}, "PodDisruptionBudget"),
    "hpa": ({"autoscaling": {"hpa": {"enabled": True}}, **REDIS}, "HorizontalPodAutoscaler"),
    "keda": ({"autoscaling": {"keda": {"enabled": True}}, "serviceMonitor": {"enabled": True}, **REDIS},
             "ScaledObject"),
    "helmTest": ({}, "Pod"),
    "networkPolicy": ({"networkPolicy": {"enabled": True}}, "NetworkPolicy"),
    "ingress": ({"ingress": {"enabled": True, "hosts": ["llm.example.com"]}}, "Ingress"),
    "inferencePool": ({"inferencePool": {"enabled": True, "endpointPicker": {"serviceName": "epp"}}},
                      "InferencePool"),
    "migrations": ({"migrations": {"enabled": True}}, "Job"),
    "serviceAccount": ({"serviceAccount": {"create": True}}, "ServiceAccount"),
}
OFF = {"migrations": {"migrations": {"enabled": False}}, "helmTest": {"helmTest": {"enabled": False}},
       "serviceAccount": {"serviceAccount": {"create": False}}}


@pytest.mark.parametrize("feature", sorted(OPTIONAL))
def test_optional_feature_renders_only_when_enabled(feature: str) -> None:
    on, kind = OPTIONAL[feature]
    off = OFF.get(feature, {})
    assert kind not in {o["kind"] for o in render(merged(MINIMAL, off))}
    assert kind in {o["kind"] for o in render(merged(MINIMAL, on))}


def test_minimal_install_renders_the_core_only() -> None:
    assert kinds(render(MINIMAL)) == [
        "ConfigMap/lgw-lora-gateway-dashboard-adapters", "ConfigMap/lgw-lora-gateway-dashboard-fleet",
        "ConfigMap/lgw-lora-gateway-dashboard-tenants", "Deployment/lgw-lora-gateway",
        "Job/lgw-lora-gateway-migrate", "Pod/lgw-lora-gateway-test",
        "Service/lgw-lora-gateway", "Service/lgw-lora-gateway-metrics", "ServiceAccount/lgw-lora-gateway"]


def test_probes_match_the_gateway_health_endpoints() -> None:
    c = gateway_container(render(MINIMAL))
    assert c["startupProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    startup = c["startupProbe"]
    # The engine loads weights before the server listens: minutes, not seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # A busy gateway answers liveness slowly; it must not be killed for that.
    assert c["livenessProbe"]["timeoutSeconds"] >= 5 and c["livenessProbe"]["failureThreshold"] >= 3


@pytest.mark.parametrize("drain", [0, 30, 120])
def test_termination_grace_covers_prestop_and_drain(drain: int) -> None:
    objects = render(merged(MINIMAL, {"gateway": {"drainGraceSeconds": drain, "preStopSleepSeconds": 7,
                                                  "shutdownMarginSeconds": 11}}))
    pod = the(objects, "Deployment")["spec"]["template"]["spec"]
    c = gateway_container(objects)
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert env_of(c)["LGW_DRAIN_GRACE_SECONDS"]["value"] == str(drain)
    assert pod["terminationGracePeriodSeconds"] == 7 + drain + 11


def test_pods_are_hardened_and_write_only_to_their_volumes() -> None:
    objects = render(merged(profile("values-cpu-dev.yaml")))
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"]
    assert len(pods) == 2  # the gateway and the fine-tuning workers
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in gateway_container(objects)["volumeMounts"]}
    assert mounts["/models/base"].get("readOnly") is True
    assert set(mounts) == {"/models/base", "/var/cache/lora-gateway", "/tmp", "/dev/shm"}
    job = the(objects, "Job")["spec"]["template"]["spec"]
    assert job["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_gpu_resources_and_scheduling() -> None:
    objects = render(profile("values-gpu.yaml"))
    pod = the(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    res = gateway_container(objects)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    assert pod["runtimeClassName"] == "nvidia" and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["nodeSelector"] and pod["affinity"]["podAntiAffinity"]
    assert "replicas" not in the(objects, "Deployment", "gateway")["spec"]  # KEDA owns the replica count
    cpu = render(profile("values-cpu-dev.yaml"))
    res = gateway_container(cpu)["resources"]
    assert "nvidia.com/gpu" not in res["limits"] and "nvidia.com/gpu" not in res["requests"]
    assert gateway_container(cpu)["image"].endswith(":0.1.0-cpu")
    assert gateway_container(objects)["image"].endswith(":0.1.0-gpu")


def test_adapter_cache_budget_is_matched_to_its_volume() -> None:
    objects = render(merged(MINIMAL, {"adapterCache": {"sizeGiB": 20}}))
    volumes = {v["name"]: v for v in the(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["adapter-cache"]["emptyDir"]["sizeLimit"] == "20Gi"
    budget = int(env_of(gateway_container(objects))["LGW_DISK_CACHE_MAX_BYTES"]["value"])
    assert budget == 20 * 2**30 * 9 // 10  # below the limit, so the kubelet never evicts the pod
    pvc = render(merged(MINIMAL, {"adapterCache": {"type": "pvc", "pvc": {"claimName": "cache"}}}))
    volumes = {v["name"]: v for v in the(pvc, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["adapter-cache"]["persistentVolumeClaim"] == {"claimName": "cache"}


def test_base_model_from_pvc_or_fetched_from_s3() -> None:
    pvc = render(merged(MINIMAL, {"model": {"pvc": {"subPath": "tiny"}}}))
    pod = the(pvc, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["base-model"]["persistentVolumeClaim"] == {"claimName": "base-models", "readOnly": True}
    s3 = render(merged(MINIMAL, {"model": {"source": "s3", "s3": {"uri": "s3://b/bases/tiny/"}},
                                 "registry": {"s3EndpointUrl": "http://minio:9000"}}))
    pod = the(s3, "Deployment")["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["command"][:3] == ["aws", "s3", "sync"]
    assert fetch["command"][-2:] == ["s3://b/bases/tiny/", "/models/base"]
    assert "--endpoint-url" in fetch["command"]
    assert env_of(fetch)["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "lgw-s3"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["base-model"]


def test_migrations_run_once_per_release_as_a_hook() -> None:
    job = the(render(MINIMAL), "Job")
    hooks = job["metadata"]["annotations"]
    assert hooks["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in hooks["helm.sh/hook-delete-policy"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] + c["args"] == ["lora-gateway", "registry", "migrate"]
    assert env_of(c)["LGW_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "lgw-database", "key": "database-url"}
    # A pre-install hook runs before the chart's ServiceAccount exists.
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]


def test_service_and_servicemonitor_use_the_separate_metrics_port() -> None:
    objects = render(merged(MINIMAL, {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}))
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    api, metrics = services["lgw-lora-gateway"], services["lgw-lora-gateway-metrics"]
    # The API's Service carries no metrics port (it may be a LoadBalancer); metrics have
    # their own ClusterIP Service, which is all the ServiceMonitor selects.
    assert [(p["name"], p["port"]) for p in api["spec"]["ports"]] == [("http", 8000)]
    assert [(p["name"], p["port"]) for p in metrics["spec"]["ports"]] == [("metrics", 9090)]
    assert metrics["spec"]["type"] == "ClusterIP"
    env = env_of(gateway_container(objects))
    assert env["LGW_METRICS_PORT"]["value"] == "9090"
    monitor = the(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert [name for name, o in services.items()
            if selected.items() <= o["metadata"]["labels"].items()] == ["lgw-lora-gateway-metrics"]


def test_keda_scales_on_queue_depth_and_owns_the_replicas() -> None:
    objects = render(merged(MINIMAL, REDIS, {"autoscaling": {"keda": {"enabled": True}, "maxReplicas": 5},
                                             "serviceMonitor": {"enabled": True}}))
    scaled = the(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == the(objects, "Deployment")["metadata"]["name"]
    assert scaled["spec"]["maxReplicaCount"] == 5
    assert "vllm:num_requests_waiting" in scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert "replicas" not in the(objects, "Deployment")["spec"]
    # Prometheus away: hold the most replicas; scale down as slowly as the HPA does.
    assert scaled["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 5}
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert "cooldownPeriod" not in scaled["spec"]  # it only acts when scaling to zero


def test_hpa_targets_the_queue_metric_per_pod() -> None:
    hpa = the(render(merged(MINIMAL, REDIS, {"autoscaling": {"hpa": {"enabled": True}}})),
              "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"


def test_network_policy_separates_api_metrics_and_egress() -> None:
    objects = render(merged(MINIMAL, {"networkPolicy": {"enabled": True}}))
    assert not [o for o in objects if o["kind"] == "NetworkPolicy" and "worker" in o["metadata"]["name"]]
    policy = the(objects, "NetworkPolicy", "gateway")
    api, metrics = policy["spec"]["ingress"]
    assert api["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert api["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"}
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}
    egress_ports = sorted(p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"])
    assert egress_ports == [53, 53, 443, 5432, 6379]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_workers_get_their_own_network_policy_with_no_ingress() -> None:
    objects = render(merged(MINIMAL, {"networkPolicy": {"enabled": True}, "worker": {"enabled": True}}))
    policy = the(objects, "NetworkPolicy", "worker")
    worker_labels = the(objects, "Deployment", "worker")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= worker_labels.items()
    gateway_labels = the(objects, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    assert not policy["spec"]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert policy["spec"]["ingress"] == [] and policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress_ports = sorted(p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"])
    assert egress_ports == [53, 53, 443, 5432]  # no Redis: a worker never meters requests


def test_pdb_selects_the_gateway_pods() -> None:
    objects = render(merged(MINIMAL, {"podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"}}))
    pdb = the(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == "25%"
    pod_labels = the(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_inference_pool_selects_the_gateway_pods_and_configures_lora_affinity() -> None:
    objects = render(merged(MINIMAL, {"inferencePool": {"enabled": True, "endpointPicker": {
        "serviceName": "lgw-epp"}, "scorerWeights": {"loraAffinity": 5}}}))
    pool = the(objects, "InferencePool")
    pod_labels = the(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {"name": "lgw-epp", "port": {"number": 9002},
                                                 "failureMode": "FailClose"}
    (epp,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-epp")]
    config = yaml.safe_load(epp["data"]["lora-gateway-epp.yaml"])
    assert config["kind"] == "EndpointPickerConfig"
    types = {p["type"] for p in config["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= types
    (source,) = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"]["port"] == 9090  # metrics are not on the pool's target port
    weights = {p["pluginRef"]: p.get("weight") for p in config["schedulingProfiles"][0]["plugins"]}
    assert weights["lora-affinity-scorer"] == 5
    assert {r["pluginRef"] for r in config["schedulingProfiles"][0]["plugins"]} <= types


def test_ingress_routes_to_the_api_port() -> None:
    ingress = the(render(merged(MINIMAL, {"ingress": {"enabled": True, "className": "nginx",
                                                      "hosts": ["a.example.com"]}})), "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "a.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "http"}


def test_everything_lands_in_the_release_namespace() -> None:
    for obj in render(profile("values-gpu.yaml")):
        assert obj["metadata"]["namespace"] == NAMESPACE
