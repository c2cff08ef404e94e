"""Crash windows of the durable node that the random-kill tests can miss: a child process
SIGKILLs itself at a chosen point (inside a compaction, a drain, the first open, a log
write), and the next open must keep every acknowledged write, deliver every event exactly
once to a session's ``sync(since="last")``, never reuse a cursor, never start empty and
leave no stray snapshot behind.

Run as a script, this file is the child: ``python test_crash_windows.py MODE POINT DIR``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

import subcog_crdt._api as api_module
from subcog_crdt import ConversationsApi, Retention, StorageError, StorageLocked
from subcog_crdt._storage import sqlite as sqlite_mod
from subcog_crdt._storage.base import JournalRecord
from subcog_crdt._storage.gilwrite import KEEP_GIL_UP_TO
from subcog_crdt._storage.sqlite import LOG_NAME, SNAP_DIR, SqliteStorage

NS = "d"
CHILD_TIMEOUT = 60.0

# -- the child -------------------------------------------------------------------------------


def _die() -> None:
    """SIGKILL this process now (from any thread): what ``kill -9`` does at that point.
    (No flush: each line is flushed whole when printed; flushing here could emit half of a
    line the main thread is printing.)"""
    os.kill(os.getpid(), signal.SIGKILL)


def _after(name: str, when: Callable[[], bool] = lambda: True) -> None:
    """Die right after ``SqliteStorage.<name>`` returns (if ``when()``)."""
    real = getattr(SqliteStorage, name)

    def hooked(self: SqliteStorage, *a: Any, **k: Any) -> Any:
        out = real(self, *a, **k)
        if when():
            _die()
        return out

    setattr(SqliteStorage, name, hooked)


def _before(name: str, when: Callable[[], bool] = lambda: True) -> None:
    """Die when ``SqliteStorage.<name>`` is called (if ``when()``), before it runs."""
    real = getattr(SqliteStorage, name)

    def hooked(self: SqliteStorage, *a: Any, **k: Any) -> Any:
        if when():
            _die()
        return real(self, *a, **k)

    setattr(SqliteStorage, name, hooked)


def _flag_after(name: str, flag: dict[str, int]) -> None:
    """Count calls of ``SqliteStorage.<name>`` in ``flag["n"]`` (counted before it runs)."""
    real = getattr(SqliteStorage, name)

    def hooked(self: SqliteStorage, *a: Any, **k: Any) -> Any:
        flag["n"] += 1
        return real(self, *a, **k)

    setattr(SqliteStorage, name, hooked)


def _die_at_commit(st: SqliteStorage, when: Callable[[], bool]) -> None:
    """Die when the storage's connection starts a ``COMMIT`` while ``when()``: the
    transaction's statements ran, nothing of it is committed."""

    def trace(sql: str) -> None:
        if sql.lstrip().upper().startswith("COMMIT") and when():
            _die()

    st._submit(st._db.set_trace_callback, trace)


def _commits_during_compaction() -> None:
    """Each compaction goes on only once the loop committed three more frames after it
    asked for it: updates past the snapshot's ``upto``, which the compaction must move
    into SQLite before it empties the log. (The loop commits seven times between two
    syncs without waiting for the storage thread, so this never waits for long.)"""
    real_compact = SqliteStorage.compact
    real_sync = SqliteStorage._compact_sync
    asked_at: dict[int, int] = {}

    async def compact(self: SqliteStorage, *a: Any) -> None:
        asked_at[id(self)] = self._lsn
        await real_compact(self, *a)

    def compact_sync(self: SqliteStorage, *a: Any) -> int:
        target = asked_at[id(self)] + 3
        deadline = time.monotonic() + 10.0
        while self._lsn < target and time.monotonic() < deadline:
            time.sleep(0.001)  # (in the child: lets the loop thread commit)
        return real_sync(self, *a)

    SqliteStorage.compact = compact  # type: ignore[method-assign,assignment]
    SqliteStorage._compact_sync = compact_sync  # type: ignore[method-assign,assignment]


