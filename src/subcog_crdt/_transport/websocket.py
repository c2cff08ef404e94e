"""The real transport: authenticated aiohttp WebSockets between nodes.

One ``WebSocketTransport`` per node runs an aiohttp server (the node may add its own
routes through ``setup_app``) and dials peers with one shared ``ClientSession``. Each
connection is authenticated by a four-message handshake before any application frame
crosses, then becomes a ``WebSocketLink`` handed to the node's ``on_link`` callback.

Handshake (msgpack maps, each with a type tag ``t`` and the protocol version ``v``)::

    client -> server  {t: "hello",     node_id, nonce}
    server -> client  {t: "challenge", node_id, nonce, proof}   proof = HMAC(server role)
    client -> server  {t: "auth",      proof, hello}            after verifying the server
    server -> client  {t: "welcome",   hello}                   after verifying the client

The proofs bind both fresh nonces and both node ids (see ``auth``), so a recorded
handshake cannot be replayed. The ``Hello`` (which names namespaces, user and
URL) is only sent to a side that has already proven the secret.

With a secret, the handshake also derives two link keys (one per direction) from the secret,
both nonces, both node ids and a hash of the four handshake messages as sent, and every
later message on the link is ``frame || tag``: the first 16 bytes of HMAC-SHA256(key,
sequence number as 8 bytes || frame), the sequence number counting the messages of that
direction from 0. A message whose tag is not the one expected closes the link with 4012
and is never handed over, so a relay that forwarded the handshake can neither inject,
replay, reorder nor drop messages. It can still read them: confidentiality needs TLS
(``ssl=``). Without a secret (loopback only) messages carry no tag.

Before the peer is authenticated, what it can make this node buffer is bounded: each
handshake message may be at most ``HANDSHAKE_MAX_FRAME`` bytes and only the expected
handshake messages may arrive (``_HandshakeGuard``, which checks frame headers before
aiohttp buffers a byte of their payload), and at most ``max_handshakes`` connections may
be in the handshake at once; the next one is refused with HTTP 503.

Close codes (also in ``CLOSE_CODES``)::

    1000  normal              the link's handler returned, or ``close()`` was called
    1001  going away          the node shuts down
    1006  abnormal            the peer stopped answering pings (dead) or the TCP link broke
    1011  handler error       the node's link handler raised
    4000  protocol            garbage, a text frame, or a malformed handshake message
    4001  version             the peer speaks another protocol version
    4003  auth                the peer could not prove the mesh secret
    4008  handshake timeout   the handshake did not complete in time
    4009  too large           a frame over ``max_frame``
    4010  duplicate           a link between these two nodes already exists (or wins a race)
    4011  self                a node dialled itself
    4012  message auth        a message's authentication tag is wrong (tampered, injected,
                              replayed, reordered or dropped message on a keyed link)

One link per pair of nodes. A node refuses a new connection to a node it already has a link
with. When both dial at once, the connection dialled by the node with the lower node id
wins: the server side refuses an incoming connection while it has its own outgoing dial to
the same peer under way *and* its own id is lower; a client aborts after the challenge when
a link to that node appeared meanwhile. Both rules are decided on one event loop without an
``await`` between check and registration, so exactly one connection survives and the
surviving link is never touched.

Liveness uses aiohttp's heartbeat: a ping after ``heartbeat`` seconds without traffic, and
the link is declared dead if no pong arrives within half that interval. The interval is
lowered if needed so that a frozen peer is detected within ``dead_after`` seconds.
Received data only notes the time; the timers look at it when they fire
(``_LazyHeartbeat``), instead of aiohttp's callback in every turn that receives data.

Received frames are read eagerly by one pump task per link. With a consumer
(``WebSocketLink.consume``, the node's hot path) each frame is handed over in the turn of
the event loop that received its bytes, as aiohttp's parser queues it (``_take``; the
pump, woken a turn later, skips it): no wake-up of another task before the consumer. Frames
that arrive while the consumer is still finishing an awaitable (a durable commit that must
wait for an fsync), or before it is attached, go to a byte-bounded inbox, as they do for
links that are iterated; pings are answered meanwhile. When the inbox is full the pump
stops reading and TCP flow control slows the sender. A consumer that stalls longer than
``dead_after`` with a full inbox therefore looks dead to its peer: by design, a node that
cannot keep up for seconds is better resynchronised than buffered without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import random
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import aiohttp
import msgpack
from aiohttp import WSMsgType, web
from aiohttp._websocket.helpers import websocket_mask  # the reader's own (C) unmasking
from aiohttp.client_middlewares import ClientHandlerType
from yarl import URL

from .._errors import (
    AuthError,
    ClosedError,
    FrameTooLarge,
    InvalidArgument,
    PeerUnreachable,
    ProtocolError,
    SubcogError,
)
from .._lifecycle import cancel_and_wait
from . import auth
from .base import DEFAULT_MAX_FRAME, PROTOCOL_VERSION, FrameConsumer, Hello, LinkHandler

__all__ = [
    "CLOSE_ABNORMAL",
    "CLOSE_AUTH",
    "CLOSE_CODES",
    "CLOSE_DUPLICATE",
    "CLOSE_GOING_AWAY",
    "CLOSE_HANDLER_ERROR",
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_MAC",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL",
    "CLOSE_SELF",
    "CLOSE_TOO_LARGE",
    "CLOSE_VERSION",
    "PATH",
    "PeerUnreachable",
    "WebSocketLink",
    "WebSocketTransport",
]

log = logging.getLogger(__name__)

PATH: Final = "/subcog/v1"
"""The WebSocket endpoint of the node-to-node protocol on the node's HTTP server."""

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_ABNORMAL: Final = 1006
CLOSE_HANDLER_ERROR: Final = 1011
CLOSE_PROTOCOL: Final = 4000
CLOSE_VERSION: Final = 4001
CLOSE_AUTH: Final = 4003
CLOSE_HANDSHAKE_TIMEOUT: Final = 4008
CLOSE_TOO_LARGE: Final = 4009
CLOSE_DUPLICATE: Final = 4010
CLOSE_SELF: Final = 4011
CLOSE_MAC: Final = 4012

CLOSE_CODES: Final[dict[int, str]] = {
    CLOSE_NORMAL: "normal",
    CLOSE_GOING_AWAY: "going away",
    CLOSE_ABNORMAL: "abnormal (peer dead or connection lost)",
    CLOSE_HANDLER_ERROR: "link handler error",
    CLOSE_PROTOCOL: "protocol error",
    CLOSE_VERSION: "unsupported protocol version",
    CLOSE_AUTH: "authentication failed",
    CLOSE_HANDSHAKE_TIMEOUT: "handshake timeout",
    CLOSE_TOO_LARGE: "frame too large",
    CLOSE_DUPLICATE: "duplicate link",
    CLOSE_SELF: "connection to self",
    CLOSE_MAC: "message authentication failed",
}

HANDSHAKE_TIMEOUT: Final = 5.0
HANDSHAKE_MAX_FRAME: Final = 64 * 1024
"""Handshake messages are tiny; anything bigger is hostile (refused from its frame header)."""
HANDSHAKE_MESSAGES: Final = 2
"""Messages each side receives in the handshake (hello + auth, or challenge + welcome)."""
MAX_HANDSHAKES: Final = 64
"""Default bound on incoming connections in the handshake at once (unauthenticated)."""
MAX_NODE_ID: Final = 256
BACKOFF_START: Final = 0.1
BACKOFF_CAP: Final = 5.0
STABLE_LINK: Final = 5.0
"""A link that lived this long resets the redial backoff (a flapping one does not)."""
HANDLER_GRACE: Final = 2.0
"""How long shutdown waits for link handlers to return after their links closed."""
CLOSE_GIVE_UP: Final = 3.0
"""How long a closing connection may take to flush (its close frame, what was queued)
before it is cut: a peer that never reads would otherwise keep the socket, and a close
waiting on it, forever."""

# aiohttp closes with RFC 6455 codes on parser errors; the mesh reports its own codes, so
# the peer (and the logs) can tell an oversized frame from other faults.
_AIOHTTP_CODE_MAP: Final[dict[int, int]] = {
    aiohttp.WSCloseCode.MESSAGE_TOO_BIG: CLOSE_TOO_LARGE,
    aiohttp.WSCloseCode.PROTOCOL_ERROR: CLOSE_PROTOCOL,
    aiohttp.WSCloseCode.INVALID_TEXT: CLOSE_PROTOCOL,
}


# PeerUnreachable lives in the exception tree (_errors); re-exported here for callers.


_FRAME_OVERHEAD: Final = 14 + auth.TAG_SIZE
"""The most a frame's header, mask and tag add to a message."""
_FED: Final = (False, b"")
"""What a reader's ``feed_data`` returns for bytes it consumed (no EOF, no tail)."""


