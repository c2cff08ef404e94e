"""Raw throughput and size of :class:`SqliteStorage`, without the rest of the node.

Measures, in one process on a temporary directory:

* commits/s one at a time: ``await commit([one ~400 B update], [one JournalRecord])``
  in a loop (the time until the last commit returned, and until the storage thread has
  moved everything into SQLite as well);
* updates/s in batches of 256 updates (+ 256 journal records) per commit;
* the same two with ``durability="fsync"`` (one-at-a-time is then bounded by the disk's
  fsync latency; 64 concurrent committers show the group commit);
* ``open()`` time with ~100k tail updates (~40 MB) in the store;
* bytes on disk per memory after compaction: 100k memories written through a pycrdt
  document (one update per capture, as the node writes them), then one compaction with the
  document's full state, journal kept (100k rows).

Run ``python benchmarks/bench_storage_raw.py`` (``--quick`` for a smaller run, ``--json``
for machine-readable output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from subcog_crdt._storage.base import JournalRecord, Retention
from subcog_crdt._storage.sqlite import SqliteStorage

NS = "decisions"
SESSION = "claude-code-1"
NODE = "n-3f9a2b1c4d5e"


def _record(cursor: int, at_ms: int) -> JournalRecord:
    write_id = f"{cursor:020x}/{at_ms:013d}{cursor & 0xFFFFFF:06x}/{SESSION}/{NODE}"
    return JournalRecord(cursor, at_ms, NS, "captured", write_id, SESSION)


def _update(i: int) -> bytes:
    return (f"{i:012d}".encode() * 34)[:400]


def _dir_bytes(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = p.stat().st_size
    return out


async def one_at_a_time(root: Path, n: int, durability: str) -> dict[str, float]:
    d = root / f"one-{durability}"
    async with SqliteStorage(d, durability=durability) as s:  # type: ignore[arg-type]
        await s.open("bench")
        now = int(time.time() * 1000)
        # Inputs are built first: the loop measures the storage, not the bytes formatting.
        updates = [[(NS, _update(i))] for i in range(n)]
        records = [[_record(i + 1, now)] for i in range(n)]
        t0 = time.perf_counter()
        for i in range(n):
            await s.commit(updates[i], records[i])
        t1 = time.perf_counter()
        await s.flush()
        t2 = time.perf_counter()
    return {"commits_per_s": n / (t1 - t0), "commits_per_s_incl_sqlite": n / (t2 - t0)}


async def concurrent(root: Path, n: int, durability: str, workers: int) -> dict[str, float]:
    d = root / f"conc-{durability}"
    async with SqliteStorage(d, durability=durability) as s:  # type: ignore[arg-type]
        await s.open("bench")
        now = int(time.time() * 1000)
        per = n // workers

        async def worker(w: int) -> None:
            for i in range(per):
                c = w * per + i + 1
                await s.commit([(NS, _update(c))], [_record(c, now)])

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for w in range(workers):
                tg.create_task(worker(w))
        t1 = time.perf_counter()
    return {"commits_per_s": per * workers / (t1 - t0)}


async def batched(root: Path, n: int, batch: int, durability: str) -> dict[str, float]:
    d = root / f"batch-{durability}"
    async with SqliteStorage(d, durability=durability) as s:  # type: ignore[arg-type]
        await s.open("bench")
        now = int(time.time() * 1000)
        ups = [(NS, _update(i)) for i in range(n)]
        recs = [_record(i + 1, now) for i in range(n)]
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            await s.commit(ups[start : start + batch], recs[start : start + batch])
        t1 = time.perf_counter()
        await s.flush()
        t2 = time.perf_counter()
    return {"updates_per_s": n / (t1 - t0), "updates_per_s_incl_sqlite": n / (t2 - t0)}


async def open_time(root: Path, n: int) -> dict[str, float]:
    d = root / "open"
    async with SqliteStorage(d) as s:
        await s.open("bench")
        now = int(time.time() * 1000)
        for start in range(0, n, 256):
            stop = min(n, start + 256)
            await s.commit(
                [(NS, _update(i)) for i in range(start, stop)],
                [_record(i + 1, now) for i in range(start, stop)],
            )
    size = sum(_dir_bytes(d).values())
    times = []
    for _ in range(3):
        s2 = SqliteStorage(d)
        t0 = time.perf_counter()
        state = await s2.open("bench")
        times.append(time.perf_counter() - t0)
        assert len(state.docs[NS]) == n
        await s2.aclose()
    return {"updates": n, "store_mb": size / 1e6, "open_s": min(times), "open_s_max": max(times)}


async def compacted_size(root: Path, n: int) -> dict[str, Any]:
    import pycrdt  # only this measurement needs a real document

    d = root / "compact"
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    entries = doc.get("entries", type=pycrdt.Map)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    now = int(time.time() * 1000)
    filler = "Use SQLite WAL for the journal, batch fsyncs, keep snapshots small. "
    for i in range(n):
        with doc.transaction():
            entries[f"{i:020x}/{now:013d}{i & 0xFFFFFF:06x}/{SESSION}/{NODE}"] = {
                "content": f"memory {i}: " + filler * 3,
                "tags": ["storage", "perf"],
                "session": SESSION,
                "op": "capture",
            }
    async with SqliteStorage(d, retention=Retention(max_events=n)) as s:
        await s.open("bench")
        for start in range(0, n, 256):
            stop = min(n, start + 256)
            await s.commit(
                [(NS, u) for u in updates[start:stop]],
                [_record(i + 1, now) for i in range(start, stop)],
            )
        await s.flush()
        before = _dir_bytes(d)
        snapshot = doc.get_update()
        t0 = time.perf_counter()
        await s.compact(NS, snapshot, s.tail_seq(NS))
        compact_s = time.perf_counter() - t0
        after_open = _dir_bytes(d)
    after_close = _dir_bytes(d)
    s2 = SqliteStorage(d, retention=Retention(max_events=n))
    t0 = time.perf_counter()
    await s2.open("bench")
    open_s = time.perf_counter() - t0
    await s2.aclose()
    total = sum(after_close.values())
    snap = sum(v for k, v in after_close.items() if k.startswith("snapshots"))
    return {
        "memories": n,
        "tail_update_bytes": sum(len(u) for u in updates),
        "snapshot_bytes": len(snapshot),
        "snapshot_per_memory": len(snapshot) / n,
        "before_compaction_bytes": sum(before.values()),
        "after_compaction_bytes_open": sum(after_open.values()),
        "after_close_files": after_close,
        "bytes_per_memory_on_disk": total / n,
        "namespace_bytes_over_snapshot": snap / len(snapshot),
        "compact_s": compact_s,
        "open_after_compaction_s": open_s,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    n = 20_000 if args.quick else 100_000
    root = Path(tempfile.mkdtemp(prefix="subcog-bench-"))
    results: dict[str, Any] = {}
    try:
        results["one_at_a_time"] = await one_at_a_time(root, n, "process")
        results["batched_256"] = await batched(root, n, 256, "process")
        results["fsync_one_at_a_time"] = await one_at_a_time(root, min(n, 2000), "fsync")
        results["fsync_64_concurrent"] = await concurrent(root, min(n, 20_000), "fsync", 64)
        results["fsync_batched_256"] = await batched(root, n, 256, "fsync")
        results["open"] = await open_time(root, n)
        results["compaction"] = await compacted_size(root, n)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    one, bat = results["one_at_a_time"], results["batched_256"]
    print(f"cpu count {os.cpu_count()}; {n} ops per measurement")
    print(
        f"one at a time  : {one['commits_per_s']:>10,.0f} commits/s "
        f"({one['commits_per_s_incl_sqlite']:,.0f}/s incl. drain to SQLite)"
    )
    print(
        f"batched (256)  : {bat['updates_per_s']:>10,.0f} updates/s "
        f"({bat['updates_per_s_incl_sqlite']:,.0f}/s incl. drain to SQLite)"
    )
    f1, fc, fb = (
        results["fsync_one_at_a_time"],
        results["fsync_64_concurrent"],
        results["fsync_batched_256"],
    )
    print(f"fsync, 1 at a time   : {f1['commits_per_s']:>10,.0f} commits/s")
    print(f"fsync, 64 concurrent : {fc['commits_per_s']:>10,.0f} commits/s")
    print(f"fsync, batched (256) : {fb['updates_per_s']:>10,.0f} updates/s")
    o = results["open"]
    print(
        f"open           : {o['open_s'] * 1000:.0f} ms (max {o['open_s_max'] * 1000:.0f}) "
        f"for {o['updates']} tail updates, {o['store_mb']:.1f} MB"
    )
    c = results["compaction"]
    print(
        f"compaction     : snapshot {c['snapshot_per_memory']:.0f} B/memory; on disk "
        f"{c['bytes_per_memory_on_disk']:.0f} B/memory after compaction "
        f"(before: {c['before_compaction_bytes'] / c['memories']:.0f}); namespace files / "
        f"snapshot = {c['namespace_bytes_over_snapshot']:.2f}; compact() {c['compact_s']:.2f} s; "
        f"open() afterwards {c['open_after_compaction_s'] * 1000:.0f} ms"
    )
    print("files after close:", c["after_close_files"])


if __name__ == "__main__":
    asyncio.run(main())
