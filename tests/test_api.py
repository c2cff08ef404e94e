"""The public API over in-memory nodes: sessions, events, conflicts, recall, sync."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from helpers import converged, link, wait_for
from subcog_crdt import (
    Captured,
    ClosedError,
    Conflict,
    ConflictError,
    ConversationsApi,
    Deleted,
    InvalidArgument,
    InvalidNamespace,
    Lagged,
    Memory,
    NotFound,
    PeerInfo,
    Retention,
    StorageError,
    StorageLocked,
    Updated,
)
from subcog_crdt._peering import is_live_update
from subcog_crdt._transport.memory import memory_link_pair
from subcog_crdt._transport.websocket import CLOSE_DUPLICATE


def node(**kw) -> ConversationsApi:
    return ConversationsApi(listen=False, **kw)


async def test_capture_update_delete_reach_other_node_as_events():
    async with node() as a, node() as b:
        sa = await a.register_session("claude-1", subscribe=["decisions"])
        sb = await b.register_session("cursor-2", subscribe=["decisions"])
        events = sb.events()
        link(a, b)
        m = await sa.capture("decisions", "Use SQLite WAL", tags=["storage"])
        ev = await events.next(5)
        cursors = [ev.cursor]
        assert isinstance(ev, Captured)
        assert (ev.memory.id, ev.source_session, ev.node_id) == (m.id, "claude-1", a.node_id)
        m2 = await sa.update(m.id, content="Use SQLite WAL + fsync", expected_version=m.version)
        ev = await events.next(5)
        cursors.append(ev.cursor)
        assert isinstance(ev, Updated)
        assert ev.changes == {"content": "Use SQLite WAL + fsync"}
        assert ev.source_session == "claude-1"
        await sa.delete(m2.id)
        ev = await events.next(5)
        cursors.append(ev.cursor)
        assert isinstance(ev, Deleted) and ev.memory_id == m.id
        assert b.get(m.id).deleted
        async with sb.events(include_own=True) as own:
            await sb.capture("decisions", "Tests live next to the code")
            item = await own.next(5)
            assert isinstance(item, Captured) and item.source_session == "cursor-2"
            cursors.append(item.cursor)
        # A node's cursor grows by one per event, whatever its origin (remote or own).
        assert cursors == list(range(cursors[0], cursors[0] + 4)), cursors
        await wait_for(lambda: converged([a, b], "decisions"))


async def test_events_filtered_by_subscription_and_own_excluded() -> None:
    """A stream gets what others write in its subscriptions: not other namespaces, and
    not the session's own writes even into a namespace it subscribes to."""
    async with node() as a:
        s1 = await a.register_session("s1", subscribe=["decisions"])
        s2 = await a.register_session("s2", subscribe=["patterns"])
        e1, e2 = s1.events(), s2.events()
        own1 = s1.events(include_own=True)
        # Own writes into subscribed namespaces come first: events are published in write
        # order, so if they were let through they would be what next() returns.
        await s1.capture("decisions", "own decision by s1")
        await s2.capture("patterns", "own pattern by s2")
        await s1.capture("patterns", "pattern by s1")
        await s2.capture("decisions", "decision by s2")
        got1 = await e1.next(5)
        got2 = await e2.next(5)
        assert isinstance(got1, Captured) and isinstance(got2, Captured)
        assert (got1.namespace, got1.source_session) == ("decisions", "s2")
        assert got1.memory.content == "decision by s2"
        assert (got2.namespace, got2.source_session) == ("patterns", "s1")
        assert got2.memory.content == "pattern by s1"
        assert e1.get_nowait() is None and e2.get_nowait() is None
        # include_own=True does deliver the own write (so the filter above is what hid it)
        mine = await own1.next(5)
        assert isinstance(mine, Captured) and mine.memory.content == "own decision by s1"


async def test_duplicate_capture_is_one_memory_with_all_capturers():
    async with node() as a, node() as b:
        sa = await a.register_session("a1", subscribe=["decisions"])
        sb = await b.register_session("b1", subscribe=["decisions"])
        ma = await sa.capture("decisions", "Use SQLite WAL")
        mb = await sb.capture("decisions", "  use sqlite   WAL ")
        link(a, b)
        await wait_for(lambda: converged([a, b], "decisions"))
        for n in (a, b):
            mems = n.memories("decisions")
            assert len(mems) == 1
            assert set(mems[0].captured_by) == {"a1", "b1"}
        assert ma.id == mb.id
        again = await sa.capture("decisions", "USE SQLITE WAL")
        assert again.id == ma.id and again.version == 3


async def test_optimistic_locking_raises_and_changes_nothing():
    async with node() as a:
        s = await a.register_session("s", subscribe=["d"])
        m = await s.capture("d", "one")
        await s.update(m.id, content="two")
        before = a.state_hash("d")
        with pytest.raises(ConflictError) as info:
            await s.update(m.id, content="three", expected_version=m.version)
        assert info.value.expected == 1 and info.value.actual == 2
        assert a.state_hash("d") == before
        assert a.get(m.id).content == "two"
        with pytest.raises(ConflictError):
            await s.delete(m.id, expected_version=1)
        assert not a.get(m.id).deleted


async def test_delete_then_recapture_revives():
    async with node() as a:
        s = await a.register_session("s", subscribe=["d"])
        m = await s.capture("d", "ephemeral fact")
        await s.delete(m.id)
        with pytest.raises(NotFound):
            await s.update(m.id, content="x")
        assert s.recall("ephemeral") == []
        again = await s.capture("d", "Ephemeral fact")
        assert again.id == m.id and not again.deleted and again.version == 3
        assert [x.op for x in a.history(m.id)] == ["capture", "delete", "capture"]
        assert [x.id for x in s.recall("ephemeral")] == [m.id]