class _HandshakeGuard:
    """Sits between aiohttp's connection protocol and its WebSocket reader, and bounds what
    an unauthenticated peer can make us buffer.

    aiohttp fixes a reader's ``max_msg_size`` when the WebSocket opens (the C reader keeps
    it in a private C field), but a link needs 16 MiB messages after the handshake and only
    64 KiB during it. So the reader is created with the link's limit, and this guard reads
    the frame headers of every byte before the reader gets it: until ``release``, a
    data message may be at most ``limit`` bytes, and at most ``messages`` of them may
    arrive. A header announcing more is refused before any of its payload is buffered
    (the chunk carrying it never reaches the reader): the WebSocket then fails with
    ``code``, as if aiohttp's own reader had refused it.

    After release it still follows the frame headers (never refusing: the reader does),
    to know when the reader holds no partial frame or message. Then the link may take
    whole binary messages straight from a chunk (``_take_whole``): the reader would
    parse them, and wake the pump for each, only for the link to hand them over. What
    it does not take goes to the reader, after which the link may take the messages
    that chunk completed (``WebSocketLink._take``).

    Installed through ``_GuardedParser``; aiohttp calls ``feed_data``/``feed_eof``.
    """

    __slots__ = (
        "_broken",
        "_budget",
        "_data_frame",
        "_failed",
        "_fin",
        "_head",
        "_in_message",
        "_limit",
        "_link",
        "_open",
        "_open_after",
        "_payload_left",
        "_queue",
        "_reader",
        "_size",
    )

    def __init__(self, reader: Any, queue: Any, *, limit: int, messages: int) -> None:
        self._reader = reader
        self._queue = queue
        self._limit = limit
        self._budget = messages  # data messages that may still start before release
        self._open = False
        self._open_after = 0
        self._failed = False
        self._broken = False
        """The stream broke the framing rules after release (the reader fails it)."""
        self._head = b""  # an incomplete frame header
        self._payload_left = 0  # payload bytes of the current frame still to come
        self._data_frame = False
        self._fin = False
        self._in_message = False
        self._size = 0  # bytes of the current data message so far
        self._link: WebSocketLink | None = None
        """Once released, the link that takes messages as they are parsed (``_take``)."""

    @property
    def released(self) -> bool:
        return self._open

    def release(self, after: int = 0) -> None:
        """Stop checking once ``after`` more data messages have ended (0: now)."""
        if after <= 0:
            self._open = True
        else:
            self._open_after = after

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._open:
            link = self._link
            if (
                link is not None
                and not self._payload_left
                and not self._head
                and not self._in_message
                and not self._broken
                and self._queue.exception() is None  # the reader failed the stream
            ):
                if type(data) is not bytes:  # (asyncio passes bytes; the reader copies)
                    data = bytes(data)
                data = self._take_whole(link, data)
                if not data:
                    return _FED
            self._scan(data)
            if link is None:
                result: tuple[bool, bytes] = self._reader.feed_data(data)
                return result
            # aiohttp's queue: its buffer holds (message, size) pairs not read yet.
            buffer = self._queue._buffer
            start = len(buffer)
            result = self._reader.feed_data(data)
            if len(buffer) > start and start == len(link._taken):
                link._take(buffer, start)
            return result
        if self._failed:
            return True, b""
        fault = self._scan(data)
        if fault is not None:
            self._failed = True
            self._queue.set_exception(aiohttp.WebSocketError(*fault))
            return True, b""
        result = self._reader.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def _take_whole(self, link: WebSocketLink, data: bytes) -> bytes:
        """Hand the link the whole binary messages ``data`` starts with, while it may take
        them (``WebSocketLink._may_take``) and the reader holds nothing (no partial frame,
        as the caller checked; no message the pump has not read); return the rest.

        Only unfragmented messages without extension bits, each under the reader's size
        limit and under 64 KiB: anything else (a control frame, a partial or larger frame,
        a message failing authentication) goes to the reader with all that follows it,
        which refuses what it must as before."""
        pos, end = 0, len(data)
        buffer = self._queue._buffer
        limit = link._take_max
        while pos + 2 <= end and data[pos] == 0x82:  # FIN, no RSV bits, binary
            second = data[pos + 1]
            length = second & 0x7F
            head = pos + 2
            if length == 126:
                length = int.from_bytes(data[head : head + 2])
                head += 2
            elif length == 127:
                break
            masked = second & 0x80
            stop = head + (4 if masked else 0) + length
            if stop > end or length > limit or buffer or not link._may_take():
                break
            if masked:
                payload = bytearray(data[head + 4 : stop])
                websocket_mask(data[head : head + 4], payload)
                message = bytes(payload)
            else:
                message = data[head:stop]
            if not link._take_one(message):
                break
            pos = stop
        return data[pos:] if pos else data

    def _scan(self, data: bytes) -> tuple[int, str] | None:
        pos, end = 0, len(data)
        while pos < end:
            if self._payload_left:
                step = min(self._payload_left, end - pos)
                self._payload_left -= step
                pos += step
                if not self._payload_left:
                    self._frame_done()
                continue
            take = data[pos : pos + 14 - len(self._head)]  # a header is 2..14 bytes
            head = self._head + take
            if len(head) < 2:
                self._head = head
                return None
            flag = head[1] & 0x7F
            masked = bool(head[1] & 0x80)
            size = 2 + (2 if flag == 126 else 8 if flag == 127 else 0) + (4 if masked else 0)
            if len(head) < size:
                self._head = head  # ``take`` was the rest of ``data``
                return None
            pos += size - len(self._head)
            self._head = b""
            length = flag if flag < 126 else int.from_bytes(head[2 : 4 if flag == 126 else 10])
            fault = self._frame_start(head[0] & 0x0F, bool(head[0] & 0x80), length)
            if fault is not None:
                return fault
            self._payload_left = length
            if not length:
                self._frame_done()
        return None

    def _frame_start(self, opcode: int, fin: bool, length: int) -> tuple[int, str] | None:
        if opcode >= 0x8:  # control frame (aiohttp validates it further)
            self._data_frame = False
            if length > 125:
                return self._fault(CLOSE_PROTOCOL, "control frame over 125 bytes")
            return None
        self._data_frame, self._fin = True, fin
        if opcode == 0x0:
            if not self._in_message:
                return self._fault(CLOSE_PROTOCOL, "continuation frame without a message")
        elif opcode in (0x1, 0x2):
            if self._in_message:
                return self._fault(CLOSE_PROTOCOL, "new message inside a fragmented one")
            self._in_message, self._size = True, 0
            if self._open:
                return None
            if self._budget <= 0:
                return CLOSE_PROTOCOL, "unexpected message during the handshake"
            self._budget -= 1
        else:
            return self._fault(CLOSE_PROTOCOL, f"unexpected opcode {opcode}")
        if self._open:
            return None
        self._size += length
        if self._size > self._limit:
            return CLOSE_TOO_LARGE, f"handshake message over {self._limit} bytes"
        return None

    def _fault(self, code: int, reason: str) -> tuple[int, str] | None:
        """Before release: refuse. After: the reader refuses it, and no message may be
        taken past it any more."""
        if self._open:
            self._broken = True
            return None
        return code, reason

    def _frame_done(self) -> None:
        if self._data_frame and self._fin:
            self._in_message = False
            if self._open_after:
                self._open_after -= 1
                if not self._open_after:
                    self._open = True


class _GuardedParser:
    """Mixin for aiohttp's WebSocket classes: wraps the reader aiohttp creates in a
    ``_HandshakeGuard`` before aiohttp hands it to the connection.

    aiohttp 3.x (checked with 3.14) assigns the new reader to ``self._parser`` (the server
    in ``_post_start``, the client in ``ClientSession._ws_connect``) and right after passes
    ``self._parser`` to the protocol's ``set_parser``, which feeds it any bytes received
    so far. This property intercepts that assignment. Should an aiohttp version stop doing
    it, ``_guard`` stays None and the transport refuses the connection loudly (it never
    runs unguarded); ``tests/transport/test_link_security.py`` checks the hook.
    """

    _reader: Any
    _guard: _HandshakeGuard | None = None
    _guarded: Any = None

    @property
    def _parser(self) -> Any:
        return self._guarded

    @_parser.setter
    def _parser(self, reader: Any) -> None:
        if reader is None:  # aiohttp drops its reader when the WebSocket closes
            self._guarded = None
            return
        guard = _HandshakeGuard(
            reader, self._reader, limit=HANDSHAKE_MAX_FRAME, messages=HANDSHAKE_MESSAGES
        )
        self._guard = self._guarded = guard


