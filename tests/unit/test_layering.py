"""Import rules: only codec/ and transport/ touch generated code; CPU path never imports TRT-LLM."""

import ast
import subprocess
import sys
from pathlib import Path

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


def test_the_cpu_path_never_imports_tensorrt_llm():
    code = ("import sys, parley.app, parley.cli, parley.engine.llamacpp, parley.engine.registry; "
            "print([m for m in sys.modules if m.startswith('tensorrt')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
