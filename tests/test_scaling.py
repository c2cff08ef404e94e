"""Scaling: work that must grow with what changed, not with everything a node holds.

Each test counts (frames, calls into a per-item step, bytes on the wire), never time:
a write in one namespace must not visit every namespace, an event must not be offered
to every stream, a recall must not build a memory per namespace, and so on. The figures
behind them (timings at several sizes) are in the report that added this file."""

from __future__ import annotations

import asyncio
import io
import itertools
from typing import Any

import msgpack
import pytest

from helpers import converged, link, peer_lists_known, wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._bus import Subscription
from subcog_crdt._core import document
from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._peering import F_SESSIONS, F_UPDATE
from subcog_crdt._transport.memory import MemoryLink


def _frames(messages: list[bytes]) -> list[Any]:
    """Every sync frame in these messages (a message holds one or more, back to back)."""
    out: list[Any] = []
    for m in messages:
        out.extend(msgpack.Unpacker(io.BytesIO(m), raw=False))
    return out


def _quiet(nodes: list[ConversationsApi]) -> bool:
    """No link of these nodes has anything queued or in flight."""
    return all(not p._queue and not p._busy for n in nodes for p in n._links.values())


# -- forwarding ------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["mesh", "line"])
async def test_a_write_costs_one_update_frame_per_other_node(topology: str) -> None:
    """In a 5-node full mesh and a 5-node line a write reaches every node with n-1
    update frames in all (docs/protocol.md, "Live updates"): nothing is echoed back,
    nothing forwarded to a node linked to the origin, so the count never grows with the
    square of the mesh."""
    n = 5
    nodes = [ConversationsApi(listen=False) for _ in range(n)]
    for node in nodes:
        await node.open()
    try:
        pairs = (
            list(itertools.combinations(range(n), 2))
            if topology == "mesh"
            else [(i, i + 1) for i in range(n - 1)]
        )
        links: list[MemoryLink] = []
        for i, j in pairs:
            links.extend(link(nodes[i], nodes[j]))
        degree = [sum(k in pair for pair in pairs) for k in range(n)]
        await wait_for(
            lambda: all(len(x._links) == degree[k] for k, x in enumerate(nodes)), 10, "links"
        )
        sessions = [
            await x.register_session(f"s{k}", subscribe=["ns"]) for k, x in enumerate(nodes)
        ]
        await sessions[0].capture("ns", "warm-up")
        # Every node knows its peers' links (frame 5) before counting.
        await wait_for(
            lambda: converged(nodes, "ns") and _quiet(nodes) and peer_lists_known(nodes),
            10,
            "warm-up and peer lists",
        )
        sent_before = [len(lk.sent_frames) for lk in links]
        writes = 0
        for writer in (0, 2, n - 1):  # an end, the middle, the other end
            for k in range(5):
                await sessions[writer].capture("ns", f"memory {writer}-{k}")
                writes += 1
                await wait_for(lambda: converged(nodes, "ns") and _quiet(nodes), 10, "a write")
        frames = _frames(
            [m for lk, k in zip(links, sent_before, strict=True) for m in lk.sent_frames[k:]]
        )
        updates = [f for f in frames if f[0] == F_UPDATE]
        assert len(updates) == writes * (n - 1), (
            f"{len(updates)} update frames for {writes} writes on {n} nodes ({topology})"
        )
        assert all(len(x.memories("ns")) == writes + 1 for x in nodes)
    finally:
        for node in nodes:
            await node.aclose()


# -- per write: the index task, the event bus ---------------------------------------------