class _LazyHeartbeat:
    """Mixin for aiohttp's WebSocket classes: the heartbeat reset without a callback per
    turn that receives data.

    aiohttp re-arms the heartbeat through ``loop.call_soon`` in every turn that receives
    data, and that callback runs before the pump reads the message: ~5 us on the path of
    every message a link receives. Here receiving data only notes the time; the timers
    look at it when they fire. The heartbeat timer, with data since it was armed, re-arms
    itself for ``heartbeat`` after that data (aiohttp's schedule: a ping goes out
    ``heartbeat`` after the last traffic); an unanswered ping's deadline, with data since
    the ping (its pong, say), counts the peer as alive and re-arms the same way. Without
    data, aiohttp's own code runs (its ping, its "No PONG received" close).
    """

    _heartbeat: float | None
    _heartbeat_cb: asyncio.TimerHandle | None
    _heartbeat_when: float
    _pong_response_cb: asyncio.TimerHandle | None
    _need_heartbeat_reset: bool
    _loop: Any  # the server's is None until it is prepared
    _data_at = 0.0

    def _on_data_received(self) -> None:
        loop = self._loop
        if self._heartbeat is None or loop is None:
            return
        self._data_at = loop.time()
        self._need_heartbeat_reset = True

    def _send_heartbeat(self) -> None:
        if not self._rearm_after_data():
            super()._send_heartbeat()  # type: ignore[misc]

    def _pong_not_received(self) -> None:
        if not self._rearm_after_data():
            super()._pong_not_received()  # type: ignore[misc]

    def _rearm_after_data(self) -> bool:
        """With data received since the last arming: arm the next ping for ``heartbeat``
        after it (dropping any pong deadline) and say so."""
        loop = self._loop
        if not self._need_heartbeat_reset or self._heartbeat is None or loop is None:
            return False
        self._need_heartbeat_reset = False
        if self._pong_response_cb is not None:
            self._pong_response_cb.cancel()
            self._pong_response_cb = None
        if self._heartbeat_cb is not None:
            self._heartbeat_cb.cancel()
        self._heartbeat_when = when = max(self._data_at + self._heartbeat, loop.time())
        self._heartbeat_cb = loop.call_at(when, self._send_heartbeat)
        return True


async def _refuse_redirects(
    request: aiohttp.ClientRequest, handler: ClientHandlerType
) -> aiohttp.ClientResponse:
    """Dials never follow a redirect: the URL dialled is the one checked (a node without a
    secret dials loopback only), and a node never answers with one."""
    response = await handler(request)
    if 300 <= response.status < 400:
        response.close()
        raise PeerUnreachable(
            f"{request.url} answered with a redirect ({response.status}): not followed"
        )
    return response


def _cut(transport: asyncio.BaseTransport | None, *, at_once: bool) -> None:
    """Make sure a connection being closed ends: at once (the peer is unresponsive), or
    after ``CLOSE_GIVE_UP`` if it still holds unsent bytes then. aiohttp closes the
    socket gracefully, which waits for the write buffer to drain: a peer that never
    reads never lets it, and the socket (and whatever waits on it) stays for good."""
    if not isinstance(transport, asyncio.WriteTransport):
        return
    if at_once:
        transport.abort()
    elif transport.get_write_buffer_size():
        asyncio.get_running_loop().call_later(CLOSE_GIVE_UP, transport.abort)


async def _close_bounded(close: Awaitable[bool], transport: Any) -> bool:
    """aiohttp's close, cut short (and the connection cut) if a peer that does not read
    holds it up past ``CLOSE_GIVE_UP`` (it waits for its close frame to drain first)."""
    try:
        async with asyncio.timeout(CLOSE_GIVE_UP):
            return await close
    except TimeoutError:
        _cut(transport, at_once=True)
        return True
    finally:
        _cut(transport, at_once=False)


class _ServerWs(_LazyHeartbeat, _GuardedParser, web.WebSocketResponse):
    """aiohttp's server WebSocket, reporting parser faults with the mesh's close codes, and
    cutting connections that a peer would otherwise hold open by not reading."""

    def _transport(self) -> asyncio.BaseTransport | None:
        req = self._req
        return req.transport if req is not None else None

    async def close(
        self, *, code: int = aiohttp.WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        mapped = _AIOHTTP_CODE_MAP.get(code)
        if mapped is not None:
            code, message = mapped, message or CLOSE_CODES[mapped].encode()
        transport = self._transport()
        return await _close_bounded(
            super().close(code=code, message=message, drain=drain), transport
        )

    def _handle_ping_pong_exception(self, exc: BaseException) -> None:
        transport = self._transport()
        super()._handle_ping_pong_exception(exc)
        _cut(transport, at_once=True)  # no pong: the peer is gone or not reading


class _ClientWs(_LazyHeartbeat, _GuardedParser, aiohttp.ClientWebSocketResponse):
    """aiohttp's client WebSocket, reporting parser faults with the mesh's close codes, and
    cutting connections that a peer would otherwise hold open by not reading."""

    def _transport(self) -> asyncio.BaseTransport | None:
        conn = self._conn
        return conn.transport if conn is not None else None

    async def close(self, *, code: int = aiohttp.WSCloseCode.OK, message: bytes = b"") -> bool:
        mapped = _AIOHTTP_CODE_MAP.get(code)
        if mapped is not None:
            code, message = mapped, message or CLOSE_CODES[mapped].encode()
        transport = self._transport()
        return await _close_bounded(super().close(code=code, message=message), transport)

    def _handle_ping_pong_exception(self, exc: BaseException) -> None:
        transport = self._transport()
        super()._handle_ping_pong_exception(exc)
        _cut(transport, at_once=True)  # no pong: the peer is gone or not reading


_AnyWs = _ServerWs | _ClientWs


def _reason_bytes(reason: str) -> bytes:
    # A close frame carries at most 123 bytes of reason; cut on a character boundary.
    return reason.encode()[:123].decode(errors="ignore").encode()


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an IP literal or ``localhost``) is a loopback address."""
    if not host:
        return False
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


# --------------------------------------------------------------------------- handshake


class _HandshakeFailure(Exception):
    """The handshake cannot go on. ``remote``: the peer closed (we only report).
    ``peer_id``: the other node, once the handshake revealed it."""

    def __init__(self, code: int, reason: str, *, remote: bool = False) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.remote = remote
        self.peer_id: str | None = None
        self.proven_self = False
        """A 4011 this node's own server gave its own dial (not merely claimed)."""

    def __str__(self) -> str:
        return f"{self.code} ({CLOSE_CODES.get(self.code, 'closed')}): {self.reason}"


def _pack(kind: str, **fields: Any) -> bytes:
    data: bytes = msgpack.packb({"t": kind, "v": PROTOCOL_VERSION, **fields}, use_bin_type=True)
    return data


def _unpack(data: bytes, expected: str) -> dict[str, Any]:
    """Decode one handshake message; every fault becomes a close code, never a crash."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise _HandshakeFailure(CLOSE_PROTOCOL, f"malformed handshake message ({exc!r})") from exc
    if not isinstance(obj, dict):
        raise _HandshakeFailure(CLOSE_PROTOCOL, "handshake message is not a map")
    version = obj.get("v")
    if type(version) is not int:
        raise _HandshakeFailure(CLOSE_PROTOCOL, "handshake message without a version")
    if version != PROTOCOL_VERSION:
        raise _HandshakeFailure(
            CLOSE_VERSION,
            f"protocol version {version!r} not supported (this node speaks {PROTOCOL_VERSION})",
        )
    if obj.get("t") != expected:
        raise _HandshakeFailure(CLOSE_PROTOCOL, f"expected {expected!r}, got {obj.get('t')!r}")
    return obj


def _field(obj: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise _HandshakeFailure(CLOSE_PROTOCOL, f"field {key!r} missing or not {kind.__name__}")
    return value


def _node_id(obj: dict[str, Any]) -> str:
    node_id: str = _field(obj, "node_id", str)
    if not 0 < len(node_id) <= MAX_NODE_ID:
        raise _HandshakeFailure(CLOSE_PROTOCOL, "node_id empty or too long")
    return node_id


def _nonce(obj: dict[str, Any]) -> bytes:
    nonce: bytes = _field(obj, "nonce", bytes)
    if len(nonce) != auth.NONCE_SIZE:
        raise _HandshakeFailure(CLOSE_PROTOCOL, f"nonce must be {auth.NONCE_SIZE} bytes")
    return nonce


def encode_hello(hello: Hello) -> dict[str, Any]:
    """The wire form of a ``Hello``: a map of its dataclass fields."""
    return {
        "node_id": hello.node_id,
        "url": hello.url,
        "protocol": hello.protocol,
        "namespaces": None if hello.namespaces is None else list(hello.namespaces),
        "user_id": hello.user_id,
        "extra": dict(hello.extra),
    }


def decode_hello(raw: object) -> Hello:
    """Parse and type-check a peer's ``Hello``; unknown keys are ignored (newer peers)."""
    if not isinstance(raw, dict):
        raise _HandshakeFailure(CLOSE_PROTOCOL, "hello is not a map")
    node_id = _node_id(raw)
    url = raw.get("url")
    protocol = raw.get("protocol", PROTOCOL_VERSION)
    namespaces = raw.get("namespaces")
    user_id = raw.get("user_id", "")
    extra = raw.get("extra", {})
    if url is not None and not isinstance(url, str):
        raise _HandshakeFailure(CLOSE_PROTOCOL, "hello.url is not a string")
    if type(protocol) is not int:
        raise _HandshakeFailure(CLOSE_PROTOCOL, "hello.protocol is not an int")
    if namespaces is not None and not (
        isinstance(namespaces, list) and all(isinstance(n, str) for n in namespaces)
    ):
        raise _HandshakeFailure(CLOSE_PROTOCOL, "hello.namespaces is not a list of strings")
    if not isinstance(user_id, str):
        raise _HandshakeFailure(CLOSE_PROTOCOL, "hello.user_id is not a string")
    if not isinstance(extra, dict):
        raise _HandshakeFailure(CLOSE_PROTOCOL, "hello.extra is not a map")
    return Hello(
        node_id=node_id,
        url=url,
        protocol=protocol,
        namespaces=None if namespaces is None else tuple(namespaces),
        user_id=user_id,
        extra=extra,
    )


