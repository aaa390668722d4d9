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

import pytest
import yaml
from parley import config
from parley.gateway import descriptor_path, envoy_binary, render
from parley.transport.servicers import HTTP_SERVICE, TYPED_SERVICE

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir())
KUBERNETES_VERSION = "1.33.0"
# The settings the base pod's Envoy config is rendered with (the sidecar's view of the pod).
POD_ENVOY_SETTINGS = {"http_host": "0.0.0.0", "grpc_host": "0.0.0.0", "envoy_admin_port": 9901}
POD_DESCRIPTOR = "/app/server/parley/v1/parley.pb"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl is not installed here: the manifests were not rendered or checked")


def rendered(overlay: str) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict], kind: str, name_prefix: str = "parley") -> dict:
    [found] = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"].startswith(name_prefix)
               and not doc["metadata"]["name"].startswith("parley-postgres")]
    return found


def settings_map(docs: list[dict]) -> dict:
    return next(doc for doc in docs if doc["kind"] == "ConfigMap"
                and doc["metadata"]["name"].startswith("parley-settings"))["data"]


def containers(docs: list[dict]) -> tuple[dict, dict]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    [envoy] = pod["initContainers"]
    [parley] = pod["containers"]
    return envoy, parley


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, rendered(request.param)


def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    name, docs = overlay
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_an_unknown_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = rendered("cpu")
    deployment = one(docs, "Deployment")
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
    envoy_config = yaml.safe_load(next(doc for doc in docs if doc["kind"] == "ConfigMap"
                                       and doc["metadata"]["name"].startswith("parley-envoy"))["data"]["envoy.yaml"])
    [listener] = envoy_config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == ports["http"]
    upstreams = {cluster["name"]: cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                 ["socket_address"] for cluster in envoy_config["static_resources"]["clusters"]}
    assert upstreams["parley_grpc"] == {"address": "127.0.0.1", "port_value": ports["grpc"]}
    assert upstreams["parley_websocket"] == {"address": "127.0.0.1", "port_value": ports["websocket"]}
    service = one(docs, "Service")
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(ports)
    assert envoy["readinessProbe"]["httpGet"]["port"] == "http"


def test_gpu_requests_equal_limits(overlay):
    _, parley = containers(overlay[1])
    resources = parley["resources"]
    gpus = {kind: resources.get(kind, {}).get("nvidia.com/gpu") for kind in ("requests", "limits")}
    assert gpus["requests"] == gpus["limits"]
    if overlay[0] == "gpu-tensorrt-llm":
        assert gpus["requests"] == "1"
        volumes = {volume["name"]: volume for volume in one(overlay[1], "Deployment")["spec"]["template"]["spec"]
                   ["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert settings_map(overlay[1])["PMIX_HOSTNAME"]


def test_the_pod_outlives_parleys_drain(overlay):
    pod = one(overlay[1], "Deployment")["spec"]["template"]["spec"]
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
        assert "PARLEY_STORE_DSN" in names and one(overlay[1], "Deployment")["spec"]["replicas"] > 1
    else:
        assert settings.store_path.startswith("/var/lib/parley/")


def test_the_envoy_configmap_is_the_current_template_rendered_for_the_pod():
    committed = (K8S / "base" / "envoy.yaml").read_text()
    settings = config.load(environ={}, **POD_ENVOY_SETTINGS)
    assert committed == render(settings, settings.grpc_port, websocket_port=settings.websocket_port,
                               descriptor=POD_DESCRIPTOR), \
        "regenerate it: PARLEY_HTTP_HOST=0.0.0.0 PARLEY_GRPC_HOST=0.0.0.0 PARLEY_ENVOY_ADMIN_PORT=9901 " \
        f".venv/bin/parley envoy-config --descriptor {POD_DESCRIPTOR} > deploy/k8s/base/envoy.yaml"


def test_envoy_accepts_the_configmap(tmp_path):
    # The descriptor's path is the image's; here it is this checkout's.
    text = (K8S / "base" / "envoy.yaml").read_text().replace(POD_DESCRIPTOR, str(descriptor_path()))
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
