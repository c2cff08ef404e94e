"""Peer propagation across topologies (docs/protocol.md, section 4, "Live updates,
forwarding and loops", "Which namespaces flow", "Catch-up"; DESIGN items 1, 3, 5, 6).

Star, ring, full mesh and line of real loopback nodes (``host="127.0.0.1"``,
``discovery=()``, links made with ``api.connect``); the frames each node sends are
recorded by wrapping ``WebSocketLink.send`` and ``send_now``. Cases that need frames
held in a precise order use in-memory links. What is asserted: each write crosses each
link at most once (so a write costs a linear number of frames, never one that grows with
the square of the mesh), is never sent back to its writer, traffic stops once converged;
namespaces flow only between nodes that both sync them; a node rejoining a line gets
what it missed, not the state; a ring whose links drop and come back while every node
writes converges with the same history and the same ``Conflict`` events everywhere; and
nothing a node received is sent back to the node it came from."""

from __future__ import annotations

import asyncio
import io
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from helpers import converged, drain, link, peer_lists_known, record_link_sends, wait_for
from subcog_crdt import (
    Captured,
    Conflict,
    ConversationsApi,
    Deleted,
    Updated,
)
from subcog_crdt._transport.base import Hello
from subcog_crdt._transport.memory import MemoryLink
from subcog_crdt._transport.websocket import WebSocketLink
from test_processes import free_port

F_HELLO, F_SV, F_DIFF, F_UPDATE, F_SESSIONS, F_PEERS, F_NAMESPACE, F_RESYNC = range(8)
Wire = list[tuple[WebSocketLink, bytes]]

TOPOLOGIES: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "star-5": (5, [(0, i) for i in range(1, 5)]),
    "ring-5": (5, [(i, (i + 1) % 5) for i in range(5)]),
    "mesh-4": (4, list(itertools.combinations(range(4), 2))),
    "mesh-5": (5, list(itertools.combinations(range(5), 2))),
    "line-5": (5, [(i, i + 1) for i in range(4)]),
}


def socket_node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(host="127.0.0.1", discovery=(), **kw)


def memory_node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(listen=False, discovery=(), **kw)


def frames_of(messages: list[bytes]) -> Iterator[list[Any]]:
    """Every sync frame in these messages (a message holds one or more, back to back)."""
    for message in messages:
        yield from msgpack.Unpacker(io.BytesIO(message), raw=False, use_list=True)


def quiet(nodes: list[ConversationsApi]) -> bool:
    """No link of these nodes has anything queued, requested or in flight."""
    return all(
        not p._queue and not p._busy and not p._pending for n in nodes for p in n._links.values()
    )


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Wire:
    """Every message any node sends over a WebSocket, as (the sender's link, bytes)."""
    sent: Wire = []
    record_link_sends(monkeypatch, lambda link, frame, _how: sent.append((link, frame)))
    return sent


def directed(nodes: list[ConversationsApi], wire: Wire) -> list[tuple[str, str, list[Any]]]:
    """The recorded frames as (sender node id, receiver node id, frame)."""
    owner = {id(p.link): n.node_id for n in nodes for p in n._links.values()}
    out = []
    for lk, message in wire:
        sender = owner.get(id(lk))
        assert sender is not None, "a message on a link no node holds now"
        for frame in frames_of([message]):
            out.append((sender, lk.peer.node_id, frame))
    return out


def write_view(ev: Any) -> tuple[Any, ...]:
    """What an event says, but its cursor (the node's own)."""
    common = (type(ev).__name__, ev.memory_id, ev.write_id, ev.source_session, ev.node_id)
    if isinstance(ev, Conflict):
        return (*common, ev.winner, ev.loser, ev.fields)
    if isinstance(ev, Updated):
        return (*common, tuple(sorted(ev.changes)))
    return common


