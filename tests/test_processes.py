"""Separate node processes on one machine: local discovery, liveness, remote sessions."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from support.nodeproc import NodeProc, stop_all

# A bound against hangs on a loaded machine, never a claim about speed.
DEADLINE = 20.0
HEARTBEAT_DROP = "No PONG received"  # aiohttp's words in the close reason of a heartbeat drop


@pytest.fixture
def nodes() -> Iterator[list[NodeProc]]:
    started: list[NodeProc] = []
    yield started
    stop_all(started)


def start_logged(log: Path, *args: str, name: str) -> NodeProc:
    """Like :meth:`NodeProc.start`, with the node's stderr (its warnings, e.g. why a link
    closed) written to ``log``."""
    with log.open("w") as err:  # the child keeps its own copy of the descriptor
        return NodeProc.start(*args, name=name, stderr=err)


def _peer_count_is(n: NodeProc, count: int) -> bool:
    return len(n.state("d")["peers"]) == count


def _captured_from(node_id: str, m: dict[str, Any]) -> bool:
    return m.get("event") == "captured" and m.get("node") == node_id


def test_three_processes_find_each_other_locally_and_converge(
    nodes: list[NodeProc], tmp_path: Path
) -> None:
    reg = str(tmp_path / "registry")
    for i in range(3):
        args = ["--discovery", "local", "--discovery-dir", reg, "--session", f"s{i}"]
        nodes.append(NodeProc.start(*args, name=f"n{i}"))
    ids = {n.node_id for n in nodes}
    for n in nodes:
        n.wait_until(partial(_peer_count_is, n, 2), DEADLINE, "two peers")
    for i, n in enumerate(nodes):
        n.send(cmd="capture", ns="d", content=f"fact from process {i}")
    for n in nodes:
        others = [x for x in nodes if x is not n]
        for o in others:
            n.expect(
                partial(_captured_from, o.node_id),
                DEADLINE,
                f"capture from {o.name}",
            )
    states = [n.state("d") for n in nodes]
    assert len({s["hash"] for s in states}) == 1
    assert states[0]["memories"] == [f"fact from process {i}" for i in range(3)]
    assert set(states[0]["peers"]) == ids - {nodes[0].node_id}


def test_killed_node_disappears_from_peers_and_sessions(
    nodes: list[NodeProc], tmp_path: Path
) -> None:
    """A killed process is dropped from the survivor's peers and sessions because its
    kernel closes the connection, not only once the heartbeat gives up. (The heartbeat
    path is tests/test_lan.py's unplugged case and tests/transport/test_websocket.py.)"""
    reg = str(tmp_path / "registry")
    log = tmp_path / "a.stderr"
    a = start_logged(
        log, "--discovery", "local", "--discovery-dir", reg, "--session", "a1", name="a"
    )
    b = NodeProc.start("--discovery", "local", "--discovery-dir", reg, "--session", "b1", name="b")
    nodes += [a, b]
    a.wait_until(lambda: "b1@" + b.node_id in a.state("d")["sessions"], DEADLINE, "b on a")
    b.kill()
    a.wait_until(
        lambda: (s := a.state("d"))["peers"] == [] and s["sessions"] == [], DEADLINE, "b gone"
    )

    def closes() -> list[str]:
        lines = log.read_text(errors="replace").splitlines()
        return [line for line in lines if f"link to {b.node_id} closed" in line]

    # The close is logged when the link ends, before the peer is forgotten; the wait only
    # covers the log file being read while it is written.
    a.wait_until(lambda: bool(closes()), DEADLINE, "link end logged")
    assert not [line for line in closes() if HEARTBEAT_DROP in line], log.read_text()


def free_port() -> int:
    """A port free right now. Another process may take it before the node binds it: the
    node then exits at once and ``NodeProc`` fails with "no line for ready"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_offline_node_catches_up_after_restart(nodes: list[NodeProc], tmp_path: Path) -> None:
    """B dies; A keeps capturing; B restarts on its data dir and on the same port (the
    static peer A keeps redialling), and gets everything it missed and nothing it had.

    What B had is what B stored: it stores a peer's update at the end of the loop turn
    that applied it, after its subscribers heard of it (docs/storage.md), so A's settle
    (B's answer promises it stored what A sent) comes before the kill."""
    port = free_port()
    b_args = ["--data-dir", str(tmp_path / "b"), "--port", str(port), "--session", "b1"]
    b = NodeProc.start(*b_args, name="b")
    a = NodeProc.start(
        "--data-dir", str(tmp_path / "a"), "--peer", f"ws://127.0.0.1:{port}", "--session", "a1",
        name="a",
    )  # fmt: skip
    nodes += [a, b]
    a.send(cmd="capture", ns="d", content="before the outage")
    b.expect(lambda m: m.get("content") == "before the outage", DEADLINE, "first capture on b")
    a.send(cmd="settle")
    a.expect(lambda m: m.get("settled") == [b.node_id], DEADLINE, "b stored it")
    b.kill()
    a.wait_until(lambda: a.state("d")["peers"] == [], DEADLINE, "b gone")
    for i in range(3):
        a.send(cmd="capture", ns="d", content=f"during the outage {i}")
    a.expect(lambda m: m.get("content") == "during the outage 2" and "captured" in m, DEADLINE)
    # The same port again: b's own socket is gone with its process (aiohttp binds with
    # SO_REUSEADDR, so TIME_WAIT does not block it); a failed bind ends b2 at once.
    b2 = NodeProc.start(*b_args, name="b2")
    nodes.append(b2)
    b2.wait_until(
        lambda: len(b2.state("d")["memories"]) == 4, DEADLINE, "b caught up after restart"
    )
    assert b2.state("d")["hash"] == a.state("d")["hash"]
    got = [m for m in b2.lines if m.get("event") == "captured"]
    assert sorted(m["content"] for m in got) == [f"during the outage {i}" for i in range(3)]
