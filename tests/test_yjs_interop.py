"""A JavaScript Yjs client (real yjs from npm, in Node) reads and writes memories by
docs/schema.md alone."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from subcog_crdt import Captured, ConversationsApi, Event, Updated

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "node" / "interop.mjs"


def run(node: str, *args: str) -> str:
    out = subprocess.run(
        [node, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


# compared as they are; the others below need converting
PLAIN = (
    "content",
    "deleted",
    "version",
    "domain",
    "status",
    "source",
    "source_session",
    "updated_by",
)


def assert_js_reads_like_python(api: ConversationsApi, seen: dict[str, Any]) -> None:
    """Every memory as JavaScript derived it from the document equals the Python node's,
    field by field (docs/schema.md lists them)."""
    mems = api.memories("decisions", include_deleted=True)
    assert sorted(seen) == sorted(m.id for m in mems)
    for m in mems:
        js = seen[m.id]
        for name in PLAIN:
            assert js[name] == getattr(m, name), (m.id, name)
        assert tuple(js["captured_by"]) == m.captured_by
        assert tuple(js["tags"]) == m.tags
        assert js["metadata"] == dict(m.metadata)
        expires = js["expires_at"]
        assert (datetime.fromisoformat(expires) if expires else None) == m.expires_at
        assert js["created_at_ms"] == _ms(m.created_at)
        assert js["updated_at_ms"] == _ms(m.updated_at)
        assert js["stamp"] == m.clock


def _ms(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


async def test_js_client_reads_and_writes_every_field(node_js: str, tmp_path: Path) -> None:
    """JavaScript, following docs/schema.md only, derives every field of every memory as
    Python does, and its captures and updates (with metadata, domain, status, source,
    expires_at) read back in Python as written, and in JavaScript as Python sees them."""
    plus2 = timezone(timedelta(hours=2))
    async with ConversationsApi(listen=False) as api:
        s = await api.register_session("py-session", subscribe=["decisions"])
        other = await api.register_session("py-other", subscribe=[])
        kept = await s.capture(
            "decisions", "Use SQLite WAL", tags=["storage"],
            metadata={"ticket": "DB-7", "weights": [1, 2.5], "nested": {"ok": True}},
            domain="backend", status="proposed", source="design review",
            expires_at=datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=plus2),
        )  # fmt: skip
        changed = await s.capture("decisions", "first wording", domain="docs")
        await other.update(
            changed.id, content="Second wording", tags=["x"], status="accepted",
            metadata={"by": "py-other"}, source=None, expires_at="2031-02-03T04:05:06+00:00",
        )  # fmt: skip
        gone = await s.capture("decisions", "deleted fact", status="draft")
        await other.delete(gone.id)
        doc = api._docs["decisions"]
        state = tmp_path / "state.bin"
        state.write_bytes(doc.diff())

        # read: every memory as the Python node derives it
        assert_js_reads_like_python(api, json.loads(run(node_js, "read", str(state))))

        async def apply_js(cmd: str, *args: str) -> Event:
            """Run a JS write against the current state; apply its update in Python."""
            out = tmp_path / "js-update.bin"
            js_id = json.loads(run(node_js, cmd, str(state), str(out), *args))["id"]
            api._propagate(doc, doc.apply_update(out.read_bytes()))
            state.write_bytes(doc.diff())
            ev = await events.next(5)
            assert isinstance(ev, Event)  # not a Lagged marker
            assert ev.source_session == "js-session"
            assert ev.memory_id == js_id
            return ev

        # write: a new memory with every field, the same fact again (dedupes into the
        # Python one), and updates of a Python memory's fields
        events = s.events()
        js_fields = {
            "metadata": {"from": "js", "n": 3, "list": ["a", None]},
            "domain": "frontend",
            "status": "proposed",
            "source": "a JS client",
            "expires_at": "2032-03-04T05:06:07.890Z",
        }
        new = await apply_js("write", "decisions", "A fact from JavaScript", json.dumps(js_fields))
        assert isinstance(new, Captured)
        again = await apply_js("write", "decisions", "use sqlite  wal")
        assert again.memory_id == kept.id
        js_update = {"status": "accepted", "metadata": {"ticket": "DB-8"}, "source": None,
                     "domain": "storage", "expires_at": None}  # fmt: skip
        upd = await apply_js("update", kept.id, json.dumps(js_update))
        assert isinstance(upd, Updated)
        assert dict(upd.changes) == js_update

        fact = api.get(new.memory_id)
        assert fact.content == "A fact from JavaScript"
        assert fact.tags == ("from-js",)
        assert dict(fact.metadata) == js_fields["metadata"]
        assert (fact.domain, fact.status, fact.source) == ("frontend", "proposed", "a JS client")
        assert fact.expires_at == datetime(2032, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
        assert fact.source_session == fact.updated_by == "js-session"
        assert fact.captured_by == ("js-session",)

        m = api.get(kept.id)
        assert m.content == "Use SQLite WAL"  # a capture of a live memory sets no fields
        assert m.captured_by == ("py-session", "js-session")
        assert m.tags == ("storage", "from-js")
        assert dict(m.metadata) == {"ticket": "DB-8"}
        assert (m.domain, m.status, m.source, m.expires_at) == ("storage", "accepted", None, None)
        assert m.source_session == "py-session" and m.updated_by == "js-session"
        assert m.version == 3

        # and back: JavaScript reads what Python now holds, its own writes included
        assert_js_reads_like_python(api, json.loads(run(node_js, "read", str(state))))
