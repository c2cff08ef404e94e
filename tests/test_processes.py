"""Separate node processes on one machine: local discovery, liveness, remote sessions."""

from __future__ import annotations

import pytest

from support.nodeproc import NodeProc, stop_all


@pytest.fixture
def nodes():
    started: list[NodeProc] = []
    yield started
    stop_all(started)


def test_three_processes_find_each_other_locally_and_converge(nodes, tmp_path):
    reg = str(tmp_path / "registry")
    for i in range(3):
        args = ["--discovery", "local", "--discovery-dir", reg, "--session", f"s{i}"]
        nodes.append(NodeProc.start(*args, name=f"n{i}"))
    ids = {n.node_id for n in nodes}
    for n in nodes:
        n.wait_until(lambda n=n: len(n.state("d")["peers"]) == 2, 20, "two peers")
    for i, n in enumerate(nodes):
        n.send(cmd="capture", ns="d", content=f"fact from process {i}")
    for n in nodes:
        others = [x for x in nodes if x is not n]
        for o in others:
            n.expect(
                lambda m, o=o: m.get("event") == "captured" and m.get("node") == o.node_id,
                20,
                f"capture from {o.name}",
            )
    states = [n.state("d") for n in nodes]
    assert len({s["hash"] for s in states}) == 1
    assert states[0]["memories"] == [f"fact from process {i}" for i in range(3)]
    assert set(states[0]["peers"]) == ids - {nodes[0].node_id}


def test_killed_node_disappears_from_peers_and_sessions_within_3s(nodes, tmp_path):
    reg = str(tmp_path / "registry")
    a = NodeProc.start("--discovery", "local", "--discovery-dir", reg, "--session", "a1", name="a")
    b = NodeProc.start("--discovery", "local", "--discovery-dir", reg, "--session", "b1", name="b")
    nodes += [a, b]
    a.wait_until(lambda: "b1@" + b.node_id in a.state("d")["sessions"], 20, "b's session on a")
    b.kill()
    # the contract: gone from peers and sessions within 3 s of dying
    a.wait_until(lambda: (s := a.state("d"))["peers"] == [] and s["sessions"] == [], 3.0, "b gone")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_offline_node_catches_up_after_restart(nodes, tmp_path):
    """B dies; A keeps capturing; B restarts on its data dir and A's static-peer redial
    brings it everything it missed, and nothing it already had."""
    port = free_port()
    b_args = ["--data-dir", str(tmp_path / "b"), "--port", str(port), "--session", "b1"]
    b = NodeProc.start(*b_args, name="b")
    a = NodeProc.start(
        "--data-dir", str(tmp_path / "a"), "--peer", f"ws://127.0.0.1:{port}", "--session", "a1",
        name="a",
    )  # fmt: skip
    nodes += [a, b]
    a.send(cmd="capture", ns="d", content="before the outage")
    b.expect(lambda m: m.get("content") == "before the outage", 20, "first capture on b")
    b.kill()
    a.wait_until(lambda: a.state("d")["peers"] == [], 5, "b gone")
    for i in range(3):
        a.send(cmd="capture", ns="d", content=f"during the outage {i}")
    a.expect(lambda m: m.get("content") == "during the outage 2" and "captured" in m, 10)
    b2 = NodeProc.start(*b_args, name="b2")
    nodes.append(b2)
    b2.wait_until(lambda: len(b2.state("d")["memories"]) == 4, 20, "b caught up after restart")
    assert b2.state("d")["hash"] == a.state("d")["hash"]
    got = [m for m in b2.lines if m.get("event") == "captured"]
    assert sorted(m["content"] for m in got) == [f"during the outage {i}" for i in range(3)]
