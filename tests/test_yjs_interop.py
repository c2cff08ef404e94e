"""A JavaScript Yjs client (real yjs from npm, in Node) reads and writes memories by
docs/schema.md alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from subcog_crdt import ConversationsApi

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "node" / "interop.mjs"
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
            pytest.fail(f"Yjs interop needs Node under CI: {reason}")
        pytest.skip(reason)
    assert node is not None
    return node


def run(node: str, *args: str) -> str:
    out = subprocess.run(
        [node, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_js_client_reads_and_captures(node_js, tmp_path):
    async with ConversationsApi(listen=False) as api:
        s = await api.register_session("py-session", subscribe=["decisions"])
        kept = await s.capture("decisions", "Use SQLite WAL", tags=["storage"])
        changed = await s.capture("decisions", "first wording")
        await s.update(changed.id, content="Second wording", tags=["x"])
        gone = await s.capture("decisions", "deleted fact")
        await s.delete(gone.id)
        doc = api._docs["decisions"]
        state = tmp_path / "state.bin"
        state.write_bytes(doc.diff())

        # read: every memory as the Python node derives it
        seen = json.loads(run(node_js, "read", str(state)))
        for m in api.memories("decisions", include_deleted=True):
            js = seen[m.id]
            assert js["content"] == m.content
            assert js["deleted"] == m.deleted
            assert js["version"] == m.version
            assert tuple(js["captured_by"]) == m.captured_by
            assert tuple(js.get("tags", [])) == m.tags

        # write: a new memory, and the same fact again (dedupes into the Python one)
        events = s.events()
        for content, expect_id in (("A fact from JavaScript", None), ("use sqlite  wal", kept.id)):
            out = tmp_path / "js-update.bin"
            js_id = json.loads(run(node_js, "write", str(state), "decisions", content, str(out)))
            if expect_id is not None:
                assert js_id["id"] == expect_id
            got = doc.apply_update(out.read_bytes())
            api._propagate(doc, got)
            state.write_bytes(doc.diff())
            ev = await events.next(5)
            assert ev.source_session == "js-session"
            assert ev.memory.id == js_id["id"]
        assert api.get(kept.id).captured_by == ("py-session", "js-session")
        assert "from-js" in api.get(kept.id).tags
        new = [m for m in api.memories("decisions") if m.content == "A fact from JavaScript"]
        assert len(new) == 1
        assert new[0].source_session == "js-session"
