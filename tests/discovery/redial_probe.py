"""Node A (in this process) with local and mDNS discovery, and a durable node B (a child
process) that both mechanisms find; prints A's redial urls at each step as JSON lines.

Meant to run inside a NetnsLan host namespace (tests/support/netns.py); B runs in the
same namespace (a child inherits it). The zeroconf guard refuses the host's namespace::

    python tests/discovery/redial_probe.py --dir TMP

Steps: B found by both mechanisms (a loopback url by local, a LAN url by mDNS); B killed
-9 (local reports it lost, mDNS keeps reporting it); B restarted on a new port (same node
id); B stopped cleanly (both report it lost). Every step waits for its expected set of
urls with a deadline and prints ``{"step", "ok", "redialers", ...}``; a step that times out
ends the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support

from subcog_crdt import ConversationsApi
from support.nodeproc import NodeProc
from support.zeroconf_guard import install_zeroconf_guard, zeroconf_allowed

DEADLINE = 15.0
SECRET = "redial-probe-secret"


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def until(pred: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + DEADLINE
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def run(base: Path) -> int:
    registry = base / "reg"
    b_args = ["--secret", SECRET, "--discovery", "local,mdns", "--discovery-dir", str(registry)]
    b_args += ["--host", "0.0.0.0", "--data-dir", str(base / "b")]
    nodes: list[NodeProc] = []
    async with ConversationsApi(
        mesh_secret=SECRET, host="0.0.0.0", discovery=("local", "mdns"), discovery_dir=registry
    ) as a:
        assert a._transport is not None
        transport = a._transport
        mdns = a._discovery[1]

        def urls() -> set[str]:
            return set(transport._redialers)

        def on_port(port: str) -> Callable[[], bool]:
            """Two urls, both on ``port``: one loopback (local), one not (mDNS)."""

            def pred() -> bool:
                u = urls()
                loopback = {x for x in u if x.startswith("ws://127.")}
                return len(u) == 2 and len(loopback) == 1 and all(x.endswith(port) for x in u)

            return pred

        def linked(node_id: str) -> bool:
            return any(p.node_id == node_id for p in a.peers())

        async def step(name: str, pred: Callable[[], bool]) -> bool:
            ok = await until(pred)
            emit(step=name, ok=ok, redialers=sorted(urls()), mdns=sorted(mdns.peers))
            return ok

        try:
            b = NodeProc.start(*b_args, name="b")
            nodes.append(b)
            port1 = ":" + b.url.rsplit(":", 1)[1]
            if not await step("found twice", lambda: on_port(port1)() and linked(b.node_id)):
                return 1
            lan1 = next(u for u in urls() if not u.startswith("ws://127."))
            b.kill()  # no goodbye: mDNS goes on reporting b at lan1
            if not await step("killed", lambda: urls() == {lan1}):
                return 1
            b2 = NodeProc.start(*b_args, name="b2")
            nodes.append(b2)
            assert b2.node_id == b.node_id
            port2 = ":" + b2.url.rsplit(":", 1)[1]
            if not await step("restarted", lambda: on_port(port2)() and linked(b2.node_id)):
                return 1
            b2.stop()  # clean: both mechanisms report it lost
            if not await step("stopped", lambda: urls() == set()):
                return 1
        finally:
            for n in nodes:
                n.kill()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    allowed, why = zeroconf_allowed()
    if not allowed:
        emit(step="refused", ok=False, why=why)
        return 2
    install_zeroconf_guard()
    return asyncio.run(run(Path(args.dir)))


if __name__ == "__main__":
    sys.exit(main())
