"""The Kubernetes manifests (deploy/k8s), validated offline: no cluster can run here.

Every overlay renders with `kubectl kustomize`; every object validates against the Kubernetes
1.33 schemas (kubernetes-validate, strict: an unknown field fails); and what schemas cannot see
is checked against the server itself: probe service names, ports between Parley, Envoy and the
Service, the sidecar's restart policy, GPU requests and limits, the drain time, the settings
Parley would start with, and the Envoy ConfigMap (current with the template, and accepted by
`envoy --mode validate`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate  # a test dependency: the manifests are always validated
import pytest
import yaml
from parley import config
from parley.gateway import descriptor_path, envoy_binary, render
from parley.transport.servicers import HTTP_SERVICE, TYPED_SERVICE

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
ENVOY_CONFIG = K8S.parent / "envoy" / "envoy.yaml"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir())
KUBERNETES_VERSION = "1.33.0"
# The settings the base pod's Envoy config is rendered with (the sidecar's view of the pod).
POD_ENVOY_SETTINGS = {"http_host": "0.0.0.0", "grpc_host": "0.0.0.0", "envoy_admin_port": 9901}
POD_DESCRIPTOR = "/app/gateway/parley.pb"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl is not installed here: the manifests were not rendered or checked")


def rendered(overlay: str) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict], kind: str, name: str = "parley") -> dict:
    [found] = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def configmap(docs: list[dict], name: str) -> dict:
    """A generated ConfigMap's data (its name has a content hash appended)."""
    [found] = [doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].rsplit("-", 1)[0] == name]
    return found["data"]


def settings_map(docs: list[dict]) -> dict:
    return configmap(docs, "parley-settings")


# Kinds from CRDs, and where their pod templates are: no schema of theirs can be had offline, so
# their pod templates are validated as Pods.
CUSTOM_POD_TEMPLATES = {"LeaderWorkerSet": {"server": ("spec", "leaderWorkerTemplate", "leaderTemplate"),
                                            "worker": ("spec", "leaderWorkerTemplate", "workerTemplate")}}


def workload(docs: list[dict]) -> dict:
    """The object that runs Parley's pods: a Deployment, or a LeaderWorkerSet (multi-node)."""
    [found] = [doc for doc in docs if doc["kind"] in ("Deployment", *CUSTOM_POD_TEMPLATES)
               and doc["metadata"]["name"] == "parley"]
    return found


def pod_templates(doc: dict) -> dict[str, dict]:
    if doc["kind"] == "Deployment":
        return {"server": doc["spec"]["template"]}
    templates = {}
    for role, path in CUSTOM_POD_TEMPLATES[doc["kind"]].items():
        node = doc
        for key in path:
            node = node[key]
        templates[role] = node
    return templates


def server_pod(docs: list[dict]) -> dict:
    return pod_templates(workload(docs))["server"]["spec"]


def containers(docs: list[dict]) -> tuple[dict, dict]:
    pod = server_pod(docs)
    [envoy] = pod["initContainers"]
    [parley] = pod["containers"]
    return envoy, parley


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, rendered(request.param)