async def test_background_indexing_after_a_write_visits_only_the_written_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every commit wakes the background indexer, which then asks every namespace whether
    it has work (``_index_in_background``): with 300 namespaces each write made 300
    visits, whatever it changed (5000 namespaces: ~2 ms of event loop per write)."""
    visits = 0
    has_work = NamespaceDoc.background_work.fget
    assert has_work is not None

    def counting(doc: NamespaceDoc) -> bool:
        nonlocal visits
        visits += 1
        return bool(has_work(doc))

    monkeypatch.setattr(NamespaceDoc, "background_work", property(counting))
    names = [f"n{i}" for i in range(300)]
    async with ConversationsApi(listen=False) as api:
        s = await api.register_session("s", subscribe=names)
        written = api._docs["n0"]

        def idle() -> bool:
            return not api._index_wake.is_set() and not has_work(written)

        await wait_for(idle, 10, "the indexer after registration")
        visits = 0
        writes = 10
        for k in range(writes):
            # One write at a time, each after the indexer went idle (as at 200 writes/s).
            await s.capture("n0", f"memory {k}")
            await wait_for(idle, 10, "the indexer after a write")
        assert [m.content for m in s.recall("memory", limit=20)] != []
        assert visits <= writes * 8, f"{visits} namespace visits for {writes} writes"


async def test_an_event_is_offered_only_to_streams_subscribed_to_its_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``EventBus.publish`` hands each event to every open stream, which then checks the
    namespace: with 200 streams on other namespaces every write made 200 calls (5000
    streams: ~6 ms per write). It should reach only the streams that can accept it."""
    offered = 0
    push = Subscription._push

    def counting(sub: Subscription, event: Any) -> None:
        nonlocal offered
        offered += 1
        push(sub, event)

    monkeypatch.setattr(Subscription, "_push", counting)
    async with ConversationsApi(listen=False) as api:
        others = [await api.register_session(f"o{i}", subscribe=[f"other{i}"]) for i in range(200)]
        streams = [o.events() for o in others]
        reader = await api.register_session("reader", subscribe=["ns"])
        mine = reader.events()
        writer = await api.register_session("writer", subscribe=[])
        writes = 10
        for k in range(writes):
            await writer.capture("ns", f"memory {k}")
        got = [mine.get_nowait() for _ in range(writes)]
        assert [e.memory.content for e in got] == [f"memory {k}" for k in range(writes)]  # type: ignore[union-attr]
        assert all(st.get_nowait() is None for st in streams)
        assert offered <= writes * 4, f"{writes} events were offered to streams {offered} times"


# -- sessions ----------------------------------------------------------------------------


async def test_sessions_registered_one_at_a_time_cost_a_peer_linear_bytes() -> None:
    """Each sessions frame (4) lists every local session, and is sent per registration
    (coalesced only within one loop turn): 200 sessions started one after another sent
    the peer ~200 copies of a growing list. Measured: 100 sessions 0.25 MB, 300 2.2 MB,
    1000 24.5 MB to each peer. What a peer gets must grow with the sessions, not their
    square."""
    n = 200
    async with ConversationsApi(listen=False) as a, ConversationsApi(listen=False) as b:
        la, _lb = link(a, b)
        await wait_for(lambda: b.node_id in a._links and a.node_id in b._links, 5, "link")
        start = len(la.sent_frames)
        for i in range(n):
            await a.register_session(f"session-{i:04d}", subscribe=["ns"])
            await asyncio.sleep(0)  # sessions start over time, not in one loop turn
        await wait_for(lambda: len(b.sessions.list()) == n, 10, "the peer sees every session")
        await wait_for(lambda: _quiet([a]), 5, "sends done")
        assert sorted(s.id for s in b.sessions.list()) == [f"session-{i:04d}" for i in range(n)]
        sessions_bytes = sum(
            len(msgpack.packb(f, use_bin_type=True))
            for f in _frames(la.sent_frames[start:])
            if f[0] == F_SESSIONS
        )
        one_list = len(msgpack.packb(a._sessions_wire(), use_bin_type=True))
        assert sessions_bytes <= 10 * one_list, (
            f"{sessions_bytes} bytes of sessions frames for a list of {one_list} bytes"
        )


# -- reads by id, recall ----------------------------------------------------------------


