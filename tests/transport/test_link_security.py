"""Link security over real sockets on 127.0.0.1: what a relay without the secret can no
longer do (inject, replay, drop, alter the handshake), and what an unauthenticated peer can
make a node buffer (one handshake message of at most HANDSHAKE_MAX_FRAME bytes, checked
from its frame header; at most MAX_HANDSHAKES connections in the handshake at once).

Every wait has a deadline; nothing sleeps to synchronise; every socket and task started
here is closed before the test ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgpack
import pytest

from helpers import wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._errors import AuthError, ProtocolError
from subcog_crdt._transport import auth
from subcog_crdt._transport.base import PROTOCOL_VERSION, Hello, Link
from subcog_crdt._transport.websocket import (
    CLOSE_MAC,
    CLOSE_PROTOCOL,
    CLOSE_TOO_LARGE,
    HANDSHAKE_MAX_FRAME,
    PATH,
    WebSocketLink,
    WebSocketTransport,
    _HandshakeGuard,
)
from support.linkrec import Recorder, make
from support.wsframes import read_frame

DEADLINE = 10.0
SECRET = b"mesh secret the relay does not know"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def ended(link: WebSocketLink) -> int | None:
    async with asyncio.timeout(DEADLINE):
        await link.wait_closed()
    return link.close_code


# --------------------------------------------------------------------------- raw frames


def frame_header(size: int, *, opcode: int = 0x2, fin: bool = True, masked: bool) -> bytes:
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if size < 126:
        head = bytes([first, bit | size])
    elif size < 65536:
        head = bytes([first, bit | 126]) + struct.pack(">H", size)
    else:
        head = bytes([first, bit | 127]) + struct.pack(">Q", size)
    return head + (b"\0\0\0\0" if masked else b"")  # zero mask key: payload as is


def client_frame(payload: bytes) -> bytes:
    return frame_header(len(payload), masked=True) + payload


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def close_code_from(reader: asyncio.StreamReader) -> int | None:
    """Read frames until a close frame; its code (None if the connection just ended)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            try:
                _raw, opcode, _fin, payload = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if opcode == 0x8:
                return int.from_bytes(payload[:2]) if len(payload) >= 2 else None


