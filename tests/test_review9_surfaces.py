"""Review 9: settle, HTTP push, /yjs/<namespace> and relay= (new surfaces).

Hand-made clients speak raw WebSocket frames on loopback so that a client that does not
read (its socket buffers full) can be made on purpose; a fake relay is an aiohttp server
in this process. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import WSMsgType, web
from pycrdt import Doc, Map

from helpers import url_of, wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._relay import room_name
from subcog_crdt._yjs import STEP1, STEP2, YjsClient, sync_message

LOOPBACK = {"host": "127.0.0.1", "discovery": ()}
BIG = 250_000  # characters of content per memory (MAX_CONTENT is 256 Ki)


def masked(payload: bytes, opcode: int = 0x2) -> bytes:
    """A client frame (clients must mask; a zero mask leaves the payload as it is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8)
    return head + b"\0\0\0\0" + payload


class NonReader:
    """A y-websocket client that sends but never reads (its receive buffer stays full)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, api: ConversationsApi, path: str) -> NonReader:
        host, port = url_of(api).removeprefix("ws://").rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, message: bytes) -> None:
        self.writer.write(masked(message))
        await self.writer.drain()

    def abort(self) -> None:
        self.writer.transport.abort()


async def big_namespace(api: ConversationsApi, ns: str = "d", n: int = 5) -> None:
    s = await api.register_session("writer", subscribe=[ns])
    for i in range(n):
        await s.capture(ns, f"{i} " + "y" * BIG)


def yjs_client_of(api: ConversationsApi, ns: str) -> YjsClient:
    clients = [c for c in api._yjs_rooms.get(ns, ()) if isinstance(c, YjsClient)]
    assert len(clients) == 1
    return clients[0]


# -- /yjs/<namespace> ------------------------------------------------------------------


async def test_node_shutdown_does_not_hang_on_a_yjs_client_that_does_not_read() -> None:
    """docs/push.md / yjs.md: closing the node ends open streams. A /yjs client whose
    socket is full makes ``end_clients`` (an on_shutdown hook, not bounded by the
    server's shutdown timeout) wait forever in ``ws.close()`` (it drains the socket)."""
    api = ConversationsApi(**LOOPBACK)
    await api.open()
    client: NonReader | None = None
    try:
        await big_namespace(api)
        client = await NonReader.open(api, "/yjs/d")
        for _ in range(20):  # ~25 MB of step 2s: more than the sockets hold
            await client.send(sync_message(STEP1, b"\x00"))
        yc = await wait_for(lambda: "d" in api._yjs_rooms and yjs_client_of(api, "d"), 10)
        await wait_for(lambda: len(yc._queue) > 0, 10, "the node's writer is blocked")
        hung = False
        try:
            async with asyncio.timeout(10):
                await api.aclose()
        except TimeoutError:
            hung = True
        assert not hung, "aclose() still waiting after 10 s (a /yjs client does not read)"
    finally:
        if client is not None:
            client.abort()  # unblocks a hung shutdown, so the node still closes
        await api.aclose()


async def test_a_yjs_client_that_does_not_read_is_disconnected() -> None:
    """docs/yjs.md: "A client that does not read what it is sent (64 MiB queued) is
    disconnected (code 1013)". YjsClient.send only sets ``closed``: the writer task is
    blocked in ``send_bytes`` and never gets to close, the reader loop goes on serving
    the client (its updates are still applied), and it stays in the room for good."""
    async with ConversationsApi(**LOOPBACK) as api:
        await big_namespace(api)
        client = await NonReader.open(api, "/yjs/d")
        try:
            for _ in range(60):  # ~75 MB asked for: past the 64 MiB bound
                await client.send(sync_message(STEP1, b"\x00"))
            yc = await wait_for(lambda: "d" in api._yjs_rooms and yjs_client_of(api, "d"), 10)
            await wait_for(lambda: yc.closed, 10, "the 64 MiB bound was reached")
            await wait_for(
                lambda: "d" not in api._yjs_rooms, 8, "the slow client to be disconnected"
            )
        finally:
            client.abort()


# -- relay= ----------------------------------------------------------------------------


@asynccontextmanager
async def fake_relay(
    first: dict[str, bytes] | None = None,
) -> AsyncIterator[tuple[str, list[str]]]:
    """A relay that accepts any room, sends ``first[room]`` (if any) and then nothing:
    yields its url and the log of what happened ("open /room", "closed /room")."""
    log: list[str] = []

    async def room(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        log.append("open " + request.path)
        if first and request.path.lstrip("/") in first:
            await ws.send_bytes(first[request.path.lstrip("/")])
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break
        log.append("closed " + request.path)
        return ws

    app = web.Application()
    app.router.add_get("/{room}", room)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"ws://127.0.0.1:{port}", log
    finally:
        await runner.cleanup()


@pytest.fixture
async def silent_relay() -> AsyncIterator[tuple[str, list[str]]]:
    async with fake_relay() as relay:
        yield relay


async def test_an_idle_relay_room_stays_connected(silent_relay: tuple[str, list[str]]) -> None:
    """_relay.py passes ``aiohttp.ClientWSTimeout(10)``, i.e. ws_receive=10: a room that
    hears nothing for 10 s (any idle room: the heartbeat pings every 15 s, y-websocket
    servers every 30 s) is torn down and redialled, again and again, each time with a
    full step 1 / step 2 exchange."""
    url, log = silent_relay
    async with ConversationsApi(listen=False, discovery=(), relay=url) as api:
        await wait_for(lambda: "open /subcog-directory" in log, 10, "the directory room")
        assert api._relays[0].connected == {""}
        with pytest.raises(AssertionError, match="timed out"):
            await wait_for(lambda: len(log) > 1, 13, "the room to drop")
        assert log == ["open /subcog-directory"]


async def test_a_relay_directory_naming_private_or_invalid_namespaces_joins_none_of_them() -> None:
    """docs/yjs.md: private namespaces and those outside sync_namespaces are never joined
    (a hostile relay's directory lists them, and an invalid name, and a valid one)."""
    directory: Doc[Map[bool]] = Doc()
    names = directory.get("namespaces", type=Map)
    for n in ("secret-notes", "Not A Namespace", "../etc", "shared-one", "unlisted"):
        names[n] = True
    listing = sync_message(STEP2, directory.get_update())
    async with (
        fake_relay({room_name(None, ""): listing}) as (url, log),
        ConversationsApi(
            listen=False,
            discovery=(),
            relay=url,
            private_namespaces=["secret-notes"],
            sync_namespaces=["shared-one", "secret-notes"],
        ) as api,
    ):
        want = "open /" + room_name(None, "shared-one")
        await wait_for(lambda: want in log, 10, "the listed shared namespace's room")
        opened = sorted(x for x in log if x.startswith("open "))
        assert opened == sorted([want, "open /" + room_name(None, "")])
        assert api._relays[0]._tasks.keys() == {"", "shared-one"}
        assert "secret-notes" not in api.namespaces()
