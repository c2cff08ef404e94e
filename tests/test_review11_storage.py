"""Review 11: the drain job's wait for more frames (``_DRAIN_DELAY``, ended by ``_wake``),
log writes up to 1 MiB keeping the GIL, and compactions that wait for local writes to
pause unless the tail runs away (``_COMPACT_QUIET`` / ``_COMPACT_LATEST``).

The drain's wait is made an hour long here (``_DRAIN_DELAY``): whatever must end it and
does not shows up as a hang (cut by a generous deadline), not as a timing difference."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import subcog_crdt._api as api_module
from helpers import link, wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._storage import gilwrite
from subcog_crdt._storage import sqlite as sqlite_mod
from subcog_crdt._storage.base import JournalRecord
from subcog_crdt._storage.sqlite import LOG_NAME, SNAP_DIR, SqliteStorage

NS = "d"
SRC = Path(__file__).resolve().parents[1] / "src"
HOUR = 3600.0
DEADLINE = 10.0
"""Generous: what is checked completes at once when right, and after an hour when not."""


def durable(path: Path, **kw: Any) -> ConversationsApi:
    return ConversationsApi(data_dir=path, listen=False, discovery=(), **kw)


def rec(cursor: int) -> JournalRecord:
    return JournalRecord(cursor, int(time.time() * 1000), NS, "captured", f"w{cursor}", "s")


class _WatchedWake(threading.Event):
    """The storage's ``_wake``, telling whether a drain job is in its wait and how each
    wait ended (True: woken; False: the delay ran out)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()
        self.ends: list[bool] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        try:
            woken = super().wait(timeout)
        finally:
            self.waiting.clear()
        self.ends.append(woken)
        return woken


def _watch(st: Any) -> _WatchedWake:
    assert isinstance(st, SqliteStorage)
    w = _WatchedWake()
    st._wake = w
    return w


def _block_thread(st: SqliteStorage) -> tuple[threading.Event, asyncio.Future[Any]]:
    """Occupy the storage thread with a job that runs until the returned gate is set."""
    gate = threading.Event()
    started = threading.Event()

    def block() -> None:
        started.set()
        gate.wait(60)

    job = st._submit(block)
    if not started.wait(DEADLINE):
        raise AssertionError("the storage thread did not take the blocking job")
    return gate, job


def _journal_rows(data: Path) -> tuple[int, int]:
    """(journal rows, applied_lsn) as SQLite holds them (the node is closed)."""
    from storage.test_sqlite import stored_journal

    return stored_journal(data, "applied_lsn")


# -- the drain's wait ------------------------------------------------------------------------


async def test_a_sync_ends_a_waiting_drain_and_sees_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain job waiting for more frames must not make a ``sync()`` (read_journal) wait
    for it, nor answer from SQLite without the frames still in the queue."""
    monkeypatch.setattr(sqlite_mod, "_DRAIN_DELAY", HOUR)
    api = durable(tmp_path)
    wake = _watch(api._storage)
    async with api:
        reader = await api.register_session("r", subscribe=[NS])
        writer = await api.register_session("w", subscribe=[NS])
        ids = [(await writer.capture(NS, f"fact {i}")).id for i in range(5)]
        await wait_for(wake.waiting.is_set, what="the drain job waiting")
        batch = await asyncio.wait_for(reader.sync(), DEADLINE)
        assert [e.memory_id for e in batch.events] == ids
        assert wake.ends and all(wake.ends)  # every wait was cut short, none ran out
        # Written during the next wait: a second sync sees it too.
        more = await writer.capture(NS, "one more")
        await wait_for(wake.waiting.is_set, what="the next drain job waiting")
        batch = await asyncio.wait_for(reader.sync(), DEADLINE)
        assert [e.memory_id for e in batch.events] == [more.id]
        await asyncio.wait_for(api._storage.flush(), DEADLINE)


async def test_closing_while_a_drain_waits_neither_hangs_nor_loses_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_mod, "_DRAIN_DELAY", HOUR)
    api = durable(tmp_path)
    wake = _watch(api._storage)
    await api.open()
    try:
        writer = await api.register_session("w", subscribe=[NS])
        ids = {(await writer.capture(NS, f"fact {i}")).id for i in range(7)}
        await wait_for(wake.waiting.is_set, what="the drain job waiting")
        lsn = api._storage._lsn
    finally:
        await asyncio.wait_for(api.aclose(), DEADLINE)
    # The close drained the waiting frames into SQLite (not only left them in the log).
    assert _journal_rows(tmp_path) == (7, lsn)
    async with durable(tmp_path) as again:
        assert {m.id for m in again.memories(NS)} == ids
        r = await again.register_session("r2", subscribe=[NS])
        batch = await r.sync(since=0)
        assert {e.memory_id for e in batch.events} == ids and len(batch.events) == 7


async def test_a_compaction_ends_a_waiting_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compaction's job (queued behind the waiting drain) cuts the wait short, and
    covers the frames still waiting."""
    monkeypatch.setattr(sqlite_mod, "_DRAIN_DELAY", HOUR)
    st = SqliteStorage(tmp_path)
    wake = _watch(st)
    await st.open("n")
    try:
        for i in range(1, 6):
            await st.commit([(NS, b"u%d" % i)], [rec(i)])
        await wait_for(wake.waiting.is_set, what="the drain job waiting")
        await asyncio.wait_for(st.compact(NS, b"SNAP", 5), DEADLINE)
        assert st.tail_bytes(NS) == 0
        got = await asyncio.wait_for(st.read_journal(0, 100), DEADLINE)
        assert [r.cursor for r in got] == [1, 2, 3, 4, 5]
    finally:
        await asyncio.wait_for(st.aclose(), DEADLINE)
    assert (tmp_path / LOG_NAME).stat().st_size == 0
    async with SqliteStorage(tmp_path) as again:
        state = await again.open("n")
        assert state.docs[NS] == [b"SNAP"] and state.last_cursor == 5