def _arm(point: str, api: ConversationsApi) -> None:
    """Install the crash at ``point`` (see WRITE_POINTS)."""
    st = api._storage
    assert isinstance(st, SqliteStorage)
    if point in COMPACTION_POINTS and st.durability == "process":
        # (With "fsync" a commit waits for the storage thread: it cannot go on meanwhile.)
        _commits_during_compaction()
    if point == "snapshot-written":  # new snapshot file on disk, SQLite not touched yet
        _after("_write_snapshot")
    elif point == "compaction-before-commit":  # covered rows deleted, not committed
        snap = {"n": 0}
        _flag_after("_write_snapshot", snap)
        _die_at_commit(st, lambda: snap["n"] > 0)
    elif point == "compaction-committed":  # committed; the old snapshot is still there
        real_unlink = Path.unlink

        def unlink(self: Path, missing_ok: bool = False) -> None:
            if self.suffix == ".snap":
                _die()
            real_unlink(self, missing_ok)

        Path.unlink = unlink  # type: ignore[method-assign]
    elif point == "before-retire":  # old snapshot gone; log still holds covered updates
        _before("_retire")
    elif point == "retired-not-truncated":  # live updates in SQLite, log not emptied
        real_ftruncate = os.ftruncate

        def ftruncate(fd: int, length: int) -> None:
            if fd == st._log_fd and threading.current_thread() is st._thread:
                _die()
            real_ftruncate(fd, length)

        os.ftruncate = ftruncate
    elif point == "truncated-not-reclaimed":  # log emptied, pages not given back
        _before("_reclaim")
    elif point == "drain-before-commit":  # a drain's journal rows written, not committed
        applies = {"n": 0}
        _flag_after("_apply", applies)
        _die_at_commit(st, lambda: applies["n"] >= 5)
    elif point == "drain-committed":  # a drain committed; the thread's state not updated
        applies = {"n": 0}
        _flag_after("_apply", applies)
        _after("_apply", lambda: applies["n"] >= 5)
    elif point == "prune-before-commit":  # a drain that prunes the journal, not committed
        prunes = {"n": 0}
        real_prune = SqliteStorage._prune

        def prune(self: SqliteStorage, *, exact: bool) -> None:
            before = self._journal_count
            real_prune(self, exact=exact)
            if self._journal_count < before:
                prunes["n"] += 1

        SqliteStorage._prune = prune  # type: ignore[method-assign]
        _die_at_commit(st, lambda: prunes["n"] >= 2)
    else:
        raise SystemExit(f"unknown point {point}")


COMPACTION_POINTS = (
    "snapshot-written",
    "compaction-before-commit",
    "compaction-committed",
    "before-retire",
    "retired-not-truncated",
    "truncated-not-reclaimed",
)
DRAIN_POINTS = ("drain-before-commit", "drain-committed", "prune-before-commit")
WRITE_POINTS = COMPACTION_POINTS + DRAIN_POINTS
PRUNE_MAX_EVENTS = 40


async def _child_writes(point: str, data_dir: str, durability: str) -> None:
    """Capture in a loop (printing ``acked ID`` once ``capture`` returned), let a reader
    session ``sync()`` now and then (printing ``synced CURSOR IDS...`` once it returned),
    compact small tails in the background; die at ``point``."""
    api_module._COMPACT_BYTES = 3_000  # type: ignore[attr-defined]
    # (writes never pause here: compact at once, as the kill points expect)
    api_module._COMPACT_QUIET = 0.0  # type: ignore[attr-defined]
    retention = Retention(max_events=PRUNE_MAX_EVENTS) if point.startswith("prune") else None
    pad = "p" * 200
    async with ConversationsApi(
        data_dir=data_dir, listen=False, discovery=(), durability=durability, retention=retention
    ) as api:  # type: ignore[arg-type]
        writer = await api.register_session("w", subscribe=[NS])
        reader = await api.register_session("r", subscribe=[NS])
        for i in range(2000):
            if i == 30:  # after two compactions: the next one has an old snapshot to drop
                _arm(point, api)
            m = await writer.capture(NS, f"fact {i} {pad}")
            print("acked", m.id, flush=True)
            if i % 7 == 3:
                batch = await reader.sync(limit=1000)
                ids = " ".join(e.memory_id for e in batch.events)
                print("synced", batch.cursor, ids, flush=True)
    print("not killed", flush=True)
    sys.exit(3)


