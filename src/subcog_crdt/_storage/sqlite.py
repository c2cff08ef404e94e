"""Durable storage: an append-only log for the hot path, SQLite for everything at rest.

Data directory layout
---------------------

```
<data_dir>/
  subcog.lock          holds the owner's pid (informational); the lock itself is a flock()
                       on the directory (and on this file), so removing the file does
                       not unlock it, and a child forked without exec does not hold it
  updates.log          append-only log: every commit() / save_cursor() as one CRC'd frame;
                       holds the newest updates (until compacted or retired into SQLite)
  store.sqlite3        SQLite (WAL mode): node id, namespaces, journal, cursors,
                       sessions' subscriptions, older tail
  store.sqlite3-wal    SQLite's write-ahead log (only while open: removed at a clean close)
  store.sqlite3-shm    SQLite's WAL index (likewise)
  snapshots/<id>-<gen>.snap   (the directory appears with the first compaction)
                       one compacted snapshot per namespace (``id`` is the namespace's row id
                       in ``store.sqlite3``, ``gen`` counts its compactions)
```

Write path. ``commit()`` encodes its updates, journal records and the new sequence numbers
as one frame and appends it to ``updates.log`` with a single ``write`` on the calling
(event-loop) thread. That is a page-cache write of a few hundred bytes (~2-5 us): once it
returned, the data survives ``kill -9`` of the process, which is what
``durability="process"`` promises, so ``commit()`` returns right away. The write keeps the
GIL (libc ``write`` through ``ctypes.PyDLL``, ``_storage/gilwrite.py``; frames over 64 KiB
use ``os.write``): ``os.write`` releases it, and while the storage thread was waiting for
it every commit handed it over, about one context switch per commit (a durable capture
cost ~1.3x more). If the write fails (a full disk) or is interrupted, the partial frame is
cut off again, so later frames never sit behind a damaged one. A SQLite commit on
the storage thread costs ~23 us plus the thread hand-off (FIELD-NOTES, "Durability cost");
awaiting one per call cannot reach 20k commits/s one at a time. With
``durability="fsync"`` the caller also awaits an ``fdatasync`` of the log on the storage
thread; callers that wrote while a sync was in flight share the next one (group commit).

The storage thread then drains the written frames in batches: one SQLite transaction for
everything pending writes the journal rows, session cursors and per-namespace sequence
numbers, and records the last applied frame (``applied_lsn``). The updates themselves stay
in the log: the node compacts a namespace once its tail grows, and a compaction usually
covers them before they would ever need a second home. Only when the log passes 32 MB, or
at a compaction (which empties the log), do the updates still live move into SQLite
(``retired_lsn`` marks how far), and the log is truncated under the writer lock. So SQLite
holds the journal (row key = cursor), cursors, metadata and the retired tail (row key
``namespace_id << 40 | seq``: one key range per namespace, in seq order); the log holds
the newest updates; a namespace's tail is the retired rows followed by the log's.
With ``"fsync"`` the thread syncs the log before applying frames, so SQLite never gets
ahead of the durable log. Creating the data directory, the log, the store or the
snapshot directory also syncs the directory holding it.

If applying frames to SQLite fails (a full disk, an I/O error), they go back to the front
of the queue, so ``applied_lsn`` never passes a frame SQLite does not have and the log,
which still holds them, is not truncated; every later drain retries them, and the first
one after the disk has room again applies them all. The caller waiting for that apply (a
read, a compaction) gets the error, and so do commits waiting for a full backlog; commits
keep going to the log meanwhile. Damage reported by SQLite, a failed ``fsync`` of the log
(after which the log's durability is unknown) or an unexpected error fails the storage
instead: every later commit raises until it is reopened, and the next open applies the
log.

Retention prunes the journal inside the transaction that writes it (a drain) or before a
read, and stores in the same transaction what it changed in ``meta``: ``journal_count``
(checked against the rows at open), ``oldest`` (the first cursor kept) and
``pruned_max_at_ms``, the largest ``at_ms`` of any record ever dropped. Records are not in
``at_ms`` order (an update received from a peer keeps its own, older time), so that, not
the oldest record kept, tells whether ``sync(since=<datetime>)`` can have missed one.

Frame format (little endian): ``b"SCL1"``, payload length (u32), CRC32 of the payload (u32),
then a msgpack array ``[lsn, [[ns, seq, update]...], [[cursor, at_ms, ns, kind, write_id,
session, other]...], [[session, cursor]...]]``.

Snapshot file format: ``b"SCSNAP01"``, payload length (u64), CRC32 (u32), payload (the Yjs
update). Length and CRC are also stored in ``store.sqlite3`` and checked at open.

Compaction writes the new snapshot file first (fsynced with the directory under
``"fsync"``), then in one SQLite transaction points the namespace at it and deletes the
covered tail rows, then removes the old file and reclaims space (``incremental_vacuum``,
``wal_checkpoint(TRUNCATE)``). A crash in between leaves an unreferenced file, deleted at the
next open.

Opening: take the lock, ``PRAGMA quick_check``, read the log, apply the journal of frames
newer than ``applied_lsn`` and keep the updates of frames newer than ``retired_lsn``, then
load. A torn last frame (a half-written tail) is cut off with a warning and everything
before it is kept; a damaged frame followed by valid ones is corruption, not a torn tail,
and raises ``CorruptStorage`` naming the log. So do a snapshot whose length or CRC
does not match, SQLite damage (``quick_check``, or a namespace whose updates have a gap),
a log that lost frames SQLite already applied (possible only after an OS crash or power
loss with ``"process"``; refused before the torn tail is cut off), and a fresh (empty)
``store.sqlite3`` next to an existing log or snapshots: the storage never starts empty
over existing data. Tail rows in SQLite
carry no checksum of their own; SQLite's page structure is checked, their content is not.

The log is kept at a clean close (the next open reads it back); ``aclose()`` drains the
journal into SQLite, checkpoints (the WAL ends empty), and releases the lock.

Why not pycrdt-store: ``pycrdt.store`` (pycrdt-store 0.1.5) keeps one Yjs document per path
and nothing else (no journal, no cursors), commits every write in its own transaction with
several thread hops through sqlite-anyio (no group commit), has no checksums in its file
store, and on a format-version mismatch moves the database aside and starts empty. Its
snapshot-plus-tail ("checkpoint") idea is the one used here.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import itertools
import json
import logging
import os
import queue
import sqlite3
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import msgpack

from subcog_crdt._errors import (
    ClosedError,
    CorruptStorage,
    StorageError,
    StorageLocked,
    SubcogError,
)
from subcog_crdt._lifecycle import AsyncClosing
from subcog_crdt._storage.base import Durability, JournalRecord, Retention, StoredState
from subcog_crdt._storage.gilwrite import write_all

__all__ = ["SqliteStorage"]

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCK_NAME: Final = "subcog.lock"
LOG_NAME: Final = "updates.log"
STORE_NAME: Final = "store.sqlite3"
SNAP_DIR: Final = "snapshots"
FORMAT_VERSION: Final = 1

_FRAME_MAGIC: Final = b"SCL1"
_FRAME_HEADER: Final = struct.Struct("<4sII")
_SNAP_MAGIC: Final = b"SCSNAP01"
_SNAP_HEADER: Final = struct.Struct("<8sQI")

_NS_SHIFT: Final = 40
"""Tail row key = namespace id << 40 | seq: one namespace's tail is one contiguous key range,
ordered by seq, without a secondary index."""
_SEQ_MASK: Final = (1 << _NS_SHIFT) - 1

_LOG_RETIRE_AT: Final = 32 << 20
"""Once the log is this large, its live updates move into SQLite and it is emptied. Until
then updates live only in the log (and in memory, for the thread): a compaction usually
covers them first, so most updates are never written to SQLite at all."""
_MAX_BACKLOG: Final = 64 << 20
"""commit() waits for the storage thread once this many written bytes are not yet in
SQLite, so a thread that falls behind cannot grow memory and the log without bound."""
_DRAIN_DELAY: Final = 0.05
"""The drain job waits until commits pause this long (any other job cuts the wait
short; see ``_wait_for_a_pause``): durability is already given by the log, and the
drain's Python work takes the GIL from the event loop, so during a burst of writes it had
better come in a few big pieces than after every commit (2 ms here cost a bulk load
~15 %)."""
_DRAIN_NOW: Final = 512
"""...unless at least this many frames are waiting."""
_DRAIN_BYTES: Final = _MAX_BACKLOG // 2
"""...or this many bytes (see ``_wait_for_a_pause``)."""
_AGE_PRUNE_EVERY: Final = 1.0
"""Seconds between retention-by-age checks when draining (reads always check)."""

_CORRUPT_CODES: Final = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)

_UPDATE_CHUNK: Final = 256
_JOURNAL_CHUNK: Final = 128


class _State(enum.Enum):
    NEW = "new"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(slots=True)
class _Pending:
    """A frame written to the log and not yet applied to SQLite."""

    lsn: int
    size: int
    updates: Sequence[tuple[str, int, bytes]]
    journal: Sequence[tuple[int, int, str, str, str, str, str | None]]
    cursors: Sequence[tuple[str, int]]


@dataclass(slots=True)
class _Loaded:
    state: StoredState
    seqs: dict[str, int]
    tail_bytes: dict[str, int]
    lsn: int
    oldest: int
    log_fd: int
    log_size: int = 0


@dataclass(slots=True)
class _Namespace:
    id: int
    snap_gen: int = 0
    snap_seq: int = 0


def _values_sql(prefix: str, width: int, rows: int) -> str:
    one = "(" + ",".join("?" * width) + ")"
    return prefix + ",".join([one] * rows)


def _encode_frame(payload: bytes) -> bytes:
    return _FRAME_HEADER.pack(_FRAME_MAGIC, len(payload), zlib.crc32(payload))


class _LogDamage(Exception):
    """A frame that cannot be decoded; ``offset`` is where it starts."""

    def __init__(self, offset: int, reason: str, torn: bool = False) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason
        self.torn = torn
        """The log ends inside this frame (what a write cut short by a crash leaves)."""


def _parse_frames(data: bytes | memoryview) -> tuple[list[_Pending], _LogDamage | None]:
    """Decode frames up to the first damaged one."""
    frames: list[_Pending] = []
    pos = 0
    end = len(data)
    hsize = _FRAME_HEADER.size
    while pos < end:
        if end - pos < hsize:
            return frames, _LogDamage(pos, "truncated frame header", torn=True)
        magic, length, crc = _FRAME_HEADER.unpack_from(data, pos)
        if magic != _FRAME_MAGIC:
            return frames, _LogDamage(pos, "bad frame magic")
        if end - pos - hsize < length:
            return frames, _LogDamage(pos, "truncated frame", torn=True)
        payload = data[pos + hsize : pos + hsize + length]
        if zlib.crc32(payload) != crc:
            return frames, _LogDamage(pos, "frame checksum mismatch")
        try:
            frames.append(_decode_payload(payload, hsize + length))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            return frames, _LogDamage(pos, f"undecodable frame ({exc})")
        pos += hsize + length
    return frames, None


def _decode_payload(payload: bytes | memoryview, size: int) -> _Pending:
    lsn, updates, journal, cursors = msgpack.unpackb(payload, raw=False, use_list=True)
    ups = [(str(ns), int(seq), bytes(data)) for ns, seq, data in updates]
    jrn = [
        (int(c), int(at), str(ns), str(k), str(w), str(s), None if o is None else str(o))
        for c, at, ns, k, w, s, o in journal
    ]
    cur = [(str(s), int(c)) for s, c in cursors]
    return _Pending(int(lsn), size, ups, jrn, cur)


def _journal_rows(frames: list[_Pending], last_cursor: list[int]) -> Iterator[list[Any]]:
    """The frames' journal records as flat parameter lists of ``_JOURNAL_CHUNK`` rows;
    ``last_cursor[0]`` ends as the largest cursor. In chunks, not one list: a bulk load
    applies ~100k records at once, and a list that size is walked by every full GC pass
    the event loop's thread runs meanwhile."""
    part: list[Any] = []
    top = last_cursor[0]
    for frame in frames:
        for rec in frame.journal:
            part.extend(rec)
            if not rec[6]:
                part[-1] = None  # no other write: NULL, as "" was never stored
            if rec[0] > top:
                top = rec[0]
            if len(part) >= _JOURNAL_CHUNK * 7:
                yield part
                part = []
    last_cursor[0] = top
    if part:
        yield part