def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    name, docs = overlay
    for doc in docs:
        if doc["kind"] in CUSTOM_POD_TEMPLATES:
            for role, template in pod_templates(doc).items():
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"parley-{role}",
                                                                      **template.get("metadata", {})},
                       "spec": template["spec"]}
                kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_an_unknown_field():
    docs = rendered("cpu")
    deployment = workload(docs)
    deployment["spec"]["template"]["spec"]["containers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_envoy_is_a_native_sidecar_and_parley_a_plain_container(overlay):
    envoy, parley = containers(overlay[1])
    assert envoy["restartPolicy"] == "Always"
    assert "restartPolicy" not in parley


def test_probes_name_services_the_server_registers(overlay):
    _, parley = containers(overlay[1])
    registered = {"", TYPED_SERVICE, HTTP_SERVICE}  # "" is the server as a whole
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = parley[probe]["grpc"]
        assert grpc.get("service", "") in registered, (probe, grpc)
        assert grpc["port"] == int(settings_map(overlay[1])["PARLEY_GRPC_PORT"])


def test_ports_agree_between_parley_envoy_and_the_service(overlay):
    docs = overlay[1]
    env = settings_map(docs)
    envoy, parley = containers(docs)
    ports = {port["name"]: port["containerPort"] for port in parley["ports"] + envoy["ports"]}
    assert (ports["grpc"], ports["websocket"], ports["metrics"]) == (
        int(env["PARLEY_GRPC_PORT"]), int(env["PARLEY_WEBSOCKET_PORT"]), int(env["PARLEY_METRICS_PORT"]))
    envoy_config = yaml.safe_load(configmap(docs, "parley-envoy")["envoy.yaml"])
    [listener] = envoy_config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == ports["http"]
    upstreams = {cluster["name"]: cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                 ["socket_address"] for cluster in envoy_config["static_resources"]["clusters"]}
    assert upstreams["parley_grpc"] == {"address": "127.0.0.1", "port_value": ports["grpc"]}
    assert upstreams["parley_websocket"] == {"address": "127.0.0.1", "port_value": ports["websocket"]}
    if not any(doc["metadata"]["name"] == "parley-router" for doc in docs):  # else the router's (below)
        service = one(docs, "Service")
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(ports)
    assert envoy["readinessProbe"]["httpGet"]["port"] == "http"


def test_gpu_requests_equal_limits(overlay):
    for template in pod_templates(workload(overlay[1])).values():
        for container in template["spec"]["containers"]:
            resources = container["resources"]
            gpus = {kind: resources.get(kind, {}).get("nvidia.com/gpu") for kind in ("requests", "limits")}
            assert gpus["requests"] == gpus["limits"], container["name"]
    if overlay[0].startswith("gpu-"):
        _, parley = containers(overlay[1])
        assert int(parley["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        volumes = {volume["name"]: volume for volume in server_pod(overlay[1])["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert settings_map(overlay[1])["PMIX_HOSTNAME"]


def test_the_multinode_group_matches_the_parallelism_it_launches():
    docs = rendered("gpu-multinode")
    lws = workload(docs)
    env = settings_map(docs)
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    gpus = {role: int(template["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for role, template in pod_templates(lws).items()}
    world = int(env["PARLEY_TRTLLM_TENSOR_PARALLEL_SIZE"]) * int(env["PARLEY_TRTLLM_PIPELINE_PARALLEL_SIZE"])
    assert gpus["server"] == gpus["worker"] and size * gpus["server"] == world
    _, parley = containers(docs)
    script = parley["args"][0]
    assert "trtllm-llmapi-launch /app/.venv/bin/parley serve" in script and f"* {gpus['server']}" in script
    [worker] = pod_templates(lws)["worker"]["spec"]["containers"]
    assert "-p" in worker["command"] and "2222" in worker["command"] and "-p 2222" in script
    service = one(docs, "Service")
    assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"  # leaders serve


def test_the_pod_outlives_parleys_drain(overlay):
    pod = server_pod(overlay[1])
    assert pod["terminationGracePeriodSeconds"] > int(settings_map(overlay[1])["PARLEY_SHUTDOWN_GRACE_SECONDS"])


def test_parley_would_start_with_these_settings(overlay, tmp_path):
    """The ConfigMap's PARLEY_* values pass Parley's own start-up validation (the Secret's values
    and a model directory stand in for what the cluster provides)."""
    env = {key: value for key, value in settings_map(overlay[1]).items() if key.startswith("PARLEY_")}
    env.update(PARLEY_API_KEY="k" * 32, PARLEY_REASONING_KEY="A" * 43)
    if "PARLEY_MODEL_PATH" in env:
        env["PARLEY_MODEL_PATH"] = str(tmp_path)
    settings = config.load(environ=env)
    _, parley = containers(overlay[1])
    names = {item["name"] for item in parley["env"]}
    assert {"PARLEY_API_KEY", "PARLEY_REASONING_KEY"} <= names
    if overlay[0] in ("postgres", "gpu-tensorrt-llm"):
        assert "PARLEY_STORE_DSN" in names and workload(overlay[1])["spec"]["replicas"] > 1
    elif overlay[0] == "gpu-multinode":
        assert "PARLEY_STORE_DSN" in names
    else:
        assert settings.store_path.startswith("/var/lib/parley/")


# Each committed Envoy config, and what renders it: (file, settings, router).
ENVOY_CONFIGS = {
    "sidecar": (ENVOY_CONFIG, POD_ENVOY_SETTINGS, False),
    "router": (ENVOY_CONFIG.parent / "router" / "envoy.yaml", {**POD_ENVOY_SETTINGS, "grpc_host": "parley-replicas"},
               True),
}


@pytest.mark.parametrize("which", sorted(ENVOY_CONFIGS))
def test_the_envoy_configmaps_are_the_current_template_rendered(which):
    path, overrides, router = ENVOY_CONFIGS[which]
    settings = config.load(environ={}, **overrides)
    flag = " --router" if router else ""
    assert path.read_text() == render(settings, settings.grpc_port, websocket_port=settings.websocket_port,
                                      descriptor=POD_DESCRIPTOR, router=router), \
        (f"regenerate it: PARLEY_HTTP_HOST=0.0.0.0 PARLEY_GRPC_HOST={settings.grpc_host} "
         f"PARLEY_ENVOY_ADMIN_PORT=9901 .venv/bin/parley envoy-config{flag} --descriptor {POD_DESCRIPTOR} > {path}")


def test_the_router_hashes_across_every_replica_and_is_what_the_service_reaches():
    docs = rendered("postgres")
    router_pod = one(docs, "Deployment", "parley-router")["spec"]["template"]
    [router] = router_pod["spec"]["containers"]
    replicas = one(docs, "Service", "parley-replicas")
    _, parley = containers(docs)
    assert replicas["spec"]["clusterIP"] == "None"  # headless: Envoy resolves every pod
    server_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert replicas["spec"]["selector"].items() <= server_labels.items()
    public = one(docs, "Service")
    assert public["spec"]["selector"].items() <= router_pod["metadata"]["labels"].items()
    assert {port["targetPort"] for port in public["spec"]["ports"]} <= {port["name"] for port in router["ports"]}
    envoy_config = yaml.safe_load(configmap(docs, "parley-router-envoy")["envoy.yaml"])
    clusters = {cluster["name"]: cluster for cluster in envoy_config["static_resources"]["clusters"]}
    server_ports = {port["name"]: port["containerPort"] for port in parley["ports"]}
    for name, port in (("parley_grpc", "grpc"), ("parley_websocket", "websocket")):
        address = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert address["socket_address"] == {"address": "parley-replicas", "port_value": server_ports[port]}
        assert clusters[name]["type"] == "STRICT_DNS"
    assert clusters["parley_grpc"]["lb_policy"] == "MAGLEV"


@pytest.mark.parametrize("which", sorted(ENVOY_CONFIGS))
def test_envoy_accepts_the_configmaps(which, tmp_path):
    # The descriptor's path is the image's; here it is this checkout's.
    text = ENVOY_CONFIGS[which][0].read_text().replace(POD_DESCRIPTOR, str(descriptor_path()))
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
