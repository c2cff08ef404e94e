"""Review 14: deferred storage of peers' updates (_persist_soon), the lazy heartbeat,
the fair turn and messages taken as parsed (_take). Real loopback sockets, real SQLite
data directories."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

from helpers import url_of, wait_for
from subcog_crdt import ConversationsApi, StorageError
from subcog_crdt._peering import F_BARRIER, F_BARRIER_ACK, F_UPDATE
from subcog_crdt._storage.sqlite import SqliteStorage
from subcog_crdt._transport.base import Hello
from subcog_crdt._transport.websocket import WebSocketTransport
from test_review11_storage import _block_thread
from transport.test_link_security import client_frame, frame_header, relay
from transport.test_take import GUARD, Taker, handed_over_by
from transport.test_websocket import (
    CLOSE_ABNORMAL,
    Recorder,
    echo_peer_process,
    frozen_until_dropped,
    make,
)

DEADLINE = 20.0
LOOPBACK: dict[str, Any] = {"host": "127.0.0.1", "discovery": ()}


def pack(frame: list[Any]) -> bytes:
    out: bytes = msgpack.packb(frame, use_bin_type=True)
    return out


@asynccontextmanager
async def durable_pair(
    tmp_path: Path, **b_options: Any
) -> AsyncIterator[tuple[ConversationsApi, ConversationsApi]]:
    """A (in memory) linked to B (durable, ``tmp_path / "b"``); both sync "d"."""
    a = ConversationsApi(**LOOPBACK)
    b = ConversationsApi(data_dir=tmp_path / "b", **LOOPBACK, **b_options)
    await a.open()
    await b.open()
    try:
        await a.register_session("a-reader", subscribe=["d"])
        await b.register_session("b-reader", subscribe=["d"])
        await b.connect(url_of(a))
        await wait_for(
            lambda: (
                a.node_id in b._links
                and b.node_id in a._links
                and "d" in b._links[a.node_id].shared
                and "d" in a._links[b.node_id].shared
            ),
            DEADLINE,
            "linked, sharing d",
        )
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def foreign_update(content: str) -> tuple[str, bytes]:
    """(origin, update) of a capture in "d" made on a node nobody is linked to."""
    async with ConversationsApi(listen=False, discovery=()) as w:
        s = await w.register_session("w", subscribe=["d"])
        await s.capture("d", content)
        return w.node_id, w._docs["d"].diff()


def watch_consumer(
    link: Any,
    seen: Callable[[bytes], None] | None = None,
    after: Callable[[bytes], None] | None = None,
) -> None:
    """Call ``seen`` with each message before the link's consumer gets it, ``after`` once
    the consumer returned (in the same turn)."""
    inner = link._consumer
    assert inner is not None

    def consumer(frame: bytes) -> Any:
        if seen is not None:
            seen(frame)
        result = inner(frame)
        if after is not None:
            after(frame)
        return result

    link._consumer = consumer


async def send_back_to_back(link: Any, messages: list[bytes]) -> None:
    """Send ``messages`` as separate WebSocket messages without giving the loop a turn
    in between: the receiver reads them in one read (and hands them over in one turn)."""
    for m in messages:
        coro = link.send(m)
        with pytest.raises(StopIteration):
            coro.send(None)  # completed without suspending


# -- _persist_soon: barriers --------------------------------------------------------------


async def test_a_barrier_behind_a_deferred_update_is_not_answered_if_its_commit_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with durable_pair(tmp_path) as (a, b):
        origin, update = await foreign_update("from elsewhere")
        pa = a._links[b.node_id]
        pb = b._links[a.node_id]
        later_at_barrier: list[int] = []

        def seen(frame: bytes) -> None:
            if msgpack.unpackb(frame)[0] == F_BARRIER:
                later_at_barrier.append(len(b._later))

        watch_consumer(pb.link, seen)

        async def refuse(*_: Any) -> None:
            raise StorageError("the disk is gone (test)")

        monkeypatch.setattr(b._storage, "commit", refuse)
        token = 10**6
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        pa._barriers[token] = answer
        with caplog.at_level(logging.WARNING, logger="subcog_crdt"):
            await send_back_to_back(
                pa.link, [pack([F_UPDATE, "d", origin, update]), pack([F_BARRIER, token])]
            )
            async with asyncio.timeout(DEADLINE):
                confirmed = await answer
        assert later_at_barrier == [1]  # the update's commit was still to come
        assert "cannot store its updates" in caplog.text
        assert confirmed is False


async def test_a_barrier_behind_a_deferred_update_waits_for_its_fsync(tmp_path: Path) -> None:
    """durability="fsync": the answer promises the update is as durable as B's own
    writes; it must not leave before the fsync of the deferred commit."""
    async with durable_pair(tmp_path, durability="fsync") as (a, b):
        origin, update = await foreign_update("fsynced first")
        pa = a._links[b.node_id]
        pb = b._links[a.node_id]
        storage = b._storage
        assert isinstance(storage, SqliteStorage)
        barrier_seen: list[bool] = []
        watch_consumer(
            pb.link,
            lambda f: barrier_seen.append(True) if msgpack.unpackb(f)[0] == F_BARRIER else None,
        )
        acks_sent_blocked: list[bool] = []
        inner_send = pb.link.send
        gate, job = _block_thread(storage)  # the fsync waits behind this job

        def send(data: bytes) -> Any:
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(data)
            frames = list(unpacker)
            if any(f[0] == F_BARRIER_ACK for f in frames):
                acks_sent_blocked.append(not gate.is_set())
            return inner_send(data)

        link_b: Any = pb.link
        link_b.send = send  # every frame B sends A goes through it
        link_b.send_now = lambda data: False  # (not around it)
        token = 10**6
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        pa._barriers[token] = answer
        try:
            await send_back_to_back(
                pa.link, [pack([F_UPDATE, "d", origin, update]), pack([F_BARRIER, token])]
            )
            # Either the answer goes out (while the fsync is blocked), or the link waits
            # for the commit before answering.
            await wait_for(
                lambda: acks_sent_blocked or (barrier_seen and pb.link._drainer is not None),
                DEADLINE,
                "B answered or holds the answer",
            )
        finally:
            gate.set()
        await job
        async with asyncio.timeout(DEADLINE):
            assert await answer is True
        assert [m.content for m in b.memories("d")] == ["fsynced first"]
        assert acks_sent_blocked == [False]  # answered only once the fsync was done


async def test_after_a_failed_held_commit_no_later_message_of_the_link_is_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A deferred commit that must wait holds the link; it then fails: the link closes
    with a logged reason, the held message is dropped (the peer keeps it) and so must be
    every message behind it, or B applies the peer's updates out of order."""
    async with durable_pair(tmp_path) as (a, b):
        pa = a._links[b.node_id]
        pb = b._links[a.node_id]
        gate = asyncio.Event()
        calls: list[int] = []

        async def slow_then_refuse(*_: Any) -> None:
            calls.append(1)
            await gate.wait()  # a commit that must wait (an fsync, a backlog)
            raise StorageError("the fsync failed (test)")

        monkeypatch.setattr(b._storage, "commit", slow_then_refuse)
        first = await foreign_update("first: its commit fails")
        second = await foreign_update("second: held, then dropped")
        third = await foreign_update("third: behind the held one")
        with caplog.at_level(logging.WARNING, logger="subcog_crdt"):
            await pa.link.send(pack([F_UPDATE, "d", *first]))
            await wait_for(lambda: pb._hold is not None, DEADLINE, "B holds the link")
            await pa.link.send(pack([F_UPDATE, "d", *second]))
            await pa.link.send(pack([F_UPDATE, "d", *third]))
            await wait_for(
                lambda: pb.link._drainer is not None and pb.link._inbox,
                DEADLINE,
                "the second is held, the third waits behind it",
            )
            gate.set()
            await wait_for(lambda: a.node_id not in b._links, DEADLINE, "B drops the link")
            await wait_for(lambda: pb.link._drainer is None, DEADLINE, "the drain ended")
        assert "cannot store its updates: the fsync failed (test)" in caplog.text
        contents = sorted(m.content for m in b.memories("d"))
        assert "second: held, then dropped" not in contents
        assert "third: behind the held one" not in contents, contents