def _valid_frame_after(data: bytes, start: int, first_lsns: range) -> bool:
    """Whether valid frames follow damage at ``start``: then it is not a torn tail (a crash
    only ever tears the last write) but corruption. A candidate counts if frames decode
    from it one after another to the end of the log (the last may be torn: a crash after
    the damage) and continue the numbering: the first is in ``first_lsns`` (the damaged
    frame's number or the next), each one more than the one before. Bytes that only look
    like frames inside a torn frame's data (an update may hold anything, a copy of log
    frames too) do not: what follows them is the rest of that data, and a peer cannot know
    this log's numbering."""
    view = memoryview(data)
    pos = data.find(_FRAME_MAGIC, start + 1)
    while pos != -1:
        frames, damage = _parse_frames(view[pos:])
        if (
            frames
            and frames[0].lsn in first_lsns
            and all(b.lsn == a.lsn + 1 for a, b in itertools.pairwise(frames))
            and (damage is None or damage.torn)
        ):
            return True
        pos = data.find(_FRAME_MAGIC, pos + 1)
    return False


class SqliteStorage(AsyncClosing):
    """Durable storage in ``data_dir`` (see the module docstring for the layout).

    All SQLite and file work except the log append runs on one thread owned by the storage;
    results come back to the event loop through futures. ``oldest_cursor()`` is exact as of
    the last ``read_journal()`` (which prunes first); between reads it may lag behind by
    the records that retention would drop, never ahead.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        durability: Durability = "process",
        retention: Retention | None = None,
    ) -> None:
        if durability not in ("process", "fsync"):
            raise ValueError(f"durability must be 'process' or 'fsync', not {durability!r}")
        # Absolute now: snapshots are opened by path long after open(), and a relative
        # path would follow the process's working directory into another node's files.
        self.data_dir = Path(data_dir).absolute()
        self.durability: Durability = durability
        self.retention = retention or Retention()
        self._store_path = self.data_dir / STORE_NAME
        self._log_path = self.data_dir / LOG_NAME
        self._snap_dir = self.data_dir / SNAP_DIR
        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._undone: asyncio.Future[None] | None = None
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Any] | None] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Event()
        """Set with every job queued (and by a commit waiting for the backlog): it ends
        a drain job's wait (``_DRAIN_DELAY``)."""
        # Loop-side state.
        self._seq: dict[str, int] = {}
        self._tail_bytes: dict[str, int] = {}
        self._last_cursor = 0
        self._written_bytes = 0
        self._last_append = 0.0
        """When the loop last appended a frame (read by the storage thread)."""
        self._sync_waiters: list[asyncio.Future[None]] = []
        self._sync_running = False
        # Shared between the loop (writer) and the storage thread; the lock makes "append to
        # the log" and "queue the frame for SQLite" one step, so the thread can tell when
        # everything in the log is applied.
        self._wlock = threading.Lock()
        # One packer, reused under _wlock: msgpack.packb() builds a Packer (and its
        # buffer) per call, twice the cost of packing a small frame.
        self._packer = msgpack.Packer(use_bin_type=True)
        self._log_fd = -1
        self._log_size = 0
        self._lsn = 0
        self._pending: deque[_Pending] = deque()
        self._drain_scheduled = False
        self._drained_bytes = 0
        self._backlog_waiters: list[asyncio.Future[None]] = []
        """Commits waiting for the thread to catch up (see _wait_backlog); the loop adds
        and removes them, the thread only looks whether there are any."""
        self._failure: BaseException | None = None
        """Set once the storage cannot go on safely (see _apply_failed): every later
        commit raises it, until the storage is closed and opened again."""
        # Plain ints the thread stores and the loop reads (oldest_cursor() etc.).
        self._oldest = 1
        self._pruned_max_at_ms = 0
        # Thread-side state.
        self._conn: sqlite3.Connection | None = None
        self._lock_fds: list[int] = []
        self._namespaces: dict[str, _Namespace] = {}
        self._journal_count = 0
        self._applied_lsn = 0
        self._retired_lsn = 0
        self._unretired: list[tuple[str, int, bytes]] = []
        """Updates of applied frames that live only in the log (lsn > retired_lsn)."""
        self._last_age_prune = 0.0
        self._apply_error: BaseException | None = None
        """Why the last attempt to apply frames failed (None: it did not). Logged once per
        run of failures, not at every retry."""
        self._job_error: str | None = None
        """The last error of a background job that was logged."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, node_id: str) -> StoredState:
        """Lock the directory, check and load it (creating it if new)."""
        if self._state is not _State.NEW:
            if self._state in (_State.CLOSING, _State.CLOSED):
                raise ClosedError("storage is closed")
            raise StorageError(f"storage {self.data_dir} is already open")
        self._state = _State.OPENING
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, name=f"subcog-storage:{self.data_dir.name}", daemon=True
        )
        self._thread.start()
        job = self._submit(self._open_sync, node_id)
        try:
            loaded = await asyncio.shield(job)
        except BaseException:
            # Failed or cancelled. The thread may still be opening (it cannot be
            # interrupted): whatever it opens is closed as soon as it is done, whether or
            # not anyone waits (a second cancel must not leave the directory locked by
            # this process); aclose() waits for that.
            self._state = _State.CLOSING
            self._undone = self._loop.create_future()
            job.add_done_callback(self._undo_open)
            raise
        self._adopt(loaded)
        return loaded.state

    def _undo_open(self, job: asyncio.Future[_Loaded]) -> None:
        """Close what a failed or abandoned open left open, then end the thread."""
        close: asyncio.Future[None] | None = None
        if not job.cancelled() and job.exception() is None:
            self._adopt(job.result())
            self._state = _State.CLOSING
            close = self._submit(self._close_sync)
        self._put(None)  # the thread ends after that close

        def finish(_: object = None) -> None:
            if close is not None and not close.cancelled() and close.exception() is not None:
                log.warning("closing %s after a failed open: %s", self.data_dir, close.exception())
            self._state = _State.CLOSED
            thread, self._thread = self._thread, None
            if thread is not None:
                thread.join(timeout=10.0)  # it was told to end after the close: at once
            if self._undone is not None and not self._undone.done():
                self._undone.set_result(None)

        if close is None:
            finish()
        else:
            close.add_done_callback(finish)

    def _adopt(self, loaded: _Loaded) -> None:
        """Take over what the thread's open loaded; the storage is open from here."""
        self._seq = loaded.seqs
        self._tail_bytes = loaded.tail_bytes
        self._lsn = loaded.lsn
        self._oldest = loaded.oldest
        self._last_cursor = loaded.state.last_cursor
        self._log_fd = loaded.log_fd
        self._log_size = loaded.log_size
        self._state = _State.OPEN

    async def aclose(self) -> None:
        """Apply everything to SQLite, checkpoint, close, stop the thread, release the lock.
        Closing twice is harmless."""
        if self._undone is not None:  # an open that failed or was abandoned: its undo
            await asyncio.shield(self._undone)
            return
        if self._state in (_State.CLOSING, _State.CLOSED):
            return
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSING
        try:
            await asyncio.shield(self._submit(self._close_sync))
        finally:
            self._state = _State.CLOSED
            self._stop_thread()
            # Commits still waiting for the thread (it failed, or never caught up) get
            # an answer instead of waiting forever.
            self._release_backlog(ClosedError("storage is closed"))

    def _stop_thread(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._put(None)
        # The close job has finished (or the thread is idle), so this returns at once.
        thread.join(timeout=10.0)
        self._thread = None

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            if self._state is _State.NEW or self._state is _State.OPENING:
                raise ClosedError("storage is not open yet; call open() first")
            raise ClosedError("storage is closed")
        if self._failure is not None:
            raise StorageError(
                f"storage {self.data_dir} failed earlier: {self._failure}"
            ) from self._failure

    # -- the storage thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=_IDLE_CHECK)
            except queue.Empty:
                # Idle: no pass would notice a removed directory before the next write,
                # which would then be acknowledged into it.
                if self._state is _State.OPEN:
                    self._check_log_linked()
                continue
            if job is None:
                return
            fn, args, fut = job
            try:
                result = fn(*args)
            except Exception as exc:
                err = self._map_error(exc)
                if fut is None:
                    # An unawaited job (a drain) failed. Its frames went back to the queue
                    # (_apply_failed logged it and decided whether the storage can go on);
                    # anything else it did (a retire) is simply tried again later.
                    if err is not self._apply_error and str(err) != self._job_error:
                        log.warning("storage %s: background job failed: %s", self.data_dir, err)
                        self._job_error = str(err)  # not again at every retry
                else:
                    self._post(fut, err, None)
            else:
                if fut is not None:
                    self._post(fut, None, result)

    def _post(self, fut: asyncio.Future[Any], exc: BaseException | None, result: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(_resolve, fut, exc, result)

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._put((fn, args, fut))
        return fut

    def _put(self, job: tuple[Callable[..., Any], tuple[Any, ...], Any] | None) -> None:
        self._jobs.put(job)
        self._wake.set()

    def _map_error(self, exc: Exception) -> BaseException:
        """sqlite3 and OS errors never leave the storage as themselves."""
        if isinstance(exc, SubcogError):
            return exc
        new: SubcogError
        if isinstance(exc, sqlite3.DatabaseError) and (
            getattr(exc, "sqlite_errorcode", 0) in _CORRUPT_CODES
        ):
            new = CorruptStorage(
                f"{self._store_path} is damaged: {exc}", path=str(self._store_path)
            )
        elif isinstance(exc, sqlite3.Error | OSError):
            new = StorageError(f"storage {self.data_dir}: {exc}")
        else:
            return exc
        new.__cause__ = exc
        return new

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    # -- open (thread) -----------------------------------------------------------------------

    def _open_sync(self, node_id: str) -> _Loaded:
        self._make_data_dir()
        self._lock_dir()
        log_fd = -1
        try:
            new_files = not (self._store_path.exists() and self._log_path.exists())
            self._connect()
            log_size = self._replay_log()
            log_fd = os.open(
                self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            if new_files and self.durability == "fsync":
                # The new files' directory entries must be durable before a commit is
                # acknowledged: a power loss could otherwise take a synced file with it.
                _fsync_dir(self.data_dir)
            loaded = self._load(node_id, log_fd)
            loaded.log_size = log_size
        except BaseException:
            if log_fd >= 0:
                os.close(log_fd)
            self._close_db()
            self._unlock_dir()
            raise
        return loaded

    def _make_data_dir(self) -> None:
        missing: list[Path] = []
        d = self.data_dir.absolute()
        while not d.exists() and d.parent != d:
            missing.append(d)
            d = d.parent
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise StorageError(f"data_dir {self.data_dir} exists and is not a directory")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.durability == "fsync":
            for d in reversed(missing):
                _fsync_dir(d.parent)

    def _lock_dir(self) -> None:
        # The lock is a flock() on the directory itself, which cannot be unlinked while it
        # exists (a lock on subcog.lock alone let a second opener in once someone removed
        # that file). flock() locks belong to the open file description, so a second
        # opener in this process is refused just like another process; the kernel drops
        # the lock when the holder dies, so kill -9 never leaves a stale lock behind.
        # subcog.lock only records the holder's pid for the error message (and is locked
        # too, as earlier versions expect).
        lock_path = self.data_dir / LOCK_NAME
        held: list[int] = []
        try:
            for path, flags in (
                (self.data_dir, os.O_RDONLY | os.O_DIRECTORY),
                (lock_path, os.O_RDWR | os.O_CREAT),
            ):
                fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
                held.append(fd)
                _HELD_LOCKS.add(fd)  # at once: a fork from another thread may come next
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise StorageLocked(
                            f"data directory {self.data_dir} is in use by another "
                            f"storage{_holder(lock_path)}: each node (each agent process) "
                            "needs its own data_dir; they share memories by syncing"
                        ) from None
                    if path == self.data_dir:
                        # Some file systems (NFS emulates flock with fcntl locks, which a
                        # read-only descriptor cannot take) lock files only: the lock
                        # file's lock is then the lock, as before directories were locked.
                        log.debug("cannot lock the directory %s: %s", path, exc)
                        held.pop()
                        _HELD_LOCKS.discard(fd)
                        os.close(fd)
                        continue
                    raise StorageError(f"cannot lock {path}: {exc}") from exc
            os.ftruncate(held[-1], 0)
            os.pwrite(held[-1], f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            for fd in held:
                os.close(fd)
                _HELD_LOCKS.discard(fd)
            raise
        self._lock_fds = held

    def _unlock_dir(self) -> None:
        for fd in self._lock_fds:
            os.close(fd)  # closing the descriptor releases the flock
            _HELD_LOCKS.discard(fd)  # (after: a fork in between must not keep the lock)
        self._lock_fds = []

    def _connect(self) -> None:
        path = self._store_path
        if not path.exists():
            # Create it ourselves so it is private; SQLite gives -wal/-shm the same mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        conn = sqlite3.connect(path, isolation_level=None, cached_statements=64)
        self._conn = conn
        try:
            # auto_vacuum only takes effect before the first table exists (new stores).
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"{path}: cannot enable WAL mode (got {mode!r})")
            # WAL + NORMAL: a commit is in the OS page cache when it returns (survives kill -9);
            # FULL also syncs the WAL on every commit (survives power loss).
            sync = "FULL" if self.durability == "fsync" else "NORMAL"
            conn.execute(f"PRAGMA synchronous={sync}")
            problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise CorruptStorage(
                    f"{path} is damaged (quick_check: {'; '.join(map(str, problems[:3]))})",
                    path=str(path),
                )
            fresh = (
                conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='meta'"
                ).fetchone()[0]
                == 0
            )
            if fresh:
                self._refuse_fresh_over_data()
                self._create_schema()
            else:
                version = self._meta("format")
                if version is None:
                    raise CorruptStorage(f"{path} has no format version", path=str(path))
                if int(version) > FORMAT_VERSION:
                    raise StorageError(
                        f"{path} has format {version}; this version reads up to "
                        f"{FORMAT_VERSION} (upgrade subcog-crdt)"
                    )
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", 0) in _CORRUPT_CODES:
                raise CorruptStorage(f"{path} is damaged: {exc}", path=str(path)) from exc
            raise

    def _refuse_fresh_over_data(self) -> None:
        """An empty store next to a log or snapshots means the store was lost: starting
        empty would silently drop everything, so refuse."""
        leftovers = []
        if self._log_path.exists() and self._log_path.stat().st_size > 0:
            leftovers.append(LOG_NAME)
        if self._snap_dir.is_dir() and any(self._snap_dir.iterdir()):
            leftovers.append(SNAP_DIR + "/")
        if leftovers:
            raise CorruptStorage(
                f"{self._store_path} is missing or empty while {', '.join(leftovers)} "
                f"{'exist' if len(leftovers) > 1 else 'exists'} in {self.data_dir}; "
                "refusing to start empty over existing data",
                path=str(self._store_path),
            )

    def _create_schema(self) -> None:
        db = self._db
        # executescript() commits first, so the transaction is part of the script.
        db.executescript(
            """
            BEGIN;
            CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
            CREATE TABLE namespaces(
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                last_seq INTEGER NOT NULL DEFAULT 0,
                snap_seq INTEGER NOT NULL DEFAULT 0,
                snap_gen INTEGER NOT NULL DEFAULT 0,
                snap_len INTEGER NOT NULL DEFAULT 0,
                snap_crc INTEGER NOT NULL DEFAULT 0
            );
            CREATE TABLE updates(key INTEGER PRIMARY KEY, data BLOB NOT NULL);
            CREATE TABLE journal(
                cursor INTEGER PRIMARY KEY,
                at_ms INTEGER NOT NULL,
                ns TEXT NOT NULL,
                kind TEXT NOT NULL,
                write_id TEXT NOT NULL,
                session TEXT NOT NULL,
                other TEXT
            );
            CREATE TABLE cursors(session TEXT PRIMARY KEY, cursor INTEGER NOT NULL) WITHOUT ROWID;
            """
            + _SUBSCRIPTIONS_TABLE
        )
        try:
            db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [
                    ("format", FORMAT_VERSION),
                    ("applied_lsn", 0),
                    ("retired_lsn", 0),
                    ("last_cursor", 0),
                    ("oldest", 1),
                    ("journal_count", 0),
                    ("pruned_max_at_ms", 0),
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _upgrade_meta(self) -> None:
        """Bring the counters of an existing store up to date (no transaction is open)."""
        db = self._db
        db.execute(_SUBSCRIPTIONS_TABLE.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
        if self._meta("pruned_max_at_ms") is None:
            # A store from before this key: if it ever pruned, the pruned records' times
            # are unknown, but none is later than now (their writes happened before).
            pruned = int(time.time() * 1000) if int(self._meta("oldest") or 1) > 1 else 0
            db.execute("INSERT INTO meta(key, value) VALUES ('pruned_max_at_ms', ?)", (pruned,))
        # Earlier versions could leave journal_count above the real number of rows (a
        # read's prune did not store it), and pruning by a count that is too high drops
        # records that retention should keep. Counting is cheap (~ms per 100k rows).
        rows = db.execute("SELECT count(*) FROM journal").fetchone()[0]
        if rows != int(self._meta("journal_count") or 0):
            db.execute("UPDATE meta SET value=? WHERE key='journal_count'", (rows,))

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def _replay_log(self) -> int:
        """Read the log: apply the journal of frames the last run did not get into SQLite,
        and keep the updates not yet retired into SQLite in memory. Returns the log size."""
        self._applied_lsn = int(self._meta("applied_lsn") or 0)
        self._retired_lsn = int(self._meta("retired_lsn") or 0)
        self._upgrade_meta()
        self._load_counters()
        self._namespaces = {
            name: _Namespace(id_, gen, snap_seq)
            for id_, name, gen, snap_seq in self._db.execute(
                "SELECT id, name, snap_gen, snap_seq FROM namespaces"
            )
        }
        try:
            data = self._log_path.read_bytes()
        except FileNotFoundError:
            data = b""
        frames, damage = _parse_frames(data)
        size = len(data)
        last_lsn = frames[-1].lsn if frames else 0
        # The damaged frame is the one after the last good one; with none good, at most
        # the one after what SQLite has (the log starts after what was retired).
        top = last_lsn if frames else max(self._applied_lsn, self._retired_lsn)
        first_lsns = range(last_lsn + 1, top + 3)
        if damage is not None and _valid_frame_after(data, damage.offset, first_lsns):
            raise CorruptStorage(
                f"{self._log_path} is damaged at offset {damage.offset} ({damage.reason}) "
                "and valid frames follow; not a torn tail, refusing to drop them",
                path=str(self._log_path),
            )
        if self._retired_lsn < self._applied_lsn and last_lsn < self._applied_lsn:
            # SQLite applied frames whose updates only the log held, and the log lost them:
            # only possible after an OS crash or power loss with durability="process".
            # (Refused before the torn tail below is cut off: the file stays as it was.)
            raise CorruptStorage(
                f"{self._log_path} ends at frame {last_lsn} but {STORE_NAME} applied frames "
                f"up to {self._applied_lsn}: the log lost updates",
                path=str(self._log_path),
            )
        if damage is not None:
            log.warning(
                "%s: dropping a torn last frame (%d bytes at offset %d: %s), left by a crash",
                self._log_path,
                size - damage.offset,
                damage.offset,
                damage.reason,
            )
            # Cut it off, so new frames follow the last complete one.
            with open(self._log_path, "r+b") as f:
                f.truncate(damage.offset)
                if self.durability == "fsync":
                    os.fsync(f.fileno())
            size = damage.offset
        newer: list[_Pending] = []
        for frame in frames:
            if frame.lsn > self._applied_lsn:
                newer.append(frame)
            elif frame.lsn > self._retired_lsn:
                self._unretired.extend(frame.updates)
        if newer:
            if newer[0].lsn != self._applied_lsn + 1:
                raise CorruptStorage(
                    f"{self._log_path} starts at frame {newer[0].lsn} but {STORE_NAME} "
                    f"applied frames only up to {self._applied_lsn}: the log lost updates",
                    path=str(self._log_path),
                )
            if self.durability == "fsync":
                # The last run died before syncing these (none was acknowledged): SQLite
                # must not get ahead of the durable log (see _sync_before_apply), or a
                # power loss now would leave a store that refuses to open.
                with open(self._log_path, "rb") as f:
                    os.fsync(f.fileno())
            self._apply(newer)
        return size

    def _load(self, node_id: str, log_fd: int) -> _Loaded:
        db = self._db
        stored_id = self._meta("node_id")
        if stored_id is None:
            db.execute("INSERT INTO meta(key, value) VALUES ('node_id', ?)", (node_id,))
            stored_id = node_id
        docs: dict[str, list[bytes]] = {}
        seqs: dict[str, int] = {}
        tail_bytes: dict[str, int] = {}
        snapshot_bytes: dict[str, int] = {}
        by_id: dict[int, tuple[str, int, int]] = {}
        referenced: set[str] = set()
        for id_, name, last_seq, snap_seq, gen, snap_len, snap_crc in db.execute(
            "SELECT id, name, last_seq, snap_seq, snap_gen, snap_len, snap_crc "
            "FROM namespaces ORDER BY id"
        ):
            seqs[name] = last_seq
            tail_bytes[name] = 0
            docs[name] = []
            by_id[id_] = (name, snap_seq, last_seq)
            if gen:
                snap_path = self._snap_path(id_, gen)
                referenced.add(snap_path.name)
                docs[name].append(self._read_snapshot(snap_path, snap_len, snap_crc))
                snapshot_bytes[name] = snap_len
        # Per namespace: the retired tail from SQLite (one key range, in seq order), then
        # the updates only the log holds (higher seqs), minus any a compaction covered.
        live: dict[str, list[bytes]] = {}
        live_first: dict[str, int] = {}
        for name, seq, data in self._unretired:
            if seq > self._namespaces[name].snap_seq:
                live.setdefault(name, []).append(data)
                live_first.setdefault(name, seq)
        for id_, (name, snap_seq, last_seq) in by_id.items():
            lo = id_ << _NS_SHIFT
            span = (lo, lo | _SEQ_MASK)
            tail = [
                row[0]
                for row in db.execute(
                    "SELECT data FROM updates WHERE key BETWEEN ? AND ? ORDER BY key", span
                )
            ]
            first = snap_seq + 1
            if tail:
                first = (
                    db.execute(
                        "SELECT key FROM updates WHERE key BETWEEN ? AND ? ORDER BY key LIMIT 1",
                        span,
                    ).fetchone()[0]
                    & _SEQ_MASK
                )
            if name in live:
                # Keys are unique, so "count == last - first + 1" means no gaps.
                if live_first[name] != first + len(tail):
                    self._missing(name, first + len(tail))
                tail += live[name]
            if tail and first + len(tail) - 1 != last_seq:
                self._missing(name, last_seq)
            if not tail and last_seq > snap_seq:
                self._missing(name, snap_seq + 1)
            docs[name] += tail
            tail_bytes[name] = sum(map(len, tail))
        cursors = dict(db.execute("SELECT session, cursor FROM cursors").fetchall())
        subscriptions = self._load_subscriptions()
        last_cursor = int(self._meta("last_cursor") or 0)
        self._remove_orphans(referenced)
        state = StoredState(
            node_id=str(stored_id),
            docs=docs,
            last_cursor=last_cursor,
            cursors=cursors,
            subscriptions=subscriptions,
            snapshot_bytes=snapshot_bytes,
        )
        return _Loaded(
            state=state,
            seqs=seqs,
            tail_bytes=tail_bytes,
            lsn=self._applied_lsn,
            oldest=self._oldest,
            log_fd=log_fd,
        )

    def _load_subscriptions(self) -> dict[str, frozenset[str]]:
        out: dict[str, frozenset[str]] = {}
        for session, text in self._db.execute("SELECT session, namespaces FROM subscriptions"):
            try:
                names = json.loads(text)
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ValueError("not a list of names")
            except ValueError as exc:
                # Not worth refusing the store for: the session registers with none.
                log.warning(
                    "storage %s: ignoring subscriptions of %r: %s", self.data_dir, session, exc
                )
                continue
            out[str(session)] = frozenset(names)
        return out

    def _save_subscriptions_sync(self, session_id: str, text: str) -> None:
        self._db.execute(
            "INSERT INTO subscriptions(session, namespaces) VALUES (?, ?) "
            "ON CONFLICT(session) DO UPDATE SET namespaces=excluded.namespaces",
            (session_id, text),
        )

    def _missing(self, name: str, seq: int) -> None:
        raise CorruptStorage(
            f"{self._store_path}: updates of namespace {name!r} are missing (near {seq})",
            path=str(self._store_path),
        )

    def _snap_path(self, ns_id: int, gen: int) -> Path:
        return self._snap_dir / f"{ns_id}-{gen}.snap"

    def _read_snapshot(self, path: Path, length: int, crc: int) -> bytes:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CorruptStorage(f"snapshot {path} is missing", path=str(path)) from None
        hsize = _SNAP_HEADER.size
        if len(raw) < hsize:
            raise CorruptStorage(f"snapshot {path} is truncated", path=str(path))
        magic, flen, fcrc = _SNAP_HEADER.unpack_from(raw, 0)
        body = raw[hsize:]
        if magic != _SNAP_MAGIC or flen != length or fcrc != crc:
            raise CorruptStorage(f"snapshot {path} has a damaged header", path=str(path))
        if len(body) != length or zlib.crc32(body) != crc:
            raise CorruptStorage(
                f"snapshot {path} is damaged (length or checksum mismatch)", path=str(path)
            )
        return body

    def _remove_orphans(self, referenced: set[str]) -> None:
        """Snapshot files left by a crash in the middle of a compaction."""
        if not self._snap_dir.is_dir():
            return
        for entry in self._snap_dir.iterdir():
            if entry.name not in referenced:
                log.info("%s: removing unreferenced %s", self.data_dir, entry.name)
                with contextlib.suppress(OSError):
                    entry.unlink()

    # -- applying frames (thread) ------------------------------------------------------------

    def _namespace(self, name: str) -> _Namespace:
        ns = self._namespaces.get(name)
        if ns is None:
            cur = self._db.execute("INSERT INTO namespaces(name) VALUES (?)", (name,))
            assert cur.lastrowid is not None
            if cur.lastrowid >= 1 << (63 - _NS_SHIFT):
                raise StorageError(f"{self._store_path}: too many namespaces")
            ns = self._namespaces[name] = _Namespace(cur.lastrowid)
        return ns

    def _apply(self, frames: list[_Pending], *, retire: bool = False) -> None:
        """Write the journal, cursors and sequence numbers of frames to SQLite in one
        transaction. Their updates stay in the log (and in ``_unretired``) unless
        ``retire``: then the live ones go into SQLite too."""
        if frames[0].lsn != self._applied_lsn + 1:
            # Frames are applied in order, each exactly once: anything else would move
            # applied_lsn past a frame SQLite does not have (and the next retire would
            # truncate it away).
            raise StorageError(
                f"storage {self.data_dir}: internal error: frame {frames[0].lsn} applied "
                f"after frame {self._applied_lsn}"
            )
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            last_seq: dict[str, int] = {}
            cursors: dict[str, int] = {}
            updates: list[tuple[str, int, bytes]] = []
            journal = False
            for frame in frames:
                if frame.updates:
                    updates.extend(frame.updates)
                    for name, seq, _ in frame.updates:
                        last_seq[name] = seq
                journal = journal or bool(frame.journal)
                for session, cursor in frame.cursors:
                    cursors[session] = cursor
            if journal:
                # A duplicate cursor is an upstream bug; the first record wins and the count
                # that drives pruning stays exact.
                last_cursor = [0]
                self._journal_count += self._insert_rows(
                    "INSERT OR IGNORE INTO journal"
                    "(cursor, at_ms, ns, kind, write_id, session, other) VALUES ",
                    7,
                    _journal_rows(frames, last_cursor),
                )
                db.execute(
                    "UPDATE meta SET value=max(value, ?) WHERE key='last_cursor'", last_cursor
                )
            if cursors:
                db.executemany(
                    "INSERT INTO cursors(session, cursor) VALUES (?, ?) "
                    "ON CONFLICT(session) DO UPDATE SET cursor=excluded.cursor",
                    cursors.items(),
                )
            if last_seq:
                db.executemany(
                    "UPDATE namespaces SET last_seq=? WHERE id=?",
                    [(seq, self._namespace(name).id) for name, seq in last_seq.items()],
                )
            if retire:
                self._insert_updates([*self._unretired, *updates], frames[-1].lsn)
            db.execute("UPDATE meta SET value=? WHERE key='applied_lsn'", (frames[-1].lsn,))
            if journal:
                db.execute(
                    "UPDATE meta SET value=? WHERE key='journal_count'", (self._journal_count,)
                )
            self._prune(exact=False)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            self._reload_thread_state()
            raise
        self._applied_lsn = frames[-1].lsn
        if retire:
            self._unretired = []
            self._retired_lsn = self._applied_lsn
        else:
            self._unretired.extend(updates)

    def _insert_updates(self, updates: list[tuple[str, int, bytes]], lsn: int) -> None:
        """Retire updates into SQLite (inside a transaction), skipping any that a
        compaction already covers, and record that the log is no longer needed for them."""
        self._insert_rows(
            "INSERT OR REPLACE INTO updates(key, data) VALUES ", 2, self._update_rows(updates)
        )
        self._db.execute("UPDATE meta SET value=? WHERE key='retired_lsn'", (lsn,))

    def _update_rows(self, updates: list[tuple[str, int, bytes]]) -> Iterator[list[Any]]:
        """(key, data) of the updates no compaction covers, as flat parameter lists of
        ``_UPDATE_CHUNK`` rows."""
        part: list[Any] = []
        for name, seq, data in updates:
            ns = self._namespace(name)
            if seq > ns.snap_seq:
                part.append((ns.id << _NS_SHIFT) | seq)
                part.append(data)
                if len(part) >= _UPDATE_CHUNK * 2:
                    yield part
                    part = []
        if part:
            yield part

    def _reload_thread_state(self) -> None:
        """After a rollback: the namespace ids, counts and retention points changed in it
        are gone. If even reading them back fails, the thread's view of SQLite is unknown:
        the storage fails for good (reopening reads it afresh)."""
        db = self._db
        try:
            self._namespaces = {
                name: _Namespace(id_, gen, snap_seq)
                for id_, name, gen, snap_seq in db.execute(
                    "SELECT id, name, snap_gen, snap_seq FROM namespaces"
                )
            }
            self._load_counters()
        except Exception as exc:
            if self._failure is None:
                self._failure = self._map_error(exc)
                log.error("storage %s failed: %s", self.data_dir, self._failure)
                self._wake_backlog(self._failure)
            raise

    def _load_counters(self) -> None:
        self._journal_count = int(self._meta("journal_count") or 0)
        self._oldest = int(self._meta("oldest") or 1)
        self._pruned_max_at_ms = int(self._meta("pruned_max_at_ms") or 0)

    def _insert_rows(self, prefix: str, width: int, parts: Iterable[list[Any]]) -> int:
        """One multi-row INSERT per part (a flat list of ``width`` values a row): one
        sqlite3_step, one GIL release, per part."""
        count = 0
        db = self._db
        sql: dict[int, str] = {}
        for part in parts:
            rows = len(part) // width
            text = sql.get(rows)
            if text is None:
                text = sql[rows] = _values_sql(prefix, width, rows)
            count += db.execute(text, part).rowcount
        return count

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def _take_pending(self) -> list[_Pending]:
        frames: list[_Pending] = []
        pending = self._pending
        while pending:
            frames.append(pending.popleft())
        return frames

    def _sync_before_apply(self) -> None:
        """With fsync durability SQLite must never get ahead of the durable log: after a
        power loss it would hold journal rows whose updates the log lost."""
        if self.durability == "fsync":
            self._fsync_log()

    def _drain(self) -> None:
        self._check_log_linked()
        frames = self._take_pending()
        if frames:
            try:
                self._sync_before_apply()
                self._apply(frames)
            except BaseException as exc:
                with self._wlock:
                    self._requeue(frames)
                err = self._apply_failed(exc)
                if err is exc:
                    raise
                raise err from exc
            self._drained_bytes += sum(f.size for f in frames)
            self._applied_ok()
        # Also without frames: a commit waiting for the backlog queued this job after it
        # started waiting, and counts on being told when the job is done.
        self._wake_backlog()

    def _check_log_linked(self) -> None:
        """(Storage thread.) A log whose directory was removed (or replaced) under the
        running node can never be opened again: fail the storage, so later commits raise
        instead of being acknowledged into it. Checked here, not per commit: ``os.fstat``
        releases the GIL, and on the event loop that handed it to this thread at every
        commit (a durable capture cost ~1.3x more)."""
        if self._failure is not None or self._log_fd < 0:
            return
        try:
            linked = os.fstat(self._log_fd).st_nlink > 0
        except OSError:
            return
        if not linked:
            self._failure = StorageError(
                f"{self._log_path} was removed while the storage had it open (the data "
                "directory was deleted or replaced); nothing written after that could "
                "survive a restart, so writes are refused"
            )
            log.error("storage %s failed: %s", self.data_dir, self._failure)
            self._wake_backlog(self._failure)

    def _requeue(self, frames: list[_Pending]) -> None:
        """Put frames whose apply failed back at the front of the queue (the caller holds
        ``_wlock``): the next drain tries them again, and since frames are applied in
        order, ``applied_lsn`` can never move past one of them. Their updates are still in
        the log, and the log is only truncated once everything in it is in SQLite."""
        self._pending.extendleft(reversed(frames))

    def _apply_failed(self, exc: BaseException) -> BaseException:
        """An apply failed and its frames are back in the queue: decide whether the
        storage can go on, wake waiting commits, and return the error to raise.

        Nothing was lost, so a failure that can pass (SQLite's "disk is full", "disk I/O
        error" or "database is locked", or an OSError) leaves the storage usable: commits
        still go to the log, which is what makes them durable; every later drain retries
        the queued frames, and the first one after the cause went away applies them all.
        The caller that waited for this apply (a read, a compaction, a flush) gets the
        error, and so do commits waiting for the backlog; if it lasts, the backlog fills
        up and every commit fails loudly. A failure that cannot pass makes the storage
        refuse all later commits until it is reopened (the log still holds the frames; the
        next open applies them): SQLite reports damage, or any other error (a constraint
        or programming error is a bug, and would repeat at every retry), or the connection
        is stuck in a transaction that did not roll back, or an fsync of the log failed
        (after a failed fsync Linux may already have dropped the unwritten pages, so a
        later fsync that succeeds proves nothing)."""
        err = self._map_error(exc) if isinstance(exc, Exception) else exc
        conn = self._conn
        if self._failure is not None:
            pass  # already failed for good (a failed fsync fails the storage itself)
        elif (
            not isinstance(exc, sqlite3.OperationalError | OSError)
            or isinstance(err, CorruptStorage)
            or conn is None
            or conn.in_transaction
        ):
            log.error(
                "storage %s failed, refusing further writes until reopened (the log keeps "
                "everything written so far): %s",
                self.data_dir,
                err,
            )
            self._failure = err
        elif self._apply_error is None:
            log.error(
                "storage %s: applying the log to SQLite failed; retrying with later writes "
                "(nothing is lost, the log holds them): %s",
                self.data_dir,
                err,
            )
        self._apply_error = err
        self._wake_backlog(err)
        return err

    def _applied_ok(self) -> None:
        if self._apply_error is not None:
            self._apply_error = None
            if self._failure is None:
                log.info("storage %s: applying the log to SQLite works again", self.data_dir)

    def _drain_job(self) -> None:
        if self.durability == "process":
            self._wait_for_a_pause()
        # Clear the flag before taking frames: a frame queued after this point either is
        # taken below or schedules a new job; none is left behind.
        self._drain_scheduled = False
        self._drain()
        if self._log_size >= _LOG_RETIRE_AT:
            self._retire()
        self._job_error = None

    def _wait_for_a_pause(self) -> None:
        """(Storage thread.) Wait while commits keep coming, up to ``_DRAIN_BYTES`` of
        backlog: durability is given by the log already, and a drain's Python work takes
        the GIL from the loop (a bulk load drained alongside ran up to ~20 % slower). Any
        other job, a commit waiting for the backlog, or ``_DRAIN_NOW`` frames end it."""
        while (
            len(self._pending) < _DRAIN_NOW
            and self._written_bytes - self._drained_bytes < _DRAIN_BYTES
        ):
            self._wake.clear()
            # Nothing else queued, no commit waiting for the backlog (one that starts
            # waiting after this check sets the event again, after the clear).
            if not self._jobs.empty() or self._backlog_waiters:
                return
            if time.monotonic() - self._last_append >= _DRAIN_DELAY:
                return  # the loop paused
            self._wake.wait(_DRAIN_DELAY)

    def _retire(self) -> None:
        """Move the live updates held only by the log into SQLite and empty the log.

        The bulk goes in without the writer lock (the loop keeps committing); only the
        last few frames are applied under it, so that nothing new can be appended between
        "everything is in SQLite" and the truncation."""
        db = self._db
        if self._retired_lsn < self._applied_lsn:
            db.execute("BEGIN IMMEDIATE")
            try:
                self._insert_updates(self._unretired, self._applied_lsn)
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                self._reload_thread_state()
                raise
            self._unretired = []
            self._retired_lsn = self._applied_lsn
        frames: list[_Pending] = []
        requeued = False
        try:
            with self._wlock:
                frames = self._take_pending()
                if frames:
                    try:
                        self._sync_before_apply()
                        self._apply(frames, retire=True)
                    except BaseException:
                        self._requeue(frames)  # and keep the log: it still needs them
                        requeued = True
                        raise
                    self._drained_bytes += sum(f.size for f in frames)
                if self._log_size and self._log_fd >= 0:
                    os.ftruncate(self._log_fd, 0)
                    self._log_size = 0
        except BaseException as exc:
            if not requeued:
                raise  # the frames are in SQLite; only the truncation failed
            err = self._apply_failed(exc)
            if err is exc:
                raise
            raise err from exc
        if frames:
            self._applied_ok()
        self._wake_backlog()

    def _wake_backlog(self, err: BaseException | None = None) -> None:
        """Tell the commits waiting for the backlog that an apply ended (``err``: failed).
        Only a look at a list when nobody waits: no hop to the loop per drain."""
        if self._backlog_waiters:
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._release_backlog, err)

    def _release_backlog(self, err: BaseException | None) -> None:
        """(On the loop.) Wake every waiting commit; with an error, each one raises."""
        waiters, self._backlog_waiters = self._backlog_waiters, []
        for fut in waiters:
            if fut.done():
                continue
            if err is None:
                fut.set_result(None)
            elif isinstance(err, ClosedError):
                fut.set_exception(ClosedError(str(err)))
            else:
                exc = StorageError(
                    f"storage {self.data_dir} cannot catch up with the log (the write is in "
                    f"the log, not yet in SQLite): {err}"
                )
                exc.__cause__ = err
                fut.set_exception(exc)

    # -- retention (thread) ------------------------------------------------------------------

    def _prune(self, *, exact: bool) -> None:
        """Drop journal rows beyond the retention; runs inside a write transaction, and
        stores what it changed (``journal_count``, ``oldest``, ``pruned_max_at_ms``) in
        the same one, so a commit never leaves the stored count behind the rows (a rollback
        must call ``_reload_thread_state``). When draining (not exact) it waits for a
        little excess so most drains skip it."""
        db = self._db
        r = self.retention
        oldest = self._oldest
        count = self._journal_count
        pruned_max = self._pruned_max_at_ms
        excess = count - r.max_events
        if excess > 0 and (exact or excess >= max(1, min(1024, r.max_events // 64))):
            row = db.execute(
                "SELECT cursor FROM journal ORDER BY cursor LIMIT 1 OFFSET ?", (excess,)
            ).fetchone()
            if row is not None:
                top = db.execute(
                    "SELECT max(at_ms) FROM journal WHERE cursor < ?", (row[0],)
                ).fetchone()[0]
                cur = db.execute("DELETE FROM journal WHERE cursor < ?", (row[0],))
                count -= cur.rowcount
                oldest = max(oldest, row[0])
                pruned_max = max(pruned_max, top or 0)
        now = time.monotonic()
        if r.max_age is not None and (exact or now - self._last_age_prune >= _AGE_PRUNE_EVERY):
            self._last_age_prune = now
            limit = int((time.time() - r.max_age) * 1000)
            # Like the in-memory journal: drop the oldest records while they are too old
            # (the scan stops at the first one young enough).
            row = db.execute(
                "SELECT cursor FROM journal WHERE at_ms >= ? ORDER BY cursor LIMIT 1", (limit,)
            ).fetchone()
            if row is not None:
                first = row[0]
                top = db.execute(
                    "SELECT max(at_ms) FROM journal WHERE cursor < ?", (first,)
                ).fetchone()[0]
            else:
                first, top = db.execute(
                    "SELECT max(cursor) + 1, max(at_ms) FROM journal"
                ).fetchone()
            if top is not None:  # something to drop
                cur = db.execute("DELETE FROM journal WHERE cursor < ?", (first,))
                count -= cur.rowcount
                oldest = max(oldest, first)
                pruned_max = max(pruned_max, top)
        if count != self._journal_count:
            db.execute("UPDATE meta SET value=? WHERE key='journal_count'", (count,))
            self._journal_count = count
        if oldest != self._oldest:
            db.execute("UPDATE meta SET value=? WHERE key='oldest'", (oldest,))
            # Plain int stores; the loop reads them in oldest_cursor() etc.
            self._oldest = oldest
        if pruned_max != self._pruned_max_at_ms:
            db.execute("UPDATE meta SET value=? WHERE key='pruned_max_at_ms'", (pruned_max,))
            self._pruned_max_at_ms = pruned_max

    def _needs_prune(self) -> bool:
        r = self.retention
        if self._journal_count > r.max_events:
            return True
        if r.max_age is None or self._journal_count == 0:
            return False
        row = self._db.execute("SELECT at_ms FROM journal ORDER BY cursor LIMIT 1").fetchone()
        return row is not None and row[0] < int((time.time() - r.max_age) * 1000)

    # -- jobs (thread) -----------------------------------------------------------------------

    def _read_journal_sync(
        self,
        after: int,
        limit: int,
        namespaces: frozenset[str] | None,
        exclude_session: str | None,
        since_ms: int | None,
    ) -> list[JournalRecord]:
        self._drain()
        db = self._db
        if self._needs_prune():
            db.execute("BEGIN IMMEDIATE")
            try:
                self._prune(exact=True)
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                self._reload_thread_state()
                raise
        sql = (
            "SELECT cursor, at_ms, ns, kind, write_id, session, other FROM journal WHERE cursor > ?"
        )
        args: list[Any] = [after]
        if namespaces is not None:
            sql += f" AND ns IN ({','.join('?' * len(namespaces))})"
            args.extend(sorted(namespaces))
        if exclude_session is not None:
            sql += " AND session != ?"
            args.append(exclude_session)
        if since_ms is not None:
            sql += " AND at_ms >= ?"
            args.append(since_ms)
        sql += " ORDER BY cursor LIMIT ?"
        args.append(limit)
        return [
            JournalRecord(c, at, ns, kind, wid, session, other or "")
            for c, at, ns, kind, wid, session, other in db.execute(sql, args)
        ]

    def _compact_sync(self, name: str, snapshot: bytes, upto_seq: int) -> int:
        self._drain()
        db = self._db
        upto = min(max(upto_seq, 0), _SEQ_MASK)
        db.execute("BEGIN IMMEDIATE")
        try:
            ns = self._namespace(name)
            gen = ns.snap_gen + 1
            path = self._snap_path(ns.id, gen)
            self._write_snapshot(path, snapshot)
            lo = ns.id << _NS_SHIFT
            dropped = db.execute(
                "SELECT coalesce(sum(length(data)), 0) FROM updates WHERE key BETWEEN ? AND ?",
                (lo, lo | upto),
            ).fetchone()[0]
            db.execute("DELETE FROM updates WHERE key BETWEEN ? AND ?", (lo, lo | upto))
            db.execute(
                "UPDATE namespaces SET snap_seq=?, snap_gen=?, snap_len=?, snap_crc=? WHERE id=?",
                (upto, gen, len(snapshot), zlib.crc32(snapshot), ns.id),
            )
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            self._reload_thread_state()
            raise
        old = ns.snap_gen
        ns.snap_gen = gen
        ns.snap_seq = upto
        if old:
            with contextlib.suppress(FileNotFoundError):
                self._snap_path(ns.id, old).unlink()
        # Covered updates still only in the log are simply forgotten: from now on the
        # snapshot has them, and a replay skips them (seq <= snap_seq).
        kept: list[tuple[str, int, bytes]] = []
        for item in self._unretired:
            if item[0] == name and item[1] <= upto:
                dropped += len(item[2])
            else:
                kept.append(item)
        self._unretired = kept
        # Move what is still live into SQLite and empty the log, so that the covered
        # updates leave the disk now; then give the freed pages back.
        self._retire()
        self._reclaim()
        return int(dropped)

    def _write_snapshot(self, path: Path, snapshot: bytes) -> None:
        if not self._snap_dir.is_dir():
            self._snap_dir.mkdir(mode=0o700, exist_ok=True)
            if self.durability == "fsync":
                _fsync_dir(self.data_dir)
        header = _SNAP_HEADER.pack(_SNAP_MAGIC, len(snapshot), zlib.crc32(snapshot))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(header + snapshot)
            while view:
                view = view[os.write(fd, view) :]
            if self.durability == "fsync":
                os.fsync(fd)
        except BaseException:
            # A partial snapshot (a full disk) would hold on to the space it took until
            # the next open: nothing points at it yet, so remove it now.
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        os.close(fd)
        if self.durability == "fsync":
            # The new directory entry must be durable before the store points at it.
            _fsync_dir(self._snap_dir)

    def _reclaim(self) -> None:
        """Give freed pages back to the file system and empty the WAL."""
        db = self._db
        # execute() would step the pragma once, freeing one page; executescript() runs it
        # to the end (we are in autocommit mode, so its implicit COMMIT is a no-op).
        db.executescript("PRAGMA incremental_vacuum;")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _fsync_log(self) -> None:
        if self._log_fd >= 0:
            try:
                os.fdatasync(self._log_fd)
            except OSError as exc:
                # Not retryable (see _apply_failed): from now on the log's durability is
                # unknown, so no later commit may be acknowledged as durable.
                if self._failure is None:
                    log.error("storage %s: fsync of the log failed: %s", self.data_dir, exc)
                    self._failure = self._map_error(exc)
                    self._wake_backlog(self._failure)
                raise
            # A log whose directory is gone synced fine, and is still lost: not durable.
            self._check_log_linked()
            if self._failure is not None:
                raise self._failure

    def _close_sync(self) -> None:
        try:
            if self._conn is not None and self._failure is None:
                # The log keeps the unretired updates; the next open reads them from it.
                self._drain()
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            self._close_db()
            if self._log_fd >= 0:
                os.close(self._log_fd)
                self._log_fd = -1
            self._unlock_dir()

    def _close_db(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    # -- the Storage protocol ----------------------------------------------------------------

    async def commit(
        self, updates: Sequence[tuple[str, bytes]], journal: Sequence[JournalRecord]
    ) -> None:
        """Append to the log; with ``durability="fsync"`` also wait for a (shared) fsync."""
        self._check_open()
        if not updates and not journal:
            return
        self._append(updates, journal, ())
        await self._after_write()

    async def save_cursor(self, session_id: str, cursor: int) -> None:
        self._check_open()
        self._append((), (), ((session_id, cursor),))
        await self._after_write()

    async def save_subscriptions(self, session_id: str, namespaces: frozenset[str]) -> None:
        """Written to SQLite directly (a registration is rare; its cursor goes through
        the log as usual)."""
        self._check_open()
        text = json.dumps(sorted(namespaces))
        await asyncio.shield(self._submit(self._save_subscriptions_sync, session_id, text))

    def _append(
        self,
        updates: Sequence[tuple[str, bytes]],
        journal: Sequence[JournalRecord],
        cursors: Iterable[tuple[str, int]],
    ) -> None:
        seqs = self._seq
        new_seq: dict[str, int] = {}
        ups: list[tuple[str, int, bytes]] = []
        added: dict[str, int] = {}
        for ns, data in updates:
            seq = new_seq.get(ns) or seqs.get(ns, 0)
            seq += 1
            new_seq[ns] = seq
            blob = data if type(data) is bytes else bytes(data)
            ups.append((ns, seq, blob))
            added[ns] = added.get(ns, 0) + len(blob)
        # Plain tuples all the way (records copied in C): the cyclic GC untracks a plain
        # tuple of str and int, never a named tuple or a list, and the frames wait here for
        # the drain (a bulk load of 100k kept 100k records for every full GC pass to walk;
        # lists that live that long count towards the next full pass). "" for no ``other``
        # becomes NULL on the storage thread (_journal_rows), not here on the loop.
        jrn: tuple[Any, ...] = tuple(map(tuple, journal))
        cur = tuple([(s, int(c)) for s, c in cursors])
        with self._wlock:
            lsn = self._lsn + 1
            payload = self._packer.pack((lsn, ups, jrn, cur))
            header = _encode_frame(payload)
            size = len(header) + len(payload)
            self._write_log(header + payload)
            self._lsn = lsn
            self._log_size += size
            self._pending.append(_Pending(lsn, size, tuple(ups), jrn, cur))
        # Only now, with the frame in the log, does the loop-side view move on.
        seqs.update(new_seq)
        for ns, n in added.items():
            self._tail_bytes[ns] = self._tail_bytes.get(ns, 0) + n
        if jrn:
            self._last_cursor = max(self._last_cursor, max(r[0] for r in jrn))
        self._written_bytes += size
        self._last_append = time.monotonic()
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._put((self._drain_job, (), None))

    def _write_log(self, frame: bytes) -> None:
        # A page-cache write of a few hundred bytes: cheap enough for the event loop, and
        # once it returned the frame survives kill -9 (durability="process"). It keeps the
        # GIL (see gilwrite) so that the storage thread cannot take it at every commit.
        fd = self._log_fd
        try:
            write_all(fd, frame)
        except BaseException as exc:
            # Whatever stopped it (a full disk, a signal's exception between retries), cut
            # off the partial frame so it cannot look like damage before later frames.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._log_size)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot write {self._log_path}: {exc}") from exc
            raise

    async def _after_write(self) -> None:
        if self.durability == "fsync":
            await self._sync()
        if self._written_bytes - self._drained_bytes > _MAX_BACKLOG:
            await self._wait_backlog()

    async def _sync(self) -> None:
        """Group commit: every caller that wrote before a sync started shares it; callers
        that write while it runs share the next one."""
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._sync_waiters.append(fut)
        if not self._sync_running:
            self._start_sync()
        await fut

    def _start_sync(self) -> None:
        waiters, self._sync_waiters = self._sync_waiters, []
        self._sync_running = True
        job = self._submit(self._fsync_log)

        def done(job: asyncio.Future[None]) -> None:
            exc = None if job.cancelled() else job.exception()
            for w in waiters:
                if not w.done():
                    if exc is None:
                        w.set_result(None)
                    else:
                        w.set_exception(exc)
            self._sync_running = False
            if self._sync_waiters:
                self._start_sync()

        job.add_done_callback(done)

    async def _wait_backlog(self) -> None:
        """Wait until the thread has applied enough. Any number of commits may wait: each
        apply, successful or not, wakes them all (a failed one makes them raise), and so
        do a failure and close."""
        assert self._loop is not None
        while self._written_bytes - self._drained_bytes > _MAX_BACKLOG:
            if self._failure is not None or self._state is not _State.CLOSING:
                self._check_open()  # a closing storage still drains (and wakes us)
            fut: asyncio.Future[None] = self._loop.create_future()
            self._backlog_waiters.append(fut)
            # Make sure a drain job starts after this waiter was published: its end wakes
            # it. (A drain that finished meanwhile moved _drained_bytes first; the loop
            # condition above sees that on the next round.)
            if not self._drain_scheduled:
                self._drain_scheduled = True
                self._put((self._drain_job, (), None))
            self._wake.set()  # a drain job waiting for more frames: now
            try:
                await fut
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._backlog_waiters.remove(fut)
                raise

    def tail_seq(self, namespace: str) -> int:
        self._check_state()
        return self._seq.get(namespace, 0)

    def tail_bytes(self, namespace: str) -> int:
        self._check_state()
        return self._tail_bytes.get(namespace, 0)

    def oldest_cursor(self) -> int:
        self._check_state()
        return self._oldest

    def pruned_max_at_ms(self) -> int:
        self._check_state()
        return self._pruned_max_at_ms

    def _check_state(self) -> None:
        if self._state is not _State.OPEN:
            self._check_open()

    async def compact(self, namespace: str, snapshot: bytes, upto_seq: int) -> None:
        self._check_open()
        # Never claim more than was committed: a later update would get a covered seq.
        upto = min(upto_seq, self._seq.get(namespace, 0))
        job = self._submit(self._compact_sync, namespace, bytes(snapshot), upto)

        def adjust(job: asyncio.Future[int]) -> None:
            # Runs even if the caller was cancelled meanwhile: the compaction itself went on.
            if not job.cancelled() and job.exception() is None:
                left = self._tail_bytes.get(namespace, 0) - job.result()
                self._tail_bytes[namespace] = max(0, left)

        job.add_done_callback(adjust)
        await asyncio.shield(job)

    async def read_journal(
        self,
        after: int,
        limit: int,
        *,
        namespaces: frozenset[str] | None = None,
        exclude_session: str | None = None,
        since_ms: int | None = None,
    ) -> list[JournalRecord]:
        self._check_open()
        if limit <= 0 or (namespaces is not None and not namespaces):
            return []
        return await self._submit(
            self._read_journal_sync, after, limit, namespaces, exclude_session, since_ms
        )

    async def flush(self) -> None:
        """Wait until everything committed so far is in SQLite (not needed for durability;
        useful for measurements and tests)."""
        self._check_open()
        await self._submit(self._drain)


_SUBSCRIPTIONS_TABLE: Final = (
    "CREATE TABLE subscriptions(session TEXT PRIMARY KEY, namespaces TEXT NOT NULL) WITHOUT ROWID"
)
"""Per session, a JSON list of the namespaces it subscribed to (added in format 1 without
a new version: a store without it gets it at open)."""

_IDLE_CHECK = 1.0
"""Seconds: how often an idle storage thread checks that its log is still linked."""

_HELD_LOCKS: set[int] = set()
"""Descriptors holding a data directory's lock in this process."""


def _drop_inherited_locks() -> None:
    # A child forked without exec (multiprocessing's default on Linux) shares the
    # parent's lock descriptions: the lock would outlive a parent killed with -9. Closing
    # the child's copies leaves the parent's lock as it was.
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _holder(lock_path: Path) -> str:
    """ " (pid N)" naming who holds a data directory, as far as its lock file says."""
    with contextlib.suppress(OSError, ValueError):
        with open(lock_path, "rb") as f:
            pid = int(f.read(32).decode().strip() or "0")
        if pid:
            return f" (pid {pid}{', this process' if pid == os.getpid() else ''})"
    return ""


def _fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (files created or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resolve(fut: asyncio.Future[Any], exc: BaseException | None, result: Any) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
