"""Adversarial review of peer authentication and message protection (review 8).

The attacker does not know the mesh secret. It runs raw TCP / aiohttp clients and
servers on 127.0.0.1, relays that parse every frame both ways, and a "browser" client
(a WebSocket carrying an ``Origin`` header, as every browser sends). Nothing here starts
zeroconf: mDNS adverts are read in-process with zeroconf's network classes replaced.

Every wait has a deadline and ends on its condition; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import WSMsgType, web
from yarl import URL
from zeroconf.asyncio import AsyncServiceInfo

from helpers import wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._discovery import mdns
from subcog_crdt._discovery.base import Advert, mesh_tag
from subcog_crdt._errors import AuthError, SubcogError
from subcog_crdt._transport import auth
from subcog_crdt._transport.base import PROTOCOL_VERSION
from subcog_crdt._transport.websocket import (
    CLOSE_AUTH,
    CLOSE_MAC,
    CLOSE_SELF,
    PATH,
    WebSocketLink,
)
from support.linkrec import Recorder, make
from support.wsframes import read_frame

DEADLINE = 10.0
SECRET = b"a mesh secret the attacker does not know"
MARKER = "CONFIDENTIAL-MEMORY-7f3a"
NAMESPACE = "acquisitions"
SESSION = "victim-session-42"
USER = "victim-user"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def pack(kind: str, **fields: Any) -> bytes:
    data: bytes = msgpack.packb({"t": kind, "v": PROTOCOL_VERSION, **fields}, use_bin_type=True)
    return data


async def ended(link: WebSocketLink) -> int | None:
    async with asyncio.timeout(DEADLINE):
        await link.wait_closed()
    return link.close_code


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read until the server closes; the close code it sent."""
    async with asyncio.timeout(DEADLINE):
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
                return ws.close_code


@asynccontextmanager
async def victim_node(tmp_path: Path, secret: bytes | None) -> AsyncIterator[ConversationsApi]:
    """A durable node holding a memory, a session and a namespace an attacker wants."""
    async with ConversationsApi(
        data_dir=tmp_path / "victim",
        user_id=USER,
        mesh_secret=secret,
        host="127.0.0.1",
        discovery=(),
    ) as api:
        session = await api.register_session(SESSION, subscribe=[NAMESPACE])
        await session.capture(NAMESPACE, MARKER)
        yield api


def leaked(data: bytes) -> list[str]:
    """Which of the victim's private strings appear in ``data``."""
    return [s for s in (MARKER, NAMESPACE, SESSION, USER) if s.encode() in data]


# --------------------------------------------------------------------------- raw frames


def frame(payload: bytes, *, masked: bool, opcode: int = 0x2) -> bytes:
    bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, bit | size])
    elif size < 65536:
        head = bytes([0x80 | opcode, bit | 126]) + struct.pack(">H", size)
    else:
        head = bytes([0x80 | opcode, bit | 127]) + struct.pack(">Q", size)
    return head + (b"\0\0\0\0" if masked else b"") + payload  # zero mask: payload as is


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def upgrade_response(request: bytes) -> bytes:
    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


# --------------------------------------------------------------------------- a frame relay

ServerHook = Callable[[int, int, bytes, asyncio.StreamWriter], None]
ClientHook = Callable[[int, int, bytes, bytes], list[bytes]]


