"""Review of same-machine discovery (LocalDiscovery and its wiring in ``_network``):
a registry made or swapped by someone else, entries planted by another uid, two nodes
with one node id (a copied data_dir), kill -9 and restart, churn and many entries.

Every registry is a directory under ``tmp_path`` (never the real default one); node
processes and nodes listen on 127.0.0.1; every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from helpers import wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._discovery import local as local_mod
from subcog_crdt._discovery.base import Advert, Found
from subcog_crdt._discovery.local import LocalDiscovery
from subcog_crdt._errors import InvalidArgument, StorageError
from subcog_crdt._transport.base import PROTOCOL_VERSION

DEADLINE = 10.0
OTHER_UID = 4242
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid")


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


def put_entry(directory: Path, node_id: str, url: str, pid: int, protocol: int = 1) -> Path:
    """An entry as a node writes it (atomically, with the process start time)."""
    data = {
        "node_id": node_id,
        "url": url,
        "pid": pid,
        "started": local_mod._proc_start_time(pid),
        "protocol": protocol,
        "mesh_tag": "",
    }
    path = directory / f"{node_id}.json"
    tmp = directory / f".{node_id}.test.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def node(data_dir: Path, registry: Path | None, **kw: object) -> ConversationsApi:
    discovery = ("local",) if registry is not None else ()
    return ConversationsApi(
        data_dir=data_dir,
        host="127.0.0.1",
        discovery=discovery,
        discovery_dir=registry,
        **kw,  # type: ignore[arg-type]
    )


def scanner_of(api: ConversationsApi) -> LocalDiscovery:
    d = api._discovery[0]
    assert isinstance(d, LocalDiscovery)
    return d


async def scans(d: LocalDiscovery, n: int = 3) -> None:
    """Wait until ``d`` completed ``n`` more scans (a negative check is about those)."""
    target = d.scans_done + n
    await wait_for(lambda: d.scans_done >= target, DEADLINE, f"{n} more scans")


async def attempted_scans(d: LocalDiscovery, n: int = 3) -> None:
    """Wait until ``d`` tried ``n`` more scans, failed ones included."""
    calls = 0
    real = d._scan

    def counting() -> dict[str, object]:
        nonlocal calls
        try:
            return real()  # type: ignore[return-value]
        finally:
            calls += 1

    d._scan = counting  # type: ignore[assignment,method-assign]
    try:
        await wait_for(lambda: calls >= n, DEADLINE, f"{n} more scan attempts")
    finally:
        del d._scan


# -- two nodes with one node id ---------------------------------------------------------------


async def test_copied_data_dir_opened_twice_in_one_process_is_refused(tmp_path: Path) -> None:
    """A copy of a data_dir carries its node id. In another process the copy is refused
    ("already announced"); in the same process it used to open: its entry replaced the
    first node's, so the first was no longer found and its writes never reached a third
    node (whose link to that id was taken by the copy). It must be refused here too."""
    registry = tmp_path / "reg"
    async with node(tmp_path / "a", registry):
        pass
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")
    async with node(tmp_path / "a", registry) as first:
        own = registry / f"{first.node_id}.json"
        url_before = json.loads(own.read_text())["url"]
        copy = node(tmp_path / "a-copy", registry)
        try:
            with pytest.raises(InvalidArgument, match="already announced"):
                await copy.open()
        finally:
            await copy.aclose()
        assert json.loads(own.read_text())["url"] == url_before == first.url


# -- the registry, made or replaced by someone else ------------------------------------------


@needs_root
async def test_registry_of_another_uid_refuses_open_and_frees_the_data_dir(
    tmp_path: Path,
) -> None:
    """A registry directory another uid made first (here world-writable, with an entry of
    theirs) is not used: open() fails with StorageError, nothing is written into it, and
    the node undid its start (the same data_dir opens at once with a private registry)."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chmod(foreign, 0o777)
    planted = put_entry(foreign, "planted", "ws://127.0.0.1:7", os.getpid())
    os.chown(planted, OTHER_UID, OTHER_UID)
    os.chown(foreign, OTHER_UID, OTHER_UID)
    api = node(tmp_path / "a", foreign)
    with pytest.raises(StorageError, match="belongs to uid"):
        await api.open()
    await api.aclose()
    assert os.listdir(foreign) == ["planted.json"]
    assert stat.S_IMODE(foreign.stat().st_mode) == 0o777, "someone else's directory is left"
    async with node(tmp_path / "a", tmp_path / "mine") as again:
        assert os.listdir(tmp_path / "mine") == [f"{again.node_id}.json"]


