"""Run one :class:`MdnsDiscovery` and print one JSON line per event (flushed).

Meant to run inside a NetnsLan host namespace (tests/support/netns.py)::

    python tests/discovery/mdns_probe.py --node-id X --url ws://ADDR:PORT --secret S --seconds N

Lines: ``{"event": "started", ...}`` once discovery runs; ``{"event": "found", "node_id",
"url", "protocol", "mesh_tag", "t"}``; ``{"event": "lost", "node_id", "t"}``; and after
SIGTERM/SIGINT (or ``--seconds``) a clean ``aclose()`` and ``{"event": "closed", "took"}``.
``t`` is seconds since start. The zeroconf guard of the test suite is installed here too:
in the host's own network namespace this script refuses to run.

The probe holds no memories (discovery never sees any), so it cannot show that content
stays off the wire; tests/test_lan.py::test_mdns_packets_carry_no_secret_and_no_content
checks that with real nodes holding content.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support

from subcog_crdt._discovery.base import Advert, Found, mesh_tag
from subcog_crdt._discovery.mdns import MdnsDiscovery
from support.zeroconf_guard import install_zeroconf_guard, zeroconf_allowed

T0 = time.monotonic()


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def now() -> float:
    return round(time.monotonic() - T0, 4)


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    advert = Advert(
        node_id=args.node_id,
        url=args.url,
        protocol=args.protocol,
        mesh_tag=mesh_tag(args.secret.encode() if args.secret else None),
    )

    def on_found(found: Found) -> None:
        emit("found", t=now(), **asdict(found))

    def on_lost(node_id: str) -> None:
        emit("lost", t=now(), node_id=node_id)

    disc = MdnsDiscovery(args.interface or None)
    await disc.start(advert, on_found, on_lost)
    emit("started", t=now(), node_id=args.node_id, mesh_tag=advert.mesh_tag)
    try:
        await asyncio.wait_for(stop.wait(), args.seconds)
    except TimeoutError:
        pass
    t = time.monotonic()
    await disc.aclose()
    emit("closed", t=now(), took=round(time.monotonic() - t, 4))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--secret", default="")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--protocol", type=int, default=1)
    parser.add_argument(
        "--interface", action="append", help="interface name or IPv4 address (repeatable)"
    )
    args = parser.parse_args()
    allowed, why = zeroconf_allowed()
    if not allowed:
        print(f"mdns_probe: refusing to run in the host network namespace ({why})", file=sys.stderr)
        return 2
    install_zeroconf_guard()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
