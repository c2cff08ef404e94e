"""A LAN of real node processes, one per network namespace, found by mDNS only.

Each node is ``tests/support/noderun.py`` started inside a :class:`~support.netns.NetnsLan`
host with a mesh secret and ``--discovery mdns``: no static peers, no shared registry, no
shared loopback, so every link below was found through mDNS on the bridge. The hosts
listen in three ways (every interface; their LAN address; every interface with an
explicit ``--advertise-host``) so each of those advertising paths is exercised.

zeroconf never runs in this process (the autouse guard in conftest.py would refuse it).
These tests skip where namespaces are unavailable and fail under ``CI=true``.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from subcog_crdt._discovery.base import mesh_tag
from support.netns import Host, NetnsLan
from support.nodeproc import NodeProc, stop_all
from support.sniff import sniff, tcp_syns

NS = "d"
# Deadlines are bounds against hangs on a loaded machine, never claims about speed.
FIND_TIMEOUT = 20.0  # discovery + connect; typically ~1 s
SYNC_TIMEOUT = 20.0  # convergence once connected; typically milliseconds
DEAD_TIMEOUT = 20.0  # a dead peer gone from peers and sessions; typically 0.1-2 s
OBSERVE = 2.0  # the secondary hold of a negative ("never connects"); see its test
HEARTBEAT_DROP = "No PONG received"  # aiohttp's words in the close reason of a heartbeat drop
SERVICE_LABELS = b"\x0c_subcog-crdt\x04_tcp\x05local"  # _subcog-crdt._tcp.local. on the wire

Pred = Callable[[dict[str, Any]], bool]


@pytest.fixture
def nodes(netns_lan: NetnsLan) -> Iterator[list[NodeProc]]:
    """Node processes to stop (cleanly: the mDNS goodbye goes out) before the LAN goes."""
    started: list[NodeProc] = []
    yield started
    stop_all(started)


class LanNode(NodeProc):
    """A node process in a LAN host whose stderr goes to the file ``log``."""

    def __init__(self, proc: subprocess.Popen[str], name: str, log: Path) -> None:
        self.log = log
        super().__init__(proc, name)

    def link_closes(self, peer: NodeProc) -> list[str]:
        """The lines in which this node logged that its link to ``peer`` closed abnormally
        (the transport logs those at WARNING; Python's last-resort handler prints them)."""
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if f"link to {peer.node_id} closed" in line]


def listen_args(host: Host) -> list[str]:
    """Vary how hosts listen and advertise: h1 like h4, h2 like h5..."""
    variant = (int(host.name[1:]) - 1) % 3
    if variant == 0:
        return ["--host", "0.0.0.0"]  # advertises the interfaces' addresses
    if variant == 1:
        return ["--host", host.address]
    return ["--host", "0.0.0.0", "--advertise-host", host.address]


def session_of(node: NodeProc) -> str:
    return f"s-{node.name}"


def start_nodes(
    nodes: list[NodeProc], hosts: list[Host], secret: str, logs: Path, *extra: str
) -> list[LanNode]:
    """Start one node per host (all processes first, then wait for each to be ready);
    each node's stderr goes to ``logs / <host>.stderr``."""
    procs = []
    for host in hosts:
        argv = NodeProc.argv(
            "--secret", secret, "--discovery", "mdns", "--session", f"s-{host.name}",
            "--subscribe", NS, *listen_args(host), *extra,
        )  # fmt: skip
        log = logs / f"{host.name}.stderr"
        with log.open("w") as err:  # the child keeps its own copy of the descriptor
            proc = host.popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
            )
        procs.append((host, proc, log))
    out = []
    for host, proc, log in procs:
        node = LanNode(proc, host.name, log)
        nodes.append(node)
        out.append(node)
    return out


def captured_from(origin: NodeProc, content: str | None = None) -> Pred:
    """An event line for a capture by ``origin``'s session on ``origin``'s node."""

    def pred(m: dict[str, Any]) -> bool:
        return (
            m.get("event") == "captured"
            and m.get("ns") == NS
            and m.get("node") == origin.node_id
            and m.get("session") == session_of(origin)
            and (content is None or m.get("content") == content)
        )

    return pred