@needs_root
async def test_own_node_id_entry_planted_by_another_uid_does_not_block_start(
    tmp_path: Path,
) -> None:
    """A registry that was loose before this node tightened it may hold an entry another
    uid planted under this node's id, naming a live pid (init's). Entries of another uid
    are "not this user's node" (the scan ignores them; docs: only files owned by this user
    are read), but the duplicate-id check at start read it and refused to start."""
    registry = tmp_path / "reg"
    registry.mkdir()
    os.chmod(registry, 0o777)
    planted = put_entry(registry, "a", "ws://127.0.0.1:7", 1)
    os.chown(planted, OTHER_UID, OTHER_UID)
    d = LocalDiscovery(registry, poll=0.02)
    try:
        await d.start(advert("a", 1), Recorder().on_found, Recorder().on_lost)
        own = registry / "a.json"
        assert own.lstat().st_uid == os.geteuid()
        assert json.loads(own.read_text())["pid"] == os.getpid()
    finally:
        await d.aclose()


def _replace_with_foreign_dir(registry: Path, tmp_path: Path) -> Path:
    shutil.rmtree(registry)
    registry.mkdir()
    os.chmod(registry, 0o755)
    os.chown(registry, OTHER_UID, OTHER_UID)
    return registry


def _replace_with_symlink(registry: Path, tmp_path: Path) -> Path:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    shutil.rmtree(registry)
    registry.symlink_to(elsewhere)
    return elsewhere


