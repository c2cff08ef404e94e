"""ConversationsApi: the composition root, the one place where the parts are wired."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import getpass
import logging
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from ssl import SSLContext
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from subcog_crdt._bus import EventBus
from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.events import Captured, Conflict, Deleted, Event, Updated
from subcog_crdt._core.gcpause import gc_paused
from subcog_crdt._core.hlc import Hlc, stamp_datetime
from subcog_crdt._core.memory import Memory, find_conflicts
from subcog_crdt._core.schema import (
    Write,
    check_bool,
    check_names,
    check_namespace,
    check_session_id,
    check_unicode,
    copy_json,
    prepare_fields,
)
from subcog_crdt._errors import (
    ClosedError,
    CorruptStorage,
    InvalidArgument,
    InvalidNamespace,
    NotFound,
    SubcogError,
)
from subcog_crdt._lifecycle import Resume, cancel_and_wait, start_now
from subcog_crdt._mesh import MAX_FAR_NODES, MAX_FAR_SESSIONS, MAX_SEQ, MeshMap
from subcog_crdt._peering import F_PEERS, F_RECORD, PeerSync, content_blocks
from subcog_crdt._session import Session, SyncBatch
from subcog_crdt._sessions import SessionInfo, SessionRegistry
from subcog_crdt._storage.base import Durability, JournalRecord, Retention, Storage
from subcog_crdt._storage.memory import MemoryStorage
from subcog_crdt._transport.auth import push_token
from subcog_crdt._transport.base import Hello, Link

if TYPE_CHECKING:
    from subcog_crdt._relay import Relay
    from subcog_crdt._yjs import UpdateSink

__all__ = ["ConversationsApi", "PeerInfo"]

log = logging.getLogger(__name__)

_KIND = {Captured: "captured", Updated: "updated", Deleted: "deleted", Conflict: "conflict"}
_COMPACT_BYTES = 8 * 1024 * 1024
_COMPACT_QUIET = 0.05
_COMPACT_LATEST = 2
"""A compaction waits for local writes to pause (``_COMPACT_QUIET`` seconds without one),
until the tail is this many times its threshold, and at least 8 x ``_COMPACT_BYTES`` (64
MiB: a bulk load of 100k memories compacts after it, not on the way)."""
MAX_NAMESPACES = 10_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_SESSIONS_EVERY = 0.1  # seconds between two session lists sent to peers, at least
MAX_SYNC_NAMESPACES = 512
"""The most names ``sync_namespaces`` may hold (it travels in the link handshake)."""
MAX_USER_ID = 256


class _State(enum.Enum):
    NEW = "new"
    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A connected peer."""

    node_id: str
    url: str | None
    user_id: str
    namespaces: tuple[str, ...]
    """Namespaces this node syncs with it, as this node sees them: the peer may keep some
    of them private (it never names those) and then ignores what it gets for them."""
    transient: bool = False
    """The peer was opened with ``transient=True`` (a one-shot command): a write it
    confirms (``settle``) leaves with it, so it does not count as kept."""


def _check_relay(relay: object, secret: str | bytes | None) -> None:
    """A ws:// or wss:// URL; without a mesh secret, on loopback (the node's data does not
    leave the machine without one)."""
    from urllib.parse import urlsplit

    from subcog_crdt._transport.websocket import is_loopback as is_loopback_host

    if not isinstance(relay, str):
        raise InvalidArgument(f"relay must be a ws:// or wss:// URL, not {relay!r}")
    try:
        parts = urlsplit(relay)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise InvalidArgument(f"bad relay url {relay!r}: {exc}") from exc
    if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidArgument(f"relay must be a ws:// or wss:// URL, not {relay!r}")
    if secret is None and not is_loopback_host(parts.hostname):
        raise InvalidArgument(
            "without a mesh_secret a relay must be on this machine (loopback): its rooms "
            "would carry this node's memories off the machine"
        )


def _check_arguments(
    *,
    data_dir: object,
    mesh_secret: object,
    host: object,
    listen: object,
    retention: object,
    heartbeat: object,
    max_frame: object,
    advertise_host: object,
    discovery_dir: object,
    ssl: object,
    client_ssl: object,
) -> None:
    """Refuse wrongly typed constructor arguments here, naming them, rather than fail
    later (at open, at the first write, at a dial) with a builtin error."""
    for name, path in (("data_dir", data_dir), ("discovery_dir", discovery_dir)):
        if path is not None and not isinstance(path, str | os.PathLike):
            raise InvalidArgument(f"{name} must be a path (str or os.PathLike) or None")
    if mesh_secret is not None and not isinstance(mesh_secret, str | bytes):
        raise InvalidArgument("mesh_secret must be a str or bytes, or None")
    for name, value in (("host", host), ("advertise_host", advertise_host)):
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"{name} must be an address (a str) or None, not {value!r}")
    check_bool("listen", listen)
    if retention is not None and not isinstance(retention, Retention):
        raise InvalidArgument("retention must be a Retention(max_events=..., max_age=...)")
    if (
        isinstance(heartbeat, bool)
        or not isinstance(heartbeat, int | float)
        or not 0 < heartbeat <= 60
    ):
        raise InvalidArgument(f"heartbeat must be seconds, > 0 and <= 60, not {heartbeat!r}")
    if isinstance(max_frame, bool) or not isinstance(max_frame, int) or max_frame < 4096:
        raise InvalidArgument(f"max_frame must be an int >= 4096 (bytes), not {max_frame!r}")
    for name, ctx in (("ssl", ssl), ("client_ssl", client_ssl)):
        if ctx is not None and not isinstance(ctx, SSLContext):
            raise InvalidArgument(f"{name} must be an ssl.SSLContext or None")


def _journal_record(ns: str, ev: Event) -> JournalRecord:
    if type(ev) is Conflict:
        # A conflict concerns both writers: no session, so no one filters it out as their
        # own; its time is the winner's stamp, as its ``at``.
        return JournalRecord(
            ev.cursor, int(ev.winner.at[:13]), ns, "conflict", ev.write_id, "", ev.winner.key
        )
    # The write's own stamp: a write id is "<20 hex id>/<stamp>/...", ms first in the stamp.
    wid = ev.write_id
    return _new_record(
        JournalRecord, (ev.cursor, int(wid[21:34]), ns, _KIND[type(ev)], wid, ev.source_session, "")
    )


_new_record = tuple.__new__
"""``JournalRecord(...)`` without the named tuple's Python-level ``__new__`` (one record
per event: ~0.3 us less each)."""