async def test_a_commit_waiting_for_the_backlog_ends_the_drain_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread is busy (a long apply, here a blocking job) while the loop commits past
    ``_MAX_BACKLOG``: the commit waits for the queued drain job and sets ``_wake`` to cut
    its wait short. The drain job then starts, clears ``_wake`` and, its queue being
    empty, waits the full ``_DRAIN_DELAY``: the commit is stuck for it (50 ms per round
    in production, with frames large enough that fewer than ``_DRAIN_NOW`` fill the
    backlog)."""
    monkeypatch.setattr(sqlite_mod, "_DRAIN_DELAY", HOUR)
    monkeypatch.setattr(sqlite_mod, "_MAX_BACKLOG", 1000)
    st = SqliteStorage(tmp_path)
    await st.open("n")
    gate, blocked = _block_thread(st)
    try:
        await st.commit([(NS, b"small")], [rec(1)])  # queues the drain job behind the block
        assert st._drain_scheduled
        big = asyncio.ensure_future(st.commit([(NS, b"x" * 4000)], [rec(2)]))
        await wait_for(lambda: st._backlog_waiters, what="the commit waiting for the backlog")
        gate.set()
        await blocked
        await asyncio.wait_for(big, DEADLINE)
    finally:
        gate.set()
        await asyncio.wait_for(st.aclose(), DEADLINE)


# -- gilwrite --------------------------------------------------------------------------------


def test_writes_up_to_one_mib_keep_the_gil_and_larger_ones_use_os_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(tests/storage/test_gilwrite.py's ``* 1000`` write, 256 000 bytes, was "over
    KEEP_GIL_UP_TO"; since 1 MiB it no longer reaches the os.write branch.)"""
    if not gilwrite.HOLDS_GIL:
        pytest.skip("no libc write here")
    assert gilwrite.KEEP_GIL_UP_TO == 1 << 20
    real = os.write
    sizes: list[int] = []

    def counting(fd: int, data: Any) -> int:
        sizes.append(len(data))
        return real(fd, data)

    monkeypatch.setattr(gilwrite.os, "write", counting)
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    small = bytes(range(256)) * 1000
    at = b"a" * gilwrite.KEEP_GIL_UP_TO
    over = b"b" * (gilwrite.KEEP_GIL_UP_TO + 1)
    try:
        gilwrite.write_all(fd, small)
        gilwrite.write_all(fd, at)
        assert sizes == []
        gilwrite.write_all(fd, over)
    finally:
        os.close(fd)
    assert sizes and sizes[0] == len(over)
    assert path.read_bytes() == small + at + over


# -- compaction ------------------------------------------------------------------------------