# -- 1. each write crosses each link at most once -----------------------------------------


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
async def test_each_write_crosses_each_link_at_most_once_and_traffic_stops(
    topology: str, wire: Wire
) -> None:
    """Star, ring, full mesh and line over loopback sockets, every node writing in turn:
    a write is carried by at most one frame per directed link, never to its writer, and by
    n-1 frames in all in a tree or a full mesh (a ring: n+1, the two waves may cross on the
    link where they meet). So the frames per write grow linearly with the nodes, and once
    converged nothing more is sent for the namespace (no update loops on)."""
    n, pairs = TOPOLOGIES[topology]
    nodes = [socket_node() for _ in range(n)]
    for x in nodes:
        await x.open()
    try:
        for i, j in pairs:
            await nodes[i].connect(nodes[j].url)
        degree = [sum(k in pair for pair in pairs) for k in range(n)]
        await wait_for(
            lambda: all(len(x._links) == degree[k] for k, x in enumerate(nodes)), 10, "links up"
        )
        sessions = [
            await x.register_session(f"s{k}", subscribe=["d", "barrier"])
            for k, x in enumerate(nodes)
        ]
        await sessions[0].capture("d", "warm-up")
        await wait_for(
            lambda: converged(nodes, "d") and quiet(nodes) and peer_lists_known(nodes),
            10,
            "warm-up and peer lists",
        )
        wire.clear()
        writer_of: dict[str, str] = {}
        for k, s in enumerate(sessions):
            for r in range(2):
                marker = f"W[{k}.{r}]"
                writer_of[marker] = nodes[k].node_id
                await s.capture("d", f"{marker} " + "x" * 200)
                await wait_for(lambda: converged(nodes, "d") and quiet(nodes), 10, marker)
        frames = [(a, b, f) for a, b, f in directed(nodes, wire) if f[0] == F_UPDATE]
        per_link: Counter[tuple[str, str, str]] = Counter()
        per_write: Counter[str] = Counter()
        for sender, receiver, f in frames:
            assert f[1] == "d"
            carried = [m for m in writer_of if m.encode() in f[3]]
            assert len(carried) == 1, f"an update frame carries {carried}"
            marker = carried[0]
            assert receiver != writer_of[marker], f"{marker} sent back to its writer"
            per_link[(sender, receiver, marker)] += 1
            per_write[marker] += 1
        assert max(per_link.values()) == 1, per_link.most_common(3)
        bound = n + 1 if topology.startswith("ring") else n - 1
        assert set(per_write) == set(writer_of)
        assert all(n - 1 <= c <= bound for c in per_write.values()), (topology, per_write)
        # Traffic stops: a write in another namespace crosses every link behind anything
        # still queued for "d"; nothing for "d" was sent meanwhile.
        sent = len(frames)
        await sessions[0].capture("barrier", "barrier")
        await wait_for(lambda: converged(nodes, "barrier") and quiet(nodes), 10, "barrier")
        later = [f for _, _, f in directed(nodes, wire) if f[0] == F_UPDATE]
        assert sum(f[1] == "d" for f in later) == sent
        assert all(len(x.memories("d")) == 2 * n + 1 for x in nodes)
    finally:
        for x in nodes:
            await x.aclose()


# -- 2. selective sync and private namespaces in the middle of a line ---------------------


async def test_a_namespace_the_middle_node_does_not_sync_does_not_cross_it(wire: Wire) -> None:
    """Line A-B-C where B syncs only "other" (docs/protocol.md, "Which namespaces flow": a
    namespace is exchanged only between two nodes that both sync it). A's write in "x"
    stays on A: B neither holds nor relays it, C never gets it, no frame B sends names it;
    "other" flows through B. Once A and C link directly, "x" converges between them."""
    async with socket_node() as a, socket_node(sync_namespaces={"other"}) as b, socket_node() as c:
        sa = await a.register_session("a1", subscribe=["x", "other"])
        sc = await c.register_session("c1", subscribe=["x", "other"])
        await a.connect(b.url)
        await c.connect(b.url)
        await wait_for(lambda: len(b.peers()) == 2, 10, "line up")
        await sa.capture("x", "MARKER-x written on A")
        await sc.capture("x", "MARKER-x written on C")
        await sa.capture("other", "other, from A")
        await wait_for(lambda: len(c.memories("other")) == 1 and quiet([a, b, c]), 10, "other")
        assert [m.content for m in c.memories("x")] == ["MARKER-x written on C"]
        assert [m.content for m in a.memories("x")] == ["MARKER-x written on A"]
        assert "x" not in b.namespaces()
        from_b = [f for s, _, f in directed([a, b, c], wire) if s == b.node_id]
        assert from_b and not any("x" in f[1:2] or b"MARKER-x" in msgpack.packb(f) for f in from_b)
        await a.connect(c.url)
        await wait_for(lambda: converged([a, c], "x"), 10, "x once A and C link")
        assert len(a.memories("x")) == len(c.memories("x")) == 2
        assert "x" not in b.namespaces()


