"""Discovery benchmark: time from a node's start to its first connected peer.

Scenarios, each run several times (min / median printed):

(a) mDNS between two hosts of a network-namespace LAN built here (tests/support/netns.py;
    needs root; the namespaces are always torn down). Node A runs and has finished
    announcing itself (``--settle`` seconds after it is ready; mDNS probing takes ~1 s),
    then node B starts and we time B. Both have one mesh secret and ``discovery=("mdns",)``.
(a2) the same, but A and B start at the same moment (a cold mesh: nobody is announced yet).
(b) one machine: two processes on loopback, ``discovery=("local",)`` with a temporary
    registry directory, no secret. No multicast, no namespace needed.

How B is timed. The benchmark takes ``t0 = time.monotonic()`` just before ``Popen`` of B.
B is this file run with ``--role node``: it records ``time.monotonic()`` when its
interpreter starts running this file, after ``import subcog_crdt``, just before
``ConversationsApi.open()``, when ``open()`` returned, and when ``api.peers()`` first lists
a peer (B polls ``peers()`` every millisecond inside its own event loop, so the stamp is
taken in the node process, within ~1-2 ms of the link coming up, without a pipe or a
``state`` round trip in between). ``CLOCK_MONOTONIC`` is one clock for every process on
the machine, namespaces included (no time namespace is used), so B's stamps and ``t0``
compare directly. Nothing is added to the library.

Figures per run:
  total        t0 -> first peer (what a user waits for after launching a process)
  node start   t0 -> open() returned (interpreter + imports + open)
  imports      t0 -> every module the node needs imported (interpreter start + imports,
               including aiohttp and zeroconf which ``open()`` would import lazily)
  open->peer   open() called -> first peer (the library's own part: bind, start discovery,
               find, dial, authenticate, hello)
  ready->peer  open() returned -> first peer (discovery + connection after the node is up)

Targets: mDNS <= 1.5 s total; one machine <= 100 ms (judged on total and, since Python's
start-up alone is a large part of that, on open->peer as well).

    sudo .venv/bin/python benchmarks/bench_discovery.py [--runs 5] [--settle 2.0]
"""

from __future__ import annotations

import time

_T_EXEC = time.monotonic()  # as early as possible in a child: its interpreter is up

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ME = str(Path(__file__).resolve())
MDNS_TARGET_S = 1.5
LOCAL_TARGET_S = 0.100
PEER_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


# -- the node (child) ----------------------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _in_own_netns() -> bool:
    """True when this process is provably not in the host's network namespace: it differs
    from init's, or (where ``/proc/1`` is unreadable) it is one a NetnsLan created."""
    try:
        current = os.readlink("/proc/self/ns/net")
    except OSError:
        return False
    with contextlib.suppress(OSError):
        return current != os.readlink("/proc/1/ns/net")
    inode = current.removeprefix("net:[").removesuffix("]")
    with contextlib.suppress(OSError):
        for name in os.listdir("/run/netns"):
            lan_name = re.fullmatch(r"sc[0-9a-f]{4}(?:br|h[0-9]+)", name)  # NetnsLan's
            if lan_name and str(os.stat(f"/run/netns/{name}").st_ino) == inode:
                return True
    return False


