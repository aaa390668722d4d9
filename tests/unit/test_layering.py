"""Import rules: only codec/ and transport/ touch generated code; the layers import downwards only."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "server" / "parley"


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_codec_and_transport_import_generated_code():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("v1", "codec", "transport"):
            continue
        if any(name == "parley.v1" or name.startswith("parley.v1.") for name in imports_of(path)):
            offenders.append(str(relative))
    assert offenders == []


# Each layer, and the layers it must never import (transport → codec, service → engine, store).
FORBIDDEN = {
    "service": ("parley.transport", "parley.codec", "parley.app", "parley.cli"),
    "engine": ("parley.service", "parley.store", "parley.transport", "parley.codec", "parley.app"),
    "store": ("parley.service", "parley.engine", "parley.transport", "parley.codec", "parley.app"),
    "codec": ("parley.service", "parley.engine", "parley.store", "parley.transport", "parley.app"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_downwards_only(layer):
    offenders = []
    for path in (PACKAGE / layer).rglob("*.py"):
        for name in imports_of(path):
            if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN[layer]):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert offenders == []


def test_only_the_tensorrt_llm_engine_imports_tensorrt_llm():
    importers = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                       if any(name == "tensorrt_llm" or name.startswith("tensorrt_llm.") for name in imports_of(path)))
    assert importers == ["engine/trtllm.py"]


def test_the_cpu_path_never_loads_the_tensorrt_llm_engine():
    import subprocess
    import sys

    probe = ("import sys; from parley import config, cli, app; from parley.engine.registry import build_engine; "
             "build_engine(config.load(environ={}, engine='scripted')); "
             "import parley.engine.llamacpp; "
             "loaded = [m for m in sys.modules if m == 'tensorrt_llm' or m.startswith(('tensorrt_llm.', "
             "'parley.engine.trtllm'))]; print(loaded); sys.exit(1 if loaded else 0)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_wheel_lists_every_package_and_the_gateway_ships_its_files():
    """pyproject.toml lists packages by hand (gateway/ is mapped in as parley.gateway): a package
    left off the list would be missing from an installed Parley."""
    import tomllib

    project = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {"parley." + ".".join(path.parent.relative_to(PACKAGE).parts) if path.parent != PACKAGE else "parley"
             for path in PACKAGE.rglob("__init__.py")}
    assert found | {"parley.gateway"} == set(project["packages"])
    assert project["package-dir"]["parley.gateway"] == "gateway"
    gateway = PACKAGE.parents[1] / "gateway"
    assert {"envoy.yaml", "parley.pb"} == set(project["package-data"]["parley.gateway"])
    assert (gateway / "envoy.yaml").is_file()


def test_the_gateway_imports_only_configuration_and_logging():
    gateway = PACKAGE.parents[1] / "gateway"
    parley_imports = {name for path in gateway.rglob("*.py") for name in imports_of(path) if name.startswith("parley")}
    assert parley_imports <= {"parley.config", "parley.log"}