async def test_a_namespace_private_to_the_middle_node_never_leaves_it_nor_crosses_it(
    wire: Wire,
) -> None:
    """Line A-B-C where "x" is private to B and all three write in it: B's own "x" write
    is in no byte B sends, A's and C's "x" writes do not cross B (B drops them unread, as
    documented), and B's copy holds only its own write."""
    async with socket_node() as a, socket_node(private_namespaces={"x"}) as b, socket_node() as c:
        s = [
            await n.register_session(f"s-{k}", subscribe=["x", "other"])
            for k, n in enumerate((a, b, c))
        ]
        await a.connect(b.url)
        await c.connect(b.url)
        await wait_for(lambda: len(b.peers()) == 2, 10, "line up")
        for k, session in enumerate(s):
            await session.capture("x", f"PRIVATE-{k} x write")
        await s[0].capture("other", "other, from A")
        await s[2].capture("other", "other, from C")
        await wait_for(
            lambda: all(len(n.memories("other")) == 2 for n in (a, b, c)) and quiet([a, b, c]),
            10,
            "other through B",
        )
        assert [m.content for m in a.memories("x")] == ["PRIVATE-0 x write"]
        assert [m.content for m in b.memories("x")] == ["PRIVATE-1 x write"]
        assert [m.content for m in c.memories("x")] == ["PRIVATE-2 x write"]
        from_b = [m for lk, m in wire if lk in {p.link for p in b._links.values()}]
        assert from_b and not any(b"PRIVATE-1" in m for m in from_b)
        assert not any(f[1:2] == ["x"] for f in frames_of(from_b) if f[0] != F_HELLO)


# -- 3. a node leaving and rejoining the middle of a line ---------------------------------


async def test_a_middle_node_rejoining_a_line_gets_what_it_missed_not_the_state(
    tmp_path: Path, wire: Wire
) -> None:
    """Line A-B-C-D-E holding 1500 memories; C (durable, fixed port, redialled by B and D)
    leaves, A and E write, C comes back. Everything converges, each node's session sees
    each new write once (from whichever side), and all that crosses the links after the
    rejoin is a small fraction of the state (docs/protocol.md, "Catch-up")."""
    port = free_port()
    a, b, d, e = (socket_node() for _ in range(4))
    c = socket_node(data_dir=tmp_path / "c", port=port)
    for x in (a, b, c, d, e):
        await x.open()
    c_id = c.node_id
    try:
        await a.connect(b.url)
        await b.connect(c.url)
        await d.connect(c.url)
        await e.connect(d.url)
        await wait_for(lambda: len(c.peers()) == 2 and len(d.peers()) == 2, 10, "line up")
        sa = await a.register_session("sa", subscribe=["d"])
        se = await e.register_session("se", subscribe=["d"])
        watchers = [
            await n.register_session(f"w{k}", subscribe=["d"]) for k, n in enumerate((b, d))
        ]
        streams = [s.events() for s in (sa, se, *watchers)]
        await sa.capture_many("d", [f"old fact {i} " + "y" * 200 for i in range(1500)])
        await wait_for(lambda: converged([a, b, c, d, e], "d"), 20, "preload")
        full_state = len(a._docs["d"].diff())
        for st in streams:
            drain(st)
        await c.aclose()
        await wait_for(lambda: len(b.peers()) == 1 and len(d.peers()) == 1, 10, "C gone")
        new = []
        for i in range(3):
            for s in (sa, se):
                m = await s.capture("d", f"while C was away: {s.id} {i}")
                new.append(m.id)
        wire.clear()
        c = socket_node(data_dir=tmp_path / "c", port=port)
        await c.open()
        assert c.node_id == c_id
        nodes = [a, b, c, d, e]
        await wait_for(lambda: converged(nodes, "d") and quiet(nodes), 20, "rejoined")
        healed = sum(len(m) for _, m in wire)
        assert full_state > 300_000
        assert healed < full_state / 20, (healed, full_state)
        assert all(len(n.memories("d")) == 1506 for n in nodes)
        # Each session saw each capture it should, once: B's and D's watchers all six,
        # A's and E's sessions the other side's three (own events are left out).
        captured = [
            [ev.memory_id for ev in drain(st) if isinstance(ev, Captured)] for st in streams
        ]
        by_e = {mid for mid in new if a.get(mid).source_session == "se"}
        assert sorted(captured[0]) == sorted(by_e)
        assert sorted(captured[1]) == sorted(set(new) - by_e)
        assert sorted(captured[2]) == sorted(captured[3]) == sorted(new)
    finally:
        for x in (a, b, c, d, e):
            await x.aclose()