def remote_sessions(others: list[NodeProc]) -> list[str]:
    return sorted(f"{session_of(o)}@{o.node_id}" for o in others)


def wait_meshed(mesh: list[NodeProc], timeout: float = FIND_TIMEOUT) -> None:
    """Every node of ``mesh`` has exactly the others as peers and sees their sessions."""
    for n in mesh:
        others = [o for o in mesh if o is not n]
        want_peers = sorted(o.node_id for o in others)
        want_sessions = remote_sessions(others)

        def meshed(n: NodeProc = n, p: list[str] = want_peers, s: list[str] = want_sessions):
            st = n.state(NS)
            return st["peers"] == p and st["sessions"] == s

        n.wait_until(meshed, timeout, f"peers {want_peers} found by mDNS")


def wait_converged(mesh: list[NodeProc], contents: list[str]) -> list[dict[str, Any]]:
    """All of ``mesh`` hold exactly ``contents`` with one state hash; returns the states."""
    states: list[dict[str, Any]] = []

    def converged() -> bool:
        states[:] = [n.state(NS) for n in mesh]
        return (
            all(s["memories"] == sorted(contents) for s in states)
            and len({s["hash"] for s in states}) == 1
        )

    mesh[0].wait_until(converged, SYNC_TIMEOUT, f"convergence on {sorted(contents)}")
    return states


def capture_each(mesh: list[NodeProc], text: Callable[[NodeProc], str]) -> list[str]:
    contents = []
    for n in mesh:
        content = text(n)

        def acked(m: dict[str, Any], c: str = content) -> bool:
            return "captured" in m and m.get("content") == c

        n.send(cmd="capture", ns=NS, content=content)
        n.expect(acked, 10, f"capture of {content!r} returned")
        contents.append(content)
    return contents


def expect_captures_from_others(mesh: list[NodeProc], timeout: float = SYNC_TIMEOUT) -> None:
    for n in mesh:
        for o in mesh:
            if o is not n:
                n.expect(captured_from(o), timeout, f"capture event from {o.name}")


# -- tests -------------------------------------------------------------------------------


def test_three_hosts_find_each_other_by_mdns_and_converge(
    netns_lan: NetnsLan, nodes: list[NodeProc], tmp_path: Path
) -> None:
    secret = f"lan-secret-{secrets.token_hex(8)}"
    mesh = start_nodes(nodes, netns_lan.hosts, secret, tmp_path)
    wait_meshed(mesh)

    contents = capture_each(mesh, lambda n: f"fact from {n.name} on {n.node_id}")
    # Each node gets the two other captures pushed, naming the right session and node.
    for n in mesh:
        for o in mesh:
            if o is not n:
                ev = n.expect(captured_from(o), SYNC_TIMEOUT, f"capture from {o.name}")
                assert ev["content"] == f"fact from {o.name} on {o.node_id}"
        got = [m for m in n.lines if m.get("event") == "captured"]
        assert len(got) == 2, f"{n.name}: {got}"  # own capture excluded, no duplicates
    states = wait_converged(mesh, contents)
    assert len({s["hash"] for s in states}) == 1


def test_late_host_catches_up(netns_lan: NetnsLan, nodes: list[NodeProc], tmp_path: Path) -> None:
    secret = f"lan-secret-{secrets.token_hex(8)}"
    mesh = start_nodes(nodes, netns_lan.hosts, secret, tmp_path)
    contents = capture_each(mesh, lambda n: f"early fact from {n.name}")
    before = wait_converged(mesh, contents)
    wait_meshed(mesh)

    late_host = netns_lan.add_host()
    (late,) = start_nodes(nodes, [late_host], secret, tmp_path)
    # It finds everyone, gets every earlier memory (as events naming their origin) ...
    wait_meshed([*mesh, late])
    for o in mesh:
        late.expect(captured_from(o, f"early fact from {o.name}"), SYNC_TIMEOUT, o.name)
    after = wait_converged([*mesh, late], contents)
    assert after[-1]["hash"] == before[0]["hash"]  # nothing changed but the newcomer
    # ... and its own capture reaches the others.
    contents += capture_each([late], lambda n: f"late fact from {n.name}")
    for o in mesh:
        o.expect(captured_from(late, f"late fact from {late.name}"), SYNC_TIMEOUT, "late")
    wait_converged([*mesh, late], contents)


