"""Run one subcog-crdt node as a separate process, driven by JSON lines.

Used by tests that need real processes: crash tests (SIGKILL), LAN tests inside network
namespaces, same-machine discovery. Every output line is one JSON object, flushed.

    python tests/support/noderun.py --data-dir D --session s1 --subscribe d [--secret S]
        [--host H] [--discovery local,mdns] [--discovery-dir P] [--advertise-host A]
        [--capture-loop NS]   # capture forever, printing {"acked": id} after each returns
        [--chaos-loop --loop-tag T --loop-max N --loop-pause S --shared K]
                              # the mixed write loop of tests/test_chaos.py (see below)

Commands on stdin (one JSON object per line): ``{"cmd": "capture", "ns": .., "content": ..}``,
``{"cmd": "state", "ns": ..}`` (hash, memories, peers, sessions), ``{"cmd": "quit"}``,
``{"cmd": "hashes", "ns": [..]}`` (state hashes and peers: cheap to poll),
``{"cmd": "dump", "ns": ..}`` (every memory: id, captured_by, status, deleted, version),
``{"cmd": "missing", "ids": [..]}`` (those of the ids not live here),
``{"cmd": "stop-loop"}`` (the chaos loop ends after the write in flight; ``loop_stopped``),
``{"cmd": "settle"}`` (``api.settle()``: the peers that confirmed, ``settled``).
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

from subcog_crdt import Captured, ConversationsApi, Lagged, NotFound

CHAOS_FACTS = "d"  # the chaos loop's namespace of captures (own and shared contents)
CHAOS_REGS = "r"  # the chaos loop's namespace of per-session registers (updates)


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
    if ns.relay:
        kw["relay"] = ns.relay
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

        loop_stop = asyncio.Event()

        async def chaos_loop() -> None:
            """Per iteration: capture a content unique to this session and lifetime; set
            this session's register (its status only ever grows: lifetime, then i); every
            third, capture a content every node captures too (dedupe); every fifth, update
            the status of such a shared memory (concurrent writers). ``try`` is printed
            before a write, ``ack`` once it returned: a kill between them leaves a write
            that may or may not have happened, never an ack of one that did not."""
            try:
                await chaos_writes()
            except Exception as exc:  # reported, so that the test fails naming it
                emit({"loop_error": f"{type(exc).__name__}: {exc}"})

        async def chaos_writes() -> None:
            me, tag = ns.session, ns.loop_tag
            reg = None
            shared: list[Any] = []
            i = 0
            while not loop_stop.is_set() and (ns.loop_max == 0 or i < ns.loop_max):
                own = f"{me} {tag} fact {i}"
                emit({"try": "capture", "content": own})
                m = await session.capture(CHAOS_FACTS, own)
                emit({"ack": "capture", "ns": CHAOS_FACTS, "id": m.id, "content": own, "i": i})
                if reg is None:
                    reg_content = f"register of {me}"
                    emit({"try": "capture", "content": reg_content})
                    reg = await session.capture(CHAOS_REGS, reg_content)
                    emit({"ack": "capture", "ns": CHAOS_REGS, "id": reg.id, "content": reg_content})
                status = f"{tag}:{i:06d}"
                emit({"try": "update", "id": reg.id, "status": status})
                await session.update(reg.id, status=status)
                emit({"ack": "update", "ns": CHAOS_REGS, "id": reg.id, "status": status})
                if i % 3 == 0 and ns.shared:
                    text = f"shared fact {(i // 3) % ns.shared}"
                    emit({"try": "capture", "content": text})
                    m = await session.capture(CHAOS_FACTS, text)
                    emit({"ack": "capture", "ns": CHAOS_FACTS, "id": m.id, "content": text})
                    shared.append(m)
                if i % 5 == 4 and shared:
                    target = shared[(i // 5) % len(shared)]
                    status = f"{me}/{tag}/{i}"
                    emit({"try": "update", "id": target.id, "status": status})
                    await session.update(target.id, status=status)
                    emit({"ack": "update", "ns": CHAOS_FACTS, "id": target.id, "status": status})
                i += 1
                if ns.loop_pause:
                    await asyncio.sleep(ns.loop_pause)  # load shaping only
            emit({"loop_stopped": i})

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
            elif kind == "hashes":
                emit(
                    {
                        "hashes": {n: api.state_hash(n) for n in cmd["ns"]},
                        "peers": sorted(p.node_id for p in api.peers()),
                    }
                )
            elif kind == "dump":
                emit(
                    {
                        "dump": cmd["ns"],
                        "hash": api.state_hash(cmd["ns"]),
                        "memories": [
                            {
                                "id": m.id,
                                "content": m.content,
                                "captured_by": list(m.captured_by),
                                "status": m.status,
                                "deleted": m.deleted,
                                "version": m.version,
                            }
                            for m in api.memories(cmd["ns"], include_deleted=True)
                        ],
                    }
                )
            elif kind == "missing":
                gone = []
                for mid in cmd["ids"]:
                    try:
                        if api.get(mid).deleted:
                            gone.append(mid)
                    except NotFound:
                        gone.append(mid)
                emit({"missing": gone})
            elif kind == "stop-loop":
                loop_stop.set()
            elif kind == "sync":
                batch = await session.sync(since=cmd.get("since", "last"))
                emit({"synced": [e.write_id for e in batch.events], "complete": batch.complete})
            elif kind == "settle":
                emit({"settled": sorted(p.node_id for p in await api.settle())})
            elif kind == "quit":
                stop.set()

        tasks = [asyncio.create_task(pump_events()), asyncio.create_task(commands())]
        if ns.capture_loop:
            tasks.append(asyncio.create_task(capture_loop(ns.capture_loop)))
        if ns.chaos_loop:
            tasks.append(asyncio.create_task(chaos_loop()))
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
    ap.add_argument("--relay", default="")
    ap.add_argument("--session", default="s1")
    ap.add_argument("--subscribe", default="d")
    ap.add_argument("--include-own", action="store_true")
    ap.add_argument("--capture-loop", default="")
    ap.add_argument("--chaos-loop", action="store_true")
    ap.add_argument("--loop-tag", default="0")
    ap.add_argument("--loop-max", type=int, default=0)
    ap.add_argument("--loop-pause", type=float, default=0.0)
    ap.add_argument("--shared", type=int, default=0)
    asyncio.run(main(ap.parse_args()))
