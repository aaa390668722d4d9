"""The CPU overlay's pod, run as local processes: what the manifests say is what runs.

The test renders deploy/k8s/overlays/cpu, takes each container's command, environment (its
ConfigMap, and a stand-in for the Secret) and mounted files (the Envoy ConfigMap), remaps the
image's paths to this checkout and the pod's ports to free ones, and starts them in the pod's
order: the native sidecar (Envoy), then Parley. Then it probes them as the kubelet would (the
gRPC health service each probe names, Envoy's readiness path) and sends an SDK request through
the sidecar. The engine is the scripted one (the pod's model would load here too, slowly)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai import AsyncOpenAI
from parley.gateway import descriptor_path

from tests.deploy.test_kubernetes import POD_DESCRIPTOR, containers, rendered, settings_map
from tests.support.stack import free_port

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed here: the pod "
                                                                         "was not rendered or run")]

IMAGE_VENV = "/app/.venv/bin/"
API_KEY = "pod-test-key-0123456789abcdef"


def remap_ports(node, ports: dict[int, int]):
    """Every `port_value` (Envoy) that is one of the pod's ports, as its free stand-in."""
    if isinstance(node, dict):
        return {key: (ports.get(value, value) if key == "port_value" else remap_ports(value, ports))
                for key, value in node.items()}
    if isinstance(node, list):
        return [remap_ports(item, ports) for item in node]
    return node


def command_of(container: dict) -> list[str]:
    local_bin = str(Path(sys.executable).parent) + "/"
    return [part.replace(IMAGE_VENV, local_bin) for part in container["command"] + container.get("args", [])]


async def wait_for(check, timeout: float = 60):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            if await check():
                return
        except (grpc.aio.AioRpcError, httpx.HTTPError):
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{check.__name__} did not pass in {timeout} s")
        await asyncio.sleep(0.2)


async def test_the_cpu_pod_runs_as_its_manifests_say(tmp_path):
    docs = rendered("cpu")
    envoy_container, parley_container = containers(docs)
    env = settings_map(docs)
    pod_ports = {port["containerPort"] for port in envoy_container["ports"] + parley_container["ports"]} | {9901}
    ports = {port: free_port() for port in pod_ports}

    # The Envoy ConfigMap, mounted where the container reads it, with this checkout's descriptor.
    envoy_config = next(doc for doc in docs if doc["kind"] == "ConfigMap"
                        and doc["metadata"]["name"].startswith("parley-envoy"))["data"]["envoy.yaml"]
    config_dir = tmp_path / "etc-envoy"
    config_dir.mkdir()
    text = envoy_config.replace(POD_DESCRIPTOR, str(descriptor_path()))
    (config_dir / "envoy.yaml").write_text(yaml.safe_dump(remap_ports(yaml.safe_load(text), ports)))
    [mount] = envoy_container["volumeMounts"]
    envoy_command = [part.replace(mount["mountPath"], str(config_dir)) for part in command_of(envoy_container)]

    # Parley's environment: the ConfigMap, the Secret's keys, the pod's ports as free ones, its
    # data volume as a directory here.
    data_dir = tmp_path / "var-lib-parley"
    data_dir.mkdir()
    parley_env = {**os.environ, **env, "PARLEY_ENGINE": "scripted", "PARLEY_MODEL_NAME": "scripted",
                  "PARLEY_API_KEY": API_KEY, "PARLEY_REASONING_KEY": "A" * 43}
    for name in ("PARLEY_GRPC_PORT", "PARLEY_WEBSOCKET_PORT", "PARLEY_METRICS_PORT"):
        parley_env[name] = str(ports[int(env[name])])
    parley_env["PARLEY_STORE_PATH"] = env["PARLEY_STORE_PATH"].replace("/var/lib/parley", str(data_dir))
    secret_refs = {item["name"] for item in parley_container["env"] if "secretKeyRef" in item.get("valueFrom", {})}
    assert secret_refs == {"PARLEY_API_KEY", "PARLEY_REASONING_KEY"}

    grpc_port = ports[parley_container["startupProbe"]["grpc"]["port"]]
    http_port = ports[next(p["containerPort"] for p in envoy_container["ports"] if p["name"] == "http")]
    started = []
    try:
        # The pod's order: the native sidecar first, then the app container.
        started.append(subprocess.Popen(envoy_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        started.append(subprocess.Popen(command_of(parley_container), env=parley_env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                service = parley_container[probe]["grpc"].get("service", "")

                async def serving(service=service):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                    return reply.status == health_pb2.HealthCheckResponse.SERVING

                serving.__name__ = f"{probe} (gRPC health {service!r})"
                await wait_for(serving)
        readiness = envoy_container["readinessProbe"]["httpGet"]
        async with httpx.AsyncClient() as http:
            async def envoy_ready():
                return (await http.get(f"http://127.0.0.1:{http_port}{readiness['path']}")).status_code == 200

            await wait_for(envoy_ready)
        async with AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=API_KEY, max_retries=0) as client:
            response = await client.responses.create(model="scripted", input="Hello, pod.")
            assert response.status == "completed" and response.output_text
            assert (await client.responses.retrieve(response.id)).id == response.id
        assert (data_dir / "parley.sqlite3").exists()  # state went to the pod's data volume
    finally:
        for process in reversed(started):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
