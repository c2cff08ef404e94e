"""LocalDiscovery: several nodes in one process share a registry directory (tmp_path).

Also covers the small shared pieces of the discovery layer: :func:`mesh_tag` and
:class:`StaticDiscovery`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from helpers import wait_for
from subcog_crdt._discovery import local as local_mod
from subcog_crdt._discovery.base import Advert, Found, is_loopback_url, mesh_tag
from subcog_crdt._discovery.local import LocalDiscovery, default_directory
from subcog_crdt._discovery.static import StaticDiscovery
from subcog_crdt._errors import ClosedError, InvalidArgument, StorageError

DEADLINE = 5.0
TAG_A = mesh_tag(b"secret-a")
TAG_B = mesh_tag(b"secret-b")


class Recorder:
    """Collects the callbacks of one discovery instance."""

    def __init__(self) -> None:
        self.found: dict[str, Found] = {}
        self.found_log: list[Found] = []
        self.lost: list[str] = []

    def on_found(self, found: Found) -> None:
        self.found[found.node_id] = found
        self.found_log.append(found)

    def on_lost(self, node_id: str) -> None:
        self.found.pop(node_id, None)
        self.lost.append(node_id)


async def eventually(pred: Callable[[], bool], timeout: float = DEADLINE, what: str = "") -> None:
    """Poll ``pred`` until it holds; fail after ``timeout`` seconds."""
    await wait_for(pred, timeout, what)


async def scans(*ds: LocalDiscovery, n: int = 3) -> None:
    """Wait until each of ``ds`` has completed ``n`` more scans of the registry, so a
    negative assertion afterwards is about what those scans saw."""
    targets = [(d, d.scans_done + n) for d in ds]
    await eventually(lambda: all(d.scans_done >= t for d, t in targets), what=f"{n} more scans")


def finds(rec: Recorder, node_ids: set[str]) -> Callable[[], bool]:
    return lambda: set(rec.found) == node_ids


def advert(node_id: str, port: int, tag: str = "", host: str = "127.0.0.1") -> Advert:
    return Advert(node_id=node_id, url=f"ws://{host}:{port}", protocol=1, mesh_tag=tag)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def write_entry(directory: Path, name: str, /, **fields: object) -> Path:
    data: dict[str, object] = {
        "node_id": name,
        "url": "ws://127.0.0.1:9",
        "pid": os.getpid(),
        "protocol": 1,
        "mesh_tag": "",
    }
    data.update(fields)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "nodes"


class Nodes:
    """Starts LocalDiscovery instances and closes whatever is left at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.open: list[LocalDiscovery] = []

    async def start(self, adv: Advert) -> tuple[LocalDiscovery, Recorder]:
        d, rec = LocalDiscovery(self.directory, poll=0.02), Recorder()
        await d.start(adv, rec.on_found, rec.on_lost)
        self.open.append(d)
        return d, rec

    async def close(self) -> None:
        for d in self.open:
            await d.aclose()


@pytest.fixture
async def nodes(registry: Path) -> AsyncIterator[Nodes]:
    n = Nodes(registry)
    try:
        yield n
    finally:
        await n.close()


# -- mesh_tag ----------------------------------------------------------------------------------


def test_mesh_tag_is_one_way_and_stable() -> None:
    assert mesh_tag(None) == ""
    tag = mesh_tag(b"hunter2")
    assert tag == mesh_tag(b"hunter2")
    assert len(tag) == 16
    assert all(c in "0123456789abcdef" for c in tag)
    assert tag != mesh_tag(b"hunter3")
    assert "hunter2" not in tag
    assert b"hunter2".hex() not in tag


def test_is_loopback_url() -> None:
    assert is_loopback_url("ws://127.0.0.1:1")
    assert is_loopback_url("ws://127.5.0.1:1")
    assert is_loopback_url("ws://[::1]:1")
    assert is_loopback_url("ws://localhost:1")
    assert not is_loopback_url("ws://10.0.0.1:1")
    assert not is_loopback_url("ws://0.0.0.0:1")
    assert not is_loopback_url("not a url")


