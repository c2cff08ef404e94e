"""The pages of the integration surfaces hold: docs/cli.md, docs/mcp.md, docs/push.md,
docs/yjs.md, README.md's list of them and docs/index.md's "Short-lived processes:
settle". Each test names the page and the claim it checks; the Python examples of these
pages already run in tests/test_docs_examples.py, so this file checks the rest: command
lines and their output, exit statuses, JSON shapes, endpoints, statuses, limits.

Everything runs for real on 127.0.0.1: CLI commands are ``python -m subcog_crdt``
processes sharing a registry directory of the test's own (no mDNS: no secret, or
``--no-discovery``); the MCP server is driven by the official MCP client; HTTP push and
``/yjs/`` are read with aiohttp clients; a relay is an aiohttp server in this process.
Every process started is killed at the end, also when the test fails."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from pycrdt import Doc, Map

import subcog_crdt._push as push_module
from helpers import url_of, wait_for
from subcog_crdt import ConversationsApi, InvalidArgument, Retention
from subcog_crdt._core.ydecode import varuint_bytes
from subcog_crdt._relay import MAX_ROOMS
from subcog_crdt._yjs import _CLOSE_WITHIN, _QUEUE_BYTES, STEP2, UPDATE, sync_message
from subcog_crdt.cli import SECRET_ENV, build_parser
from support.mcpclient import call, call_error, mcp_server
from support.nodeproc import kill_groups

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LOOPBACK: dict[str, Any] = {"host": "127.0.0.1", "discovery": ()}
MEMORY_ID = re.compile(r"[0-9a-f]{20}")
NODE_ID = re.compile(r"[0-9a-f]{16}")
SECRET = "correct horse battery staple, long enough"


def doc_text(name: str) -> str:
    return (ROOT / name).read_text()


# -- CLI processes -----------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    env.update(extra)
    return env


def wait_until(cond: Any, timeout: float, what: str) -> Any:
    """Poll ``cond`` (in a thread-free test) until truthy, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


class Cli:
    """CLI processes sharing one registry directory (the test's own)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.registry = tmp / "registry"
        self.popens: list[subprocess.Popen[str]] = []

    def argv(self, command: str, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "subcog_crdt",
            command,
            *args,
            "--discovery-dir",
            str(self.registry),
        ]

    def call(self, command: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command, *args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(**env),
        )

    def start(self, command: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.argv(command, *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env=_env(),
        )
        self.popens.append(proc)
        return proc

    def kill_all(self) -> None:
        kill_groups(self.popens)


class Lines:
    """The stdout lines of a running process, read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self._q.put(line.rstrip("\n"))

        threading.Thread(target=read, daemon=True).start()

    def expect(self, pred: Any, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if pred(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.lines}")
            try:
                self.lines.append(self._q.get(timeout=left))
            except queue.Empty:
                pass


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}; stderr: {r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, Lines]]:
    """A ``subcog-crdt run --session watcher --subscribe d`` node (text output) that keeps
    the memories the one-shot commands of a test capture."""
    cli = Cli(tmp_path_factory.mktemp("cli"))
    try:
        lines = Lines(cli.start("run", "--session", "watcher", "--subscribe", "d"))
        lines.expect(lambda s: s.startswith("node\t"), 30, "the node line")
        yield cli, lines
    finally:
        cli.kill_all()


