"""Run one subcog-crdt node as a separate process, driven by JSON lines.

Used by tests that need real processes: crash tests (SIGKILL), LAN tests inside network
namespaces, same-machine discovery. Every output line is one JSON object, flushed.

    python tests/support/noderun.py --data-dir D --session s1 --subscribe d [--secret S]
        [--host H] [--discovery local,mdns] [--discovery-dir P] [--advertise-host A]
        [--capture-loop NS]   # capture forever, printing {"acked": id} after each returns

Commands on stdin (one JSON object per line): ``{"cmd": "capture", "ns": .., "content": ..}``,
``{"cmd": "state", "ns": ..}`` (hash, memories, peers, sessions), ``{"cmd": "quit"}``.
Events for the session's subscriptions are printed as ``{"event": ...}`` lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from subcog_crdt import Captured, ConversationsApi, Lagged


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(ns: argparse.Namespace) -> None:
    kw: dict[str, Any] = {
        "data_dir": ns.data_dir or None,
        "mesh_secret": ns.secret or None,
        "host": ns.host or None,
        "port": ns.port,
        "discovery": tuple(x for x in ns.discovery.split(",") if x),
        "user_id": "test",
    }
    if ns.discovery_dir:
        kw["discovery_dir"] = ns.discovery_dir
    if ns.advertise_host:
        kw["advertise_host"] = ns.advertise_host
    if ns.mdns_interfaces:
        kw["mdns_interfaces"] = ns.mdns_interfaces.split(",")
    if ns.peer:
        kw["peers"] = ns.peer
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with ConversationsApi(**kw) as api:
        subs = [x for x in ns.subscribe.split(",") if x]
        session = await api.register_session(ns.session, subscribe=subs)
        events = session.events(include_own=ns.include_own)
        emit({"ready": api.url, "node_id": api.node_id, "pid": os.getpid()})

        async def pump_events() -> None:
            async for ev in events:
                if isinstance(ev, Lagged):
                    emit({"event": "lagged", "dropped": ev.dropped})
                    continue
                out = {
                    "event": ev.kind,
                    "ns": ev.namespace,
                    "session": ev.source_session,
                    "node": ev.node_id,
                    "write_id": ev.write_id,
                    "memory_id": ev.memory_id,
                    "cursor": ev.cursor,
                }
                if isinstance(ev, Captured):
                    out["content"] = ev.memory.content
                emit(out)

        async def capture_loop(target: str) -> None:
            i = 0
            while True:
                m = await session.capture(target, f"crash-test fact {os.getpid()} {i}")
                emit({"acked": m.id, "i": i})
                i += 1

        async def commands() -> None:
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            while True:
                line = await reader.readline()
                if not line:
                    stop.set()
                    return
                cmd = json.loads(line)
                try:
                    await run(cmd)
                except Exception as exc:
                    emit({"error": f"{type(exc).__name__}: {exc}", "cmd": cmd})

        async def run(cmd: dict[str, Any]) -> None:
            kind = cmd["cmd"]
            if kind == "capture":
                m = await session.capture(cmd["ns"], cmd["content"])
                emit({"captured": m.id, "content": m.content})
            elif kind == "connect":
                await api.connect(cmd["url"])
                emit({"connected": cmd["url"]})
            elif kind == "state":
                target = cmd["ns"]
                emit(
                    {
                        "state": target,
                        "hash": api.state_hash(target),
                        "memories": sorted(m.content for m in api.memories(target)),
                        "peers": sorted(p.node_id for p in api.peers()),
                        "sessions": sorted(
                            f"{s.id}@{s.node_id}" for s in api.sessions.list() if not s.is_local
                        ),
                    }
                )
            elif kind == "sync":
                batch = await session.sync(since=cmd.get("since", "last"))
                emit({"synced": [e.write_id for e in batch.events], "complete": batch.complete})
            elif kind == "quit":
                stop.set()

        tasks = [asyncio.create_task(pump_events()), asyncio.create_task(commands())]
        if ns.capture_loop:
            tasks.append(asyncio.create_task(capture_loop(ns.capture_loop)))
        await stop.wait()
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
    emit({"closed": True})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--secret", default="")
    ap.add_argument("--host", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--discovery", default="")
    ap.add_argument("--discovery-dir", default="")
    ap.add_argument("--advertise-host", default="")
    ap.add_argument("--mdns-interfaces", default="")
    ap.add_argument("--peer", action="append", default=[])
    ap.add_argument("--session", default="s1")
    ap.add_argument("--subscribe", default="d")
    ap.add_argument("--include-own", action="store_true")
    ap.add_argument("--capture-loop", default="")
    asyncio.run(main(ap.parse_args()))