async def test_concurrent_updates_conflict_event_on_both_nodes():
    async with node() as a, node() as b:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        la, _ = link(a, b)
        m = await sa.capture("d", "original")
        await wait_for(lambda: converged([a, b], "d"))
        ea, eb = sa.events(), sb.events()
        # partition: stop delivery by closing the link, write on both sides, then heal
        await la.close()
        await wait_for(lambda: not a.peers() and not b.peers())
        await sa.update(m.id, content="from a")
        await sb.update(m.id, content="from b")
        link(a, b)
        await wait_for(lambda: converged([a, b], "d"))
        winner = a.get(m.id)
        assert winner.content == b.get(m.id).content
        for ev in (ea, eb):
            items = []
            while len(items) < 2:
                items.append(await ev.next(5))
            conflicts = [x for x in items if isinstance(x, Conflict)]
            assert len(conflicts) == 1
            c = conflicts[0]
            assert c.fields == ("content",)
            assert winner.content == c.winner.changes["content"]
            assert {x.key for x in a.history(m.id)} >= {c.winner.key, c.loser.key}


async def test_recall_ranks_and_filters():
    async with node() as a:
        s = await a.register_session("s", subscribe=["d", "p"])
        await s.capture("d", "SQLite WAL mode for the journal", tags=["storage"])
        await s.capture("d", "SQLite SQLite SQLite everywhere", tags=["db"])
        await s.capture("d", "Unrelated note about tests")
        await s.capture("p", "SQLite in patterns too", tags=["storage"])
        hits = s.recall("sqlite")
        assert hits[0].content == "SQLite SQLite SQLite everywhere"
        assert {h.namespace for h in hits} == {"d", "p"}
        assert [h.content for h in s.recall("sqlite", namespace="p")] == ["SQLite in patterns too"]
        tagged = s.recall("sqlite", tags=["storage"])
        assert {h.content for h in tagged} == {
            "SQLite WAL mode for the journal",
            "SQLite in patterns too",
        }
        m = s.recall("unrelated")[0]
        await s.update(m.id, content="Now about msgpack framing")
        assert s.recall("unrelated") == []
        assert [h.id for h in s.recall("msgpack")] == [m.id]
        with pytest.raises(InvalidArgument):
            s.recall("x", limit=0)


async def test_sync_since_exactly_once_and_filters():
    async with node() as a:
        s1 = await a.register_session("s1", subscribe=["d"])
        s2 = await a.register_session("s2", subscribe=["d", "p"])
        t0 = datetime.now(UTC) - timedelta(seconds=1)
        await s1.capture("d", "first")
        await s1.capture("p", "pattern")
        await s2.capture("d", "second")
        b = await s2.sync()
        assert [e.memory.content for e in b.events if isinstance(e, Captured)] == [
            "first",
            "pattern",
        ]
        assert (await s2.sync()).events == []
        await s1.capture("d", "third")
        b2 = await s2.sync()
        assert [e.memory.content for e in b2.events] == ["third"]
        own = await s2.sync(since=0, include_own=True)
        assert [e.memory.content for e in own.events] == ["first", "pattern", "second", "third"]
        by_time = await s1.sync(since=t0, include_own=True)
        assert [e.memory.content for e in by_time.events] == ["first", "second", "third"]
        limited = await s2.sync(since=0, include_own=True, limit=2)
        assert limited.more and len(limited.events) == 2
        rest = await s2.sync(since=limited.cursor, include_own=True)
        assert [e.memory.content for e in rest.events] == ["second", "third"]
        with pytest.raises(InvalidArgument):
            await s2.sync(since="yesterday")


async def test_sync_past_retention_reports_incomplete():
    async with node(retention=Retention(max_events=3)) as a:
        s = await a.register_session("s", subscribe=["d"])
        w = await a.register_session("w", subscribe=["d"])
        for i in range(6):
            await w.capture("d", f"fact {i}")
        b = await s.sync()
        assert not b.complete
        assert [e.memory.content for e in b.events] == ["fact 3", "fact 4", "fact 5"]
        assert (await s.sync()).complete


async def test_slow_subscriber_gets_lagged_marker_not_unbounded_queue():
    async with node() as a:
        s = await a.register_session("s", subscribe=["d"])
        w = await a.register_session("w", subscribe=["d"])
        ev = s.events(maxsize=5)
        for i in range(20):
            await w.capture("d", f"fact {i}")
        got = [ev.get_nowait() for _ in range(6)]
        assert all(isinstance(x, Captured) for x in got[:5])
        assert isinstance(got[5], Lagged) and got[5].dropped == 15
        assert got[5].cursor == got[4].cursor
        assert ev.get_nowait() is None
        await w.capture("d", "after the gap")
        nxt = await ev.next(5)
        assert isinstance(nxt, Captured) and nxt.memory.content == "after the gap"
        caught_up = await s.sync(since=got[5].cursor)
        assert len(caught_up.events) == 16


async def test_next_returns_what_is_queued_and_times_out_when_nothing_is():
    async with node() as a:
        s = await a.register_session("s", subscribe=["d"])
        w = await a.register_session("w", subscribe=["d"])
        ev = s.events()
        with pytest.raises(TimeoutError):
            await ev.next(0.01)
        await w.capture("d", "one")
        await w.capture("d", "two")
        got = [await ev.next(0), await ev.next(0)]  # queued: no wait, even with timeout 0
        assert [g.memory.content for g in got if isinstance(g, Captured)] == ["one", "two"]
        ev.close()
        with pytest.raises(StopAsyncIteration):
            await ev.next(5)


