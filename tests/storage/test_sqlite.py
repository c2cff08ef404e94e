"""SqliteStorage beyond the conformance suite: locking, damage, crashes, fsync, lifecycle."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_for
from subcog_crdt._errors import ClosedError, CorruptStorage, StorageError, StorageLocked
from subcog_crdt._storage import sqlite as sqlite_mod
from subcog_crdt._storage.base import JournalRecord, Retention
from subcog_crdt._storage.sqlite import LOG_NAME, STORE_NAME, SqliteStorage

CHILD = Path(__file__).with_name("_child.py")
NS = "ns"


def rec(cursor: int) -> JournalRecord:
    return JournalRecord(cursor, int(time.time() * 1000), NS, "captured", f"w{cursor}", "s")


def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def reap(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=10)
    for stream in (p.stdin, p.stdout):
        if stream is not None:
            stream.close()


async def fill(d: Path, n: int, *, compact_at: int = 0) -> None:
    async with SqliteStorage(d) as s:
        await s.open("node")
        for i in range(1, n + 1):
            await s.commit([(NS, b"u%d" % i)], [rec(i)])
            if i == compact_at:
                await s.compact(NS, b"SNAP", i)


# -- locking ------------------------------------------------------------------------------


async def test_second_opener_in_same_process_is_refused(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path) as first:
        await first.open("a")
        second = SqliteStorage(tmp_path)
        with pytest.raises(StorageLocked) as info:
            await second.open("b")
        assert str(tmp_path) in str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
        await second.aclose()
    # Released on close: a new opener gets in.
    async with SqliteStorage(tmp_path) as third:
        await third.open("c")


async def test_second_opener_in_another_process_is_refused(tmp_path: Path) -> None:
    p = child("hold", str(tmp_path))
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(StorageLocked) as info:
            await SqliteStorage(tmp_path).open("b")
        assert str(tmp_path) in str(info.value)
        assert f"pid {p.pid}" in str(info.value)
        # kill -9 never leaves a stale lock: the kernel drops it with the process.
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        async with SqliteStorage(tmp_path) as s:
            state = await s.open("b")
            assert state.node_id == "child"
    finally:
        reap(p)


# -- lifecycle ----------------------------------------------------------------------------


async def test_close_is_idempotent_and_use_after_close_raises(tmp_path: Path) -> None:
    s = SqliteStorage(tmp_path)
    with pytest.raises(ClosedError):
        await s.commit([(NS, b"x")], [])
    await s.open("n")
    await s.commit([(NS, b"x")], [rec(1)])
    await s.aclose()
    await s.aclose()
    with pytest.raises(ClosedError):
        await s.commit([(NS, b"y")], [])
    with pytest.raises(ClosedError):
        s.tail_seq(NS)
    with pytest.raises(ClosedError):
        await s.open("n")
    # Everything was flushed: the WAL is empty after a clean close.
    wal = tmp_path / (STORE_NAME + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0


async def test_fsync_mode_groups_concurrent_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    syncs = 0
    real = os.fdatasync

    def counting(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    async with SqliteStorage(tmp_path, durability="fsync") as s:
        await s.open("n")
        await asyncio.gather(*(s.commit([(NS, b"u%d" % i)], [rec(i + 1)]) for i in range(100)))
        assert s.tail_seq(NS) == 100
    assert 0 < syncs < 50, f"{syncs} fsyncs for 100 concurrent commits"
    async with SqliteStorage(tmp_path, durability="fsync") as s:
        state = await s.open("n")
        assert sorted(state.docs[NS]) == sorted(b"u%d" % i for i in range(100))


async def test_fsync_mode_makes_new_directory_entries_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synced file is lost on power loss if its directory entry is not: with "fsync",
    creating the data directory (and its missing parents), the log and the store syncs
    their directories before the first commit can be acknowledged."""
    synced: set[tuple[int, int]] = set()
    real = os.fsync

    def recording(fd: int) -> None:
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real(fd)

    def key(p: Path) -> tuple[int, int]:
        st = p.stat()
        return (st.st_dev, st.st_ino)

    monkeypatch.setattr(os, "fsync", recording)
    data = tmp_path / "a" / "b"
    async with SqliteStorage(data, durability="fsync") as s:
        await s.open("n")
        assert {key(tmp_path), key(tmp_path / "a"), key(data)} <= synced
        await s.commit([(NS, b"u1")], [rec(1)])