class ConversationsApi:
    """One node: documents, storage, transport and discovery for one agent process.

    Use it as an async context manager (``async with ConversationsApi(...) as api``).

    Args:
        data_dir: ``None`` keeps everything in memory; a path makes the node durable and
            offline-first (see *Storage*).
        user_id: who runs the sessions (default: the OS user name).
        mesh_secret: ``None`` keeps the node on this machine (listens on 127.0.0.1, local
            discovery only); with a secret it listens on the LAN, finds peers by mDNS and
            authenticates every link with it.
        host: listen address (default 127.0.0.1, or 0.0.0.0 with a secret). Without a
            secret only a loopback address is accepted (``InvalidArgument`` at
            ``open``).
        port: listen port, 0 to 65535 (0, the default, picks a free one).
        peers: static peer URLs (``ws://host:port``), kept connected. Without a secret
            only loopback peers are accepted (``InvalidArgument`` at ``open``).
        discovery: ``("local", "mdns")`` by default; mDNS runs only with a secret; ``()``
            disables discovery.
        sync_namespaces: ``None`` replicates every namespace; a set replicates only those
            (at most ``MAX_SYNC_NAMESPACES``).
        private_namespaces: never leave this node, whatever else is configured.
        relay: a standard y-websocket server URL (``ws://`` or ``wss://``, a path
            allowed) where nodes that cannot dial each other meet: one room per shared
            namespace (docs/yjs.md, "Relays"). Without ``mesh_secret``, loopback only.
        durability: ``"process"`` (an acknowledged write survives kill -9) or ``"fsync"``
            (it also survives power loss).
        listen: ``False`` starts no server and no discovery (link nodes with
            ``attach``, e.g. in tests).
        retention: how much of the event journal to keep (``Retention``).
        storage: a storage object to use instead of the one ``data_dir`` selects (for
            tests and embedding; it must behave as the built-in ones, see
            ``subcog_crdt._storage.base.Storage``).
        heartbeat: seconds between pings; a silent peer is dropped within 3 s.
        max_frame: the largest frame sent or accepted (default 16 MiB).
        advertise_host: the address peers on the LAN should dial, if not the one mDNS sees.
        mdns_interfaces: interface names or IPv4 addresses for mDNS (default: all).
        discovery_dir: the same-machine registry directory (default under
            ``$XDG_RUNTIME_DIR``).
        ssl: a TLS context for the server (peers then dial ``wss://``).
        client_ssl: a TLS context for dialling ``wss://`` peers.
        transient: this node lives for one short command (the CLI's one-shot nodes):
            its peers learn it from the hello (``PeerInfo.transient``), so a write that
            only such a node confirmed is not taken for kept.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        user_id: str | None = None,
        mesh_secret: str | bytes | None = None,
        host: str | None = None,
        port: int = 0,
        peers: Sequence[str] = (),
        discovery: Sequence[str] = ("local", "mdns"),
        sync_namespaces: Iterable[str] | None = None,
        private_namespaces: Iterable[str] = (),
        relay: str | None = None,
        durability: Durability = "process",
        *,
        listen: bool = True,
        retention: Retention | None = None,
        storage: Storage | None = None,
        heartbeat: float = 1.0,
        max_frame: int = 16 * 1024 * 1024,
        advertise_host: str | None = None,
        mdns_interfaces: Sequence[str] | None = None,
        discovery_dir: str | os.PathLike[str] | None = None,
        ssl: SSLContext | None = None,
        client_ssl: SSLContext | None = None,
        transient: bool = False,
    ) -> None:
        if durability not in ("process", "fsync"):
            raise InvalidArgument(f"durability must be 'process' or 'fsync', not {durability!r}")
        _check_arguments(
            data_dir=data_dir,
            mesh_secret=mesh_secret,
            host=host,
            listen=listen,
            retention=retention,
            heartbeat=heartbeat,
            max_frame=max_frame,
            advertise_host=advertise_host,
            discovery_dir=discovery_dir,
            ssl=ssl,
            client_ssl=client_ssl,
        )
        if isinstance(discovery, str):
            raise InvalidArgument("discovery is a sequence such as ('local', 'mdns') or ()")
        discovery = check_names("discovery", discovery)
        for d in discovery:
            if d not in ("local", "mdns"):
                raise InvalidArgument(f"unknown discovery {d!r}: use 'local' and/or 'mdns'")
        # Collections of names: a str given instead would be read letter by letter (a
        # private namespace "secret" would protect "s", "e", "c"... and replicate).
        peers = check_names("peers", peers)
        sync_names = (
            None
            if sync_namespaces is None
            else check_names("sync_namespaces", sync_namespaces, check_namespace)
        )
        private_names = check_names("private_namespaces", private_namespaces, check_namespace)
        if mdns_interfaces is not None:
            mdns_interfaces = check_names("mdns_interfaces", mdns_interfaces)
        self.data_dir = Path(data_dir).expanduser().absolute() if data_dir is not None else None
        # It travels in the link handshake, whose messages are bounded (64 KiB) before
        # the peer is authenticated: refuse what could never link, not fail every dial.
        self.user_id = _check_user_id(user_id) or _os_user()[:MAX_USER_ID]
        if sync_names is not None and len(set(sync_names)) > MAX_SYNC_NAMESPACES:
            raise InvalidArgument(
                f"sync_namespaces names {len(set(sync_names))} namespaces; at most"
                f" {MAX_SYNC_NAMESPACES} (use None to sync every namespace)"
            )
        if isinstance(mesh_secret, str):
            mesh_secret = mesh_secret.encode()
        if mesh_secret is not None and not mesh_secret:
            raise InvalidArgument("mesh_secret is empty")
        self._secret = mesh_secret
        self._host = host
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise InvalidArgument(f"port must be an int from 0 to 65535 (0: any), not {port!r}")
        self._port = port
        self._static_peers = tuple(peers)
        # Urls the user asked to keep (peers= and connect()): discovery never releases them.
        self._kept_urls: set[str] = set(self._static_peers)
        self._discovery_kinds = tuple(discovery)
        self._private = frozenset(private_names)
        # Private wins, and the filter travels to peers (hello): a private name is never in it.
        self._sync_filter = None if sync_names is None else frozenset(sync_names) - self._private
        if relay is not None:
            _check_relay(relay, mesh_secret)
        self._relay = relay
        check_bool("transient", transient)
        self._transient = transient
        self._close_requested = False
        self._open_done: asyncio.Event | None = None
        self._closing: asyncio.Task[None] | None = None
        self._durability = durability
        self._listen = listen
        self._retention = retention
        self._heartbeat = heartbeat
        self._max_frame = max_frame
        self._advertise_host = advertise_host
        self._mdns_interfaces = None if mdns_interfaces is None else list(mdns_interfaces)
        self._discovery_dir = (
            Path(discovery_dir).expanduser() if discovery_dir is not None else None
        )
        self._ssl = ssl
        self._client_ssl = client_ssl
        if storage is not None:
            self._storage: Storage = storage
        elif self.data_dir is None:
            self._storage = MemoryStorage(retention, keep_documents=False)
        else:
            from subcog_crdt._storage.sqlite import SqliteStorage

            self._storage = SqliteStorage(self.data_dir, durability=durability, retention=retention)
        self.node_id = secrets.token_hex(8)
        """This node's id (16 hex digits; a durable node keeps its id across restarts)."""
        self._hlc = Hlc()
        self._cursor = 0
        self._committed_cursor = 0
        self._in_flight = 0  # commits started and not finished (_persist)
        # Peers' applied updates waiting for the end of this loop turn (_persist_soon).
        self._later: list[tuple[NamespaceDoc, list[bytes], list[JournalRecord]]] = []
        self._later_from: list[PeerSync] = []
        # Documents holding peers' updates not yet given to pycrdt (apply_update(defer=True)):
        # caught up at the start of the next loop turn, after the subscribers their events woke.
        self._behind: list[NamespaceDoc] = []
        self._commit_waiters: list[asyncio.Future[None]] = []
        self._docs: dict[str, NamespaceDoc] = {}
        self._homes: dict[str, NamespaceDoc] = {}  # memory id -> its namespace (_doc_of)
        self._sessions_due = False  # a sessions frame is scheduled (_broadcast_sessions)
        self._sessions_sent_at = -_SESSIONS_EVERY
        self._bus = EventBus()
        self.sessions = SessionRegistry()
        """The sessions this node knows: its own, those of its peers and those of the nodes
        it reaches through them (``list()``, ``get(id)``)."""
        self._mesh = MeshMap(self.node_id)
        # This node's record (frame 10) is numbered from the clock, so a restarted node's
        # records are newer than any of its previous run still travelling the mesh.
        self._record_seq = time.time_ns()
        self._record_timer: asyncio.TimerHandle | None = None
        self._mesh_warned = False
        self._links: dict[str, PeerSync] = {}
        self._yjs_rooms: dict[str, set[UpdateSink]] = {}
        """Where each namespace's changes go besides peers: Yjs clients of
        ``/yjs/<namespace>`` (docs/yjs.md) and relay rooms (``relay=``)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._compacting: dict[str, asyncio.Task[None]] = {}
        self._compact_waiting: set[str] = set()
        """Namespaces whose compaction task waits for local writes to pause."""
        self._index_due: dict[NamespaceDoc, None] = {}
        """Documents that may have resolving or indexing to do (written since, or loaded)."""
        self._snapshot_bytes: dict[str, int] = {}
        self._state = _State.NEW
        self._saved_cursors: dict[str, int] = {}
        self._turn_at = 0.0
        self._turn_mark: asyncio.Handle | None = None
        """Since ``_turn_at`` the loop has not run this callback: it has not had a turn
        (``_turn_due``)."""
        self._turn_armed = False
        """A write since the loop's last turn: ``_turn_mark`` is (or is about to be, at
        the write's commit) scheduled."""
        self._last_write = 0.0
        """When a local write last began, or a peer's write arrived (the background indexer
        and compactions wait for a pause)."""
        self._link_waiters: dict[Link, asyncio.Future[None]] = {}
        """connect() calls waiting for their link to be registered (``_on_link``)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop that opened the node: the only one it may be used from."""
        self._saved_subs: dict[str, frozenset[str]] = {}
        """Per session id, the subscriptions storage holds (resumed by a registration
        that names none)."""
        self._stale_subs: set[str] = set()
        """Sessions whose stored subscriptions were ignored at open (an invalid name)."""
        self._transport: Any = None
        self._discovery: list[Any] = []
        self._relays: list[Relay] = []
        self.url: str | None = None
        """The URL peers dial (``ws://host:port``), once open; None without a server."""

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> ConversationsApi:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Load stored state, then start the server and discovery (``async with`` does
        this). A node opens once."""
        if self._state is not _State.NEW:
            raise ClosedError("a ConversationsApi can be opened once")
        self._state = _State.OPENING
        self._loop = asyncio.get_running_loop()
        self._open_done = asyncio.Event()
        try:
            await self._open_steps()
            if self._close_requested:
                raise ClosedError(f"node {self.node_id} was closed while it opened")
        except BaseException:
            # Failed, cancelled or closed part way: undo what started. Nobody else would:
            # ``async with`` calls no __aexit__ when entering fails, and an aclose()
            # waiting for this may itself be cancelled.
            await self._close_once()
            raise
        finally:
            self._open_done.set()

    async def _open_steps(self) -> None:
        stored = await self._storage.open(self.node_id)
        if stored.node_id:
            self.node_id = stored.node_id
            self._mesh = MeshMap(self.node_id)
        self._cursor = self._committed_cursor = stored.last_cursor
        self._saved_cursors = dict(stored.cursors)
        self._saved_subs = {}
        for sid, names in stored.subscriptions.items():
            if all(_valid_namespace(n) for n in names):
                self._saved_subs[sid] = names
            else:
                log.warning("ignoring the stored subscriptions of %r: an invalid name", sid)
                self._stale_subs.add(sid)  # rewritten at its next registration
        # Loading makes ~10 objects per memory and no reference cycles: pausing the cyclic
        # collector meanwhile saves a third of a 100k-memory restart.
        with gc_paused():
            self._load_docs(stored.docs)
            self._snapshot_bytes.update(stored.snapshot_bytes)
        if self._close_requested:
            return  # aclose() came meanwhile: open() undoes what opened
        self._state = _State.OPEN
        self._index_wake = asyncio.Event()
        self._index_due.update(dict.fromkeys(self._docs.values()))
        self._index_task = asyncio.get_running_loop().create_task(self._index_in_background())
        self._index_wake.set()
        await self._start_network()

    def _load_docs(self, docs: dict[str, list[bytes]]) -> None:
        for ns, updates in docs.items():
            doc = self._new_doc(ns)
            try:
                doc.load(updates)
            except Exception as exc:
                raise CorruptStorage(
                    f"stored state of namespace {ns!r} does not load: {exc}",
                    path=str(self.data_dir or ""),
                ) from exc
            if doc.max_stamp:
                self._hlc.observe(doc.max_stamp)

    async def _start_network(self) -> None:
        if self._listen:
            from subcog_crdt._network import start_network

            await start_network(self)
        if self._relay is not None:
            from subcog_crdt._relay import Relay

            relay = Relay(self, self._relay)
            self._relays.append(relay)  # first: closing also undoes a start cut short
            await relay.start()

    async def aclose(self) -> None:
        """Shut down in order: stop accepting, close links, stop discovery, close storage.
        Closing twice is harmless."""
        if self._open_done is not None and not self._open_done.is_set():
            # open() is under way (its network start included): it sees this when its
            # step ends and undoes everything it started, even if this call is cancelled.
            self._close_requested = True
            await self._open_done.wait()
        await self._close_once()

    async def _close_once(self) -> None:
        """Shut down once, to the end even if a caller is cancelled meanwhile (a second
        cancel must not leave tasks or the data directory behind); every caller waits
        for that one run."""
        if self._closing is None:
            # Closed from now on (synchronously: an open() not yet begun then refuses).
            self._state = _State.CLOSED
            self._closing = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        self._state = _State.CLOSED
        if self._record_timer is not None:
            self._record_timer.cancel()  # it holds this node alive until it fires
            self._record_timer = None
        index_task = getattr(self, "_index_task", None)
        if index_task is not None:
            index_task.cancel()  # first: nothing may interrupt this before it
        for step, fn in (
            ("discovery", self._close_discovery),
            ("transport", self._close_transport),
            ("links", self._close_links),
            ("compaction", self._stop_compactions),
            ("storage", self._close_storage),
        ):
            try:
                await fn()
            except Exception:
                log.exception("closing %s failed", step)
        self._bus.close()
        if index_task is not None:
            await cancel_and_wait(index_task)
        for doc in self._docs.values():
            doc.close()

    async def _index_in_background(self) -> None:
        """Resolve lazily loaded memories and build the recall index in small slices while
        the node is otherwise idle, so the first recall after a restart or a burst of
        writes finds the work done. Recall still finishes whatever is left first."""
        while True:
            await self._index_wake.wait()
            self._index_wake.clear()
            started = time.monotonic()
            done = 0
            # Only the documents written since (or loaded): a node with thousands of
            # namespaces must not visit them all after every write.
            due, self._index_due = self._index_due, {}
            for doc in due:
                while doc.background_work:
                    # Not while local writes keep coming: the turns they give the loop
                    # are for links and pings, and recall finishes the rest anyway.
                    while time.monotonic() - self._last_write < _INDEX_AFTER_WRITES:
                        await asyncio.sleep(_INDEX_AFTER_WRITES)
                    doc.resolve_some(128)
                    doc.flush_index(128)
                    done += 128
                    await asyncio.sleep(0)  # yield to the loop between slices
            if done > 10_000:
                log.info("indexed ~%d memories in %.1f s", done, time.monotonic() - started)

    async def _close_discovery(self) -> None:
        for d in reversed(self._discovery):
            await d.aclose()
        self._discovery.clear()

    async def _close_transport(self) -> None:
        for r in self._relays:
            await r.aclose()
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    async def _close_storage(self) -> None:
        self._flush_later()  # (normally done in the turn that deferred it)
        for t in list(self._tasks):  # an fsync wait the flush started (_close_links
            await cancel_and_wait(t)  # ended the others): its frame is in the log
        await self._storage.aclose()

    async def _close_links(self) -> None:
        for peer in list(self._links.values()):
            await peer.link.close(1001, "node closing")
        for t in list(self._tasks):
            await cancel_and_wait(t)

    def __repr__(self) -> str:
        url = f" url={self.url!r}" if self.url else ""
        return f"<ConversationsApi node_id={self.node_id!r} {self._state.value}{url}>"

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise ClosedError(f"node {self.node_id} is {self._state.value}")
        if asyncio._get_running_loop() is not self._loop:
            # Its documents, storage and links belong to one loop (and thread); used from
            # another, a write would change them unsynchronised or half-fail.
            raise SubcogError(
                f"node {self.node_id} runs on the event loop that opened it; call it from "
                "that loop (from another thread: asyncio.run_coroutine_threadsafe)"
            )

    # -- namespaces --------------------------------------------------------------------

    def _next_cursor(self) -> int:
        self._cursor += 1
        return self._cursor

    def _new_doc(self, ns: str) -> NamespaceDoc:
        doc = NamespaceDoc(
            ns,
            node_id=self.node_id,
            hlc=self._hlc,
            next_cursor=self._next_cursor,
            homes=self._homes,
        )
        if self._may_share(ns):
            doc.on_local_update = self._push_local
            doc.has_audience = self._has_audience
        self._docs[ns] = doc
        return doc

    def _has_audience(self) -> bool:
        """Whether a local write has anyone to go to now (a peer, a Yjs client)."""
        return bool(self._links) or bool(self._yjs_rooms)

    def _push_local(self, ns: str, update: bytes) -> None:
        for peer in self._links.values():
            peer.push_update(ns, self.node_id, update)
        if self._yjs_rooms:
            self._to_yjs_clients(ns, (update,))

    def _to_yjs_clients(
        self, ns: str, updates: Sequence[bytes], source: UpdateSink | None = None
    ) -> None:
        """Send what changed ``ns`` to its Yjs clients (not back to the one it came from)."""
        for client in self._yjs_rooms.get(ns, ()):
            if client is not source:
                for u in updates:
                    client.send_update(u)

    async def _apply_from_client(self, ns: str, update: bytes, client: UpdateSink) -> None:
        """Apply an update from a Yjs client of this node (``/yjs/<ns>``): checked like a
        peer's, then handled like a local write (this node is where it entered the mesh:
        every peer gets it), and stored before the next message of that client is read."""
        self._check_open()
        if not self._may_share(ns):
            return
        doc = self._docs.get(ns)
        if doc is None:
            if not content_blocks(ns, update):
                return  # nothing to hold: do not create the namespace for it
            doc = self._ensure_doc(ns)
        events = doc.apply_update(update)
        updates = doc.take_outbox()
        if not updates and not events:
            return
        for peer in self._links.values():
            for u in updates:
                peer.push_update(ns, self.node_id, u)
        self._to_yjs_clients(ns, updates, client)
        records = [_journal_record(ns, ev) for ev in events]
        self._bus.publish(events)
        await self._persist([(doc, updates, records)])

    def _ensure_doc(self, ns: str) -> NamespaceDoc:
        doc = self._docs.get(ns)
        if doc is None:
            if len(self._docs) >= MAX_NAMESPACES:
                # A bound on what a peer's announcements can make this node allocate.
                raise InvalidArgument(
                    f"this node already holds {MAX_NAMESPACES} namespaces; not creating {ns!r}"
                )
            doc = self._new_doc(check_namespace(ns))
            if self._may_share(ns):
                for peer in self._links.values():
                    peer.announce_namespace(ns)
                for relay in self._relays:
                    relay.add_namespace(ns)
        return doc

    def _may_share(self, ns: str) -> bool:
        if ns in self._private:
            return False
        return self._sync_filter is None or ns in self._sync_filter

    def _shareable_namespaces(self) -> set[str]:
        names = {ns for ns in self._docs if self._may_share(ns)}
        if self._sync_filter is not None:
            names |= {ns for ns in self._sync_filter if ns not in self._private}
        return names

    def namespaces(self) -> list[str]:
        """The namespaces this node holds, sorted."""
        return sorted(self._docs)

    # -- sessions ----------------------------------------------------------------------

    async def register_session(
        self,
        session_id: str,
        subscribe: Iterable[str] | None = None,
        *,
        user_id: str | None = None,
    ) -> Session:
        """Register a session on this node (``subscribe``: the namespaces whose events it
        gets; None: none for a new session). Registering an id again (for example after
        a restart) resumes its ``sync(since="last")`` cursor and, unless ``subscribe``
        is given, its subscriptions; for a session registered now it returns the same
        session, with ``subscribe`` replacing its subscriptions (also for its open event
        streams) unless None."""
        self._check_open()
        check_session_id(session_id)
        if isinstance(subscribe, str):
            raise InvalidArgument("subscribe must be a list of namespaces, not a str")
        subs = (
            None
            if subscribe is None
            else frozenset(check_names("subscribe", subscribe, check_namespace))
        )
        user_id = _check_user_id(user_id)
        existing = self.sessions._local.get(session_id)
        if existing is not None and user_id is not None and user_id != existing.user_id:
            raise InvalidArgument(
                f"session {session_id!r} is registered for user {existing.user_id!r}, "
                f"not {user_id!r}: unregister it first"
            )
        if subs is None:
            # Kept: a registered session's, or those it had before a restart.
            subs = (
                existing.subscriptions
                if existing
                else self._saved_subs.get(session_id, frozenset())
            )
        # Refused before anything changes: the session, its subscriptions (peers refuse
        # a longer session list) and the namespaces it needs must fit.
        self.sessions._check_room(session_id, len(subs))
        new = [ns for ns in subs if ns not in self._docs]
        if new and len(self._docs) + len(new) > MAX_NAMESPACES:
            raise InvalidArgument(
                f"subscribing to {len(new)} new namespaces would pass the node's "
                f"{MAX_NAMESPACES}; it holds {len(self._docs)}"
            )
        for ns in sorted(new):
            self._ensure_doc(ns)
        if existing is not None:
            # New subscriptions apply at once, also to its open event streams.
            self.sessions._resubscribe(existing, subs)
            self._broadcast_sessions()
            await self._save_subscriptions(session_id, subs)
            return existing
        last = self._saved_cursors.get(session_id, self._committed_cursor)
        s = Session(self, session_id, user_id or self.user_id, subs, last)
        self.sessions._add_local(s)
        self._broadcast_sessions()
        # Last: cancelled while this waits, the registration is whole anyway.
        if session_id not in self._saved_cursors:
            self._saved_cursors[session_id] = last
            await self._storage.save_cursor(session_id, last)
        await self._save_subscriptions(session_id, subs)
        return s

    async def _save_subscriptions(self, session_id: str, subs: frozenset[str]) -> None:
        if self._saved_subs.get(session_id, frozenset()) != subs or session_id in self._stale_subs:
            self._stale_subs.discard(session_id)
            self._saved_subs[session_id] = subs
            await self._storage.save_subscriptions(session_id, subs)

    async def unregister_session(self, session_id: str) -> None:
        """End a local session: its event streams end and its calls raise
        ``ClosedError``. Its ``sync`` cursor is kept: registering the id again resumes
        it. NotFound if no such session is registered here."""
        self._check_open()
        check_session_id(session_id)
        session = self.sessions._pop_local(session_id)
        if session is None:
            raise NotFound(f"no local session {session_id!r}")
        session._end()
        self._broadcast_sessions()

    def _sessions_wire(self) -> list[dict[str, Any]]:
        """Local sessions as peers see them: private namespaces are left out."""
        out = []
        for s in self.sessions.local_sessions():
            wire = s.info().to_wire()
            wire["subscriptions"] = [n for n in wire["subscriptions"] if self._may_share(n)]
            out.append(wire)
        return out

    def _broadcast_sessions(self) -> None:
        """Tell peers the local sessions: at once, but at most once per
        ``_SESSIONS_EVERY``. Each frame lists them all, so a frame per registration cost
        each peer the square of the sessions (24.5 MB for 1000 started one by one)."""
        if self._sessions_due:
            return
        self._sessions_due = True
        loop = asyncio.get_running_loop()
        wait = self._sessions_sent_at + _SESSIONS_EVERY - loop.time()
        if wait > 0:
            loop.call_later(wait, self._send_sessions)
        else:
            loop.call_soon(self._send_sessions)

    def _send_sessions(self) -> None:
        self._sessions_due = False
        self._sessions_sent_at = asyncio.get_running_loop().time()
        if self._state is not _State.OPEN:
            return  # closing: links are going (a new link's hello lists the sessions)
        wire = self._sessions_wire()
        for peer in self._links.values():
            peer.send_sessions(wire)
        for relay in self._relays:
            relay.announce()
        self._announce()

    # -- the mesh beyond this node's links (frame 10, _mesh) ----------------------------

    def _announce(self) -> None:
        """Flood this node's record (its links and sessions) soon: nodes beyond its links
        learn its sessions from it. Debounced like the session list: a burst of link
        changes sends one record."""
        if self._record_timer is not None or self._state is not _State.OPEN or not self._links:
            return  # (no links: a new one's frame 5 announces this node anyway)
        loop = asyncio.get_running_loop()
        self._record_timer = loop.call_later(_SESSIONS_EVERY, self._send_record)

    def _send_record(self) -> None:
        self._record_timer = None
        if self._state is not _State.OPEN:
            return
        self._record_seq += 1
        links = sorted(self._links)
        frame = [F_RECORD, self.node_id, self._record_seq, links, self._sessions_wire()]
        for peer in self._links.values():
            peer.send_record(frame)

    def _on_record(
        self,
        source: PeerSync,
        origin: str,
        seq: int,
        peers: frozenset[str],
        sessions: tuple[SessionInfo, ...],
    ) -> None:
        """A node's record from ``source``: kept and forwarded to the other links if it
        is newer than the one held."""
        if origin == self.node_id:
            # This node's own, from an earlier run (or come back round a loop). Newer
            # than this run's (the clock went back since): number from past it, or the
            # mesh would keep the old one and ignore this run's.
            if self._record_seq <= seq < MAX_SEQ - (1 << 32):
                self._record_seq = seq
                self._announce()
            return
        record = self._mesh.offer(origin, seq, peers, sessions)
        if self._mesh.refused and not self._mesh_warned:
            self._mesh_warned = True
            log.warning(
                "the mesh beyond this node's links passes its bounds (%d nodes, %d sessions):"
                " some of its nodes or sessions are not listed",
                MAX_FAR_NODES,
                MAX_FAR_SESSIONS,
            )
        if record is None:
            return
        frame = record.frame(origin, F_RECORD)
        for peer in self._links.values():
            # The origin too: a forged or earlier-run record that reaches it makes it
            # number its own past it (above).
            if peer is not source:
                peer.send_record(frame)
        self._remap()

    def _send_records_to(self, peer: PeerSync) -> None:
        """Every held record, to a new link once its hello is in (its frame limit known:
        a record cut to fit 3 KiB would be kept cut under its number), and this node's
        own soon. Its other end may know none of them; its own, from an earlier run,
        tells it where to number its records from."""
        for origin, record in self._mesh.records():
            peer.send_record(record.frame(origin, F_RECORD))
        self._announce()

    def _remap(self) -> None:
        """Recompute which nodes beyond the links are reachable, and so their sessions."""
        links = {node_id: peer.peer_peers for node_id, peer in self._links.items()}
        far = self._mesh.walk(links)
        for relay in self._relays:  # nodes met at a relay, unless reached by links
            for node_id, sessions in relay.presence.sessions().items():
                if node_id not in links and node_id not in far:
                    far[node_id] = sessions
        self.sessions._set_far(far)

    # -- writes ------------------------------------------------------------------------

    async def _capture(
        self, session: Session, namespace: str, content: str, fields: dict[str, Any]
    ) -> Memory:
        if self._turn_due():
            await asyncio.sleep(0)
        session._check_active()
        doc = self._doc_for_writes(namespace, [(content, fields)])
        mem, events = doc.capture(session.id, content, fields)
        await self._commit(doc, events)
        return mem

    async def _capture_many(
        self, session: Session, namespace: str, items: Iterable[str | dict[str, Any]]
    ) -> list[Memory]:
        if self._turn_due():
            await asyncio.sleep(0)
        session._check_active()
        pairs: list[tuple[str, dict[str, Any]]] = []
        for item in _items(items):
            if isinstance(item, str):
                pairs.append((item, {}))
            elif isinstance(item, dict) and "content" in item:
                rest = dict(item)
                pairs.append((rest.pop("content"), rest))
            else:
                raise InvalidArgument("each item is a content str or a dict with 'content'")
        if not pairs:
            check_namespace(namespace)
            return []  # nothing to write (and no reason to create the namespace)
        doc = self._doc_for_writes(namespace, pairs)
        mems, events = doc.capture_many(session.id, pairs)
        await self._commit(doc, events)
        return mems

    def _doc_for_writes(
        self, namespace: str, items: list[tuple[str, dict[str, Any]]]
    ) -> NamespaceDoc:
        """The namespace's document. A new one is made only once the writes are known to
        be valid: a failing capture must not create the namespace here and on peers (an
        existing one needs no check here: NamespaceDoc checks every write it makes)."""
        try:
            doc = self._docs.get(namespace)
        except TypeError:  # unhashable: not a name (check_namespace says so below)
            doc = None
        if doc is None:
            check_namespace(namespace)
            for content, fields in items:
                prepare_fields({"content": content, **fields})
            doc = self._ensure_doc(namespace)
        return doc

    def _doc_of(self, memory_id: str) -> NamespaceDoc:
        if not isinstance(memory_id, str):
            raise InvalidArgument("memory_id must be a str")
        # Every document records the memories it holds in _homes (scanning every
        # namespace cost ~0.8 ms per get at 5000 of them).
        doc = self._homes.get(memory_id)
        if doc is None:
            raise NotFound(f"no memory {memory_id!r}")
        if doc.has(memory_id):
            return doc
        # Its last home holds only writes without their capture: a hostile writer can
        # put one id in two namespaces.
        for doc in self._docs.values():
            if doc.has(memory_id):
                return doc
        raise NotFound(f"no memory {memory_id!r}")

    async def _update(
        self,
        session: Session,
        memory_id: str,
        fields: dict[str, Any],
        expected_version: int | None,
    ) -> Memory:
        if self._turn_due():
            await asyncio.sleep(0)
        session._check_active()
        _check_version(expected_version)
        doc = self._doc_of(memory_id)
        mem, events = doc.update(session.id, memory_id, fields, expected_version)
        await self._commit(doc, events)
        return mem

    async def _delete(
        self, session: Session, memory_id: str, expected_version: int | None
    ) -> Memory:
        if self._turn_due():
            await asyncio.sleep(0)
        session._check_active()
        _check_version(expected_version)
        doc = self._doc_of(memory_id)
        mem, events = doc.delete(session.id, memory_id, expected_version)
        await self._commit(doc, events)
        return mem

    def _turn_due(self) -> bool:
        """Whether to give the event loop a turn (``await asyncio.sleep(0)``) before this
        write: if it has had none for ``_TURN_EVERY`` seconds of this node's writes. A
        durable write (``durability="process"``) or an in-memory one never waits: a
        caller writing in a loop would keep the loop from its links (updates, pings) for
        as long as it writes, and peers would drop the node as dead. A caller that awaits
        something else between writes (a pacing sleep, a request) gives the loop its
        turns already: its writes do not yield (that cost a loop iteration before the
        update left, at 200 writes/s most of them). Before the write, so a cancellation
        there changes nothing. A plain check, not a coroutine the writes await: it is on
        every write's path. The callback that tells a turn came is scheduled by
        ``_commit``, after the write's update left (``_arm_turn``)."""
        now = self._last_write = time.monotonic()
        if self._turn_mark is None and not self._turn_armed:
            # The loop ran the callback: a turn since the last check.
            self._turn_at = now
            self._turn_armed = True
            return False
        if now - self._turn_at >= _TURN_EVERY:
            if self._turn_mark is not None:
                self._turn_mark.cancel()
                self._turn_mark = None
            self._turn_armed = False
            return True
        return False

    def _arm_turn(self) -> None:
        if self._turn_armed and self._turn_mark is None:
            self._turn_mark = asyncio.get_running_loop().call_soon(self._turned)

    def _turned(self) -> None:
        self._turn_mark = None
        self._turn_armed = False

    async def _commit(
        self,
        doc: NamespaceDoc,
        events: list[Event],
        source: PeerSync | None = None,
        origin: str | None = None,
    ) -> None:
        """Propagate a transaction's updates and publish its events, then make both durable.

        Peers get the update before the local commit finishes: their copy does not depend on
        ours, and a peer that has it can only help us recover it. The caller returns only
        after the commit, so an acknowledged write is durable here."""
        self._arm_turn()
        await self._persist([self._propagate(doc, events, source, origin)])

    def _propagate(
        self,
        doc: NamespaceDoc,
        events: list[Event],
        source: PeerSync | None = None,
        origin: str | None = None,
        released: bool = False,
    ) -> tuple[NamespaceDoc, list[bytes], list[JournalRecord]]:
        """Publish events and forward a remote update; return what must be persisted.

        Publishing first: a listener (``Session.listen``) gets the event before the
        forwarding work; a stream's consumer runs after this turn either way. Publishing
        cannot raise (``EventBus.publish``), nor may anything after it once the outbox is
        taken (the caller persists what this returns)."""
        self._bus.publish(events)
        ns = doc.namespace
        updates = doc.take_outbox()
        records = [_journal_record(ns, ev) for ev in events]
        # Local writes went to peers already (NamespaceDoc.on_local_update). What a remote
        # update or catch-up changed here is forwarded as the document saw it (not the
        # bytes received: those can be a duplicate, or unblock earlier pending items) to
        # peers that cannot have it yet.
        if updates and released and self._may_share(ns):
            # It let the document integrate writes held back until now (an earlier update
            # was missing): those came from elsewhere, so any peer may lack them, the
            # sender of this one included. Sent to the others as made here (duplicates
            # are harmless; a wrong origin could stop a peer forwarding them). Not to the
            # sender, which has most of it (a catch-up it just sent, say): it is asked
            # for its state vector and gets only what it misses.
            for peer in self._links.values():
                if peer is source:
                    peer.request_resync(ns)
                    continue
                for u in updates:
                    peer.push_update(ns, self.node_id, u)
        elif updates and source is not None and origin is not None and self._may_share(ns):
            for peer in self._links.values():
                if peer is source or peer.node_id == origin or origin in peer.peer_peers:
                    continue
                for u in updates:
                    peer.push_update(ns, origin, u)
        if updates and source is not None and self._yjs_rooms:
            # A peer's update (a local write went to Yjs clients already, _push_local).
            self._to_yjs_clients(ns, updates)
        return doc, updates, records

    def _persist_soon(
        self, batch: list[tuple[NamespaceDoc, list[bytes], list[JournalRecord]]], peer: PeerSync
    ) -> None:
        """Persist what a peer's message applied at the end of this loop turn.

        Its events are out already: the subscribers they woke run first, instead of
        waiting for the log append (~25 us of a propagated capture's ~0.2 ms). Nobody was
        promised this copy (the writer acknowledged its own), and ``_commits_done`` counts
        it as in flight until it is in the log. Any other commit appends it first
        (``_persist``), so the log keeps the order in which writes reached the documents;
        close appends it before the storage closes."""
        if not self._later:
            self._in_flight += 1
            asyncio.get_running_loop().call_soon(self._flush_later)
        self._later.extend(batch)
        if peer not in self._later_from:
            self._later_from.append(peer)

    def _flush_later(self) -> None:
        """Start the commit of what ``_persist_soon`` holds (nothing if it is empty). A
        commit that must wait (an fsync, a storage backlog) holds the links whose updates
        it stores until it is done: they hand over no further message meanwhile, as when
        the link waited itself. A failed one closes those links."""
        if not self._later:
            return
        batch, self._later = self._later, []
        peers, self._later_from = self._later_from, []
        self._in_flight -= 1
        try:
            rest = start_now(self._persist(batch))
        except Exception as exc:
            self._wake_commit_waiters()
            for peer in peers:
                peer.persist_failed(exc)
            return
        if rest is not None:
            task = self._spawn(_finish(rest))
            for peer in peers:
                peer.hold_until(task)

    async def _persist(
        self, batches: list[tuple[NamespaceDoc, list[bytes], list[JournalRecord]]]
    ) -> None:
        """One durable commit for everything propagated (several updates, namespaces)."""
        if self._later:
            self._flush_later()  # peers' updates applied before this write, logged first
        if len(batches) == 1:  # the common case: one write
            doc, us, records = batches[0]
            updates = [(doc.namespace, u) for u in us]
            docs = [doc]
        else:
            updates = [(doc.namespace, u) for doc, us, _ in batches for u in us]
            records = [r for _, _, rs in batches for r in rs]
            docs = list({id(d): d for d, _, _ in batches}.values())
        if updates or records:
            self._in_flight += 1
            try:
                await self._storage.commit(updates, records)
            except asyncio.CancelledError:
                # Cancelled while waiting (for an fsync): the commit's frame went to the
                # log before its first await, so the write happened (it is in the
                # document, its events are out, a restart has it). Its journal records
                # must be readable now too, not only once a later write commits.
                self._committed(records, docs)
                raise
            finally:
                # Done, failed or cancelled: a sync() waiting on it looks again (after
                # _committed, which runs in this same turn).
                self._in_flight -= 1
                self._wake_commit_waiters()
        self._committed(records, docs)

    def _committed(self, records: list[JournalRecord], docs: list[NamespaceDoc]) -> None:
        if records:
            self._committed_cursor = max(self._committed_cursor, records[-1].cursor)
        self._index_wake.set()
        for doc in docs:
            self._index_due[doc] = None
            self._maybe_compact(doc)

    def _wake_commit_waiters(self) -> None:
        waiters, self._commit_waiters = self._commit_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _commits_done(self, cursor: int) -> None:
        """Wait until the events up to ``cursor`` are committed, or no commit is under
        way (the rest belong to writes whose commit failed). Events are published before
        their commit finishes (with ``durability="fsync"``, before the fsync): a consumer
        told to resync from a cursor (``Lagged``) must find every event it was not given
        in ``sync``, not a horizon below them."""
        loop = asyncio.get_running_loop()
        while self._committed_cursor < cursor and self._in_flight:
            fut: asyncio.Future[None] = loop.create_future()
            self._commit_waiters.append(fut)
            await fut

    def _maybe_compact(self, doc: NamespaceDoc) -> None:
        """Compact a namespace in the background once its tail outgrows both
        ``_COMPACT_BYTES`` and its last snapshot. Growing the threshold with the
        snapshot keeps the total work linear in the number of writes (a fixed 8 MB made
        compaction ~40 % of a 100k-memory bulk load), and no write waits for it. It
        starts once local writes pause (a snapshot of 100k memories holds the loop
        ~40 ms: a bulk load paid ~10 % for it), or at once when the tail grows far past
        the threshold (``_COMPACT_LATEST``): the disk stays bounded under any load."""
        ns = doc.namespace
        if self._state is not _State.OPEN:
            # (Closing: the storage may be closed already, and a write whose commit just
            # ended must still be reported done.)
            return
        tail = self._storage.tail_bytes(ns)
        threshold = max(_COMPACT_BYTES, self._snapshot_bytes.get(ns, 0))
        if ns in self._compacting:
            if ns in self._compact_waiting and tail > max(
                _COMPACT_LATEST * threshold, 8 * _COMPACT_BYTES
            ):
                # Waiting for a pause that does not come: now instead (the waiting task
                # has done nothing yet).
                self._compacting[ns].cancel()
                self._start_compaction(doc, wait=False)
            return
        if tail > threshold:
            self._start_compaction(doc, wait=True)

    def _start_compaction(self, doc: NamespaceDoc, *, wait: bool) -> None:
        ns = doc.namespace
        if wait:
            self._compact_waiting.add(ns)
        else:
            self._compact_waiting.discard(ns)
        task = asyncio.get_running_loop().create_task(self._compact_in_background(doc, wait))
        self._compacting[ns] = task

    async def _compact_in_background(self, doc: NamespaceDoc, wait: bool) -> None:
        ns = doc.namespace
        try:
            if wait:
                while (quiet := time.monotonic() - self._last_write) < _COMPACT_QUIET:
                    await asyncio.sleep(_COMPACT_QUIET - quiet)
                self._compact_waiting.discard(ns)
            await self._compact(doc)
        except SubcogError as exc:
            # Nothing is lost (the tail still holds every update); a broken store fails
            # the next commit loudly.
            log.warning("compacting %r failed: %s", ns, exc)
        except Exception:
            log.exception("compacting %r failed", ns)
        finally:
            if self._compacting.get(ns) is asyncio.current_task():  # (not a successor's)
                del self._compacting[ns]

    async def _compact(self, doc: NamespaceDoc) -> None:
        seq = self._storage.tail_seq(doc.namespace)
        snapshot = doc.diff()
        await self._storage.compact(doc.namespace, snapshot, seq)
        self._snapshot_bytes[doc.namespace] = len(snapshot)

    async def _stop_compactions(self) -> None:
        for task in list(self._compacting.values()):
            await cancel_and_wait(task)

    def _apply_remote(
        self, ns: str, origin: str, update: bytes, source: PeerSync
    ) -> tuple[NamespaceDoc, list[bytes], list[JournalRecord]] | None:
        """Apply a peer's update, publish its events and forward it; return what the
        caller must persist (it batches all updates of one received message)."""
        if self._state is not _State.OPEN:
            # Closing: its links close next. The update stays with the peer, which catches
            # us up on the next link; it is not the peer's fault (no protocol error).
            return None
        if not self._may_share(ns):
            return None
        doc = self._ensure_doc(ns)
        released_before = doc.released
        events = doc.apply_update(update, defer=True)
        if not doc.outbox and not events:
            return None  # nothing new: do not forward (this is what stops loops)
        # A peer's stream of writes keeps the background indexer (and compaction) waiting
        # like local writes do: this loop's turns are for the stream, and recall finishes
        # the rest anyway. (Only what changed something: a peer re-sending one update must
        # not hold them back for ever.)
        self._last_write = time.monotonic()
        released = doc.released != released_before
        out = self._propagate(doc, events, source=source, origin=origin, released=released)
        if doc.unapplied and doc not in self._behind:
            if not self._behind:
                # After _propagate's publication, so the subscribers it woke run first.
                asyncio.get_running_loop().call_soon(self._catch_up)
            self._behind.append(doc)
        return out

    def _catch_up(self) -> None:
        behind, self._behind = self._behind, []
        for doc in behind:
            doc.catch_up()

    # -- links -------------------------------------------------------------------------

    def _hello(self) -> Hello:
        return Hello(
            node_id=self.node_id,
            url=self.url,
            namespaces=None if self._sync_filter is None else tuple(sorted(self._sync_filter)),
            user_id=self.user_id,
        )

    async def _on_link(self, link: Link) -> None:
        """Run the sync protocol on a new link until it closes."""
        try:
            if self._state is not _State.OPEN:
                await link.close(1001, "node closing")
                return
            peer = PeerSync(self, link)
            old = self._links.get(peer.node_id)
            if old is not None:
                await old.link.close(4010, "replaced by a newer link")
            peer.send_hello()
            self._links[peer.node_id] = peer
            self._broadcast_peers()
        finally:
            waiter = self._link_waiters.pop(link, None)  # a connect() waiting for it
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        try:
            await peer.run()
        finally:
            if self._links.get(peer.node_id) is peer:
                del self._links[peer.node_id]
                self.sessions._drop_remote(peer.node_id)
                if self._state is _State.OPEN:
                    self._broadcast_peers()
                self._remap()

    def _broadcast_peers(self) -> None:
        ids = sorted(self._links)
        for peer in self._links.values():
            peer.send([F_PEERS, ids])
        self._announce()

    def _write_behind(self, coro: Any) -> None:
        """Start a storage write now, in this call (its log append is ordered before any
        later write), and finish it in the background; a failure is logged (no caller
        waits for it)."""
        try:
            rest = start_now(coro)
        except Exception:
            log.exception("a background storage write failed")
            return
        if rest is None:
            return

        async def finish(rest: Resume) -> None:
            try:
                await rest
            except Exception:
                log.exception("a background storage write failed")

        self._spawn(finish(rest))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _setup_app(self, app: Any) -> None:
        """Routes of the node's own HTTP surfaces (added before the server starts)."""
        from subcog_crdt._push import add_push_routes
        from subcog_crdt._yjs import add_yjs_routes

        add_push_routes(app, self)
        add_yjs_routes(app, self)

    @property
    def push_token(self) -> str | None:
        """The bearer token of this node's HTTP push endpoints (docs/push.md): derived
        from the mesh secret, the same on every node of the mesh; None without a secret
        (then only loopback clients are served, without a token)."""
        if self._secret is None:
            return None
        return push_token(self._secret)

    def attach(self, link: Link) -> asyncio.Task[None]:
        """Run the protocol on a link made elsewhere (an in-memory pair in tests)."""
        self._check_open()
        t = asyncio.get_running_loop().create_task(self._on_link(link))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def connect(self, url: str) -> None:
        """Dial a peer once and return when the link is up (its initial sync then runs in
        the background)."""
        self._check_open()
        if self._transport is None:
            raise InvalidArgument(
                "this node has no network transport (listen=False): it cannot dial peers"
            )
        try:
            link = await self._transport.connect(url)
        except Exception:
            self._check_open()  # the node closed under the dial: say that
            raise
        self._kept_urls.add(url)
        self._transport.add_peer(url)  # keep it: redial after a drop (no-op if kept already)
        # The link's task registers it: wait for that, so peers() lists it on return.
        await self._registered(link)
        self._check_open()  # closed meanwhile: the link is gone with the node

    async def _registered(self, link: Link) -> None:
        """Wait until the protocol runs on ``link`` (``peers()`` lists it), or it closed."""
        peer = self._links.get(link.peer.node_id)
        if (peer is None or peer.link is not link) and not link.closed:
            waiter = self._link_waiters.setdefault(link, asyncio.get_running_loop().create_future())
            # Bounded: a link the transport drops before its task runs is never registered.
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_LINK_REGISTERED_WITHIN):
                        await asyncio.shield(waiter)
            finally:
                if self._link_waiters.get(link) is waiter:
                    del self._link_waiters[link]

    async def settle(self, timeout: float = 5.0) -> list[PeerInfo]:
        """Wait until this node and its peers have caught up with each other.

        Returns once (1) every peer this node keeps a link to (``peers=``, ``connect``,
        discovery) has been dialled at least once, (2) each linked peer has sent what this
        node missed (every namespace both sync, those this node did not hold yet
        included) and (3) each has applied and stored (as durably as its own writes)
        everything this node sent before the call, its writes included. Returns the peers
        that confirmed within ``timeout`` seconds; a peer that is unreachable or slower is
        left out, not an error. For short-lived processes (a CLI call) that must see the
        mesh's memories, or must know a write reached a peer, before they exit."""
        self._check_open()
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not timeout > 0
            or timeout == float("inf")
        ):
            raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    for mech in list(self._discovery):
                        await mech.wait_scanned()
                    await transport.first_dials()
                    for link in list(transport.links.values()):
                        await self._registered(link)
        self._check_open()
        confirmed = list(self._links.values())
        # Two round trips: the first brings what the peer had and this node asked for,
        # and tells this node which namespaces it does not hold yet; the second brings
        # those (and what the peer asked this node for, stored there).
        for _ in range(2):
            if not confirmed:
                break
            tasks = [loop.create_task(p.barrier()) for p in confirmed]
            try:
                await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
            finally:
                for t in tasks:
                    t.cancel()
            confirmed = [
                p
                for p, t in zip(confirmed, tasks, strict=True)
                if t.done() and not t.cancelled() and t.result()
            ]
        self._check_open()
        return [self._peer_info(p) for p in confirmed if self._links.get(p.node_id) is p]

    def peers(self) -> list[PeerInfo]:
        """Connected peers."""
        return [self._peer_info(p) for p in self._links.values()]

    @staticmethod
    def _peer_info(p: PeerSync) -> PeerInfo:
        return PeerInfo(
            p.node_id, p.url, p.link.peer.user_id, tuple(sorted(p.shared)), p.peer_transient
        )

    # -- reading -----------------------------------------------------------------------

    def get(self, memory_id: str) -> Memory:
        """The current memory (deleted ones too, with ``deleted=True``)."""
        self._check_open()
        doc = self._doc_of(memory_id)
        mem = doc.get(memory_id)
        if mem is None:
            raise NotFound(f"no memory {memory_id!r}")
        return mem

    def memories(self, namespace: str, *, include_deleted: bool = False) -> list[Memory]:
        """Every memory of a namespace."""
        self._check_open()
        doc = self._docs.get(check_namespace(namespace))
        if doc is None:
            return []
        out = []
        for mid in doc.memory_ids(include_deleted):
            mem = doc.get(mid)
            if mem is not None:
                out.append(mem)
        return out

    def history(self, memory_id: str) -> list[Write]:
        """Every write of a memory, in clock order, losers of conflicts included."""
        self._check_open()
        doc = self._doc_of(memory_id)
        return sorted((w.public() for w in doc.writes(memory_id)), key=lambda w: w.order)

    def state_hash(self, namespace: str) -> str:
        """Equal on two nodes iff they hold the same state of ``namespace``."""
        self._check_open()
        doc = self._docs.get(check_namespace(namespace))
        return doc.state_hash() if doc is not None else "0" * 64

    def recall(
        self,
        query: str,
        *,
        namespace: str | None = None,
        namespaces: Iterable[str] | None = None,
        tags: Iterable[str] = (),
        limit: int = 10,
    ) -> list[Memory]:
        """Ranked full-text search over content and tags (BM25), best first, in one
        ``namespace``, several ``namespaces``, or (neither given) every namespace. With
        ``tags``, only memories holding every one of them."""
        self._check_open()
        if not isinstance(query, str):
            raise InvalidArgument("query must be a str")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidArgument("limit must be an int in 1..10000")
        if namespace is not None:
            if namespaces is not None:
                raise InvalidArgument("give namespace= or namespaces=, not both")
            names = [check_namespace(namespace)]
        elif namespaces is None:
            names = list(self._docs)
        else:
            # each once: a name given twice would list its hits twice
            names = list(dict.fromkeys(check_names("namespaces", namespaces, check_namespace)))
        # a str is refused, as capture(tags="x") refuses it; trimmed, as capture trims them
        tagset = frozenset(t.strip() for t in check_names("tags", tags))
        if "" in tagset:
            raise InvalidArgument("a tag is a non-empty str (after trimming), not blank")
        scored: list[tuple[float, str, NamespaceDoc]] = []
        for ns in names:
            doc = self._docs.get(ns)
            if doc is not None:
                hits = doc.search_ids(query, limit, tagset)
                scored.extend((score, mid, doc) for score, mid in hits)
        # Ranked across namespaces first; only the memories returned are built.
        scored.sort(key=lambda s: (-s[0], s[1]))
        out: list[Memory] = []
        for _, mid, doc in scored:
            mem = doc.get(mid)
            if mem is not None and not mem.deleted:
                out.append(mem)
                if len(out) == limit:
                    break
        return out

    # -- sync since --------------------------------------------------------------------

    async def _sync(
        self, session: Session, since: str | int | datetime, include_own: bool, limit: int
    ) -> SyncBatch:
        session._check_active()
        check_bool("include_own", include_own)
        # One sync per session at a time: two concurrent "last" calls must not both read
        # the same cursor (and return the same events twice).
        async with session._sync_lock:
            return await self._sync_locked(session, since, include_own, limit)

    async def _sync_locked(
        self, session: Session, since: str | int | datetime, include_own: bool, limit: int
    ) -> SyncBatch:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgument("limit must be a positive int")
        since_ms: int | None = None
        if since == "last":
            after = session.last_cursor
        elif isinstance(since, bool):
            raise InvalidArgument("since must be 'last', a cursor int or a datetime")
        elif isinstance(since, int):
            if since < 0:
                raise InvalidArgument("a cursor is >= 0")
            if since > self._cursor:
                # Continuing from it would skip every event up to it, silently.
                raise InvalidArgument(
                    f"cursor {since} is ahead of this node's newest ({self._cursor}): a "
                    "cursor is only meaningful on the node that returned it"
                )
            after = since
        elif isinstance(since, datetime):
            if since.tzinfo is None:
                raise InvalidArgument("since datetime must be timezone-aware")
            after = 0
            # Rounded up: a record of an earlier millisecond is before ``since``.
            since_ms = -(-((since - _EPOCH) // _MICROSECOND) // 1000)
        else:
            raise InvalidArgument("since must be 'last', a cursor int or a datetime")
        await self._commits_done(self._cursor)
        horizon = self._committed_cursor
        records, oldest, gap = await self._read_events(
            session, after, limit + 1, horizon, include_own, since_ms
        )
        complete = after + 1 >= oldest and not gap
        if since_ms is not None:
            # Journal times do not grow with cursors (an update received from a peer keeps
            # its own, older time), so the oldest record kept proves nothing; what matters
            # is whether a record at or after ``since`` was ever dropped.
            complete = not gap and (oldest <= 1 or since_ms > self._storage.pruned_max_at_ms())
        more = len(records) > limit
        records = records[:limit]
        events = [ev for ev in (self._rebuild(r) for r in records) if ev is not None]
        cursor = records[-1].cursor if more else max(horizon, after)
        if since == "last":
            # Stored first: if that fails the caller gets an error, not these events, so
            # the next sync must return them again.
            try:
                await self._storage.save_cursor(session.id, cursor)
            except asyncio.CancelledError:
                # The new cursor may be in the log already (written before the wait for
                # its fsync), but the caller gets none of these events: store the old
                # one again. Its log write happens in this call, before any later sync
                # of this session can store another (it waits for the lock held here).
                self._write_behind(self._storage.save_cursor(session.id, session.last_cursor))
                raise
            session.last_cursor = cursor
            session.last_sync = datetime.now(UTC)
            self._saved_cursors[session.id] = cursor
        return SyncBatch(events=events, cursor=cursor, complete=complete, more=more)

    async def _read_events(
        self,
        session: Session,
        after: int,
        want: int,
        horizon: int,
        include_own: bool,
        since_ms: int | None,
    ) -> tuple[list[JournalRecord], int, bool]:
        """Up to ``want`` journal records of the session's subscriptions after ``after``
        and up to ``horizon``, in order; the oldest cursor the journal kept at the first
        read; and whether retention dropped records between two reads (other writers can
        push the journal past its bound while this one pages past own records).

        Own records (this session's writes on this node) are left out unless
        ``include_own``. A session of the same name on another node is someone else, so
        the storage's filter by session id alone would be wrong: own records are skipped
        here and reading goes on until ``want`` others are found, the journal ends or the
        horizon is passed. Every record up to the last one returned has been looked at,
        so continuing after it neither skips nor repeats one."""
        names = frozenset(session.subscriptions)
        own_session = session.id
        own_tail = "/" + self.node_id  # a write id is "<id>/<stamp>/<session>/<node>"
        out: list[JournalRecord] = []
        oldest: int | None = None
        gap = False
        pos = after
        while True:
            # Always a full page: filtering own records must not turn into many tiny reads.
            rows = await self._storage.read_journal(pos, want, namespaces=names, since_ms=since_ms)
            # Reading applies retention first: the oldest kept cursor is exact only now.
            if oldest is None:
                oldest = self._storage.oldest_cursor()
            elif self._storage.oldest_cursor() > pos + 1:
                gap = True  # records after the last page were dropped before this read
            for r in rows:
                if r.cursor > horizon:
                    return out, oldest, gap  # not committed yet: the next sync gets it
                if include_own or r.session != own_session or not r.write_id.endswith(own_tail):
                    out.append(r)
                    if len(out) >= want:
                        return out, oldest, gap
            if len(rows) < want:
                return out, oldest, gap  # the journal ends here
            pos = rows[-1].cursor

    def _rebuild(self, rec: JournalRecord) -> Event | None:
        """An event as it was, from its journal row and the document."""
        doc = self._docs.get(rec.namespace)
        if doc is None:
            return None
        mid = rec.write_id.split("/", 1)[0]
        # Only the writes this event needs are read: a memory can have thousands.
        w = doc.write(rec.write_id)
        if w is None:
            return None
        common: dict[str, Any] = {
            "namespace": rec.namespace,
            "cursor": rec.cursor,
            "at": stamp_datetime(w.at),
            "source_session": w.session,
            "node_id": w.node,
            "write_id": w.key,
            "memory_id": mid,
        }
        if rec.kind == "captured":
            mem = doc.memory_at(w.key)
            if mem is None:
                return None
            return Captured(memory=mem, **common)
        if rec.kind == "updated":
            return Updated(changes=copy_json(w.changes), **common)
        if rec.kind == "deleted":
            return Deleted(**common)
        winner = doc.write(rec.other)
        if winner is None or winner.memory_id != mid:
            return None
        found = [c for c in find_conflicts(winner, [w]) if c.loser.key == w.key]
        fields = found[0].fields if found else ()
        common.update(
            at=stamp_datetime(winner.at), source_session=winner.session, node_id=winner.node
        )
        return Conflict(winner=winner.public(), loser=w.public(), fields=fields, **common)


async def _finish(rest: Resume) -> None:
    await rest


def _items(items: object) -> list[Any]:
    """``capture_many``'s items as a list; a str or a dict (which would be iterated by
    character or key) and anything not iterable are refused."""
    if isinstance(items, str | bytes | bytearray | dict):
        raise InvalidArgument(
            f"items must be a list of content strs or dicts, not a single {type(items).__name__}"
        )
    try:
        return list(cast("Iterable[Any]", items))
    except TypeError:
        raise InvalidArgument(
            f"items must be a list of content strs or dicts, not {type(items).__name__}"
        ) from None


def _check_version(expected: object) -> None:
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
        raise InvalidArgument(f"expected_version must be an int or None, not {expected!r}")


_TURN_EVERY = 0.005
"""Seconds of back-to-back local writes after which the next gives the loop a turn."""

_INDEX_AFTER_WRITES = 0.002
"""Seconds without a local write before the background indexer takes a slice."""

_LINK_REGISTERED_WITHIN = 5.0
"""Seconds ``connect()`` waits for its new link to be listed (at once, unless the node is
closing or an older link to the same peer is slow to close)."""


def _valid_namespace(name: str) -> bool:
    try:
        check_namespace(name)
    except InvalidNamespace:
        return False
    return True


def _check_user_id(user_id: object) -> str | None:
    if user_id is None:
        return None
    if not isinstance(user_id, str):
        raise InvalidArgument(f"user_id must be a str, not {type(user_id).__name__}")
    if len(user_id) > MAX_USER_ID:  # peers refuse a session list holding a longer one
        raise InvalidArgument(f"user_id is over {MAX_USER_ID} characters")
    return check_unicode("user_id", user_id)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
