"""A peer's applied updates are stored at the end of the loop turn that applied them,
after the subscribers their events woke (``ConversationsApi._persist_soon``): what must
still hold. Two nodes on loopback WebSockets; B is durable (a real data directory)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from helpers import url_of, wait_for
from subcog_crdt import Captured, ConversationsApi, StorageError, _api
from subcog_crdt._storage.sqlite import SqliteStorage

DEADLINE = 20.0
LOOPBACK: dict[str, Any] = {"host": "127.0.0.1", "discovery": ()}


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[ConversationsApi, ConversationsApi]]:
    """A (in memory) linked to B (durable, in ``tmp_path / "b"``)."""
    a = ConversationsApi(**LOOPBACK)
    b = ConversationsApi(data_dir=tmp_path / "b", **LOOPBACK)
    await a.open()
    await b.open()
    try:
        await b.connect(url_of(a))
        await wait_for(lambda: a.peers() and b.peers(), DEADLINE, "linked")
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def _first_captured(stream: Any) -> Captured:
    async with asyncio.timeout(DEADLINE):
        async for ev in stream:
            if isinstance(ev, Captured):
                return ev
    raise AssertionError("the stream ended")


async def test_the_event_comes_first_and_the_update_is_stored_in_that_turn(
    pair: tuple[ConversationsApi, ConversationsApi], tmp_path: Path
) -> None:
    a, b = pair
    sa = await a.register_session("writer", subscribe=["d"])
    sb = await b.register_session("reader", subscribe=["d"])
    events = sb.events()
    storage = b._storage
    assert isinstance(storage, SqliteStorage)
    before = storage.tail_seq("d")
    await sa.capture("d", "stored right after its event")
    ev = await _first_captured(events)
    # The subscriber runs before the append (that is the point) ...
    assert storage.tail_seq("d") == before
    assert b._later and b._in_flight == 1
    # ... which comes in the same turn: one yield later it is in the log.
    await asyncio.sleep(0)
    assert storage.tail_seq("d") == before + 1
    assert not b._later and b._in_flight == 0
    # A copy of the data directory now (what kill -9 would leave) holds it.
    shutil.copytree(tmp_path / "b", tmp_path / "copy")
    async with ConversationsApi(data_dir=tmp_path / "copy", listen=False, discovery=()) as c:
        assert [m.content for m in c.memories("d")] == ["stored right after its event"]
        assert c.get(ev.memory.id).content == ev.memory.content


async def test_a_write_made_in_reply_is_logged_after_the_update_it_builds_on(
    pair: tuple[ConversationsApi, ConversationsApi],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The subscriber updates the memory in the turn it heard of it, before the deferred
    append: the log must still hold the peer's capture first. Otherwise a crash right
    after the acknowledged update leaves a log whose update depends on an item it lacks,
    and pycrdt holds the acknowledged write back after the restart."""
    a, b = pair
    # The write must not give the loop a turn before its append (a fair turn would run
    # the deferred append first and hide the order).
    monkeypatch.setattr(_api, "_TURN_EVERY", 3600.0)
    sa = await a.register_session("writer", subscribe=["d"])
    sb = await b.register_session("reader", subscribe=["d"])
    events = sb.events()
    await sa.capture("d", "the first version")
    ev = await _first_captured(events)
    assert b._later  # the capture's append is still to come
    await sb.update(ev.memory.id, content="the reply's version")
    # Acknowledged: a crash now (copied before anything else runs) keeps both.
    shutil.copytree(tmp_path / "b", tmp_path / "copy")
    async with ConversationsApi(data_dir=tmp_path / "copy", listen=False, discovery=()) as c:
        assert c.get(ev.memory.id).content == "the reply's version"


async def test_sync_in_the_events_turn_returns_the_event(
    pair: tuple[ConversationsApi, ConversationsApi],
) -> None:
    """``sync(since="last")`` called as the event arrives (before its append) waits for
    the commit instead of leaving it out."""
    a, b = pair
    sa = await a.register_session("writer", subscribe=["d"])
    sb = await b.register_session("reader", subscribe=["d"])
    events = sb.events()
    await sa.capture("d", "synced at once")
    ev = await _first_captured(events)
    assert b._later
    batch = await sb.sync(since="last")
    assert [e.write_id for e in batch.events] == [ev.write_id]
    assert (await sb.sync(since="last")).events == []


async def test_a_failed_deferred_commit_closes_the_link_and_the_node_serves_on(
    pair: tuple[ConversationsApi, ConversationsApi],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A storage that refuses the commit (a stand-in for a failing disk: the real
    failures are covered in tests/storage) closes the link that brought the update with a
    logged reason, and B's own calls still work. (As for a local write whose append
    failed, B shows the update until it restarts, then has it from the peer again.)"""
    a, b = pair
    sa = await a.register_session("writer", subscribe=["d"])
    sb = await b.register_session("reader", subscribe=["d"])
    peer = b._links[a.node_id]

    async def refuse(*_: Any) -> None:
        raise StorageError("the disk is gone (test)")

    monkeypatch.setattr(b._storage, "commit", refuse)
    with caplog.at_level(logging.WARNING, logger="subcog_crdt"):
        await sa.capture("d", "not storable on b")
        # (B redials A at once, and the catch-up fails the same way until the undo: the
        # first link's own state says it closed, whatever the link list shows meanwhile.)
        await wait_for(lambda: peer._closed and peer.link.closed, DEADLINE, "link closed")
    assert "cannot store its updates: the disk is gone (test)" in caplog.text
    assert peer.link.close_code == 1011
    monkeypatch.undo()
    m = await sb.capture("d", "b still writes")
    assert b.get(m.id).content == "b still writes"
    await wait_for(lambda: b._in_flight == 0, DEADLINE, "commits done")


async def test_a_commit_that_must_wait_holds_the_links_next_message(
    tmp_path: Path,
) -> None:
    """With ``durability="fsync"`` the deferred commit waits for the fsync: until it is
    done the link hands over no further message (the storage's backpressure), then the
    next one is applied."""
    from test_review11_storage import _block_thread

    a = ConversationsApi(**LOOPBACK)
    b = ConversationsApi(data_dir=tmp_path / "b", durability="fsync", **LOOPBACK)
    async with a, b:
        await b.connect(url_of(a))
        await wait_for(lambda: a.peers() and b.peers(), DEADLINE, "linked")
        sa = await a.register_session("writer", subscribe=["d"])
        storage = b._storage
        assert isinstance(storage, SqliteStorage)
        gate, job = _block_thread(storage)  # the fsync waits behind this job
        try:
            await sa.capture("d", "first")
            await wait_for(lambda: b.memories("d"), DEADLINE, "first applied on b")
            peer = b._links[a.node_id]
            await wait_for(lambda: peer._hold is not None, DEADLINE, "the link holds")
            assert not peer._hold.done()  # type: ignore[union-attr]
            await sa.capture("d", "second")
            await wait_for(lambda: peer.link._drainer is not None, DEADLINE, "second waits")
            assert [m.content for m in b.memories("d")] == ["first"]
        finally:
            gate.set()
        await job
        await wait_for(lambda: len(b.memories("d")) == 2, DEADLINE, "second applied")
        assert sorted(m.content for m in b.memories("d")) == ["first", "second"]