async def test_line_topology_converges_through_middle_node():
    async with node() as a, node() as b, node() as c:
        sa = await a.register_session("a1", subscribe=["d"])
        sc = await c.register_session("c1", subscribe=["d"])
        events = sc.events()
        link(a, b)
        link(b, c)
        await wait_for(lambda: len(b.peers()) == 2 and len(a.peers()) == 1)
        m = await sa.capture("d", "travels through b")
        ev = await events.next(5)
        assert isinstance(ev, Captured) and ev.source_session == "a1" and ev.memory.id == m.id
        await wait_for(lambda: converged([a, b, c], "d"))
        # c lists its own session, its linked peer b's and a's, two hops away (named
        # with a's node id: a's record reached c through b).
        await b.register_session("b1")
        await wait_for(lambda: len(c.sessions.list()) == 3, what="c sees b1 and a1")
        assert {(x.id, x.node_id, x.is_local) for x in c.sessions.list()} == {
            ("c1", c.node_id, True),
            ("b1", b.node_id, False),
            ("a1", a.node_id, False),
        }
        assert {(x.id, x.node_id, x.is_local) for x in b.sessions.list()} == {
            ("b1", b.node_id, True),
            ("a1", a.node_id, False),
            ("c1", c.node_id, False),
        }


async def test_private_namespace_never_leaves_node():
    async with node(private_namespaces=["secret"]) as a, node() as b:
        sa = await a.register_session("a1", subscribe=["secret", "d"])
        await b.register_session("b1", subscribe=["secret", "d"])
        la, _ = link(a, b)
        await sa.capture("secret", "MARKER-7f3a private")
        await sa.capture("d", "public")
        await wait_for(lambda: converged([a, b], "d"))
        await sa.capture("secret", "MARKER-7f3a again")
        await sa.capture("d", "public 2")
        await wait_for(lambda: converged([a, b], "d"))
        assert la.sent_frames
        for frame in la.sent_frames:
            assert b"MARKER-7f3a" not in frame
            assert b"secret" not in frame
        assert b.memories("secret") == []


async def test_chaotic_links_converge():
    async with node() as a, node() as b, node() as c:
        sessions = [
            await n.register_session(f"s{i}", subscribe=["d"]) for i, n in enumerate((a, b, c))
        ]
        links = [*link(a, b), *link(b, c), *link(a, c)]
        for i, lk in enumerate(links):
            lk.rng.seed(i)
            lk.reorder, lk.duplicate = 0.5, 0.3
            lk.chaos_filter = is_live_update
        mems = []
        for i in range(30):
            s = sessions[i % 3]
            mems.append(await s.capture("d", f"fact {i % 10}"))
            if i % 4 == 0:
                await s.update(mems[-1].id, tags=[f"t{i}"])
        await wait_for(lambda: converged([a, b, c], "d"), what="convergence")
        for n in (a, b, c):
            assert len(n.memories("d")) == 10


async def test_bad_arguments_raise_documented_errors_and_change_nothing():
    async with node() as a:
        s = await a.register_session("s", subscribe=["d"])
        hash_before = a.state_hash("d")
        with pytest.raises(InvalidNamespace):
            await s.capture("Bad Name", "x")
        with pytest.raises(InvalidArgument):
            await s.capture("d", "   ")
        with pytest.raises(InvalidArgument):
            await s.capture("d", "x", tags="not-a-list")
        with pytest.raises(InvalidArgument):
            await s.capture("d", "x", metadata={"k": object()})
        with pytest.raises(InvalidArgument):
            await s.capture("fresh", "x", tags="not-a-list")
        with pytest.raises(InvalidArgument):
            await a.register_session("bad/id")
        with pytest.raises(NotFound):
            await s.update("00000000000000000000", content="x")
        assert a.memories("d") == []
        # "d" exists (s subscribes to it) and holds nothing; no failed call made another
        assert a.namespaces() == ["d"]
        assert a.state_hash("d") == hash_before
        assert [x.id for x in a.sessions.list()] == ["s"]
    with pytest.raises(ClosedError):
        await s.capture("d", "after close")


async def test_remote_sessions_visible_and_gone_after_disconnect():
    async with node() as a, node() as b:
        await a.register_session("a1", subscribe=["d"])
        la, _ = link(a, b)
        await wait_for(lambda: any(x.id == "a1" and not x.is_local for x in b.sessions.list()))
        info = b.sessions.get("a1")
        assert info.node_id == a.node_id and info.subscriptions == ("d",)
        await a.register_session("a2", subscribe=["p"])
        await wait_for(lambda: any(x.id == "a2" for x in b.sessions.list()))
        await la.close()
        await wait_for(lambda: all(x.is_local for x in b.sessions.list()))


async def test_close_twice_is_harmless_and_reopen_refused():
    a = node()
    await a.open()
    await a.aclose()
    await a.aclose()
    with pytest.raises(ClosedError):
        await a.open()


async def test_update_larger_than_a_frame_is_split_not_dropped():
    limit = 64 * 1024
    async with node(max_frame=limit) as a, node(max_frame=limit) as b:
        s = await a.register_session("a1", subscribe=["d"])
        la, _ = link(a, b)
        await wait_for(lambda: a.peers() and b.peers())
        mems = await s.capture_many("d", [f"big batch fact {i} " + "y" * 200 for i in range(2000)])
        assert len(a._docs["d"].diff()) > 4 * limit
        await wait_for(lambda: converged([a, b], "d"), what="convergence")
        assert len(b.memories("d")) == len(mems)
        assert max(len(f) for f in la.sent_frames) <= limit


async def test_catch_up_is_forwarded_to_nodes_beyond_the_link():
    """A writes while alone; B and D are linked; when A links to B, D gets A's writes
    through B (catch-up is forwarded), and A's later live writes too."""
    async with node() as a, node() as b, node() as d:
        sa = await a.register_session("a1", subscribe=["d"])
        await d.register_session("d1", subscribe=["d"])
        await sa.capture("d", "written while alone")
        link(b, d)
        await wait_for(lambda: b.peers() and d.peers())
        link(a, b)
        await wait_for(lambda: len(d.memories("d")) == 1, what="catch-up reaches D")
        await sa.capture("d", "written once linked")
        await wait_for(lambda: converged([a, b, d], "d"), what="live write reaches D")


