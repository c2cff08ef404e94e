"""The storage conformance suite, run against every implementation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from subcog_crdt._storage.base import Retention, Storage
from subcog_crdt._storage.conformance import CHECKS, StorageFactory, run_storage_conformance
from subcog_crdt._storage.memory import MemoryStorage
from subcog_crdt._storage.sqlite import SqliteStorage


def memory_factory() -> StorageFactory:
    last: list[MemoryStorage] = []

    def make(retention: Retention | None, reopen: bool) -> Storage:
        if reopen:
            return last[-1]
        last.append(MemoryStorage(retention))
        return last[-1]

    return make


def sqlite_factory(root: Path, durability: str = "process") -> StorageFactory:
    dirs: list[Path] = []

    def make(retention: Retention | None, reopen: bool) -> Storage:
        if not reopen:
            dirs.append(root / f"store{len(dirs)}")
        return SqliteStorage(dirs[-1], retention=retention, durability=durability)  # type: ignore[arg-type]

    return make


@pytest.fixture(params=["memory", "sqlite", "sqlite-fsync"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageFactory]:
    if request.param == "memory":
        yield memory_factory()
    elif request.param == "sqlite":
        yield sqlite_factory(tmp_path)
    else:
        yield sqlite_factory(tmp_path, "fsync")


@pytest.mark.parametrize("check", sorted(CHECKS))
async def test_check(make: StorageFactory, check: str) -> None:
    await CHECKS[check](make)


async def test_run_all_sqlite(tmp_path: Path) -> None:
    await run_storage_conformance(sqlite_factory(tmp_path))


async def test_run_all_memory() -> None:
    await run_storage_conformance(memory_factory())


async def test_memory_journal_read_is_right_whether_cursors_came_in_order_or_not() -> None:
    """MemoryStorage starts a read by bisection while commits come in cursor order (a
    writer skipping its own events paged from the journal's start, 14 s at 100k events),
    and scans when they did not."""
    from subcog_crdt._storage.base import JournalRecord

    def rec(c: int, session: str = "s") -> JournalRecord:
        return JournalRecord(c, 1_800_000_000_000 + c, "d", "captured", f"w{c}", session, "")

    ordered, shuffled = MemoryStorage(), MemoryStorage()
    for s in (ordered, shuffled):
        await s.open("n")
    for c in range(1, 301):
        await ordered.commit([], [rec(c, "own" if c < 290 else "other")])
    cursors = [*range(101, 201), *range(1, 101), *range(201, 301)]
    for c in cursors:
        await shuffled.commit([], [rec(c, "own" if c < 290 else "other")])
    assert ordered._in_order and not shuffled._in_order
    for s in (ordered, shuffled):
        got = await s.read_journal(250, 5)
        assert [r.cursor for r in got] == [251, 252, 253, 254, 255]
        got = await s.read_journal(0, 3, exclude_session="own")
        assert [r.cursor for r in got] == [290, 291, 292]
