"""Review of session 7's changes: session lists and hellos in parts (protocol.md section 4,
frames 0 and 4), the bounds on what a peer lists and a node hosts (section 5), and what
those parts cost the receiving node.

Hostile peers are driven by hand over in-memory links (as in tests/test_sessions_mesh.py);
real nodes talk over loopback sockets where a frame limit matters. Waits are on conditions
with deadlines that only guard against hangs."""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from helpers import hand_driven_peer, link, pack, wait_for
from subcog_crdt import ConversationsApi, InvalidArgument
from subcog_crdt._errors import ProtocolError
from subcog_crdt._transport.memory import MemoryLink

F_HELLO, F_SESSIONS = 0, 4
SMALLEST_FRAME = 4096
"""The smallest ``max_frame`` a node accepts (``ConversationsApi`` refuses less)."""


def socket_node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(host="127.0.0.1", discovery=(), **kw)


def memory_node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(listen=False, discovery=(), **kw)


def remote(api: ConversationsApi) -> set[str]:
    """Ids of the remote sessions ``api`` lists."""
    return {s.id for s in api.sessions.list() if not s.is_local}


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[ConversationsApi, MemoryLink, MemoryLink]]:
    """A node with one local session, and a hand-driven peer "hostile" whose valid hello
    listed one session "ok" (the node lists it)."""
    async with memory_node() as api:
        await api.register_session("mine", subscribe=["d"])
        ours, theirs = await hand_driven_peer(api)
        yield api, ours, theirs


# -- a session list in parts, as received -----------------------------------------------------


async def test_a_list_in_parts_replaces_the_last_one_only_when_whole(
    hostile: tuple[ConversationsApi, MemoryLink, MemoryLink],
) -> None:
    """Parts (``[4, part, True]`` ... ``[4, last]``) are one list: until the last part
    the node keeps listing the previous list, then lists exactly the parts together."""
    api, ours, _ = hostile
    peer = api._links["hostile"]
    first = [{"id": f"p{i}", "user_id": "u", "subscriptions": ["d"]} for i in range(3)]
    last = [{"id": "q0", "user_id": "u", "subscriptions": []}]
    assert peer.on_message(pack([F_SESSIONS, first, True])) is None
    assert remote(api) == {"ok"}  # not a partial list
    assert peer.on_message(pack([F_SESSIONS, last])) is None
    assert remote(api) == {"p0", "p1", "p2", "q0"}
    assert not ours.closed


async def test_a_part_with_an_invalid_session_is_refused_at_once(
    hostile: tuple[ConversationsApi, MemoryLink, MemoryLink],
) -> None:
    """A part that holds a session no node could list (here an id with a slash) is
    refused when it arrives (``ProtocolError``: the link closes with 4000), not kept
    until a last part that a hostile peer never sends. Today only the last part is
    checked: the part is taken and the link stays up."""
    api, _, _ = hostile
    peer = api._links["hostile"]
    bad = {"id": "bad/id", "user_id": "u", "subscriptions": []}
    with pytest.raises(ProtocolError):
        peer.on_message(pack([F_SESSIONS, [bad], True]))
    assert remote(api) == {"ok"}


async def test_parts_pending_do_not_hold_what_the_node_ignores(
    hostile: tuple[ConversationsApi, MemoryLink, MemoryLink],
) -> None:
    """Parts of a list not yet whole hold at most what the node keeps of a session (id,
    user id, subscriptions): keys it ignores are not held. Today every part is kept as
    received until the last one: a peer sending ``[4, [entry], True]`` with 16 MiB of
    padding per entry makes the node hold up to 10,000 x 16 MiB. Measured with 16 parts
    of 1 MiB padding each."""
    api, ours, _ = hostile
    peer = api._links["hostile"]
    pad = "x" * (1 << 20)
    entries = [{"id": f"s{i}", "user_id": "u", "subscriptions": [], "pad": pad} for i in range(16)]
    frames = [pack([F_SESSIONS, [entry], True]) for entry in entries]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for frame in frames:
            assert peer.on_message(frame) is None
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert not ours.closed
    assert held < 4 << 20, f"{held / (1 << 20):.1f} MiB held for 16 pending parts"
    # The list is still valid: its last part lists all of it.
    assert peer.on_message(pack([F_SESSIONS, []])) is None
    assert remote(api) == {f"s{i}" for i in range(16)}