async def test_sync_includes_conflicts_this_session_won() -> None:
    """Both writers hear of a conflict through sync(), rebuilt from the journal with the
    right winner and loser (not swapped) and the fields they fought over."""
    async with node() as a, node() as b:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        la, _ = link(a, b)
        m = await sa.capture("d", "original")
        await wait_for(lambda: converged([a, b], "d"))
        await sa.sync()
        await sb.sync()
        await la.close()
        await wait_for(lambda: not a.peers())
        await sa.update(m.id, content="from a")
        await sb.update(m.id, content="from b")
        link(a, b)
        await wait_for(lambda: converged([a, b], "d"))
        current = a.get(m.id)
        winner = current.updated_by
        # The winner is the later update in clock order (history is in that order).
        loser_w, winner_w = [w for w in a.history(m.id) if w.op == "update"]
        assert winner_w.session == winner and winner_w.changes == {"content": current.content}
        sessions = {"a1": sa, "b1": sb}
        for sid in (winner, *(set(sessions) - {winner})):
            conflicts = [e for e in (await sessions[sid].sync()).events if isinstance(e, Conflict)]
            assert len(conflicts) == 1, sid  # the winner hears of it too
            c = conflicts[0]
            assert (c.winner.key, c.loser.key) == (winner_w.key, loser_w.key), sid
            assert c.fields == ("content",), sid
            assert (c.memory_id, c.namespace) == (m.id, "d")
            assert (c.source_session, c.node_id) == (winner_w.session, winner_w.node)


async def test_concurrent_syncs_of_one_session_do_not_repeat_events(tmp_path):
    async with node(data_dir=tmp_path) as a:
        r = await a.register_session("r", subscribe=["d"])
        w = await a.register_session("w", subscribe=["d"])
        for i in range(5):
            await w.capture("d", f"fact {i}")
        b1, b2 = await asyncio.gather(r.sync(), r.sync())
        ids = [e.write_id for e in b1.events + b2.events]
        assert len(ids) == 5
        assert len(set(ids)) == 5


async def test_an_unregistered_session_handle_refuses_work_and_its_streams_end():
    """After unregister_session the old handle changes nothing (it used to go on
    capturing, and its event streams went on receiving), and the id can be registered
    again."""
    async with ConversationsApi(listen=False, discovery=()) as api:
        s = await api.register_session("agent", subscribe=["d"])
        await s.capture("d", "before")
        stream = s.events()
        await api.unregister_session("agent")
        with pytest.raises(ClosedError):
            await s.capture("d", "after")
        with pytest.raises(ClosedError):
            await s.capture_many("d", ["after too"])
        with pytest.raises(ClosedError):
            s.recall("before")
        with pytest.raises(ClosedError):
            await s.sync(since=0)
        with pytest.raises(ClosedError):
            s.events()
        async with asyncio.timeout(5):
            assert [ev async for ev in stream] == []
        assert [m.content for m in api.memories("d")] == ["before"]
        again = await api.register_session("agent", subscribe=["d"])
        await again.capture("d", "after")
        assert sorted(m.content for m in api.memories("d")) == ["after", "before"]


@pytest.mark.parametrize(
    ("relay", "secret", "says"),
    [
        ("http://127.0.0.1:1", None, "ws:// or wss://"),
        ("ws://127.0.0.1:1?room=x", None, "ws:// or wss://"),
        ("ws://127.0.0.1:99999", None, "bad relay url"),
        (b"ws://127.0.0.1:1", None, "ws:// or wss://"),
        ("ws://relay.example:1234", None, "loopback"),
        ("wss://10.0.0.1/rooms", None, "loopback"),
    ],
)
def test_a_bad_relay_is_refused_at_construction(relay, secret, says):
    for kw in ({}, {"listen": False}):
        with pytest.raises(InvalidArgument, match=says):
            ConversationsApi(relay=relay, mesh_secret=secret, discovery=(), **kw)


def test_a_relay_off_the_machine_needs_a_secret():
    api = ConversationsApi(relay="wss://relay.example/rooms", mesh_secret="s3cret", discovery=())
    assert api._relay == "wss://relay.example/rooms"


@pytest.mark.parametrize("how", ["aclose", "cancel", "cancel twice"])
async def test_aclose_or_cancel_while_open_runs_leaves_nothing_running(tmp_path, how):
    """A shutdown handler may close a node whose open() is still under way, or open() may
    be cancelled, even twice (a task group tearing down). Whatever the interleaving, once
    that returned nothing of the node is left: no listener, no registry entry, no task,
    the data directory free (a live node used to be left behind, in state "closed" or
    even "open" with its storage closed; a second cancel left the index task)."""
    registry = tmp_path / "registry"
    for steps in range(0, 60, 3):
        data_dir = tmp_path / f"d{steps}"
        before = asyncio.all_tasks()
        api = ConversationsApi(
            host="127.0.0.1", discovery=("local",), discovery_dir=registry, data_dir=data_dir
        )
        opener = asyncio.create_task(api.open())
        for _ in range(steps):  # step the loop: aclose lands at a different point each time
            await asyncio.sleep(0)
        if how == "aclose":
            await api.aclose()
        else:  # e.g. open() under asyncio.timeout(): undoes itself, no aclose() needed
            opener.cancel()
            if how == "cancel twice":
                await asyncio.sleep(0)  # one step: the first cancel lands, the second hits the undo
                opener.cancel()
        with contextlib.suppress(ClosedError, asyncio.CancelledError):
            await opener
        if how == "cancel twice":
            await api.aclose()  # waits for the undo that the second cancel did not stop
        await _nothing_left(api, before, registry, data_dir)