# -- _persist_soon: two links in one deferred batch ------------------------------------------


@asynccontextmanager
async def durable_hub(
    tmp_path: Path, **b_options: Any
) -> AsyncIterator[tuple[ConversationsApi, ConversationsApi, ConversationsApi]]:
    """A and C (in memory) each linked to B (durable, ``tmp_path / "b"``); all sync "d"."""
    a = ConversationsApi(**LOOPBACK)
    c = ConversationsApi(**LOOPBACK)
    b = ConversationsApi(data_dir=tmp_path / "b", **LOOPBACK, **b_options)
    for n in (a, c, b):
        await n.open()
    try:
        for n, name in ((a, "a-reader"), (c, "c-reader"), (b, "b-reader")):
            await n.register_session(name, subscribe=["d"])
        await b.connect(url_of(a))
        await b.connect(url_of(c))
        await wait_for(
            lambda: all(
                x.node_id in b._links
                and "d" in b._links[x.node_id].shared
                and b.node_id in x._links
                and "d" in x._links[b.node_id].shared
                for x in (a, c)
            ),
            DEADLINE,
            "A and C linked to B, sharing d",
        )
        yield a, b, c
    finally:
        for n in (a, c, b):
            await n.aclose()


async def send_from_both(
    a: ConversationsApi, c: ConversationsApi, b: ConversationsApi, contents: tuple[str, str]
) -> list[int]:
    """A and C each send B one update in the same loop turn; returns, for C's, how many
    links had updates waiting in B's deferred batch when B handed it over."""
    ua = await foreign_update(contents[0])
    uc = await foreign_update(contents[1])
    pending_from: list[int] = []
    watch_consumer(b._links[c.node_id].link, lambda _f: pending_from.append(len(b._later_from)))
    await send_back_to_back(a._links[b.node_id].link, [pack([F_UPDATE, "d", *ua])])
    await send_back_to_back(c._links[b.node_id].link, [pack([F_UPDATE, "d", *uc])])
    return pending_from


