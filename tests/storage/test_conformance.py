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