def test_an_out_of_range_port_is_refused_when_the_node_is_made():
    for port in (-1, 65536, True, "80"):
        with pytest.raises(InvalidArgument, match="port"):
            ConversationsApi(port=port, discovery=())  # type: ignore[arg-type]


async def test_the_longest_allowed_sync_filter_still_links_and_a_longer_one_is_refused():
    """sync_namespaces travels in the link handshake, whose messages are bounded before
    the peer proves the secret: the longest filter allowed must fit (a longer one used to
    be accepted, and then every dial failed with 4009)."""
    from subcog_crdt._api import MAX_SYNC_NAMESPACES, MAX_USER_ID

    names = [f"n{i:04d}-" + "x" * 58 for i in range(MAX_SYNC_NAMESPACES)]
    assert all(len(n) == 64 for n in names)
    with pytest.raises(InvalidArgument, match="sync_namespaces"):
        ConversationsApi(sync_namespaces=[*names, "one-more"], discovery=())
    with pytest.raises(InvalidArgument, match="user_id"):
        ConversationsApi(user_id="u" * (MAX_USER_ID + 1), discovery=())
    secret = b"s" * 32
    kw: dict[str, Any] = {"host": "127.0.0.1", "discovery": (), "mesh_secret": secret}
    async with (
        ConversationsApi(sync_namespaces=names, user_id="u" * MAX_USER_ID, **kw) as a,
        ConversationsApi(sync_namespaces=names, user_id="v" * MAX_USER_ID, **kw) as b,
    ):
        await b.connect(a.url)
        await wait_for(lambda: a.peers() and b.peers(), 5, "linked")


async def _nothing_left(api: ConversationsApi, before: set[Any], registry: Any, data_dir: Any):
    import socket

    assert api._state.value in ("closed", "new")
    assert asyncio.all_tasks() - before == set()
    assert not registry.exists() or list(registry.glob("*.json")) == []
    if api.url:
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", int(api.url.rsplit(":", 1)[1])))
    async with ConversationsApi(data_dir=data_dir, listen=False, discovery=()):
        pass  # the data directory's lock was released


async def test_aclose_during_the_network_start_leaves_nothing_running(tmp_path):
    """The network start is the last step of open(): an aclose() that lands in it must
    still wait for open() and close what it started (it closed the storage at once and
    returned, and the transport and discovery started after that stayed)."""
    registry, data_dir = tmp_path / "registry", tmp_path / "d"
    before = asyncio.all_tasks()
    api = ConversationsApi(
        host="127.0.0.1", discovery=("local",), discovery_dir=registry, data_dir=data_dir
    )
    gate, entered = asyncio.Event(), asyncio.Event()
    real_start = api._start_network

    async def held_start() -> None:
        entered.set()
        await gate.wait()
        await real_start()

    api._start_network = held_start  # type: ignore[method-assign]
    opener = asyncio.create_task(api.open())
    await entered.wait()
    closer = asyncio.create_task(api.aclose())
    await wait_for(lambda: api._close_requested, 5, "aclose waiting for open")
    gate.set()
    with pytest.raises(ClosedError, match="closed while it opened"):
        await opener
    await closer
    await _nothing_left(api, before, registry, data_dir)


async def test_a_cancelled_aclose_still_lets_open_undo_itself(tmp_path):
    """aclose() waiting for open() is cancelled (a shutdown under a timeout): open() sees
    the request when its step ends and undoes everything itself."""
    registry, data_dir = tmp_path / "registry", tmp_path / "d"
    before = asyncio.all_tasks()
    api = ConversationsApi(
        host="127.0.0.1", discovery=("local",), discovery_dir=registry, data_dir=data_dir
    )
    gate = asyncio.Event()
    real_start = api._start_network

    async def held_start() -> None:
        await gate.wait()
        await real_start()

    api._start_network = held_start  # type: ignore[method-assign]
    opener = asyncio.create_task(api.open())
    closer = asyncio.create_task(api.aclose())
    await wait_for(lambda: api._close_requested, 5, "aclose waiting for open")
    closer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await closer
    gate.set()
    with pytest.raises(ClosedError):
        await opener
    await _nothing_left(api, before, registry, data_dir)


async def test_sync_rebuilds_a_captured_event_with_the_memory_as_it_was_captured() -> None:
    """sync() rebuilds events from the journal and the document: the Captured event of
    a memory updated since carries the memory as captured (as the live event did), not
    its current state; the Updated event carries what that write changed."""
    async with node() as a:
        w = await a.register_session("w", subscribe=["d"])
        r = await a.register_session("r", subscribe=["d"])
        live = r.events()
        m = await w.capture("d", "old content", tags=["first"], status="draft")
        await w.update(m.id, content="new content", tags=["second"], status="final")
        live_captured, live_updated = await live.next(5), await live.next(5)
        batch = await r.sync(since=0)
        captured, updated = batch.events
        assert isinstance(captured, Captured) and isinstance(updated, Updated)
        assert (captured.memory.content, captured.memory.tags) == ("old content", ("first",))
        assert (captured.memory.status, captured.memory.version) == ("draft", 1)
        assert captured == live_captured  # the very event the live stream delivered
        assert dict(updated.changes) == {
            "content": "new content",
            "tags": ["second"],
            "status": "final",
        }
        assert updated == live_updated
        assert a.get(m.id).content == "new content"  # the current state moved on