# -- 4. a ring whose links drop and come back while every node writes ---------------------


async def test_a_ring_with_links_dropped_and_remade_while_writing_agrees_on_everything() -> None:
    """Ring of 5 over sockets; for 16 rounds a link drops (at most two down at once) or
    comes back while three nodes update one memory concurrently and some capture. Once
    the ring is whole: the same state, the same history, every write event once on every
    node, and the same ``Conflict`` events everywhere (docs/schema.md: every node raises
    one per losing write), whatever path and order each update took."""
    rng = random.Random(7)
    n = 5
    ring = [(i, (i + 1) % n) for i in range(n)]
    nodes = [socket_node() for _ in range(n)]
    for x in nodes:
        await x.open()
    try:
        sessions = [await x.register_session(f"s{k}", subscribe=["d"]) for k, x in enumerate(nodes)]
        streams = [s.events(include_own=True) for s in sessions]
        for i, j in ring:
            await nodes[i].connect(nodes[j].url)
        await wait_for(lambda: all(len(x.peers()) == 2 for x in nodes), 10, "ring up")
        shared = await sessions[0].capture("d", "the shared memory")
        await wait_for(lambda: converged(nodes, "d"), 10, "first write")
        down: set[tuple[int, int]] = set()
        for step in range(16):
            i, j = ring[rng.randrange(n)]
            a, b = nodes[i], nodes[j]
            if (i, j) in down:
                await a.connect(b.url)
                down.discard((i, j))
            elif len(down) < 2:
                await a._transport.remove_peer(b.url)
                peer = a._links.get(b.node_id)
                if peer is not None:
                    await peer.link.close(1000, "dropped by the test")
                down.add((i, j))
            writers = rng.sample(range(n), 3)
            await asyncio.gather(
                *(sessions[k].update(shared.id, content=f"round {step} by {k}") for k in writers)
            )
            if rng.random() < 0.5:
                await sessions[rng.randrange(n)].capture("d", f"captured in round {step}")
        for i, j in sorted(down):
            await nodes[i].connect(nodes[j].url)
        await wait_for(lambda: all(len(x.peers()) == 2 for x in nodes), 10, "ring whole")
        await wait_for(lambda: converged(nodes, "d") and quiet(nodes), 20, "converged")
        histories = [x.history(shared.id) for x in nodes]
        assert all(h == histories[0] for h in histories)
        assert len(histories[0]) == 1 + 16 * 3
        events = [drain(st) for st in streams]
        writes = [
            [write_view(ev) for ev in evs if isinstance(ev, Captured | Updated | Deleted)]
            for evs in events
        ]
        conflicts = [
            sorted(write_view(ev) for ev in evs if isinstance(ev, Conflict)) for evs in events
        ]
        for k in range(n):
            assert len(writes[k]) == len(set(writes[k])), f"node {k}: a write event twice"
            assert set(writes[k]) == set(writes[0]), f"node {k} saw other writes"
            assert conflicts[k] == conflicts[0], f"node {k} raised other conflicts"
        assert len({w[2] for w in writes[0] if w[0] == "Updated"}) == 16 * 3
        assert conflicts[0], "concurrent updates of one memory raised no Conflict"
    finally:
        for x in nodes:
            await x.aclose()


# -- 5. nothing received is sent back to the node it came from ----------------------------


