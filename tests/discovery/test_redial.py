"""Discovery wired to the redial loops, and registry entries that must not outlive their
node: a cancelled start, a zombie process, a node that moved, a node replaced by another
at its url within one scan.

Real processes and loopback sockets; every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from helpers import wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._discovery import local as local_mod
from subcog_crdt._discovery.base import Advert, Found
from subcog_crdt._discovery.local import LocalDiscovery
from subcog_crdt._transport.base import PROTOCOL_VERSION
from support.netns import NetnsLan, make_lan_fixture

DEADLINE = 10.0


class Recorder:
    def __init__(self) -> None:
        self.found: dict[str, Found] = {}
        self.lost: list[str] = []

    def on_found(self, found: Found) -> None:
        self.found[found.node_id] = found

    def on_lost(self, node_id: str) -> None:
        self.found.pop(node_id, None)
        self.lost.append(node_id)


def advert(node_id: str, port: int) -> Advert:
    return Advert(node_id=node_id, url=f"ws://127.0.0.1:{port}", protocol=1, mesh_tag="")


def put_entry(directory: Path, node_id: str, url: str | None, pid: int) -> Path:
    """Write a registry entry atomically, as a node does (a scan never sees half of it)."""
    assert url is not None
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = {
        "node_id": node_id,
        "url": url,
        "pid": pid,
        "started": local_mod._proc_start_time(pid),
        "protocol": PROTOCOL_VERSION,
        "mesh_tag": "",
    }
    path = directory / f"{node_id}.json"
    tmp = directory / f".{node_id}.test.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


def free_port() -> int:
    """A loopback port nobody listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2 :].split()[0].decode()


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "nodes"


@pytest.fixture
def zombie() -> Iterator[subprocess.Popen[bytes]]:
    """A child killed -9 and not reaped: a zombie until the fixture ends (then reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = local_mod._proc_start_time(proc.pid)
        assert started is not None
        proc.started = started  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def kill_unreaped(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # no wait(): the parent (this test) reaps it later
    await wait_for(lambda: proc_state(proc.pid) == "Z", DEADLINE, "the child to be a zombie")


@pytest.fixture
async def discoveries() -> AsyncIterator[list[LocalDiscovery]]:
    started: list[LocalDiscovery] = []
    try:
        yield started
    finally:
        for d in started:
            await d.aclose()


# -- a cancelled start ---------------------------------------------------------------------


async def test_cancelled_start_leaves_no_entry(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start() cancelled while its worker thread prepares the entry (open() under
    asyncio.timeout, say): the thread still writes the entry, so start() must remove it
    before it re-raises; it used to leave it, naming a live pid and a dead url, and a later
    aclose() did not remove it either."""
    entered, release, written = threading.Event(), threading.Event(), threading.Event()
    write_own = LocalDiscovery._write_own

    def gated(self: LocalDiscovery) -> None:
        entered.set()
        release.wait(DEADLINE)
        write_own(self)
        written.set()

    monkeypatch.setattr(LocalDiscovery, "_write_own", gated)
    d, rec = LocalDiscovery(registry), Recorder()
    task = asyncio.create_task(d.start(advert("a", 1), rec.on_found, rec.on_lost))
    assert await asyncio.to_thread(entered.wait, DEADLINE)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(written.wait, DEADLINE)  # the thread did write it
    assert not (registry / "a.json").exists()
    await d.aclose()
    assert sorted(os.listdir(registry)) == []


