"""Backpressure on a link to a peer that stops reading (docs/protocol.md, "Backpressure").

The queue limits are lowered (monkeypatched) so a few writes fill them; the slow peer is
a :class:`GatedLink` whose sends wait until its gate opens. What is asserted is what the
protocol documents: live updates past the soft limit (frames or bytes) are dropped and the
peer is resynced once the queue drains, so nothing is lost and the queue stays bounded;
control frames are never dropped, and past the hard limit the peer is disconnected with
4000 "queue full" while the node goes on serving."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from helpers import converged, link, wait_for
from subcog_crdt import ConversationsApi, _peering
from subcog_crdt._transport.memory import MemoryLink
from test_peering_robustness import (
    F_RESYNC,
    F_SESSIONS,
    F_UPDATE,
    GatedLink,
    frames_of,
    memory_node,
    raw_peer,
)


def gated_link(a: ConversationsApi, b: ConversationsApi) -> GatedLink:
    """Link A and B in memory; what A sends waits on the returned link's gate (B "stops
    reading" while it is clear). The gate starts clear."""
    ours = GatedLink(b._hello())
    theirs = MemoryLink(a._hello())
    ours._other, theirs._other = theirs, ours
    a.attach(ours)
    b.attach(theirs)
    return ours


def idle(peer: Any) -> bool:
    """Nothing queued or in flight on this link."""
    return not peer._queue and not peer._busy and not peer._pending


@pytest.mark.parametrize("limit", ["frames", "bytes"])
async def test_a_slow_peer_gets_the_dropped_updates_back_by_one_resync(
    monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """A writes 40 updates while B does not read. A's queue for B stops growing at the
    soft limit (the rest are dropped, not buffered); when B reads again A sends exactly
    one resync (frame 7) and B ends up with every write. Guards both halves: a queue that
    never drops grows without bound, and dropping without the resync loses writes."""
    frames_limit, bytes_limit = 8, 16 * 1024
    if limit == "frames":
        monkeypatch.setattr(_peering, "_QUEUE_FRAMES", frames_limit)
    else:
        monkeypatch.setattr(_peering, "_QUEUE_BYTES", bytes_limit)
    async with memory_node() as a, memory_node() as b:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        await sa.capture("d", "A before the link")
        await sb.capture("d", "B before the link")
        a_to_b = gated_link(a, b)
        a_to_b.gate.set()
        await wait_for(lambda: converged([a, b], "d"), 10, "initial sync")
        peer = a._links[b.node_id]
        # A probe session on B reaches A after every frame B sent before it; once A has
        # it and A's queue is empty, A owes B nothing from the initial sync (a step 2 made
        # after the gate closed would carry the writes below and hide a missing resync).
        await b.register_session("probe")
        await wait_for(
            lambda: "probe" in {s.id for s in a.sessions.list()} and idle(peer), 10, "A idle"
        )
        a_to_b.gate.clear()  # B stops reading
        sent_before = len(a_to_b.sent_frames)

        contents = [f"write {i} " + "x" * 1000 for i in range(40)]
        for text in contents:
            await sa.capture("d", text)
        if limit == "frames":
            assert len(peer._queue) <= frames_limit
        else:  # checked before a frame is added: at most one frame over
            assert peer._queued_bytes < bytes_limit + 2000

        a_to_b.gate.set()  # B reads again
        await wait_for(
            lambda: len(b.memories("d")) == 42 and converged([a, b], "d"), 10, "B caught up"
        )
        await wait_for(lambda: idle(peer), 10, "A idle again")
        sent = list(frames_of(a_to_b.sent_frames[sent_before:]))
        assert [f for f in sent if f[0] == F_RESYNC] == [[F_RESYNC, "d"]]
        live = [f for f in sent if f[0] == F_UPDATE]
        assert 0 < len(live) < len(contents)  # the rest came by the resync
        assert sorted(m.content for m in b.memories("d") if m.content.startswith("write")) == (
            sorted(contents)
        )


def _queued_or_closed(link: Any, queued: Callable[[], int], n: int) -> bool:
    return bool(link._closed) or queued() >= n


async def test_control_frames_are_kept_until_the_hard_limit_then_the_peer_is_disconnected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that never reads while A's sessions change: every sessions frame (a control
    frame) is queued, past the soft limits, until the queue would exceed the hard limit;
    then the link is closed with 4000 "queue full". The queue never exceeds the hard
    limit, and the node goes on serving its other peer. Guards against a node that
    buffers control frames without bound for a peer that does not read."""
    hard = 16 * 1024
    monkeypatch.setattr(_peering, "_QUEUE_FRAMES", 2)
    monkeypatch.setattr(_peering, "_QUEUE_BYTES", 1024)
    monkeypatch.setattr(_peering, "_QUEUE_HARD_BYTES", hard)
    async with memory_node() as a, memory_node() as b:
        sa = await a.register_session("a1", subscribe=["d"])
        await b.register_session("b1", subscribe=["d"])
        link(a, b)
        ours, _theirs = raw_peer(a, "never-reads", gated=True)
        await wait_for(lambda: "never-reads" in a._links and b.node_id in a._links, 5, "links")
        slow, healthy = a._links["never-reads"], a._links[b.node_id]

        def sessions_queued() -> int:
            return sum(
                1
                for f in frames_of([x for x in slow._queue if isinstance(x, bytes)])
                if f[0] == F_SESSIONS
            )

        registered = 0
        while not slow._closed:
            assert registered < 200, "never disconnected"
            await a.register_session(f"session-{registered:03d}-" + "x" * 100)
            registered += 1
            # The sessions frame is queued on the next loop turn.
            await wait_for(partial(_queued_or_closed, slow, sessions_queued, registered), 5)
            if not slow._closed:
                assert sessions_queued() == registered  # none dropped
            assert slow._queued_bytes <= hard
            # B reads: its queue drains between writes (a loop that never yields would
            # fill B's queue too, and B would be disconnected as well).
            await wait_for(lambda: idle(healthy), 5, "B's queue drained")
        assert registered - 1 > _peering._QUEUE_FRAMES  # kept past the soft limit

        await wait_for(lambda: "never-reads" not in a._links, 5, "the slow link dropped")
        assert (ours.close_code, ours.close_reason) == (4000, "queue full")
        assert a._links.get(b.node_id) is healthy  # the other peer stays
        await sa.capture("d", "still serving")
        await wait_for(lambda: converged([a, b], "d"), 5, "B gets the write")
        assert [m.content for m in b.memories("d")] == ["still serving"]


async def test_sessions_registered_together_reach_a_peer_in_one_frame() -> None:
    """Each sessions frame lists every local session; registering many at once sent one
    per registration (quadratic bytes: 41 MB to each peer for 1000 sessions)."""
    async with memory_node() as a:
        _ours, _theirs = raw_peer(a, "peer", gated=True)
        await wait_for(lambda: "peer" in a._links, 5, "link")
        slow = a._links["peer"]

        def sessions_frames() -> list[list[Any]]:
            queued = [x for x in slow._queue if isinstance(x, bytes)]
            return [f for f in frames_of(queued) if f[0] == F_SESSIONS]

        before = len(sessions_frames())
        for i in range(20):
            await a.register_session(f"s{i}", subscribe=["d"])
        await wait_for(lambda: len(sessions_frames()) > before, 5, "a sessions frame")
        frames = sessions_frames()[before:]
        assert len(frames) == 1
        assert sorted(s["id"] for s in frames[0][1]) == sorted(f"s{i}" for i in range(20))
