"""HTTP push: a local session's events over Server-Sent Events or a WebSocket, served by
the node's own aiohttp server (docs/push.md).

``GET /v1/sessions/{id}/events`` streams SSE (``id:`` is the event's cursor, so a client
that reconnects with ``Last-Event-ID`` resumes exactly where it stopped);
``GET /v1/sessions/{id}/ws`` sends the same events as JSON text messages. A resumed
stream replays the journal first, then goes live without a gap or a duplicate: the live
subscription opens before the replay, and live events at or below the last replayed
cursor are skipped. A subscriber that falls behind is refilled from the journal, so it
sees a ``lagged`` message only when the journal's retention dropped events.

Who may read: the same rules as peer links, because a session's events are the mesh's
data. Without a mesh secret, loopback clients that are not web pages (no ``Origin``
header); with one, whoever shows ``api.push_token`` (``Authorization: Bearer`` or
``?token=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from subcog_crdt._bus import Subscription
from subcog_crdt._core.events import Event, Lagged
from subcog_crdt._errors import ClosedError, SubcogError
from subcog_crdt._plain import event_plain, lagged_plain
from subcog_crdt._transport.websocket import is_loopback

if TYPE_CHECKING:
    from subcog_crdt._api import ConversationsApi
    from subcog_crdt._session import Session

__all__ = ["KEEPALIVE", "add_push_routes", "authorise", "error_response"]

log = logging.getLogger(__name__)

KEEPALIVE = 15.0
"""Seconds between SSE comments on an idle stream (proxies and clients drop silent ones)."""
_REPLAY_BATCH = 500

Send = Callable[[dict[str, Any], int | None], Awaitable[None]]
"""Sends one event (JSON view, cursor) to the client; an empty dict is a keepalive."""
Serve = Callable[[web.Request, "_Pump"], Awaitable[web.StreamResponse]]


def add_push_routes(app: web.Application, api: ConversationsApi) -> None:
    streams: set[Subscription] = set()
    """The open pumps' event streams: stopping the server ends them (it waits for open
    handlers when it stops)."""

    def route(serve: Serve) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            authorise(api, request)
            session_id = request.match_info["session_id"]
            try:
                session = api.sessions.local(session_id)
            except SubcogError:
                raise error_response(
                    web.HTTPNotFound, f"no session {session_id!r} on this node"
                ) from None
            since = _since(request)
            include_own = request.query.get("include_own", "false").lower() in ("1", "true", "yes")
            return await serve(request, _Pump(session, since, include_own, streams))

        return handle

    async def end_streams(_app: web.Application) -> None:
        for stream in list(streams):
            stream.close()

    app.router.add_get("/v1/sessions/{session_id}/events", route(_serve_sse))
    app.router.add_get("/v1/sessions/{session_id}/ws", route(_serve_ws))
    app.on_shutdown.append(end_streams)


def error_response(cls: type[web.HTTPException], message: str) -> web.HTTPException:
    """An HTTP error with a JSON body ``{"error": message}``."""
    return cls(text=json.dumps({"error": message}), content_type="application/json")


def authorise(api: ConversationsApi, request: web.Request) -> None:
    """Raise the HTTP error that refuses ``request``, if it is refused (docs/push.md,
    "Who may connect"): the rules of peer links, since what these endpoints serve is the
    mesh's data."""
    token = api.push_token
    if token is None:
        if "Origin" in request.headers:
            # Browsers let any site request 127.0.0.1 (and send Origin): without a token
            # to prove otherwise, a page must not read the mesh's memories.
            log.warning("refused %s: a browser page (Origin header)", request.remote)
            raise error_response(web.HTTPForbidden, "not for browsers (Origin header)")
        if not is_loopback(request.remote):
            log.warning("refused %s: loopback only without a secret", request.remote)
            raise error_response(web.HTTPForbidden, "loopback only without a mesh secret")
        return
    # A header, or ?token= for clients that cannot set headers (browsers' WebSocket and
    # EventSource, y-websocket's ``params``).
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not scheme:
        scheme, given = "bearer", request.query.get("token", "")
    # Bytes: compare_digest refuses str with non-ASCII characters (a hostile header).
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, token.encode()):
        log.warning("refused %s: no valid token", request.remote)
        raise error_response(
            web.HTTPUnauthorized, "Authorization: Bearer <api.push_token> required"
        )