class HoldingLink(MemoryLink):
    """A node's end of an in-memory link that holds its first step 1 and everything sent
    after it until ``release``: the peer gets this node's hello (so live updates flow to
    this node) but not yet its request for the catch-up."""

    def __init__(self, peer: Hello) -> None:
        super().__init__(peer)
        self.held: list[bytes] | None = []

    async def send(self, frame: bytes) -> None:
        held = self.held
        if held is not None and (held or any(f[0] == F_SV for f in frames_of([frame]))):
            held.append(frame)
            return
        await super().send(frame)

    async def release(self) -> None:
        held, self.held = self.held or [], None
        for frame in held:
            await super().send(frame)


def holding_link(node: ConversationsApi, peer: ConversationsApi) -> tuple[HoldingLink, MemoryLink]:
    """Link ``node`` (whose end holds, see ``HoldingLink``) and ``peer`` in memory."""
    ours = HoldingLink(peer._hello())
    theirs = MemoryLink(node._hello())
    ours._other, theirs._other = theirs, ours
    node.attach(ours)
    peer.attach(theirs)
    return ours, theirs


async def test_a_catch_up_that_releases_a_held_back_write_is_not_echoed_to_its_sender() -> None:
    """A-B hold 300 memories; C joins B (a node back from offline) and a write of A's
    reaches C through B before B's catch-up does: C holds it back (its earlier updates are
    missing). B's step 2 then releases it. Everything C holds came from B, so C owes B
    nothing; C must not send B the catch-up back as a live update (docs/protocol.md: a
    received update goes to each other peer except the one it came from; "a reconnect
    moves only what changed")."""
    async with memory_node() as a, memory_node() as b, memory_node() as c:
        sa = await a.register_session("a1", subscribe=["d"])
        await c.register_session("c1", subscribe=["d"])
        link(a, b)
        await sa.capture_many("d", [f"fact {i} " + "x" * 100 for i in range(300)])
        await wait_for(lambda: converged([a, b], "d") and quiet([a, b]), 10, "A-B synced")
        c_end, b_end = holding_link(c, b)
        await wait_for(
            lambda: c.node_id in b._links and "d" in b._links[c.node_id].shared, 5, "C's hello"
        )
        await sa.capture("d", "written on A while C joins")
        await wait_for(lambda: c._docs["d"].holds_back == 1, 5, "C holds A's write back")
        sent_before = len(c_end.sent_frames)
        await c_end.release()
        await wait_for(lambda: converged([a, b, c], "d") and quiet([a, b, c]), 10, "C caught up")
        step2 = sum(len(m) for m in b_end.sent_frames if next(frames_of([m]))[0] == F_DIFF)
        echoed = [f for f in frames_of(c_end.sent_frames[sent_before:]) if f[0] == F_UPDATE]
        assert echoed == [], (
            f"C sent B {len(echoed)} update(s), {sum(len(f[3]) for f in echoed)} bytes, "
            f"of a {step2}-byte catch-up that came from B"
        )


async def test_a_step_2_does_not_send_back_writes_the_peer_sent_after_its_step_1() -> None:
    """P links to X and writes at once: P's step 1 and then its live write reach X
    together. X's answer to the step 1 is made from its document when sent, which by then
    holds P's write: it must not carry that write back to P (only what P misses,
    docs/protocol.md "Catch-up")."""
    async with memory_node() as x, memory_node() as p:
        sx = await x.register_session("x1", subscribe=["d"])
        sp = await p.register_session("p1", subscribe=["d"])
        await sx.capture("d", "on X before the link")
        p_end, x_end = holding_link(p, x)
        await wait_for(
            lambda: x.node_id in p._links and "d" in p._links[x.node_id].shared, 5, "X's hello"
        )
        await sp.capture("d", "MARKER written on P right after linking " + "q" * 500)
        await p_end.release()
        await wait_for(lambda: converged([x, p], "d") and quiet([x, p]), 10, "synced")
        answers = [f for f in frames_of(x_end.sent_frames) if f[0] == F_DIFF]
        assert answers, "X answered P's step 1"
        assert not any(b"MARKER" in f[2] for f in answers), "P's own write came back to P"