async def test_sync_rebuilds_the_events_of_a_long_history_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fact captured again and again by several sessions, updated in between: every
    event sync() rebuilds is the one the live stream delivered (checkpoints every four
    writes here, so rebuilding starts from them), and rebuilding the newest events reads
    only the writes since a checkpoint: each Captured refolded the history up to it."""
    from subcog_crdt._core import document

    monkeypatch.setattr(document, "_MARK_EVERY", 4)
    async with node() as a:
        sessions = [await a.register_session(f"w{i}", subscribe=["d"]) for i in range(3)]
        r = await a.register_session("r", subscribe=["d"])
        live = r.events()
        m = await sessions[0].capture("d", "the shared fact")
        n_events = 1
        for i in range(60):
            s = sessions[i % 3]
            if i % 4 == 3:
                await s.update(m.id, status=f"s{i}")
            else:
                await s.capture("d", "the shared fact", tags=[f"t{i % 7}"])
            n_events += 1
        delivered = [await live.next(5) for _ in range(n_events)]
        batch = await r.sync(since=0, limit=1000)
        assert batch.events == delivered
        assert [e.memory.version for e in batch.events if isinstance(e, Captured)][-1] == 60
        reads: list[str] = []
        doc = a._docs["d"]
        real = doc._read

        def counting(key: str) -> Any:
            reads.append(key)
            return real(key)

        monkeypatch.setattr(doc, "_read", counting)
        last = await r.sync(since=delivered[-3].cursor)
        assert last.events == delivered[-2:]
        assert len(reads) <= 2 * (4 + 1), len(reads)


UTC2 = timezone(timedelta(hours=2))


def _all_fields(m: Memory) -> dict[str, Any]:
    """Every field of a memory, metadata as a plain dict (a read-only mapping otherwise)."""
    out = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
    out["metadata"] = dict(m.metadata)
    return out


FULL_CAPTURE: dict[str, Any] = {
    "tags": ["storage", "adr"],
    "metadata": {"ticket": 42, "links": ["a", {"b": None}], "ok": True},
    "domain": "infra",
    "status": "proposed",
    "source": "docs/adr-7.md",
    "expires_at": datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC2),
}


def _assert_full(m: Memory, content: str = "Use SQLite WAL") -> None:
    assert m.content == content
    assert m.tags == ("storage", "adr")
    assert dict(m.metadata) == {"ticket": 42, "links": ["a", {"b": None}], "ok": True}
    assert (m.domain, m.status, m.source) == ("infra", "proposed", "docs/adr-7.md")
    assert m.expires_at == FULL_CAPTURE["expires_at"]
    assert m.expires_at is not None and m.expires_at.utcoffset() == timedelta(hours=2)


async def test_every_memory_field_reaches_the_other_node_and_survives_updates() -> None:
    """Every writable field (tags, metadata, domain, status, source, expires_at) is kept
    on capture, reaches a peer, and is carried through an update of other fields (the
    fold path), and an update of them is seen the same on both nodes."""
    async with node() as a, node() as b:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        eb = sb.events()
        link(a, b)
        m = await sa.capture("d", "Use SQLite WAL", **FULL_CAPTURE)
        _assert_full(m)
        ev = await eb.next(5)
        assert isinstance(ev, Captured)
        _assert_full(ev.memory)
        _assert_full(b.get(m.id))
        assert _all_fields(b.get(m.id)) == _all_fields(a.get(m.id)) == _all_fields(m)
        # an update of content only: every other field stays as captured
        m2 = await sa.update(m.id, content="Use SQLite WAL mode")
        _assert_full(m2, "Use SQLite WAL mode")
        await wait_for(lambda: converged([a, b], "d"))
        _assert_full(b.get(m.id), "Use SQLite WAL mode")
        assert _all_fields(b.get(m.id)) == _all_fields(a.get(m.id)) == _all_fields(m2)
        # an update of the other fields, from the other node (expires_at as an ISO str)
        m3 = await sb.update(
            m.id,
            tags=["db"],
            metadata={"ticket": 43},
            domain="storage",
            status="accepted",
            source="review",
            expires_at="2032-05-06T07:08:09-03:00",
        )
        await wait_for(lambda: converged([a, b], "d"))
        got = a.get(m.id)
        assert (got.tags, dict(got.metadata)) == (("db",), {"ticket": 43})
        assert (got.domain, got.status, got.source) == ("storage", "accepted", "review")
        assert got.expires_at == datetime(2032, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=-3)))
        assert _all_fields(got) == _all_fields(b.get(m.id)) == _all_fields(m3)


async def test_every_memory_field_survives_a_restart(tmp_path: Path) -> None:
    """A durable node reloads every field, of a memory only captured and of one updated
    since (the two ways a memory is derived from its writes)."""
    async with node(data_dir=tmp_path) as a:
        s = await a.register_session("s", subscribe=["d"])
        only = await s.capture("d", "Use SQLite WAL", **FULL_CAPTURE)
        upd = await s.capture("d", "to be updated", **FULL_CAPTURE)
        upd = await s.update(upd.id, content="updated once")
        before = {x.id: _all_fields(x) for x in (a.get(only.id), a.get(upd.id))}
    async with node(data_dir=tmp_path) as a:
        _assert_full(a.get(only.id))
        _assert_full(a.get(upd.id), "updated once")
        assert {x: _all_fields(a.get(x)) for x in before} == before


async def test_expires_at_accepts_aware_datetimes_and_iso_strings() -> None:
    """expires_at is an aware datetime or an ISO 8601 string with an offset; either
    way the memory holds that instant, offset kept, and None clears it."""
    async with node() as a:
        s = await a.register_session("s", subscribe=["d"])
        dt = datetime(2030, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=5, minutes=30)))
        m = await s.capture("d", "with a datetime", expires_at=dt)
        assert m.expires_at == dt and m.expires_at.utcoffset() == dt.utcoffset()
        m2 = await s.capture("d", "with a string", expires_at="2030-06-01T12:00:00+05:30")
        assert m2.expires_at == dt and m2.expires_at.utcoffset() == dt.utcoffset()
        z = await s.capture("d", "with Z", expires_at="2030-06-01T06:30:00Z")
        assert z.expires_at == dt and z.expires_at.utcoffset() == timedelta(0)
        assert a.get(m2.id).expires_at == dt
        cleared = await s.update(m.id, expires_at=None)
        assert cleared.expires_at is None and a.get(m.id).expires_at is None


async def test_a_second_link_to_the_same_node_closes_the_first_with_4010() -> None:
    """Two links to one node: the older is closed as a duplicate (4010), and its end
    must not take down the newer one (its peer entry and remote sessions)."""
    async with node() as a, node() as b:
        sa = await a.register_session("a1", subscribe=["d"])
        await b.register_session("b1", subscribe=["d"])
        la1, lb1 = memory_link_pair(a._hello(), b._hello())
        old_runs = [a.attach(la1), b.attach(lb1)]
        await wait_for(lambda: a.peers() and b.peers(), what="first link up")
        await wait_for(lambda: any(x.id == "b1" for x in a.sessions.list()), what="a sees b1")
        la2, lb2 = link(a, b)
        await wait_for(lambda: la1.closed and lb1.closed, what="the old link closed")
        async with asyncio.timeout(10):
            await asyncio.gather(*old_runs)  # the old link's protocol ended
        assert (la1.close_code, lb1.close_code) == (CLOSE_DUPLICATE, CLOSE_DUPLICATE)
        assert not la2.closed and not lb2.closed
        assert [p.node_id for p in a.peers()] == [b.node_id]
        assert [p.node_id for p in b.peers()] == [a.node_id]
        info = a.sessions.get("b1")
        assert (info.node_id, info.is_local) == (b.node_id, False)
        m = await sa.capture("d", "over the new link")
        await wait_for(lambda: converged([a, b], "d"), what="the new link carries writes")
        assert b.get(m.id).content == "over the new link"


async def test_registering_a_session_again_applies_its_new_subscriptions() -> None:
    """register_session with an id already registered returns the same session with
    the new subscriptions: new event streams, sync and recall follow them, and peers
    see them."""
    async with node() as a, node() as b:
        w = await a.register_session("w", subscribe=["d", "p"])
        s = await b.register_session("s", subscribe=["d"])
        link(a, b)
        await wait_for(lambda: any(x.id == "s" for x in a.sessions.list()), what="a sees s")
        await s.sync()  # "last" now: only what comes next
        again = await b.register_session("s", subscribe=["p"])
        assert again is s and s.subscriptions == {"p"}
        assert b.sessions.get("s").subscriptions == ("p",)
        await wait_for(lambda: a.sessions.get("s").subscriptions == ("p",), what="a told")
        stream = s.events()
        await w.capture("d", "decision nobody follows here")
        mp = await w.capture("p", "pattern s now follows")
        ev = await stream.next(5)
        assert isinstance(ev, Captured) and ev.memory.id == mp.id
        await wait_for(lambda: converged([a, b], "d"))
        assert stream.get_nowait() is None  # the "d" write was not delivered
        batch = await s.sync()
        assert [e.memory_id for e in batch.events] == [mp.id]
        assert [x.namespace for x in s.recall("decision pattern")] == ["p"]


async def test_an_open_stream_follows_the_subscriptions_of_a_session_registered_again() -> None:
    """A stream opened before the session is registered again with other subscriptions
    gets what the new ones name: it used to keep the filter of when it was opened."""
    async with node() as a:
        w = await a.register_session("w", subscribe=[])
        s = await a.register_session("s", subscribe=["d"])
        stream = s.events()
        await a.register_session("s", subscribe=["p"])
        assert "p" in a.namespaces()  # a new subscription's namespace exists at once
        await w.capture("d", "decision s no longer follows")
        mp = await w.capture("p", "pattern s follows now")
        ev = await stream.next(5)
        assert isinstance(ev, Captured) and ev.memory.id == mp.id


async def test_unregistering_a_session_removes_it_from_peers() -> None:
    """Peers list a node's sessions; once one is unregistered they must stop listing it
    (and keep listing the others)."""
    async with node() as a, node() as b:
        await a.register_session("gone", subscribe=["d"])
        await a.register_session("stays", subscribe=["d"])
        link(a, b)
        await wait_for(lambda: {x.id for x in b.sessions.list()} == {"gone", "stays"})
        await a.unregister_session("gone")
        await wait_for(lambda: [x.id for x in b.sessions.list()] == ["stays"], what="b told")
        assert b.sessions.get("stays").node_id == a.node_id
        with pytest.raises(NotFound):
            b.sessions.get("gone")


async def test_recall_ranks_several_namespaces_together() -> None:
    """Results of several namespaces are ranked as one list: a better match in the
    second namespace comes before a weaker one in the first, and limit keeps the best."""
    async with node() as a:
        s = await a.register_session("s", subscribe=["alpha", "beta"])
        weak = await s.capture(
            "alpha", "sqlite is one word among many others in this long note about the build"
        )
        await s.capture("alpha", "unrelated alpha note")
        strong = await s.capture("beta", "sqlite sqlite sqlite")
        weakest = await s.capture(
            "beta", "a long beta note where sqlite appears once among very many other words"
        )
        await s.capture("beta", "unrelated beta note")
        expected = [strong.id, weak.id, weakest.id]
        assert [m.id for m in s.recall("sqlite")] == expected
        assert [m.id for m in a.recall("sqlite", namespaces=["alpha", "beta"])] == expected
        assert [m.id for m in s.recall("sqlite", limit=1)] == [strong.id]
        assert [m.id for m in s.recall("sqlite", limit=2)] == expected[:2]


async def test_peer_info_names_the_peer_user_and_the_namespaces_synced() -> None:
    """api.peers() says who runs the peer (user_id) and which namespaces are synced with
    it: those both sides sync, not one private here or left out by the peer's filter."""
    async with (
        node(user_id="alice", private_namespaces=["secret"]) as a,
        node(user_id="bob", sync_namespaces=["d"]) as b,
    ):
        await a.register_session("a1", subscribe=["d", "p", "secret"])
        await b.register_session("b1", subscribe=["d", "p", "secret"])
        link(a, b)
        # listed once linked; the namespaces once the peer's hello is read
        await wait_for(lambda: all(n.peers() and n.peers()[0].namespaces for n in (a, b)))
        assert a.peers() == [PeerInfo(b.node_id, None, "bob", ("d",))]
        assert b.peers() == [PeerInfo(a.node_id, None, "alice", ("d",))]