# -- LocalDiscovery ----------------------------------------------------------------------------


async def test_three_nodes_find_each_other(nodes: Nodes) -> None:
    started = [await nodes.start(advert(f"n{i}", 9000 + i)) for i in range(3)]
    for i, (_, rec) in enumerate(started):
        others = {f"n{j}" for j in range(3) if j != i}
        await eventually(finds(rec, others), what=f"n{i} finds {others}")
    _, rec0 = started[0]
    assert rec0.found["n1"] == Found("n1", "ws://127.0.0.1:9001", 1, "")
    await scans(started[0][0])
    for i, (_, rec) in enumerate(started):
        assert f"n{i}" not in {f.node_id for f in rec.found_log}, "a node never finds itself"
        assert len(rec.found_log) == 2, "each peer is reported once"
        assert rec.lost == []
    # The registry is private; entries are readable by the owner only.
    assert stat.S_IMODE(nodes.directory.stat().st_mode) == 0o700
    entry = nodes.directory / "n0.json"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    data = json.loads(entry.read_text())
    assert data["url"] == "ws://127.0.0.1:9000"
    assert data["pid"] == os.getpid()
    assert data["protocol"] == 1
    assert data["mesh_tag"] == ""


async def test_late_joiner_finds_running_nodes(nodes: Nodes) -> None:
    _, rec_a = await nodes.start(advert("a", 1))
    _, rec_b = await nodes.start(advert("b", 2))
    await eventually(lambda: "b" in rec_a.found and "a" in rec_b.found)
    _, rec_c = await nodes.start(advert("c", 3))
    await eventually(lambda: set(rec_c.found) == {"a", "b"})
    await eventually(lambda: "c" in rec_a.found and "c" in rec_b.found)


async def test_stale_entry_of_dead_process_is_ignored_and_removed(nodes: Nodes) -> None:
    nodes.directory.mkdir(mode=0o700)
    ghost = write_entry(nodes.directory, "ghost", pid=dead_pid())
    # A live pid whose process started at another time: the pid was reused.
    reused = write_entry(nodes.directory, "reused", started=1)
    _, rec = await nodes.start(advert("a", 1))
    await eventually(lambda: not ghost.exists() and not reused.exists(), what="stale removed")
    await nodes.start(advert("b", 2))
    await eventually(lambda: "b" in rec.found)
    assert "ghost" not in rec.found
    assert "reused" not in rec.found
    assert {f.node_id for f in rec.found_log} == {"b"}


