"""The MCP server (``subcog-crdt mcp``; src/subcog_crdt/mcp_server.py), driven by the
official MCP client over stdio, as an agent's host runs it.

Each server is a real node process; two of them share a temporary discovery registry
(loopback only, no mDNS: no secret) and so one memory. What is asserted: the tools of
DESIGN.md are listed; a capture by one agent reaches the other's
``subcog_session_sync`` (which waits for it: nothing polls) naming the right session; the
same fact captured by both is one memory with both in ``captured_by``; recall, sessions
and peers see the other agent; a stale ``expected_version`` is a tool error naming
``ConflictError`` and changes nothing; bad arguments are clear tool errors; and a durable
server's ``since="last"`` resumes exactly once across a restart."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

pytest.importorskip("mcp")  # the dev extra installs it; `make test` always has it

from mcp.client.session import ClientSession

from support.mcpclient import call, call_error, mcp_server

DESIGN_TOOLS = {
    "subcog_session_register",
    "subcog_session_sync",
    "subcog_capture",
    "subcog_recall",
    "subcog_update",
    "subcog_delete",
    "subcog_sessions",
    "subcog_peers",
}


def agent(registry: Path, *args: str) -> contextlib.AbstractAsyncContextManager[ClientSession]:
    """An MCP client connected to a fresh ``subcog-crdt mcp`` server process."""
    return mcp_server(["--discovery-dir", str(registry), *args], registry.parent / "mcp-server.log")


async def test_two_agents_share_one_memory_live(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    async with agent(registry) as a, agent(registry) as b:
        tools = {t.name for t in (await a.list_tools()).tools}
        assert tools >= DESIGN_TOOLS
        await call(a, "subcog_session_register", session_id="agent-a", subscribe=["decisions"])
        await call(b, "subcog_session_register", session_id="agent-b", subscribe=["decisions"])

        m = await call(
            a, "subcog_capture", namespace="decisions", content="We chose SQLite WAL",
            tags=["storage"],
        )  # fmt: skip
        assert m["captured_by"] == ["agent-a"]
        # b blocks in sync until a's capture arrives (wait=), then gets it once.
        batch = await call(b, "subcog_session_sync", since="last", wait=30)
        assert [(e["type"], e["source_session"], e["memory_id"]) for e in batch["events"]] == [
            ("captured", "agent-a", m["id"])
        ]
        assert batch["events"][0]["memory"]["content"] == "We chose SQLite WAL"
        assert (await call(b, "subcog_session_sync", since="last"))["events"] == []

        # The same fact captured by b (other case, spacing): one memory, both sessions.
        again = await call(
            b, "subcog_capture", namespace="decisions", content="we chose  sqlite wal"
        )
        assert again["id"] == m["id"]
        assert again["captured_by"] == ["agent-a", "agent-b"]
        hits = (await call(b, "subcog_recall", query="sqlite"))["memories"]
        assert [h["id"] for h in hits] == [m["id"]]

        sessions = {s["id"]: s for s in (await call(b, "subcog_sessions"))["sessions"]}
        assert sessions["agent-b"]["is_local"] is True
        assert sessions["agent-a"]["is_local"] is False
        assert sessions["agent-a"]["subscriptions"] == ["decisions"]
        peers_of_b = await call(b, "subcog_peers")
        peers_of_a = await call(a, "subcog_peers")
        assert [p["node_id"] for p in peers_of_b["peers"]] == [peers_of_a["node_id"]]

        # b's update reaches a as an Updated event naming b.
        changed = await call(
            b, "subcog_update", memory_id=m["id"], content="We chose SQLite WAL + fsync batching",
            expected_version=again["version"],
        )  # fmt: skip
        got = await call(a, "subcog_session_sync", since="last", wait=30)
        updates = [e for e in got["events"] if e["type"] == "updated"]
        assert [(e["source_session"], e["changes"]["content"]) for e in updates] == [
            ("agent-b", "We chose SQLite WAL + fsync batching")
        ]
        history = (await call(a, "subcog_history", memory_id=m["id"]))["writes"]
        assert [w["session"] for w in history][-1] == "agent-b"
        assert changed["version"] == again["version"] + 1


async def test_errors_are_clear_and_change_nothing(tmp_path: Path) -> None:
    async with agent(tmp_path / "registry", "--no-discovery") as a:
        # Nothing registered: a write says what to do.
        text = await call_error(a, "subcog_capture", namespace="decisions", content="x")
        assert "subcog_session_register" in text
        await call(a, "subcog_session_register", session_id="agent-a", subscribe=["decisions"])
        m = await call(a, "subcog_capture", namespace="decisions", content="first version")
        await call(a, "subcog_update", memory_id=m["id"], content="second version")

        text = await call_error(
            a, "subcog_update", memory_id=m["id"], content="stale write",
            expected_version=m["version"],
        )  # fmt: skip
        assert "ConflictError" in text
        assert (await call(a, "subcog_get", memory_id=m["id"]))["content"] == "second version"

        assert "InvalidNamespace" in await call_error(
            a, "subcog_capture", namespace="Not A Namespace", content="x"
        )
        assert "since must be" in await call_error(a, "subcog_session_sync", since="yesterday")
        assert "wait must be" in await call_error(a, "subcog_session_sync", wait=3600)
        assert "not registered here" in await call_error(
            a, "subcog_recall", query="x", session_id="nobody"
        )
        assert "NotFound" in await call_error(a, "subcog_get", memory_id="0" * 32)
        assert "nothing to update" in await call_error(a, "subcog_update", memory_id=m["id"])
        # Nothing above changed the namespace: the two writes are all there is.
        assert len((await call(a, "subcog_history", memory_id=m["id"]))["writes"]) == 2
        assert [
            h["content"] for h in (await call(a, "subcog_recall", query="version"))["memories"]
        ] == ["second version"]


async def test_a_durable_server_resumes_sync_exactly_once_across_restarts(tmp_path: Path) -> None:
    registry, data = tmp_path / "registry", str(tmp_path / "data")
    opts = ("--no-discovery", "--data-dir", data)
    async with agent(registry, *opts) as a:
        await call(a, "subcog_session_register", session_id="agent-a", subscribe=["decisions"])
        await call(a, "subcog_session_register", session_id="writer", subscribe=["decisions"])
        for i in range(3):
            await call(
                a, "subcog_capture", namespace="decisions", content=f"fact {i}", session_id="writer"
            )
        first = await call(a, "subcog_session_sync", session_id="agent-a", limit=2)
        assert [e["memory"]["content"] for e in first["events"]] == ["fact 0", "fact 1"]
        assert first["more"] is True
    async with agent(registry, *opts) as a:
        # Registered again without subscribe: it resumes (subscriptions and cursor kept).
        info = await call(a, "subcog_session_register", session_id="agent-a")
        assert info["subscriptions"] == ["decisions"]
        rest = await call(a, "subcog_session_sync", session_id="agent-a")
        assert [e["memory"]["content"] for e in rest["events"]] == ["fact 2"]
        assert rest["complete"] is True and rest["more"] is False
