"""Misuse of the public API that a real agent program commits: calls before open or on a
node entered twice, two readers of one event stream, a write in flight when the node
closes, a node used from a second event loop, falsy wrong-typed arguments, and reprs
that must help rather than dump a 256 KB memory."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_for
from subcog_crdt import (
    Captured,
    ClosedError,
    ConversationsApi,
    InvalidArgument,
    Memory,
    SubcogError,
)


def node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(listen=False, discovery=(), **kw)


async def _call(call: Callable[[], Any]) -> Any:
    result = call()
    return await result if asyncio.iscoroutine(result) else result


# -- lifecycle misuse --------------------------------------------------------------------


async def test_every_call_before_open_is_a_closed_error_and_changes_nothing() -> None:
    """A program that forgets ``async with`` (or ``await api.open()``) gets ClosedError
    from each call, and the node, opened afterwards, holds nothing those calls made."""
    api = node()
    calls: dict[str, Callable[[], Any]] = {
        "register_session": lambda: api.register_session("s", subscribe=["d"]),
        "unregister_session": lambda: api.unregister_session("s"),
        "get": lambda: api.get("00000000000000000000"),
        "memories": lambda: api.memories("d"),
        "history": lambda: api.history("00000000000000000000"),
        "state_hash": lambda: api.state_hash("d"),
        "recall": lambda: api.recall("anything"),
        "connect": lambda: api.connect("ws://127.0.0.1:9"),
    }
    for name, call in calls.items():
        with pytest.raises(ClosedError, match="is new"):
            await _call(call)
        assert api.namespaces() == [], name
    async with api:
        assert api.namespaces() == []
        assert api.sessions.list() == []
        s = await api.register_session("s", subscribe=["d"])
        assert (await s.capture("d", "opened after all")).version == 1


async def test_entering_an_open_node_again_is_refused_and_leaves_it_open() -> None:
    """``async with api:`` on a node already open (opened by hand, or nested by mistake)
    raises ClosedError and must not close or reset the node it was refused on."""
    async with node() as api:
        s = await api.register_session("s", subscribe=["d"])
        first = await s.capture("d", "before the second enter")
        with pytest.raises(ClosedError, match="opened once"):
            async with api:
                pytest.fail("entered an open node twice")
        with pytest.raises(ClosedError, match="opened once"):
            await api.open()
        second = await s.capture("d", "after the second enter")
        assert sorted(m.id for m in api.memories("d")) == sorted([first.id, second.id])


# -- event streams ------------------------------------------------------------------------


def parked(task: asyncio.Task[Any]) -> bool:
    """The task is suspended on a future (a reader waiting in the stream), whatever the
    stream waits with (CPython's Task records the future it waits on)."""
    return getattr(task, "_fut_waiter", None) is not None


@pytest.mark.parametrize("end", ["unregister", "aclose"])
async def test_a_reader_parked_in_a_stream_ends_when_its_session_or_node_does(end: str) -> None:
    """A reader already waiting for the next event (not one that starts reading after
    the end) must be woken and end its ``async for`` when the session is unregistered
    or the node closes, not wait forever."""
    api = node()
    await api.open()
    s = await api.register_session("reader", subscribe=["d"])
    stream = s.events()
    reader = asyncio.create_task(anext(stream, "ended"))
    try:
        await wait_for(lambda: parked(reader), what="the reader is parked")
        if end == "unregister":
            await api.unregister_session("reader")
        else:
            await api.aclose()
        await wait_for(reader.done, what="the parked reader ends")
        assert reader.result() == "ended"
    finally:
        reader.cancel()
        await api.aclose()


async def _park_two_readers(stream: Any) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
    first = asyncio.create_task(anext(stream, "ended"))
    await wait_for(lambda: parked(first), what="the first reader is parked")
    second = asyncio.create_task(anext(stream, "ended"))
    await wait_for(lambda: parked(second), what="the second reader is parked")
    return first, second


async def test_both_readers_of_one_stream_end_when_its_session_is_unregistered() -> None:
    """Two tasks reading one ``events()`` stream (a worker pool): Subscription keeps one
    waiter (Subscription._waiter), so the second reader's replaces the first's, and unregistering
    wakes only the second: the first waits forever on a stream that has ended."""
    async with node() as api:
        s = await api.register_session("reader", subscribe=["d"])
        first, second = await _park_two_readers(s.events())
        try:
            await api.unregister_session("reader")
            await wait_for(lambda: first.done() and second.done(), what="both readers end")
            assert (first.result(), second.result()) == ("ended", "ended")
        finally:
            first.cancel()
            second.cancel()


async def test_a_reader_left_when_the_other_reader_of_a_stream_stops_still_gets_events() -> None:
    """Two tasks read one stream and one of them stops (cancelled, or a ``next(timeout=)``
    that timed out): its ``finally`` clears the single waiter slot (Subscription.__anext__), so the
    reader still waiting is never woken again, whatever events arrive."""
    async with node() as api:
        s = await api.register_session("reader", subscribe=["d"])
        writer = await api.register_session("writer", subscribe=["d"])
        stream = s.events()
        first, second = await _park_two_readers(stream)
        try:
            second.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await second
            await writer.capture("d", "for whoever still reads")
            await wait_for(first.done, what="the remaining reader gets the event")
            ev = first.result()
            assert isinstance(ev, Captured) and ev.memory.content == "for whoever still reads"
        finally:
            first.cancel()


# -- close while writes are in flight -----------------------------------------------------


async def test_a_write_whose_fsync_ends_while_the_node_closes_is_not_reported_failed(
    tmp_path: Path,
) -> None:
    """A capture waiting for its fsync when aclose() starts: the fsync completes (the
    write survives a restart) but the capture raised ClosedError, because _committed
    then asks the closing storage whether to compact (_maybe_compact -> storage.tail_bytes). A
    program that retries a failed write on the next start writes twice."""
    api = ConversationsApi(tmp_path, listen=False, discovery=(), durability="fsync")
    await api.open()
    s = await api.register_session("s", subscribe=["d"])
    storage: Any = api._storage
    started, release = threading.Event(), threading.Event()
    real_fsync = storage._fsync_log

    def held_fsync() -> None:
        started.set()
        release.wait(10)
        real_fsync()

    storage._fsync_log = held_fsync
    capture = asyncio.create_task(s.capture("d", "decided during shutdown"))
    closing: asyncio.Task[None] | None = None
    try:
        await wait_for(started.is_set, what="the capture waits for its fsync")
        closing = asyncio.create_task(api.aclose())
        await wait_for(lambda: storage._state.name != "OPEN", what="the storage closes")
    finally:
        release.set()
        if closing is not None:
            await closing
        outcome = (await asyncio.gather(capture, return_exceptions=True))[0]
        await api.aclose()
    async with ConversationsApi(tmp_path, listen=False, discovery=()) as again:
        assert [m.content for m in again.memories("d")] == ["decided during shutdown"]
    assert isinstance(outcome, Memory), f"a durable capture was reported failed: {outcome!r}"
    assert outcome.content == "decided during shutdown"


# -- one node, two event loops ------------------------------------------------------------


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "fsync"])
async def test_a_session_used_from_another_event_loop_is_refused_and_writes_nothing(
    tmp_path: Path, durable: bool
) -> None:
    """A node belongs to the loop that opened it. A capture run by another thread's
    ``asyncio.run`` raced the node's own loop and succeeded (in memory) or raised a raw
    RuntimeError "attached to a different loop" after writing (fsync: the memory is
    there, and survives a restart). It must raise a SubcogError and write nothing."""
    kw: dict[str, Any] = {"data_dir": tmp_path, "durability": "fsync"} if durable else {}
    async with node(**kw) as api:
        s = await api.register_session("s", subscribe=["d"])
        outcome: list[BaseException | None] = []

        def elsewhere() -> None:
            try:
                asyncio.run(s.capture("d", "from another loop"))
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        await wait_for(lambda: not thread.is_alive(), what="the other loop's thread ends")
        thread.join()
        assert isinstance(outcome[0], SubcogError), f"got {outcome[0]!r}"
        assert api.memories("d") == []


