"""The ``node_js`` fixture: Node with the pinned yjs (``benchmarks/node``) for tests that
run real Yjs code. Skipped where Node is missing, except under CI, where it fails."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "benchmarks" / "node"


@pytest.fixture(scope="module")
def node_js() -> str:
    node = shutil.which("node")
    reason = None
    if node is None:
        reason = "node is not installed"
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from anchors import ensure_node_deps

        reason = ensure_node_deps(NODE_DIR)
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"tests with Yjs in Node need Node under CI: {reason}")
        pytest.skip(reason)
    assert node is not None
    return node