async def _recv_handshake(ws: _AnyWs) -> bytes:
    """The next handshake message, or a ``_HandshakeFailure`` saying why not."""
    msg = await ws.receive()
    if msg.type is WSMsgType.BINARY:
        data: bytes = msg.data
        if len(data) > HANDSHAKE_MAX_FRAME:
            raise _HandshakeFailure(CLOSE_TOO_LARGE, f"handshake message of {len(data)} bytes")
        return data
    if msg.type is WSMsgType.TEXT:
        raise _HandshakeFailure(CLOSE_PROTOCOL, "text frame during handshake")
    if msg.type is WSMsgType.ERROR:
        # A parser fault carries its code; one that does not is a dead connection (no
        # pong, a reset), not the peer's protocol error.
        code = getattr(msg.data, "code", CLOSE_ABNORMAL)
        code = _AIOHTTP_CODE_MAP.get(code, code)
        raise _HandshakeFailure(code, f"bad frame during handshake: {msg.data}")
    code = ws.close_code if ws.close_code is not None else CLOSE_ABNORMAL
    reason = msg.extra if isinstance(msg.extra, str) and msg.extra else "peer closed"
    raise _HandshakeFailure(code, reason, remote=True)


def _describe_self(hello: Callable[[], Hello]) -> dict[str, Any]:
    try:
        return encode_hello(hello())
    except Exception as exc:
        log.exception("cannot build this node's hello")
        raise _HandshakeFailure(CLOSE_HANDLER_ERROR, "node cannot describe itself") from exc


class _SelfClaim(InvalidArgument):
    """A dial ended as "that is this node". Whoever answers at a URL can say so, so a kept
    peer is given up only when it is ``proven``: this node's own server saw the dial."""

    def __init__(self, message: str, *, proven: bool) -> None:
        super().__init__(message)
        self.proven = proven


def _client_error(failure: _HandshakeFailure, url: str) -> SubcogError:
    """Map a failed handshake to the most specific public error."""
    who = "peer" if failure.remote else "we"
    text = f"handshake with {url} failed ({who} closed with {failure})"
    if failure.code == CLOSE_AUTH:
        return AuthError(text)
    if failure.code == CLOSE_SELF:
        return _SelfClaim(f"{url} is this node itself ({who} said so)", proven=failure.proven_self)
    if failure.code in (CLOSE_GOING_AWAY, CLOSE_ABNORMAL, CLOSE_DUPLICATE):
        return PeerUnreachable(text)
    return ProtocolError(text)


# --------------------------------------------------------------------------- link


