"""Catch-up benchmark: a node joins a peer (another process, loopback) that holds a large
namespace. Prints how long the catch-up takes (until the joiner holds every memory) and
the longest stall of the joining node's event loop meanwhile (a 5 ms ticker's worst
lateness), applied in pieces (the default) and, for comparison, whole
(``_peering._SLICE_BYTES`` raised past the update's size).

    .venv/bin/python benchmarks/bench_catchup.py [--memories 100000]

A stall longer than the peers' heartbeat timeout makes them drop the link; local writes
and other links wait for it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from subcog_crdt import ConversationsApi, _peering

_HOLDER = """
import asyncio, sys
sys.path.insert(0, {bench!r})
from bench_core import corpus
from subcog_crdt import ConversationsApi

async def main():
    texts = corpus({n})
    async with ConversationsApi(host="127.0.0.1", discovery=()) as api:
        s = await api.register_session("holder", subscribe=["big"])
        for i in range(0, len(texts), 1000):
            await s.capture_many("big", texts[i : i + 1000])
        api._docs["big"].flush_index()
        print(api.url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


async def _ticker(lateness: list[float], stop: asyncio.Event) -> None:
    period = 0.005
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(period)
        now = time.perf_counter()
        lateness.append(now - last - period)
        last = now


async def join(url: str, n_mem: int, data_dir: str) -> dict[str, float]:
    async with ConversationsApi(data_dir=data_dir, host="127.0.0.1", discovery=()) as api:
        await api.register_session("joiner", subscribe=["big"])
        lateness: list[float] = []
        stop = asyncio.Event()
        ticker = asyncio.create_task(_ticker(lateness, stop))
        t = time.perf_counter()
        await api.connect(url)
        deadline = t + 600
        while "big" not in api._docs or len(api._docs["big"]._mems) < n_mem:
            if time.perf_counter() > deadline:
                raise SystemExit("catch-up did not finish in 600 s")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t
        stop.set()
        await ticker
        lateness.sort()
        return {
            "catch_up_s": elapsed,
            "stall_max_ms": lateness[-1] * 1e3,
            "stall_p99_ms": lateness[int(len(lateness) * 0.99)] * 1e3,
        }


async def bench(n_mem: int) -> dict[str, dict[str, float]]:
    bench_dir = str(Path(__file__).resolve().parent)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(bench=bench_dir, n=n_mem)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        url = holder.stdout.readline().strip()
        if not url:
            raise SystemExit("the holder process did not start")
        out = {}
        default = _peering._SLICE_BYTES
        try:
            for mode, slice_bytes in (("pieces", default), ("whole", 1 << 62)):
                _peering._SLICE_BYTES = slice_bytes
                with tempfile.TemporaryDirectory(prefix="subcog-catchup-") as d:
                    out[mode] = await join(url, n_mem, d)
        finally:
            _peering._SLICE_BYTES = default
        return out
    finally:
        holder.kill()
        holder.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--memories", type=int, default=100_000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = asyncio.run(bench(args.memories))
    if args.json:
        print(json.dumps(res))
        return
    print(f"catch-up of {args.memories} memories from a peer process (durable joiner):")
    for mode, r in res.items():
        print(
            f"  applied {mode:6}: {r['catch_up_s']:6.2f} s; joiner's loop stalled at most "
            f"{r['stall_max_ms']:7.1f} ms (p99 {r['stall_p99_ms']:.1f} ms)"
        )
    print(f"  (pid {os.getpid()}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
