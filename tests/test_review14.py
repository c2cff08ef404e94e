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
from subcog_crdt._peering import F_BARRIER, F_UPDATE, PeerSync

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


def watch_consumer(link: Any, seen: Callable[[bytes], None]) -> None:
    """Call ``seen`` with each message before the link's consumer gets it."""
    inner = link._consumer
    assert inner is not None

    def consumer(frame: bytes) -> Any:
        seen(frame)
        return inner(frame)

    link._consumer = consumer


async def send_back_to_back(link: Any, messages: list[bytes]) -> None:
    """Send ``messages`` as separate WebSocket messages without giving the loop a turn
    in between: the receiver reads them in one read (and hands them over in one turn)."""
    for m in messages:
        coro = link.send(m)
        with pytest.raises(StopIteration):
            coro.send(None)  # completed without suspending


BARRIER_BUG = (
    "src/subcog_crdt/_peering.py:689 (on_message) answers a barrier at once when the "
    "message holds no update, although an update of an earlier message of this link, "
    "handed over in the same turn (_take), still waits in ConversationsApi._later: the "
    "ack goes out before that commit (before its fsync; even if it fails); fix: when "
    "acks are owed and self is in api._later_from, call api._flush_later() first and, "
    "if self._hold is pending, answer through _ack_after(self._hold, acks)"
)


# -- _persist_soon: barriers --------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason=BARRIER_BUG)
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


@pytest.mark.xfail(strict=True, reason=BARRIER_BUG)
async def test_a_barrier_behind_a_deferred_update_waits_for_its_fsync(tmp_path: Path) -> None:
    """durability="fsync": the answer promises the update is as durable as B's own
    writes; it must not leave before the fsync of the deferred commit."""
    from test_review11_storage import _block_thread

    from subcog_crdt._peering import F_BARRIER_ACK
    from subcog_crdt._storage.sqlite import SqliteStorage

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

        pb.link.send = send  # type: ignore[method-assign]
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
