"""Sync benchmark: two subcog-crdt node processes on loopback, next to the anchors.

Measures, in one run: propagation latency p50/p99 at 200 captures/s from a session on node
A to an event on node B (and how long A's capture call took meanwhile), twice: received by
a listener (``Session.listen``, called as the event is published: where the anchors'
clients take theirs, in a ``Map.observe`` callback), and by an ``async for`` over
``Session.events()`` (one loop iteration later); and the sustained
propagated captures/s, with durable storage on both nodes (``data_dir`` set, default
durability): first one capture per call, as the anchors do, then with ``capture_many``
batches on A (what the link and B carry when A's per-call cost is not the limit); then the
anchors from ``anchors.py``: the aiohttp floor (one way at the same rate, and the round
trip), a bare pycrdt document sending straight to another (no relay: what any node on
pycrdt and aiohttp could at best reach, storing and checking nothing), the
pycrdt-websocket relay and the Node relay.

    .venv/bin/python benchmarks/bench_sync.py [--rate 200] [--seconds 5] [--sustained-n 20000]
        [--repeat N] [--interleave ROUNDS]

``--interleave ROUNDS`` measures latency only, with every system's processes started
first and their latency phases cut into ROUNDS chunks taken in turn (the order rotating),
so that the machine's drift over the run meets every system alike.

A run's p50 moves with the machine by up to 2.5x here, the relays' with it: the ratios
are taken within each run, and ``--repeat`` gives their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anchors
from anchors import _Child, _emit, _latency_summary, _stdin_lines, _wait_stdin_eof
from subcog_crdt import Captured, ConversationsApi, Event

PAD = "x" * 240
MANY = 64
"""Batch size of the second sustained phase (``capture_many``): what the link and B
carry when A's per-call cost is not the limit."""


async def _role_b(data_dir: str, n_lat: int, warmup: int, sustained_n: int) -> None:
    async with ConversationsApi(data_dir=data_dir, discovery=()) as api:
        s = await api.register_session("bench-b", subscribe=["bench"])
        events = s.events(maxsize=1_000_000)
        # A second session takes the other half of the latency phase's captures (in their
        # own namespace) by a listener (Session.listen): called as the event is published,
        # where the anchors' clients take theirs (a Map.observe callback). Interleaved
        # capture by capture, so the machine's drift touches both alike.
        s2 = await api.register_session("bench-b-listen", subscribe=["bench-listen"])
        cb_lat: list[int] = []
        cb_done = asyncio.get_running_loop().create_future()

        def on_event(ev: Event) -> None:
            now = time.monotonic_ns()
            if isinstance(ev, Captured):
                kind, _, stamp, _ = ev.memory.content.split("|", 3)
                if kind == "k":
                    cb_lat.append(now - int(stamp))
                    if len(cb_lat) == n_lat:
                        cb_done.set_result(None)

        listener = s2.listen(on_event)
        _emit("URL", api.url or "")
        stdin = await _stdin_lines()
        lat: list[int] = []
        seen = {"w": 0, "l": 0, "s": 0, "m": 0}
        last_ns = 0
        while seen["w"] < warmup or seen["l"] < n_lat:
            # As ``async for`` does (no timer per event: the parent bounds the phase and
            # stops this process if it overruns).
            ev = await anext(events)
            now = time.monotonic_ns()
            if isinstance(ev, Captured):
                kind, _, stamp, _ = ev.memory.content.split("|", 3)
                seen[kind] += 1
                if kind == "l":
                    lat.append(now - int(stamp))
        await cb_done
        listener.close()
        _emit("LAT", {**_latency_summary(lat), "listen": _latency_summary(cb_lat)})
        for kind, tag in (("s", "SUS"), ("m", "SUS_MANY")):  # one per call, then batched
            while seen[kind] < sustained_n:
                ev = await events.next(300)
                if isinstance(ev, Captured):
                    seen[ev.memory.content[0]] += 1
                    last_ns = time.monotonic_ns()
            _emit(tag, {"last_ns": last_ns})
        await _wait_stdin_eof(stdin)


async def link_to_b(api: ConversationsApi, url: str) -> None:
    """A's setup: link to B, wait until the link shares "bench", then say READY."""
    await api.connect(url)
    while not api.peers() or "bench" not in api.peers()[0].namespaces:
        await asyncio.sleep(0.01)  # bench setup: wait for the link's namespace exchange
    _emit("READY")


