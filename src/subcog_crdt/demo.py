"""``make demo``: three nodes in one process, three agent sessions capturing at once.

The nodes are wired with in-memory links (no sockets); the same fact is captured twice by
different sessions on different nodes, and every node converges to one memory with both
capturers. Run: ``python -m subcog_crdt.demo``.
"""

from __future__ import annotations

import asyncio
import sys

from subcog_crdt import Captured, Conflict, ConversationsApi, Deleted, Lagged, Updated
from subcog_crdt._bus import Subscription
from subcog_crdt._transport.memory import memory_link_pair

FACTS = {
    "claude-code-1": ["We chose SQLite WAL for the journal", "Tests live next to the code"],
    "cursor-2": ["Use msgpack for control frames", "we chose sqlite WAL  for the journal"],
    "codex-3": ["Release notes go in CHANGELOG.md", "Prefer asyncio.TaskGroup over gather"],
}


def _describe(node: str, ev: object) -> str:
    if isinstance(ev, Captured):
        return f"[{node}] captured  {ev.memory.content!r} by {ev.source_session}"
    if isinstance(ev, Updated):
        return f"[{node}] updated   {ev.memory_id[:8]} {dict(ev.changes)} by {ev.source_session}"
    if isinstance(ev, Deleted):
        return f"[{node}] deleted   {ev.memory_id[:8]} by {ev.source_session}"
    if isinstance(ev, Conflict):
        who = f"{ev.winner.session} won over {ev.loser.session}"
        return f"[{node}] conflict  {ev.memory_id[:8]}: {who}"
    if isinstance(ev, Lagged):
        return f"[{node}] lagged: {ev.dropped} events dropped"
    return f"[{node}] {ev!r}"


async def _watch(name: str, sub: Subscription, out: list[str]) -> None:
    async for ev in sub:
        line = _describe(name, ev)
        out.append(line)
        print(line, flush=True)


async def _converge(nodes: list[ConversationsApi]) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len({n.state_hash("decisions") for n in nodes}) != 1:
        if loop.time() > deadline:
            print("nodes did not converge", file=sys.stderr)
            return False
        await asyncio.sleep(0.01)
    return True


async def main() -> int:
    names = list(FACTS)
    nodes = [ConversationsApi(listen=False, discovery=(), user_id="demo") for _ in names]
    for n in nodes:
        await n.open()
    try:
        # a full mesh of in-memory links
        for i in range(len(nodes)):
            for j in range(i + 1, len(nodes)):
                la, lb = memory_link_pair(nodes[i]._hello(), nodes[j]._hello())
                nodes[i].attach(la)
                nodes[j].attach(lb)
        sessions = [
            await n.register_session(sid, subscribe=["decisions"])
            for n, sid in zip(nodes, names, strict=True)
        ]
        printed: list[str] = []
        watchers = [asyncio.create_task(_watch(s.id, s.events(), printed)) for s in sessions]
        print("three sessions capture at once (one fact twice):", flush=True)
        await asyncio.gather(
            *(s.capture("decisions", fact) for s in sessions for fact in FACTS[s.id])
        )
        if not await _converge(nodes):
            return 1
        first = sessions[2].recall("sqlite wal", namespace="decisions")[0]
        print(f"\ncodex-3 tags {first.id[:8]} (expected_version={first.version}):", flush=True)
        await sessions[2].update(first.id, tags=["storage"], expected_version=first.version)
        if not await _converge(nodes):
            return 1
        await asyncio.sleep(0.05)  # give the printers a moment to show what already arrived
        for w in watchers:
            w.cancel()
        print()
        print(f"{'node':18} {'session':14} {'memories':>8}  state hash")
        for n, s in zip(nodes, sessions, strict=True):
            count, digest = len(n.memories("decisions")), n.state_hash("decisions")[:16]
            print(f"{n.node_id:18} {s.id:14} {count:>8}  {digest}")
        print()
        mem = nodes[1].get(first.id)
        print(f"{mem.content!r}: captured_by={list(mem.captured_by)} tags={list(mem.tags)}")
        converged = len({n.state_hash("decisions") for n in nodes}) == 1
        print("converged:", "yes" if converged else "NO")
        return 0 if converged and len(mem.captured_by) == 2 else 1
    finally:
        for n in nodes:
            await n.aclose()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