async def test_peer_that_dies_without_closing_is_lost(nodes: Nodes, registry: Path) -> None:
    _, rec = await nodes.start(advert("a", 1))
    registry.mkdir(exist_ok=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_entry(registry, "child", pid=child.pid, started=local_mod._proc_start_time(child.pid))
        await eventually(lambda: "child" in rec.found)
    finally:
        child.kill()
        child.wait()
    await eventually(lambda: rec.lost == ["child"], what="kill -9'd peer lost")
    await eventually(lambda: not (registry / "child.json").exists())


async def test_aclose_removes_own_entry_and_peers_see_lost(nodes: Nodes) -> None:
    a, rec_a = await nodes.start(advert("a", 1))
    _, rec_b = await nodes.start(advert("b", 2))
    _, rec_c = await nodes.start(advert("c", 3))
    await eventually(lambda: set(rec_b.found) == {"a", "c"} and set(rec_c.found) == {"a", "b"})
    await a.aclose()
    assert not (nodes.directory / "a.json").exists()
    await eventually(lambda: rec_b.lost == ["a"] and rec_c.lost == ["a"], what="a lost by b, c")
    assert set(rec_b.found) == {"c"}
    # Closing is idempotent and the closed instance reports nothing more.
    await a.aclose()
    events = len(rec_a.found_log), len(rec_a.lost)
    await nodes.start(advert("d", 4))
    await eventually(lambda: "d" in rec_b.found)
    assert (len(rec_a.found_log), len(rec_a.lost)) == events


async def test_other_mesh_is_ignored(nodes: Nodes) -> None:
    a1, rec_a1 = await nodes.start(advert("a1", 1, TAG_A, host="10.9.9.1"))
    _, rec_a2 = await nodes.start(advert("a2", 2, TAG_A, host="10.9.9.2"))
    b1, rec_b1 = await nodes.start(advert("b1", 3, TAG_B))
    open_d, rec_open = await nodes.start(advert("open", 4))  # no secret
    await eventually(lambda: set(rec_a1.found) == {"a2"} and set(rec_a2.found) == {"a1"})
    assert rec_a1.found["a2"] == Found("a2", "ws://10.9.9.2:2", 1, TAG_A)
    await scans(b1)
    assert rec_b1.found_log == []
    assert rec_open.found_log == []
    assert {f.node_id for f in rec_a1.found_log} == {"a2"}
    # Leaving does not reach another mesh either.
    await b1.aclose()
    await scans(a1, open_d)
    assert rec_a1.lost == [] and rec_open.lost == []


async def test_without_secret_only_loopback(nodes: Nodes) -> None:
    d = LocalDiscovery(nodes.directory)
    with pytest.raises(InvalidArgument, match="loopback"):
        await d.start(advert("lan", 1, host="10.0.0.1"), Recorder().on_found, print)
    # A planted entry without a tag and with a LAN url is not reported either.
    nodes.directory.mkdir(mode=0o700, exist_ok=True)
    write_entry(nodes.directory, "planted", url="ws://10.0.0.2:1")
    a, rec = await nodes.start(advert("a", 1))
    await nodes.start(advert("b", 2))
    await eventually(lambda: "b" in rec.found)
    await scans(a)
    assert "planted" not in rec.found


async def test_malformed_entries_are_ignored(nodes: Nodes) -> None:
    nodes.directory.mkdir(mode=0o700)
    (nodes.directory / "junk.json").write_text("{not json")
    (nodes.directory / "list.json").write_text("[1, 2]")
    write_entry(nodes.directory, "wrongname", node_id="someone-else")
    write_entry(nodes.directory, "nopid", pid="1")
    (nodes.directory / "huge.json").write_text(" " * 10_000)
    (nodes.directory / "README").write_text("not an entry")
    a, rec = await nodes.start(advert("a", 1))
    await nodes.start(advert("b", 2))
    await eventually(lambda: "b" in rec.found)
    await scans(a)
    assert {f.node_id for f in rec.found_log} == {"b"}
    assert (nodes.directory / "junk.json").exists(), "unreadable entries are left alone"


async def test_changed_entry_is_reported_again(nodes: Nodes) -> None:
    _, rec = await nodes.start(advert("a", 1))
    nodes.directory.mkdir(exist_ok=True)
    write_entry(nodes.directory, "p", url="ws://127.0.0.1:5")
    await eventually(lambda: "p" in rec.found)
    write_entry(nodes.directory, "p", url="ws://127.0.0.1:6")
    await eventually(lambda: rec.found.get("p", None) == Found("p", "ws://127.0.0.1:6", 1, ""))
    (nodes.directory / "p.json").unlink()
    await eventually(lambda: rec.lost == ["p"])


async def test_own_entry_is_restored_if_deleted(nodes: Nodes) -> None:
    await nodes.start(advert("a", 1))
    own = nodes.directory / "a.json"
    assert own.exists()
    own.unlink()
    await eventually(own.exists, what="own entry written again")


async def test_registry_is_rebuilt_if_removed(nodes: Nodes) -> None:
    _, rec_a = await nodes.start(advert("a", 1))
    _, rec_b = await nodes.start(advert("b", 2))
    await eventually(lambda: "b" in rec_a.found and "a" in rec_b.found)
    shutil.rmtree(nodes.directory)
    await eventually(
        lambda: (
            nodes.directory.is_dir() and sorted(os.listdir(nodes.directory)) == ["a.json", "b.json"]
        )
    )
    assert stat.S_IMODE(nodes.directory.stat().st_mode) == 0o700
    await eventually(lambda: "b" in rec_a.found and "a" in rec_b.found)


async def test_node_id_announced_by_another_live_process_is_refused(
    nodes: Nodes, live_child: subprocess.Popen[bytes]
) -> None:
    nodes.directory.mkdir(mode=0o700)
    pid = live_child.pid
    write_entry(nodes.directory, "dup", pid=pid, started=local_mod._proc_start_time(pid))
    d = LocalDiscovery(nodes.directory)
    with pytest.raises(InvalidArgument, match="already announced"):
        await d.start(advert("dup", 1), Recorder().on_found, print)
    assert json.loads((nodes.directory / "dup.json").read_text())["pid"] == pid


async def test_lifecycle_and_bad_arguments(registry: Path) -> None:
    rec = Recorder()
    with pytest.raises(InvalidArgument):
        LocalDiscovery(registry, poll=0)
    d = LocalDiscovery(registry)
    await d.aclose()  # before start: harmless
    with pytest.raises(ClosedError):
        await d.start(advert("a", 1), rec.on_found, rec.on_lost)
    for bad in (
        advert("../escape", 1),
        advert(".hidden", 1),
        advert("", 1),
        Advert("a", "http://127.0.0.1:1", 1, ""),
        Advert("a", "ws://127.0.0.1", 1, ""),
        Advert("a", "ws://127.0.0.1:1", 1, "not-a-tag"),
    ):
        with pytest.raises(InvalidArgument):
            await LocalDiscovery(registry).start(bad, rec.on_found, rec.on_lost)
    async with LocalDiscovery(registry) as d2:
        await d2.start(advert("a", 1), rec.on_found, rec.on_lost)
        with pytest.raises(InvalidArgument, match="already started"):
            await d2.start(advert("a", 1), rec.on_found, rec.on_lost)
        assert (registry / "a.json").exists()
    assert not (registry / "a.json").exists()
    await d2.aclose()


async def test_callback_errors_do_not_stop_discovery(nodes: Nodes) -> None:
    seen: list[str] = []

    def bad(found: Found) -> None:
        seen.append(found.node_id)
        raise RuntimeError("boom")

    d = LocalDiscovery(nodes.directory, poll=0.02)
    nodes.open.append(d)
    await d.start(advert("a", 1), bad, print)
    await nodes.start(advert("b", 2))
    await eventually(lambda: seen == ["b"])
    await nodes.start(advert("c", 3))
    await eventually(lambda: seen == ["b", "c"])


async def test_default_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_directory() == tmp_path / "subcog-crdt" / "nodes"
    async with LocalDiscovery() as d:
        assert d.directory == tmp_path / "subcog-crdt" / "nodes"
        await d.start(advert("a", 1), Recorder().on_found, print)
        assert (d.directory / "a.json").exists()
        assert stat.S_IMODE(d.directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(d.directory.parent.stat().st_mode) == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_directory() == Path(f"/tmp/subcog-crdt-{os.getuid()}/nodes")


async def test_registry_owned_by_someone_else_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)
    with pytest.raises(StorageError, match="belongs to uid"):
        await LocalDiscovery(tmp_path / "nodes").start(advert("a", 1), Recorder().on_found, print)


# -- StaticDiscovery ---------------------------------------------------------------------------


async def test_static_reports_each_url_once() -> None:
    rec = Recorder()
    urls = ["ws://10.0.0.1:1", "ws://10.0.0.2:2", "ws://10.0.0.1:1", "ws://127.0.0.1:9"]
    async with StaticDiscovery(urls) as d:
        assert d.urls == ("ws://10.0.0.1:1", "ws://10.0.0.2:2", "ws://127.0.0.1:9")
        await d.start(advert("me", 9, TAG_A), rec.on_found, rec.on_lost)
        assert rec.found_log == [
            Found("", "ws://10.0.0.1:1", 1, TAG_A),
            Found("", "ws://10.0.0.2:2", 1, TAG_A),
        ]
        with pytest.raises(InvalidArgument):
            await d.start(advert("me", 9, TAG_A), rec.on_found, rec.on_lost)
    assert rec.lost == []
    with pytest.raises(ClosedError):
        await d.start(advert("me", 9, TAG_A), rec.on_found, rec.on_lost)


@pytest.mark.parametrize("bad", ["ws://host", "http://h:1", "h:1", "ws://:1"])
def test_static_rejects_bad_urls(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        StaticDiscovery([bad])


def test_static_rejects_single_string() -> None:
    with pytest.raises(InvalidArgument):
        StaticDiscovery("ws://h:1")


async def test_aclose_during_start_leaves_no_entry(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose() runs while start()'s thread is still about to write the entry: the entry
    must not be written after aclose() removed it (it stayed for the life of the
    process, and peers kept dialling a closed port), and no watch task starts."""
    import asyncio
    import threading

    entered, gate = threading.Event(), threading.Event()
    real_prepare = LocalDiscovery._prepare

    def held_prepare(self: LocalDiscovery) -> None:
        entered.set()
        gate.wait(10)
        real_prepare(self)

    monkeypatch.setattr(LocalDiscovery, "_prepare", held_prepare)
    rec = Recorder()
    d = LocalDiscovery(registry)
    starting = asyncio.ensure_future(d.start(advert("a", 1), rec.on_found, rec.on_lost))
    await wait_for(entered.is_set, 5, "start's thread running")
    closing = asyncio.ensure_future(d.aclose())
    await wait_for(lambda: d._removed or closing.done(), 5, "aclose removed the entry")
    gate.set()
    await asyncio.wait_for(asyncio.gather(starting, closing, return_exceptions=True), 10)
    assert not (registry / "a.json").exists()
    assert d._task is None


# -- malformed entries must not stop the watch -----------------------------------------------


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(lambda d: write_entry(d, "bigpid", pid=2**40), id="pid-overflows-pid_t"),
        pytest.param(
            lambda d: (d / "deep.json").write_text("[" * 2000 + "]" * 2000),
            id="json-nested-too-deep",
        ),
    ],
)
async def test_one_malformed_entry_does_not_blind_discovery(
    nodes: Nodes, plant: Callable[[Path], object]
) -> None:
    """One bad file (a pid too large for os.kill: OverflowError; JSON nested past the
    recursion limit: RecursionError) must be skipped like any malformed entry, not make
    every scan fail so that no peer is ever found (or lost) again."""
    nodes.directory.mkdir(mode=0o700)
    plant(nodes.directory)
    _, rec = await nodes.start(advert("a", 1))
    await nodes.start(advert("b", 2))
    await wait_for(lambda: "b" in rec.found, DEADLINE, "b found despite a malformed entry")
    assert set(rec.found) == {"b"}


# -- hostile files ----------------------------------------------------------------------------


async def test_fifo_at_own_entry_does_not_hang_start(nodes: Nodes) -> None:
    """A FIFO named like our own entry: start() must not block forever opening it (the
    duplicate-id check reads it with read_bytes(), which blocks on a FIFO without writer
    and reads a symlinked /dev/zero without bound)."""
    nodes.directory.mkdir(mode=0o700)
    fifo = nodes.directory / "a.json"
    os.mkfifo(fifo)
    d, rec = LocalDiscovery(nodes.directory, poll=0.02), Recorder()
    nodes.open.append(d)
    task = asyncio.ensure_future(d.start(advert("a", 1), rec.on_found, rec.on_lost))
    done, _ = await asyncio.wait([task], timeout=DEADLINE)
    # Unblock a reader stuck in open() (opening the write end succeeds only if one waits).
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    await asyncio.wait([task], timeout=DEADLINE)
    if task.done():
        task.exception()  # either outcome is fine once it returns
    assert done, "start() hung on a FIFO at the node's own entry"


async def test_tmp_symlink_is_not_followed_out_of_registry(nodes: Nodes, tmp_path: Path) -> None:
    """A symlink planted at the node's temporary file name must not make the node write
    through it (truncating a file outside the registry), nor end up renamed into place as
    the node's entry (a symlink entry is ignored by peers: the node becomes invisible)."""
    nodes.directory.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (nodes.directory / f".a.{os.getpid()}.tmp").symlink_to(victim)
    _, rec_b = await nodes.start(advert("b", 2))
    with contextlib.suppress(Exception):  # refusing to start is acceptable
        await nodes.start(advert("a", 1))
    assert victim.read_text() == "precious"
    own = nodes.directory / "a.json"
    if own.exists() or own.is_symlink():
        assert stat.S_ISREG(own.lstat().st_mode)
        await wait_for(lambda: "a" in rec_b.found, DEADLINE, "b finds a")


async def test_special_files_in_registry_are_skipped(nodes: Nodes, tmp_path: Path) -> None:
    """FIFOs, symlinks (to a valid-looking entry outside) and directories with entry names
    are neither reported nor followed, and do not stall the scan."""
    nodes.directory.mkdir(mode=0o700)
    os.mkfifo(nodes.directory / "fifo.json")
    outside = write_entry(tmp_path, "link")
    (nodes.directory / "link.json").symlink_to(outside)
    (nodes.directory / "dir.json").mkdir()
    a, rec = await nodes.start(advert("a", 1))
    await nodes.start(advert("b", 2))
    await wait_for(lambda: "b" in rec.found, DEADLINE, "b found")
    await scans(a)
    assert set(rec.found) == {"b"}
    assert outside.exists() and (nodes.directory / "link.json").is_symlink()


# -- registry permissions ---------------------------------------------------------------------


async def test_loose_preexisting_registry_is_made_private(nodes: Nodes) -> None:
    """An existing registry with a group/world-writable mode is tightened to 0700."""
    nodes.directory.mkdir()
    os.chmod(nodes.directory, 0o777)
    await nodes.start(advert("a", 1))
    assert stat.S_IMODE(nodes.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((nodes.directory / "a.json").stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant a file of another uid")
async def test_entry_planted_by_another_user_is_ignored(nodes: Nodes) -> None:
    """A registry that was world-writable before we tightened it may hold entries another
    local user planted: only entries owned by us may be reported (and dialled)."""
    nodes.directory.mkdir()
    os.chmod(nodes.directory, 0o777)
    planted = write_entry(nodes.directory, "planted", url="ws://127.0.0.1:7")
    os.chown(planted, 4242, 4242)
    a, rec = await nodes.start(advert("a", 1))
    await nodes.start(advert("b", 2))
    await wait_for(lambda: "b" in rec.found, DEADLINE, "b found")
    await scans(a)
    assert "planted" not in rec.found


# -- real node processes ----------------------------------------------------------------------

CHILD = """
import asyncio, sys
from subcog_crdt import ConversationsApi

async def main(reg, data, n):
    async with ConversationsApi(
        data_dir=data, host="127.0.0.1", discovery=("local",), discovery_dir=reg
    ) as api:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(api._links) < n - 1:  # a condition, polled until a deadline
            if loop.time() > deadline:
                sys.exit("the other nodes were not linked within 30 s")
            await asyncio.sleep(0.02)
        print(api.node_id, flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_node_processes_killed_or_closed_leave_no_entries(tmp_path: Path) -> None:
    """Several node processes meet through the registry; entries of the ones killed with
    SIGKILL are removed by the survivors, and the survivors' close removes their own."""
    n = 4
    reg = tmp_path / "reg"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(reg), str(tmp_path / f"d{i}"), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        for i in range(n)
    ]
    try:
        loop = asyncio.get_running_loop()
        ids = []
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(loop.run_in_executor(None, p.stdout.readline), 60)
            ids.append(line.decode().strip())
        assert all(ids), "every node saw all the others"
        assert stat.S_IMODE(reg.stat().st_mode) == 0o700
        for p in procs[:2]:
            p.kill()
            p.wait()
        await wait_for(
            lambda: sorted(os.listdir(reg)) == sorted(f"{i}.json" for i in ids[2:]),
            20,
            "entries of killed nodes removed",
        )
        for p in procs[2:]:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs[2:]:
            assert await loop.run_in_executor(None, p.wait, 30) == 0
        assert os.listdir(reg) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()