def test_cli_run_text_lines_as_documented(hub: tuple[Cli, Lines]) -> None:
    """docs/cli.md, "run": the first line is ``node<TAB>id<TAB>url``; a peer joining is
    ``peer joined<TAB>node_id<TAB>url<TAB>user<TAB>namespaces``; an event line is cursor,
    type, namespace, memory id, ``session@node``, content, with newlines and tabs shown as
    ``\\n`` and ``\\t`` (one record per line). "peers, sessions": the columns listed."""
    cli, run = hub
    node_line = run.lines[0].split("\t")
    assert node_line[0] == "node" and NODE_ID.fullmatch(node_line[1])
    assert re.fullmatch(r"ws://127\.0\.0\.1:\d+", node_line[2]), node_line
    hub_id, hub_url = node_line[1], node_line[2]

    r = cli.call("capture", "d", "two\tcolumns\nand two lines", "--json", "--wait", "10")
    mem = json.loads(ok(r))
    event = run.expect(lambda s: mem["id"] in s, 15, "the capture's event line").split("\t")
    assert event[1:5] == ["captured", "d", mem["id"], f"cli@{event[4].split('@')[1]}"]
    assert event[0].isdigit() and NODE_ID.fullmatch(event[4].split("@")[1])
    assert event[5:] == ["two\\tcolumns\\nand two lines"]  # one line, one column
    # peers: node_id, URL, user, namespaces; sessions: id, user, node_id, remote, subs.
    peers = ok(cli.call("peers", "--wait", "10")).splitlines()
    assert [p.split("\t")[:2] + p.split("\t")[3:] for p in peers] == [[hub_id, hub_url, "d"]]
    sessions = ok(cli.call("sessions", "--wait", "10")).splitlines()
    assert [(s.split("\t")[0], *s.split("\t")[2:]) for s in sessions] == [
        ("watcher", hub_id, "remote", "d")
    ]

    # A node that stays: "peer joined" with its columns, then "peer left" when it stops.
    other = cli.start("run", "--subscribe", "e")
    other_id, other_url = Lines(other).expect(bool, 30, "its node line").split("\t")[1:]
    joined = run.expect(lambda s: s.startswith(f"peer joined\t{other_id}"), 15, "joined")
    assert joined.split("\t")[:3] == ["peer joined", other_id, other_url]
    assert len(joined.split("\t")) == 5  # then user and namespaces
    # Its session: "session joined" with the columns of `sessions`, "session left" after.
    sess = run.expect(
        lambda s: s.startswith("session joined\t") and f"\t{other_id}\t" in s, 15, "session"
    )
    assert sess.split("\t")[1].startswith("cli-")
    assert sess.split("\t")[3:] == [other_id, "remote", "e"]
    other.send_signal(signal.SIGTERM)
    assert other.wait(30) == 0
    run.expect(lambda s: s == f"peer left\t{other_id}", 15, "the peer left line")
    run.expect(
        lambda s: s == f"session left\t{sess.split(chr(9))[1]}\t{other_id}", 15, "session left"
    )