@pytest.mark.parametrize("unplug", [False, True], ids=["sigkill", "unplugged-then-sigkill"])
def test_killed_host_disappears_from_peers_and_sessions(
    netns_lan: NetnsLan, nodes: list[NodeProc], tmp_path: Path, unplug: bool
) -> None:
    """A host that dies is dropped from the survivors' peers and sessions, by the path
    that fits how it died: its kernel's FIN when only the process died, the heartbeat
    when its cable went too (no FIN can arrive). The heartbeat's schedule (dead within
    ``dead_after``) is checked in tests/transport/test_websocket.py."""
    secret = f"lan-secret-{secrets.token_hex(8)}"
    mesh = start_nodes(nodes, netns_lan.hosts, secret, tmp_path)
    wait_meshed(mesh)
    a, b, victim = mesh

    if unplug:
        # Its link goes down first: the kernel's FIN/RST after the kill never reaches the
        # others (as when a machine loses power), so only the heartbeat can tell.
        host = netns_lan[victim.name]
        subprocess.run(
            ["ip", "-n", host.netns, "link", "set", host.interface, "down"],
            check=True,
            timeout=15,
        )
    victim.kill()  # SIGKILL of its process group: no goodbye, no clean close

    def gone() -> bool:
        sa, sb = a.state(NS), b.state(NS)
        return bool(
            sa["peers"] == [b.node_id]
            and sb["peers"] == [a.node_id]
            and sa["sessions"] == remote_sessions([b])
            and sb["sessions"] == remote_sessions([a])
        )

    a.wait_until(gone, DEAD_TIMEOUT, f"{victim.name} gone from {a.name} and {b.name}")
    # The close is logged when the link ends, before the peer is forgotten; the wait only
    # covers the log file being read while it is written.
    a.wait_until(
        lambda: all(s.link_closes(victim) for s in (a, b)), DEAD_TIMEOUT, "link ends logged"
    )
    for survivor in (a, b):
        closes = survivor.link_closes(victim)
        by_heartbeat = [line for line in closes if HEARTBEAT_DROP in line]
        if unplug:
            # Nothing else could end the link: the heartbeat did, on both survivors.
            assert by_heartbeat, (survivor.name, closes)
        else:
            # Its kernel closed the connection (FIN, or RST) at once; the heartbeat never
            # had to.
            assert not by_heartbeat, (survivor.name, closes)


