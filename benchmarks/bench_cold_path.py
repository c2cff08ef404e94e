"""The two in-process steps of a propagated capture, warm and with cold caches.

A node's share of a propagated capture's latency is Python work that, at 200 captures/s,
meets caches other work has since filled (each step costs 3-5x its back-to-back time in
``sync_breakdown.py``). This times the two steps of ``NamespaceDoc`` alone, one update at
a time, back to back ("warm") and with a 3 MB buffer rewritten before each ("cold", about
the L2 caches of this machine's two cores):

- A: a capture call until its update is handed to the link (``on_local_update``; sent
  ahead of pycrdt's transaction, as to a linked peer);
- B: a peer's update decoded, its memory derived and its event made
  (``apply_update(defer=True)``; pycrdt's apply comes after, untimed, as on a node).

    .venv/bin/python benchmarks/bench_cold_path.py [--n 1000] [--rounds 3]

A tool for work on latency, not a figure to compare with other machines: p50 and p10 in us.
"""

from __future__ import annotations

import argparse
import itertools
import time

from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.hlc import Hlc

PAD = "x" * 240


class _Thrash:
    """Rewrites 3 MB of bytes and walks 7k small objects: what evicts the caches."""

    def __init__(self) -> None:
        self._blocks = [bytearray(1 << 20) for _ in range(3)]
        self._objs = [str(i) * 3 for i in range(20_000)]

    def __call__(self) -> int:
        for block in self._blocks:
            block[::64] = b"\x01" * (len(block) // 64)
        return sum(len(o) for o in self._objs[::3])


def _doc(node: str) -> NamespaceDoc:
    return NamespaceDoc("bench", node_id=node, hlc=Hlc(), next_cursor=itertools.count(1).__next__)


def _pct(values: list[int], q: float) -> float:
    values = sorted(values)
    return values[int(len(values) * q)] / 1000


def writer_step(n: int, cold: bool) -> tuple[float, float]:
    """A's capture call until the update reaches ``on_local_update``: p50, p10 in us."""
    a = _doc("aaaaaaaaaaaaaaaa")
    sent: list[int] = []
    a.on_local_update = lambda ns, update: sent.append(time.perf_counter_ns())
    a.has_audience = lambda: True
    thrash = _Thrash()
    took: list[int] = []
    for i in range(n):
        if cold:
            thrash()
        t0 = time.perf_counter_ns()
        a.capture("s1", f"l|{i}|{t0}|{PAD}", {})
        took.append(sent[-1] - t0)
        a.take_outbox()
    return _pct(took, 0.5), _pct(took, 0.1)


def receiver_step(n: int, cold: bool) -> tuple[float, float]:
    """B's decode, derivation and event of a peer's capture: p50, p10 in us."""
    a, b = _doc("aaaaaaaaaaaaaaaa"), _doc("bbbbbbbbbbbbbbbb")
    thrash = _Thrash()
    took: list[int] = []
    for i in range(n):
        a.capture("s1", f"l|{i}|{time.monotonic_ns()}|{PAD}", {})
        (update,) = a.take_outbox()
        if cold:
            thrash()
        t0 = time.perf_counter_ns()
        events = b.apply_update(update, defer=True)
        took.append(time.perf_counter_ns() - t0)
        # The path a live update takes (the first, with no state vector known yet, is
        # applied at once).
        assert len(events) == 1 and (i == 0 or b.unapplied == 1)
        b.catch_up()
        b.take_outbox()
    return _pct(took, 0.5), _pct(took, 0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ns = ap.parse_args()
    print(f"{'step (us)':44} {'warm p50':>9} {'p10':>6} {'cold p50':>9} {'p10':>6}")
    for _ in range(ns.rounds):
        for name, step in (
            ("A: capture call -> update to the link", writer_step),
            ("B: decode, derive, event (deferred apply)", receiver_step),
        ):
            w50, w10 = step(ns.n, False)
            c50, c10 = step(ns.n, True)
            print(f"{name:44} {w50:9.1f} {w10:6.1f} {c50:9.1f} {c10:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