async def _node(ns: argparse.Namespace) -> int:
    from subcog_crdt import ConversationsApi

    discovery = tuple(x for x in ns.discovery.split(",") if x)
    # What open() would import lazily (aiohttp ~0.2 s, zeroconf): imported here instead, so
    # "imports" holds all import time and "open->peer" only the library's work. The total
    # is the same either way.
    importlib.import_module("subcog_crdt._network")
    for kind in discovery:
        importlib.import_module(f"subcog_crdt._discovery.{kind}")
    t_imported = time.monotonic()
    if "mdns" in discovery and not _in_own_netns():
        # Never multicast on the host's own interfaces: mDNS only inside a test namespace.
        print("refusing mDNS outside a network namespace of ours", file=sys.stderr)
        return 2
    kw: dict[str, Any] = {"discovery": discovery, "user_id": "bench"}
    if ns.secret:
        kw["mesh_secret"] = ns.secret
    if ns.host:
        kw["host"] = ns.host
    if ns.discovery_dir:
        kw["discovery_dir"] = ns.discovery_dir
    loop = asyncio.get_running_loop()
    eof = asyncio.Event()

    def wait_stdin_eof() -> None:  # the parent closes our stdin to stop us
        with contextlib.suppress(Exception):
            sys.stdin.read()
        loop.call_soon_threadsafe(eof.set)

    threading.Thread(target=wait_stdin_eof, daemon=True).start()
    t_open = time.monotonic()
    api = ConversationsApi(**kw)
    await api.open()
    try:
        t_ready = time.monotonic()
        _emit({"ready": api.url, "node_id": api.node_id})
        deadline = t_open + PEER_TIMEOUT_S
        peers = api.peers()
        while not peers and not eof.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)  # the measurement's resolution, not a synchronisation
            peers = api.peers()
        t_peer = time.monotonic() if peers else None
        _emit(
            {
                "times": {
                    "exec": _T_EXEC,
                    "imported": t_imported,
                    "open": t_open,
                    "ready": t_ready,
                    "peer": t_peer,
                },
                "peer_id": peers[0].node_id if peers else None,
            }
        )
        await eof.wait()
    finally:
        await api.aclose()
    return 0


# -- driving children ----------------------------------------------------------------------


