"""Golden JSON files: normalized documents compared byte-for-byte; `make golden-update` rewrites."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
_ID = re.compile(r"^(resp|msg|fc|fco|call|rs)_[0-9a-f]{48}$")


def normalize(document):
    """Replace ids and clocks so goldens only change when the shape or content changes."""
    seen: dict[str, str] = {}

    def walk(node, key=None):
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str) and _ID.match(node):
            prefix = node.split("_")[0]
            seen.setdefault(node, f"{prefix}_{sum(1 for v in seen.values() if v.startswith(prefix + '_')) + 1}")
            return seen[node]
        if key in ("created_at", "completed_at", "created") and isinstance(node, int):
            return 0
        return node

    return walk(document)


def assert_golden(name: str, document) -> None:
    path = GOLDEN_DIR / f"{name}.json"
    text = json.dumps(normalize(document), indent=2, sort_keys=True) + "\n"
    if os.environ.get("PARLEY_UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.is_file(), f"missing golden {path}; run `make golden-update`"
    assert path.read_text() == text, f"{path} differs; if the change is intended, run `make golden-update`"