async def test_two_links_in_one_failed_deferred_commit_are_both_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Updates from two links deferred in the same turn form one commit; its failure
    closes both links with a logged reason, each peer keeps its write, and B serves on
    (and stores what comes next)."""
    async with durable_hub(tmp_path) as (a, b, c):

        async def refuse(*_: Any) -> None:
            raise StorageError("the disk is gone (test)")

        monkeypatch.setattr(b._storage, "commit", refuse)
        with caplog.at_level(logging.WARNING, logger="subcog_crdt"):
            pending_from = await send_from_both(a, c, b, ("from a", "from c"))
            await wait_for(lambda: not b.peers(), DEADLINE, "B drops both links")
        assert pending_from == [1]  # C's update joined A's in one deferred batch
        assert caplog.text.count("cannot store its updates: the disk is gone (test)") == 2
        assert b._in_flight == 0 and not b._later and not b._later_from
        monkeypatch.undo()
        sb = await b.register_session("writer", subscribe=["d"])
        m = await sb.capture("d", "b still writes")
        assert b.get(m.id).content == "b still writes"
    async with ConversationsApi(data_dir=tmp_path / "b", listen=False, discovery=()) as again:
        assert [x.content for x in again.memories("d")] == ["b still writes"]


async def test_two_links_held_by_one_fsync_both_resume_and_everything_is_stored(
    tmp_path: Path,
) -> None:
    """durability="fsync": the deferred commit of two links' updates holds both links;
    their next messages wait, then everything is applied and stored."""
    async with durable_hub(tmp_path, durability="fsync") as (a, b, c):
        storage = b._storage
        assert isinstance(storage, SqliteStorage)
        gate, job = _block_thread(storage)
        try:
            pending_from = await send_from_both(a, c, b, ("a one", "c one"))
            pa, pc = b._links[a.node_id], b._links[c.node_id]
            await wait_for(lambda: pa._hold is not None, DEADLINE, "A's link held")
            assert pending_from == [1]
            assert pc._hold is pa._hold and not pa._hold.done()  # type: ignore[union-attr]
            ua2 = await foreign_update("a two")
            uc2 = await foreign_update("c two")
            await a._links[b.node_id].link.send(pack([F_UPDATE, "d", *ua2]))
            await c._links[b.node_id].link.send(pack([F_UPDATE, "d", *uc2]))
            await wait_for(
                lambda: pa.link._drainer is not None and pc.link._drainer is not None,
                DEADLINE,
                "both second messages wait",
            )
            assert sorted(m.content for m in b.memories("d")) == ["a one", "c one"]
        finally:
            gate.set()
        await job
        want = ["a one", "a two", "c one", "c two"]
        await wait_for(
            lambda: sorted(m.content for m in b.memories("d")) == want, DEADLINE, "all four"
        )
        assert b.peers() and len(b.peers()) == 2
        await b.settle()
    async with ConversationsApi(data_dir=tmp_path / "b", listen=False, discovery=()) as again:
        assert sorted(x.content for x in again.memories("d")) == want


# -- _persist_soon: close, restart, sync ------------------------------------------------


@pytest.mark.parametrize("durability", ["process", "fsync"])
async def test_close_begun_in_the_turn_of_a_peers_message_keeps_it(
    tmp_path: Path, durability: str
) -> None:
    """B starts closing in the very turn it applies a peer's update (before the deferred
    append): the restarted data directory holds it."""
    async with durable_pair(tmp_path, durability=durability) as (a, b):
        closing: list[asyncio.Task[None]] = []
        deferred: list[int] = []

        def applied(_frame: bytes) -> None:
            if b.memories("d") and not closing:
                deferred.append(len(b._later))
                closing.append(asyncio.ensure_future(b.aclose()))

        watch_consumer(b._links[a.node_id].link, after=applied)
        sa = await a.register_session("writer", subscribe=["d"])
        await sa.capture("d", "applied as B closes")
        await wait_for(lambda: closing, DEADLINE, "B closing")
        await closing[0]
        assert deferred == [1]  # the append was still to come when the close began
    async with ConversationsApi(data_dir=tmp_path / "b", listen=False, discovery=()) as again:
        assert [m.content for m in again.memories("d")] == ["applied as B closes"]


async def test_peer_events_are_synced_exactly_once_across_a_restart(tmp_path: Path) -> None:
    """``sync(since="last")`` in the events' turn (before their deferred append) returns
    them; after a restart the session's cursor is past them: none comes twice, the next
    peer write comes once."""
    a = ConversationsApi(**LOOPBACK)
    await a.open()
    try:
        sa = await a.register_session("writer", subscribe=["d"])
        synced: list[str] = []
        async with ConversationsApi(data_dir=tmp_path / "b", **LOOPBACK) as b:
            sb = await b.register_session("reader", subscribe=["d"])
            events = sb.events()
            await b.connect(url_of(a))
            await wait_for(
                lambda: a.node_id in b._links and "d" in b._links[a.node_id].shared,
                DEADLINE,
                "linked",
            )
            for i in range(3):
                await sa.capture("d", f"peer write {i}")
                async with asyncio.timeout(DEADLINE):
                    async for _ev in events:
                        break
                assert b._later  # its append is still to come
                synced += [e.memory.content for e in (await sb.sync(since="last")).events]
            assert synced == [f"peer write {i}" for i in range(3)]
        await sa.capture("d", "while B is down")
        async with ConversationsApi(data_dir=tmp_path / "b", **LOOPBACK) as b:
            sb = await b.register_session("reader", subscribe=["d"])
            await b.connect(url_of(a))
            await wait_for(lambda: len(b.memories("d")) == 4, DEADLINE, "caught up")
            await b.settle()
            again = [e.memory.content for e in (await sb.sync(since="last")).events]
            assert again == ["while B is down"]
            await sa.capture("d", "after the restart")
            await wait_for(lambda: len(b.memories("d")) == 5, DEADLINE, "live again")
            last = [e.memory.content for e in (await sb.sync(since="last")).events]
            assert last == ["after the restart"]
            assert (await sb.sync(since="last")).events == []
    finally:
        await a.aclose()


# -- _take: consumer failures and a close in the same read ------------------------------------


async def test_a_bad_message_between_updates_in_one_read_ends_the_link_after_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three messages in one read at B: an update (taken, applied, its append deferred),
    malformed bytes (the consumer raises ProtocolError) and another update. The first is
    stored, the link closes with 4000, the third is never applied."""
    async with durable_pair(tmp_path) as (a, b):
        pa = a._links[b.node_id]
        link_b = b._links[a.node_id].link
        first = await foreign_update("before the bad message")
        third = await foreign_update("after the bad message")
        messages = [
            pack([F_UPDATE, "d", *first]),
            b"\xc1 not msgpack",
            pack([F_UPDATE, "d", *third]),
        ]
        taken: list[tuple[int, str]] = []
        watch_consumer(
            link_b,
            seen=lambda f: (
                taken.append((messages.index(f), handed_over_by())) if f in messages else None
            ),
        )
        with caplog.at_level(logging.WARNING, logger="subcog_crdt"):
            await send_back_to_back(pa.link, messages)
            async with asyncio.timeout(DEADLINE):
                await link_b.wait_closed()
        # Taken from the read (by the guard); the third never handed over.
        assert taken == [(0, GUARD), (1, GUARD)]
        assert link_b.close_code == 4000, link_b.close_reason
        assert "malformed msgpack" in caplog.text
        assert [m.content for m in b.memories("d")] == ["before the bad message"]
        await wait_for(lambda: not b._later and b._in_flight == 0, DEADLINE, "stored")
    async with ConversationsApi(data_dir=tmp_path / "b", listen=False, discovery=()) as again:
        assert [m.content for m in again.memories("d")] == ["before the bad message"]


