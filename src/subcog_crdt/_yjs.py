"""``/yjs/<namespace>``: the standard y-websocket protocol on the node's own server, so a
stock Yjs client (``y-websocket``'s ``WebsocketProvider``) edits a namespace's document
directly (docs/yjs.md; the document layout: docs/schema.md).

Messages (y-protocols): ``varuint type``, then for sync (0) ``varuint step`` and a byte
string: step 1 (a state vector: answered with step 2, what the client misses), step 2 or
update (applied like a peer's update: checked, stored, turned into events, sent on to
peers and to the room's other clients). Awareness (1) is relayed to every client of the
room, the sender included (the standard client closes a socket that hears nothing for
30 s, and keeps its own awareness fresh every 15 s). Other types are ignored, as the
reference server does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import WSMsgType, web

from subcog_crdt._core.schema import check_namespace
from subcog_crdt._core.ydecode import ByteReader, UpdateDecodeError, varuint_bytes
from subcog_crdt._errors import ClosedError, InvalidNamespace, ProtocolError, SubcogError
from subcog_crdt._push import authorise, error_response

if TYPE_CHECKING:
    from subcog_crdt._api import ConversationsApi

__all__ = ["UpdateSink", "YjsClient", "add_yjs_routes", "handle_message", "sync_message"]

log = logging.getLogger(__name__)

MSG_SYNC, MSG_AWARENESS = 0, 1
STEP1, STEP2, UPDATE = 0, 1, 2
_EMPTY_SV = b"\x00"
_EMPTY_UPDATE = b"\x00\x00"
_QUEUE_BYTES = 64 << 20
"""Past this much unsent to one client, it is disconnected (it reconnects and resyncs)."""
_CLOSE_WITHIN = 2.0
"""Seconds a closing handshake may take before the connection is cut (a client that
does not read never lets it finish)."""


def sync_message(step: int, payload: bytes) -> bytes:
    return bytes((MSG_SYNC, step)) + varuint_bytes(len(payload)) + payload


class UpdateSink(Protocol):
    """Where the node sends a namespace's changes: a Yjs client, a relay room."""

    def send_update(self, update: bytes) -> None: ...


class _WebSocket(Protocol):
    async def send_bytes(self, data: bytes) -> None: ...


class YjsClient:
    """One y-websocket connection (a client of ``/yjs/<ns>``, or this node's own
    connection to a relay room): what the node sends goes through a bounded queue, sent
    by a writer task (``start``). ``abort`` cuts the connection at once: it is called
    when the other side stops reading (nothing then could close it politely)."""

    def __init__(
        self,
        ws: _WebSocket,
        namespace: str,
        abort: Callable[[], None],
        close: Callable[[int, bytes], Awaitable[object]] | None = None,
    ) -> None:
        self.ws = ws
        self.namespace = namespace
        self._abort = abort
        self._close = close
        """A closing handshake that does not wait for the socket to drain (None: none)."""
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.closed = False

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write())

    async def stop(self) -> None:
        """Stop the writer (what is queued is dropped)."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)

    @property
    def writer_failed(self) -> bool:
        return self._writer is not None and self._writer.done()

    def send(self, message: bytes) -> None:
        if self.closed:
            return
        if self._queued + len(message) > _QUEUE_BYTES:
            log.warning("yjs: cutting a connection for %r: it does not read", self.namespace)
            self.cut()
            return
        self._queue.append(message)
        self._queued += len(message)
        self._wake.set()

    def send_update(self, update: bytes) -> None:
        self.send(sync_message(UPDATE, update))

    def cut(self) -> None:
        """Drop the connection now, whatever the other side does."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._queued = 0
        if self._writer is not None:
            self._writer.cancel()
        self._abort()

    async def close(self, code: int, reason: bytes) -> None:
        """A closing handshake if the other side takes part within ``_CLOSE_WITHIN``
        seconds, else ``cut``."""
        await self.stop()
        if self.closed:
            return
        try:
            if self._close is not None:
                async with asyncio.timeout(_CLOSE_WITHIN):
                    await self._close(code, reason)
        except TimeoutError:
            pass
        finally:
            self.cut()  # whatever is left of the connection goes now

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                message = self._queue.popleft()
                self._queued -= len(message)
                await self.ws.send_bytes(message)


