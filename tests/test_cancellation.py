"""Cancellation and heavy concurrency on durable nodes: a write, a sync or a registration
cancelled at an await (a timeout, a task group failing) either happened whole (document,
events, journal, disk) or not at all; concurrent writers on one node keep the schema's
promises; cancelling a node's body at any step leaves nothing running and nothing locked.

Cancellation is placed deterministically: the storage thread's fsync of the log is held
on a gate (``durability="fsync"`` makes every commit and cursor save wait for it), or the
loop is stepped N times before cancelling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from helpers import drain, link, wait_for
from subcog_crdt import (
    Captured,
    ClosedError,
    ConflictError,
    ConversationsApi,
    Deleted,
    Updated,
)
from subcog_crdt._session import Session


def durable(data_dir: Path, durability: str = "fsync") -> ConversationsApi:
    return ConversationsApi(
        data_dir=data_dir,
        listen=False,
        discovery=(),
        durability=durability,  # type: ignore[arg-type]
    )


def _waiting(stream: Any) -> bool:
    return bool(stream._waiters)


def _reached(task: asyncio.Future[Any], api: ConversationsApi, state: str) -> bool:
    return task.done() or api._state.value == state


def _mark_opening(api: ConversationsApi) -> list[bool]:
    """A flag set when ``open()`` begins: the "opening" state itself can be over between
    two polls (it was, on a loaded machine), a flag cannot."""
    began = [False]
    real_open = api.open

    async def open_marked() -> None:
        began[0] = True
        await real_open()

    api.open = open_marked  # type: ignore[method-assign]
    return began


def _began(task: asyncio.Future[Any], began: list[bool]) -> bool:
    return task.done() or began[0]


@contextlib.contextmanager
def held_fsync(api: ConversationsApi) -> Iterator[threading.Event]:
    """Hold the storage thread's next fsync of the log until the block ends; yields an
    event set once the fsync has started (a commit or cursor save then waits on it)."""
    storage: Any = api._storage
    real = storage._fsync_log
    entered, gate = threading.Event(), threading.Event()

    def held() -> None:
        entered.set()
        gate.wait(30)  # bounded: a failing test must not hang the storage thread
        real()

    storage._fsync_log = held
    try:
        yield entered
    finally:
        gate.set()
        storage._fsync_log = real


async def cancelled_in_fsync(api: ConversationsApi, call: Callable[[], Awaitable[Any]]) -> None:
    """Run ``call`` and cancel it while its durable commit waits for the fsync."""
    with held_fsync(api) as entered:
        task = asyncio.ensure_future(call())
        await wait_for(entered.is_set, 10, "the call's fsync started")
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- writes cancelled while their commit waits ---------------------------------------------


@pytest.mark.parametrize("op", ["capture", "capture_many", "update", "delete"])
async def test_a_write_cancelled_in_its_fsync_is_in_the_live_journal_too(
    tmp_path: Path, op: str
) -> None:
    """A write cancelled while its commit waits for the fsync has happened (its frame is
    in the log before the first await): it is in the document, was published, and is on
    disk after a restart. The live node's journal must list it too: sync(since=0) and
    other sessions' sync("last") returned nothing of it for as long as no later write
    completed (the commit horizon moves only when the caller's await returns)."""
    data_dir = tmp_path / "n"
    async with durable(data_dir) as api:
        w = await api.register_session("w", subscribe=["ns"])
        r = await api.register_session("r", subscribe=["ns"])
        first = await w.capture("ns", "first fact")
        stream = r.events()

        async def call() -> Any:
            if op == "capture":
                return await w.capture("ns", "second fact")
            if op == "capture_many":
                return await w.capture_many("ns", ["second fact", "third fact"])
            if op == "update":
                return await w.update(first.id, content="first fact, revised")
            return await w.delete(first.id)

        await cancelled_in_fsync(api, call)
        live = state(api)
        published = drain(stream)
        kind = {"capture": Captured, "capture_many": Captured, "update": Updated}.get(op, Deleted)
        assert published and all(type(e) is kind for e in published)
        assert len(published) == (2 if op == "capture_many" else 1)
        journal = (await r.sync(since=0)).events
        assert [e.cursor for e in journal[1:]] == [e.cursor for e in published], (
            "a write that happened (document, events, disk) is missing from the live journal"
        )
    async with durable(data_dir) as again:
        r2 = await again.register_session("r", subscribe=["ns"])
        assert state(again) == live
        stored = [e.cursor for e in (await r2.sync(since=0)).events]
        assert stored == [e.cursor for e in journal]


def state(api: ConversationsApi) -> list[tuple[str, int, bool]]:
    return sorted(
        (m.content, m.version, m.deleted) for m in api.memories("ns", include_deleted=True)
    )


async def test_a_sync_cancelled_while_its_cursor_is_saved_returns_its_events_after_a_restart(
    tmp_path: Path,
) -> None:
    """sync("last") is exactly once across restarts. A sync cancelled while its new
    cursor waits for the fsync delivered nothing, so the next sync("last") must return
    those events, on this node and on the node restarted. The new cursor was already in
    the log (save_cursor appends before its first await) while the session kept the old
    one: after a restart the events were skipped."""
    data_dir = tmp_path / "n"
    async with durable(data_dir) as api:
        w = await api.register_session("w", subscribe=["ns"])
        r = await api.register_session("r", subscribe=["ns"])
        await w.capture("ns", "one")
        await w.capture("ns", "two")
        await cancelled_in_fsync(api, lambda: r.sync("last"))
    async with durable(data_dir) as again:
        r2 = await again.register_session("r", subscribe=["ns"])
        batch = await r2.sync("last")
        assert [e.memory.content for e in batch.events if isinstance(e, Captured)] == [
            "one",
            "two",
        ], "events no sync ever returned were skipped after a restart"


async def test_a_sync_cancelled_at_any_step_neither_skips_nor_repeats_an_event(
    tmp_path: Path,
) -> None:
    """Cancelled at every await in turn (the lock, the journal read on the storage
    thread, the cursor save), sync("last") never moves the session past events it did
    not return: what the uncancelled syncs return is every event once, in order."""
    async with durable(tmp_path / "n", "process") as api:
        w = await api.register_session("w", subscribe=["ns"])
        r = await api.register_session("r", subscribe=["ns"])
        delivered: list[int] = []
        for steps in range(30):
            await w.capture("ns", f"fact {steps}")
            # Two syncs race on the session's lock; one of them is cancelled after
            # ``steps`` loop turns, wherever that is.
            victim = asyncio.ensure_future(r.sync("last", limit=1))
            other = asyncio.ensure_future(r.sync("last", limit=1))
            for _ in range(steps % 10):
                await asyncio.sleep(0)
            victim.cancel()
            for t in (victim, other):
                with contextlib.suppress(asyncio.CancelledError):
                    delivered.extend(e.cursor for e in (await t).events)
        while True:
            batch = await r.sync("last")
            delivered.extend(e.cursor for e in batch.events)
            if not batch.more:
                break
        journal = [e.cursor for e in (await r.sync(since=0, limit=1000)).events]
        assert len(journal) == 30
        assert delivered == journal


@pytest.mark.parametrize("durability", ["process", "fsync"])
async def test_a_capture_cancelled_at_any_step_happened_whole_or_not_at_all(
    tmp_path: Path, durability: str
) -> None:
    """Cancel a capture after N loop steps, for N = 0, 1, 2...: it either never started
    (no memory, no event) or happened whole (memory, one event, and after a restart the
    memory and exactly one journal record). Never in memory without an event, never
    journalled twice."""
    data_dir = tmp_path / "n"
    happened: set[str] = set()
    async with durable(data_dir, durability) as api:
        w = await api.register_session("w", subscribe=["ns"])
        r = await api.register_session("r", subscribe=["ns"])
        stream = r.events()
        for steps in range(12):
            content = f"fact {steps}"
            task = asyncio.ensure_future(w.capture("ns", content))
            # Where the cancel lands, not a wait: every step count is checked.
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            in_doc = [m for m in api.memories("ns") if m.content == content]
            events = [e for e in drain(stream) if isinstance(e, Captured)]
            assert len(in_doc) == len(events) <= 1, (steps, in_doc, events)
            if in_doc:
                assert events[0].memory.id == in_doc[0].id
                happened.add(content)
        assert happened, "no cancellation landed after the write started"
        await w.capture("ns", "last fact")  # acknowledged: moves the journal's horizon on
        happened.add("last fact")
    async with durable(data_dir) as again:
        r2 = await again.register_session("r", subscribe=["ns"])
        assert {m.content for m in again.memories("ns")} == happened
        records = [e for e in (await r2.sync(since=0)).events if isinstance(e, Captured)]
        assert sorted(e.memory.content for e in records) == sorted(happened)


async def test_a_stream_reader_cancelled_as_an_event_arrives_loses_no_event() -> None:
    """A consumer waiting on ``events()`` is cancelled (its timeout) in the same loop
    turn an event wakes it: the event stays queued for the next read, not lost with the
    cancelled wait."""
    async with ConversationsApi(listen=False, discovery=()) as api:
        w = await api.register_session("w", subscribe=["ns"])
        r = await api.register_session("r", subscribe=["ns"])
        stream = r.events()
        for i in range(5):
            reader = asyncio.ensure_future(stream.next(10))
            await wait_for(partial(_waiting, stream), 10, "the reader waiting")
            await w.capture("ns", f"fact {i}")  # wakes the reader (publishing is synchronous)
            reader.cancel()  # lands before the reader runs again
            with pytest.raises(asyncio.CancelledError):
                await reader
            ev = await stream.next(10)
            assert isinstance(ev, Captured) and ev.memory.content == f"fact {i}"
            assert stream.get_nowait() is None


# -- registration --------------------------------------------------------------------------


async def test_a_registration_cancelled_while_its_cursor_is_saved_is_complete_or_absent(
    tmp_path: Path,
) -> None:
    """register_session cancelled while its first cursor waits for the fsync: the
    session must be either not registered, or registered whole: its subscribed
    namespace held and its peers told. It was left registered locally with neither
    (the namespace is created and peers told only after the await), and registering
    it again without ``subscribe`` did not repair it."""
    async with durable(tmp_path / "n") as api, ConversationsApi(listen=False) as peer:
        link(api, peer)
        await wait_for(lambda: api.peers() and peer.peers(), 10, "linked")
        await cancelled_in_fsync(
            api, lambda: api.register_session("agent", subscribe=["decisions"])
        )
        if "agent" in {s.id for s in api.sessions.local_sessions()}:
            again = await api.register_session("agent")  # a retry as a caller would
            assert again.subscriptions == {"decisions"}
            assert "decisions" in api.namespaces()
            await wait_for(
                lambda: "agent" in {s.id for s in peer.sessions.list()},
                10,
                "the peer to learn of the session",
            )


# -- concurrent writers on one memory ------------------------------------------------------


async def test_concurrent_versioned_updates_let_exactly_one_win_per_version(
    tmp_path: Path,
) -> None:
    """Many sessions update one memory at once with the same expected_version while
    commits overlap (each waits for a shared fsync): exactly one wins per version, the
    others get ConflictError and change nothing; the winners' writes are all there after
    a restart."""
    data_dir = tmp_path / "n"
    async with durable(data_dir) as api:
        sessions = [await api.register_session(f"s{i}", subscribe=["ns"]) for i in range(8)]
        m = await sessions[0].capture("ns", "shared fact")
        winners = []
        for version in range(m.version, m.version + 6):
            results = await asyncio.gather(
                *(
                    s.update(m.id, expected_version=version, status=f"{s.id}@{version}")
                    for s in sessions
                ),
                return_exceptions=True,
            )
            won = [x for x in results if not isinstance(x, BaseException)]
            assert len(won) == 1, results
            assert all(isinstance(x, ConflictError) for x in results if x is not won[0])
            assert won[0].version == version + 1
            winners.append(won[0].status)
        final = api.get(m.id)
        assert (final.version, final.status) == (m.version + 6, winners[-1])
        assert [w.changes.get("status") for w in api.history(m.id)][1:] == winners
    async with durable(data_dir) as again:
        assert (again.get(m.id).version, again.get(m.id).status) == (m.version + 6, winners[-1])


async def test_many_sessions_capturing_one_fact_at_once_make_one_memory(tmp_path: Path) -> None:
    """The same content (up to whitespace and case) captured at once by many sessions on
    one node, commits overlapping: one memory, every session in captured_by (in capture
    order), one Captured event per capture (the same fact again is an event), one journal
    record each; the same after a restart."""
    data_dir = tmp_path / "n"
    n = 8
    async with durable(data_dir) as api:
        sessions = [await api.register_session(f"s{i}", subscribe=["ns"]) for i in range(n)]
        r = await api.register_session("r", subscribe=["ns"])
        stream = r.events()
        mems = await asyncio.gather(
            *(s.capture("ns", f"  Same {'  ' * i}FACT ") for i, s in enumerate(sessions))
        )
        assert len({m.id for m in mems}) == 1
        assert sorted(m.version for m in mems) == list(range(1, n + 1))
        mem = api.get(mems[0].id)
        # (in the order the captures ran: a write may give the loop a turn first)
        assert sorted(mem.captured_by) == [f"s{i}" for i in range(n)]
        assert mem.version == n
        events = drain(stream)
        assert [type(e) for e in events] == [Captured] * n
        assert [e.source_session for e in events] == list(mem.captured_by)
        assert len((await r.sync(since=0)).events) == n
    async with durable(data_dir) as again:
        (stored,) = again.memories("ns")
        assert (stored.id, stored.captured_by, stored.version) == (mem.id, mem.captured_by, n)


# -- the node's lifecycle ------------------------------------------------------------------


def _storage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("subcog-storage:")]


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def _body(api: ConversationsApi, acknowledged: list[str]) -> None:
    """A node's life as an agent runs it: register, capture (under fsync), wait."""
    async with api:
        s: Session = await api.register_session("s", subscribe=["ns"])
        for i in range(3):
            await s.capture("ns", f"fact {i}")
            acknowledged.append(f"fact {i}")
        await asyncio.Event().wait()


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
@pytest.mark.parametrize("counted_from", ["opening", "open"])
async def test_cancelling_a_node_body_at_any_step_leaves_nothing_behind(
    tmp_path: Path, counted_from: str
) -> None:
    """``async with ConversationsApi(...)`` whose body (open, a registration, captures
    under fsync, a wait) is cancelled N loop steps after open() began or ended, and
    cancelled again two steps later (a task group tearing down hits __aexit__'s close):
    once aclose() returned, no task, no storage thread, no file descriptor is left, the
    data directory opens again, and it holds every capture that returned."""
    async with durable(tmp_path / "warm"):
        pass  # first use: imports, the loop's own descriptors
    for steps in range(0, 48, 3):
        data_dir = tmp_path / f"d{steps}"
        tasks, fds = asyncio.all_tasks(), _fds()
        api = ConversationsApi(
            data_dir=data_dir, host="127.0.0.1", discovery=(), durability="fsync"
        )
        acknowledged: list[str] = []
        began = _mark_opening(api)
        task = asyncio.ensure_future(_body(api, acknowledged))
        if counted_from == "opening":
            await wait_for(partial(_began, task, began), 10, "open() began")
        else:
            await wait_for(partial(_reached, task, api, counted_from), 10, counted_from)
        # Where each cancel lands, not a wait: every step count is checked.
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        for _ in range(2):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ClosedError):
            await task
        await api.aclose()  # waits for the close the second cancel left running
        assert asyncio.all_tasks() - tasks == set(), steps
        assert _storage_threads() == [], steps
        assert _fds() - fds == set(), steps
        async with durable(data_dir) as again:
            stored = {m.content for m in again.memories("ns")}
        assert set(acknowledged) <= stored <= {f"fact {i}" for i in range(3)}, steps
