"""Durable node benchmark: captures/s with kill -9 durability (one awaited at a time, and
batched), restart time with 100k memories, bytes on disk per memory after compaction.

    .venv/bin/python benchmarks/bench_storage.py [--memories 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import corpus
from subcog_crdt import ConversationsApi


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


async def bench(n_mem: int, durability: str) -> dict[str, float]:
    texts = corpus(n_mem)
    out: dict[str, float] = {"memories": n_mem}
    root = tempfile.mkdtemp(prefix="subcog-bench-")
    try:
        single_dir, batch_dir = f"{root}/single", f"{root}/batched"
        async with ConversationsApi(
            data_dir=single_dir,
            listen=False,
            durability=durability,  # type: ignore[arg-type]
        ) as api:
            s = await api.register_session("bench", subscribe=[])
            n1 = min(20_000, n_mem)
            t = time.perf_counter()
            for text in texts[:n1]:
                await s.capture("single", text)
            out["captures_per_s_single"] = n1 / (time.perf_counter() - t)
        async with ConversationsApi(
            data_dir=batch_dir,
            listen=False,
            durability=durability,  # type: ignore[arg-type]
        ) as api:
            s = await api.register_session("bench", subscribe=[])
            t = time.perf_counter()
            for i in range(0, n_mem, 256):
                await s.capture_many("batched", texts[i : i + 256])
            out["captures_per_s_batched"] = n_mem / (time.perf_counter() - t)
            # Compaction runs in the background (when the loop is idle); do it now, timed
            # apart, so the disk figure is the compacted one.
            t = time.perf_counter()
            await api._compact(api._docs["batched"])
            out["compaction_s"] = time.perf_counter() - t
        out["disk_bytes_per_memory"] = disk_bytes(batch_dir) / n_mem
        t = time.perf_counter()
        async with ConversationsApi(data_dir=batch_dir, listen=False) as api:
            out["restart_s"] = time.perf_counter() - t
            assert len(api._docs["batched"]._mems) == n_mem
            t = time.perf_counter()
            while api._docs["batched"].background_work:
                await asyncio.sleep(0.01)  # the node indexes in the background
            out["background_index_s"] = time.perf_counter() - t
            t = time.perf_counter()
            api.recall("w10k w200s", limit=10)
            out["first_recall_after_restart_s"] = time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--memories", type=int, default=100_000)
    ap.add_argument("--durability", choices=["process", "fsync"], default="process")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    r = asyncio.run(bench(ns.memories, ns.durability))
    if ns.json:
        print(json.dumps(r))
        return
    print(f"durability={ns.durability}, {r['memories']:.0f} memories")
    print(f"captures/s, one awaited at a time: {r['captures_per_s_single']:9.0f} (target >= 20000)")
    print(
        f"captures/s, batched (256)        : {r['captures_per_s_batched']:9.0f} (target >= 100000)"
    )
    print(f"compaction after the batched load: {r['compaction_s']:9.2f} s (in the background)")
    print(f"restart                          : {r['restart_s']:9.2f} s (target <= 1.0 s)")
    print(f"disk after compaction            : {r['disk_bytes_per_memory']:9.0f} B/memory (<= 600)")
    print(f"background resolve+index         : {r['background_index_s']:9.2f} s after restart")
    print(f"first recall after that          : {r['first_recall_after_restart_s'] * 1000:9.2f} ms")


if __name__ == "__main__":
    main()