FIRST_OPEN_POINTS = (
    "locked",  # data dir and lock file made, nothing else
    "store-created",  # store.sqlite3 exists, empty (0 bytes)
    "schema-before-commit",  # tables created in a transaction not committed
    "before-load",  # schema committed, updates.log created (empty), node id not stored
    "opened",  # the storage's open finished (node id stored), the node not yet open
    "first-drain",  # first capture in the log, its drain into SQLite not committed
)


async def _child_first_open(point: str, data_dir: str) -> None:
    """Open a new data directory and die part way (see FIRST_OPEN_POINTS)."""
    if point == "locked":
        _after("_lock_dir")
    elif point == "store-created":
        real_connect = sqlite_mod.sqlite3.connect

        def connect(*a: Any, **k: Any) -> Any:
            _die()
            return real_connect(*a, **k)

        sqlite_mod.sqlite3.connect = connect  # type: ignore[assignment]
    elif point == "schema-before-commit":
        real_schema = SqliteStorage._create_schema

        def schema(self: SqliteStorage) -> None:
            def trace(sql: str) -> None:
                if sql.lstrip().upper().startswith("INSERT INTO META"):
                    _die()

            self._db.set_trace_callback(trace)
            real_schema(self)

        SqliteStorage._create_schema = schema  # type: ignore[method-assign]
    elif point == "before-load":
        _before("_load")
    elif point == "opened":
        _after("_open_sync")
    elif point != "first-drain":
        raise SystemExit(f"unknown point {point}")
    api = ConversationsApi(data_dir=data_dir, listen=False, discovery=())
    print("node", api.node_id, flush=True)
    async with api:
        if point == "first-drain":
            _die_at_commit(api._storage, lambda: True)  # type: ignore[arg-type]
            s = await api.register_session("w", subscribe=[NS])
            m = await s.capture(NS, "the first memory")
            print("acked", m.id, flush=True)
            await api._storage.flush()  # type: ignore[attr-defined]
    print("not killed", flush=True)
    sys.exit(3)


