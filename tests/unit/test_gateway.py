"""The sidecar launcher: Envoy must not outlive the process that started it."""

import os
import signal
import subprocess
import sys
import time

import pytest
from parley import gateway

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

# A parent that starts a long-running child through the launcher, prints the child's pid, and
# waits to be killed.
_PARENT = """
import subprocess, sys, time
from parley.gateway import guarded_command
child = subprocess.Popen(guarded_command(["sleep", "120"]))
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_child_dies_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and open(f"/proc/{child}/cmdline").read().split("\0")[0] != "sleep":
            time.sleep(0.05)  # still the launcher: wait for it to exec
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its SIGKILLed parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_launcher_runs_the_command_with_its_arguments():
    result = subprocess.run(gateway.guarded_command(["printf", "%s|%s", "a b", "c"]), capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "a b|c")


@pytest.mark.parametrize("overrides", [{}, {"rest_port_serves_grpc": True, "envoy_admin_port": 9901}])
def test_the_rendered_config_is_one_envoy_accepts(tmp_path, overrides):
    from parley import config

    rendered = tmp_path / "envoy.yaml"
    rendered.write_text(gateway.render(config.load(environ={}, **overrides), 50051,
                                       admin_socket=tmp_path / "admin.sock"))
    result = subprocess.run([gateway.envoy_binary(), "--mode", "validate", "-c", str(rendered)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("typed_grpc" in rendered.read_text()) == bool(overrides)