async def test_a_compaction_past_its_wait_is_neither_cancelled_nor_doubled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiting task ended its wait and is inside ``_compact`` (its storage job queued)
    when writes push the tail past the forcing bound: it is no longer in
    ``_compact_waiting``, so nothing cancels it or starts a second compaction."""
    monkeypatch.setattr(api_module, "_COMPACT_BYTES", 2_000)
    monkeypatch.setattr(api_module, "_COMPACT_QUIET", 0.0)
    bound = 8 * 2_000
    api = durable(tmp_path)
    st = api._storage
    assert isinstance(st, SqliteStorage)
    active = {"now": 0, "max": 0, "calls": 0}
    real_compact = st.compact

    async def compact(*a: Any) -> None:
        active["now"] += 1
        active["calls"] += 1
        active["max"] = max(active["max"], active["now"])
        try:
            await real_compact(*a)
        finally:
            active["now"] -= 1

    st.compact = compact  # type: ignore[method-assign,assignment]
    async with api:
        s = await api.register_session("s", subscribe=[NS])
        gate, blocked = _block_thread(st)
        try:
            i = 0
            while NS not in api._compacting:
                await s.capture(NS, f"fact {i} " + "y" * 100)
                i += 1
            task = api._compacting[NS]
            await wait_for(lambda: active["now"] == 1, what="the compaction in flight")
            assert NS not in api._compact_waiting
            while st.tail_bytes(NS) <= 2 * bound:
                await s.capture(NS, f"fact {i} " + "y" * 100)
                i += 1
            assert api._compacting[NS] is task and not task.done()
        finally:
            gate.set()
        await blocked
        await wait_for(lambda: task.done(), what="the compaction")
        assert not task.cancelled() and NS in api._snapshot_bytes
        assert active["calls"] == 1 and active["max"] == 1
        ids = {m.id for m in api.memories(NS)}
    assert len(ids) == i
    async with durable(tmp_path) as again:
        assert {m.id for m in again.memories(NS)} == ids


async def test_writes_that_never_pause_are_compacted_again_and_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local writes never pause (``_COMPACT_QUIET`` an hour): every compaction is a forced
    one, repeatedly, the threshold growing with the snapshot; a waiting task that is
    replaced is cancelled and never left in ``_compacting``; nothing is lost."""
    monkeypatch.setattr(api_module, "_COMPACT_BYTES", 1_000)
    monkeypatch.setattr(api_module, "_COMPACT_QUIET", HOUR)
    async with durable(tmp_path) as api:
        s = await api.register_session("s", subscribe=[NS])
        sizes: list[int] = []
        replaced: list[asyncio.Task[None]] = []
        i = 0
        while len(sizes) < 3:  # (a compaction finishes when the writes give the loop a turn)
            assert i < 20_000, "never compacted three times"
            i += 1
            before = api._compacting.get(NS)
            await s.capture(NS, f"fact {i} " + "z" * 120)
            after = api._compacting.get(NS)
            if before is not None and after is not before and not before.done():
                replaced.append(before)
            size = api._snapshot_bytes.get(NS)
            if size and (not sizes or sizes[-1] != size):
                sizes.append(size)
            if NS in api._compacting and NS not in api._compact_waiting:
                # A forced one runs: let it finish (the storage thread may be far behind
                # this loop). Still no pause as far as _COMPACT_QUIET goes.
                await wait_for(
                    lambda: NS not in api._compacting or NS in api._compact_waiting,
                    what="the forced compaction",
                )
        assert replaced
        await wait_for(lambda: all(t.done() for t in replaced), what="replaced tasks ending")
        assert all(t.cancelled() for t in replaced)
        # Whatever is left in _compacting is the live one (waiting or compacting).
        assert all(not t.done() for t in api._compacting.values())
        ids = {m.id for m in api.memories(NS)}
    assert len(ids) == i
    assert len(list((tmp_path / SNAP_DIR).glob("*.snap"))) == 1
    async with durable(tmp_path) as again:
        assert {m.id for m in again.memories(NS)} == ids


async def test_a_node_that_only_receives_compacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A durable node writing nothing itself still compacts what a peer sends it: once
    the peer's stream pauses (its arrivals count as writes, docs/storage.md), not never."""
    monkeypatch.setattr(api_module, "_COMPACT_BYTES", 2_000)
    async with (
        durable(tmp_path / "b") as b,
        ConversationsApi(listen=False, discovery=()) as a,
    ):
        await b.register_session("sb", subscribe=[NS])
        sa = await a.register_session("sa", subscribe=[NS])
        link(a, b)
        mems = [await sa.capture(NS, f"fact {i} " + "r" * 150) for i in range(100)]
        await wait_for(lambda: len(b.memories(NS)) == 100, what="b has every memory")
        await wait_for(lambda: NS in b._snapshot_bytes, what="b compacting on its own")
        await wait_for(lambda: not b._compacting, what="b's compaction ending")
        assert b._last_write > 0.0  # the arrivals held it back until they paused
    async with durable(tmp_path / "b") as again:
        assert {m.id for m in again.memories(NS)} == {m.id for m in mems}