class _Inbox:
    """A FIFO of received frames bounded in bytes (one frame is always admitted)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: deque[bytes] = deque()
        self._size = 0
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    async def put(self, frame: bytes) -> None:
        while self._items and self._size >= self._limit and not self._closed:
            self._writable.clear()
            await self._writable.wait()
        if self._closed:
            return
        self._items.append(frame)
        self._size += len(frame)
        self._readable.set()

    async def get(self) -> bytes | None:
        while not self._items:
            if self._closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        frame = self._items.popleft()
        self._size -= len(frame)
        if self._size < self._limit:
            self._writable.set()
        return frame

    def pop_nowait(self) -> bytes | None:
        """The next buffered frame, or None when there is none right now."""
        if not self._items:
            return None
        frame = self._items.popleft()
        self._size -= len(frame)
        if self._size < self._limit:
            self._writable.set()
        return frame

    def __bool__(self) -> bool:
        return bool(self._items)

    def close(self) -> None:
        """No more frames will be added; readers drain what is buffered, then stop."""
        self._closed = True
        self._readable.set()
        self._writable.set()


class WebSocketLink:
    """One authenticated WebSocket to one peer (implements ``Link``).

    Iteration yields the peer's frames in order and ends when the link closes, whatever
    the reason; ``close_code`` and ``close_reason`` then say why (the reason is logged).
    """

    def __init__(
        self,
        ws: _AnyWs,
        peer: Hello,
        *,
        dialled_by_us: bool,
        max_frame: int,
        recv_buffer: int,
        ready: bool = True,
        mac: auth.MessageAuth | None = None,
    ) -> None:
        self._ws = ws
        self._peer = peer
        self._mac = mac
        self.dialled_by_us = dialled_by_us
        """True if this node opened the connection (the client side)."""
        self._max_frame = max_frame
        self._inbox = _Inbox(recv_buffer)
        self._send_lock = asyncio.Lock()
        self._sending = 0
        """Calls of ``send`` not finished (``send_now`` must not overtake them: the lock
        alone does not say so between its release and the next waiter's turn)."""
        self._ready = asyncio.Event()
        if ready:
            self._ready.set()
        self._done = asyncio.Event()
        self._consumer: FrameConsumer | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._consumed: asyncio.Future[None] | None = None
        self._pump_started = False
        self._closing = False
        self._close_code: int | None = None
        self._close_reason = ""
        self.opened_at = time.monotonic()
        peername = ws.get_extra_info("peername")
        self.same_host = isinstance(peername, tuple) and is_loopback(str(peername[0]))
        """True if the peer connected over loopback (it runs on this machine)."""
        self._taken: deque[Any] = deque()
        """Messages still in aiohttp's reader that ``_take`` handed over already."""
        self._reading = False
        """The pump waits in aiohttp's receive (it holds no frame it read)."""
        self._take_max = min(0xFFFF, max_frame + (auth.TAG_SIZE if mac is not None else 0))
        """The largest message the guard takes (``_take_whole``): the reader refuses
        more, and takes larger ones itself."""
        if ws._guard is not None:
            ws._guard._link = self

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<WebSocketLink peer={self._peer.node_id!r} {state}>"

    @property
    def peer(self) -> Hello:
        return self._peer

    @property
    def closed(self) -> bool:
        return self._closing or self._done.is_set()

    @property
    def close_code(self) -> int | None:
        """Why the link closed (see the module's close codes); None while open."""
        return self._close_code

    @property
    def close_reason(self) -> str:
        return self._close_reason

    async def send(self, frame: bytes) -> None:
        if self.closed:
            raise ClosedError(f"link to {self._peer.node_id} is closed")
        size = len(frame)
        if size > self._max_frame:
            raise FrameTooLarge(f"frame of {size} bytes exceeds max_frame={self._max_frame}")
        self._sending += 1  # until it is written: send_now must not overtake it
        try:
            if not self._ready.is_set():
                await self._ready.wait()
            async with self._send_lock:
                if self.closed:
                    raise ClosedError(f"link to {self._peer.node_id} is closed")
                data = bytes(frame)
                if self._mac is not None:
                    data = self._mac.seal(data)  # under the lock: tags follow send order
                try:
                    # aiohttp writes, then awaits the socket's drain once its buffer
                    # passes the writer limit: that await is the backpressure.
                    await self._ws.send_bytes(data)
                except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
                    raise ClosedError(f"link to {self._peer.node_id} broke: {exc}") from exc
        finally:
            self._sending -= 1

    def send_now(self, frame: bytes) -> bool:
        """See ``base.Link.send_now``: aiohttp's own frame write, without the coroutines
        around it (``send``'s lock, aiohttp's ``send_bytes`` and ``send_frame``: ~5 us
        on the path of every update sent to an idle link). Only when their checks would
        all pass and the write cannot reach aiohttp's flow-control limit (past it,
        ``send_frame`` may wait for the socket to drain)."""
        writer = self._ws._writer
        if (
            writer is None
            or self._sending  # a send is under way (waiting for the lock, say): it goes first
            or self._send_lock.locked()  # (the handshake's last message)
            or not self._ready.is_set()
            or self.closed
            or len(frame) > self._max_frame
            or writer._closing
            or writer.compress
            or writer.transport.is_closing()
            or writer._output_size + len(frame) + _FRAME_OVERHEAD > writer._limit
        ):
            return False
        data = frame if type(frame) is bytes else bytes(frame)
        if self._mac is not None:
            data = self._mac.seal(data)
        writer._write_websocket_frame(data, WSMsgType.BINARY, 0)
        return True

    def __aiter__(self) -> WebSocketLink:
        return self

    async def __anext__(self) -> bytes:
        frame = await self._inbox.get()
        if frame is None:
            raise StopAsyncIteration
        return frame

    async def consume(self, consumer: FrameConsumer) -> None:
        """See ``base.Link.consume``. Frames are handed over by the read pump itself,
        in the event-loop turn that parsed them (no task hand-off); only while the
        consumer is busy with an awaitable are they buffered in the inbox and handed over
        by a drain task (the pump keeps reading, so pings are still answered)."""
        if self._consumed is not None:
            raise RuntimeError("a link is consumed once")
        self._consumer = consumer
        consumed = self._consumed = asyncio.get_running_loop().create_future()
        if self._inbox:
            self._drainer = asyncio.get_running_loop().create_task(self._drain(None))
        elif self._done.is_set():
            consumed.set_result(None)
        try:
            await consumed
        finally:
            self._consumer = None  # cancelled or failed: hand nothing over any more
            if self._drainer is not None:
                await cancel_and_wait(self._drainer)

    def _take(self, buffer: deque[tuple[Any, int]], start: int) -> None:
        """Hand over the binary messages aiohttp's reader just parsed, from ``start`` on,
        in the turn that received them: the pump's read wakes one loop iteration later
        (~10 us on the path of every message), and then skips them (``_taken``). Only
        while the pump would hand them over itself (it waits to read, holding no frame; a
        consumer; nothing buffered or being drained) and every message before them was
        taken: the order is kept. Anything
        else (another kind of message, a failed tag, a busy consumer) is left to the pump,
        with what follows it."""
        if not self._may_take():
            return
        mac = self._mac
        for i in range(start, len(buffer)):
            msg = buffer[i][0]
            if msg.type is not WSMsgType.BINARY:
                return
            data: bytes = msg.data
            if mac is not None:
                opened = mac.open(data)
                if opened is None:
                    return  # the pump finds the same and refuses it (open changed nothing)
                data = opened
            self._taken.append(msg)
            self._hand_over(data)
            if self._consumer is None or self._drainer is not None:
                return

    def _may_take(self) -> bool:
        """Whether the pump would hand over the next message itself (the conditions of
        ``_take`` and ``_HandshakeGuard._take_whole``)."""
        return not (
            not self._reading  # it holds a frame (waiting for room in the inbox, say)
            or self._consumer is None
            or self._drainer is not None
            or self._inbox
            or self.closed
            or self._ws.closed
            or self._ws._closing  # the peer's close came: aiohttp reads the rest
        )

    def _take_one(self, message: bytes) -> bool:
        """Hand over one message the guard parsed (``_take_whole``); False (and nothing
        done) if it fails authentication: the reader then gets it, and the pump refuses
        it."""
        mac = self._mac
        if mac is not None:
            opened = mac.open(message)
            if opened is None:
                return False
            message = opened
        self._hand_over(message)
        return True

    def _hand_over(self, frame: bytes) -> None:
        """Give one frame to the consumer now (the pump's fast path)."""
        consumer = self._consumer
        assert consumer is not None
        try:
            pending = consumer(frame)
        except Exception as exc:
            self._consumer_failed(exc)
            return
        if pending is not None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain(pending))

    async def _drain(self, pending: Awaitable[None] | None) -> None:
        """Finish what the consumer started, then hand over what was buffered meanwhile;
        the pump hands frames over directly again once this has emptied the inbox."""
        try:
            if pending is not None:
                await pending
            inbox = self._inbox
            while (consumer := self._consumer) is not None:
                frame = inbox.pop_nowait()
                if frame is None:
                    break
                pending = consumer(frame)
                if pending is not None:
                    await pending
        except Exception as exc:
            self._consumer_failed(exc)
        finally:
            self._drainer = None
        consumed = self._consumed
        if self._done.is_set() and consumed is not None and not consumed.done():
            consumed.set_result(None)

    def _consumer_failed(self, exc: BaseException) -> None:
        self._consumer = None
        consumed = self._consumed
        if consumed is not None and not consumed.done():
            consumed.set_exception(exc)

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close the link (harmless when already closed) and wait until it has ended."""
        self._record(code, reason or CLOSE_CODES.get(code, ""))
        self._closing = True
        self._ready.set()
        self._inbox.close()
        await self._ws.close(code=code, message=_reason_bytes(self._close_reason))
        if self._pump_started:
            await self._done.wait()
        else:
            self._finish()

    async def wait_closed(self) -> None:
        """Return once the link has ended."""
        await self._done.wait()

    def _record(self, code: int, reason: str) -> None:
        if self._close_code is None:
            self._close_code, self._close_reason = code, reason

    async def _send_first(self, data: bytes) -> None:
        """Send the handshake's last message before any application frame."""
        try:
            async with self._send_lock:
                self._ready.set()
                await self._ws.send_bytes(data)
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            raise _HandshakeFailure(CLOSE_ABNORMAL, f"welcome not sent: {exc}") from exc

    async def _pump(self) -> None:
        """Read frames into the inbox until the WebSocket closes; record why it closed."""
        self._pump_started = True
        try:
            while True:
                self._reading = True  # holding no frame: _take may hand over the next
                try:
                    msg = await self._ws.receive()
                except (ConnectionError, aiohttp.ClientError) as lost:
                    # Cut while answering a ping (a peer that did not read): gone.
                    self._record(CLOSE_ABNORMAL, f"connection lost: {lost}")
                    return
                finally:
                    self._reading = False
                kind = msg.type
                if kind is WSMsgType.BINARY:
                    taken = self._taken
                    if taken and taken[0] is msg:
                        taken.popleft()  # handed over as it was parsed (_take)
                        continue
                    data: bytes = msg.data
                    if self._mac is not None:
                        opened = self._mac.open(data)
                        if opened is None:
                            await self._refuse_message(len(data))
                            return
                        data = opened
                    if self._consumer is not None and self._drainer is None and not self._inbox:
                        self._hand_over(data)
                    elif self._consumed is None or self._consumer is not None:
                        # For iteration, for consume() later, or behind frames still being
                        # drained. (Otherwise the consumer failed: the link is closing.)
                        await self._inbox.put(data)
                        if self._drainer is None and self._consumer is not None:
                            # consume() started, or its drain task emptied the inbox and
                            # ended, while we waited for room: this frame must follow.
                            self._drainer = asyncio.get_running_loop().create_task(
                                self._drain(None)
                            )
                elif kind is WSMsgType.TEXT:
                    self._record(CLOSE_PROTOCOL, "text frame received (frames are binary)")
                    await self._ws.close(code=CLOSE_PROTOCOL, message=b"text frame")
                elif kind is WSMsgType.ERROR:
                    exc = msg.data
                    code = getattr(exc, "code", None)
                    if code is None:
                        self._record(CLOSE_ABNORMAL, f"peer unresponsive or link broken: {exc}")
                    else:
                        code = _AIOHTTP_CODE_MAP.get(code, code)
                        self._record(code, f"{CLOSE_CODES.get(code, 'error')}: {exc}")
                elif kind is WSMsgType.CLOSE:
                    reason = msg.extra if isinstance(msg.extra, str) else ""
                    self._record(int(msg.data), f"peer closed: {reason}")
                elif kind in (WSMsgType.CLOSING, WSMsgType.CLOSED):
                    code = self._ws.close_code
                    self._record(code if code is not None else CLOSE_ABNORMAL, "connection closed")
                if self._ws.closed or kind in (WSMsgType.CLOSING, WSMsgType.CLOSED):
                    return
        finally:
            self._finish()

    async def _refuse_message(self, size: int) -> None:
        """A message failed authentication: hand nothing over any more, close with 4012."""
        self._record(
            CLOSE_MAC,
            f"message authentication failed (message of {size} bytes; injected, altered, "
            "replayed, reordered or dropped in transit, or another transcript)",
        )
        self._closing = True
        self._inbox.close()  # frames authenticated before this one are still handed over
        await self._ws.close(code=CLOSE_MAC, message=CLOSE_CODES[CLOSE_MAC].encode())

    def _finish(self) -> None:
        if self._done.is_set():
            return
        self._record(CLOSE_ABNORMAL, "connection lost")
        self._inbox.close()
        self._ready.set()
        self._done.set()
        consumed = self._consumed
        if consumed is not None and self._drainer is None and not consumed.done():
            consumed.set_result(None)
        level = (
            logging.INFO
            if self._close_code in (CLOSE_NORMAL, CLOSE_GOING_AWAY)
            else (logging.WARNING)
        )
        log.log(
            level,
            "link to %s closed: %s (%s)",
            self._peer.node_id,
            self._close_code,
            self._close_reason,
        )