async def start_pair(
    children: list[_Child], b_argv: list[str], a_argv: Callable[[str], list[str]]
) -> tuple[_Child, _Child]:
    """Start B (which prints its URL), then A with that URL; return once A is READY."""
    b = await _Child.start("subcog-b", b_argv)
    children.append(b)
    url = await b.expect("URL", 60)
    a = await _Child.start("subcog-a", a_argv(url))
    children.append(a)
    await a.expect("READY", 60)
    return a, b


async def _role_a(
    url: str, data_dir: str, rate: float, n_lat: int, warmup: int, sustained_n: int
) -> None:
    stdin = await _stdin_lines()
    async with ConversationsApi(data_dir=data_dir, discovery=()) as api:
        s = await api.register_session("bench-a", subscribe=["bench"])
        await link_to_b(api, url)
        command = (await stdin.readline()).strip()
        if command not in (b"GO_LAT", b"GO_WARM"):
            return

        call_ns: list[int] = []

        async def paced(kind: str, listened: str, count: int) -> None:
            """``count`` captures of each kind, alternating: ``kind`` for B's stream,
            ``listened`` for its listener."""
            start = time.monotonic()
            for i in range(2 * count):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing, not synchronisation
                t0 = time.monotonic_ns()
                if i % 2:
                    await s.capture("bench-listen", f"{listened}|{i}|{t0}|{PAD}")
                else:
                    await s.capture("bench", f"{kind}|{i}|{t0}|{PAD}")
                call_ns.append(time.monotonic_ns() - t0)

        await paced("w", "v", warmup)
        call_ns.clear()
        if command == b"GO_LAT":
            await paced("l", "k", n_lat)
        else:  # interleaved with the anchors' (``--interleave``)

            async def chunk(kind: str, count: int, first: int) -> None:
                await paced("l", "k", count)

            if not await anchors._paced_in_chunks(stdin, n_lat, chunk):
                return
        _emit("LAT_SENT", _latency_summary(call_ns))
        if (await stdin.readline()).strip() != b"GO_SUS":
            return
        t0 = time.monotonic_ns()
        for i in range(sustained_n):
            await s.capture("bench", f"s|{i}|{time.monotonic_ns()}|{PAD}")
            if i % 16 == 15:
                await asyncio.sleep(0)
        t1 = time.monotonic_ns()
        _emit("SUS_SENT", {"t0_ns": t0, "t1_ns": t1})
        if (await stdin.readline()).strip() != b"GO_MANY":
            return
        t0 = time.monotonic_ns()
        for start in range(0, sustained_n, MANY):
            stop = min(sustained_n, start + MANY)
            now = time.monotonic_ns()
            await s.capture_many("bench", [f"m|{i}|{now}|{PAD}" for i in range(start, stop)])
        t1 = time.monotonic_ns()
        _emit("MANY_SENT", {"t0_ns": t0, "t1_ns": t1})
        await _wait_stdin_eof(stdin)


async def _start_nodes(
    children: list[_Child], tmp: str, rate: float, n_lat: int, warmup: int, sustained_n: int
) -> tuple[_Child, _Child]:
    """This program's roles B and A as two node processes, durable under ``tmp``."""
    me = str(Path(__file__).resolve())
    phases = ["--n-lat", str(n_lat), "--warmup", str(warmup), "--sustained-n", str(sustained_n)]
    return await start_pair(
        children,
        [sys.executable, me, "--role", "b", "--dir", f"{tmp}/b", *phases],
        lambda url: [sys.executable, me, "--role", "a", "--url", url, "--dir", f"{tmp}/a",
                     "--rate", str(rate), *phases],
    )  # fmt: skip


