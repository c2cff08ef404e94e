"""Same-machine discovery through a registry directory; no multicast, no network.

Every node writes ``<node_id>.json`` (url, pid, process start time, protocol, mesh tag)
into one directory, atomically (temporary file + ``os.replace``), and polls the directory:
a new entry of the same mesh is reported through ``on_found``, a vanished one through
``on_lost``. Entries of dead processes (``os.kill(pid, 0)`` says there is no such process,
``/proc`` shows a zombie that its parent has not reaped yet, or the pid now belongs to a
younger process) are ignored and removed. ``aclose()`` removes the node's own entry, and so
does a ``start()`` that fails or is cancelled.

The default directory is ``$XDG_RUNTIME_DIR/subcog-crdt/nodes``, else
``/tmp/subcog-crdt-<uid>/nodes``; it is created with mode 0700 and must belong to the
current user. Without a mesh secret (``mesh_tag == ""``) only loopback URLs are announced
and accepted.

All file work runs in a worker thread (``asyncio.to_thread``); the event loop only compares
the result with what it reported before. A poll that finds nothing new reads no file: each
entry is re-read only when its inode, mtime or size changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subcog_crdt._lifecycle import AsyncClosing

from .._errors import InvalidArgument, StorageError
from .base import (
    Advert,
    Found,
    _check_advert,
    _check_startable,
    _State,
    is_loopback_url,
)

__all__ = ["LocalDiscovery", "default_directory"]

log = logging.getLogger(__name__)

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
_SUFFIX = ".json"
_MAX_ENTRY = 4096
_TMP_MAX_AGE = 60.0


def default_directory() -> Path:
    """``$XDG_RUNTIME_DIR/subcog-crdt/nodes`` if that runtime dir exists, else
    ``/tmp/subcog-crdt-<uid>/nodes``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return Path(xdg) / "subcog-crdt" / "nodes"
    return Path("/tmp") / f"subcog-crdt-{os.getuid()}" / "nodes"


def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """State letter and start time (clock ticks since boot) of ``pid`` from Linux
    ``/proc/<pid>/stat``, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        # Fields after the ")" that ends comm start at field 3 (state); 22 is starttime.
        fields = data[data.rindex(b")") + 2 :].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None."""
    st = _proc_stat(pid)
    return None if st is None else st[1]


def _pid_alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    st = _proc_stat(pid)
    if st is None:
        return True  # no /proc to ask: os.kill's answer stands
    state, now = st
    if state in (b"Z", b"X"):
        return False  # killed, not yet reaped by its parent: its sockets are gone
    return started is None or now == started  # else: the pid was reused by another process


def _read_regular(path: Path) -> bytes | None:
    """An entry's bytes: only a regular file, never through a symlink, never waiting (a
    FIFO put there would block), at most ``_MAX_ENTRY``; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, _MAX_ENTRY + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return raw if len(raw) <= _MAX_ENTRY else None


@dataclass(frozen=True)
class _Entry:
    node_id: str
    url: str
    pid: int
    protocol: int
    mesh_tag: str
    started: int | None


def _parse_entry(node_id: str, raw: bytes) -> _Entry | None:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # (a few KB of "[[[[" recurse past the limit)
        return None
    if not isinstance(obj, dict):
        return None
    url, pid, protocol, tag = (
        obj.get("url"),
        obj.get("pid"),
        obj.get("protocol"),
        obj.get("mesh_tag"),
    )
    started = obj.get("started")
    if (
        obj.get("node_id") != node_id
        or not isinstance(url, str)
        or not isinstance(pid, int)
        or isinstance(pid, bool)
        or not 0 < pid < 2**31  # a pid_t: os.kill raises OverflowError past it
        or not isinstance(protocol, int)
        or not isinstance(tag, str)
        or not (started is None or isinstance(started, int))
    ):
        return None
    return _Entry(node_id, url, pid, protocol, tag, started)


def _ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) and check that it is ours and private."""
    if path == default_directory():
        _make_private(path.parent)  # /tmp/subcog-crdt-<uid> may sit in a shared /tmp
    else:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _make_private(path)


