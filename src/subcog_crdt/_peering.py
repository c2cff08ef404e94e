"""The sync protocol spoken over one link (see docs/protocol.md).

A WebSocket message carries one or more msgpack arrays back to back (coalescing: while a
send is in flight, queued frames go out together in the next message). Frame types:

``[0, namespaces, filter, sessions, peers, max_frame?]``  hello: what this node syncs and
                                                hosts; the largest frame it accepts
``[1, ns, state_vector]``                       sync step 1: "this is what I have"
``[2, ns, update, more]``                       sync step 2: what you miss (chunked)
``[3, ns, origin_node, update]``                a live update
``[4, sessions, more?]``                        this node's sessions changed (chunked)
``[5, peers]``                                  the node ids this node is linked to
``[6, ns]``                                     a namespace now exists here
``[7, ns]``                                     send me your state vector (resync)
``[8, token]``                                  barrier: answer once everything before it is handled
``[9, token]``                                  the barrier's answer
``[10, origin, seq, peers, sessions]``          a node's record: its links and sessions
                                                (flooded: forwarded once if new here)

Live updates are never echoed to the link they came from, and forwarded to a linked peer
only when that peer is not itself linked to the update's origin; anti-entropy (step 1/2 on
every new link, after an overflow, and when a peer's links change) repairs anything a
topology change missed.

What a peer says costs this node little: a namespace it names is only remembered (a
document is created when content for it arrives, within per-link and node-wide bounds),
and a request (step 1, resync) is queued at most once per namespace and answered from the
document as it is when the answer is sent, so the queue holds requests, not copies of the
state.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack
from pycrdt import get_state, merge_updates

from subcog_crdt._core.schema import check_namespace
from subcog_crdt._core.ydecode import (
    UpdateDecodeError,
    decode_state_vector,
    encode_state_vector,
    read_update,
)
from subcog_crdt._core.ysplit import UpdateScan
from subcog_crdt._errors import (
    ClosedError,
    FrameTooLarge,
    InvalidArgument,
    InvalidNamespace,
    ProtocolError,
    SubcogError,
)
from subcog_crdt._lifecycle import Resume, cancel_and_wait, start_now
from subcog_crdt._mesh import check_record
from subcog_crdt._sessions import (
    MAX_SESSIONS,
    MAX_SUBSCRIPTIONS,
    SessionInfo,
    sessions_from_wire,
)
from subcog_crdt._transport.base import DEFAULT_MAX_FRAME, Link

if TYPE_CHECKING:
    from subcog_crdt._api import ConversationsApi

__all__ = [
    "F_PEERS",
    "F_RECORD",
    "F_UPDATE",
    "YIELD_TO_LOCAL_PEERS",
    "PeerSync",
    "content_blocks",
    "is_live_update",
]

log = logging.getLogger(__name__)

(
    F_HELLO,
    F_SV,
    F_DIFF,
    F_UPDATE,
    F_SESSIONS,
    F_PEERS,
    F_NAMESPACE,
    F_RESYNC,
    F_BARRIER,
    F_BARRIER_ACK,
    F_RECORD,
) = range(11)
_MAX_ACKS_OWED = 1024  # barriers one message may ask this node to answer
_MAX_DIFF = 1 << 30
"""Step-2 bytes being reassembled, all links and namespaces of a node together: a peer's
full state may legitimately span many frames (nothing about ``max_frame`` bounds it), but
more links must not multiply what peers can make this node buffer."""
_MAX_OFFERED = 4096  # namespaces a peer holds and this node does not, remembered per link
_MAX_ADOPTED = 4096  # namespaces one link's content may make this node create
_LOCAL_RESERVE = 10
"""Peers' content never makes this node create its last ``MAX_NAMESPACES // 10``
documents: those stay for its own sessions."""
_SMALL_FRAME = 3 << 10
"""A hello larger than this goes as a bare hello followed by its lists in other frames, and
a session list larger than this in parts (``[4, part, True]`` ... ``[4, last]``): the
peer's frame limit is unknown until its hello arrives, and no node accepts less than
4 KiB."""
_EMPTY_SV = b"\x00"  # the state vector of an empty document: "send me everything"
_QUEUE_BYTES = 64 << 20  # past this, live updates are dropped and the peer resynced
_QUEUE_HARD_BYTES = 512 << 20  # past this even control frames: the peer is disconnected
_QUEUE_FRAMES = 4096
_SLICE_BYTES = 256 << 10
"""A received update larger than this is applied in pieces (``UpdateScan``), each one
applied, journalled and persisted on its own, with the event loop running in between: a
catch-up of 100k memories takes seconds to derive, and must not stall heartbeats, other
peers and local writes that long. Also the largest piece, in bytes."""
_PIECE_STRUCTS = 512  # writes per piece: ~10-25 ms of work here
_SCAN_STEP = 8192  # structs scanned per loop turn (~10 ms)
_CHECK_STEP = 16  # pieces pycrdt checks per loop turn (~10 ms)
_EAGER_GAP = 0.0005  # seconds: writes closer together than this are coalesced
YIELD_TO_LOCAL_PEERS = True
"""After an eager send to a peer on this machine, give up the CPU (``sched_yield``).