def add_yjs_routes(app: web.Application, api: ConversationsApi) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        authorise(api, request)
        try:
            ns = check_namespace(request.match_info["namespace"])
        except InvalidNamespace as exc:
            raise error_response(web.HTTPBadRequest, str(exc)) from None
        if not api._may_share(ns):
            raise error_response(web.HTTPForbidden, f"namespace {ns!r} is not shared")
        return await _serve(request, api, ns)

    async def end_clients(_app: web.Application) -> None:
        clients = [c for room in api._yjs_rooms.values() for c in room]
        await asyncio.gather(
            *(c.close(1001, b"node closing") for c in clients if isinstance(c, YjsClient))
        )

    app.router.add_get("/yjs/{namespace}", handle)
    app.on_shutdown.append(end_clients)


async def _serve(request: web.Request, api: ConversationsApi, ns: str) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=api._max_frame, heartbeat=15.0)
    await ws.prepare(request)

    def abort() -> None:
        if request.transport is not None:
            request.transport.abort()

    def close(code: int, reason: bytes) -> Awaitable[bool]:
        # Not drained: a client that does not read would hold the close forever.
        return ws.close(code=code, message=reason, drain=False)

    client = YjsClient(ws, ns, abort, close)
    room: set[UpdateSink] = api._yjs_rooms.setdefault(ns, set())
    room.add(client)
    client.start()
    try:
        doc = api._docs.get(ns)
        client.send(sync_message(STEP1, _EMPTY_SV if doc is None else doc.state_vector()))
        async for msg in ws:
            if msg.type is not WSMsgType.BINARY:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
                continue  # text: not part of the protocol; ignored like unknown types
            if client.closed:
                break  # cut (it does not read): nothing it sends counts any more
            try:
                await handle_message(api, client, msg.data, room)
            except ProtocolError as exc:
                log.warning("yjs: closing a client of %r: %s", ns, exc)
                await client.close(4000, str(exc)[:120].encode())
                break
            if client.writer_failed:
                break  # the connection failed under the writer
    except ClosedError:
        await client.close(1001, b"node closing")
    finally:
        room.discard(client)
        if not room and api._yjs_rooms.get(ns) is room:
            del api._yjs_rooms[ns]
        await client.stop()
    return ws


async def handle_message(
    api: ConversationsApi, client: YjsClient, data: bytes, room: set[Any] | None
) -> None:
    """One y-websocket message from ``client`` about its namespace; awareness is relayed
    to ``room``'s clients (None: ignored, on this node's relay connections)."""
    r = ByteReader(data)
    try:
        kind = r.varuint()
        if kind == MSG_AWARENESS:
            r.raw(r.varuint())  # well-formed: relayed as it came
            for other in room or ():
                if isinstance(other, YjsClient):
                    other.send(data)
            return
        if kind != MSG_SYNC:
            return
        step = r.varuint()
        payload = r.raw(r.varuint())
    except UpdateDecodeError as exc:
        raise ProtocolError(f"malformed message: {exc}") from exc
    ns = client.namespace
    if step == STEP1:
        doc = api._docs.get(ns)
        if doc is None:
            client.send(sync_message(STEP2, _EMPTY_UPDATE))
            return
        try:
            diff = doc.diff(payload)
        except Exception as exc:  # pycrdt refuses a malformed state vector
            raise ProtocolError(f"invalid state vector: {exc}") from exc
        client.send(sync_message(STEP2, diff))
    elif step in (STEP2, UPDATE):
        try:
            await api._apply_from_client(ns, payload, client)
        except ProtocolError:
            raise
        except SubcogError as exc:
            raise ProtocolError(str(exc)) from exc
    else:
        raise ProtocolError(f"unknown sync step {step}")