def test_host_with_another_secret_is_never_connected(
    netns_lan: NetnsLan, nodes: list[NodeProc], tmp_path: Path
) -> None:
    """Nodes of another mesh on the same LAN are filtered out by discovery: never dialled
    (no TCP connection attempt crosses between the meshes), so never linked either."""
    secret = f"lan-secret-{secrets.token_hex(8)}"
    other_secret = f"other-secret-{secrets.token_hex(8)}"
    h4, h5 = netns_lan.add_host(), netns_lan.add_host()
    with sniff(netns_lan.bridge_netns, tmp_path / "lan.frames") as cap:
        mesh = start_nodes(nodes, netns_lan.hosts[:3], secret, tmp_path)
        # Two nodes of another mesh: they must find each other (so their mDNS works and
        # they do see the LAN), yet never the first mesh.
        other = start_nodes(nodes, [h4, h5], other_secret, tmp_path)
        wait_meshed(mesh)
        wait_meshed(other)
        # The signal that every node has had the foreign adverts: both meshes formed from
        # the same multicast packets, which the bridge delivers to every host (snooping
        # off). A node that did not filter them would dial as soon as its own mesh does.
        mdns = b"\n".join(cap.udp_payloads(5353))
        for n in [*mesh, *other]:
            assert n.node_id.encode() in mdns, n.name

        contents = capture_each(mesh, lambda n: f"mesh fact from {n.name}")
        other_contents = capture_each(other, lambda n: f"other-mesh fact from {n.name}")
        expect_captures_from_others(mesh)
        expect_captures_from_others(other)
        wait_converged(mesh, contents)
        wait_converged(other, other_contents)

        ids = {n.node_id for n in mesh}
        other_ids = {n.node_id for n in other}
        # Secondary: hold the negative a little longer, in case a dial came late.
        deadline = time.monotonic() + OBSERVE
        polls = 0
        while polls == 0 or time.monotonic() < deadline:  # bounded: OBSERVE seconds
            polls += 1
            for group, own_ids, own_contents in (
                (mesh, ids, contents),
                (other, other_ids, other_contents),
            ):
                for n in group:
                    st = n.state(NS)
                    assert set(st["peers"]) == own_ids - {n.node_id}, (n.name, st)
                    assert {s.split("@")[1] for s in st["sessions"]} == own_ids - {n.node_id}
                    assert st["memories"] == sorted(own_contents), (n.name, st)

    for n in [*mesh, *other]:
        foreign = other_ids if n in mesh else ids
        assert not [m for m in n.lines if m.get("node") in foreign], n.name
    # The mechanism: discovery dropped the foreign adverts, so no node ever dialled across
    # (the handshake would refuse such a dial too; these tests are about discovery).
    syns = tcp_syns(cap.frames())
    mesh_hosts = {netns_lan[n.name].address for n in mesh}
    other_hosts = {h4.address, h5.address}
    assert any(src in other_hosts and dst in other_hosts for src, dst, _ in syns), syns
    crossing = {
        (src, dst, port)
        for src, dst, port in syns
        if (src in mesh_hosts and dst in other_hosts) or (src in other_hosts and dst in mesh_hosts)
    }
    assert not crossing, f"connection attempts between the meshes: {sorted(crossing)}"


def test_mdns_packets_carry_no_secret_and_no_content(
    netns_lan: NetnsLan, nodes: list[NodeProc], tmp_path: Path
) -> None:
    secret = f"lan-secret-{secrets.token_hex(8)}"
    other_secret = f"other-secret-{secrets.token_hex(8)}"
    marker = f"CONTENT-MARKER-{secrets.token_hex(8)}"
    h4 = netns_lan.add_host()

    with sniff(netns_lan.bridge_netns, tmp_path / "lan.frames") as cap:
        mesh = start_nodes(nodes, netns_lan.hosts[:3], secret, tmp_path)
        (outsider,) = start_nodes(nodes, [h4], other_secret, tmp_path)
        wait_meshed(mesh)
        contents = capture_each([*mesh, outsider], lambda n: f"{marker} from {n.name}")
        expect_captures_from_others(mesh)
        wait_converged(mesh, contents[:3])
        # Clean shutdown: the goodbye packets are on the wire too.
        stop_all(nodes)
        nodes.clear()

    payloads = cap.udp_payloads(5353)
    # Positive control: mDNS was captured, with the service, every node and both mesh tags.
    assert payloads, f"no mDNS packet captured ({len(cap.frames())} frames)"
    mdns = b"\n".join(payloads)
    assert SERVICE_LABELS in mdns
    for n in [*mesh, outsider]:
        assert n.node_id.encode() in mdns, n.name
    assert mesh_tag(secret.encode()).encode() in mdns
    assert mesh_tag(other_secret.encode()).encode() in mdns
    # No secret and no content, in any common encoding, in any mDNS packet.
    for text in (secret, other_secret, marker):
        raw = text.encode()
        for form in (raw, raw.hex().encode(), base64.b64encode(raw), raw.lower(), raw.upper()):
            bad = [p for p in payloads if form in p]
            assert not bad, f"{text!r} found in {len(bad)} mDNS packet(s)"
