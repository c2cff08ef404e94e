"""Review 9: the ``subcog-crdt`` CLI and MCP server (src/subcog_crdt/cli.py,
src/subcog_crdt/mcp_server.py, src/subcog_crdt/_plain.py), used as a user and an agent
would: real processes (``python -m subcog_crdt``), the official MCP client over stdio, a
registry directory of the test's own, loopback only, no mDNS (no secret anywhere).

Every process started is killed at the end, also when a test fails; waits are deadlines
on a condition (a process exit, a registry file), never sleeps."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from mcp.client.session import ClientSession

from subcog_crdt.cli import SECRET_ENV
from support.mcpclient import call as ok
from support.mcpclient import call_error as error_text
from support.mcpclient import mcp_server

NS = "d"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != SECRET_ENV}


def _argv(registry: Path, command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "subcog_crdt", command, *args, "--discovery-dir", str(registry)]


def _call(registry: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _argv(registry, command, *args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )


def _entries(registry: Path) -> list[str]:
    return sorted(p.stem for p in registry.glob("*.json")) if registry.is_dir() else []


def _wait_until(cond: Any, timeout: float, what: str) -> Any:
    """Poll ``cond`` (a condition, not a pause) until truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()


def agent(registry: Path, *args: str) -> contextlib.AbstractAsyncContextManager[ClientSession]:
    """The official MCP client on a fresh ``subcog-crdt mcp`` process."""
    return mcp_server(
        ["--discovery-dir", str(registry), *args], registry.parent / "mcp-server.log", env=_env()
    )


# -- MCP: bugs ---------------------------------------------------------------------------


def test_mcp_server_stops_on_sigterm_while_its_client_keeps_stdin_open(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """docs/mcp.md: "The server closes when the host closes its stdin, or on
    SIGTERM/SIGINT"; docs/cli.md: exit 0 on SIGTERM. A host that SIGTERMs its tool
    server keeps the pipe open until the child is gone."""
    registry = tmp_path / "registry"
    proc = subprocess.Popen(
        _argv(registry, "mcp", "--session", "agent", "--subscribe", NS),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env=_env(),
    )
    procs.append(proc)
    assert proc.stdin is not None and proc.stdout is not None
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "review9", "version": "0"},
        },
    }
    proc.stdin.write(json.dumps(init) + "\n")
    proc.stdin.flush()
    reply = json.loads(proc.stdout.readline())  # served: the node is open and registered
    assert reply["id"] == 1 and "result" in reply, reply
    assert len(_entries(registry)) == 1

    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(10)  # a deadline on the exit; a clean stop takes well under it
    except subprocess.TimeoutExpired:
        status = None
    left = _entries(registry)
    assert status == 0, f"still running after SIGTERM (registry entries left: {left})"
    assert left == []


async def test_mcp_update_can_clear_an_optional_field(tmp_path: Path) -> None:
    """The library clears ``domain``/``status``/``source``/``expires_at`` with None
    (docs/schema.md: "or null"); an agent that wants a memory to stop expiring has no way
    to say so through ``subcog_update``: null is taken as "not given"."""
    async with agent(tmp_path / "registry", "--no-discovery", "--session", "a") as a:
        m = await ok(
            a, "subcog_capture", namespace=NS, content="temporary workaround for the build",
            expires_at="2030-01-01T00:00:00Z", domain="build",
        )  # fmt: skip
        assert m["expires_at"] == "2030-01-01T00:00:00+00:00"
        # (An explicit null means "not given", as for every other tool argument: clearing
        # is said with ``clear``, docs/mcp.md.)
        result = await a.call_tool(
            "subcog_update", {"memory_id": m["id"], "clear": ["expires_at", "domain"]}
        )
        now = await ok(a, "subcog_get", memory_id=m["id"])
        assert not result.is_error, result.content
        assert (now["expires_at"], now["domain"]) == (None, None)


async def test_mcp_since_that_looks_numeric_is_a_clear_tool_error(tmp_path: Path) -> None:
    """``_since`` sends any ``str.isdigit()`` text to ``int()``: a superscript digit or a
    cursor longer than Python's int-string limit raises ValueError there, which the SDK
    turns into a bare "Error executing tool subcog_session_sync" (no reason given)."""
    async with agent(tmp_path / "registry", "--no-discovery", "--session", "a") as a:
        for since in ("²", "9" * 5000):
            text = await error_text(a, "subcog_session_sync", since=since)
            assert "since" in text.removeprefix("Error executing tool subcog_session_sync"), (
                since[:10],
                text,
            )


async def test_mcp_error_text_starts_with_the_library_error_class(tmp_path: Path) -> None:
    """docs/mcp.md, Errors: a refused call is a tool error "whose text starts with the
    library's error class" (``ConflictError: ...``). The SDK prefixes every ToolError
    with "Error executing tool <name>: "."""
    async with agent(tmp_path / "registry", "--no-discovery", "--session", "a") as a:
        m = await ok(a, "subcog_capture", namespace=NS, content="first")
        await ok(a, "subcog_update", memory_id=m["id"], content="second")
        text = await error_text(
            a, "subcog_update", memory_id=m["id"], content="stale", expected_version=m["version"]
        )
        # docs/mcp.md now says what the SDK does: its prefix, then the library's class.
        assert text.startswith("Error executing tool subcog_update: ConflictError: "), text
        assert (await ok(a, "subcog_get", memory_id=m["id"]))["content"] == "second"