async def test_compaction_reclaims_space(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path) as s:
        await s.open("n")
        big = b"z" * 4000
        for start in range(0, 2000, 100):
            await s.commit([(NS, big)] * 100, [rec(i + 1) for i in range(start, start + 100)])
        await s.compact(NS, b"S" * 1000, s.tail_seq(NS))
        assert s.tail_bytes(NS) == 0
        total = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
        # 8 MB of updates were written; what stays is the snapshot and the journal.
        assert total < 1_000_000, sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*"))


# -- retention ---------------------------------------------------------------------------


def stored_journal(d: Path, meta: str = "journal_count") -> tuple[int, int]:
    """(rows in the journal table, the ``meta`` value stored next to them: by default the
    journal_count)."""
    conn = sqlite3.connect(d / STORE_NAME)
    try:
        rows = conn.execute("SELECT count(*) FROM journal").fetchone()[0]
        value = conn.execute("SELECT value FROM meta WHERE key=?", (meta,)).fetchone()[0]
    finally:
        conn.close()
    return int(rows), int(value)


async def test_a_prune_by_a_read_stores_the_journal_count(tmp_path: Path) -> None:
    """A read prunes exactly; the count it leaves must be stored with the rows, or after
    a reopen the drain prunes by a count that is too high and drops kept events."""
    retention = Retention(max_events=640, max_age=None)  # drains prune only 10 over
    async with SqliteStorage(tmp_path, retention=retention) as s:
        await s.open("n")
        await s.commit([], [rec(i) for i in range(1, 646)])
        assert len(await s.read_journal(0, 1000)) == 640
    assert stored_journal(tmp_path) == (640, 640)
    for restart in range(3):
        async with SqliteStorage(tmp_path, retention=retention) as s:
            await s.open("n")
            first = 646 + 10 * restart
            await s.commit([], [rec(i) for i in range(first, first + 10)])
            await s.flush()
            got = await s.read_journal(0, 10_000)
            assert len(got) == 640, f"restart {restart}: retention keeps 640"
            assert s.oldest_cursor() == got[0].cursor == first + 10 - 640
        assert stored_journal(tmp_path) == (640, 640)


async def test_a_failed_prune_by_a_read_leaves_the_retention_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the read's prune is rolled back, the loop's view (oldest_cursor) goes back too."""
    retention = Retention(max_events=640, max_age=None)  # drains prune only 10 over
    async with SqliteStorage(tmp_path, retention=retention) as s:
        await s.open("n")
        await s.commit([], [rec(i) for i in range(1, 646)])
        await s.flush()
        assert s.oldest_cursor() == 1
        real = SqliteStorage._prune

        def prune_then_fail(self: SqliteStorage, *, exact: bool) -> None:
            real(self, exact=exact)
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(SqliteStorage, "_prune", prune_then_fail)
        with pytest.raises(StorageError):
            await s.read_journal(0, 100)
        assert s.oldest_cursor() == 1, "the rolled-back prune did not happen"
        monkeypatch.undo()
        got = await s.read_journal(0, 1000)
        assert len(got) == 640
        assert s.oldest_cursor() == got[0].cursor == 6
    assert stored_journal(tmp_path) == (640, 640)


# -- backlog ------------------------------------------------------------------------------


async def test_every_commit_waiting_for_the_backlog_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several commits over the backlog limit wait for the storage thread at once; when
    it catches up, all of them return (one slot for waiters left all but the last one
    waiting forever)."""
    monkeypatch.setattr(sqlite_mod, "_MAX_BACKLOG", 1000)
    async with SqliteStorage(tmp_path) as s:
        await s.open("n")
        busy = threading.Event()
        s._jobs.put((busy.wait, (), None))  # the thread is busy (a long compaction)
        tasks = [
            asyncio.create_task(s.commit([(NS, b"%d" % i + b"x" * 2000)], [rec(i)]))
            for i in range(1, 6)
        ]
        await wait_for(lambda: len(s._backlog_waiters) == 5, 10, "all five commits waiting")
        assert not any(t.done() for t in tasks), "over the limit, they wait for the thread"
        busy.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)  # hang guard only
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert len(state.docs[NS]) == 5


