"""SqliteStorage beyond the conformance suite: locking, damage, crashes, fsync, lifecycle."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from subcog_crdt._errors import ClosedError, CorruptStorage, StorageLocked
from subcog_crdt._storage import sqlite as sqlite_mod
from subcog_crdt._storage.base import JournalRecord
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


@pytest.mark.parametrize("durability", ["process", "fsync"])
async def test_kill_9_loses_no_returned_commit(tmp_path: Path, durability: str) -> None:
    rounds = 10 if durability == "process" else 3
    rng = random.Random(1234)
    printed: list[int] = []
    for _ in range(rounds):
        lines: list[str] = []
        p = child("commit", str(tmp_path), durability)
        try:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
            stream = p.stdout
            reader = threading.Thread(target=lines.extend, args=(stream,), daemon=True)
            reader.start()
            time.sleep(rng.uniform(0.05, 0.4))  # the random kill moment, not a wait on anything
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            reader.join(timeout=10)
        finally:
            reap(p)
        printed.extend(int(x) for x in lines if x.strip())
        assert printed, "the child committed nothing"
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