async def test_an_update_by_id_does_not_search_every_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """update/delete/get find a memory's namespace by id: they asked every namespace,
    each time (an update cost 5x more at 2000 namespaces). Counted in lookups."""
    from subcog_crdt._core.document import NamespaceDoc

    async with node() as a:
        s = await a.register_session("s", subscribe=[])
        for i in range(200):
            await s.capture(f"ns{i}", f"fact {i}")
        m = await s.capture("last", "the fact to update")
        m = await s.update(m.id, status="one", expected_version=m.version)
        asked: list[str] = []
        real = NamespaceDoc.has

        def counting(doc: NamespaceDoc, memory_id: str) -> bool:
            asked.append(doc.namespace)
            return real(doc, memory_id)

        monkeypatch.setattr(NamespaceDoc, "has", counting)
        m = await s.update(m.id, status="two", expected_version=m.version)
        assert a.get(m.id).status == "two"
        assert asked == ["last", "last"], asked[:5]
        await s.delete(m.id)
        with pytest.raises(NotFound):
            await s.update(m.id, status="three")
        assert a.get(m.id).deleted


async def test_registering_a_session_again_without_subscribe_keeps_its_subscriptions() -> None:
    """`register_session(id)` again ("give me my handle") used to wipe the session's
    subscriptions: its open stream went silent and `sync("last")` moved past the events
    it missed, for good."""
    async with node() as a, node() as b:
        link(a, b)
        s = await a.register_session("agent-1", subscribe=["decisions"])
        stream = s.events()
        again = await a.register_session("agent-1")
        assert again is s
        assert s.subscriptions == frozenset({"decisions"})
        other = await b.register_session("agent-2", subscribe=["decisions"])
        await other.capture("decisions", "we chose SQLite WAL")
        ev = await stream.next(10)
        assert isinstance(ev, Captured) and ev.memory.content == "we chose SQLite WAL"
        batch = await s.sync()
        assert [e.memory.content for e in batch.events] == ["we chose SQLite WAL"]
        # a new session with subscribe left out has none
        fresh = await a.register_session("agent-3")
        assert fresh.subscriptions == frozenset()