Linux wakes the receiving process on the sender's CPU (a socket wake-up is a "sync"
wake-up: the kernel expects the sender to sleep soon), so a peer process waits until this
node finishes the write that produced the update (its durable commit, its events) and goes
idle: ~0.3 ms here. Yielding lets it apply the update at once. The cost is borne by the
writer: the ``capture()`` that triggered the send returns after the peer's turn instead of
before it (measured in ``benchmarks/bench_sync.py``). Only the idle-link path yields, never
a coalesced burst, and never for remote peers."""


def is_live_update(message: bytes) -> bool:
    """True if a message holds only live updates (safe to reorder or duplicate)."""
    try:
        frames = list(msgpack.Unpacker(io.BytesIO(message), raw=False, use_list=True))
    except Exception:
        return False
    return bool(frames) and all(isinstance(f, list) and f and f[0] == F_UPDATE for f in frames)


class _Queued(NamedTuple):
    """A received update waiting behind a large one (``PeerSync._large``)."""

    ns: str
    origin: str
    update: bytes
    counted: bool
    """A step 2: counted against ``_MAX_DIFF`` until applied (``PeerSync._release``)."""


class _UpdateRun:
    """Live updates received back to back for one namespace from one origin."""

    __slots__ = ("ns", "origin", "updates")

    def __init__(self, ns: str, origin: str, updates: list[bytes]) -> None:
        self.ns = ns
        self.origin = origin
        self.updates = updates


def _merge_runs(frames: list[Any]) -> list[Any]:
    """``frames`` with each run of two or more well-formed live updates of the same
    namespace and origin replaced by one ``_UpdateRun`` (anything else as it was,
    in order; malformed frames are left for the frame checks)."""
    out: list[Any] = []
    run: list[Any] = []

    def flush() -> None:
        if len(run) > 1:
            out.append(_UpdateRun(run[0][1], run[0][2], [f[3] for f in run]))
        else:
            out.extend(run)
        run.clear()

    for f in frames:
        if (
            type(f) is list
            and len(f) == 4
            and f[0] == F_UPDATE
            and type(f[1]) is str
            and type(f[2]) is str
            and type(f[3]) is bytes
        ):
            if run and (run[0][1] != f[1] or run[0][2] != f[2]):
                flush()
            run.append(f)
        else:
            flush()
            out.append(f)
    flush()
    return out


def _pack(frame: Any) -> bytes:
    out: bytes = msgpack.packb(frame, use_bin_type=True)
    return out


async def _raise_after(pending: Awaitable[None], exc: Exception) -> None:
    await pending
    raise exc


async def _settled(task: asyncio.Task[None]) -> None:
    """Wait until ``task`` is done, whatever its outcome (its owner handles that)."""
    await asyncio.wait((task,))


def content_blocks(ns: str, update: bytes) -> list[tuple[int, int, int]]:
    """The blocks of content ``update`` holds for ``ns`` (empty: nothing to hold, a
    namespace is not created for it); ``ProtocolError`` if it is no Yjs update."""
    try:
        return read_update(update, "").blocks
    except UpdateDecodeError as exc:
        raise ProtocolError(f"invalid Yjs update for {ns!r}: {exc}") from exc


class PeerSync:
    """Runs the protocol on one link for the node that owns it."""

    def __init__(self, api: ConversationsApi, link: Link) -> None:
        self.api = api
        self.link = link
        self.node_id = link.peer.node_id
        self.url = link.peer.url
        self.peer_filter: frozenset[str] | None = None
        self.peer_peers: frozenset[str] = frozenset()
        self.peer_max_frame = DEFAULT_MAX_FRAME
        """The largest frame the peer accepts (its hello says; the default if it does not)."""
        self.peer_transient = False
        """The peer lives for one short command (its hello says): what it holds goes
        with it."""
        self.shared: set[str] = set()
        """Namespaces synced with this peer: this node holds them and both sides sync them."""
        self.offered: set[str] = set()
        """Namespaces the peer holds, both sides sync, and this node does not hold (yet);
        at most ``_MAX_OFFERED``."""
        self.adopted = 0
        """Documents this link's content made this node create."""
        self._limit = api._max_frame  # min(ours, the peer's) once its hello is in
        self._sent_sv: set[str] = set()
        self._diff_parts: dict[str, list[bytes]] = {}
        self._diff_size: dict[str, int] = {}
        self._diff_total = 0
        self._queue: deque[bytes | tuple[int, str]] = deque()
        self._pending: set[tuple[int, str]] = set()
        self._pending_sv: dict[str, dict[int, int]] = {}
        self._busy = False
        self._queued_bytes = 0
        self._last_eager = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._overflowed = False
        self._hello_seen = False
        self._session_parts: list[SessionInfo] | None = None
        self._session_ids: set[str] = set()
        self._session_names = 0
        self._sessions_owed = False
        """This node's session list waits for the peer's hello (its frame limit)."""
        self._to_persist: list[Any] = []
        self._hold: asyncio.Task[None] | None = None
        """A commit of updates this link applied that must finish before the next
        message is handed over (``hold_until``)."""
        self._large: list[_Queued] = []
        """Large updates of the message being handled, applied in pieces after it (and
        every update after one of them, to keep their order)."""
        self._closed = False
        self._barriers: dict[int, asyncio.Future[bool]] = {}
        """This node's barriers (``barrier``) waiting for the peer's answer, by token."""
        self._barrier_seq = 0
        self._acks_owed: list[int] = []
        """The peer's barriers handled in the message being handled: answered once what
        the message applied is stored."""
        self._late_acks: list[int] = []
        """Answers to this node's barriers that came behind a large update of the same
        message: they count once it is applied."""
        self._warned: set[str] = set()
        self._yield_after_send = YIELD_TO_LOCAL_PEERS and getattr(link, "same_host", False)
        self.bytes_sent = 0
        self.frames_sent = 0

    # -- outgoing ----------------------------------------------------------------------

    def send(self, frame: list[Any]) -> None:
        """Queue a control frame (never dropped; a peer that lets them pile up past
        ``_QUEUE_HARD_BYTES`` is disconnected)."""
        if self._closed:  # the link is going: nothing more to send (or to warn about)
            return
        data = _pack(frame)
        if self._queued_bytes + len(data) > _QUEUE_HARD_BYTES:
            log.warning("closing link to %s: it does not read what it asks for", self.node_id)
            self._closed = True
            self._wake.set()
            task = asyncio.get_running_loop().create_task(self.link.close(4000, "queue full"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self.enqueue(data, live=False)

    def _request(self, kind: int, ns: str) -> None:
        """Queue a step 1 (``F_SV``), a step 2 (``F_DIFF``, for the state vector in
        ``_pending_sv``) or a resync request for ``ns``, at most once: the frame is made
        from the document when the writer sends it, so a request repeated meanwhile is
        already answered by the one queued, and the queue holds no copies of the state."""
        key = (kind, ns)
        if self._closed or key in self._pending:
            return
        self._pending.add(key)
        self._queue.append(key)
        self._wake.set()

    def enqueue(self, data: bytes, live: bool = True) -> None:
        """Queue one frame. Live updates may be dropped when the peer is slow (it is then
        resynced); control frames never are."""
        if self._closed:
            return
        if live and len(data) > self._limit:
            # One live update larger than a frame (a huge batch): send it the way a
            # catch-up goes instead, as a step 2 split into chunks.
            log.info("update of %d bytes exceeds the frame limit; resyncing instead", len(data))
            self._overflowed = True
            self._wake.set()
            return
        if live and (len(self._queue) >= _QUEUE_FRAMES or self._queued_bytes >= _QUEUE_BYTES):
            # The peer is slow: stop buffering live updates; resync (only what it misses)
            # once the queue has drained.
            self._overflowed = True
            return
        if not self._queue and not self._busy:
            now = time.monotonic()
            if now - self._last_eager > _EAGER_GAP:
                # Idle link: send now. Under a burst (writes closer together than
                # _EAGER_GAP) queue instead, so the writer coalesces them into one message.
                self._last_eager = now
                self._send_eagerly(data)
                return
        self._queue.append(data)
        self._queued_bytes += len(data)
        self._wake.set()

    def _send_eagerly(self, data: bytes) -> None:
        """Start sending now, in the caller's turn of the loop, instead of waking the
        writer task: a send usually completes without suspending (aiohttp writes to the
        socket and only awaits when its buffer is full), and the hop to another task costs
        more than the send. If it does suspend, a task finishes it and the writer waits.
        See ``YIELD_TO_LOCAL_PEERS`` for what follows a completed send."""
        link = self.link
        if link.send_now(data):  # the usual case: no coroutine at all
            self.bytes_sent += len(data)
            self.frames_sent += 1
            if self._yield_after_send:
                os.sched_yield()
            return
        coro = link.send(data)
        try:
            suspended_on = coro.send(None)
        except StopIteration:
            self.bytes_sent += len(data)
            self.frames_sent += 1
            if self._yield_after_send:
                os.sched_yield()
            return
        except ClosedError:
            return  # the reader sees the close and ends the link
        except ProtocolError as exc:  # a frame the link cannot carry: the link's problem
            self._cannot_send(exc)
            return
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._finish(coro, suspended_on, len(data)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, coro: Any, suspended_on: Any, size: int) -> None:
        try:
            await Resume(coro, suspended_on)
            self.bytes_sent += size
            self.frames_sent += 1
        except ClosedError:
            pass
        finally:
            self._busy = False
            self._wake.set()

    async def writer(self) -> None:
        queue = self._queue
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while queue and not self._busy:
                head = queue.popleft()
                if isinstance(head, tuple):
                    if not await self._send_request(*head):
                        return
                    continue
                # Before the peer's hello its frame limit is unknown: no node accepts less
                # than 4 KiB.
                limit = self._limit if self._hello_seen else _SMALL_FRAME
                batch = [head]
                size = len(head)
                while queue:
                    item = queue[0]
                    if not isinstance(item, bytes) or size + len(item) > limit:
                        break
                    queue.popleft()
                    batch.append(item)
                    size += len(item)
                self._queued_bytes -= size
                message = batch[0] if len(batch) == 1 else b"".join(batch)
                self._busy = True
                try:
                    await self.link.send(message)
                except ClosedError:
                    return
                finally:
                    self._busy = False
                self.bytes_sent += len(message)
                self.frames_sent += len(batch)
            if self._overflowed and not queue and not self._busy:
                # Live updates were dropped for this peer: ask for its state vectors and
                # answer each with exactly what it misses.
                self._overflowed = False
                self.request_resync()

    async def _send_request(self, kind: int, ns: str) -> bool:
        """Make and send the frame(s) of a queued request; False if the link is done."""
        self._pending.discard((kind, ns))
        api = self.api
        sv = self._pending_sv.pop(ns, None) if kind == F_DIFF else None
        if not api._may_share(ns):
            return True  # never name a namespace this node does not share
        doc = api._docs.get(ns)
        frames: list[bytes] = []
        if kind == F_SV:
            frames.append(_pack([F_SV, ns, _EMPTY_SV if doc is None else doc.state_vector()]))
        elif kind == F_RESYNC:
            frames.append(_pack([F_RESYNC, ns]))
        else:
            if sv is None or doc is None or ns not in self.shared:
                return True
            try:
                diff = doc.diff(encode_state_vector(sv))
            except Exception as exc:  # checked on arrival; pycrdt may still disagree
                log.warning("closing link to %s: invalid state vector for %r", self.node_id, ns)
                await self.link.close(4000, f"invalid state vector: {exc}"[:120])
                return False
            chunk = max(1024, self._limit - 1024)
            if len(diff) <= chunk:
                frames.append(_pack([F_DIFF, ns, diff, False]))
            else:
                # One chunk packed at a time: the diff is held once, never the frames.
                for start in range(0, len(diff), chunk):
                    end = start + chunk
                    if not await self._send_now(
                        _pack([F_DIFF, ns, diff[start:end], end < len(diff)])
                    ):
                        return False
                return True
        for frame in frames:
            if not await self._send_now(frame):
                return False
        return True

    async def _send_now(self, data: bytes) -> bool:
        self._busy = True
        try:
            await self.link.send(data)
        except ClosedError:
            return False
        finally:
            self._busy = False
        self.bytes_sent += len(data)
        self.frames_sent += 1
        return True

    async def barrier(self) -> bool:
        """A round trip in order with everything else on this link. True once the peer has
        handled every frame this node sent before it (applied and committed, as durable
        as the peer's own writes) and this node has handled every frame the peer sent
        before its answer, the answers to this node's earlier step 1s included; False if
        the link ended first."""
        if self._closed:
            return False
        if self._overflowed:
            # Live updates were dropped for this peer (a full queue, one too large): the
            # resync that sends them would start only once the queue drains, after this
            # barrier. Asked first, the peer's state vectors come back before its answer,
            # and this node's step 2s go out before the next barrier.
            self._overflowed = False
            self.request_resync()
        self._barrier_seq += 1
        token = self._barrier_seq
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._barriers[token] = fut
        try:
            self.send([F_BARRIER, token])
            return await fut
        finally:
            self._barriers.pop(token, None)

    def _answered(self, tokens: list[int]) -> None:
        for token in tokens:
            fut = self._barriers.get(token)
            if fut is not None and not fut.done():
                fut.set_result(True)

    def _send_acks(self, tokens: list[int]) -> None:
        if self.api._state.value != "open":
            return  # closing: what came before may have been dropped (_apply_remote)
        for token in tokens:
            self.send([F_BARRIER_ACK, token])

    async def _ack_after(self, pending: Awaitable[None], tokens: list[int]) -> None:
        await pending
        self._send_acks(tokens)

    def request_resync(self, ns: str | None = None) -> None:
        """Ask the peer for its state vector of ``ns`` (None: every shared namespace);
        each answer gets exactly what it misses."""
        for name in sorted(self.shared) if ns is None else (ns,) if ns in self.shared else ():
            self._request(F_RESYNC, name)

    def _send_sv(self, ns: str) -> None:
        """Send step 1 for ``ns`` (an empty state vector if this node does not hold it)."""
        self._sent_sv.add(ns)
        self._request(F_SV, ns)

    def send_hello(self) -> None:
        """Send the hello. It must fit the peer's frame limit, unknown until its own hello
        arrives (no node accepts less than 4 KiB): if this node's lists make it larger
        than ``_SMALL_FRAME``, the hello carries none of them and they follow as frames
        6, 5 and 4, which say the same."""
        api = self.api
        names = sorted(api._shareable_namespaces())
        sessions = api._sessions_wire()
        linked = sorted(api._links.keys())
        hello: list[Any] = [
            F_HELLO,
            names,
            None if api._sync_filter is None else sorted(api._sync_filter),
            sessions,
            linked,
        ]
        if api._max_frame != DEFAULT_MAX_FRAME or api._transient:
            hello.append(api._max_frame)  # absent: the default
        if api._transient:
            hello.append(True)  # absent: false
        if len(_pack(hello)) <= _SMALL_FRAME:
            self.send(hello)
            return
        hello[1] = hello[3] = hello[4] = []
        self.send(hello)
        for ns in names:
            self.send([F_NAMESPACE, ns])
        self.send([F_PEERS, linked])
        self._sessions_owed = True

    def send_sessions(self, sessions: list[dict[str, Any]]) -> None:
        """Send this node's session list: one frame 4 if it is small, else parts that fit
        the link's frame limit. Until the peer's hello has said that limit, only a small
        list goes (a larger one follows the hello). An entry too large for any frame is
        sent with the subscriptions that fit (sessions are advisory; the link must not
        fail over them)."""
        if len(_pack(sessions)) <= _SMALL_FRAME:
            self.send([F_SESSIONS, sessions])
            return
        if not self._hello_seen:
            self._sessions_owed = True
            return
        bound = self._limit - 1024  # room for the frame around the part (limit >= 4 KiB)
        parts: list[list[dict[str, Any]]] = [[]]
        size = 0
        for entry in sessions:
            n = len(_pack(entry))
            if n > bound:
                entry, n = self._fit(entry, bound)
            if parts[-1] and size + n > bound:
                parts.append([])
                size = 0
            parts[-1].append(entry)
            size += n
        for part in parts[:-1]:
            self.send([F_SESSIONS, part, True])
        self.send([F_SESSIONS, parts[-1]])

    def send_record(self, frame: list[Any]) -> None:
        """Send a node's record (frame 10). One too large for the link goes without its
        sessions (they are advisory; the link and reachability must not fail over them).
        None goes before the peer's hello (it gets them all then: ``_send_records_to``):
        cut to fit 3 KiB, a record would be kept cut under its number."""
        if not self._hello_seen:
            return
        limit = self._limit - 64
        if len(_pack(frame)) > limit:
            frame = [*frame[:4], []]
            if len(_pack(frame)) > limit:
                return  # its links alone pass the limit: this peer cannot learn of it
        self.send(frame)

    def _fit(self, entry: dict[str, Any], bound: int) -> tuple[dict[str, Any], int]:
        """A session entry cut to the subscriptions that fit in ``bound`` bytes."""
        subs = entry["subscriptions"]
        keep: list[str] = []
        size = len(_pack({**entry, "subscriptions": []})) + 4
        for name in subs:
            n = len(_pack(name))
            if size + n > bound:
                break
            keep.append(name)
            size += n
        self._warn_once(
            "wide-session",
            f"lists only {len(keep)} of the {len(subs)} subscriptions of session "
            f"{entry['id']!r}: the link's frames are too small for them all",
        )
        return {**entry, "subscriptions": keep}, size

    def accepts(self, ns: str) -> bool:
        """Whether live updates of ``ns`` go to this peer."""
        return ns in self.shared

    def push_update(self, ns: str, origin: str, update: bytes) -> None:
        if ns in self.shared:
            self.enqueue(_pack([F_UPDATE, ns, origin, update]))

    def announce_namespace(self, ns: str) -> None:
        if self._peer_wants(ns):
            self.shared.add(ns)
            self.offered.discard(ns)
            self.send([F_NAMESPACE, ns])
            self._send_sv(ns)

    def _peer_wants(self, ns: str) -> bool:
        return self.peer_filter is None or ns in self.peer_filter

    def _exchanges(self, ns: str) -> bool:
        """Whether both sides sync ``ns``."""
        return self.api._may_share(ns) and self._peer_wants(ns)

    # -- incoming ----------------------------------------------------------------------

    def on_message(self, message: bytes) -> Awaitable[None] | None:
        """Handle one received message (the link's consumer: called in the turn that
        received it). Returns the durable commit still under way, if it had to wait."""
        if self._closed:
            return None  # closing (a failed commit, say): nothing more is applied
        hold = self._hold
        if hold is not None:
            if not hold.done():
                return self._after_hold(hold, message)
            self._hold = None
        try:
            # The common case: one frame per message, decoded without a streaming unpacker.
            frames = [msgpack.unpackb(message, raw=False, use_list=True, strict_map_key=True)]
        except msgpack.ExtraData:
            frames = self._unpack_all(message)  # several frames back to back
        except Exception as exc:
            raise ProtocolError(f"malformed msgpack: {exc}") from exc
        try:
            if len(frames) == 1:
                self._handle(frames[0])
            else:
                for frame in _merge_runs(frames):
                    if type(frame) is _UpdateRun:
                        self._on_update_run(frame)
                    else:
                        self._handle(frame)
        except Exception as exc:
            self._release(self._large)  # the link ends: the peer still holds them
            self._large = []
            self._acks_owed = []
            self._late_acks = []
            if not self._to_persist:
                raise
            # What was applied before the bad frame is still persisted, then the error
            # ends the link.
            pending = self._persist_applied()
            if pending is None:
                raise
            return _raise_after(pending, exc)
        result: Awaitable[None] | None
        if self._large:
            large, self._large = self._large, []
            late, self._late_acks = self._late_acks, []
            pending = self._persist_applied() if self._to_persist else None
            result = self._apply_large(pending, large, late)
        elif self._to_persist and not self._acks_owed:
            # The common case: stored at the end of this turn, after the subscribers
            # its events woke (ConversationsApi._persist_soon).
            batch, self._to_persist = self._to_persist, []
            self.api._persist_soon(batch, self)
            result = None
        else:
            result = self._persist_applied() if self._to_persist else None
        if self._acks_owed:
            # A barrier is answered after the commit of everything the message applied
            # before it: the answer promises the peer its frames are stored here. That
            # includes earlier messages' commits still deferred to the end of the turn,
            # or still waiting (an fsync): a failed one closes the link, unanswered.
            acks, self._acks_owed = self._acks_owed, []
            if self in self.api._later_from:
                self.api._flush_later()
            hold = self._hold
            if result is None and hold is not None and not hold.done():
                result = _settled(hold)
            if result is None:
                self._send_acks(acks)
            else:
                result = self._ack_after(result, acks)
        return result

    async def _apply_large(
        self, pending: Awaitable[None] | None, large: list[_Queued], late: list[int]
    ) -> None:
        """Apply large updates in pieces (see ``_SLICE_BYTES``), after the commit of
        what the message applied before them. The link hands over no further message
        meanwhile, so the order of this peer's updates is kept."""
        try:
            if pending is not None:
                await pending
            while large:
                ns, origin, update, _ = large[0]
                if len(update) <= _SLICE_BYTES:  # queued behind a large one to keep order
                    self._apply_if_accepted(ns, origin, update)
                else:
                    await self._apply_in_pieces(ns, origin, update)
                if self._to_persist:
                    await self._persisted()
                self._release(large[:1])
                del large[0]
            self._answered(late)
        finally:
            self._release(large)  # failed or cancelled: what is left is dropped

    def _release(self, large: list[_Queued]) -> None:
        """A step 2 stays counted against ``_MAX_DIFF`` until it is applied or dropped:
        while its pieces are applied, other links must not reassemble another bound's
        worth."""
        for q in large:
            if q.counted:
                self._diff_total -= len(q.update)

    async def _apply_in_pieces(self, ns: str, origin: str, update: bytes) -> None:
        scan = UpdateScan(update, piece_structs=_PIECE_STRUCTS, piece_bytes=_SLICE_BYTES)
        try:
            while not scan.step(_SCAN_STEP):
                await asyncio.sleep(0)  # a slice per turn: let the loop run
            # pycrdt decodes a piece before applying it, and may refuse what the scan let
            # through (a string that is not UTF-8, an unknown type): check every piece
            # first, so that a refused update is refused whole, as before.
            for i, piece in enumerate(scan.pieces(), 1):
                get_state(piece)
                if i % _CHECK_STEP == 0:
                    await asyncio.sleep(0)
        except ValueError as exc:  # the scan's UpdateDecodeError, or pycrdt's refusal
            raise ProtocolError(f"invalid Yjs update for {ns!r}: {exc}") from exc
        if not self._accepts_content(ns, update, scan.blocks):
            return
        for piece in scan.pieces():
            await asyncio.sleep(0)
            self._apply(ns, origin, piece)
            if self._to_persist:
                await self._persisted()

    async def _persisted(self) -> None:
        pending = self._persist_applied()
        if pending is not None:
            await pending

    @staticmethod
    def _unpack_all(message: bytes) -> list[Any]:
        unpacker = msgpack.Unpacker(
            raw=False, use_list=True, max_buffer_size=max(len(message), 1), strict_map_key=True
        )
        unpacker.feed(message)
        try:
            return list(unpacker)
        except Exception as exc:
            raise ProtocolError(f"malformed msgpack: {exc}") from exc

    def _persist_applied(self) -> Awaitable[None] | None:
        """One durable commit per received message, however many updates it held.

        Started at once, so that the commit joins the storage log in the order the
        updates were applied (before any other write can slip in); only a commit that
        must wait (an fsync) is finished by the link, which hands over no further
        message meanwhile."""
        batch, self._to_persist = self._to_persist, []
        return start_now(self.api._persist(batch))

    def _handle(self, frame: Any) -> None:
        if not isinstance(frame, list) or not frame or not isinstance(frame[0], int):
            raise ProtocolError("frame is not a typed array")
        kind = frame[0]
        if kind == F_UPDATE and self._hello_seen:  # the hot path: a live update
            if len(frame) != 4 or not isinstance(frame[2], str) or type(frame[3]) is not bytes:
                raise ProtocolError("bad update frame")
            ns = frame[1]
            if type(ns) is not str or ns not in self.shared:
                ns = self._check_ns(ns)
            self._on_update(ns, frame[2], frame[3])
            return
        if kind != F_HELLO and not self._hello_seen:
            raise ProtocolError("frame before hello")
        if kind == F_HELLO:
            self._on_hello(frame)
        elif kind == F_SV:
            ns, sv = self._ns_bytes(frame, 3)
            self._on_sv(ns, sv)
        elif kind == F_DIFF:
            ns, part = self._ns_bytes(frame, 4)
            more = frame[3]
            if not isinstance(more, bool):
                raise ProtocolError("bad step-2 frame")
            self._on_diff(ns, part, more)
        elif kind == F_SESSIONS:
            if len(frame) not in (2, 3) or not isinstance(frame[1], list):
                raise ProtocolError("bad sessions frame")
            more = frame[2] if len(frame) == 3 else False
            if not isinstance(more, bool):
                raise ProtocolError("bad sessions frame")
            self._on_sessions(frame[1], more)
        elif kind == F_PEERS:
            if len(frame) != 2 or not isinstance(frame[1], list):
                raise ProtocolError("bad peers frame")
            self._on_peers(frozenset(x for x in frame[1] if isinstance(x, str)))
        elif kind == F_NAMESPACE:
            if len(frame) != 2:
                raise ProtocolError("bad namespace frame")
            ns = self._check_ns(frame[1])
            self._offer(ns)
        elif kind == F_RESYNC:
            if len(frame) != 2:
                raise ProtocolError("bad resync frame")
            ns = self._check_ns(frame[1])
            self._on_resync(ns)
        elif kind in (F_BARRIER, F_BARRIER_ACK):
            if len(frame) != 2 or type(frame[1]) is not int:
                raise ProtocolError("bad barrier frame")
            if kind == F_BARRIER:
                if len(self._acks_owed) >= _MAX_ACKS_OWED:
                    raise ProtocolError("too many barriers in one message")
                # Closing, this node drops what peers send (_apply_remote): an answer
                # would tell the peer its writes are stored here.
                if self.api._state.value == "open":
                    self._acks_owed.append(frame[1])
            elif self._large:
                self._late_acks.append(frame[1])  # behind a large update still to apply
            else:
                self._answered([frame[1]])
        elif kind == F_RECORD:
            self.api._on_record(self, *check_record(frame))
        else:
            raise ProtocolError(f"unknown frame type {kind}")

    @staticmethod
    def _check_ns(ns: Any) -> str:
        try:
            return check_namespace(ns)
        except InvalidNamespace as exc:
            raise ProtocolError(str(exc)) from exc

    def _ns_bytes(self, frame: list[Any], n: int) -> tuple[str, bytes]:
        if len(frame) != n or not isinstance(frame[2], bytes):
            raise ProtocolError("bad frame layout")
        return self._check_ns(frame[1]), frame[2]

    def _on_hello(self, frame: list[Any]) -> None:
        if self._hello_seen:
            raise ProtocolError("second hello")
        if len(frame) < 5:  # later elements are optional (max_frame) or from newer versions
            raise ProtocolError("bad hello frame")
        names, filt, sessions, peers = frame[1:5]
        if not isinstance(names, list) or not isinstance(sessions, list):
            raise ProtocolError("bad hello frame")
        if filt is not None and not isinstance(filt, list):
            raise ProtocolError("bad hello filter")
        if not isinstance(peers, list):
            raise ProtocolError("bad hello peers")
        peer_max = frame[5] if len(frame) > 5 else None
        if peer_max is not None:
            if type(peer_max) is not int or peer_max < 1:
                raise ProtocolError("bad hello max_frame")
            self.peer_max_frame = peer_max
        transient = frame[6] if len(frame) > 6 else False
        if not isinstance(transient, bool):
            raise ProtocolError("bad hello transient flag")
        self.peer_transient = transient
        self._hello_seen = True
        # Never above ours (the transport refuses to send more); a peer claiming less than
        # a chunk plus its frame header gets what it asked for anyway.
        self._limit = min(self.api._max_frame, max(self.peer_max_frame, 2048))
        self.peer_filter = None if filt is None else frozenset(self._check_ns(x) for x in filt)
        self.peer_peers = frozenset(x for x in peers if isinstance(x, str))
        offered = [self._check_ns(x) for x in names]
        self._on_sessions(sessions, False)
        self.api._remap()
        self.api._send_records_to(self)
        api = self.api
        for ns in sorted(api._shareable_namespaces()):
            if ns not in api._docs and self._exchanges(ns):
                # Named in this node's own sync_namespaces: local configuration, not the
                # peer's say, is the reason to hold it.
                try:
                    api._ensure_doc(ns)
                except InvalidArgument as exc:
                    log.warning("not syncing %r with %s: %s", ns, self.node_id, exc)
                    continue
            self._offer(ns)
        for ns in offered:
            if ns not in self.shared:
                self._offer(ns)
        if self._sessions_owed:
            self._sessions_owed = False
            self.send_sessions(api._sessions_wire())

    def _offer(self, ns: str) -> None:
        """The peer holds ``ns`` (or this node does): sync it if both sides sync it and
        this node holds it; otherwise only remember it (the peer's word alone never
        creates a document here)."""
        if not self._exchanges(ns):
            return
        if ns not in self.api._docs:
            self._remember(ns)
            return
        self.shared.add(ns)
        self.offered.discard(ns)
        if ns not in self._sent_sv:
            self._send_sv(ns)

    def _remember(self, ns: str) -> bool:
        """Note that the peer holds ``ns``, which this node does not; False if this link
        already made it remember ``_MAX_OFFERED`` names."""
        if ns in self.offered:
            return True
        if len(self.offered) >= _MAX_OFFERED:
            self._warn_once("offered", "remembers no more of its namespaces")
            return False
        self.offered.add(ns)
        return True

    def _adopt(
        self, ns: str, update: bytes, blocks: list[tuple[int, int, int]] | None = None
    ) -> bool:
        """Create ``ns`` here because the peer sent content for it; False (the content is
        dropped) if there is none, or past this link's or the node's bound."""
        from subcog_crdt import _api  # here: _api imports this module

        api = self.api
        budget = _api.MAX_NAMESPACES - _api.MAX_NAMESPACES // _LOCAL_RESERVE
        if self.adopted >= _MAX_ADOPTED or len(api._docs) >= budget:
            self._warn_once("adopt", "creates no more namespaces for it (limit reached)")
            return False
        if blocks is None:
            blocks = content_blocks(ns, update)
        if not blocks:
            return False  # nothing to hold
        try:
            api._ensure_doc(ns)
        except InvalidArgument as exc:
            log.warning("not syncing %r with %s: %s", ns, self.node_id, exc)
            return False
        self.adopted += 1
        return True

    def _on_sessions(self, part: list[Any], more: bool) -> None:
        """A session list, or a part of one (``more``: further parts follow). Each part
        is checked as it arrives, and only what it says is kept; the list replaces what
        this peer listed before once its last part is in."""
        if self._session_parts is None:
            self._session_parts = []
            self._session_ids = set()
            self._session_names = 0
        parts = self._session_parts
        if len(parts) + len(part) > MAX_SESSIONS:
            raise ProtocolError(f"peer lists more than {MAX_SESSIONS} sessions")
        infos = sessions_from_wire(self.node_id, part, self._session_ids)
        parts.extend(infos)
        self._session_names += sum(len(i.subscriptions) for i in infos)
        if self._session_names > MAX_SUBSCRIPTIONS:
            raise ProtocolError(f"peer lists more than {MAX_SUBSCRIPTIONS} subscriptions")
        if more:
            return
        self._session_parts = None
        # A replaced link's late frames must not bring back a list its successor's
        # hello replaced.
        if self.api._links.get(self.node_id) is self:
            self.api.sessions._set_remote(self.node_id, tuple(parts))

    def _warn_once(self, key: str, what: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("link to %s: this node %s", self.node_id, what)

    def _on_peers(self, peers: frozenset[str]) -> None:
        lost = self.peer_peers - peers - {self.api.node_id}
        self.peer_peers = peers
        self.api._remap()
        if lost:
            # While it listed them, live updates from them were not forwarded to it (it
            # was to get them directly). The link may have broken before they arrived:
            # resync, so it gets exactly what it misses.
            self.request_resync()

    def _on_resync(self, ns: str) -> None:
        if ns not in self.shared:
            if not self._exchanges(ns):
                return
            if ns in self.api._docs:
                self._offer(ns)
            elif not self._remember(ns):
                return
        self._send_sv(ns)  # from a node that does not hold ns: "send me everything"

    def _on_sv(self, ns: str, sv: bytes) -> None:
        if not self.api._may_share(ns):
            return  # never reveal a namespace we do not share (private, filtered)
        try:
            clocks = decode_state_vector(sv)
        except UpdateDecodeError as exc:
            raise ProtocolError(f"invalid state vector for {ns!r}: {exc}") from exc
        if ns not in self.shared:
            if not self._peer_wants(ns):
                return
            if ns not in self.api._docs:
                # The peer holds ns, this node does not: if the peer has content, ask for
                # all of it (once); the document is created when the content arrives.
                if self._remember(ns) and any(clocks.values()) and ns not in self._sent_sv:
                    self._send_sv(ns)
                return
            self._offer(ns)
        # Answered when the writer gets to it, from the document as it is then; a newer
        # state vector of the same peer replaces an older one not yet answered.
        self._pending_sv[ns] = clocks
        self._request(F_DIFF, ns)

    def _on_diff(self, ns: str, part: bytes, more: bool) -> None:
        if ns not in self.shared:
            if not self._exchanges(ns):
                return
            if ns not in self.api._docs and not self._remember(ns):
                return
        total = self._diff_total + sum(
            p._diff_total for p in self.api._links.values() if p is not self
        )
        if total + len(part) > _MAX_DIFF:
            raise ProtocolError(f"step-2 being reassembled exceeds {_MAX_DIFF} bytes")
        parts = self._diff_parts.setdefault(ns, [])
        parts.append(part)
        self._diff_size[ns] = self._diff_size.get(ns, 0) + len(part)
        self._diff_total += len(part)
        if more:
            return
        update = b"".join(parts)
        del self._diff_size[ns], self._diff_parts[ns]
        if not self._queue_if_large(ns, self.node_id, update, counted=True):
            self._diff_total -= len(update)
            self._apply_if_accepted(ns, self.node_id, update)

    def _on_update_run(self, run: _UpdateRun) -> None:
        """Apply consecutive live updates of one namespace and origin as one merged
        update: the document's work per update (a transaction, decoding, the state vector)
        is then paid once per message, which about halves a burst's cost here. If they do
        not merge or the merged update is refused, each is applied on its own, as if never
        merged, so the valid ones before a bad one still count."""
        # (Not a run whose merge would be a large update: one refused in pieces would
        # lose this per-update fallback.)
        small = sum(map(len, run.updates)) <= _SLICE_BYTES
        if self._hello_seen and run.ns in self.shared and small:
            try:
                merged = merge_updates(*run.updates)
            except Exception:
                merged = None
            if merged is not None:
                try:
                    self._on_update(run.ns, run.origin, merged)
                    return
                except ProtocolError:
                    pass
        for update in run.updates:
            self._handle([F_UPDATE, run.ns, run.origin, update])

    def _on_update(self, ns: str, origin: str, update: bytes) -> None:
        # _queue_if_large and _apply_if_accepted, inline: this runs for every live update.
        if self._large or len(update) > _SLICE_BYTES:
            self._large.append(_Queued(ns, origin, update, False))
        elif ns in self.shared or self._accepts_content(ns, update):
            self._apply(ns, origin, update)

    def _queue_if_large(self, ns: str, origin: str, update: bytes, *, counted: bool) -> bool:
        """Queue a large update (applied in pieces once the message is handled), or any
        update behind one, to keep their order; False if it is to be applied now. A
        ``counted`` step 2 stays in ``_diff_total`` until ``_release``."""
        if not self._large and len(update) <= _SLICE_BYTES:
            return False
        self._large.append(_Queued(ns, origin, update, counted))
        return True

    def _apply_if_accepted(self, ns: str, origin: str, update: bytes) -> None:
        if self._accepts_content(ns, update):
            self._apply(ns, origin, update)

    def _accepts_content(
        self, ns: str, update: bytes, blocks: list[tuple[int, int, int]] | None = None
    ) -> bool:
        """Whether the peer's content for ``ns`` is applied here: not if private or
        filtered here; a namespace this node does not hold yet is created for it (within
        the bounds of ``_adopt``; ``blocks``: the update's, if already scanned)."""
        if ns in self.shared:
            return True
        if not self._exchanges(ns):
            return False  # private or filtered here: drop without applying
        if ns not in self.api._docs and not self._adopt(ns, update, blocks):
            return False
        self._offer(ns)
        return True

    def _apply(self, ns: str, origin: str, update: bytes) -> None:
        try:
            done = self.api._apply_remote(ns, origin, update, self)
        except ProtocolError:
            raise
        except SubcogError as exc:
            raise ProtocolError(str(exc)) from exc
        if done is not None:
            self._to_persist.append(done)
        if ns in self._pending_sv and len(update) <= _SLICE_BYTES:
            self._advance_pending_sv(ns, update)

    def _advance_pending_sv(self, ns: str, update: bytes) -> None:
        """The peer holds what it sent: a step 2 still queued for it (made from the
        document when it is sent) leaves that out instead of sending it back. Only what
        continues the state vector counts (the rest may depend on what it lacks)."""
        try:
            blocks = read_update(update, "").blocks
        except UpdateDecodeError:
            return
        clocks = self._pending_sv[ns]
        for client, start, end in blocks:
            if start <= clocks.get(client, 0) < end:
                clocks[client] = end

    def hold_until(self, commit: asyncio.Task[None]) -> None:
        """Hand over no further message until ``commit``, which stores updates this
        link applied, is done (a storage that must wait: an fsync, a backlog). Its
        failure closes the link."""
        self._hold = commit
        commit.add_done_callback(self._commit_done)

    def _commit_done(self, commit: asyncio.Task[None]) -> None:
        if not commit.cancelled() and (exc := commit.exception()) is not None:
            self.persist_failed(exc)

    async def _after_hold(self, hold: asyncio.Task[None], message: bytes) -> None:
        await _settled(hold)  # a failure closes the link (_commit_done)
        if self._hold is hold:
            self._hold = None
        if hold.cancelled() or hold.exception() is not None:
            return  # the node is closing, or its storage failed: the peer keeps it
        pending = self.on_message(message)
        if pending is not None:
            await pending

    def persist_failed(self, exc: BaseException) -> None:
        """What this link's messages applied could not be stored: close the link, as
        when a commit failed in the turn that applied it (the peer still holds it)."""
        self._close_for(1011, "cannot store its updates", exc)

    def _cannot_send(self, exc: BaseException) -> None:
        """A frame could not be sent (a control frame over the frame limit: those are not
        split): close the link with a logged reason rather than fail the caller whose
        write queued it, or leave a link up that no longer sends."""
        self._close_for(4009 if isinstance(exc, FrameTooLarge) else 1011, "cannot send", exc)

    def _close_for(self, code: int, what: str, exc: BaseException) -> None:
        if self._closed:
            return
        log.warning("closing link to %s: %s: %s", self.node_id, what, exc)
        self._closed = True
        self._wake.set()
        task = asyncio.get_running_loop().create_task(self.link.close(code, str(exc)[:120]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._cannot_send(task.exception() or RuntimeError())

    async def run(self) -> None:
        """Drive the link until it closes (``send_hello`` must have been called)."""
        writer = asyncio.get_running_loop().create_task(self.writer())
        writer.add_done_callback(self._writer_done)
        try:
            try:
                await self.link.consume(self.on_message)
            except ProtocolError as exc:
                log.warning("closing link to %s: %s", self.node_id, exc)
                await self.link.close(4000, str(exc)[:120])
        finally:
            self._closed = True
            self._wake.set()
            for fut in self._barriers.values():
                if not fut.done():
                    fut.set_result(False)
            for t in [*self._tasks, writer]:
                if not t.done():  # (a writer that failed was reported by _writer_done)
                    await cancel_and_wait(t)
            if self._hello_seen:
                # Runs after the node has dropped this link and told its peers (the
                # caller does both as soon as this returns).
                asyncio.get_running_loop().call_soon(self._after_loss)

    def _after_loss(self) -> None:
        """This link is gone: live updates of the namespaces it carried that other peers
        did not forward to this node (it was linked to their origin) may have been lost
        on it. Send step 1 for those to every remaining peer, which answers with exactly
        what this node misses."""
        api = self.api
        if api._state.value != "open" or self.node_id in api._links:
            return  # closing, or replaced by a newer link to the same peer
        for peer in list(api._links.values()):
            for ns in sorted(self.shared & peer.shared):
                peer._send_sv(ns)