def close_frame(code: int, reason: bytes = b"") -> bytes:

    payload = code.to_bytes(2, "big") + reason
    return frame_header(len(payload), opcode=0x8, masked=True) + payload


async def test_a_close_in_the_same_read_as_binary_frames_comes_after_them() -> None:
    """A relay appends two data frames and a close frame to one authentic message, written
    at once: B hands over the three data frames in order (as parsed), then the link ends
    with the peer's code; nothing is handed over twice."""

    def attack(count: int, raw: bytes, payload: bytes) -> list[bytes]:
        if count == 4:  # the second application message
            return [
                raw,
                client_frame(b"x1"),
                client_frame(b"x2"),
                close_frame(4321, b"bye"),
            ]
        return [raw]

    t = Taker()
    async with (
        make("a", Recorder()) as a,
        WebSocketTransport(
            node_id="b", hello=lambda: Hello(node_id="b", url=None), on_link=t.handler
        ) as b,
        relay(b.port, attack) as url,
    ):
        link = await a.connect(url)
        await link.send(b"m0")
        await wait_for(lambda: t.seen == [b"m0"], DEADLINE, "m0")
        await link.send(b"m1")
        assert t.link is not None
        async with asyncio.timeout(DEADLINE):
            await t.link.wait_closed()
        assert t.seen == [b"m0", b"m1", b"x1", b"x2"]
        # m0 alone in its read (the guard's); then one read: m1, x1 and x2 (the guard's),
        # and the close, which the guard leaves to the reader.
        assert t.how == [GUARD] * 4, t.how
        assert t.link.close_code == 4321, t.link.close_reason
        assert not t.link._taken


