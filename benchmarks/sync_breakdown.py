"""Where a propagated capture's time goes: the sync benchmark's latency phase, timed step
by step in both processes.

Two durable node processes on loopback, as in ``bench_sync.py``: A captures at 200/s and
B's session receives the events. Probes (wrappers installed in each process before its
node opens) take ``time.monotonic_ns()`` (system-wide, so A's and B's agree) at each step,
and the parent joins them capture by capture: A's capture call until the update reaches
the link and the socket, the wire until B's event loop wakes, B's hand-over, decode,
derivation, a listener (``Session.listen``) receiving the event, then a stream's consumer
(``async for``, a loop iteration later), and pycrdt's apply and the log write that follow
(not part of the totals). The probes cost a few microseconds each, so the totals run
~10 % above ``bench_sync.py``'s.

    .venv/bin/python benchmarks/sync_breakdown.py [--rate 200] [--seconds 5]

A tool for work on latency, not a figure to compare: it prints p10/p50/p90 of each step.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import selectors
import sys
import tempfile
import time
from asyncio import selector_events
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anchors
from anchors import _Child, _emit, _stdin_lines, _wait_stdin_eof
from bench_sync import link_to_b, start_pair
from subcog_crdt import Captured, ConversationsApi, _bus, _peering, _session
from subcog_crdt._core import document
from subcog_crdt._storage import sqlite
from subcog_crdt._transport import websocket

PAD = "x" * 240
Probes = dict[str, list[int]]


def _wrap(owner: Any, name: str, probes: Probes, before: str = "", after: str = "") -> None:
    """Replace ``owner.name`` by a wrapper stamping ``before`` and/or ``after`` it."""
    inner: Callable[..., Any] = getattr(owner, name)
    now = time.monotonic_ns
    start = probes.setdefault(before, []) if before else []
    end = probes.setdefault(after, []) if after else []

    def probe(*args: Any, **kwargs: Any) -> Any:
        if before:
            start.append(now())
        result = inner(*args, **kwargs)
        if after:
            end.append(now())
        return result

    setattr(owner, name, probe)


def _probe_wakes(probes: Probes) -> None:
    """Stamp each return of the event loop's selector that reports a ready socket."""
    inner = selectors.EpollSelector.select
    wakes = probes.setdefault("wake", [])

    def select(self: selectors.EpollSelector, timeout: float | None = None) -> Any:
        ready = inner(self, timeout)
        if ready:
            wakes.append(time.monotonic_ns())
        return ready

    selectors.EpollSelector.select = select  # type: ignore[method-assign,assignment]


def _probe_a() -> Probes:
    probes: Probes = {}
    inner = _session.Session.capture
    calls = probes.setdefault("call", [])

    async def capture(self: _session.Session, *args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic_ns())
        return await inner(self, *args, **kwargs)

    _session.Session.capture = capture  # type: ignore[method-assign]
    _wrap(_peering.PeerSync, "push_update", probes, before="push")
    _wrap(websocket.WebSocketLink, "send_now", probes, before="link_send")
    _wrap(websocket.WebSocketLink, "send", probes, before="link_send")
    transport = selector_events._SelectorSocketTransport  # type: ignore[attr-defined]
    _wrap(transport, "write", probes, before="socket_write")
    return probes


def _probe_b() -> Probes:
    probes: Probes = {}
    _probe_wakes(probes)
    _wrap(websocket.WebSocketLink, "_hand_over", probes, before="hand_over")
    _wrap(document, "read_update", probes, before="decode", after="decoded")
    _wrap(document.NamespaceDoc, "catch_up", probes, before="apply", after="applied")
    _wrap(document.NamespaceDoc, "_absorb_one", probes, after="derived")
    _wrap(sqlite.SqliteStorage, "_append", probes, before="log_frame")
    _wrap(sqlite, "write_all", probes, before="log_write", after="log_written")
    inner = _bus.Subscription.get_nowait
    got = probes.setdefault("event", [])

    def get_nowait(self: _bus.Subscription) -> Any:
        item = inner(self)
        if item is not None:
            got.append(time.monotonic_ns())
        return item

    _bus.Subscription.get_nowait = get_nowait  # type: ignore[method-assign]
    return probes


async def _role_b(data_dir: str, n: int, out: str) -> None:
    probes = _probe_b()
    listened = probes.setdefault("listened", [])
    async with ConversationsApi(data_dir=data_dir, discovery=()) as api:
        s = await api.register_session("breakdown-b", subscribe=["bench"])
        events = s.events(maxsize=1_000_000)
        s.listen(lambda ev: listened.append(time.monotonic_ns()))
        _emit("URL", api.url or "")
        stdin = await _stdin_lines()
        seen = 0
        while seen < n:
            if isinstance(await anext(events), Captured):
                seen += 1
        Path(out).write_text(json.dumps(probes))
        _emit("DONE")
        await _wait_stdin_eof(stdin)