# -- wrong types that happen to be falsy, and sets ------------------------------------------


@pytest.mark.parametrize("metadata", [0, "", [], False, ()])
async def test_capture_refuses_metadata_that_is_not_a_dict_even_when_falsy(
    metadata: Any,
) -> None:
    """``update(metadata=[])`` is refused, but ``capture`` dropped any falsy metadata
    (``if metadata:`` in Session.capture), so ``[]``, ``0`` or ``""`` were accepted as if
    no metadata was given."""
    async with node() as api:
        s = await api.register_session("s", subscribe=["d"])
        with pytest.raises(InvalidArgument, match="metadata"):
            await s.capture("d", "a fact", metadata=metadata)
        assert api.memories("d") == []


async def test_capture_orders_a_set_of_tags_as_update_does() -> None:
    """check_tags sorts a set so its order does not depend on the process's hash seed;
    Session.capture turned the set into a list first (Session.capture), so a captured
    memory's tags came in set-iteration order, and differ between runs."""
    tags = {f"tag-{i:02d}" for i in range(20)}
    async with node() as api:
        s = await api.register_session("s", subscribe=["d"])
        m = await s.capture("d", "a fact with many tags", tags=tags)
        updated = await s.update(m.id, tags=frozenset(tags))
        assert updated.tags == tuple(sorted(tags))
        assert m.tags == tuple(sorted(tags))


# -- repr ---------------------------------------------------------------------------------


async def test_repr_of_a_node_names_its_id_and_state() -> None:
    """``repr(api)`` (in logs, tracebacks, a debugger) was the default
    ``<... object at 0x...>``: it should say which node and whether it is open."""
    api = node()
    assert api.node_id in repr(api) and "new" in repr(api)
    async with api:
        assert api.node_id in repr(api) and "open" in repr(api)
    assert "closed" in repr(api)


async def test_repr_of_a_large_memory_and_of_a_batch_holding_it_stays_short() -> None:
    """Logging a memory or a sync batch with ``%r`` dumped the whole content (up to 256 K
    characters per memory, times the events of a batch): the dataclass repr includes
    ``content`` in full."""
    async with node() as api:
        s = await api.register_session("s", subscribe=["d"])
        m = await s.capture("d", "x" * 200_000)
        batch = await s.sync(since=0, include_own=True)
        assert m.id in repr(m)
        assert len(repr(m)) < 2_000
        assert len(repr(batch)) < 4_000
