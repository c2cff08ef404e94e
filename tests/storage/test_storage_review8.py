"""Durable storage against what a user's machine does to it: a real full disk (a small
tmpfs), a read-only mount, the data directory or its lock file removed while a node
holds it, a holder killed while a process it forked lives on, a relative data_dir and a
change of working directory, retention exactly at its limits, cursors across restarts
with changed subscriptions, and many namespaces.

The tmpfs tests mount a file system and need root; they are skipped otherwise (but not in
CI, where they must run)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from subcog_crdt import (
    ConversationsApi,
    InvalidNamespace,
    Retention,
    StorageError,
    StorageLocked,
    SubcogError,
)
from subcog_crdt._storage import memory as memory_mod
from subcog_crdt._storage import sqlite as sqlite_mod
from subcog_crdt._storage.base import JournalRecord, Storage
from subcog_crdt._storage.memory import MemoryStorage
from subcog_crdt._storage.sqlite import LOCK_NAME, LOG_NAME, SNAP_DIR, SqliteStorage

NS = "d"
SRC = Path(__file__).resolve().parents[2] / "src"


def durable(path: Path | str, **kw: Any) -> ConversationsApi:
    return ConversationsApi(data_dir=path, listen=False, **kw)


def rec(cursor: int, at_ms: int | None = None, ns: str = NS) -> JournalRecord:
    at = int(time.time() * 1000) if at_ms is None else at_ms
    return JournalRecord(cursor, at, ns, "captured", f"w{cursor}", "s")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a file system that really runs out of space (ENOSPC)."""
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path, leave: int = 0) -> Path:
    """Fill ``fs`` up (then give ``leave`` bytes back); returns the filler file."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12):
            while True:
                try:
                    os.write(fd, bytes(chunk))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


# -- a full disk ------------------------------------------------------------------------


async def test_a_full_disk_fails_the_capture_clearly_and_the_node_goes_on(
    small_fs: Path,
) -> None:
    """On a real full disk a capture raises ``StorageError`` naming the log (it was not
    acknowledged); once there is room the same node captures again, ``sync`` returns
    exactly the acknowledged writes, and a restart has every one of them."""
    data = small_fs / "node"
    async with durable(data) as api:
        w = await api.register_session("w", subscribe=[NS])
        r = await api.register_session("r", subscribe=[NS])
        acked = [(await w.capture(NS, "first")).id]
        filler = fill(small_fs)
        with pytest.raises(StorageError) as info:
            await w.capture(NS, "refused " + "y" * 9000)  # needs new pages of the log
        assert isinstance(info.value, SubcogError)
        assert "No space left" in str(info.value) and LOG_NAME in str(info.value)
        filler.unlink()
        acked.append((await w.capture(NS, "after the disk had room again")).id)
        batch = await r.sync(since="last")
        assert batch.complete
        assert [e.memory_id for e in batch.events] == acked
    async with durable(data) as api:
        have = {m.id for m in api.memories(NS)}
        assert set(acked) <= have
        r = await api.register_session("r", subscribe=[NS])
        assert (await r.sync(since="last")).events == [], "its cursor survived"


async def test_a_compaction_refused_by_a_full_disk_leaves_no_partial_snapshot(
    small_fs: Path,
) -> None:
    """A compaction whose snapshot does not fit must remove what it wrote of it: left
    behind, the partial file keeps the disk full until the next open, and every commit
    fails meanwhile although the failed compaction freed nothing it needed."""
    data = small_fs / "node"
    s = SqliteStorage(data)
    filler = small_fs / "filler"
    try:
        await s.open("n")
        await s.commit([(NS, b"u1")], [rec(1)])
        await s.flush()
        fill(small_fs, leave=128 * 1024)
        with pytest.raises(StorageError, match="No space left"):
            await s.compact(NS, b"S" * 400_000, 1)
        left = sorted(p.name for p in (data / SNAP_DIR).iterdir())
        assert left == [], f"a partial snapshot was left behind: {left}"
        # The space the partial file took is free again: a commit fits.
        await s.commit([(NS, b"u2" + b"z" * 9000)], [rec(2)])
    finally:
        filler.unlink(missing_ok=True)  # (a close on a full disk cannot checkpoint)
        await s.aclose()
    async with SqliteStorage(data) as s:
        state = await s.open("n")
        assert state.docs[NS] == [b"u1", b"u2" + b"z" * 9000]


# -- read-only, removed, replaced --------------------------------------------------------


async def test_a_read_only_data_dir_is_refused_with_a_storage_error(small_fs: Path) -> None:
    """Opening a data_dir on a read-only mount raises ``StorageError`` (not a raw
    ``OSError``) naming the directory, changes nothing, and the data opens once the
    mount is writable again."""
    data = small_fs / "node"
    async with durable(data) as api:
        w = await api.register_session("w", subscribe=[NS])
        kept = await w.capture(NS, "kept")
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        with pytest.raises(StorageError) as info:
            async with durable(data):
                pass
        assert str(data) in str(info.value)
        assert "Read-only" in str(info.value)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before
    async with durable(data) as api:
        assert [m.id for m in api.memories(NS)] == [kept.id]


async def test_removing_the_lock_file_does_not_let_a_second_opener_in(tmp_path: Path) -> None:
    """The lock must hold while the node runs even if ``subcog.lock`` is removed (a user
    clearing a "stale" lock the error message named, a tmp cleaner that deletes files
    unmodified for days): a second node writing the same store and log makes it
    unopenable (seen: ``CorruptStorage: updates of namespace 'd' are missing``)."""
    async with durable(tmp_path) as api:
        w = await api.register_session("w", subscribe=[NS])
        await w.capture(NS, "one")
        (tmp_path / LOCK_NAME).unlink()
        second = durable(tmp_path)
        try:
            with pytest.raises(StorageLocked):
                await second.open()
        finally:
            await second.aclose()


async def test_captures_are_refused_once_the_data_dir_was_removed(tmp_path: Path) -> None:
    """``rm -rf`` of the data_dir while the node runs (or a restore that replaces it):
    the open log and store are deleted files, so a capture acknowledged now cannot
    survive a restart (the restart starts empty). The storage must notice and refuse
    writes with ``StorageError`` instead of acknowledging them into deleted files."""
    data = tmp_path / "node"
    async with durable(data) as api:
        w = await api.register_session("w", subscribe=[NS])
        await w.capture(NS, "before")
        shutil.rmtree(data)
        # The storage thread's next pass notices (flush() waits for one); from then on
        # every write is refused.
        await api._storage.flush()
        for text in ("after", "after again"):
            with pytest.raises(StorageError) as refused:
                await w.capture(NS, text)
            assert str(data) in str(refused.value)


# -- the lock and processes ------------------------------------------------------------

_FORKER = """
import asyncio, os, signal, sys
sys.path.insert(0, {src!r})
from subcog_crdt import ConversationsApi