async def _role_a(url: str, data_dir: str, rate: float, n: int, out: str) -> None:
    probes = _probe_a()
    stdin = await _stdin_lines()
    async with ConversationsApi(data_dir=data_dir, discovery=()) as api:
        s = await api.register_session("breakdown-a", subscribe=["bench"])
        await link_to_b(api, url)
        if (await stdin.readline()).strip() != b"GO":
            return
        start = time.monotonic()
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing, not synchronisation
            await s.capture("bench", f"{i}|{time.monotonic_ns()}|{PAD}")
        Path(out).write_text(json.dumps(probes))
        _emit("DONE")
        await _wait_stdin_eof(stdin)


# Each step: (name, start probe, end probe). A probe is matched to a capture as the first
# of its kind after the step's start; "wake" as the last one before B's hand-over.
STEPS = [
    ("A: capture call -> update to the link", "call", "push"),
    ("A: -> link.send_now", "push", "link_send"),
    ("A: link.send_now -> socket write", "link_send", "socket_write"),
    ("wire: A's write -> B's loop wakes", "socket_write", "wake"),
    ("B: wake -> frame handed over", "wake", "hand_over"),
    ("B: msgpack, dispatch -> decode", "hand_over", "decode"),
    ("B: decode the Yjs update", "decode", "decoded"),
    ("B: derive memory and event", "decoded", "derived"),
    ("B: -> a listener has the event", "derived", "listened"),
    ("B: -> a stream's consumer has it", "listened", "event"),
    # Given to pycrdt, then stored, at the end of the turn, after the consumer ran
    # (NamespaceDoc.apply_update's defer, ConversationsApi._persist_soon).
    ("B, after it: -> pycrdt apply", "event", "apply"),
    ("B, after it: pycrdt apply", "apply", "applied"),
    ("B, after it: -> log frame", "applied", "log_frame"),
    ("B, after it: log frame built", "log_frame", "log_write"),
    ("B, after it: log write", "log_write", "log_written"),
]
TOTALS = [
    ("total: A's call -> B's listener", "call", "listened"),
    ("total: A's call -> B's stream consumer", "call", "event"),
]


def _join(a: Probes, b: Probes, warmup: int) -> list[dict[str, int]]:
    """Per capture, the time of each probe (captures with a probe missing are left out)."""
    merged = {**a, **b}

    def first_after(kind: str, t: int) -> int:
        times = merged[kind]
        return times[bisect.bisect_right(times, t)]

    rows = []
    for call in a["call"][warmup:]:
        row = {"call": call}
        try:
            for _, first, second in STEPS:
                if second == "wake":
                    continue  # found from the hand-over, next step
                if second == "hand_over":
                    row["hand_over"] = hand = first_after("hand_over", row["socket_write"])
                    wakes = merged["wake"]
                    row["wake"] = wakes[bisect.bisect_left(wakes, hand) - 1]
                else:
                    row[second] = first_after(second, row[first])
        except IndexError:
            continue
        rows.append(row)
    return rows


def _summary(rows: list[dict[str, int]]) -> list[tuple[str, float, float, float]]:
    out = []
    for name, first, second in [*STEPS, *TOTALS]:
        values = sorted((r[second] - r[first]) / 1000 for r in rows)
        p = anchors._percentile
        out.append((name, p(values, 10), p(values, 50), p(values, 90)))
    return out


async def run(
    rate: float, seconds: float, warmup: int = 100
) -> list[tuple[str, float, float, float]]:
    n = warmup + max(1, round(rate * seconds))
    me = str(Path(__file__).resolve())
    children: list[_Child] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            a, b = await start_pair(
                children,
                [sys.executable, me, "--role", "b", "--dir", f"{tmp}/b", "--n", str(n),
                 "--out", f"{tmp}/b.json"],
                lambda url: [sys.executable, me, "--role", "a", "--url", url, "--dir",
                             f"{tmp}/a", "--rate", str(rate), "--n", str(n), "--out",
                             f"{tmp}/a.json"],
            )  # fmt: skip
            a.send_line("GO")
            await a.expect("DONE", n / rate + 60)
            await b.expect("DONE", 60)
            probes_a = json.loads(Path(f"{tmp}/a.json").read_text())
            probes_b = json.loads(Path(f"{tmp}/b.json").read_text())
        finally:
            await anchors._stop_all(children)
    return _summary(_join(probes_a, probes_b, warmup))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--role", choices=["a", "b"])
    ap.add_argument("--url", default="")
    ap.add_argument("--dir", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=5)
    ns = ap.parse_args()
    if ns.role == "b":
        asyncio.run(_role_b(ns.dir, ns.n, ns.out))
        return 0
    if ns.role == "a":
        asyncio.run(_role_a(ns.url, ns.dir, ns.rate, ns.n, ns.out))
        return 0
    table = asyncio.run(run(ns.rate, ns.seconds))
    print(f"{'step (us)':42} {'p10':>7} {'p50':>7} {'p90':>7}")
    for name, p10, p50, p90 in table:
        print(f"{name:42} {p10:7.1f} {p50:7.1f} {p90:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