async def test_the_threshold_survives_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/storage.md: a namespace is compacted once its tail is larger than both
    ``_COMPACT_BYTES`` and its last snapshot. After a restart the last snapshot is on
    disk, but the node compacts as soon as the tail passes ``_COMPACT_BYTES``."""
    monkeypatch.setattr(api_module, "_COMPACT_BYTES", 2_000)
    monkeypatch.setattr(api_module, "_COMPACT_QUIET", 0.0)
    async with durable(tmp_path) as api:
        s = await api.register_session("s", subscribe=[NS])
        i = 0
        while api._snapshot_bytes.get(NS, 0) < 8_000 or api._compacting:
            await s.capture(NS, f"fact {i} " + "q" * 100)
            i += 1
            if api._compacting:
                await wait_for(lambda: not api._compacting, what="a compaction")
        snap = api._snapshot_bytes[NS]
    async with durable(tmp_path) as api:
        s = await api.register_session("s", subscribe=[NS])
        tail0 = api._storage.tail_bytes(NS)
        while api._storage.tail_bytes(NS) < tail0 + 2_500:  # past _COMPACT_BYTES
            await s.capture(NS, f"more {i} " + "q" * 100)
            i += 1
        assert api._storage.tail_bytes(NS) < snap
        assert NS not in api._compacting  # below the last snapshot: not due


# -- kill -9 while compactions wait or run ---------------------------------------------------

_CHILD = r"""
import asyncio, os, random, signal, sys, threading
import subcog_crdt._api as api_module
from subcog_crdt import ConversationsApi

api_module._COMPACT_BYTES = 3_000
api_module._COMPACT_QUIET = float(sys.argv[2])
delay = float(sys.argv[3])


async def main():
    async with ConversationsApi(data_dir=sys.argv[1], listen=False, discovery=()) as api:
        w = await api.register_session("w", subscribe=["d"])
        r = await api.register_session("r", subscribe=["d"])
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
        seen = None
        i = 0
        while True:
            m = await w.capture("d", f"fact {os.getpid()} {i} " + "p" * 200)
            print("acked", m.id, flush=True)
            size = api._snapshot_bytes.get("d")
            if size != seen:
                seen = size
                print("compacted", flush=True)
                if not timer.is_alive():
                    timer.start()  # die at some point from now on, mid-whatever
            if i % 11 == 5:
                await r.sync(limit=100_000)
            i += 1


asyncio.run(main())
"""


@pytest.mark.parametrize("quiet", [0.0, HOUR])
def test_kill_9_while_compactions_wait_or_run_loses_and_duplicates_nothing(
    tmp_path: Path, quiet: float
) -> None:
    """A child captures without pause (compactions start at once with ``quiet`` 0, or
    wait and are forced with ``quiet`` an hour) and is SIGKILLed at a random moment after
    its first compaction; three rounds on one data directory. Each reopen holds every
    acknowledged memory once, its journal holds each capture once, one snapshot file."""
    rng = random.Random(11_2026)
    data = tmp_path / "node"
    acked: list[str] = []
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(data), str(quiet), str(rng.uniform(0.05, 0.6))],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == -signal.SIGKILL, out.stderr
        lines = out.stdout.split("\n")[:-1]
        assert "compacted" in lines
        acked += [line.split()[1] for line in lines if line.startswith("acked ")]
        asyncio.run(_check_store(data, acked))


async def _check_store(data: Path, acked: list[str]) -> None:
    async with durable(data) as api:
        ids = [m.id for m in api.memories(NS)]
        assert len(ids) == len(set(ids))
        # every acknowledged one; at most one more per round (in flight at the kill)
        assert set(acked) <= set(ids) and len(ids) - len(acked) <= 3
        check = await api.register_session("check", subscribe=[NS])
        batch = await check.sync(since=0, limit=100_000)
        journal = [e.memory_id for e in batch.events]
        assert sorted(journal) == sorted(ids)
        assert len(list((data / SNAP_DIR).glob("*.snap"))) == 1