# --------------------------------------------------------------------------- transport


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class WebSocketTransport:
    """Accepts and dials authenticated WebSocket links; see the module docstring.

    Without ``secret`` it listens on loopback only and refuses remote addresses both ways;
    with a secret it listens on every interface by default and authenticates every peer.
    """

    def __init__(
        self,
        *,
        node_id: str,
        hello: Callable[[], Hello],
        on_link: LinkHandler,
        secret: bytes | None = None,
        host: str | None = None,
        port: int = 0,
        ssl: ssl_module.SSLContext | None = None,
        client_ssl: ssl_module.SSLContext | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        heartbeat: float = 1.0,
        dead_after: float = 3.0,
        setup_app: Callable[[web.Application], None] | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        recv_buffer: int = 4 * 1024 * 1024,
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        if not node_id or len(node_id) > MAX_NODE_ID:
            raise InvalidArgument(f"node_id must be 1..{MAX_NODE_ID} characters")
        if secret is not None and not secret:
            raise InvalidArgument("secret must not be empty (use None for loopback only)")
        if host is None:
            host = "127.0.0.1" if secret is None else "0.0.0.0"
        if secret is None and not is_loopback(host):
            raise InvalidArgument(
                f"without a mesh secret the node listens on loopback only, not {host!r}"
            )
        if (
            max_frame <= 0
            or heartbeat <= 0
            or dead_after <= 0
            or handshake_timeout <= 0
            or max_handshakes <= 0
        ):
            raise InvalidArgument(
                "max_frame, heartbeat, dead_after, handshake_timeout, max_handshakes > 0"
            )
        self.node_id = node_id
        self._hello = hello
        self._on_link = on_link
        self._secret = secret
        self._host = host
        self._port = port
        self._ssl = ssl
        self._client_ssl = client_ssl
        self._max_frame = max_frame
        # What a WebSocket message may carry: a frame and, on a keyed link, its tag (so a
        # max_frame frame is never refused for the tag). aiohttp refuses sizes >= its limit.
        self._max_msg_size = max_frame + (auth.TAG_SIZE if secret is not None else 0) + 1
        self._max_handshakes = max_handshakes
        self._unauthenticated = 0
        # aiohttp declares a peer dead `heartbeat/2` after an unanswered ping that it sends
        # `heartbeat` after the last traffic: 1.5 intervals in all.
        self._heartbeat = min(heartbeat, dead_after / 1.5)
        self._close_timeout = dead_after
        self._handshake_timeout = handshake_timeout
        self._recv_buffer = recv_buffer
        self._setup_app = setup_app
        self._state = _State.NEW
        self._closed_event = asyncio.Event()
        self._app = web.Application()
        self._app.router.add_get(PATH, self._handle_ws)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._url = ""
        self._links: dict[str, WebSocketLink] = {}
        self._dialling: dict[str, int] = {}
        self._dial_nonces: set[bytes] = set()
        """Client nonces of this node's dials in progress."""
        self._self_dials: set[bytes] = set()
        """Those of them this node's server received: dials that reached this node."""
        self._links_changed = asyncio.Event()
        self._handshaking: set[_ServerWs] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._redialers: dict[str, asyncio.Task[None]] = {}
        # The node id each redial loop expects; an entry leaves when its loop ends.
        self._redial_expects: dict[asyncio.Task[None], str | None] = {}
        self._dialled: set[asyncio.Task[None]] = set()
        """Redial loops that have made their first dial (a link, or a failure)."""
        self._dial_done = asyncio.Event()

    # ------------------------------------------------------------------ properties

    @property
    def app(self) -> web.Application:
        """The aiohttp application (add routes through ``setup_app`` before start)."""
        return self._app

    @property
    def url(self) -> str:
        """What a peer on this host dials: ``ws://127.0.0.1:PORT`` (``wss`` with TLS)."""
        if self._state is _State.NEW:
            raise ClosedError("transport not started")
        return self._url

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return URL(self.url).port or 0

    @property
    def links(self) -> dict[str, WebSocketLink]:
        """Open links by peer node id (a copy)."""
        return {k: v for k, v in self._links.items() if not v.closed}

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> WebSocketTransport:
        if self._state is not _State.NEW:
            raise ClosedError("a transport cannot be started twice")
        self._state = _State.CLOSING  # not accepting until fully started
        try:
            await self._start()
        except BaseException:
            self._state = _State.CLOSED
            self._closed_event.set()
            if self._runner is not None:
                await self._step("stop server", self._runner.cleanup())
            raise
        self._state = _State.OPEN
        log.info("node %s listening on %s%s", self.node_id, self._url, PATH)
        return self

    async def _start(self) -> None:
        if self._setup_app is not None:
            self._setup_app(self._app)
        # keepalive_timeout: a connection that sends no request, or never finishes its
        # headers, is closed after the handshake's deadline (aiohttp's default keeps it
        # ~1 h, outside the handshake slots: a local process could use up the node's
        # file descriptors).
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=HANDLER_GRACE,
            keepalive_timeout=self._handshake_timeout,
        )
        await runner.setup()
        self._runner = runner
        try:
            site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl)
            binding = asyncio.ensure_future(site.start())
            try:
                await asyncio.shield(binding)
            except asyncio.CancelledError:
                # Let the bind finish, so the runner knows the server it made and the
                # cleanup closes it: one cut short inside create_server stays listening.
                while not binding.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([binding])
                if not binding.cancelled():
                    binding.exception()  # read: the cancel is what the caller gets
                raise
        except OSError as exc:
            raise InvalidArgument(f"cannot listen on {self._host}:{self._port}: {exc}") from exc
        bound = runner.addresses[0]
        host = self._host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        self._url = str(
            URL.build(scheme="wss" if self._ssl else "ws", host=host.strip("[]"), port=bound[1])
        )
        self._session = aiohttp.ClientSession(
            ws_response_class=_ClientWs,
            timeout=aiohttp.ClientTimeout(total=None, connect=self._handshake_timeout),
            middlewares=(_refuse_redirects,),
        )

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop accepting, stop redialling, close links (1001), release the server.

        Harmless when called twice or concurrently (later callers wait for the first).
        """
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            self._closed_event.set()
            return
        if self._state is not _State.OPEN:
            await self._closed_event.wait()
            return
        self._state = _State.CLOSING
        try:
            await self._shutdown()
        finally:
            self._state = _State.CLOSED
            self._closed_event.set()

    async def _shutdown(self) -> None:
        runner, session = self._runner, self._session
        assert runner is not None
        assert session is not None
        for site in list(runner.sites):
            await self._step("stop listening", site.stop())
        redialers = list(self._redialers.values())
        self._redialers.clear()
        for task in redialers:
            task.cancel()
        await asyncio.gather(*redialers, return_exceptions=True)
        pending = [
            ws.close(code=CLOSE_GOING_AWAY, message=b"node shutting down")
            for ws in list(self._handshaking)
        ]
        closing = [
            link.close(CLOSE_GOING_AWAY, "node shutting down")
            for link in list(self._links.values())
        ]
        await self._step("close links", asyncio.gather(*pending, *closing, return_exceptions=True))
        if self._tasks:
            _done, still = await asyncio.wait(set(self._tasks), timeout=HANDLER_GRACE)
            for task in still:
                log.warning("cancelling %s: still running at shutdown", task.get_name())
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        await self._step("close client session", session.close())
        await self._step("stop server", runner.cleanup())
        self._links.clear()
        log.info("node %s transport closed", self.node_id)

    @staticmethod
    async def _step(what: str, aw: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> None:
        """One guarded shutdown step: log a failure and go on with the next step."""
        try:
            await aw
        except Exception:
            log.exception("shutdown step %r failed", what)

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise ClosedError(f"transport is {self._state.value}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # ------------------------------------------------------------------ link registry

    def _changed(self) -> None:
        self._links_changed.set()
        self._links_changed = asyncio.Event()

    async def _wait_link(self, node_id: str, timeout: float) -> WebSocketLink | None:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    link = self._links.get(node_id)
                    if link is not None and not link.closed:
                        return link
                    await self._links_changed.wait()
        except TimeoutError:
            return None

    def _register(self, link: WebSocketLink) -> None:
        """Decide the one-link-per-pair rule and register; no ``await`` in here."""
        if self._state is not _State.OPEN:
            raise _HandshakeFailure(CLOSE_GOING_AWAY, "node shutting down")
        peer = link.peer.node_id
        existing = self._links.get(peer)
        if existing is not None and not existing.closed:
            raise _HandshakeFailure(CLOSE_DUPLICATE, f"already linked to {peer}")
        if not link.dialled_by_us and self._dialling.get(peer) and self.node_id < peer:
            raise _HandshakeFailure(CLOSE_DUPLICATE, f"simultaneous dial; {self.node_id} wins")
        self._links[peer] = link
        self._changed()

    def _unregister(self, link: WebSocketLink) -> None:
        if self._links.get(link.peer.node_id) is link:
            del self._links[link.peer.node_id]
            self._changed()

    async def _run_link(self, link: WebSocketLink) -> None:
        """Serve one link: the node's handler in a task, the read pump here."""
        self._spawn(self._call_handler(link), name=f"subcog-link-handler-{link.peer.node_id}")
        try:
            await link._pump()
        finally:
            self._unregister(link)

    async def _call_handler(self, link: WebSocketLink) -> None:
        try:
            await self._on_link(link)
        except Exception:
            log.exception("link handler for %s failed", link.peer.node_id)
            await link.close(CLOSE_HANDLER_ERROR, "link handler error")
            return
        await link.close(CLOSE_NORMAL, "handler finished")

    # ------------------------------------------------------------------ server side

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        if self._state is not _State.OPEN:
            raise web.HTTPServiceUnavailable(text="node shutting down")
        if self._secret is None and not is_loopback(request.remote):
            log.warning("refused %s: loopback only without a mesh secret", request.remote)
            raise web.HTTPForbidden(text="loopback only without a mesh secret")
        if "Origin" in request.headers:
            # A web page: browsers let any site open WebSockets to 127.0.0.1 (and send
            # Origin), and without a secret loopback is all a node checks. Nodes never
            # send it.
            log.warning("refused %s: a browser page (Origin header)", request.remote)
            raise web.HTTPForbidden(text="not for browsers")
        if self._unauthenticated >= self._max_handshakes:
            log.warning(
                "refused %s: %d handshakes in progress", request.remote, self._max_handshakes
            )
            raise web.HTTPServiceUnavailable(text="too many handshakes in progress")
        # Counted (no await since the check) until authenticated or gone, so the bound on
        # what unauthenticated peers can make us buffer holds for the whole node.
        self._unauthenticated += 1
        counted = True

        def handshake_over() -> None:
            nonlocal counted
            if counted:
                counted = False
                self._unauthenticated -= 1

        try:
            return await self._serve_ws(request, handshake_over)
        finally:
            handshake_over()

    async def _serve_ws(
        self, request: web.Request, handshake_over: Callable[[], None]
    ) -> web.StreamResponse:
        ws = _ServerWs(
            heartbeat=self._heartbeat,
            max_msg_size=self._max_msg_size,  # after the handshake; _HandshakeGuard before
            timeout=self._close_timeout,
            compress=False,
        )
        await ws.prepare(request)
        self._handshaking.add(ws)
        try:
            if ws._guard is None:
                log.error("aiohttp %s: cannot bound handshake messages", aiohttp.__version__)
                raise _HandshakeFailure(CLOSE_HANDLER_ERROR, "handshake guard unavailable")
            async with asyncio.timeout(self._handshake_timeout):
                link = await self._server_handshake(ws)
        except _HandshakeFailure as failure:
            if not failure.remote:
                log.warning("handshake from %s refused: %s", request.remote, failure)
                await ws.close(code=failure.code, message=_reason_bytes(failure.reason))
            else:
                log.info("handshake from %s ended by peer: %s", request.remote, failure)
            return ws
        except TimeoutError:
            log.warning("handshake from %s timed out", request.remote)
            await ws.close(code=CLOSE_HANDSHAKE_TIMEOUT, message=b"handshake timeout")
            return ws
        except (ConnectionError, aiohttp.ClientError) as exc:
            log.info("handshake from %s: connection lost (%s)", request.remote, exc)
            await ws.close(code=CLOSE_ABNORMAL, message=b"connection lost")
            return ws
        finally:
            self._handshaking.discard(ws)
            handshake_over()
        log.info("accepted link from %s (%s)", link.peer.node_id, request.remote)
        # In a task of its own, as a client's link is: here it would resume aiohttp's
        # request handling and every frame above at each message. Cancelling this handler
        # (a server shutting down) cancels the task it awaits.
        pump = asyncio.get_running_loop().create_task(
            self._run_link(link), name=f"subcog-link-pump-{link.peer.node_id}"
        )
        try:
            await pump
        except asyncio.CancelledError:
            # Cancelled just as the pump failed: its error would reach no one.
            if pump.done() and not pump.cancelled() and (failed := pump.exception()):
                log.error("link pump for %s failed", link.peer.node_id, exc_info=failed)
            raise
        return ws

    async def _server_handshake(self, ws: _ServerWs) -> WebSocketLink:
        guard = ws._guard
        assert guard is not None
        raw_first = await _recv_handshake(ws)
        first = _unpack(raw_first, "hello")
        client_id, client_nonce = _node_id(first), _nonce(first)
        if client_id == self.node_id:
            if client_nonce in self._dial_nonces:
                self._self_dials.add(client_nonce)  # our own dial: proven (see connect)
            raise _HandshakeFailure(CLOSE_SELF, "a node cannot link to itself")
        server_nonce = auth.make_nonce()
        binding = auth.Binding(client_nonce, server_nonce, client_id, self.node_id)
        proof = auth.make_proof(self._secret, "server", binding)
        second = _pack("challenge", node_id=self.node_id, nonce=server_nonce, proof=proof)
        await ws.send_bytes(second)
        raw_third = await _recv_handshake(ws)
        third = _unpack(raw_third, "auth")
        client_proof = _field(third, "proof", bytes)
        if not auth.verify_proof(self._secret, "client", client_proof, binding):
            raise _HandshakeFailure(
                CLOSE_AUTH,
                "client could not prove the mesh secret (its mesh_secret differs from ours, "
                "or only one side has one)",
            )
        peer = decode_hello(third.get("hello"))
        if peer.node_id != client_id:
            raise _HandshakeFailure(CLOSE_PROTOCOL, "hello names another node than the handshake")
        # The client proved the secret and sends nothing more until our welcome: from here
        # on its messages may be as large as the link allows.
        guard.release()
        welcome = _pack("welcome", hello=_describe_self(self._hello))
        mac = None
        if self._secret is not None:
            transcript = auth.transcript_hash(raw_first, second, raw_third, welcome)
            keys = auth.link_keys(self._secret, binding, transcript)
            mac = auth.MessageAuth.for_role("server", keys)
        link = WebSocketLink(
            ws,
            peer,
            dialled_by_us=False,
            max_frame=self._max_frame,
            recv_buffer=self._recv_buffer,
            ready=False,
            mac=mac,
        )
        self._register(link)
        try:
            await link._send_first(welcome)
        except BaseException:
            self._unregister(link)
            raise
        return link

    # ------------------------------------------------------------------ client side

    def _check_url(self, url: str) -> URL:
        try:
            parsed = URL(url)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"not a URL: {url!r}") from exc
        if parsed.scheme not in ("ws", "wss") or not parsed.host:
            raise InvalidArgument(f"peer URL must be ws://host:port or wss://..., not {url!r}")
        if self._secret is None and not is_loopback(parsed.host):
            raise InvalidArgument(f"without a mesh secret only loopback peers, not {url!r}")
        if (
            parsed.scheme == "ws"
            and (self._ssl is not None or self._client_ssl is not None)
            and not is_loopback(parsed.host)
        ):
            # A node set up for TLS never links in the clear off this machine: a spoofed
            # advert (or a stale URL) must not downgrade it.
            raise InvalidArgument(f"this node uses TLS: not dialling a plaintext {url!r}")
        if parsed.path in ("", "/"):
            parsed = parsed.with_path(PATH)
        return parsed

    async def connect(self, url: str, *, node_id: str | None = None) -> WebSocketLink:
        """Dial ``url`` once; return the link when established.

        ``node_id``: the node expected there (say, from discovery); if the node that proves
        the secret at ``url`` is another one, the dial fails with ``AuthError`` before
        anything about this node is sent.

        If a link to that node exists (or the peer's simultaneous dial wins), returns that
        link instead. Raises ``AuthError``, ``ProtocolError``,
        ``PeerUnreachable``, ``InvalidArgument`` (bad URL, or this node itself),
        ``ClosedError`` (transport closed).
        """
        self._check_open()
        target = self._check_url(url)
        session = self._session
        assert session is not None
        try:
            async with asyncio.timeout(self._handshake_timeout):
                ws = await session.ws_connect(
                    target,
                    heartbeat=self._heartbeat,
                    max_msg_size=self._max_msg_size,  # after the handshake; the guard before
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self._close_timeout),
                    ssl=self._client_ssl if self._client_ssl is not None else True,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 403:
                raise AuthError(f"{url} refused us: {exc.message}") from exc
            raise PeerUnreachable(f"{url} is no subcog-crdt node: {exc.status}") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise AuthError(f"{url}: TLS certificate rejected: {exc}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._check_open()  # closed under the dial: that, not the peer, ended it
            raise PeerUnreachable(f"cannot reach {url}: {exc or type(exc).__name__}") from exc
        except Exception as exc:
            # aiohttp asserts when its session closes under a dial in the upgrade
            if self._state is not _State.OPEN:
                raise ClosedError("transport closed while dialling") from exc
            raise
        assert isinstance(ws, _ClientWs)
        peer_id: str | None = None
        try:
            try:
                if ws._guard is None:
                    log.error("aiohttp %s: cannot bound handshake messages", aiohttp.__version__)
                    raise _HandshakeFailure(CLOSE_HANDLER_ERROR, "handshake guard unavailable")
                async with asyncio.timeout(self._handshake_timeout):
                    link, peer_id = await self._client_handshake(ws, node_id)
            except TimeoutError:
                raise _HandshakeFailure(CLOSE_HANDSHAKE_TIMEOUT, "handshake timeout") from None
            except (ConnectionError, aiohttp.ClientError) as exc:
                # Cut (a peer that stopped answering pings, a reset): a dead peer.
                raise _HandshakeFailure(CLOSE_ABNORMAL, f"connection lost: {exc}") from None
        except _HandshakeFailure as failure:
            if not failure.remote:
                await ws.close(code=failure.code, message=_reason_bytes(failure.reason))
            if failure.code == CLOSE_DUPLICATE and failure.peer_id is not None:
                existing = await self._wait_link(failure.peer_id, self._handshake_timeout)
                if existing is not None:
                    return existing
            log.info("dialling %s failed: %s", url, failure)
            self._check_open()  # closed under the dial: that, not the peer, ended it
            raise _client_error(failure, url) from None
        except BaseException:
            await ws.close(code=CLOSE_GOING_AWAY, message=b"dial abandoned")
            raise
        if link is None:  # a link to that node exists already
            assert peer_id is not None
            existing = self._links.get(peer_id)
            if existing is not None:
                return existing
            raise PeerUnreachable(f"link to {peer_id} vanished")
        log.info("linked to %s at %s", link.peer.node_id, url)
        self._spawn(self._run_link(link), name=f"subcog-link-pump-{link.peer.node_id}")
        return link

    async def _client_handshake(
        self, ws: _ClientWs, expected_id: str | None
    ) -> tuple[WebSocketLink | None, str]:
        client_nonce = auth.make_nonce()
        # Our own server marks a hello carrying one of these nonces (``_self_dials``):
        # then, and only then, a close with 4011 proves we dialled ourselves.
        self._dial_nonces.add(client_nonce)
        try:
            return await self._client_handshake_with(ws, expected_id, client_nonce)
        except _HandshakeFailure as failure:
            failure.proven_self = failure.code == CLOSE_SELF and client_nonce in self._self_dials
            raise
        finally:
            self._dial_nonces.discard(client_nonce)
            self._self_dials.discard(client_nonce)

    async def _client_handshake_with(
        self, ws: _ClientWs, expected_id: str | None, client_nonce: bytes
    ) -> tuple[WebSocketLink | None, str]:
        guard = ws._guard
        assert guard is not None
        first = _pack("hello", node_id=self.node_id, nonce=client_nonce)
        await ws.send_bytes(first)
        raw_second = await _recv_handshake(ws)
        second = _unpack(raw_second, "challenge")
        server_id, server_nonce = _node_id(second), _nonce(second)
        server_proof = _field(second, "proof", bytes)
        binding = auth.Binding(client_nonce, server_nonce, self.node_id, server_id)
        if not auth.verify_proof(self._secret, "server", server_proof, binding):
            raise _HandshakeFailure(
                CLOSE_AUTH,
                "server could not prove the mesh secret (its mesh_secret differs from ours, "
                "or only one side has one)",
            )
        # After the proof: naming this node's id proves nothing by itself.
        if server_id == self.node_id:
            raise _HandshakeFailure(CLOSE_SELF, "a node cannot link to itself")
        if expected_id is not None and server_id != expected_id:
            raise _HandshakeFailure(
                CLOSE_AUTH, f"expected node {expected_id!r} there, found {server_id!r}"
            )
        # The server proved the secret; the welcome (still a handshake message, checked
        # against the handshake limit) is the last message before link frames, which the
        # server may send right behind it: those may be as large as the link allows.
        guard.release(after=1)
        transcript = (first, raw_second)
        existing = self._links.get(server_id)
        if existing is not None and not existing.closed:
            await ws.close(code=CLOSE_DUPLICATE, message=b"already linked")
            return None, server_id
        self._dialling[server_id] = self._dialling.get(server_id, 0) + 1
        try:
            return await self._client_finish(ws, server_id, binding, transcript), server_id
        except _HandshakeFailure as failure:
            failure.peer_id = server_id
            raise
        finally:
            self._dialling[server_id] -= 1
            if not self._dialling[server_id]:
                del self._dialling[server_id]

    async def _client_finish(
        self,
        ws: _ClientWs,
        server_id: str,
        binding: auth.Binding,
        transcript: tuple[bytes, bytes],
    ) -> WebSocketLink:
        """Handshake messages 3 and 4, while this dial counts as under way."""
        proof = auth.make_proof(self._secret, "client", binding)
        third = _pack("auth", proof=proof, hello=_describe_self(self._hello))
        try:
            await ws.send_bytes(third)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise _HandshakeFailure(CLOSE_ABNORMAL, f"peer went away: {exc}") from exc
        raw_fourth = await _recv_handshake(ws)
        fourth = _unpack(raw_fourth, "welcome")
        peer = decode_hello(fourth.get("hello"))
        if peer.node_id != server_id:
            raise _HandshakeFailure(CLOSE_PROTOCOL, "hello names another node")
        mac = None
        if self._secret is not None:
            digest = auth.transcript_hash(*transcript, third, raw_fourth)
            keys = auth.link_keys(self._secret, binding, digest)
            mac = auth.MessageAuth.for_role("client", keys)
        link = WebSocketLink(
            ws,
            peer,
            dialled_by_us=True,
            max_frame=self._max_frame,
            recv_buffer=self._recv_buffer,
            mac=mac,
        )
        self._register(link)
        return link

    # ------------------------------------------------------------------ redial

    def add_peer(self, url: str, *, node_id: str | None = None) -> None:
        """Keep a link to ``url``: dial now and redial (exponential backoff with jitter)
        after failures or disconnects, until ``remove_peer`` or close. ``node_id``: the
        node expected there (see ``connect``).

        Adding a url that is kept already changes nothing, unless the existing loop expects
        another node there (discovery found a new node at an old address): then that loop
        is replaced. A loop that expects no particular node accepts any node and stays;
        one that expects a node is replaced by one that expects none."""
        self._check_open()
        self._check_url(url)
        old = self._redialers.get(url)
        if old is not None and old.done():  # it gave up: adding the url again retries
            del self._redialers[url]
            old = None
        if old is not None:
            expected = self._redial_expects.get(old)
            if expected is None or expected == node_id:
                return
            log.info("%s: now expecting node %s there, not %s", url, node_id or "any", expected)
            self._stop_redialer(url)
        task = asyncio.create_task(self._keep_peer(url, node_id), name=f"subcog-redial-{url}")
        task.add_done_callback(self._task_done)  # logs an unexpected failure
        task.add_done_callback(self._forget_expected)
        self._redial_expects[task] = node_id
        self._redialers[url] = task

    def remove_peer(self, url: str) -> Coroutine[Any, Any, None]:
        """Stop keeping a link to ``url`` (an existing link stays open).

        The redial loop is stopped when this is called, so an ``add_peer`` right after
        it starts a new one; await the result to wait until the old loop has ended."""
        return self._redialer_ended(self._stop_redialer(url))

    def _forget_expected(self, task: asyncio.Task[None]) -> None:
        self._redial_expects.pop(task, None)
        self._dialled.discard(task)
        self._dial_done.set()

    def _first_dial_done(self) -> None:
        task = asyncio.current_task()
        if task is not None and task not in self._dialled:
            self._dialled.add(task)
            self._dial_done.set()

    async def first_dials(self) -> None:
        """Return once every kept peer (``add_peer``) has been dialled at least once,
        whether the dial made a link or failed."""
        while True:
            waiting = [
                t for t in self._redialers.values() if not t.done() and t not in self._dialled
            ]
            if not waiting:
                return
            self._dial_done.clear()
            await self._dial_done.wait()

    def _stop_redialer(self, url: str) -> asyncio.Task[None] | None:
        task = self._redialers.pop(url, None)
        if task is not None and not task.done():
            task.cancel()
            self._tasks.add(task)  # shutdown waits for its end; its done callback discards it
        return task

    @staticmethod
    async def _redialer_ended(task: asyncio.Task[None] | None) -> None:
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def _keep_peer(self, url: str, expected_id: str | None = None) -> None:
        delay = BACKOFF_START
        node_id: str | None = expected_id
        while self._state is _State.OPEN:
            link = self._links.get(node_id) if node_id is not None else None
            if link is None or link.closed:
                try:
                    try:
                        link = await self.connect(url, node_id=expected_id)
                    finally:
                        self._first_dial_done()  # before any backoff sleep below
                except ClosedError:
                    return
                except _SelfClaim as exc:
                    if exc.proven:
                        log.info("not redialling %s: it is this node", url)
                        return
                    # Anyone answering there can claim it: keep trying, slowly.
                    log.warning("peer %s: %s; retry in ~%.1fs", url, exc, delay)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, BACKOFF_CAP)
                    continue
                except InvalidArgument:
                    log.exception("not redialling %s", url)
                    return
                except SubcogError as exc:
                    level = logging.INFO if isinstance(exc, PeerUnreachable) else logging.WARNING
                    log.log(level, "peer %s: %s; retry in ~%.1fs", url, exc, delay)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, BACKOFF_CAP)
                    continue
                except Exception:
                    # Not one of ours (a library or OS error we do not map): still a failed
                    # dial, not a reason to stop keeping this peer.
                    log.exception("peer %s: unexpected error; retry in ~%.1fs", url, delay)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, BACKOFF_CAP)
                    continue
            node_id = link.peer.node_id
            # Linked (maybe by the peer's own dial, with no dial of ours): as good as a
            # first dial for whoever waits on first_dials.
            self._first_dial_done()
            await link.wait_closed()
            if time.monotonic() - link.opened_at >= STABLE_LINK:
                delay = BACKOFF_START
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, BACKOFF_CAP)