async def test_a_closed_node_refuses_streams_and_reads() -> None:
    """After close, `events()` used to return a stream that never ended, and `memories`,
    `history` and `state_hash` answered while `get` refused."""
    api = node()
    await api.open()
    s = await api.register_session("s", subscribe=["d"])
    m = await s.capture("d", "a fact")
    await api.aclose()
    for call in (
        s.events,
        lambda: api.memories("d"),
        lambda: api.history(m.id),
        lambda: api.state_hash("d"),
        lambda: api.get(m.id),
        lambda: s.recall("fact"),
    ):
        with pytest.raises(ClosedError):
            call()
    # a stream made before the close ends with it
    assert api._bus.subscribe(lambda ev: True)._closed


async def test_recall_trims_tags_and_takes_one_namespace_or_several() -> None:
    """Capture trims tags, so recall must too; `namespace=` and `namespaces=` work on
    both the node and a session (each used to raise TypeError on the other)."""
    async with node() as api:
        s = await api.register_session("s", subscribe=["a", "b"])
        await s.capture("a", "storage engine notes", tags=[" Storage "])
        await s.capture("b", "storage layout notes", tags=["Storage"])
        assert len(api.recall("storage", tags=[" Storage "])) == 2
        assert [m.namespace for m in api.recall("storage", namespace="a")] == ["a"]
        assert [m.namespace for m in s.recall("storage", namespaces=["b"])] == ["b"]
        assert len(s.recall("storage")) == 2  # its subscriptions


async def test_connect_on_a_node_without_a_server_is_an_invalid_argument() -> None:
    async with node() as api:
        with pytest.raises(InvalidArgument, match="listen=False"):
            await api.connect("ws://127.0.0.1:9")


async def test_a_data_dir_that_is_a_file_or_in_use_says_so(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        async with node(data_dir=f):
            pass
    async with node(data_dir=tmp_path / "d"):
        with pytest.raises(StorageLocked, match="its own data_dir"):
            async with node(data_dir=tmp_path / "d"):
                pass


async def test_a_registration_past_the_namespace_bound_changes_nothing(monkeypatch) -> None:
    """Refused whole (found in review: the session was registered, with its first
    namespaces created, before the bound refused the last one)."""
    from subcog_crdt import _api as api_module

    monkeypatch.setattr(api_module, "MAX_NAMESPACES", 3)
    async with node() as api:
        await api.register_session("a", subscribe=["n1"])
        with pytest.raises(InvalidArgument, match="namespaces"):
            await api.register_session("b", subscribe=["n2", "n3", "n4"])
        assert api.namespaces() == ["n1"]
        assert [s.id for s in api.sessions.list()] == ["a"]
        with pytest.raises(InvalidArgument):
            await api.register_session("a", subscribe=["n1", "n2", "n3", "n4"])
        assert api.sessions.local("a").subscriptions == frozenset({"n1"})
        assert api.namespaces() == ["n1"]