class Child:
    """A node process; a thread collects its JSON lines."""

    def __init__(self, proc: subprocess.Popen[str], name: str) -> None:
        self.proc = proc
        self.name = name
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self._lines.put(json.loads(raw))
        self._lines.put(None)

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        """The first line holding ``key`` (earlier lines without it are kept)."""
        for m in self._seen:
            if key in m:
                return m
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"{self.name} exited (rc={self.proc.wait()}) before {key!r}")
            self._seen.append(line)
            if key in line:
                return line
        raise RuntimeError(f"{self.name}: no {key!r} within {timeout}s")

    def stop(self) -> None:
        """Close stdin (the node closes cleanly), then kill the process group if needed."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()


def node_argv(*args: str) -> list[str]:
    return [sys.executable, ME, "--role", "node", *args]


def measure(t0: float, child: Child) -> dict[str, float]:
    """Seconds from ``t0`` (just before B's Popen) to each of B's stamps."""
    m = child.expect("times", PEER_TIMEOUT_S + READY_TIMEOUT_S)
    t = m["times"]
    if t["peer"] is None:
        raise RuntimeError(f"{child.name} found no peer within {PEER_TIMEOUT_S}s")
    return {
        "total": t["peer"] - t0,
        "node start": t["ready"] - t0,
        "imports": t["imported"] - t0,
        "open->peer": t["peer"] - t["open"],
        "ready->peer": t["peer"] - t["ready"],
    }


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        for c in reversed(started):
            with contextlib.suppress(Exception):
                c.stop()


# -- scenarios -----------------------------------------------------------------------------


def mdns_run(settle: float, together: bool) -> dict[str, float]:
    """One fresh two-host namespace LAN; returns B's figures."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.netns import NetnsLan

    secret = f"bench-secret-{secrets.token_hex(8)}"
    with NetnsLan(2) as lan, children() as kids:
        h1, h2 = lan.hosts

        def start(host: Any, name: str) -> Child:
            argv = node_argv("--secret", secret, "--discovery", "mdns", "--host", "0.0.0.0")
            proc = host.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            child = Child(proc, name)
            kids.append(child)
            return child

        if together:
            t0 = time.monotonic()
            start(h1, "A")
            b = start(h2, "B")
        else:
            a = start(h1, "A")
            a.expect("ready", READY_TIMEOUT_S)
            time.sleep(settle)  # pacing: let A finish probing + announcing (~1 s)
            t0 = time.monotonic()
            b = start(h2, "B")
        return measure(t0, b)


def local_run(settle: float) -> dict[str, float]:
    """Two processes on loopback with a private registry directory; returns B's figures."""
    with tempfile.TemporaryDirectory(prefix="bench-disc-") as reg, children() as kids:

        def start(name: str) -> Child:
            argv = node_argv("--discovery", "local", "--discovery-dir", reg)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            child = Child(proc, name)
            kids.append(child)
            return child

        a = start("A")
        a.expect("ready", READY_TIMEOUT_S)
        time.sleep(settle)  # pacing: A is idle and registered when B starts
        t0 = time.monotonic()
        b = start("B")
        return measure(t0, b)


def summarise(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    return {k: (min(r[k] for r in runs), statistics.median(r[k] for r in runs)) for k in runs[0]}


def report(title: str, runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    s = summarise(runs)
    print(f"\n{title}  ({len(runs)} runs)")
    print(f"  {'':12} {'min ms':>9} {'median ms':>10}   all runs, ms")
    for k, (lo, med) in s.items():
        every = " ".join(f"{r[k] * 1000:.0f}" for r in runs)
        print(f"  {k:12} {lo * 1000:9.1f} {med * 1000:10.1f}   {every}")
    return s


def verdict(label: str, value: float, target: float) -> str:
    ok = "MET" if value <= target else "NOT met"
    return f"  {label}: median {value * 1000:.0f} ms vs target {target * 1000:.0f} ms -> {ok}"


def repeat(n: int, fn: Callable[[], dict[str, float]], what: str) -> list[dict[str, float]]:
    runs = []
    for i in range(n):
        runs.append(fn())
        print(f"  {what} run {i + 1}/{n}: total {runs[-1]['total'] * 1000:.0f} ms", flush=True)
    return runs


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every teardown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", choices=["node"])
    ap.add_argument("--secret", default="")
    ap.add_argument("--host", default="")
    ap.add_argument("--discovery", default="")
    ap.add_argument("--discovery-dir", default="")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds between A ready and B")
    ap.add_argument("--skip-mdns", action="store_true")
    ap.add_argument("--skip-local", action="store_true")
    ns = ap.parse_args()
    if ns.role == "node":
        return asyncio.run(_node(ns))

    signal.signal(signal.SIGTERM, _terminate)
    lines: list[str] = ["\ntargets:"]
    if not ns.skip_mdns:
        sys.path.insert(0, str(ROOT / "tests"))
        from support.netns import netns_available

        ok, why = netns_available()
        if not ok:
            print(f"(a) mDNS over a namespace LAN: skipped ({why})")
            lines.append(f"  mDNS: not measured ({why})")
        else:
            runs = repeat(ns.runs, lambda: mdns_run(ns.settle, together=False), "mDNS")
            s = report("(a) mDNS, B joins a running A (namespace LAN)", runs)
            cold = repeat(ns.runs, lambda: mdns_run(ns.settle, together=True), "mDNS cold")
            c = report("(a2) mDNS, A and B start together (namespace LAN)", cold)
            lines.append(verdict("(a) mDNS total", s["total"][1], MDNS_TARGET_S))
            lines.append(verdict("(a2) mDNS cold total", c["total"][1], MDNS_TARGET_S))
            lines.append(verdict("(a2) mDNS cold open->peer", c["open->peer"][1], MDNS_TARGET_S))
    if not ns.skip_local:
        runs = repeat(ns.runs, lambda: local_run(min(ns.settle, 0.5)), "local")
        s = report("(b) one machine, local discovery (loopback)", runs)
        lines.append(verdict("(b) local total", s["total"][1], LOCAL_TARGET_S))
        lines.append(verdict("(b) local open->peer", s["open->peer"][1], LOCAL_TARGET_S))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