@asynccontextmanager
async def raw_socket(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --------------------------------------------------------------------------- the relay

Attack = Callable[[int, bytes, bytes], list[bytes]]
"""(number of the client's data frame, raw frame, payload) -> raw frames to forward."""


@asynccontextmanager
async def relay(target_port: int, attack: Attack) -> AsyncIterator[str]:
    """A byte relay on 127.0.0.1 that knows no secret: it forwards the HTTP upgrade and
    every frame verbatim both ways, except that the client's data frames pass ``attack``."""
    writers: list[asyncio.StreamWriter] = []
    tasks: set[asyncio.Task[Any]] = set()

    async def client_to_server(cr: asyncio.StreamReader, sw: asyncio.StreamWriter) -> None:
        count = 0
        while True:
            raw, opcode, _fin, payload = await read_frame(cr)
            out = [raw]
            if opcode in (0x0, 0x1, 0x2):
                count += 1
                out = attack(count, raw, payload)
            for data in out:
                sw.write(data)
            await sw.drain()

    async def server_to_client(sr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        while data := await sr.read(65536):
            cw.write(data)
            await cw.drain()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        writers.append(cw)
        sr, sw = await asyncio.open_connection("127.0.0.1", target_port)
        writers.append(sw)
        try:
            sw.write(await cr.readuntil(b"\r\n\r\n"))
            cw.write(await sr.readuntil(b"\r\n\r\n"))
            await asyncio.gather(client_to_server(cr, sw), server_to_client(sr, cw))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            sw.close()
            cw.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for w in writers:
            w.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def inject(count: int, raw: bytes, payload: bytes) -> list[bytes]:
    # after the two handshake messages (hello, auth), a forged frame before the real one
    return [client_frame(b"forged by the relay"), raw] if count == 3 else [raw]


def replay(count: int, raw: bytes, payload: bytes) -> list[bytes]:
    return [raw, raw] if count == 3 else [raw]


def drop(count: int, raw: bytes, payload: bytes) -> list[bytes]:
    return [] if count == 3 else [raw]


_held: list[bytes] = []


def reorder(count: int, raw: bytes, payload: bytes) -> list[bytes]:
    if count == 3:
        _held[:] = [raw]
        return []
    if count == 4:
        return [raw, *_held]
    return [raw]


def tamper_hello(count: int, raw: bytes, payload: bytes) -> list[bytes]:
    if count != 2:
        return [raw]
    auth_msg = msgpack.unpackb(payload)
    auth_msg["hello"]["url"] = "ws://127.0.0.1:9/attacker"
    return [client_frame(msgpack.packb(auth_msg, use_bin_type=True))]


@pytest.mark.parametrize("attack", [inject, replay, drop, reorder, tamper_hello])
async def test_relay_without_secret_cannot_inject_replay_drop_or_reorder(attack: Attack) -> None:
    """The relay forwards a valid handshake (both proofs verify), then tampers with the
    dialler's frames: the server hands none of the tampered stream over and closes the
    link with 4012; the dialler sees 4012 too."""
    ra, rb = Recorder(), Recorder()
    async with (
        make("a", ra, secret=SECRET) as a,
        make("b", rb, secret=SECRET) as b,
        relay(b.port, attack) as url,
    ):
        la = await a.connect(url)
        lb = await rb.next_link()
        assert lb.peer.node_id == "a"
        await la.send(b"one")
        await la.send(b"two")
        assert await ended(lb) == CLOSE_MAC
        assert await ended(la) == CLOSE_MAC
        if attack is replay:
            assert rb.frames == [b"one"]  # authenticated before the replayed copy
        else:
            assert rb.frames == []
        assert b"forged by the relay" not in rb.frames
        assert "a" not in b.links


async def test_untampered_relay_is_transparent() -> None:
    """The relay itself is no fault: forwarding verbatim, frames flow both ways."""
    ra, rb = Recorder(), Recorder()
    async with (
        make("a", ra, secret=SECRET) as a,
        make("b", rb, secret=SECRET) as b,
        relay(b.port, lambda _n, raw, _p: [raw]) as url,
    ):
        la = await a.connect(url)
        lb = await rb.next_link()
        for i in range(50):
            await la.send(b"to b %d" % i)
            await lb.send(b"to a %d" % i)
        await wait_for(lambda: len(rb.frames) == 50 and len(ra.frames) == 50, DEADLINE)
        assert rb.frames == [b"to b %d" % i for i in range(50)]
        assert ra.frames == [b"to a %d" % i for i in range(50)]
        assert not la.closed
        assert not lb.closed


async def test_relay_cannot_inject_a_memory_between_nodes() -> None:
    """End to end (the reviewer's case): N dials a relay that forwards to S and injects a
    real Yjs update made by a node without the secret; neither node ever holds it."""
    async with (
        ConversationsApi(host="127.0.0.1", discovery=(), mesh_secret=SECRET.decode()) as s,
        ConversationsApi(host="127.0.0.1", discovery=(), mesh_secret=SECRET.decode()) as n,
        ConversationsApi(host="127.0.0.1", discovery=()) as forger,
    ):
        await (await s.register_session("s1", subscribe=["plans"])).capture("plans", "real")
        fs = await forger.register_session("intruder", subscribe=["plans"])
        await fs.capture("plans", "INJECTED by a node without the secret")
        forged = msgpack.packb([3, "plans", n.node_id, forger._docs["plans"].diff()])
        injected = asyncio.Event()

        def attack(count: int, raw: bytes, payload: bytes) -> list[bytes]:
            if count == 3:
                injected.set()
                return [raw, client_frame(forged)]
            return [raw]

        assert s.url is not None
        async with relay(int(s.url.rsplit(":", 1)[1]), attack) as url:
            link = await n._transport.connect(url)  # type: ignore[union-attr]
            assert await ended(link) == CLOSE_MAC
            assert injected.is_set()
            for node in (s, n):
                contents = {m.content for m in node.memories("plans")}
                assert "INJECTED by a node without the secret" not in contents
            await n._transport.remove_peer(url)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- unit level


def test_message_auth_roundtrip_and_sequence() -> None:
    binding = auth.Binding(b"c" * 32, b"s" * 32, "client-node", "server-node")
    keys = auth.link_keys(SECRET, binding, auth.transcript_hash(b"1", b"2", b"3", b"4"))
    assert keys[0] != keys[1]
    client = auth.MessageAuth.for_role("client", keys)
    server = auth.MessageAuth.for_role("server", keys)
    big = os.urandom(100_000)  # the incremental path
    plain = (b"", b"a", big)
    sealed = [client.seal(m) for m in plain]
    assert [len(x) for x in sealed] == [len(m) + auth.TAG_SIZE for m in plain]
    # tag = HMAC-SHA256(key, seq as 8 bytes || message)[:16], whichever path computed it
    expected = hmac.new(keys[0], (2).to_bytes(8, "big") + big, hashlib.sha256).digest()[:16]
    assert sealed[2][-auth.TAG_SIZE :] == expected
    assert server.open(sealed[1]) is None  # out of order: seq 0 expected
    fresh = auth.MessageAuth.for_role("server", keys)
    assert [fresh.open(x) for x in sealed] == [b"", b"a", big]
    assert fresh.open(sealed[2]) is None  # replay
    # reflection: the client cannot open what it sealed itself (direction keys differ)
    assert auth.MessageAuth.for_role("client", keys).open(client.seal(b"x")) is None
    # another transcript (a changed handshake message) gives other keys
    other = auth.link_keys(SECRET, binding, auth.transcript_hash(b"1", b"2", b"3!", b"4"))
    assert set(other).isdisjoint(keys)
    assert auth.MessageAuth.for_role("server", keys).open(b"short") is None


async def test_max_frame_message_fits_with_its_tag_and_big_first_frames_pass() -> None:
    """The tag never pushes a max_frame frame over the peer's limit; a frame far over the
    handshake limit sent right behind the welcome is accepted (the guard is released)."""
    rb = Recorder()
    big = os.urandom(HANDSHAKE_MAX_FRAME * 4)

    async def eager(link: Link) -> None:
        await link.send(big)  # the server's first frame follows its welcome at once
        async for _frame in link:
            pass

    a_rec = Recorder()
    async with (
        make("a", a_rec, secret=SECRET, max_frame=len(big)) as a,
        WebSocketTransport(
            node_id="b",
            hello=lambda: Hello(node_id="b", url=None),
            on_link=eager,
            secret=SECRET,
            host="127.0.0.1",
            max_frame=len(big),
        ) as b,
        make("c", rb, secret=SECRET, max_frame=len(big)) as c,
    ):
        la = await a.connect(b.url)
        assert la._ws._guard is not None  # type: ignore[union-attr]
        await wait_for(lambda: a_rec.frames == [big], DEADLINE, "big first frame")
        lc = await a.connect(c.url)
        await lc.send(big)
        await wait_for(lambda: rb.frames == [big], DEADLINE, "max_frame frame")
        assert not lc.closed


async def test_dialler_checks_the_node_it_expected() -> None:
    rb = Recorder()
    async with make("a", Recorder(), secret=SECRET) as a, make("b", rb, secret=SECRET) as b:
        with pytest.raises(AuthError, match="expected node"):
            await a.connect(b.url, node_id="someone-else")
        assert a.links == {}
        assert rb.links.empty()
        link = await a.connect(b.url, node_id="b")
        assert link.peer.node_id == "b"


# --------------------------------------------------------------------------- pre-auth bounds


@pytest.mark.parametrize("secret", [SECRET, None])
@pytest.mark.parametrize("after_hello", [False, True])
async def test_oversized_handshake_message_refused_from_its_header(
    secret: bytes | None, after_hello: bool
) -> None:
    """An unauthenticated client announces a 16 MiB handshake message (first fragment,
    FIN=0) and sends only 1 KiB of it: the node closes with 4009 right away, so it never
    holds more than those bytes (before the fix it buffered until the handshake timeout)."""
    rec = Recorder()
    async with (
        make("srv", rec, secret=secret, handshake_timeout=DEADLINE / 2) as srv,
        raw_socket(srv.port) as (reader, writer),
    ):
        writer.write(upgrade_request(srv.port))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert b" 101 " in head
        if after_hello:
            hello = {
                "t": "hello",
                "v": PROTOCOL_VERSION,
                "node_id": "x",
                "nonce": auth.make_nonce(),
            }
            writer.write(client_frame(msgpack.packb(hello, use_bin_type=True)))
            _raw, opcode, _fin, _payload = await asyncio.wait_for(read_frame(reader), DEADLINE)
            assert opcode == 0x2  # the challenge
        writer.write(frame_header(16 * 1024 * 1024 - 64 * 1024, fin=False, masked=True))
        writer.write(b"\0" * 1024)
        await writer.drain()
        assert await close_code_from(reader) == CLOSE_TOO_LARGE
    assert rec.links.empty()


class FakeReader:
    def __init__(self) -> None:
        self.fed = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.fed += data
        return False, b""

    def feed_eof(self) -> None:
        pass


class FakeQueue:
    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def set_exception(self, exc: BaseException) -> None:
        self.errors.append(exc)


def guard_run(
    stream: bytes, *, split: int, release_after: int | None = None, limit: int = 100
) -> tuple[_HandshakeGuard, FakeReader, FakeQueue]:
    """Feed ``stream`` in pieces of ``split`` bytes (headers cut anywhere)."""
    reader, queue = FakeReader(), FakeQueue()
    guard = _HandshakeGuard(reader, queue, limit=limit, messages=2)
    if release_after is not None:
        guard.release(after=release_after)
    for i in range(0, len(stream), split):
        if guard.feed_data(stream[i : i + split])[0]:
            break
    return guard, reader, queue


@pytest.mark.parametrize("split", [1, 2, 3, 7, 1000])
def test_handshake_guard_reads_headers_across_chunks(split: int) -> None:
    ping = frame_header(4, opcode=0x9, masked=True) + b"ping"
    ok = (
        client_frame(b"h" * 100)  # at the limit
        + frame_header(60, fin=False, masked=True)
        + b"a" * 60
        + ping  # control frames may sit between fragments
        + frame_header(40, opcode=0x0, masked=True)
        + b"b" * 40
    )
    guard, reader, queue = guard_run(ok, split=split)
    assert bytes(reader.fed) == ok
    assert queue.errors == []
    # a third message before release: refused, and that chunk never reaches the reader
    guard, reader, queue = guard_run(ok + client_frame(b"x"), split=split)
    assert [e.code for e in queue.errors] == [CLOSE_PROTOCOL]  # type: ignore[attr-defined]
    assert len(reader.fed) < len(ok) + 6  # at most part of the refused frame's header
    # fragments summing over the limit: refused from the header of the fragment that
    # crosses it, none of whose payload is fed
    over = frame_header(60, fin=False, masked=True) + b"a" * 60
    over += frame_header(41, opcode=0x0, masked=True) + b"b" * 41
    guard, reader, queue = guard_run(over, split=split)
    assert [e.code for e in queue.errors] == [CLOSE_TOO_LARGE]  # type: ignore[attr-defined]
    assert b"b" not in reader.fed
    # released after the second message: what follows it is not limited any more
    big = client_frame(b"y" * 1000)
    guard, reader, queue = guard_run(ok + big, split=split, release_after=2)
    assert queue.errors == []
    assert guard.released
    assert bytes(reader.fed) == ok + big


async def test_dialler_refuses_an_oversized_handshake_message_from_the_server() -> None:
    """A hostile server answers the upgrade, then announces a 16 MiB first message: the
    dialler closes with 4009 from the header and raises, holding none of it."""
    closes: list[int | None] = []

    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            key = next(
                line.split(b":", 1)[1].strip()
                for line in request.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            writer.write(frame_header(16 * 1024 * 1024 - 64 * 1024, masked=False))
            writer.write(b"\0" * 1024)
            await writer.drain()
            closes.append(await close_code_from(reader))
        finally:
            writer.close()

    server = await asyncio.start_server(hostile, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with make("a", Recorder(), secret=SECRET, handshake_timeout=DEADLINE / 2) as a:
            with pytest.raises(ProtocolError, match="4009"):
                await a.connect(f"ws://127.0.0.1:{port}")
            await wait_for(lambda: closes, DEADLINE, "the dialler's close frame")
            assert closes == [CLOSE_TOO_LARGE]
    finally:
        server.close()
        await server.wait_closed()


async def test_unauthenticated_connections_are_capped_and_refused_with_503() -> None:
    """64 connections that never authenticate fill the node's handshake slots; the 65th
    is refused at once with HTTP 503; once they go, real peers link again."""
    rec = Recorder()
    async with (
        make("srv", rec, secret=SECRET, handshake_timeout=DEADLINE * 3) as srv,
        make("peer", Recorder(), secret=SECRET) as peer,
        aiohttp.ClientSession() as session,
    ):
        idle = []
        try:
            for _ in range(64):
                idle.append(await session.ws_connect(srv.url + PATH))
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(srv.url + PATH)
            assert refused.value.status == 503
            with pytest.raises(Exception, match="503"):
                await peer.connect(srv.url)
        finally:
            for ws in idle:
                await ws.close()
        # the slots free as those connections end
        await wait_for(lambda: srv._unauthenticated == 0, DEADLINE, "handshake slots freed")
        link = await peer.connect(srv.url)
        assert link.peer.node_id == "srv"