async def _child_hold(data_dir: str, in_schema: bool) -> None:
    """Open (printing ``ready``, or ``locked MESSAGE``) and hold the directory until stdin
    closes. ``in_schema``: stop inside the very first open, while the schema is created
    (print ``in-schema``), and wait there."""
    if in_schema:
        real_schema = SqliteStorage._create_schema

        def schema(self: SqliteStorage) -> None:
            print("in-schema", flush=True)
            sys.stdin.read()
            real_schema(self)

        SqliteStorage._create_schema = schema  # type: ignore[method-assign]
    try:
        async with ConversationsApi(data_dir=data_dir, listen=False, discovery=()) as api:
            s = await api.register_session("h", subscribe=[NS])
            m = await s.capture(NS, f"held by {os.getpid()}")
            print("ready", m.id, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    except StorageLocked as exc:
        print("locked", exc, flush=True)


async def _child_fsync_unsynced(data_dir: str) -> None:
    """``durability="fsync"``: commit frame 1 (acknowledged: synced), print the log size;
    then die inside the fsync of frame 2 (written, never synced, never acknowledged)."""
    s = SqliteStorage(data_dir, durability="fsync")
    await s.open("child")
    await s.commit([(NS, b"synced")], [_rec(1)])
    print("synced", os.path.getsize(os.path.join(data_dir, LOG_NAME)), flush=True)
    log_fd = s._log_fd
    for name in ("fdatasync", "fsync"):
        real = getattr(os, name)

        def sync(fd: int, real: Any = real) -> None:
            if fd == log_fd:
                _die()
            real(fd)

        setattr(os, name, sync)
    await s.commit([(NS, b"never synced")], [_rec(2)])
    print("not killed", flush=True)
    sys.exit(3)


def _embedded_frame() -> bytes:
    """Bytes that look like a complete log frame (magic, length, CRC, non-empty body)."""
    body = b"\x91\x01"
    return sqlite_mod._encode_frame(body) + body


async def _child_torn_large(data_dir: str) -> None:
    """Commit two small frames, then a frame over ``KEEP_GIL_UP_TO`` (written with
    ``os.write`` in a loop) whose update bytes hold something that looks like a log frame;
    die after the first half of it reached the file: a write torn by kill -9."""
    s = SqliteStorage(data_dir)
    await s.open("child")
    for i in (1, 2):
        await s.commit([(NS, b"small %d" % i)], [_rec(i)])
        print("acked", i, flush=True)
    real_write = os.write

    def half(fd: int, data: Any) -> int:
        if fd == s._log_fd and len(data) > 1000:
            real_write(fd, bytes(data[: len(data) // 2]))
            _die()
        return real_write(fd, data)

    os.write = half
    big = b"x" * 1000 + _embedded_frame() + b"y" * (KEEP_GIL_UP_TO + 1000)
    await s.commit([(NS, big)], [_rec(3)])
    print("not killed", flush=True)
    sys.exit(3)


def _rec(cursor: int, session: str = "s") -> JournalRecord:
    return JournalRecord(cursor, int(time.time() * 1000), NS, "captured", f"w{cursor}", session)


def _child_main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "writes":
        asyncio.run(_child_writes(args[0], args[1], args[2]))
    elif mode == "first-open":
        asyncio.run(_child_first_open(args[0], args[1]))
    elif mode == "hold":
        asyncio.run(_child_hold(args[0], in_schema=False))
    elif mode == "hold-in-schema":
        asyncio.run(_child_hold(args[0], in_schema=True))
    elif mode == "fsync-unsynced":
        asyncio.run(_child_fsync_unsynced(args[0]))
    elif mode == "torn-large":
        asyncio.run(_child_torn_large(args[0]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    _child_main()


# -- the tests -------------------------------------------------------------------------------

import pytest  # noqa: E402  (the child above needs no test dependencies)


@dataclass
class Run:
    """What a child printed before it died."""

    rc: int
    lines: list[str]
    stderr: str
    acked: list[str] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    cursors: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for line in self.lines:
            word, *rest = line.split()
            if word == "acked":
                self.acked.append(rest[0])
            elif word == "synced":
                self.cursors.append(int(rest[0]))
                self.delivered.extend(rest[1:])


def run_child(*args: str) -> Run:
    """Run the child to its end (it kills itself at the chosen point)."""
    out = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    lines = out.stdout.split("\n")[:-1]  # a last line without its newline is not whole
    return Run(out.returncode, lines, out.stderr)


def killed(run: Run) -> None:
    assert run.rc == -signal.SIGKILL, f"the child was not killed at its point:\n{run.stderr}"


def snapshot_files(data: Path) -> list[str]:
    snaps = data / SNAP_DIR
    return sorted(p.name for p in snaps.iterdir()) if snaps.is_dir() else []


def durable(path: Path, **kw: Any) -> ConversationsApi:
    return ConversationsApi(data_dir=path, listen=False, discovery=(), **kw)


async def in_flight(api: ConversationsApi, reader: Any, run: Run) -> list[str]:
    """Events of a sync that returned (its cursor was stored) while the kill came from the
    storage thread before the child printed them: delivered, though the parent never
    read so. They lie between the last printed cursor and the stored one."""
    printed = max(run.cursors, default=0)
    stored = api._saved_cursors.get("r", 0)
    if stored <= printed:
        return []
    batch = await reader.sync(since=printed, limit=100_000)
    return [e.memory_id for e in batch.events if e.cursor <= stored]


async def check_after_crash(data: Path, run: Run, **kw: Any) -> None:
    """Every acknowledged capture is there; the reader gets exactly the events it had not
    received (no repeat, none missing); new cursors follow every cursor handed out;
    the directory holds one snapshot (the referenced one); the node keeps working."""
    async with durable(data, **kw) as api:
        ids = {m.id for m in api.memories(NS)}
        missing = [mid for mid in run.acked if mid not in ids]
        assert not missing, f"{len(missing)} acknowledged captures lost"
        reader = await api.register_session("r", subscribe=[NS])
        writer = await api.register_session("w", subscribe=[NS])
        delivered = run.delivered + await in_flight(api, reader, run)
        batch = await reader.sync(limit=100_000)
        again = [e.memory_id for e in batch.events]
        assert not set(again) & set(delivered), "events delivered twice across a crash"
        assert set(run.acked) <= set(again) | set(delivered), "events never delivered"
        assert batch.complete
        new = await writer.capture(NS, "written after the crash")
        own = await writer.sync(since=0, include_own=True, limit=100_000)
        cursors = [e.cursor for e in own.events]
        assert cursors == sorted(set(cursors))
        assert own.events[-1].memory_id == new.id
        assert own.events[-1].cursor > max([*run.cursors, 0]), "a cursor was reused"
        state = api.state_hash(NS)
        snaps = snapshot_files(data)
        assert len(snaps) <= 1, f"stray snapshots after the open: {snaps}"
        if snaps:
            size = (data / SNAP_DIR / snaps[0]).stat().st_size
            assert size <= 1.5 * len(api._docs[NS].diff()) + 64
    async with durable(data, **kw) as api:
        assert api.state_hash(NS) == state
        assert api.get(new.id).content == "written after the crash"


@pytest.mark.parametrize("point", COMPACTION_POINTS)
async def test_kill_during_a_background_compaction_loses_nothing(
    tmp_path: Path, point: str
) -> None:
    """kill -9 at each step of a background compaction (snapshot written / covered rows
    deleted but not committed / committed with the old snapshot still there / before the
    log's live updates move into SQLite / before the log is emptied / before pages are
    reclaimed): the next open keeps every acknowledged capture and drops the stray file."""
    data = tmp_path / "node"
    run = run_child("writes", point, str(data), "process")
    killed(run)
    # armed before the 31st capture; the kill (from the storage thread) can come before
    # that capture's line is printed
    assert len(run.acked) >= 30 and run.cursors
    await check_after_crash(data, run)


@pytest.mark.parametrize("point", DRAIN_POINTS)
async def test_kill_while_the_storage_thread_drains_the_log(tmp_path: Path, point: str) -> None:
    """kill -9 inside a drain of the log into SQLite (before its COMMIT, after it, and in
    one that prunes the journal): the next open re-applies what SQLite lacks, once."""
    data = tmp_path / "node"
    run = run_child("writes", point, str(data), "process")
    killed(run)
    assert run.acked
    if point.startswith("prune"):
        # Retention dropped events the reader had not read: its sync is incomplete, but
        # what the journal kept is exactly what it had not received.
        kw: dict[str, Any] = {"retention": Retention(max_events=PRUNE_MAX_EVENTS)}
        async with durable(data, **kw) as api:
            assert {m.id for m in api.memories(NS)} >= set(run.acked)
            reader = await api.register_session("r", subscribe=[NS])
            delivered = run.delivered + await in_flight(api, reader, run)
            batch = await reader.sync(limit=100_000)
            again = [e.memory_id for e in batch.events]
            assert not set(again) & set(delivered)
            assert run.acked[-1] in again + delivered
        return
    await check_after_crash(data, run)


async def test_kill_during_a_compaction_with_fsync_durability(tmp_path: Path) -> None:
    """The same window with ``durability="fsync"`` (the snapshot and the directory are
    synced before SQLite points at the snapshot)."""
    data = tmp_path / "node"
    run = run_child("writes", "compaction-before-commit", str(data), "fsync")
    killed(run)
    await check_after_crash(data, run, durability="fsync")


@pytest.mark.parametrize("point", FIRST_OPEN_POINTS)
async def test_kill_during_the_very_first_open(tmp_path: Path, point: str) -> None:
    """kill -9 while a new data directory is being set up: the next open neither refuses
    it as damaged nor loses a write acknowledged before the crash."""
    data = tmp_path / "a" / "b" / "node"
    run = run_child("first-open", point, str(data))
    killed(run)
    assert data.is_dir()
    child_node = next(line.split()[1] for line in run.lines if line.startswith("node"))
    async with durable(data) as api:
        if point in ("opened", "first-drain"):
            assert api.node_id == child_node  # stored before the crash: kept
        before = api.memories(NS)
        assert set(run.acked) <= {m.id for m in before}
        # The kill comes from the storage thread: the capture may have returned (and be
        # kept) without the child getting to print it. Nothing else may be there.
        assert all(m.content == "the first memory" for m in before), before
        s = await api.register_session("w", subscribe=[NS])
        m = await s.capture(NS, "after the crashed first open")
        node = api.node_id
    async with durable(data) as api:
        assert api.node_id == node
        assert {x.id for x in api.memories(NS)} == {*(x.id for x in before), m.id}


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(p: subprocess.Popen[str]) -> str:
    """Close its stdin (a holder then closes and exits), return the rest of its stdout."""
    out, _ = p.communicate(timeout=CHILD_TIMEOUT)
    return out


async def test_two_processes_opening_a_new_directory_at_once(tmp_path: Path) -> None:
    """Two processes open the same (not yet existing) directory at the same moment:
    exactly one gets it, the other gets StorageLocked naming it, and the winner's write
    is kept."""
    data = tmp_path / "node"
    procs = [_popen("hold", str(data)) for _ in range(2)]
    try:
        assert all(p.stdout is not None for p in procs)
        first = [p.stdout.readline().split() for p in procs]  # type: ignore[union-attr]
        words = sorted(f[0] for f in first if f)
        assert words == ["locked", "ready"], first
        winner = next(f for f in first if f[0] == "ready")
        loser = next(f for f in first if f[0] == "locked")
        assert str(data) in " ".join(loser)
    finally:
        for p in procs:
            _finish(p)
    assert [p.returncode for p in procs] == [0, 0]
    async with durable(data) as api:
        assert [m.id for m in api.memories(NS)] == [winner[1]]


async def test_second_opener_during_a_first_open_then_the_first_is_killed(
    tmp_path: Path,
) -> None:
    """A second process arrives while the first is still creating the schema of a new
    directory: it is refused (the lock comes before any file), and once the first dies
    (kill -9 in mid-creation) the directory opens normally."""
    data = tmp_path / "node"
    first = _popen("hold-in-schema", str(data))
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "in-schema"
        second = _popen("hold", str(data))
        out = _finish(second)
        assert out.startswith("locked") and str(data) in out, out
        assert f"pid {first.pid}" in out
    finally:
        first.kill()
        first.communicate(timeout=CHILD_TIMEOUT)
    assert first.returncode == -signal.SIGKILL
    async with durable(data) as api:
        assert api.memories(NS) == []
        s = await api.register_session("s", subscribe=[NS])
        m = await s.capture(NS, "after the first opener died")
    async with durable(data) as api:
        assert [x.id for x in api.memories(NS)] == [m.id]


async def test_fsync_restart_syncs_the_log_before_applying_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``durability="fsync"`` promises that an acknowledged write survives a power loss.
    A node killed during an fsync leaves a frame in the page cache only; the next open
    applies it to SQLite (synchronous=FULL: durable at once). Unless the open syncs the log
    first, a power loss then leaves SQLite ahead of the log, and every later open refuses
    the directory ("the log lost updates"; found in review: the open did not sync). The
    log must be synced before that frame is applied."""
    data = tmp_path / "node"
    run = run_child("fsync-unsynced", str(data))
    killed(run)
    synced_size = int(next(line.split()[1] for line in run.lines if line.startswith("synced")))
    log = data / LOG_NAME
    assert log.stat().st_size > synced_size  # a frame the kill left unsynced
    order: list[str] = []
    real_fsync, real_apply = os.fsync, SqliteStorage._apply

    def fsync(fd: int) -> None:
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(log.resolve()):
            order.append("log synced")
        real_fsync(fd)

    def apply(self: SqliteStorage, frames: Any) -> Any:
        order.append("applied")
        return real_apply(self, frames)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(SqliteStorage, "_apply", apply)
    async with SqliteStorage(data, durability="fsync") as s:
        state = await s.open("parent")
    assert order[:2] == ["log synced", "applied"], order
    assert state.docs[NS][:1] == [b"synced"]


async def test_a_torn_large_frame_holding_frame_like_bytes_is_a_torn_tail(
    tmp_path: Path,
) -> None:
    """A frame over ``KEEP_GIL_UP_TO`` is written with ``os.write`` in a loop; kill -9 between two
    writes leaves half of it. If the half written holds bytes that look like a complete
    frame (update bytes are arbitrary: a peer's content), the open must still see a torn
    tail (drop it, keep the acknowledged frames), not refuse the log as damaged."""
    data = tmp_path / "node"
    run = run_child("torn-large", str(data))
    killed(run)
    assert [line for line in run.lines if line.startswith("acked")] == ["acked 1", "acked 2"]
    async with SqliteStorage(data) as s:
        state = await s.open("parent")
    assert state.docs[NS] == [b"small 1", b"small 2"]
    assert state.last_cursor == 2


# -- in-process windows ----------------------------------------------------------------------


async def test_sync_whose_cursor_cannot_be_saved_does_not_skip_its_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sync(since="last")`` whose cursor frame cannot be written (a full disk) raises,
    so the caller never saw its events: the next ``sync()`` must return them, not move
    on past them."""
    real = sqlite_mod.write_all
    fail = {"n": 0}

    def write_all(fd: int, data: bytes) -> None:
        if fail["n"]:
            fail["n"] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(sqlite_mod, "write_all", write_all)
    async with durable(tmp_path) as api:
        reader = await api.register_session("r", subscribe=[NS])
        writer = await api.register_session("w", subscribe=[NS])
        m = await writer.capture(NS, "an event the reader must get")
        fail["n"] = 1  # the next log write (the reader's cursor frame) hits a full disk
        with pytest.raises(StorageError):
            await reader.sync()
        assert fail["n"] == 0
        batch = await reader.sync()
        assert [e.memory_id for e in batch.events] == [m.id]


async def test_retention_pruning_between_two_pages_of_a_sync_is_reported(
    tmp_path: Path,
) -> None:
    """A sync reads the journal in pages (own records are skipped, so it may need more than
    one). If retention drops records between two pages (other sessions write meanwhile),
    the sync skipped them: it must say ``complete=False`` (or return them), never report a
    complete batch that silently lost an event."""
    async with durable(tmp_path, retention=Retention(max_events=4, max_age=None)) as api:
        reader = await api.register_session("r", subscribe=[NS])
        writer = await api.register_session("w", subscribe=[NS])
        for i in range(2):
            await reader.capture(NS, f"reader's own {i}")  # cursors 1, 2: skipped
        missed = await writer.capture(NS, "the writer's event")  # cursor 3
        storage = api._storage
        real_read = storage.read_journal
        pages = {"n": 0}

        async def read_journal(*a: Any, **k: Any) -> Any:
            pages["n"] += 1
            if pages["n"] == 2:  # between the first and second page: others write
                for i in range(5):
                    await writer.capture(NS, f"later {i}")
            return await real_read(*a, **k)

        storage.read_journal = read_journal  # type: ignore[method-assign]
        batch = await reader.sync(limit=1)
        storage.read_journal = real_read  # type: ignore[method-assign]
        assert pages["n"] >= 2, "the sync read one page only: the window was not hit"
        got = [e.memory_id for e in batch.events]
        assert missed.id in got or not batch.complete, (
            f"events {got} complete={batch.complete}: the writer's event was lost"
        )


def test_the_child_helpers_are_consistent() -> None:
    """The frame-like bytes the torn-frame child embeds are a valid frame (else that test
    would pass for the wrong reason)."""
    raw = _embedded_frame()
    magic, length, crc = sqlite_mod._FRAME_HEADER.unpack_from(raw, 0)
    body = raw[sqlite_mod._FRAME_HEADER.size :]
    assert magic == b"SCL1" and length == len(body) > 0 and zlib.crc32(body) == crc
    # alone it is a frame, but it does not decode as one: never taken for valid frames
    assert not sqlite_mod._valid_frame_after(b"junk" + raw, 0, range(1, 3))


@pytest.mark.parametrize("inner_lsn", [1000, 10**9])
async def test_a_torn_frame_holding_copies_of_frames_is_a_torn_tail(
    tmp_path: Path, inner_lsn: int
) -> None:
    """A torn last frame whose data (a peer's update may hold anything) holds a copy of
    a valid frame and then what looks like a frame torn later: the open drops the torn
    tail, not refuses the directory (found in review). Only frames that continue this
    log's numbering count as frames after damage, and a peer cannot know it."""
    async with SqliteStorage(tmp_path) as s:
        await s.open("n")
        for i in range(1, 4):
            await s.commit([(NS, b"u%d" % i)], [])
    inner = msgpack.packb((inner_lsn, [], [], []))
    crafted = sqlite_mod._encode_frame(inner) + inner
    crafted += sqlite_mod._FRAME_HEADER.pack(sqlite_mod._FRAME_MAGIC, 10**6, 0)
    payload = b"x" * 50 + crafted + b"y" * 50
    with open(tmp_path / LOG_NAME, "ab") as f:  # a large frame cut short by a crash
        f.write(sqlite_mod._FRAME_HEADER.pack(sqlite_mod._FRAME_MAGIC, 5000, 0) + payload)
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
    assert state.docs[NS] == [b"u1", b"u2", b"u3"]