async def test_mcp_times_are_utc(tmp_path: Path) -> None:
    """docs/mcp.md: "times are ISO 8601 in UTC" (and _plain.py's docstring). An
    ``expires_at`` captured with an offset comes back with that offset, so an agent that
    compares the strings (as ISO 8601 in one zone allows) orders them wrongly."""
    opts = ("--no-discovery", "--session", "a", "--subscribe", NS)
    async with agent(tmp_path / "registry", *opts) as a:
        m = await ok(
            a, "subcog_capture", namespace=NS, content="expires in Paris",
            expires_at="2030-01-01T09:00:00+02:00",
        )  # fmt: skip
        assert m["created_at"].endswith("+00:00")
        assert m["expires_at"] == "2030-01-01T07:00:00+00:00"
        events = (await ok(a, "subcog_session_sync", since=0, include_own=True))["events"]
        assert [e["memory"]["expires_at"] for e in events] == ["2030-01-01T07:00:00+00:00"]


# -- CLI: bugs ---------------------------------------------------------------------------


def test_a_capture_confirmed_only_by_another_one_shot_node_is_not_reported_stored(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """docs/cli.md: without --data-dir, what capture writes "exists only once a peer (a
    run node, an agent's embedded node) has stored it", and capture fails (exit 1) when
    none confirms. A one-shot command's node (here ``peers``, held open by a peer that
    never answers its handshake) confirms too, then exits with it in memory: capture
    says done (exit 0, an id) for a memory no process keeps."""
    registry = tmp_path / "registry"
    silent = socket.socket()  # accepts TCP, never speaks: the dial waits for its handshake
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        holder = subprocess.Popen(
            _argv(registry, "peers", "--peer", f"ws://127.0.0.1:{port}", "--wait", "20"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env=_env(),
        )
        procs.append(holder)
        _wait_until(lambda: _entries(registry), 20, "the one-shot node's registry entry")

        r = _call(registry, "capture", NS, "a fact only a one-shot node saw", "--wait", "3")
        assert holder.wait(30) == 0  # the one-shot node is gone, and its memory with it
    finally:
        silent.close()
    assert _entries(registry) == []

    # Nothing keeps the memory now: a capture reported done must be recallable.
    hits = json.loads(_call(registry, "recall", "one-shot", "--json", "--wait", "1").stdout)
    stored = r.stdout.strip() in [h["id"] for h in hits]
    assert (r.returncode == 0) == stored, (
        f"capture exit {r.returncode} (stdout {r.stdout.strip()!r}, stderr {r.stderr!r}); "
        f"memory held by a node afterwards: {stored}"
    )


# -- behaviour that holds (kept as regression checks) ------------------------------------


async def test_mcp_round_trips_unicode_nested_metadata_and_empty_tags(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    async with agent(registry, "--session", "a", "--subscribe", NS) as a, agent(registry) as b:
        await ok(b, "subcog_session_register", session_id="b", subscribe=[NS])
        meta = {"n": 1, "f": 1.5, "big": 2**40, "deep": {"list": [1, {"z": None}], "t": True}}
        m = await ok(
            a, "subcog_capture", namespace=NS, content="héllo 🌍\nwörld\t\"q\"",
            tags=["ü", "x"], metadata=meta, expires_at="2030-01-01T09:00:00+02:00",
        )  # fmt: skip
        # b waits in sync (nothing polls) and gets the memory exactly as captured.
        got = await ok(b, "subcog_session_sync", wait=30)
        [ev] = got["events"]
        assert ev["type"] == "captured" and ev["source_session"] == "a"
        mem = ev["memory"]
        assert (mem["content"], mem["tags"], mem["metadata"]) == (
            'héllo 🌍\nwörld\t"q"',
            ["ü", "x"],
            meta,
        )
        assert mem["expires_at"] == m["expires_at"]
        # Tags and metadata can be emptied; the change reaches the other agent.
        await ok(b, "subcog_update", memory_id=m["id"], tags=[], metadata={})
        got = await ok(a, "subcog_session_sync", wait=30)
        assert [(e["type"], e["changes"]) for e in got["events"]] == [
            ("updated", {"tags": [], "metadata": {}})
        ]
        # Bad arguments are tool errors, and the server keeps serving.
        assert "InvalidArgument" in await error_text(a, "subcog_recall", query="x", limit=-1)
        assert "InvalidArgument" in await error_text(a, "subcog_session_sync", since=-5)
        assert "InvalidArgument" in await error_text(a, "subcog_session_sync", limit=0)
        assert (await ok(a, "subcog_get", memory_id=m["id"]))["tags"] == []