@pytest.mark.parametrize(
    "swap",
    [
        pytest.param(_replace_with_foreign_dir, id="dir-of-another-uid", marks=needs_root),
        pytest.param(_replace_with_symlink, id="symlink-elsewhere"),
    ],
)
async def test_registry_replaced_while_running_is_not_written_into(
    tmp_path: Path, swap: Callable[[Path, Path], Path]
) -> None:
    """start() refuses a registry of another uid or a symlink; a registry *replaced* by
    one while the node runs (a custom discovery_dir in a shared parent) must be refused
    the same way, not have the node's entry written into it. Only a missing registry
    re-ran the checks; a replaced one was trusted and written into on the next scan."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    registry = shared / "nodes"
    d = LocalDiscovery(registry, poll=0.02)
    try:
        await d.start(advert("a", 1), Recorder().on_found, Recorder().on_lost)
        target = swap(registry, tmp_path)
        await attempted_scans(d, 5)
        assert os.listdir(target) == [], "the node wrote its entry into a registry not its own"
    finally:
        await d.aclose()


# -- two node ids at one url ------------------------------------------------------------------


async def test_url_of_a_found_node_is_redialled_for_it_after_another_id_there_is_lost(
    tmp_path: Path,
) -> None:
    """C is found at its url; then an entry naming another id at that url appears and
    goes (a stale or lying entry). The url stays kept, since discovery still reports C
    there, but its redial loop kept expecting the vanished id: every redial then failed
    with 4003 ("expected node 'ghost' there"), so after a drop the link to C never came
    back. The loop must expect the node still reported at the url."""
    registry = tmp_path / "reg"
    registry.mkdir(mode=0o700)
    async with node(tmp_path / "c", None) as c, node(tmp_path / "a", registry) as a:
        assert c.url is not None
        put_entry(registry, c.node_id, c.url, os.getpid(), PROTOCOL_VERSION)
        await wait_for(lambda: c.node_id in a._links, DEADLINE, "a linked to c")
        scanner = scanner_of(a)
        ghost = put_entry(registry, "ghost", c.url, os.getpid(), PROTOCOL_VERSION)
        await wait_for(lambda: "ghost" in scanner.peers, DEADLINE, "a found the ghost")
        ghost.unlink()
        await wait_for(lambda: "ghost" not in scanner.peers, DEADLINE, "a lost the ghost")
        await wait_for(lambda: not a._tasks, DEADLINE, "a's spawned tasks finished")
        assert c.node_id in scanner.peers
        # Only a dials (c has no discovery): drop the link from c's side.
        await c._links[a.node_id].link.close(1000, "dropped by the test")
        await wait_for(lambda: a.node_id not in c._links, DEADLINE, "the link dropped")
        await wait_for(lambda: a.node_id in c._links, DEADLINE, "a redialled c")


# -- churn and many entries --------------------------------------------------------------------


async def test_churning_entry_leaves_no_redial_loop_and_keeps_real_peers(tmp_path: Path) -> None:
    """An entry that appears and vanishes again and again (bounded: 30 rounds, each
    waited on) is found and lost every time; afterwards no redial loop or spawned task
    is left for it, and the real peer stays linked."""
    registry = tmp_path / "reg"
    async with node(tmp_path / "a", registry) as a, node(tmp_path / "b", registry) as b:
        await wait_for(lambda: b.node_id in a._links, DEADLINE, "a and b linked")
        scanner = scanner_of(a)
        dead_url = f"ws://127.0.0.1:{free_port()}"
        for _ in range(30):
            put_entry(registry, "flapper", dead_url, os.getpid(), PROTOCOL_VERSION)
            await wait_for(lambda: "flapper" in scanner.peers, DEADLINE, "flapper found")
            (registry / "flapper.json").unlink()
            await wait_for(lambda: "flapper" not in scanner.peers, DEADLINE, "flapper lost")
        assert a._transport is not None
        await wait_for(lambda: not a._tasks, DEADLINE, "a's spawned tasks finished")
        assert dead_url not in a._transport._redialers
        assert set(a._transport._redialers) == {b.url}
        assert b.node_id in a._links and a.node_id in b._links


async def test_thousands_of_entries_are_scanned_without_rereading_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2000 entries (live, malformed, of dead processes): dead ones are removed, the
    live ones reported, and once nothing changes a scan reads no entry file again (each
    is re-read only when its inode, mtime or size change); the per-name cache holds
    exactly the files present."""
    registry = tmp_path / "reg"
    registry.mkdir(mode=0o700)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    for i in range(2000):
        if i % 4 == 0:
            put_entry(registry, f"live{i}", f"ws://127.0.0.1:{1000 + i}", os.getpid())
        elif i % 4 == 1:
            put_entry(registry, f"dead{i}", f"ws://127.0.0.1:{1000 + i}", dead)
        elif i % 4 == 2:
            (registry / f"junk{i}.json").write_bytes(b"\xff\xfe{not json")
        else:
            (registry / f"far{i}.json").write_text(
                json.dumps(
                    {
                        "node_id": f"far{i}",
                        "url": "ws://127.0.0.1:9",
                        "pid": os.getpid(),
                        "started": 2**62,  # a start time far in the future: not this process
                        "protocol": 1,
                        "mesh_tag": "",
                    }
                )
            )
    rec = Recorder()
    d = LocalDiscovery(registry, poll=0.02)
    try:
        await d.start(advert("a", 1), rec.on_found, rec.on_lost)
        await wait_for(lambda: len(rec.found) == 500, DEADLINE * 3, "the 500 live entries found")
        await scans(d, 2)
        left = set(os.listdir(registry))
        assert len(left) == 1 + 500 + 500  # own, live, junk: dead and far-future removed
        assert not any(n.startswith(("dead", "far")) for n in left)
        reads: list[Path] = []
        real = local_mod._read_regular

        def counting(path: Path) -> bytes | None:
            reads.append(path)
            return real(path)

        monkeypatch.setattr(local_mod, "_read_regular", counting)
        await scans(d, 3)
        assert reads == []
        assert set(d._cache) == left - {"a.json"}
        assert rec.lost == []
    finally:
        await d.aclose()