async def subcog_pair(
    rate: float, seconds: float, sustained_n: int, warmup: int = 100
) -> dict[str, Any]:
    n_lat = max(1, round(rate * seconds))
    children: list[_Child] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            a, b = await _start_nodes(children, tmp, rate, n_lat, warmup, sustained_n)
            a.send_line("GO_LAT")
            lat = json.loads(await b.expect("LAT", 2 * (warmup + n_lat) / rate + 60))
            calls = json.loads(await a.expect("LAT_SENT", 30))
            a.send_line("GO_SUS")
            sent = json.loads(await a.expect("SUS_SENT", 600))
            arrived = json.loads(await b.expect("SUS", 600))
            a.send_line("GO_MANY")
            many_sent = json.loads(await a.expect("MANY_SENT", 600))
            many_arrived = json.loads(await b.expect("SUS_MANY", 600))
            return {
                **lat,
                "capture_call_p50_ms": calls["p50_ms"],
                "capture_call_p99_ms": calls["p99_ms"],
                "sustained_captures_per_s": round(
                    sustained_n / ((arrived["last_ns"] - sent["t0_ns"]) / 1e9)
                ),
                "producer_captures_per_s": round(
                    sustained_n / ((sent["t1_ns"] - sent["t0_ns"]) / 1e9)
                ),
                "sustained_many_captures_per_s": round(
                    sustained_n / ((many_arrived["last_ns"] - many_sent["t0_ns"]) / 1e9)
                ),
                "producer_many_captures_per_s": round(
                    sustained_n / ((many_sent["t1_ns"] - many_sent["t0_ns"]) / 1e9)
                ),
            }
        finally:
            await anchors._stop_all(children)


async def interleaved(
    rate: float, seconds: float, rounds: int, warmup: int = 100
) -> dict[str, Any]:
    """The latency phases of subcog-crdt and the anchors, interleaved: every system's
    processes start first; then, round after round, each system in turn makes its share
    of the captures (the order rotating each round). The machine's drift then meets all
    of them alike, and a run's ratios compare like with like. Latency only."""
    n_lat = max(1, round(rate * seconds))
    children: list[_Child] = []
    pairs: dict[str, tuple[_Child, _Child]] = {}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            a, b = await _start_nodes(children, tmp, rate, n_lat, warmup, 1)
            pairs["subcog-crdt"] = (a, b)
            for name in anchors.ANCHOR_PAIRS:
                try:
                    pairs[name] = await anchors.start_anchor_pair(
                        name, children, rate, n_lat, warmup
                    )
                except anchors._Skipped as exc:
                    out[name] = {"skipped": str(exc)}
            for a, _ in pairs.values():
                a.send_line("GO_WARM")
                await a.expect("WARM_SENT", 2 * warmup / rate + 60)
            names = list(pairs)
            for r in range(rounds):
                size = n_lat // rounds + (1 if r < n_lat % rounds else 0)
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    a, _ = pairs[name]
                    a.send_line(f"GO_CHUNK {size}")
                    await a.expect("CHUNK_SENT", 2 * size / rate + 60)
            for name, (_, b) in pairs.items():
                out[name] = json.loads(await b.expect("LAT", 60))
        finally:
            await anchors._stop_all(children)
    return out