def _since(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("since")
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise error_response(
            web.HTTPBadRequest, f"a cursor is a non-negative integer, not {raw[:40]!r}"
        )
    return int(raw)


class _Pump:
    """One client's stream of a session's events."""

    def __init__(
        self, session: Session, since: int | None, include_own: bool, streams: set[Subscription]
    ) -> None:
        self.session = session
        self.since = since
        self.include_own = include_own
        self.streams = streams

    async def run(self, send: Send) -> None:
        """Replay from ``since`` (if given), then forward live events until the stream
        ends (session unregistered, node closing) or ``send`` fails (the client left)."""
        with contextlib.suppress(ClosedError, ConnectionResetError):
            await self._run(send)

    async def _run(self, send: Send) -> None:
        session, include_own = self.session, self.include_own
        stream = session.events(include_own=include_own)  # before the replay: no gap
        self.streams.add(stream)
        try:
            last = -1
            if self.since is not None:
                last = await _replay(session, self.since, include_own, send)
            while True:
                try:
                    item = await stream.next(timeout=KEEPALIVE)
                except TimeoutError:
                    await send({}, None)  # keepalive
                    continue
                except StopAsyncIteration:
                    return
                if isinstance(item, Lagged):
                    # Refill what the queue dropped from the journal.
                    last = await _replay(session, max(last, item.cursor), include_own, send)
                    continue
                if item.cursor <= last:
                    continue  # replayed already
                last = item.cursor
                await send(event_plain(item), item.cursor)
        finally:
            stream.close()
            self.streams.discard(stream)


async def _replay(session: Session, after: int, include_own: bool, send: Send) -> int:
    """Send the journal's events after cursor ``after``; return the cursor reached."""
    while True:
        try:
            batch = await session.sync(since=after, include_own=include_own, limit=_REPLAY_BATCH)
        except ClosedError:
            raise
        except SubcogError as exc:  # a cursor ahead of this node's
            await send({"type": "error", "error": str(exc)}, None)
            raise ClosedError(str(exc)) from exc
        if not batch.complete:
            await send(lagged_plain(Lagged(cursor=after, dropped=0)), None)
        ev: Event
        for ev in batch.events:
            await send(event_plain(ev), ev.cursor)
        after = batch.cursor
        if not batch.more:
            return after


async def _serve_sse(request: web.Request, pump: _Pump) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)

    async def send(payload: dict[str, Any], cursor: int | None) -> None:
        if not payload:
            await resp.write(b": keepalive\n\n")
            return
        head = f"id: {cursor}\n" if cursor is not None else ""
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        await resp.write(f"{head}event: {payload['type']}\ndata: {body}\n\n".encode())

    await pump.run(send)
    return resp


async def _serve_ws(request: web.Request, pump: _Pump) -> web.StreamResponse:
    ws = web.WebSocketResponse(heartbeat=KEEPALIVE, max_msg_size=4096)
    await ws.prepare(request)

    async def send(payload: dict[str, Any], cursor: int | None) -> None:
        if payload:
            await ws.send_str(json.dumps(payload, separators=(",", ":"), ensure_ascii=False))

    async def read_until_closed() -> None:
        # The client sends nothing; reading notices its close (and answers pings).
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                return

    reader = asyncio.ensure_future(read_until_closed())
    pumping = asyncio.ensure_future(pump.run(send))
    try:
        await asyncio.wait([reader, pumping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (reader, pumping):
            t.cancel()
        await asyncio.gather(reader, pumping, return_exceptions=True)
        await ws.close()
    return ws