async def main():
    api = ConversationsApi(data_dir={data!r}, listen=False)
    await api.open()
    if os.fork() == 0:  # a worker forked without exec (multiprocessing's default)
        signal.alarm(60)
        os.read(0, 1)
        os._exit(0)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


async def test_a_forked_child_does_not_keep_the_directory_locked_after_the_holder_dies(
    tmp_path: Path,
) -> None:
    """The holder forks a worker (no exec, so ``O_CLOEXEC`` does not apply) and is then
    killed with SIGKILL: the worker never opened the storage, so the directory must be
    free. It inherited the flock()ed descriptor, which keeps the lock, and the opener
    is told the directory is in use by the dead holder's pid."""
    data = tmp_path / "node"
    code = _FORKER.format(src=str(SRC), data=str(data))
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        async with durable(data) as api:
            assert api.node_id
        assert (data / LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the worker (same process group)
        except ProcessLookupError:
            pass
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        for stream in (p.stdin, p.stdout):
            if stream is not None:
                stream.close()


async def test_a_relative_data_dir_survives_a_change_of_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node opened with ``data_dir=".subcog"`` whose process later changes directory
    (into another project with its own ``.subcog``) must keep using its own directory:
    a compaction must not write its snapshot into the other one (overwriting that
    node's snapshot) and leave its own store pointing at a file that is not there."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    async with SqliteStorage(".subcog") as other:  # the other project's node
        await other.open("b")
        await other.commit([(NS, b"b1")], [rec(1)])
        await other.compact(NS, b"SNAP-B", 1)
    monkeypatch.chdir(tmp_path / "a")
    s = SqliteStorage(".subcog")
    try:
        await s.open("a")
        await s.commit([(NS, b"a1")], [rec(1)])
        monkeypatch.chdir(tmp_path / "b")
        await s.compact(NS, b"SNAP-A", 1)
    finally:
        await s.aclose()
    monkeypatch.chdir(tmp_path / "a")
    async with SqliteStorage(".subcog") as s:
        assert (await s.open("a")).docs[NS] == [b"SNAP-A"]
    monkeypatch.chdir(tmp_path / "b")
    async with SqliteStorage(".subcog") as other:
        assert (await other.open("b")).docs[NS] == [b"SNAP-B"]


# -- retention at its limits -----------------------------------------------------------


async def test_retention_by_count_exactly_at_the_limit(tmp_path: Path) -> None:
    """``max_events`` events are all kept and complete; one more drops the oldest:
    reading from the start is incomplete, reading from the batch's first kept cursor on
    is complete again; the same after a restart."""
    keep = Retention(max_events=5, max_age=None)
    async with durable(tmp_path, retention=keep) as api:
        w = await api.register_session("w", subscribe=[NS])
        r = await api.register_session("r", subscribe=[NS])
        ids = [(await w.capture(NS, f"fact {i}")).id for i in range(5)]
        full = await r.sync(since=0)
        assert full.complete and [e.memory_id for e in full.events] == ids
        ids.append((await w.capture(NS, "fact 5")).id)
        cut = await r.sync(since=0)
        assert not cut.complete
        assert [e.memory_id for e in cut.events] == ids[1:]
        resumed = await r.sync(since=cut.events[0].cursor - 1)
        assert resumed.complete and [e.memory_id for e in resumed.events] == ids[1:]
    async with durable(tmp_path, retention=keep) as api:
        r = await api.register_session("r", subscribe=[NS])
        again = await r.sync(since=0)
        assert not again.complete and [e.memory_id for e in again.events] == ids[1:]
        assert (await r.sync(since=again.events[0].cursor - 1)).complete


class _Clock:
    """A stand-in for the ``time`` module of a storage: wall time is fixed."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_retention_by_age_exactly_at_the_limit(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record exactly ``max_age`` old is kept, one a millisecond older is dropped, by
    both storages alike, and ``oldest_cursor``/``pruned_max_at_ms`` say so."""
    now = 1_700_000_000.0
    monkeypatch.setattr(sqlite_mod, "time", _Clock(now))
    monkeypatch.setattr(memory_mod, "time", _Clock(now))
    keep = Retention(max_events=1000, max_age=3600.0)
    limit = int((now - 3600.0) * 1000)
    s: Storage = (
        SqliteStorage(tmp_path, retention=keep) if kind == "sqlite" else MemoryStorage(keep)
    )
    await s.open("n")
    try:
        await s.commit([], [rec(1, limit - 1), rec(2, limit), rec(3, limit + 1)])
        got = await s.read_journal(0, 10)
        assert [r.cursor for r in got] == [2, 3]
        assert s.oldest_cursor() == 2
        assert s.pruned_max_at_ms() == limit - 1
    finally:
        await s.aclose()


# -- sessions and namespaces across restarts -------------------------------------------


async def test_sync_last_across_restarts_with_changed_subscriptions(tmp_path: Path) -> None:
    """A session's ``sync("last")`` cursor is kept per session id across restarts while
    its subscriptions change: each sync returns exactly the new events of its current
    subscriptions, once; another session's cursor is its own."""
    async with durable(tmp_path) as api:
        w = await api.register_session("w", subscribe=["a", "b"])
        r = await api.register_session("r", subscribe=["a"])
        other = await api.register_session("other", subscribe=["a", "b"])
        a1 = (await w.capture("a", "a1")).id
        await w.capture("b", "b1")
        assert [e.memory_id for e in (await r.sync()).events] == [a1]
    async with durable(tmp_path) as api:
        w = await api.register_session("w", subscribe=["a", "b"])
        r = await api.register_session("r", subscribe=["a", "b"])
        a2 = (await w.capture("a", "a2")).id
        b2 = (await w.capture("b", "b2")).id
        assert [e.memory_id for e in (await r.sync()).events] == [a2, b2]
        assert (await r.sync()).events == []
    async with durable(tmp_path) as api:
        w = await api.register_session("w", subscribe=["a", "b"])
        r = await api.register_session("r", subscribe=["b"])
        await w.capture("a", "a3")
        b3 = (await w.capture("b", "b3")).id
        assert [e.memory_id for e in (await r.sync()).events] == [b3]
        other = await api.register_session("other", subscribe=["a", "b"])
        got = (await other.sync()).events
        assert [e.memory.content for e in got] == ["a1", "b1", "a2", "b2", "a3", "b3"]  # type: ignore[attr-defined]


async def test_five_hundred_namespaces_reopen_and_odd_names_stay_apart(tmp_path: Path) -> None:
    """500 namespaces (and names that differ only in punctuation) reopen with each
    memory in its own namespace; names that look like paths or differ in case are
    refused before anything is stored."""
    names = [f"ns{i:03d}" for i in range(500)] + ["a.b", "a-b", "a_b", "a..b", "0"]
    ids: dict[str, str] = {}
    async with durable(tmp_path) as api:
        w = await api.register_session("w", subscribe=names[:10])
        for ns in names:
            ids[ns] = (await w.capture(ns, f"in {ns}")).id
        for bad in ("../x", "a/b", "D", "Ns000", "/abs", ".hidden"):
            with pytest.raises(InvalidNamespace):
                await w.capture(bad, "refused")
    async with durable(tmp_path) as api:
        assert {ns: [m.id for m in api.memories(ns)] for ns in names} == {
            ns: [ids[ns]] for ns in names
        }
        r = await api.register_session("r", subscribe=names)
        batch = await r.sync(since=0, limit=len(names) + 1)
        assert batch.complete
        assert {e.namespace: e.memory_id for e in batch.events} == ids
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [LOCK_NAME, LOG_NAME, "store.sqlite3"]
    )