async def run_all(ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["subcog-crdt"] = await subcog_pair(ns.rate, ns.seconds, ns.sustained_n)
    out["aiohttp floor"] = await anchors.aiohttp_roundtrip_floor()
    out["pycrdt direct pair"] = await anchors.pycrdt_direct_pair(
        rate=ns.rate, seconds=ns.seconds, sustained_n=ns.sustained_n
    )
    out["pycrdt-websocket relay"] = await anchors.pycrdt_websocket_relay(
        rate=ns.rate, seconds=ns.seconds, sustained_n=ns.sustained_n
    )
    try:
        out["node relay"] = await anchors.node_relay(
            rate=ns.rate, seconds=ns.seconds, sustained_n=ns.sustained_n
        )
    except Exception as exc:  # report, do not hide
        out["node relay"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--role", choices=["a", "b"])
    ap.add_argument("--url", default="")
    ap.add_argument("--dir", default="")
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--n-lat", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--sustained-n", type=int, default=20_000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="latency only, every system's phase interleaved in ROUNDS rounds",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="whole runs; prints each run's ratios and their medians",
    )
    ns = ap.parse_args()
    if ns.role == "b":
        asyncio.run(_role_b(ns.dir, ns.n_lat, ns.warmup, ns.sustained_n))
        return 0
    if ns.role == "a":
        asyncio.run(_role_a(ns.url, ns.dir, ns.rate, ns.n_lat, ns.warmup, ns.sustained_n))
        return 0
    runs = []
    for i in range(ns.repeat):
        if ns.interleave:
            runs.append(asyncio.run(interleaved(ns.rate, ns.seconds, ns.interleave)))
        else:
            runs.append(asyncio.run(run_all(ns)))
        if ns.repeat > 1 and not ns.json:
            print(f"run {i + 1}/{ns.repeat}: {_ratio_line(runs[-1])}", flush=True)
    if ns.json:
        print(json.dumps(runs[0] if ns.repeat == 1 else runs, indent=2))
        return 0
    if ns.interleave:
        print(f"last run: {_ratio_line(runs[-1])}")
    else:
        _print_run(runs[-1])
    if ns.repeat > 1:
        print(f"medians over {ns.repeat} runs (each ratio within its own run):")
        for how in RECEIVED_BY:
            for name in RELATIVE_TO:
                ratios = [_p50(r, how) / r[name]["p50_ms"] for r in runs if "p50_ms" in r[name]]
                if ratios:
                    print(
                        f"  subcog p50 ({how}) / {name} p50 = {statistics.median(ratios):.2f}x "
                        f"({min(ratios):.2f}-{max(ratios):.2f})"
                    )
    return 0


RELATIVE_TO = ("pycrdt direct pair", "pycrdt-websocket relay", "node relay")
RECEIVED_BY = ("listen()", "events()")
"""How B's session takes the events: a listener (called as the event is published, as the
anchors' Map.observe callbacks are), or an ``async for`` over a stream (one loop
iteration later)."""


def _p50(results: dict[str, Any], how: str) -> float:
    ours = results["subcog-crdt"]
    p50: float = ours["listen"]["p50_ms"] if how == "listen()" else ours["p50_ms"]
    return p50


def _ratio_line(results: dict[str, Any]) -> str:
    parts = []
    for how in RECEIVED_BY:
        ours = _p50(results, how)
        ratios = [
            f"{ours / results[name]['p50_ms']:.2f}"
            for name in RELATIVE_TO
            if "p50_ms" in results.get(name, {})
        ]
        parts.append(f"subcog p50 {how} {ours:.3f} ms ({'/'.join(ratios)}x)")
    anchors_p50 = [
        f"{name} {results[name]['p50_ms']:.3f}"
        for name in RELATIVE_TO
        if "p50_ms" in results.get(name, {})
    ]
    return "; ".join(parts + anchors_p50)


def _print_run(results: dict[str, Any]) -> None:
    """The table of one run (the last, with ``--repeat``)."""
    ours = results["subcog-crdt"]
    floor = results["aiohttp floor"]
    rows = {
        "subcog-crdt, listen()": ours["listen"],
        "subcog-crdt, events()": ours,
        **{k: v for k, v in results.items() if k != "subcog-crdt"},
        "aiohttp floor": {  # one way at the same rate; throughput: a one-way stream
            "p50_ms": floor["oneway_p50_ms"],
            "p99_ms": floor["oneway_p99_ms"],
            "stream_msgs_per_s": floor["stream_msgs_per_s"],
        },
    }
    print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8} {'captures/s':>11}")
    for name, r in rows.items():
        if "skipped" in r:
            print(f"{name:28} skipped: {r['skipped']}")
            continue
        thr = r.get("sustained_captures_per_s") or r.get("stream_msgs_per_s") or ""
        p50, p99 = r.get("p50_ms", float("nan")), r.get("p99_ms", float("nan"))
        print(f"{name:28} {p50:8.3f} {p99:8.3f} {thr!s:>11}")
    print(
        f"subcog capture call on A (p50 / p99 ms): {ours['capture_call_p50_ms']:.3f} / "
        f"{ours['capture_call_p99_ms']:.3f}; aiohttp round trip p50 {floor['rtt_p50_ms']:.3f}"
    )
    print(
        f"subcog sustained with capture_many({MANY}) on A: "
        f"{ours['sustained_many_captures_per_s']} captures/s arrived at B "
        f"(A produced {ours['producer_many_captures_per_s']}/s)"
    )
    for how in RECEIVED_BY:
        for name in RELATIVE_TO:
            r = results.get(name, {})
            if "p50_ms" in r:
                print(f"subcog p50 ({how}) / {name} p50 = {_p50(results, how) / r['p50_ms']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