async def test_aclose_after_a_twice_cancelled_start_removes_the_entry(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second cancel ends start()'s wait for the clean-up, not the clean-up: aclose()
    returns once the entry is gone."""
    entered, release = threading.Event(), threading.Event()
    write_own = LocalDiscovery._write_own

    def gated(self: LocalDiscovery) -> None:
        entered.set()
        release.wait(DEADLINE)
        write_own(self)

    monkeypatch.setattr(LocalDiscovery, "_write_own", gated)
    d, rec = LocalDiscovery(registry), Recorder()
    task = asyncio.create_task(d.start(advert("a", 1), rec.on_found, rec.on_lost))
    assert await asyncio.to_thread(entered.wait, DEADLINE)
    task.cancel()
    await wait_for(lambda: d._undo is not None, DEADLINE, "start() to begin its clean-up")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await d.aclose()
    assert sorted(os.listdir(registry)) == []


# -- zombies -------------------------------------------------------------------------------


async def test_entry_of_a_zombie_is_removed_and_reported_lost(
    registry: Path, zombie: subprocess.Popen[bytes], discoveries: list[LocalDiscovery]
) -> None:
    """A node killed -9 whose parent has not reaped it yet still passes os.kill(pid, 0)
    and keeps its start time, but its sockets are gone: its entry used to stay, and peers
    dialled it until the parent reaped it."""
    entry = put_entry(registry, "z", f"ws://127.0.0.1:{free_port()}", zombie.pid)
    d, rec = LocalDiscovery(registry, poll=0.02), Recorder()
    await d.start(advert("a", 1), rec.on_found, rec.on_lost)
    discoveries.append(d)
    await wait_for(lambda: "z" in rec.found, DEADLINE, "z found")
    await kill_unreaped(zombie)
    await wait_for(lambda: rec.lost == ["z"], DEADLINE, "z lost")
    assert not entry.exists()
    assert proc_state(zombie.pid) == "Z"  # still unreaped when it was found dead


async def test_node_id_of_a_zombie_can_be_announced_again(
    registry: Path, zombie: subprocess.Popen[bytes], discoveries: list[LocalDiscovery]
) -> None:
    """A durable node restarted (same node id) before its parent reaped the killed one:
    start() used to refuse, "node id ... is already announced by pid N"."""
    await kill_unreaped(zombie)
    put_entry(registry, "dup", f"ws://127.0.0.1:{free_port()}", zombie.pid)
    d = LocalDiscovery(registry, poll=0.02)
    await d.start(advert("dup", 2), Recorder().on_found, Recorder().on_lost)
    discoveries.append(d)
    assert json.loads((registry / "dup.json").read_text())["pid"] == os.getpid()
    assert proc_state(zombie.pid) == "Z"  # the refusal was about a zombie indeed


# -- discovery and the redial loops of a node ----------------------------------------------


def redialers(api: ConversationsApi) -> set[str]:
    assert api._transport is not None
    return set(api._transport._redialers)


def linked(api: ConversationsApi, node_id: str) -> bool:
    return any(p.node_id == node_id for p in api.peers())


async def test_node_that_moved_is_no_longer_dialled_at_its_old_url(registry: Path) -> None:
    """A node reported at a new url (restarted on another port between two scans) keeps
    one redial loop, for the new url; the loop for the old one used to run on forever,
    dialling a dead port (and nothing removed it when the node was lost)."""
    async with (
        ConversationsApi(discovery=()) as n,
        ConversationsApi(discovery=("local",), discovery_dir=registry) as a,
    ):
        old_url = f"ws://127.0.0.1:{free_port()}"
        entry = put_entry(registry, n.node_id, old_url, os.getpid())
        await wait_for(lambda: redialers(a) == {old_url}, DEADLINE, "a dials the old url")
        put_entry(registry, n.node_id, n.url, os.getpid())
        await wait_for(lambda: linked(a, n.node_id), DEADLINE, "a linked to n at its new url")
        await wait_for(lambda: redialers(a) == {n.url}, DEADLINE, "only the new url dialled")
        entry.unlink()
        await wait_for(lambda: redialers(a) == set(), DEADLINE, "n lost: nothing dialled")


async def test_node_lost_and_another_found_at_its_url_in_one_scan(registry: Path) -> None:
    """One scan reports B lost and C found at B's url: a redial loop for C must remain.
    The loss only scheduled remove_peer(url); the found was deduplicated against B's loop,
    which the scheduled removal then cancelled, so C was never dialled."""
    async with (
        ConversationsApi(discovery=()) as c,
        ConversationsApi(discovery=("local",), discovery_dir=registry) as a,
    ):
        b_entry = put_entry(registry, "node-b", c.url, os.getpid())
        await wait_for(lambda: redialers(a) == {c.url}, DEADLINE, "a dials b's url")
        scanner = a._discovery[0]
        assert isinstance(scanner, LocalDiscovery)
        # Hold a's scans while the registry changes, so that one scan sees both changes.
        await asyncio.to_thread(scanner._io_lock.acquire)
        try:
            b_entry.unlink()
            put_entry(registry, c.node_id, c.url, os.getpid())
        finally:
            scanner._io_lock.release()
        await wait_for(
            lambda: c.node_id in scanner.peers and "node-b" not in scanner.peers,
            DEADLINE,
            "a's scan saw both changes",
        )
        await wait_for(lambda: linked(a, c.node_id), DEADLINE, "a linked to c")
        assert redialers(a) == {c.url}


async def test_url_given_to_connect_is_kept_when_discovery_loses_its_node(
    registry: Path,
) -> None:
    """connect(url) promises redials after a drop. Discovery used to release the url when
    it lost the node it had found there, stopping the loop the user asked for."""
    async with (
        ConversationsApi(discovery=()) as n,
        ConversationsApi(discovery=("local",), discovery_dir=registry) as a,
    ):
        entry = put_entry(registry, n.node_id, n.url, os.getpid())
        await wait_for(lambda: linked(a, n.node_id), DEADLINE, "a found and linked to n")
        await a.connect(n.url)
        entry.unlink()
        scanner = a._discovery[0]
        assert isinstance(scanner, LocalDiscovery)
        await wait_for(lambda: n.node_id not in scanner.peers, DEADLINE, "a's scan lost n")
        # The release runs from the scan's callback; wait for any remove_peer it spawned.
        await wait_for(lambda: not a._tasks, DEADLINE, "a's spawned tasks finished")
        assert redialers(a) == {n.url}


# -- local and mDNS together (inside a test namespace) ---------------------------------------

lan1 = make_lan_fixture(1, name="lan1")
PROBE = Path(__file__).with_name("redial_probe.py")


def test_urls_of_a_node_found_by_two_mechanisms_are_dropped_when_unreported(
    lan1: NetnsLan, tmp_path: Path
) -> None:
    """A node is found at a loopback url (local) and a LAN url (mDNS). Each url keeps its
    redial loop exactly while a mechanism reports it: after kill -9 only mDNS does; after a
    restart on a new port the old urls go; after a clean stop nothing is dialled. Discovery
    used to keep one url per node id: the other url's loop, and the old LAN url's after the
    restart, ran on forever."""
    res = lan1.hosts[0].run([sys.executable, str(PROBE), "--dir", str(tmp_path)], timeout=120)
    steps = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    what = f"steps={steps} stderr={res.stderr[-3000:]}"
    assert [s["step"] for s in steps] == ["found twice", "killed", "restarted", "stopped"], what
    assert all(s["ok"] for s in steps), what
    assert res.returncode == 0, what