def test_cli_sync_since_a_datetime_without_offset_is_local_time(hub: tuple[Cli, Lines]) -> None:
    """docs/cli.md, "sync": ``--since DATETIME`` is ISO 8601 (``2025-06-01T09:00``,
    ``...Z``); without an offset it is local time; it works without ``--data-dir``, the
    node catching up from its peers first. (The process runs at UTC+5, so a local time
    read as UTC would be five hours off.)"""
    cli, _ = hub
    mid = ok(cli.call("capture", "d", "a dated fact", "--wait", "10")).strip()
    here = timezone(timedelta(hours=5))
    local_now = datetime.now(here).replace(tzinfo=None, second=0, microsecond=0)

    def synced(since: str) -> list[str]:
        out = cli.call(
            "sync", "--session", "scratch", "--subscribe", "d", "--since", since, "--json",
            "--wait", "10", TZ="Etc/GMT-5",
        )  # fmt: skip
        return [e["memory_id"] for e in json.loads(ok(out))["events"]]

    assert mid in synced((local_now - timedelta(minutes=10)).isoformat(timespec="minutes"))
    assert mid not in synced((local_now + timedelta(minutes=10)).isoformat(timespec="minutes"))
    utc_before = (datetime.now(UTC) - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert mid in synced(utc_before)


def test_cli_sync_limit_and_the_stderr_hints(hub: tuple[Cli, Lines], tmp_path: Path) -> None:
    """docs/cli.md, "sync": a new session without ``--subscribe`` subscribes to nothing,
    which stderr points out; text mode prints one line per event and gives the count and
    cursor on stderr; when ``--limit`` cuts the batch short stderr says so and the next
    ``--since last`` run continues."""
    cli, _ = hub
    data = str(tmp_path / "syncer")
    r = cli.call("sync", "--session", "lim", "--data-dir", data, "--wait", "10")
    assert ok(r) == ""
    assert "subscribes to nothing" in r.stderr and "--subscribe" in r.stderr
    ok(cli.call("sync", "--session", "lim", "--subscribe", "d", "--data-dir", data))
    ids = [
        ok(cli.call("capture", "d", f"limit fact {i}", "--wait", "10")).strip() for i in range(3)
    ]

    first = cli.call("sync", "--session", "lim", "--data-dir", data, "--limit", "2", "--wait", "10")
    got = [line.split("\t")[3] for line in ok(first).splitlines()]
    assert len(got) == 2
    assert re.search(r"2 event\(s\), cursor \d+", first.stderr), first.stderr
    assert "more events" in first.stderr
    rest = cli.call("sync", "--session", "lim", "--data-dir", data, "--wait", "10")
    got += [line.split("\t")[3] for line in ok(rest).splitlines()]
    assert sorted(got) == sorted(ids)
    assert "more events" not in rest.stderr


def test_cli_node_options_table_matches_the_parser() -> None:
    """docs/cli.md, "Node options": every command that opens a node (all but ``demo``)
    takes exactly the options of the table (``--secret`` is refused, not an option); the
    one-shot commands also take ``--wait`` (default 3) and ``--json``; ``--limit``
    defaults to 10 (recall) and 1000 (sync); README.md lists
    the commands ``run | capture | recall | sync | peers | sessions | mcp | demo``."""
    table = re.findall(r"^\| (`-[^|]*)\|", doc_text("docs/cli.md"), re.M)
    documented = {opt for cell in table for opt in re.findall(r"`(--?[a-z-]+)", cell)}
    assert len(documented) == 12  # (-v and --verbose)
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a.choices, dict)]
    assert isinstance(sub.choices, dict)
    readme = re.search(r"`subcog-crdt (run(?: \| \w+)+)`", doc_text("README.md"))
    assert readme is not None
    assert sorted(readme.group(1).split(" | ")) == sorted(sub.choices)
    for name, command in sub.choices.items():
        opts = {s for a in command._actions for s in a.option_strings if s.startswith("-")}
        if name == "demo":
            assert opts == {"-h", "--help"}
            continue
        node = opts - {"-h", "--help", "--secret", "--session", "--subscribe", "--json"}
        node -= {"--wait", "--tag", "--namespace", "--limit", "--since", "--include-own"}
        assert node == documented, name
        if name in ("capture", "recall", "sync", "peers", "sessions"):
            assert {"--wait", "--json"} <= opts
            needed = {"capture": ["ns", "text"], "recall": ["q"], "sync": ["--session", "s"]}
            parsed = command.parse_args(needed.get(name, []))
            assert parsed.wait == 3.0
            # "--limit defaults to 10" (recall), "(default 1000)" (sync)
            assert getattr(parsed, "limit", None) == {"recall": 10, "sync": 1000}.get(name)