async def test_commits_waiting_for_the_backlog_fail_with_the_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the drain they wait for fails, every waiting commit raises (none hangs); the
    failure passes, and the frames are all applied later."""
    monkeypatch.setattr(sqlite_mod, "_MAX_BACKLOG", 1000)
    async with SqliteStorage(tmp_path) as s:
        await s.open("n")
        busy = threading.Event()
        s._jobs.put((busy.wait, (), None))
        failing = failing_apply(monkeypatch)
        tasks = [
            asyncio.create_task(s.commit([(NS, b"%d" % i + b"x" * 2000)], [rec(i)]))
            for i in range(1, 6)
        ]
        await wait_for(lambda: len(s._backlog_waiters) == 5, 10, "all five commits waiting")
        busy.set()
        done = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), timeout=30
        )  # hang guard only
        assert not failing
        assert all(isinstance(r, StorageError) for r in done), done
        monkeypatch.undo()
        await s.commit([(NS, b"six")], [rec(6)])  # over the limit: waits for a drain
        assert [r.cursor for r in await s.read_journal(0, 100)] == [1, 2, 3, 4, 5, 6]
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert len(state.docs[NS]) == 6


# -- damage -------------------------------------------------------------------------------


async def test_torn_tail_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    p = child("paused", str(tmp_path), "20")
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "done"
        p.wait(timeout=10)
    finally:
        reap(p)
    log = tmp_path / LOG_NAME
    size = log.stat().st_size
    assert size > 20 * 300
    with open(log, "r+b") as f:
        f.truncate(size - 5)  # the last frame is now half-written
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert state.docs[NS] == [b"U:%d:" % i + b"x" * 300 for i in range(1, 20)]
        assert [r.cursor for r in await s.read_journal(0, 100)] == list(range(1, 20))
        assert s.tail_seq(NS) == 19
        # New commits follow the last complete frame.
        await s.commit([(NS, b"after")], [rec(20)])
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert state.docs[NS][-1] == b"after"
        assert len(state.docs[NS]) == 20


async def test_full_disk_refuses_the_commit_and_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    """A log write cut short by a full disk fails that commit with a clear error and
    leaves no half frame behind: the commits acknowledged after the disk has room again
    must still load (a half frame before them would read as corruption)."""
    p = child("fsize", str(tmp_path))
    try:
        out = p.communicate(timeout=60)[0].splitlines()
    finally:
        reap(p)
    failed = [line for line in out if line.startswith("failed")]
    assert [line.split()[1] for line in failed] == ["6", "7", "8"]
    assert all("cannot write" in line for line in failed)
    acked = [int(x) for x in out[-1].split()[1:]]
    assert out[-1].startswith("acked") and acked == [1, 2, 3, 4, 5, 9, 10, 11, 12]
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert state.docs[NS] == [b"U:%d:" % i + b"x" * 300 for i in acked]
        assert [r.cursor for r in await s.read_journal(0, 100)] == acked
        assert s.tail_seq(NS) == len(acked)


async def test_an_exception_mid_write_leaves_no_half_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal's exception (KeyboardInterrupt) between the retries of a cut-short write
    cannot be provoked on demand; a stand-in writes half the frame, then raises it."""
    real = sqlite_mod.write_all

    def interrupted(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise KeyboardInterrupt

    async with SqliteStorage(tmp_path) as s:
        await s.open("n")
        await s.commit([(NS, b"one")], [rec(1)])
        monkeypatch.setattr(sqlite_mod, "write_all", interrupted)
        with pytest.raises(KeyboardInterrupt):
            await s.commit([(NS, b"lost")], [rec(2)])
        monkeypatch.setattr(sqlite_mod, "write_all", real)
        await s.commit([(NS, b"two")], [rec(2)])
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert state.docs[NS] == [b"one", b"two"]
        assert [r.write_id for r in await s.read_journal(0, 10)] == ["w1", "w2"]


async def test_an_empty_frame_inside_a_torn_tail_is_not_a_valid_frame(tmp_path: Path) -> None:
    """``SCL1`` and eight zero bytes read as a frame of length 0 with a matching CRC; the
    writer never writes one, so inside a torn frame's data they are data, not a frame that
    makes the tear look like damage in the middle of the log."""
    await fill(tmp_path, 3)
    log = tmp_path / LOG_NAME
    payload = b"x" * 50 + b"SCL1" + bytes(8) + b"y" * 50
    with open(log, "ab") as f:  # a big frame cut short by a crash
        f.write(struct.pack("<4sII", b"SCL1", 5000, 0) + payload)
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert state.docs[NS] == [b"u1", b"u2", b"u3"]
    assert log.stat().st_size < 3 * 100, "the torn frame was cut off"


async def test_a_log_that_lost_updates_is_refused_unchanged(tmp_path: Path) -> None:
    """The store applied frames that the log no longer has: refused, and the log is left
    exactly as it was (the torn tail is not cut off first)."""
    await fill(tmp_path, 10)  # all applied to SQLite at close; the updates only in the log
    log = tmp_path / LOG_NAME
    with open(log, "r+b") as f:
        f.truncate(log.stat().st_size - 5)  # frame 10 is torn: the log ends at frame 9
    before = log.read_bytes()
    with pytest.raises(CorruptStorage, match="lost updates") as info:
        await SqliteStorage(tmp_path).open("n")
    assert info.value.path == str(log)
    assert log.read_bytes() == before


async def test_a_full_disk_while_a_read_applies_the_log_loses_nothing(tmp_path: Path) -> None:
    """A read applies the frames still waiting for SQLite first; when that fails (a full
    disk), the frames must stay queued: a later drain applies them, so the next retire
    does not truncate the only copy of an acknowledged update away. A full disk passes,
    so the storage keeps working once there is room again."""
    p = child("applyfail", str(tmp_path))
    try:
        out = p.communicate(timeout=60)[0].splitlines()
    finally:
        reap(p)
    assert out[0].startswith("read failed"), out
    assert out[1] == "failure None", "a full disk is not a reason to stop for good"
    assert out[2] == "read 1 2 3 4 5", "the failed frame was applied by the next drain"
    assert out[3] == "acked 1 2 3 4 5 6 7"
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert state.docs[NS] == [b"U:%d:" % i + b"x" * 300 for i in (1, 2, 3, 4, 5, 7)]
        assert state.docs["other"] == [b"SNAP:other"]
        assert [r.cursor for r in await s.read_journal(0, 100)] == [1, 2, 3, 4, 5, 6, 7]


def failing_apply(
    monkeypatch: pytest.MonkeyPatch, *, retire: bool | None = None, code: int = 0
) -> list[int]:
    """Make the next apply of frames to SQLite (with ``retire`` as given, or any) fail as
    SQLite fails on a full disk (or with ``code``); the returned list empties then."""
    left = [1]
    real = SqliteStorage._apply

    def wrapper(self: SqliteStorage, frames: list[Any], **kw: Any) -> None:
        if left and (retire is None or kw.get("retire", False) == retire):
            left.pop()
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = code or sqlite3.SQLITE_FULL
            raise exc
        real(self, frames, **kw)

    monkeypatch.setattr(SqliteStorage, "_apply", wrapper)
    return left


async def test_a_failed_retire_keeps_its_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction applies the last frames under the writer lock and empties the log; if
    that apply fails, the frames stay queued and the log is kept."""
    async with SqliteStorage(tmp_path) as s:
        await s.open("n")
        await s.commit([(NS, b"u1")], [rec(1)])
        await s.commit([("other", b"o1")], [rec(2)])
        await s.flush()
        s._drain_scheduled = True  # test-only: frames wait for the compaction's retire
        await s.commit([(NS, b"u2")], [rec(3)])
        monkeypatch.setattr(SqliteStorage, "_drain", lambda self: None)  # only the retire
        failing = failing_apply(monkeypatch, retire=True)
        with pytest.raises(StorageError, match="disk is full"):
            await s.compact("other", b"SNAP", 1)
        assert not failing
        monkeypatch.undo()
        s._drain_scheduled = False
        await s.commit([(NS, b"u3")], [rec(4)])
        await s.compact("other", b"SNAP2", 1)  # retires everything and empties the log
        assert (tmp_path / LOG_NAME).stat().st_size == 0
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert state.docs[NS] == [b"u1", b"u2", b"u3"]
        assert [r.cursor for r in await s.read_journal(0, 100)] == [1, 2, 3, 4]


async def test_damage_reported_while_applying_stops_all_later_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlike a full disk, damage does not pass: later commits are refused (loudly) until
    the storage is reopened, and nothing acknowledged before is lost."""
    async with SqliteStorage(tmp_path) as s:
        await s.open("n")
        s._drain_scheduled = True  # test-only: the frame waits for flush() to apply it
        await s.commit([(NS, b"u1")], [rec(1)])
        failing_apply(monkeypatch, code=sqlite3.SQLITE_CORRUPT)
        with pytest.raises(CorruptStorage):
            await s.flush()
        monkeypatch.undo()
        with pytest.raises(StorageError, match="failed earlier"):
            await s.commit([(NS, b"u2")], [rec(2)])
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert state.docs[NS] == [b"u1"]
        assert [r.cursor for r in await s.read_journal(0, 100)] == [1]


async def test_damage_before_valid_frames_is_corruption(tmp_path: Path) -> None:
    p = child("paused", str(tmp_path), "20")
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "done"
        p.wait(timeout=10)
    finally:
        reap(p)
    log = tmp_path / LOG_NAME
    raw = bytearray(log.read_bytes())
    raw[100] ^= 0xFF  # inside the first frame; 19 valid frames follow
    log.write_bytes(bytes(raw))
    with pytest.raises(CorruptStorage) as info:
        await SqliteStorage(tmp_path).open("n")
    assert info.value.path == str(log)


async def test_corrupt_store_is_refused(tmp_path: Path) -> None:
    await fill(tmp_path, 300)
    store = tmp_path / STORE_NAME
    raw = bytearray(store.read_bytes())
    assert len(raw) > 3 * 4096
    raw[4096 + 8 : 4096 + 200] = os.urandom(192)  # page 2: a b-tree page header and cells
    store.write_bytes(bytes(raw))
    with pytest.raises(CorruptStorage) as info:
        await SqliteStorage(tmp_path).open("n")
    assert info.value.path == str(store)


async def test_garbage_store_is_refused(tmp_path: Path) -> None:
    await fill(tmp_path, 10)
    store = tmp_path / STORE_NAME
    store.write_bytes(os.urandom(store.stat().st_size))
    with pytest.raises(CorruptStorage) as info:
        await SqliteStorage(tmp_path).open("n")
    assert info.value.path == str(store)


async def test_corrupt_snapshot_is_refused(tmp_path: Path) -> None:
    await fill(tmp_path, 10, compact_at=8)
    (snap,) = (tmp_path / "snapshots").iterdir()
    raw = bytearray(snap.read_bytes())
    raw[-1] ^= 0x01
    snap.write_bytes(bytes(raw))
    with pytest.raises(CorruptStorage) as info:
        await SqliteStorage(tmp_path).open("n")
    assert info.value.path == str(snap)


async def test_missing_store_with_data_is_refused(tmp_path: Path) -> None:
    await fill(tmp_path, 10, compact_at=8)
    for name in (STORE_NAME, STORE_NAME + "-wal", STORE_NAME + "-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(CorruptStorage) as info:
        await SqliteStorage(tmp_path).open("n")
    assert info.value.path == str(tmp_path / STORE_NAME)
    assert "refusing to start empty" in str(info.value)


# -- crashes ------------------------------------------------------------------------------


class _Printed:
    """A child's stdout lines, collected on a thread; the test waits for a number of them
    with a deadline (a guard against a hang, never a claim about speed)."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.lines) < n:
                left = deadline - time.monotonic()
                assert left > 0 and self._thread.is_alive(), (
                    f"the child printed {len(self.lines)} of {n} lines: {self.lines[-3:]}"
                )
                self._cond.wait(left)

    def join(self, timeout: float) -> list[str]:
        """Every complete line, once the stream ended (the child is dead)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the child's stdout did not end"
        return [line for line in self.lines if line.endswith("\n")]


@pytest.mark.parametrize("durability", ["process", "fsync"])
async def test_kill_9_loses_no_returned_commit(tmp_path: Path, durability: str) -> None:
    """SIGKILL at a random commit count: every commit whose ``commit()`` returned (the
    child printed its seq) is in the reopened store, in order, with its journal record."""
    rounds = 10 if durability == "process" else 3
    rng = random.Random(1234)
    printed: list[int] = []
    for _ in range(rounds):
        p = child("commit", str(tmp_path), durability)
        try:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
            out = _Printed(p.stdout)
            # the random kill moment: after a random number of returned commits (more
            # may follow before the signal lands)
            out.wait_for(rng.randint(1, 300), 60)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            lines = out.join(10)
        finally:
            reap(p)
        printed.extend(int(x) for x in lines)
        async with SqliteStorage(tmp_path) as s:
            state = await s.open("n")
            docs = state.docs[NS]
            first = 1
            if docs and docs[0].startswith(b"SNAP:"):
                first = int(docs[0][5:]) + 1
                docs = docs[1:]
            last = first + len(docs) - 1
            assert docs == [b"U:%d:" % q + b"x" * 300 for q in range(first, last + 1)]
            assert max(printed) <= last, f"returned commit {max(printed)} lost (have {last})"
            assert s.tail_seq(NS) == last
            journal = await s.read_journal(0, 1_000_000)
            assert [r.write_id for r in journal] == [f"w{q}" for q in range(1, last + 1)]


async def test_an_open_cancelled_twice_releases_the_directory(tmp_path, monkeypatch):
    """A second cancel while open() waits for its thread used to cancel that wait, and
    what the thread had opened (lock, SQLite, log) stayed open: the directory was locked
    for the life of the process. Now the thread's result is closed when it arrives."""
    entered, gate = threading.Event(), threading.Event()
    real_open = SqliteStorage._open_sync

    def held_open(self: SqliteStorage, node_id: str) -> Any:
        entered.set()
        gate.wait(10)
        return real_open(self, node_id)

    monkeypatch.setattr(SqliteStorage, "_open_sync", held_open)
    s = SqliteStorage(tmp_path)
    opener = asyncio.ensure_future(s.open("n1"))
    assert await asyncio.to_thread(entered.wait, 10)  # the thread is in its open
    opener.cancel()
    await asyncio.sleep(0)  # one loop step: the first cancel lands, the second hits its undo
    opener.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opener
    gate.set()
    await asyncio.wait_for(s.aclose(), 10)  # waits for the thread's open to be undone
    assert not [t for t in threading.enumerate() if t.name.startswith("subcog-storage")]
    monkeypatch.undo()
    async with SqliteStorage(tmp_path) as again:
        await again.open("n1")  # the directory is free again


async def test_a_cancelled_open_that_also_fails_raises_cancelled(tmp_path):
    """Cancelled while its thread fails (the directory is locked): the caller asked to
    cancel, so it gets CancelledError, not the failure (a timeout became StorageLocked)."""
    async with SqliteStorage(tmp_path) as holder:
        await holder.open("n1")
        s = SqliteStorage(tmp_path)
        opener = asyncio.ensure_future(s.open("n2"))
        # One loop step: open() submits its job and awaits it. The thread's answer can only
        # reach it through the loop, so the cancel below always comes first.
        await asyncio.sleep(0)
        opener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opener
        await asyncio.wait_for(s.aclose(), 10)
        storage_threads = [t for t in threading.enumerate() if t.name.startswith("subcog-st")]
        assert len(storage_threads) == 1  # the holder's, not the abandoned open's
