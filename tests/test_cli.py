"""The ``subcog-crdt`` command line, as a user runs it: real processes
(``python -m subcog_crdt``), real sockets on 127.0.0.1, a registry directory of the test's
own (never the default one), no mDNS (nodes with a secret run with ``--no-discovery``).

Long-running ``run`` nodes print JSON lines that a reader thread collects; the tests wait
for a line with a deadline, never sleep. Every process started is killed at the end, also
when the test fails.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from subcog_crdt.cli import SECRET_ENV
from support.nodeproc import NodeProc, kill_groups

NS = "d"
MEMORY_ID = re.compile(r"[0-9a-f]{20}")


def _env(secret: str | None) -> dict[str, str]:
    """This process's environment, with a mesh secret only if the test gives one."""
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    if secret is not None:
        env[SECRET_ENV] = secret
    return env


class RunProc(NodeProc):
    """A ``subcog-crdt run --json`` process. Reuses NodeProc's line reader, ``expect``
    and ``kill``; its first line names the node (``{"type": "node", ...}``) instead of
    noderun's ``ready``."""

    def __init__(self, proc: subprocess.Popen[str], name: str, stderr_path: Path) -> None:
        self.proc = proc
        self.name = name
        self.stderr_path = stderr_path
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = self.expect(lambda m: m.get("type") == "node", 30, "the node line")
        self.node_id: str = first["node_id"]
        self.url: str = first["url"]

    def terminate(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig``, wait for the exit (it closes its node first) and return its
        status; every line it printed is read by then."""
        self.proc.send_signal(sig)
        status = self.proc.wait(30)
        self.drain()
        return status

    def stderr(self) -> str:
        return self.stderr_path.read_text()


class Mesh:
    """Starts CLI processes that share one registry directory (the test's own)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.registry = tmp / "registry"
        self.popens: list[subprocess.Popen[str]] = []

    def _argv(self, command: str, args: tuple[str, ...]) -> list[str]:
        return [
            sys.executable,
            "-m",
            "subcog_crdt",
            command,
            *args,
            "--discovery-dir",
            str(self.registry),
        ]

    def run(self, *args: str, secret: str | None = None) -> RunProc:
        """``subcog-crdt run --json ARGS``, started and printing its node line."""
        name = f"run{len(self.popens)}"
        stderr_path = self.tmp / f"{name}.stderr"
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(
                self._argv("run", ("--json", *args)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
                env=_env(secret),
            )
        self.popens.append(proc)  # first: killed at the end even if it never prints
        return RunProc(proc, name, stderr_path)

    def call(
        self, command: str, *args: str, secret: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A one-shot command, run to its end (a deadline, not a sleep)."""
        return subprocess.run(
            self._argv(command, args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(secret),
        )

    def kill_all(self) -> None:
        """SIGKILL every process group started (a no-op for those that ended)."""
        kill_groups(self.popens)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.kill_all()


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}; stderr: {r.stderr}"
    return r.stdout


def registered(mesh: Mesh) -> list[str]:
    """Node ids with an entry in the registry directory."""
    return sorted(p.stem for p in mesh.registry.glob("*.json"))


# -- capture, recall and the live view --------------------------------------------------


def test_a_capture_shows_in_a_running_node_and_another_process_recalls_it(mesh: Mesh) -> None:
    watcher = mesh.run("--session", "watcher", "--subscribe", NS)

    out = ok(mesh.call("capture", NS, "Use SQLite WAL for the journal", "--tag", "storage"))
    mid = out.strip()
    assert MEMORY_ID.fullmatch(mid), out

    # The running node printed it as it arrived: one JSON line, the memory as captured.
    ev = watcher.expect(
        lambda m: m.get("type") == "captured" and m.get("memory_id") == mid, 15, "the capture"
    )
    assert ev["namespace"] == NS
    assert ev["source_session"] == "cli"
    assert ev["memory"]["content"] == "Use SQLite WAL for the journal"
    assert ev["memory"]["tags"] == ["storage"]

    # Another short-lived node joins, catches up from the running one, and finds it.
    assert ok(mesh.call("recall", "sqlite")).splitlines() == [
        f"{mid}\t{NS}\tUse SQLite WAL for the journal"
    ]
    hits = json.loads(ok(mesh.call("recall", "journal", "--namespace", NS, "--json")))
    assert [(h["id"], h["tags"], h["captured_by"]) for h in hits] == [(mid, ["storage"], ["cli"])]
    assert json.loads(ok(mesh.call("recall", "journal", "--namespace", "other", "--json"))) == []

    # A capture of the same fact by another session is the same memory.
    again = json.loads(
        ok(mesh.call("capture", NS, "use sqlite wal for the  journal", "--session", "s2", "--json"))
    )
    assert again["id"] == mid
    assert sorted(again["captured_by"]) == ["cli", "s2"]


def test_run_shows_peers_joining_and_leaving_and_stops_cleanly(mesh: Mesh) -> None:
    a = mesh.run()
    b = mesh.run("--session", "agent-b", "--subscribe", NS)
    a.expect(lambda m: m.get("type") == "peer_joined" and m["node_id"] == b.node_id, 15, "b joined")
    joined = a.expect(
        lambda m: m.get("type") == "session_joined" and m["id"] == "agent-b", 15, "agent-b"
    )
    assert (joined["node_id"], joined["subscriptions"], joined["is_local"]) == (
        b.node_id,
        [NS],
        False,
    )

    # The one-shot commands list what the mesh holds.
    peers = json.loads(ok(mesh.call("peers", "--json")))
    assert sorted(p["node_id"] for p in peers) == sorted([a.node_id, b.node_id])
    assert {p["node_id"]: p["url"] for p in peers}[b.node_id] == b.url
    text = ok(mesh.call("peers")).splitlines()
    assert any(line.startswith(f"{a.node_id}\t{a.url}\t") for line in text), text
    sessions = json.loads(ok(mesh.call("sessions", "--json")))
    b_sessions = [s for s in sessions if s["node_id"] == b.node_id]
    assert [(s["id"], s["subscriptions"], s["is_local"]) for s in b_sessions] == [
        ("agent-b", [NS], False)
    ]

    # Ctrl-C: exit 0, its registry entry gone, and the other node sees it leave.
    assert b.terminate(signal.SIGINT) == 0, b.stderr()
    assert "stopped" in b.stderr()
    a.expect(lambda m: m.get("type") == "peer_left" and m["node_id"] == b.node_id, 15, "b left")
    a.expect(
        lambda m: m == {"type": "session_left", "id": "agent-b", "node_id": b.node_id},
        15,
        "agent-b left",
    )
    assert b.node_id not in registered(mesh)
    assert a.terminate(signal.SIGTERM) == 0, a.stderr()
    assert registered(mesh) == []


def test_a_capture_no_peer_confirmed_fails_without_a_data_dir(mesh: Mesh) -> None:
    r = mesh.call("capture", NS, "a lonely fact", "--wait", "1")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == (
        "subcog-crdt: error: not stored anywhere: no peer reachable (that keeps it); "
        "pass --data-dir to keep it locally\n"
    )

    data = str(mesh.tmp / "data")
    r = mesh.call("capture", NS, "a lonely fact", "--data-dir", data, "--json", "--wait", "1")
    mem = json.loads(ok(r))
    assert mem["content"] == "a lonely fact"
    assert "only" in r.stderr  # it says where the memory is
    hits = json.loads(ok(mesh.call("recall", "lonely", "--data-dir", data, "--json")))
    assert [h["id"] for h in hits] == [mem["id"]]


# -- sync --------------------------------------------------------------------------------


def test_sync_since_last_with_a_data_dir_returns_each_event_once(mesh: Mesh) -> None:
    mesh.run()  # holds the mesh's memories between the one-shot calls
    data = str(mesh.tmp / "syncer")

    def sync(*more: str) -> dict[str, Any]:
        out = ok(mesh.call("sync", "--session", "s", "--data-dir", data, "--json", *more))
        batch: dict[str, Any] = json.loads(out)
        return batch

    # First run: the session is new, so it starts at the present.
    assert sync("--subscribe", NS)["events"] == []
    x = ok(mesh.call("capture", NS, "fact x")).strip()
    y = ok(mesh.call("capture", NS, "fact y")).strip()
    ok(mesh.call("capture", "elsewhere", "not subscribed"))

    second = sync()  # no --subscribe: its stored subscriptions apply
    # (Both came in one catch-up: their order is the catch-up's, not the captures'.)
    assert sorted((e["type"], e["memory_id"]) for e in second["events"]) == sorted(
        [("captured", x), ("captured", y)]
    )
    assert sorted(e["memory"]["content"] for e in second["events"]) == ["fact x", "fact y"]
    assert second["complete"] is True

    z = ok(mesh.call("capture", NS, "fact z")).strip()
    third = ok(mesh.call("sync", "--session", "s", "--data-dir", data))  # text
    assert [line.split("\t")[1:4] for line in third.splitlines()] == [["captured", NS, z]]
    assert sync()["events"] == []

    # A cursor reads again from there (nothing moves "last").
    again = sync("--since", str(second["cursor"]))
    assert [e["memory_id"] for e in again["events"]] == [z]


# -- errors and arguments ----------------------------------------------------------------


def test_errors_are_one_line_and_exit_1_bad_arguments_exit_2(mesh: Mesh) -> None:
    r = mesh.call("capture", "Not A Namespace", "x", "--wait", "1")
    assert r.returncode == 1
    assert r.stderr.startswith("subcog-crdt: error: invalid namespace 'Not A Namespace'")
    assert r.stderr.count("\n") == 1 and r.stdout == ""

    r = mesh.call("sync", "--session", "s", "--since", "99", "--wait", "1")
    assert r.returncode == 1
    assert "cursor 99 is ahead" in r.stderr

    r = mesh.call("peers", "--secret-file", str(mesh.tmp / "missing"))
    assert r.returncode == 1
    assert r.stderr.startswith("subcog-crdt: error: cannot read --secret-file")

    data = str(mesh.tmp / "busy")
    holder = mesh.run("--data-dir", data)
    r = mesh.call("recall", "x", "--data-dir", data, "--wait", "1")
    assert r.returncode == 1
    assert r.stderr.startswith("subcog-crdt: error: data directory")
    assert "in use" in r.stderr
    assert holder.proc.poll() is None  # the holder is untouched

    for bad in (
        ("recall", "x", "--limit", "0"),
        ("sync", "--since", "0"),  # no --session
        ("sync", "--session", "s", "--since", "yesterday"),
        ("capture", NS),  # no content
        ("peers", "--port", "70000"),
        ("peers", "--secret", "x"),  # never on the command line
    ):
        r = mesh.call(*bad)
        assert r.returncode == 2, (bad, r.stderr)
        assert "usage:" in r.stderr
    assert "never taken on the command line" in r.stderr  # the last: --secret


# -- the mesh secret ---------------------------------------------------------------------


def test_the_mesh_secret_comes_from_the_environment_or_a_file(mesh: Mesh) -> None:
    secret = "a-long-random-test-secret"
    a = mesh.run("--host", "127.0.0.1", "--no-discovery", secret=secret)
    # No discovery (with a secret it would include mDNS): the peer is named.
    dial = ("--json", "--no-discovery", "--host", "127.0.0.1", "--peer", a.url, "--wait", "2")

    def linked(**kw: Any) -> list[str]:
        return [p["node_id"] for p in json.loads(ok(mesh.call("peers", *dial, **kw)))]

    assert linked(secret=secret) == [a.node_id]
    assert linked(secret="another-secret") == []
    assert linked() == []  # no secret at all

    path = mesh.tmp / "secret"
    path.write_text(secret + "\n")  # the trailing newline is not part of it
    r = mesh.call("capture", NS, "linked by a file", "--secret-file", str(path), *dial[1:])
    assert MEMORY_ID.fullmatch(ok(r).strip())


# -- demo and mcp ------------------------------------------------------------------------


def test_demo_converges() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "subcog_crdt", "demo"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok(r).splitlines()[-1] == "converged: yes"


def test_mcp_without_the_sdk_names_the_extra(mesh: Mesh) -> None:
    # The SDK made unimportable in the child only (None in sys.modules blocks an import).
    code = (
        "import sys; sys.modules['mcp'] = None; from subcog_crdt.cli import main; "
        f"raise SystemExit(main(['mcp', '--discovery-dir', {str(mesh.registry)!r}]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "pip install 'subcog-crdt[mcp]'" in r.stderr
    assert r.stdout == ""


def test_mcp_serves_stdio_and_ends_with_its_input(mesh: Mesh) -> None:
    proc = subprocess.Popen(
        mesh._argv("mcp", ("--session", "agent", "--subscribe", NS)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env=_env(None),
    )
    mesh.popens.append(proc)
    replies: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            replies.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()

    def ask(request: dict[str, Any]) -> dict[str, Any]:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        reply = replies.get(timeout=30)  # a deadline, not a pause
        assert reply.get("id") == request["id"], reply
        return reply

    init = ask(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "0"},
            },
        }
    )
    assert "result" in init, init
    assert proc.stdin is not None
    proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
    tools = ask({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})["result"]["tools"]
    assert {"subcog_capture", "subcog_recall", "subcog_session_sync"} <= {t["name"] for t in tools}
    proc.stdin.close()  # the client goes: the server ends, and so does the node
    assert proc.wait(30) == 0
