"""Child process for the storage crash tests (run as ``python _child.py MODE DIR ...``).

* ``hold DIR``: open the storage, print ``ready``, then wait until stdin closes.
* ``commit DIR DURABILITY``: commit one update + one journal record at a time, forever;
  after each ``commit()`` returned print its seq. Every 97 commits, compact with a fake
  snapshot ``SNAP:<upto>`` (the storage does not look inside).
* ``paused DIR N``: commit N updates without letting the storage thread apply them to
  SQLite (a test-only switch), print ``done``, then SIGKILL itself: the log then holds
  frames that SQLite does not know about.
* ``fsize DIR``: like ``paused``, but the middle commits run against a file-size limit
  (``RLIMIT_FSIZE``) that cuts a log frame in half and then refuses writes: a full disk.
  Prints ``failed LABEL`` for each refused commit, ``acked LABEL...`` at the end, then
  SIGKILLs itself.
* ``applyfail DIR``: a commit waits in the log (its drain held back) when a read has to
  apply it to SQLite against a full disk (``RLIMIT_FSIZE`` just above the WAL's size); the
  disk gets room again, more commits follow, and a compaction of another namespace retires
  the log into SQLite and empties it. Prints ``read failed ...``, ``failure ...`` (the
  storage's failed state afterwards), ``read LABEL...``, ``acked LABEL...``, then
  SIGKILLs itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from subcog_crdt._storage.base import JournalRecord
from subcog_crdt._storage.sqlite import SqliteStorage

NS = "ns"


def payload(seq: int) -> bytes:
    return b"U:%d:" % seq + b"x" * 300


async def main() -> None:
    mode, data_dir = sys.argv[1], sys.argv[2]
    if mode == "hold":
        async with SqliteStorage(data_dir) as s:
            await s.open("child")
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        return
    if mode == "commit":
        s = SqliteStorage(data_dir, durability=sys.argv[3])  # type: ignore[arg-type]
        state = await s.open("child")
        cursor = state.last_cursor
        print("ready", flush=True)
        while True:
            seq = s.tail_seq(NS) + 1
            cursor += 1
            rec = JournalRecord(cursor, int(time.time() * 1000), NS, "captured", f"w{seq}", "s")
            await s.commit([(NS, payload(seq))], [rec])
            print(seq, flush=True)
            if seq % 97 == 0:
                await s.compact(NS, b"SNAP:%d" % seq, seq)
    if mode == "paused":
        s = SqliteStorage(data_dir)
        await s.open("child")
        s._drain_scheduled = True  # test-only: no drain job gets scheduled
        for i in range(int(sys.argv[3])):
            rec = JournalRecord(i + 1, int(time.time() * 1000), NS, "captured", f"w{i}", "s")
            await s.commit([(NS, payload(i + 1))], [rec])
        print("done", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "fsize":
        await full_disk(data_dir)
    if mode == "applyfail":
        await apply_fails(data_dir)


async def full_disk(data_dir: str) -> None:
    import resource

    from subcog_crdt._errors import StorageError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of dying
    s = SqliteStorage(data_dir)
    await s.open("child")
    s._drain_scheduled = True  # test-only: SQLite stays out of it, only the log is written
    acked: list[int] = []

    async def one(label: int) -> None:
        rec = JournalRecord(label, int(time.time() * 1000), NS, "captured", f"w{label}", "s")
        await s.commit([(NS, payload(label))], [rec])
        acked.append(label)

    for label in range(1, 6):
        await one(label)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Room for half a frame: the next write is cut short, the one after refused.
    resource.setrlimit(resource.RLIMIT_FSIZE, (s._log_size + 150, hard))
    for label in range(6, 9):
        try:
            await one(label)
        except StorageError as exc:
            print("failed", label, exc, flush=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    for label in range(9, 13):
        await one(label)
    print("acked", *acked, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


async def apply_fails(data_dir: str) -> None:
    import resource

    from subcog_crdt._errors import StorageError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of dying
    s = SqliteStorage(data_dir)
    await s.open("child")
    acked: list[int] = []

    async def one(label: int, ns: str = NS) -> None:
        rec = JournalRecord(label, int(time.time() * 1000), ns, "captured", f"w{label}", "s")
        await s.commit([(ns, payload(label))], [rec])
        acked.append(label)

    for label in range(1, 4):
        await one(label)
    await s.flush()
    s._drain_scheduled = True  # test-only: the next frame waits for a read to apply it
    await one(4)
    wal = os.path.getsize(os.path.join(data_dir, "store.sqlite3-wal"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (wal + 64, hard))  # no room for a WAL page
    try:
        await s.read_journal(0, 100)
        print("read succeeded", flush=True)
    except StorageError as exc:
        print("read failed", exc, flush=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
    s._drain_scheduled = False
    print("failure", s._failure, flush=True)
    await one(5)
    print("read", *[r.cursor for r in await s.read_journal(0, 100)], flush=True)
    await one(6, "other")
    await s.compact("other", b"SNAP:other", 1)  # retires the log into SQLite, empties it
    await one(7)
    print("acked", *acked, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(main())