# -- the lazy heartbeat --------------------------------------------------------------------


async def test_a_peer_frozen_after_steady_traffic_is_dropped_by_the_heartbeat() -> None:
    """Traffic keeps postponing the ping (the timer fires, finds data since it was armed,
    re-arms from that data) for several intervals without dropping the live peer; once
    the peer is frozen (SIGSTOP: no FIN), the re-armed timer still pings and the missing
    pong drops it."""
    rec = Recorder()
    async with (
        echo_peer_process() as (proc, url),
        make("a", rec, heartbeat=0.3, dead_after=3.0) as a,
    ):
        link = await a.connect(url)
        ws: Any = link._ws
        assert ws._heartbeat == 0.3
        rearms: list[bool] = []
        inner = ws._rearm_after_data

        def rearm() -> bool:
            done: bool = inner()
            rearms.append(done)
            return done

        ws._rearm_after_data = rearm
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        i = 0
        # Steady echoes until the timer has fired three times with data since.
        while rearms.count(True) < 3:
            assert loop.time() < deadline, rearms
            await link.send(b"%d" % i)
            assert await rec.next_frame("frozen") == b"%d" % i
            i += 1
        assert not link.closed, link.close_reason
        await frozen_until_dropped(proc, rec)
        assert link.close_code == CLOSE_ABNORMAL
        assert "No PONG received" in link.close_reason, link.close_reason


# -- the fair turn -------------------------------------------------------------------------


async def test_a_tight_local_writer_still_takes_in_a_peers_update_and_stores_both(
    tmp_path: Path,
) -> None:
    """B captures in a loop that never awaits anything else: its fair turns let the link
    read A's update meanwhile; that update's deferred append is logged before B's next
    write, and a restart holds every write."""
    async with durable_pair(tmp_path) as (a, b):
        sa = await a.register_session("writer", subscribe=["d"])
        sb = await b.register_session("local", subscribe=["d"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        await sa.capture("d", "from the peer")  # sent; B has not read it yet
        writes = 0
        while not any(m.content == "from the peer" for m in b.memories("d")):
            assert loop.time() < deadline, writes
            await sb.capture("d", f"local {writes}")
            writes += 1
        await sb.capture("d", f"local {writes}")
        writes += 1
        assert not b._later  # that write appended the peer's update first
        want = sorted(["from the peer", *(f"local {i}" for i in range(writes))])
    async with ConversationsApi(data_dir=tmp_path / "b", listen=False, discovery=()) as again:
        assert sorted(m.content for m in again.memories("d")) == want