class FrameRelay:
    """A relay on 127.0.0.1 that knows no secret. It forwards the HTTP upgrade and parses
    every frame both ways. ``on_client(conn, n, raw, payload)`` returns the raw frames to
    forward for the client's n-th data frame (1-based) on connection ``conn``;
    ``on_server(conn, n, payload, to_server)`` sees the server's n-th data frame and may
    write extra (masked) frames to the server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.on_client: ClientHook = lambda conn, n, raw, payload: [raw]
        self.on_server: ServerHook = lambda conn, n, payload, to_server: None
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _client_to_server(
        self, conn: int, cr: asyncio.StreamReader, sw: asyncio.StreamWriter
    ) -> None:
        n = 0
        while True:
            raw, opcode, _fin, payload = await read_frame(cr)
            out = [raw]
            if opcode in (0x0, 0x1, 0x2):
                n += 1
                out = self.on_client(conn, n, raw, payload)
            for data in out:
                sw.write(data)
            await sw.drain()

    async def _server_to_client(
        self,
        conn: int,
        sr: asyncio.StreamReader,
        cw: asyncio.StreamWriter,
        sw: asyncio.StreamWriter,
    ) -> None:
        n = 0
        while True:
            raw, opcode, _fin, payload = await read_frame(sr)
            cw.write(raw)
            await cw.drain()
            if opcode in (0x0, 0x1, 0x2):
                n += 1
                self.on_server(conn, n, payload, sw)
                await sw.drain()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        conn = self.connections
        self._writers.append(cw)
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.append(sw)
        try:
            sw.write(await cr.readuntil(b"\r\n\r\n"))
            cw.write(await sr.readuntil(b"\r\n\r\n"))
            await asyncio.gather(
                self._client_to_server(conn, cr, sw), self._server_to_client(conn, sr, cw, sw)
            )
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            sw.close()
            cw.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            for w in self._writers:
                w.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()


# =========================================================================== findings
# These tests fail today; each guards a vulnerability described in its docstring.


async def browser_session(url: str) -> bytes:
    """What a web page gets from ``url`` (a node without secret): it opens the WebSocket
    as a browser does (with an ``Origin``), does the handshake with empty proofs, sends a
    sync hello and asks for everything in ``NAMESPACE``. Every byte it received."""
    received = b""
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(url + PATH, headers={"Origin": "https://evil.example"})
        except aiohttp.WSServerHandshakeError:
            return received  # refused at the upgrade

        async def recv() -> bool:
            nonlocal received
            msg = await ws.receive()
            if msg.type is not WSMsgType.BINARY:
                return False
            received += msg.data
            return True

        try:
            async with asyncio.timeout(DEADLINE):
                await ws.send_bytes(pack("hello", node_id="browser", nonce=auth.make_nonce()))
                if not await recv():  # the challenge
                    return received
                await ws.send_bytes(pack("auth", proof=b"", hello={"node_id": "browser"}))
                if not await recv():  # the welcome
                    return received
                await ws.send_bytes(
                    msgpack.packb([0, [], None, [], []])
                    + msgpack.packb([1, NAMESPACE, b"\x00"], use_bin_type=True)
                )
                while MARKER.encode() not in received and await recv():
                    pass
        except (TimeoutError, ConnectionError, aiohttp.ClientError):
            pass
        finally:
            await ws.close()
    return received


async def test_a_browser_page_cannot_read_a_node_without_secret(tmp_path: Path) -> None:
    """Cross-site WebSocket hijacking. Without a mesh secret a node trusts everything that
    reaches 127.0.0.1, and its proofs are empty: but a web page in any browser on this
    machine can open ``ws://127.0.0.1:<port>/subcog/v1`` too (WebSockets are not bound by
    CORS; the browser only adds an ``Origin`` header). Such a page must not be able to
    complete the handshake and read the node's memories (or write its own). Node peers
    never send ``Origin``; a browser always does."""
    async with victim_node(tmp_path, None) as api:
        assert api.url is not None
        received = await browser_session(api.url)
        assert leaked(received) == [], "a browser page read the node's memories"
        assert all(p.node_id != "browser" for p in api.peers())


@pytest.mark.parametrize("attack", ["close-4011", "challenge-naming-the-dialler"])
async def test_an_unauthenticated_self_claim_does_not_stop_redialling(attack: str) -> None:
    """Whoever answers at a kept peer's URL without the secret (a spoofed address, a
    squatted port while the peer restarts, an on-path box) can say "you dialled yourself":
    a close with 4011, or a challenge naming the dialler's own node id (checked before the
    proof). ``connect`` maps both to ``InvalidArgument`` and the redial loop stops for good,
    so a static peer (``peers=``, "kept until the node closes") is never dialled again.
    An unproven claim must not end the loop: it must retry like any failed dial."""
    connections = 0

    async def fake_node(request: web.Request) -> web.WebSocketResponse:
        nonlocal connections
        connections += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the dialler's hello
        if attack == "close-4011":
            await ws.close(code=CLOSE_SELF, message=b"connection to self")
        else:
            challenge = pack("challenge", node_id="b", nonce=auth.make_nonce(), proof=bytes(32))
            await ws.send_bytes(challenge)
            await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get(PATH, fake_node)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"ws://127.0.0.1:{runner.addresses[0][1]}"
        async with make("b", Recorder(), secret=SECRET) as b:
            b.add_peer(url)
            loop_task = b._redialers[url]
            await wait_for(
                lambda: connections >= 2 or loop_task.done(), DEADLINE, "a redial or a give-up"
            )
            assert not loop_task.done(), "the redial loop gave up on an unauthenticated claim"
            assert connections >= 2
    finally:
        await runner.cleanup()


async def test_a_kept_url_that_is_this_node_itself_is_given_up() -> None:
    """The other side of the rule above: a URL that provably is this node's own listening
    socket (its own url, or loopback on its port) stops the redial loop at once."""
    async with make("b", Recorder(), secret=SECRET) as b:
        port = URL(b.url).port
        for url in (b.url, f"ws://localhost:{port}"):
            b.add_peer(url)
            loop_task = b._redialers[url]
            await wait_for(loop_task.done, DEADLINE, "the redial loop gives up")
            assert loop_task.exception() is None


class _FakeZeroconf:
    """Stands in for AsyncZeroconf: records registrations, opens no socket."""

    def __init__(self, **_: Any) -> None:
        self.zeroconf = object()
        self.registered: list[Any] = []

    async def _done(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def async_register_service(self, info: Any) -> asyncio.Future[None]:
        self.registered.append(info)
        return await self._done()

    async def async_unregister_service(self, info: Any) -> asyncio.Future[None]:
        return await self._done()

    async def async_close(self) -> None:
        return None


class _FakeBrowser:
    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    async def async_cancel(self) -> None:
        return None


@asynccontextmanager
async def advertised(
    monkeypatch: pytest.MonkeyPatch, advert: Advert
) -> AsyncIterator[AsyncServiceInfo]:
    """The mDNS service record ``MdnsDiscovery`` would announce for ``advert``, built
    in-process (zeroconf's network classes replaced: nothing is sent)."""
    monkeypatch.setattr(mdns, "AsyncZeroconf", _FakeZeroconf)
    monkeypatch.setattr(mdns, "AsyncServiceBrowser", _FakeBrowser)
    discovery = mdns.MdnsDiscovery()
    await discovery.start(advert, lambda found: None, lambda node_id: None)
    try:
        info = discovery._info
        assert info is not None
        yield info
    finally:
        await discovery.aclose()


async def test_a_tls_node_found_by_mdns_is_dialled_over_tls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS downgrade through mDNS. A node with ``ssl=`` listens for ``wss://`` only, but its
    mDNS record does not say so and ``MdnsDiscovery._parse`` always builds ``ws://``: peers
    dial it in plaintext (which fails against its TLS port), and a spoofed advert for its
    node id at an attacker's address is dialled in plaintext too, so a relay that
    terminates TLS towards the real node reads the whole link (the proofs do not bind the
    TLS channel). A peer found by mDNS must be dialled with the scheme it listens on."""
    tag = mesh_tag(SECRET)
    tls_node = Advert("a1b2c3d4e5f60718", "wss://192.0.2.10:8443", PROTOCOL_VERSION, tag)
    async with advertised(monkeypatch, tls_node) as info:
        me = Advert("0f0e0d0c0b0a0908", "wss://192.0.2.11:8443", PROTOCOL_VERSION, tag)
        found = mdns.MdnsDiscovery()._parse(info.name, info, me)
    assert found is not None
    assert found.node_id == tls_node.node_id
    assert found.url == "wss://192.0.2.10:8443"


# =========================================================================== guards
# These pass today; each was checked to fail against a deliberately broken copy.


async def test_mdns_record_carries_only_id_version_and_mesh_tag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DESIGN 7: an mDNS advert carries no secret and no content. The TXT record holds
    ``id``, ``v`` and the one-way ``mesh`` tag (and at most the URL scheme); no byte of the
    record (TXT, names) holds the secret or its hex."""
    tag = mesh_tag(SECRET)
    advert = Advert("a1b2c3d4e5f60718", "ws://192.0.2.10:8765", PROTOCOL_VERSION, tag)
    async with advertised(monkeypatch, advert) as info:
        props = info.decoded_properties
        assert (props["id"], props["v"], props["mesh"]) == (
            advert.node_id,
            str(PROTOCOL_VERSION),
            tag,
        )
        # nothing else but, at most, the URL scheme the node listens on
        assert set(props.values()) <= {advert.node_id, str(PROTOCOL_VERSION), tag, "ws", "wss"}
        everything = (info.text or b"") + info.name.encode() + (info.server or "").encode()
    for needle in (SECRET, SECRET.hex().encode(), hashlib.sha256(SECRET).hexdigest().encode()):
        assert needle not in everything
    assert len(tag) == 16 and tag not in SECRET.hex()


@pytest.mark.parametrize("attacker_secret", [None, b"a guess"])
async def test_nothing_private_reaches_an_unauthenticated_client(
    tmp_path: Path, attacker_secret: bytes | None
) -> None:
    """Every byte a client without the secret gets back (HTTP upgrade response, challenge,
    close frame) is free of memory content, namespace names, session ids and the user id;
    it is refused with 4003 and never becomes a peer."""
    async with victim_node(tmp_path, SECRET) as api:
        assert api.url is not None
        port = int(api.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        received = b""
        code = None
        try:
            writer.write(upgrade_request(port))
            received += await reader.readuntil(b"\r\n\r\n")
            nonce = auth.make_nonce()
            writer.write(frame(pack("hello", node_id="eve", nonce=nonce), masked=True))
            raw, _op, _fin, payload = await read_frame(reader)
            received += raw
            challenge = msgpack.unpackb(payload)
            binding = auth.Binding(nonce, challenge["nonce"], "eve", challenge["node_id"])
            proof = auth.make_proof(attacker_secret, "client", binding)
            hello = {"node_id": "eve", "namespaces": [NAMESPACE]}
            writer.write(frame(pack("auth", proof=proof, hello=hello), masked=True))
            async with asyncio.timeout(DEADLINE):
                while True:
                    try:
                        raw, opcode, _fin, payload = await read_frame(reader)
                    except (asyncio.IncompleteReadError, ConnectionError):
                        break
                    received += raw
                    if opcode == 0x8:
                        code = int.from_bytes(payload[:2])
                with contextlib.suppress(ConnectionError):
                    received += await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert code == CLOSE_AUTH
        assert leaked(received) == []
        assert api.peers() == []


async def test_nothing_private_reaches_a_server_that_cannot_prove_the_secret(
    tmp_path: Path,
) -> None:
    """A node dialling an impostor (a spoofed advert, a squatted port) sends it only its
    node id and a nonce: every byte it sends (HTTP upgrade, frames unmasked) is free of
    memory content, namespace names, session ids and the user id."""
    sent = bytearray()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            sent.extend(request)
            writer.write(upgrade_response(request))
            _raw, _op, _fin, payload = await read_frame(reader)
            sent.extend(payload)
            hello = msgpack.unpackb(payload)
            challenge = pack("challenge", node_id="impostor", nonce=auth.make_nonce(), proof=b"")
            writer.write(frame(challenge, masked=False))
            assert hello["t"] == "hello"
            while True:
                _raw, opcode, _fin, payload = await read_frame(reader)
                sent.extend(payload)
                if opcode == 0x8:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        async with victim_node(tmp_path, SECRET) as api:
            with pytest.raises(AuthError):
                await api.connect(f"ws://127.0.0.1:{port}")
            assert api.peers() == []
    finally:
        server.close()
        await server.wait_closed()
    assert b"nonce" in bytes(sent)  # the dial's hello was captured
    assert leaked(bytes(sent)) == []


async def test_a_reflected_server_proof_is_no_client_proof() -> None:
    """Handshake reflection: the server's own proof, sent back to it as the client's proof
    of the same handshake, is refused with 4003 (the role is in the transcript)."""
    rec = Recorder()
    async with make("a", rec, secret=SECRET) as a, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(a.url + PATH)
        await ws.send_bytes(pack("hello", node_id="eve", nonce=auth.make_nonce()))
        msg = await ws.receive()
        assert msg.type is WSMsgType.BINARY
        challenge = msgpack.unpackb(msg.data)
        assert len(challenge["proof"]) == 32
        await ws.send_bytes(pack("auth", proof=challenge["proof"], hello={"node_id": "eve"}))
        async with asyncio.timeout(DEADLINE):
            answer = await ws.receive()  # a welcome here would be the reflection working
        assert answer.type is WSMsgType.CLOSE
        assert answer.data == CLOSE_AUTH
        await ws.close()
        assert a.links == {}
    assert rec.calls == 0


async def test_a_node_dialling_itself_through_a_relay_gets_no_link() -> None:
    """A relay that loops a node's dial back to its own server (also rewriting the node
    id in its hello, so the server does not see its own id) never gives it a link."""
    rec = Recorder()
    async with make("a", rec, secret=SECRET) as a:
        relay = FrameRelay(a.port)

        def rename(conn: int, n: int, raw: bytes, payload: bytes) -> list[bytes]:
            if n != 1:
                return [raw]
            hello = msgpack.unpackb(payload)
            hello["node_id"] = "not-a"
            return [frame(msgpack.packb(hello, use_bin_type=True), masked=True)]

        for hook in (relay.on_client, rename):
            relay.on_client = hook
            async with relay.running() as url:
                with pytest.raises(SubcogError):
                    await a.connect(url)
        assert a.links == {}
    assert rec.calls == 0


async def test_frames_reflected_to_their_sender_are_refused() -> None:
    """A relay that sends the server's first message back to the server (as if from the
    client) is caught: that direction uses another key, so the link closes with 4012 and
    the reflected frame is never handed over."""
    ra, rb = Recorder(), Recorder()
    async with make("a", ra, secret=SECRET) as a, make("b", rb, secret=SECRET) as b:
        relay = FrameRelay(b.port)

        def reflect(conn: int, n: int, payload: bytes, to_server: asyncio.StreamWriter) -> None:
            if n == 3:  # after challenge and welcome: the server's first link message
                to_server.write(frame(payload, masked=True))

        relay.on_server = reflect
        async with relay.running() as url:
            await a.connect(url)
            server_side = await rb.next_link()
            await server_side.send(b"from b to a")
            await wait_for(lambda: server_side.closed or rb.frames, DEADLINE, "4012 or a frame")
            assert rb.frames == []
            assert await ended(server_side) == CLOSE_MAC


async def test_frames_recorded_on_one_link_are_refused_on_the_next() -> None:
    """Replay across links: the client's first message recorded on link 1 and injected as
    the first message of link 2 (same two nodes, same direction, same sequence number 0)
    fails its tag (fresh nonces give fresh keys): 4012, and it is never handed over twice."""
    ra, rb = Recorder(), Recorder()
    recorded: list[bytes] = []
    async with make("a", ra, secret=SECRET) as a, make("b", rb, secret=SECRET) as b:
        relay = FrameRelay(b.port)

        def record_then_replay(conn: int, n: int, raw: bytes, payload: bytes) -> list[bytes]:
            if n != 3:
                return [raw]
            if conn == 1:
                recorded.append(raw)
                return [raw]
            return [recorded[0], raw]

        relay.on_client = record_then_replay
        async with relay.running() as url:
            first = await a.connect(url)
            await first.send(b"transfer 100 to eve")
            await wait_for(lambda: rb.frames == [b"transfer 100 to eve"], DEADLINE, "frame 1")
            server_first = await rb.next_link()
            await first.close()
            await ended(server_first)

            second = await a.connect(url)
            server_second = await rb.next_link()
            await second.send(b"hello again")
            await wait_for(
                lambda: server_second.closed or len(rb.frames) > 1, DEADLINE, "4012 or a frame"
            )
            assert await ended(server_second) == CLOSE_MAC
        assert recorded
        assert rb.frames == [b"transfer 100 to eve"]


async def test_an_unauthenticated_claim_of_a_linked_id_leaves_the_link_alone() -> None:
    """Node-id spoofing without the secret: a connection that names a node already linked
    (to kick that link, or to race its redial) is refused with 4003 and the existing link
    stays open and keeps delivering."""
    ra, rb = Recorder(), Recorder()
    async with make("a", ra, secret=SECRET) as a, make("b", rb, secret=SECRET) as b:
        link = await a.connect(b.url)
        server_side = await rb.next_link()
        async with aiohttp.ClientSession() as http:
            for proof in (b"", bytes(32)):
                ws = await http.ws_connect(b.url + PATH)
                await ws.send_bytes(pack("hello", node_id="a", nonce=auth.make_nonce()))
                msg = await ws.receive()
                assert msg.type is WSMsgType.BINARY
                await ws.send_bytes(pack("auth", proof=proof, hello={"node_id": "a"}))
                assert await close_code(ws) == CLOSE_AUTH
                await ws.close()
        assert not link.closed and not server_side.closed
        assert b.links == {"a": server_side}
        await link.send(b"still here")
        await wait_for(lambda: rb.frames == [b"still here"], DEADLINE, "the frame after")
        assert rb.calls == 1