# -- what a node hosts must be what its peers accept -------------------------------------------


async def test_a_session_peers_would_refuse_is_not_hosted() -> None:
    """Peers refuse a session list with a user id over 256 characters (close 4000,
    protocol.md section 5), so a node hosting such a session could link to no peer:
    ``register_session`` must refuse it (as it refuses a node ``user_id`` that long), or
    peers must accept it. Today the session is registered and every link closes with
    4000, and the redialled one again: the nodes are partitioned."""
    async with memory_node() as a, memory_node() as b:
        try:
            sa = await a.register_session("s1", subscribe=["d"], user_id="u" * 300)
        except InvalidArgument:
            return  # refused where it is made: peers never see it
        la, _ = link(a, b)
        m = await sa.capture("d", "must reach b")

        def arrived() -> bool:
            return "d" in b.namespaces() and any(x.id == m.id for x in b.memories("d"))

        await wait_for(lambda: la.closed or arrived(), 10, "link closed or memory synced")
        assert not la.closed, f"link closed: {la.close_code} {la.close_reason}"


async def test_many_sessions_reach_a_peer_with_the_smallest_frame_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node hosting 200 sessions (a list of ~9 KB) links to a peer with max_frame=4096:
    the hello's lists follow in frames of at most 3 KiB, which that peer accepts
    (protocol.md section 4). Today the writer coalesces those frames into one message
    up to this node's own max_frame before the peer's hello has said its limit (9.3 KB
    here): the peer closes every link with 4009 and no memory ever reaches it."""
    caplog.set_level(logging.WARNING)
    async with socket_node() as a, socket_node(max_frame=SMALLEST_FRAME) as b:
        sa = await a.register_session("writer", subscribe=["d"])
        for i in range(200):
            await a.register_session(f"agent-{i:03d}", subscribe=["d", "e"])
        assert a.url is not None
        await b.connect(a.url)
        m = await sa.capture("d", "must reach b")

        def arrived() -> bool:
            return "d" in b.namespaces() and any(x.id == m.id for x in b.memories("d"))

        await wait_for(lambda: arrived() or "frame too large" in caplog.text, 10, "synced")
        assert "frame too large" not in caplog.text
        await wait_for(lambda: len(remote(b)) == 201, 10, "b lists a's sessions")


async def test_one_wide_session_does_not_partition_a_small_frame_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One session subscribed to 120 namespaces of ~40 characters (an entry of ~5 KB)
    cannot go in a part of at most 3 KiB: either ``register_session`` refuses what no
    peer with the smallest frame limit could be told, or the session reaches it. Today
    the entry goes whole, the peer (max_frame=4096) closes every link with 4009, and
    the two nodes never sync."""
    caplog.set_level(logging.WARNING)
    subs = [f"namespace-with-a-rather-long-name-{i:03d}" for i in range(120)]
    async with socket_node() as a, socket_node(max_frame=SMALLEST_FRAME) as b:
        sa = await a.register_session("writer", subscribe=["d"])
        try:
            await a.register_session("wide", subscribe=subs)
        except InvalidArgument:
            return  # refused where it is made: peers never see it
        assert a.url is not None
        await b.connect(a.url)
        m = await sa.capture("d", "must reach b")

        def arrived() -> bool:
            return "d" in b.namespaces() and any(x.id == m.id for x in b.memories("d"))

        await wait_for(lambda: arrived() or "frame too large" in caplog.text, 10, "synced")
        assert "frame too large" not in caplog.text
        await wait_for(lambda: remote(b) == {"writer", "wide"}, 10, "b lists a's sessions")