async def test_looking_a_memory_up_by_id_does_not_ask_every_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_doc_of`` finds a memory's namespace by asking each namespace in turn, unless the
    id is in a small cache (4096, cleared when full), which only a lookup fills: the
    first ``get``/``update``/``delete`` of any memory costs a pass over every namespace
    (5000 namespaces: ~0.8 ms per get against ~30 us with one)."""
    asked = 0
    has = NamespaceDoc.has

    def counting(doc: NamespaceDoc, memory_id: str) -> bool:
        nonlocal asked
        asked += 1
        return has(doc, memory_id)

    async with ConversationsApi(listen=False) as api:
        s = await api.register_session("s", subscribe=[])
        ids = []
        for i in range(200):
            m = await s.capture(f"n{i}", f"memory in namespace {i}")
            ids.append(m.id)
        monkeypatch.setattr(NamespaceDoc, "has", counting)
        for mid in ids:
            assert api.get(mid).id == mid
        updated = await s.update(ids[-1], tags=["x"])
        assert updated.tags == ("x",)
        lookups = len(ids) + 1
        assert asked <= 3 * lookups, f"{asked} namespace checks for {lookups} lookups by id"


async def test_recall_over_many_namespaces_builds_only_the_memories_it_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``recall`` without a namespace asks each namespace for its best ``limit`` hits and
    builds every one as a ``Memory`` before keeping ``limit`` of them all: 100
    namespaces, limit 5, built 500 memories to return 5 (10k memories over 5000
    namespaces: 0.6 s per recall, against 11 ms in one namespace)."""
    built = 0
    get = NamespaceDoc.get

    def counting(doc: NamespaceDoc, memory_id: str) -> Any:
        nonlocal built
        built += 1
        return get(doc, memory_id)

    async with ConversationsApi(listen=False) as api:
        s = await api.register_session("s", subscribe=[])
        for i in range(100):
            await s.capture_many(f"n{i}", [f"common word {i} {j}" for j in range(10)])
        api.recall("warm the index up")
        monkeypatch.setattr(NamespaceDoc, "get", counting)
        hits = api.recall("common", limit=5)
        assert len(hits) == 5 and all("common" in m.content for m in hits)
        assert built <= 25, f"{built} memories built for a recall of 5"


# -- one memory, many captures ------------------------------------------------------------


async def test_a_memory_captured_by_many_sessions_is_indexed_once_per_recall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each capture of a live memory that adds tags queues the memory for indexing with
    all its tags (``_to_index``), and nothing replaces an earlier entry: after n captures
    the next recall tokenises n copies of a growing tag list, O(n^2). Measured: 1000
    sessions with one tag each 0.95 s per recall, 2000 3.7 s; with 64 tags each, 250
    sessions 3.6 s, 1000 sessions 76 s."""
    n = 150
    async with ConversationsApi(listen=False) as api:
        sessions = [await api.register_session(f"s{i}", subscribe=["ns"]) for i in range(n)]
        calls = 0
        tokenize = document.tokenize

        def counting(text: str) -> list[str]:
            nonlocal calls
            calls += 1
            return tokenize(text)

        monkeypatch.setattr(document, "tokenize", counting)
        for i, s in enumerate(sessions):
            m = await s.capture("ns", "the same fact", tags=[f"tag{i}"])
        assert len(m.captured_by) == n and len(m.tags) == n
        hits = api.recall("tag7")
        assert [h.id for h in hits] == [m.id]
        # One indexing of the memory: its content and its n tags (a few more allowed).
        assert calls <= 3 * (n + 1), f"{calls} texts tokenised for one memory with {n} tags"


async def test_a_memory_keeps_at_most_256_tags_alike_on_every_node() -> None:
    """Captures of a live memory add their new tags, so a fact captured by many sessions
    with many tags grew without bound (each capture then copied and scanned the whole
    list: 234 ms per capture at 1000 sessions of 64 tags). A memory keeps its first 256
    in fold order, on every node alike; later captures still join ``captured_by``."""
    async with ConversationsApi(listen=False) as a, ConversationsApi(listen=False) as b:
        link(a, b)
        sessions = [await a.register_session(f"s{i}", subscribe=["ns"]) for i in range(6)]
        for i, s in enumerate(sessions):
            m = await s.capture("ns", "the same fact", tags=[f"t{i}x{j}" for j in range(64)])
        want = [f"t{i}x{j}" for i in range(4) for j in range(64)]
        assert list(m.tags) == want and len(m.captured_by) == 6
        await wait_for(lambda: converged([a, b], "ns"), 10, "b has every capture")
        assert list(b.get(m.id).tags) == want
        assert [h.id for h in a.recall("t3x63")] == [m.id]
        assert a.recall("t4x0") == []  # past the bound: not kept, not indexed