def _make_private(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"discovery registry {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise StorageError(f"discovery registry {path} belongs to uid {st.st_uid}, not to us")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


_ANNOUNCED: set[tuple[Path, str]] = set()
"""(registry, node id) of the nodes this process announces."""


class LocalDiscovery(AsyncClosing):
    """Discovery of the nodes on this machine through a shared registry directory.

    ``directory``: the registry (default: ``default_directory``). ``poll``: seconds
    between two scans of the directory.
    """

    def __init__(self, directory: Path | None = None, poll: float = 0.05) -> None:
        if not isinstance(poll, int | float) or not 0.001 <= poll <= 60.0:
            raise InvalidArgument("poll must be between 0.001 and 60 seconds")
        # Absolute: the directory is read for as long as the node runs, whatever the
        # process's working directory becomes.
        self._directory = (
            Path(directory) if directory is not None else default_directory()
        ).absolute()
        self._poll = float(poll)
        self.scans_done = 0
        self._scanned = asyncio.Event()
        """Completed scans of the registry (observable progress, e.g. for tests)."""
        self._state = _State.NEW
        self._advert: Advert | None = None
        self._on_found: Callable[[Found], None] | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._own_path: Path | None = None
        self._own_ino: int | None = None
        self._own_payload = b""
        self._removed = False
        self._announced: tuple[Path, str] | None = None
        """Its key in ``_ANNOUNCED`` while it announces itself."""
        self._io_lock = threading.Lock()  # a cancelled scan may still run in its thread
        self._task: asyncio.Task[None] | None = None
        self._undo: asyncio.Future[None] | None = None  # clean-up after a failed start()
        self._known: dict[str, Found] = {}
        # Used only by the worker thread (scans never overlap): name -> (stat key, entry).
        self._cache: dict[str, tuple[tuple[int, int, int], _Entry | None]] = {}

    @property
    def directory(self) -> Path:
        """The registry directory."""
        return self._directory

    @property
    def peers(self) -> dict[str, Found]:
        """The peers reported as found and not lost since (a copy)."""
        return dict(self._known)

    async def start(
        self,
        advert: Advert,
        on_found: Callable[[Found], None],
        on_lost: Callable[[str], None],
    ) -> None:
        """Write this node's entry and start watching the directory."""
        _check_startable(self._state, "LocalDiscovery")
        _check_advert(advert)
        if not _NODE_ID_RE.match(advert.node_id):
            raise InvalidArgument(f"node id {advert.node_id!r} cannot name a registry file")
        if advert.mesh_tag == "" and not is_loopback_url(advert.url):
            raise InvalidArgument(
                f"without a mesh secret only loopback urls are announced, not {advert.url!r}"
            )
        self._state = _State.STARTED
        self._advert = advert
        self._on_found, self._on_lost = on_found, on_lost
        self._own_path = self._directory / f"{advert.node_id}{_SUFFIX}"
        payload: dict[str, Any] = {
            "node_id": advert.node_id,
            "url": advert.url,
            "pid": os.getpid(),
            "started": _proc_start_time(os.getpid()),
            "protocol": advert.protocol,
            "mesh_tag": advert.mesh_tag,
        }
        self._own_payload = json.dumps(payload, separators=(",", ":")).encode()
        job = asyncio.ensure_future(asyncio.to_thread(self._prepare))
        try:
            await asyncio.shield(job)  # a cancel cannot stop the thread: it may still write
        except BaseException:
            # Failed or cancelled: nobody will aclose() a discovery whose start() raised, so
            # remove the entry here once the thread is done, also if that write came last.
            self._state = _State.CLOSED
            self._undo = asyncio.ensure_future(self._undo_start(job))
            await asyncio.shield(self._undo)  # a second cancel ends the wait, not the undo
            raise
        if self._state is not _State.STARTED:
            return  # aclose() came meanwhile and removed the entry: no watching
        self._task = asyncio.create_task(self._run(), name=f"LocalDiscovery({advert.node_id})")

    async def wait_scanned(self) -> None:
        """Return once the registry has been read after ``start`` (the nodes in it then
        are reported), or at once if this discovery is not running."""
        if self._state is _State.STARTED:
            await self._scanned.wait()

    async def aclose(self) -> None:
        """Stop watching and remove this node's entry. Idempotent."""
        if self._state is _State.CLOSED:
            if self._undo is not None:  # after a cancelled start(): its entry is gone then
                await asyncio.shield(self._undo)
            return
        was_started = self._state is _State.STARTED
        self._state = _State.CLOSED
        self._scanned.set()  # a settle() waiting on it goes on
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        if was_started:
            try:
                await asyncio.to_thread(self._remove_own)
            except OSError as exc:
                log.warning("could not remove discovery entry %s: %s", self._own_path, exc)

    async def _undo_start(self, job: asyncio.Future[None]) -> None:
        await asyncio.wait([job])  # its outcome was start()'s to report
        if not job.cancelled():
            job.exception()  # read (start() may have been cancelled before it could)
        try:
            await asyncio.to_thread(self._remove_own)
        except OSError as exc:
            log.warning("could not remove discovery entry %s: %s", self._own_path, exc)

    # -- worker-thread side --------------------------------------------------------------

    def _prepare(self) -> None:
        assert self._own_path is not None
        try:
            _ensure_private_dir(self._directory)
            key = (self._directory, self._own_path.stem)
            other = self._read_other_owner()
            if other is not None:
                raise InvalidArgument(
                    f"node id {self._own_path.stem!r} is already announced by pid {other}"
                )
            with self._io_lock:  # an aclose() meanwhile removed it first: do not write
                if key in _ANNOUNCED:
                    # (Another node of this process: a copied data_dir, say. The pid
                    # check above cannot tell it from ourselves.)
                    raise InvalidArgument(
                        f"node id {key[1]!r} is already announced by this process"
                    )
                if not self._removed:
                    self._write_own()
                    _ANNOUNCED.add(key)
                    self._announced = key
        except OSError as exc:
            raise StorageError(f"discovery registry {self._directory}: {exc}") from exc

    def _read_other_owner(self) -> int | None:
        """The pid of another live process that announces our node id, if any."""
        assert self._own_path is not None
        try:
            if self._own_path.lstat().st_uid != os.geteuid():
                return None  # planted by another user: not read, as the scan reads none
        except FileNotFoundError:
            return None
        raw = _read_regular(self._own_path)
        entry = None if raw is None else _parse_entry(self._own_path.stem, raw)
        if entry is None or entry.pid == os.getpid() or not _pid_alive(entry.pid, entry.started):
            return None
        return entry.pid

    def _write_own(self) -> None:
        assert self._own_path is not None
        tmp = self._directory / f".{self._own_path.stem}.{os.getpid()}.tmp"
        # A fresh file, never through a name someone planted (a symlink out of the
        # directory would make this write there).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, self._own_payload)
            self._own_ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        os.replace(tmp, self._own_path)

    def _remove_own(self) -> None:
        with self._io_lock:
            self._removed = True
            if self._announced is not None:
                _ANNOUNCED.discard(self._announced)
                self._announced = None
            if self._own_path is None:
                return
            try:
                st = self._own_path.lstat()
            except FileNotFoundError:
                return
            if st.st_ino == self._own_ino:  # never remove an entry someone else rewrote
                self._own_path.unlink(missing_ok=True)

    def _scan(self) -> dict[str, _Entry]:
        with self._io_lock:
            if self._removed:
                return {}
            return self._scan_locked()

    def _scan_locked(self) -> dict[str, _Entry]:
        """Live entries of other nodes, by node id; removes dead ones."""
        assert self._own_path is not None
        own_name = self._own_path.name
        own_seen = False
        live: dict[str, _Entry] = {}
        names: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self._directory)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                # Replaced under us (a symlink, another user's directory): write nothing
                # there, read nothing from it.
                raise StorageError(
                    f"discovery registry {self._directory} is no longer our directory"
                )
        try:
            it = os.scandir(self._directory)
        except FileNotFoundError:  # someone removed the registry: build it again
            _ensure_private_dir(self._directory)
            self._write_own()
            return live
        with it:
            for de in it:
                name = de.name
                if name.startswith("."):
                    if name.endswith(".tmp"):
                        self._clean_tmp(de)
                    continue
                if not name.endswith(_SUFFIX):
                    continue
                if name == own_name:
                    own_seen = True
                    continue
                names.add(name)
                entry = self._load(de)
                if entry is None:
                    continue
                if not _pid_alive(entry.pid, entry.started):
                    log.debug("removing stale discovery entry %s (pid %d)", name, entry.pid)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(de.path)
                    self._cache.pop(name, None)
                    continue
                live[entry.node_id] = entry
        for gone in self._cache.keys() - names:
            del self._cache[gone]
        if not own_seen:
            log.info("discovery entry %s vanished; writing it again", self._own_path)
            self._write_own()
        return live

    def _load(self, de: os.DirEntry[str]) -> _Entry | None:
        try:
            st = de.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return None  # (an entry another user planted is not this user's node)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(de.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        raw = _read_regular(Path(de.path))
        if raw is None:
            return None
        entry = _parse_entry(de.name[: -len(_SUFFIX)], raw)
        if entry is None:
            log.debug("ignoring malformed discovery entry %s", de.path)
        self._cache[de.name] = (key, entry)
        return entry

    @staticmethod
    def _clean_tmp(de: os.DirEntry[str]) -> None:
        with contextlib.suppress(OSError):
            if time.time() - de.stat(follow_symlinks=False).st_mtime > _TMP_MAX_AGE:
                os.unlink(de.path)

    # -- event-loop side -----------------------------------------------------------------

    async def _run(self) -> None:
        last_error = ""
        while True:
            try:
                live = await asyncio.to_thread(self._scan)
            except Exception as exc:
                self._scanned.set()  # a settle() waiting on the first scan goes on
                if repr(exc) != last_error:  # log each new problem once, not every poll
                    last_error = repr(exc)
                    log.warning(
                        "scanning discovery registry %s failed: %r",
                        self._directory,
                        exc,
                        exc_info=not isinstance(exc, OSError),
                    )
            else:
                last_error = ""
                if self._state is not _State.STARTED:
                    return
                self._apply(live)
                self.scans_done += 1
                self._scanned.set()
            await asyncio.sleep(self._poll)  # the polling interval, not a wait for anyone

    def _apply(self, live: dict[str, _Entry]) -> None:
        assert self._advert is not None
        tag = self._advert.mesh_tag
        current: dict[str, Found] = {}
        for node_id, e in live.items():
            if e.mesh_tag != tag:
                continue  # another mesh: not ours to dial
            if tag == "" and not is_loopback_url(e.url):
                continue  # no secret: loopback only
            current[node_id] = Found(node_id, e.url, e.protocol, e.mesh_tag)
        for node_id in list(self._known.keys() - current.keys()):
            del self._known[node_id]
            self._call(self._on_lost, node_id)
        for node_id, found in current.items():
            if self._known.get(node_id) != found:
                self._known[node_id] = found
                self._call(self._on_found, found)

    @staticmethod
    def _call(cb: Callable[[Any], None] | None, arg: Any) -> None:
        if cb is None:
            return
        try:
            cb(arg)
        except Exception:
            log.exception("discovery callback %r failed", cb)