# -- kill -9, a stale entry, a restart, a copy in another process ----------------------------

CHILD = """
import asyncio, sys
from subcog_crdt import ConversationsApi

async def main(reg, data, ns):
    async with ConversationsApi(
        data_dir=data, host="127.0.0.1", discovery=("local",), discovery_dir=reg
    ) as api:
        s = await api.register_session("child", subscribe=[ns])
        await s.capture(ns, "written by " + data + " in " + ns)
        print(api.node_id, api.url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


class Children:
    """Node processes of one test (asyncio subprocesses: no thread blocks on them)."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, reg: Path, data: Path, ns: str) -> asyncio.subprocess.Process:
        """A node process on ``data``; its stderr goes to ``<data>.err``."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        with open(f"{data}.err", "wb") as err:
            p = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CHILD,
                str(reg),
                str(data),
                ns,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
            )
        self.procs.append(p)
        return p

    async def kill_all(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.kill()
            await p.wait()


@pytest.fixture
async def children() -> AsyncIterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        await c.kill_all()


async def read_line(p: asyncio.subprocess.Process) -> str:
    assert p.stdout is not None
    line = await asyncio.wait_for(p.stdout.readline(), 60)
    return line.decode().strip()


async def test_kill9_entry_is_ignored_then_replaced_by_the_restart_and_a_copy_is_refused(
    tmp_path: Path, children: Children
) -> None:
    """A node process killed with SIGKILL leaves its entry. A node started later neither
    reports nor dials it and removes it; the node restarted from the same data_dir (same
    id, new pid and port) announces itself again, is found and linked, and its writes
    arrive. A copy of that data_dir started in another process meanwhile is refused and
    leaves the running node's entry and link alone."""
    reg = tmp_path / "reg"
    data = tmp_path / "a"
    first = await children.start(reg, data, "first")
    node_id, old_url = (await read_line(first)).split()
    entry = reg / f"{node_id}.json"
    assert json.loads(entry.read_text())["pid"] == first.pid
    first.send_signal(signal.SIGKILL)
    await asyncio.wait_for(first.wait(), 30)
    assert json.loads(entry.read_text())["pid"] == first.pid, "nobody removed it yet"
    shutil.copytree(data, tmp_path / "a-copy")

    async with node(tmp_path / "b", reg) as b:
        scanner = scanner_of(b)
        await wait_for(lambda: not entry.exists(), DEADLINE, "b removed the stale entry")
        assert node_id not in scanner.peers
        assert b._transport is not None and old_url not in b._transport._redialers

        second = await children.start(reg, data, "second")
        assert (await read_line(second)).split()[0] == node_id
        await wait_for(lambda: node_id in b._links, DEADLINE, "b linked to the restarted node")
        assert json.loads(entry.read_text())["pid"] == second.pid
        await wait_for(
            lambda: b.recall("written", namespace="second"), DEADLINE, "its write arrived"
        )

        copy = await children.start(reg, tmp_path / "a-copy", "copy")
        await asyncio.wait_for(copy.communicate(), 60)
        assert copy.returncode != 0, "the copy opened beside the running node"
        assert b"already announced" in (tmp_path / "a-copy.err").read_bytes()
        assert json.loads(entry.read_text())["pid"] == second.pid
        await scans(scanner)
        assert node_id in b._links and scanner.peers[node_id].url != old_url
        assert not b.recall("written", namespace="copy")
        # Hold b's scans (which remove entries of dead processes) while the node closes:
        # its entry must be gone by the time its process has exited.
        await asyncio.to_thread(scanner._io_lock.acquire)
        try:
            assert second.stdin is not None
            second.stdin.close()
            assert await asyncio.wait_for(second.wait(), 30) == 0
            assert not entry.exists(), "a clean shutdown left its entry"
        finally:
            scanner._io_lock.release()
        await wait_for(lambda: node_id not in scanner.peers, DEADLINE, "b lost the node")