def test_cli_host_beyond_loopback_without_a_secret_is_an_error() -> None:
    """docs/cli.md, "Node options" and "Exit status": without a secret only loopback is
    accepted for ``--host``; an error is one line ``subcog-crdt: error: ...``, exit 1."""
    r = subprocess.run(
        [sys.executable, "-m", "subcog_crdt", "peers", "--host", "0.0.0.0", "--no-discovery"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("subcog-crdt: error: ") and r.stderr.count("\n") == 1
    assert "loopback" in r.stderr


def test_cli_one_shot_interrupted_exits_130_with_its_node_closed(tmp_path: Path) -> None:
    """docs/cli.md, "Exit status": 130 for a one-shot command interrupted by Ctrl-C, its
    node closed on the way out (its registry entry gone). The command is held in its
    settle by a --peer that accepts TCP and never answers."""
    cli = Cli(tmp_path)
    silent = socket.create_server(("127.0.0.1", 0))
    silent.settimeout(30)
    try:
        port = silent.getsockname()[1]
        proc = cli.start("peers", "--peer", f"ws://127.0.0.1:{port}", "--wait", "30")
        held, _ = silent.accept()  # it dialled: it is settling
        wait_until(lambda: list(cli.registry.glob("*.json")), 30, "its registry entry")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        assert list(cli.registry.glob("*.json")) == []
        held.close()
    finally:
        silent.close()
        cli.kill_all()


# -- MCP ---------------------------------------------------------------------------------


def mcp_agent(
    tmp: Path, *args: str, env: dict[str, str] | None = None
) -> AbstractAsyncContextManager[Any]:
    (tmp / "cwd").mkdir(exist_ok=True)
    return mcp_server(["--no-discovery", *args], tmp / "mcp-server.log", env=env, cwd=tmp / "cwd")


MEMORY_KEYS = {
    "id", "namespace", "content", "tags", "metadata", "source_session", "captured_by",
    "created_at", "updated_at", "updated_by", "version", "deleted", "domain", "status",
    "source", "expires_at",
}  # fmt: skip
EVENT_KEYS = {
    "type", "cursor", "namespace", "memory_id", "source_session", "node_id", "write_id", "at",
}  # fmt: skip


async def test_mcp_tools_arguments_and_result_shapes(tmp_path: Path) -> None:
    """docs/mcp.md: the configuration's ``--data-dir ~/...`` (a host passes args without
    a shell) lands in the home directory; the ten tools of the table (and of README.md);
    the defaults ``limit`` 100 (sync) and 10 (recall); a call without ``session_id``
    acts as the session this client registered last, else the ``--session`` one; the
    documented fields of a session, a memory, an event, a history write and peers; recall
    without a namespace searches the session's subscriptions; ``wait`` up to 60;
    ``subcog_delete`` returns the memory with ``deleted`` true; an error is
    ``Error executing tool <name>: InvalidArgument: ...``."""
    home = tmp_path / "home"
    home.mkdir()
    documented = re.findall(r"^\| `(subcog_\w+)`", doc_text("docs/mcp.md"), re.M)
    readme = re.findall(r"`(subcog_\w+)`", doc_text("README.md"))
    opts = ("--session", "boot", "--subscribe", "d", "--data-dir", "~/.local/share/subcog/e1")
    async with mcp_agent(tmp_path, *opts, env={"HOME": str(home)}) as a:
        tools = {t.name: t for t in (await a.list_tools()).tools}
        assert sorted(tools) == sorted(documented) == sorted(readme)
        assert tools["subcog_session_sync"].input_schema["properties"]["limit"]["default"] == 100
        assert tools["subcog_recall"].input_schema["properties"]["limit"]["default"] == 10

        booted = await call(a, "subcog_capture", namespace="d", content="before register")
        assert booted["source_session"] == "boot"
        info = await call(a, "subcog_session_register", session_id="e1", subscribe=["d"])
        assert set(info) == {"id", "user_id", "node_id", "subscriptions", "is_local", "last_sync"}
        assert (info["id"], info["subscriptions"], info["is_local"]) == ("e1", ["d"], True)
        m = await call(a, "subcog_capture", namespace="d", content="fact one", tags=["t"])
        assert set(m) == MEMORY_KEYS and m["source_session"] == "e1"
        await call(a, "subcog_capture", namespace="other", content="fact two", tags=["t"])

        hits = (await call(a, "subcog_recall", query="fact"))["memories"]
        assert [h["content"] for h in hits] == ["fact one"]  # the session's subscriptions
        hits = (await call(a, "subcog_recall", query="fact", namespace="other"))["memories"]
        assert [h["content"] for h in hits] == ["fact two"]

        batch = await call(a, "subcog_session_sync", since=0, include_own=True, wait=60)
        assert set(batch) == {"events", "cursor", "complete", "more"}
        captured = [e for e in batch["events"] if e["memory_id"] == m["id"]]
        assert [set(e) for e in captured] == [EVENT_KEYS | {"memory"}]
        assert "wait must be" in await call_error(a, "subcog_session_sync", wait=60.5)
        text = await call_error(a, "subcog_session_sync", since=0, limit=0)
        assert text.startswith("Error executing tool subcog_session_sync: InvalidArgument: ")

        await call(a, "subcog_update", memory_id=m["id"], status="done")
        gone = await call(a, "subcog_delete", memory_id=m["id"])
        assert gone["deleted"] is True and set(gone) == MEMORY_KEYS
        writes = (await call(a, "subcog_history", memory_id=m["id"]))["writes"]
        assert [w["op"] for w in writes] == ["capture", "update", "delete"]
        assert {frozenset(w) for w in writes} == {
            frozenset({"memory_id", "at", "session", "node", "op", "changes"})
        }
        peers = await call(a, "subcog_peers")
        assert set(peers) == {"node_id", "peers"} and peers["peers"] == []
        ids = {s["id"] for s in (await call(a, "subcog_sessions"))["sessions"]}
        assert ids == {"boot", "e1"}
    assert (home / ".local/share/subcog/e1").is_dir()
    assert list((tmp_path / "cwd").iterdir()) == []  # no literal "~" directory


async def test_mcp_since_an_iso_datetime_without_offset(tmp_path: Path) -> None:
    """docs/mcp.md, "Tools": ``subcog_session_sync``'s ``since`` is "last", a cursor, or
    an ISO datetime. ``2000-01-01T00:00:00`` is one (docs/cli.md's own example,
    ``2025-06-01T09:00``, has no offset either), and every write is after it."""
    async with mcp_agent(tmp_path, "--session", "s", "--subscribe", "d") as a:
        m = await call(a, "subcog_capture", namespace="d", content="a fact")
        for since in ("2000-01-01T00:00:00+00:00", "2000-01-01T00:00:00"):
            batch = await call(a, "subcog_session_sync", since=since, include_own=True)
            assert [e["memory_id"] for e in batch["events"]] == [m["id"]], since


# -- HTTP push ---------------------------------------------------------------------------


def http(api: ConversationsApi) -> str:
    return url_of(api).replace("ws://", "http://", 1)


async def sse_block(resp: aiohttp.ClientResponse) -> str:
    """The next SSE block (up to a blank line) as its raw text."""
    lines: list[str] = []
    async with asyncio.timeout(30):
        while True:
            raw = await resp.content.readline()
            assert raw, "the stream ended"
            line = raw.decode().rstrip("\n")
            if line == "" and lines:
                return "\n".join(lines)
            if line:
                lines.append(line)


async def test_push_sse_wire_format_and_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/push.md, "Events": ``text/event-stream``; each message is ``id: <cursor>``,
    ``event: <type>``, ``data: <the MCP tools' JSON>``; an idle stream gets a
    ``: keepalive`` comment every 15 s (shortened here)."""
    assert push_module.KEEPALIVE == 15.0
    monkeypatch.setattr(push_module, "KEEPALIVE", 0.05)
    async with ConversationsApi(**LOOPBACK) as api:
        await api.register_session("reader", subscribe=["d"])
        writer = await api.register_session("writer", subscribe=["d"])
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{http(api)}/v1/sessions/reader/events") as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert await sse_block(resp) == ": keepalive"
            mem = await writer.capture("d", "pushed")
            block = await sse_block(resp)
            while block == ": keepalive":
                block = await sse_block(resp)
            head, event, data = block.split("\n")
            payload = json.loads(data.removeprefix("data: "))
            assert head == f"id: {payload['cursor']}" and event == "event: captured"
            assert set(payload) == EVENT_KEYS | {"memory"}
            assert (payload["type"], payload["memory_id"]) == ("captured", mem.id)
            assert payload["source_session"] == "writer"
            assert set(payload["memory"]) == MEMORY_KEYS


async def test_push_websocket_resumes_refuses_a_cursor_ahead_and_ends_on_unregister() -> None:
    """docs/push.md, "Resuming": ``?since=<cursor>`` works on either endpoint (the
    WebSocket too); a cursor ahead of the node's newest gets one error message and the
    stream ends; ``api.unregister_session`` ends open streams (the SSE response ends, the
    WebSocket closes)."""
    async with ConversationsApi(**LOOPBACK) as api:
        await api.register_session("reader", subscribe=["d"])
        writer = await api.register_session("writer", subscribe=["d"])
        first = await writer.capture("d", "first")
        second = await writer.capture("d", "second")
        base = f"{url_of(api)}/v1/sessions/reader/ws"
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(f"{base}?since=0") as ws:
                got = [json.loads((await ws.receive(timeout=30)).data) for _ in range(2)]
                assert [e["memory_id"] for e in got] == [first.id, second.id]
            async with client.ws_connect(f"{base}?since=999") as ws:
                msg = await ws.receive(timeout=30)
                assert json.loads(msg.data)["type"] == "error"
                assert "ahead" in json.loads(msg.data)["error"]
                closing = await ws.receive(timeout=30)
                assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
            sse_url = f"{http(api)}/v1/sessions/reader/events"
            async with client.get(sse_url) as resp, client.ws_connect(base) as ws:
                await writer.capture("d", "third")
                assert (await sse_block(resp)).split("\n")[1] == "event: captured"
                assert json.loads((await ws.receive(timeout=30)).data)["type"] == "captured"
                await api.unregister_session("reader")
                async with asyncio.timeout(30):
                    msg = await ws.receive()
                    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
                    assert await resp.content.read() == b""  # the SSE response ended


async def test_push_with_a_secret_token_in_the_query_and_a_page_holding_it() -> None:
    """docs/push.md, "Who may connect": with a mesh secret a client that cannot set
    headers passes ``?token=``; a page that holds the token is let in (``Origin`` plus
    the token: 200); a page without it: 401."""
    async with ConversationsApi(mesh_secret=SECRET, **LOOPBACK) as api:
        await api.register_session("reader", subscribe=["d"])
        url = f"{http(api)}/v1/sessions/reader/events"
        page = {"Origin": "https://app.example"}
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{url}?token={api.push_token}") as resp:
                assert resp.status == 200
            bearer = {**page, "Authorization": f"Bearer {api.push_token}"}
            async with client.get(url, headers=bearer) as resp:
                assert resp.status == 200
            async with client.get(url, headers=page) as resp:
                assert resp.status == 401
                assert "error" in await resp.json()


async def test_push_a_resume_past_the_retention_says_lagged() -> None:
    """docs/push.md, "Resuming": when the journal's retention already dropped events
    after the given cursor, the stream says so with ``event: lagged`` and
    ``data: {"type":"lagged","cursor":..,"dropped":0}`` (no ``id``), then sends what is
    kept."""
    async with ConversationsApi(retention=Retention(max_events=3, max_age=None), **LOOPBACK) as api:
        await api.register_session("reader", subscribe=["d"])
        writer = await api.register_session("writer", subscribe=["d"])
        mems = [await writer.capture("d", f"fact {i}") for i in range(6)]
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{http(api)}/v1/sessions/reader/events?since=0") as resp,
        ):
            assert await sse_block(resp) == (
                'event: lagged\ndata: {"type":"lagged","cursor":0,"dropped":0}'
            )
            kept = [json.loads((await sse_block(resp)).split("data: ")[1]) for _ in range(3)]
            assert [e["memory_id"] for e in kept] == [m.id for m in mems[3:]]


# -- /yjs/<namespace> --------------------------------------------------------------------


async def test_yjs_updates_and_awareness_go_to_the_right_clients() -> None:
    """docs/yjs.md, "What the node does": awareness is relayed to every client of the
    namespace, the sender included; a client's update is applied (its memory appears),
    sent to the peers and the namespace's other clients, never back to the client it
    came from; the node's own later writes, and its peers', reach every client."""
    source = ConversationsApi(listen=False, discovery=())
    async with source, ConversationsApi(**LOOPBACK) as api:
        s = await source.register_session("js", subscribe=["d"])
        from_js = await s.capture("d", "from a yjs client")
        update = source._docs["d"].diff(b"\x00")
        async with ConversationsApi(peers=[url_of(api)], **LOOPBACK) as peer:
            await peer.settle(timeout=10)
            url = f"{url_of(api)}/yjs/d"
            async with (
                aiohttp.ClientSession() as client,
                client.ws_connect(url) as one,
                client.ws_connect(url) as two,
            ):
                for ws in (one, two):
                    assert (await ws.receive(timeout=30)).data[:2] == b"\x00\x00"  # step 1
                awareness = b"\x01" + varuint_bytes(5) + b"\x01\x02abc"
                await one.send_bytes(awareness)
                for ws in (one, two):
                    assert (await ws.receive(timeout=30)).data == awareness

                await one.send_bytes(sync_message(UPDATE, update))
                relayed = (await two.receive(timeout=30)).data
                assert relayed[:2] == bytes((0, UPDATE)) and b"from a yjs client" in relayed
                await wait_for(lambda: peer.recall("yjs client"), 10, "the peer has it")
                assert api.get(from_js.id).content == "from a yjs client"

                local = await api.register_session("py", subscribe=["d"])
                await local.capture("d", "a marker from the node")
                for ws in (one, two):
                    nxt = (await ws.receive(timeout=30)).data
                    assert b"a marker from the node" in nxt
                    assert b"from a yjs client" not in nxt  # (never echoed to one)
                theirs = await peer.register_session("peer", subscribe=["d"])
                await theirs.capture("d", "written on the peer")
                for ws in (one, two):
                    # (past copies of the marker: see the next test)
                    while b"written on the peer" not in (
                        nxt := (await ws.receive(timeout=30)).data
                    ):
                        assert b"a marker from the node" in nxt


async def test_yjs_a_write_of_the_node_reaches_a_client_once() -> None:
    """docs/yjs.md, "What the node does": every change to the namespace on the node (its
    own writes) is sent to the namespace's clients as an update. Sent once: a second copy
    doubles what every client and relay room receives, and counts twice against the
    64 MiB a client may have queued. The client's messages after the node's step 1 are
    the first write, then the second."""
    async with ConversationsApi(**LOOPBACK) as api:
        s = await api.register_session("py", subscribe=["d"])
        await s.capture("d", "the first write")
        async with (
            aiohttp.ClientSession() as client,
            client.ws_connect(f"{url_of(api)}/yjs/d") as ws,
        ):
            assert (await ws.receive(timeout=30)).data[:2] == b"\x00\x00"  # step 1
            await s.capture("d", "the second write")
            await s.capture("d", "the third write")
            second = (await ws.receive(timeout=30)).data
            third = (await ws.receive(timeout=30)).data
            assert b"the second write" in second
            assert b"the third write" in third, "the second write was sent twice"


async def test_yjs_refuses_namespaces_outside_sync_namespaces_and_big_messages() -> None:
    """docs/yjs.md: namespaces outside ``sync_namespaces`` are refused (403); messages
    are limited to the node's ``max_frame`` (a bigger one closes that client, the data
    unchanged); the documented limits: 64 MiB queued, 2 s to close, 1024 relay rooms,
    ``max_frame`` 16 MiB by default."""
    assert (_QUEUE_BYTES, _CLOSE_WITHIN, MAX_ROOMS) == (64 << 20, 2.0, 1024)
    assert ConversationsApi(listen=False, discovery=())._max_frame == 16 << 20
    async with ConversationsApi(sync_namespaces=["d"], max_frame=4096, **LOOPBACK) as api:
        s = await api.register_session("py", subscribe=["d"])
        await s.capture("d", "kept")
        before = api.state_hash("d")
        base = url_of(api).replace("ws://", "http://") + "/yjs/"
        async with aiohttp.ClientSession() as client:
            async with client.get(base + "other", headers={"Upgrade": "websocket"}) as resp:
                assert resp.status == 403
                assert "not shared" in (await resp.json())["error"]
            async with client.ws_connect(url_of(api) + "/yjs/d") as ws:
                await ws.receive(timeout=30)
                await ws.send_bytes(sync_message(UPDATE, b"\x00" * 5000))
                while (await ws.receive(timeout=30)).type not in (
                    WSMsgType.CLOSE,
                    WSMsgType.CLOSED,
                ):
                    pass
                assert ws.close_code == 1009  # message too big
        assert api.state_hash("d") == before


# -- relays ------------------------------------------------------------------------------


@asynccontextmanager
async def recording_relay(
    directory: bytes | None = None, refuse_rooms: bool = False
) -> AsyncIterator[tuple[str, list[str]]]:
    """A y-websocket relay on loopback that logs the rooms dialled; it sends
    ``directory`` to the directory room, and (``refuse_rooms``) answers other rooms 404."""
    log: list[str] = []

    async def room(request: web.Request) -> web.StreamResponse:
        log.append(request.path)
        is_directory = request.path == "/subcog-directory"
        if refuse_rooms and not is_directory:
            raise web.HTTPNotFound()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if directory is not None and is_directory:
            await ws.send_bytes(directory)
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break
        return ws

    app = web.Application()
    app.router.add_get("/{room}", room)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}", log
    finally:
        await runner.cleanup()


async def test_relay_room_names_with_and_without_a_secret() -> None:
    """docs/yjs.md, "Relays": without a secret the rooms are ``subcog-ns-<namespace>``
    and ``subcog-directory`` and the relay must be on loopback (refused otherwise); with
    a secret, ``subcog-`` and 32 hex digits; private namespaces are never joined."""
    with pytest.raises(InvalidArgument, match="loopback"):
        ConversationsApi(relay="ws://relay.example/subcog", discovery=())
    async with recording_relay() as (url, log):
        async with ConversationsApi(
            listen=False, discovery=(), relay=url, private_namespaces=["p"]
        ) as api:
            s = await api.register_session("py", subscribe=["d", "p"])
            await s.capture("p", "never at the relay")
            await s.capture("d", "at the relay")
            await wait_for(lambda: "/subcog-ns-d" in log, 10, "the room of d")
            assert api._relays[0]._tasks.keys() == {"", "d"}
        assert set(log) == {"/subcog-directory", "/subcog-ns-d"}
        log.clear()
        async with ConversationsApi(
            listen=False, discovery=(), relay=url, mesh_secret=SECRET
        ) as api:
            s = await api.register_session("py", subscribe=["d"])
            await s.capture("d", "at the relay")
            await wait_for(lambda: len(set(log)) == 2, 10, "the directory and d's room")
        assert all(re.fullmatch(r"/subcog-[0-9a-f]{32}", p) for p in log), log


async def test_relay_directory_is_not_followed_past_1024_namespaces() -> None:
    """docs/yjs.md, "Relays": a directory listing more than 1024 namespaces is not
    followed past that (a relay listing 1100 gets 1024 rooms dialled)."""
    listing: Doc[Map[bool]] = Doc()
    names = listing.get("namespaces", type=Map)
    with listing.transaction():
        for i in range(1100):
            names[f"ns-{i:04d}"] = True
    directory = sync_message(STEP2, listing.get_update())
    async with (
        recording_relay(directory, refuse_rooms=True) as (url, log),
        ConversationsApi(listen=False, discovery=(), relay=url) as api,
    ):
        await wait_for(lambda: len(set(log)) >= 1 + MAX_ROOMS, 20, "1024 rooms dialled")
        assert len(api._relays[0]._tasks) == 1 + MAX_ROOMS
        assert len(set(log)) == 1 + MAX_ROOMS


# -- settle ------------------------------------------------------------------------------


async def test_settle_leaves_out_an_unreachable_peer() -> None:
    """docs/index.md, "Short-lived processes: settle": ``settle`` returns the peers that
    confirmed within ``timeout``; an unreachable one is left out, not an error."""
    closed = socket.create_server(("127.0.0.1", 0))
    dead = f"ws://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    async with (
        ConversationsApi(**LOOPBACK) as a,
        ConversationsApi(peers=[url_of(a), dead], **LOOPBACK) as b,
    ):
        confirmed = await b.settle(timeout=5)
        assert [p.node_id for p in confirmed] == [a.node_id]
