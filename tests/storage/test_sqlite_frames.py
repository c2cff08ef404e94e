"""Log frames on their way to SQLite: what they hold while they wait for the drain, and
the journal rows their apply writes (in chunks, one multi-row INSERT each)."""

from __future__ import annotations

import gc
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from subcog_crdt._storage.base import JournalRecord
from subcog_crdt._storage.sqlite import _JOURNAL_CHUNK, STORE_NAME, SqliteStorage

NS = "ns"


NOW_MS = int(time.time() * 1000)  # within the default retention


def record(cursor: int) -> JournalRecord:
    # Every third one a conflict (its ``other`` set); the rest store NULL there.
    other = f"lost{cursor}" if cursor % 3 == 0 else ""
    return JournalRecord(cursor, NOW_MS + cursor, NS, "captured", f"w{cursor}", "s", other)


def journal_rows(d: Path) -> tuple[list[tuple[object, ...]], int]:
    conn = sqlite3.connect(d / STORE_NAME)
    try:
        rows = conn.execute(
            "SELECT cursor, at_ms, ns, kind, write_id, session, other FROM journal ORDER BY cursor"
        ).fetchall()
        last = conn.execute("SELECT value FROM meta WHERE key='last_cursor'").fetchone()[0]
    finally:
        conn.close()
    return rows, int(last)


@pytest.mark.parametrize(
    "sizes",
    [
        [1],
        [_JOURNAL_CHUNK - 1],
        [_JOURNAL_CHUNK],
        [_JOURNAL_CHUNK + 1],
        [3 * _JOURNAL_CHUNK + 5],
        [1, _JOURNAL_CHUNK, 2, _JOURNAL_CHUNK - 1, 0, 7],  # frames that straddle chunks
    ],
)
async def test_every_record_of_the_applied_frames_is_one_journal_row(
    tmp_path: Path, sizes: list[int]
) -> None:
    """The apply writes its frames' records in chunks of ``_JOURNAL_CHUNK`` rows; none
    may be lost or doubled at a chunk's edge, an empty ``other`` is NULL, and the stored
    last cursor is the largest (records of a frame need not come in cursor order)."""
    async with SqliteStorage(tmp_path) as s:
        await s.open("node")
        cursor = 0
        for n in sizes:
            recs = [record(c) for c in range(cursor + 1, cursor + n + 1)]
            cursor += n
            recs.reverse()  # the largest cursor first in its frame
            await s.commit([(NS, b"u")], recs)
        await s.flush()
        rows, last = journal_rows(tmp_path)
    expected = [(*r[:6], r.other or None) for r in map(record, range(1, cursor + 1))]
    assert rows == expected
    assert last == cursor


async def test_frames_waiting_for_the_drain_hold_nothing_the_cyclic_gc_walks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames wait in memory for the storage thread (a bulk load keeps hundreds). Lists,
    or tuples the collector cannot untrack, would be walked by every collection meanwhile,
    and would count towards the next full one; plain tuples of str, int and bytes are
    untracked by the first collection that sees them."""
    gate = threading.Event()
    real = SqliteStorage._wait_for_a_pause

    def held(self: SqliteStorage) -> None:
        gate.wait(10)
        real(self)

    monkeypatch.setattr(SqliteStorage, "_wait_for_a_pause", held)
    try:
        async with SqliteStorage(tmp_path) as s:
            await s.open("node")
            for i in range(3):
                recs = [record(c) for c in range(10 * i + 1, 10 * i + 11)]
                await s.commit([(NS, b"update %d" % i)], recs)
            await s.save_cursor("s", 7)
            frames = list(s._pending)
            assert len(frames) == 4  # the drain is held: all of them wait
            # A tuple is untracked once its items are; a collection may see an outer tuple
            # before its items, so the second one finishes what the first began.
            gc.collect()
            gc.collect()
            held_parts = [
                part
                for f in frames
                for part in (f.updates, f.journal, f.cursors, *f.updates, *f.journal, *f.cursors)
            ]
            assert [p for p in held_parts if gc.is_tracked(p)] == []
            gate.set()
            await s.flush()
            rows, last = journal_rows(tmp_path)
            assert len(rows) == 30 and last == 30
    finally:
        gate.set()


@pytest.mark.parametrize("covered", [0, 100])
async def test_retired_updates_reach_sqlite_once_each_past_a_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, covered: int
) -> None:
    """Retiring the log moves its updates into SQLite in chunks of 256 rows, skipping
    those a compaction covers; after a reopen the updates are exactly the uncovered ones,
    in order (from SQLite: the retired log is empty)."""
    from subcog_crdt._storage import sqlite as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "_LOG_RETIRE_AT", 1)  # every drain retires
    updates = [b"u%d" % i for i in range(1, 601)]
    async with SqliteStorage(tmp_path) as s:
        await s.open("node")
        if covered:
            await s.commit([(NS, u) for u in updates[:covered]], [])
            await s.compact(NS, b"SNAP", covered)
            rest = updates[covered:]
        else:
            rest = updates
        await s.commit([(NS, u) for u in rest[:300]], [])
        await s.commit([(NS, u) for u in rest[300:]], [])
        await s.flush()
    monkeypatch.undo()
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("node")
    assert state.docs[NS] == ([b"SNAP"] if covered else []) + rest
