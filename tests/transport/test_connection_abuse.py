"""Connection-level abuse of a node's aiohttp server and client (DESIGN.md "Bad input": a
hostile peer cannot crash a node, corrupt its data, or make it hold unbounded resources).

Raw TCP sockets and hand-made WebSocket frames on 127.0.0.1 against real nodes (with and
without a mesh secret), and hostile servers for the node as a dialler. Each test asserts
the outcome: the close code or HTTP status, that the node still links a real peer, that
its state is unchanged, and that the sockets and tasks the abuse cost are released
(``/proc/self/fd`` and ``asyncio.all_tasks()`` back to their counts before). Every wait is
on a condition with a deadline that only guards against hangs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

from helpers import wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._errors import PeerUnreachable, ProtocolError
from subcog_crdt._transport import auth
from subcog_crdt._transport.base import PROTOCOL_VERSION
from subcog_crdt._transport.websocket import (
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_PROTOCOL,
    MAX_HANDSHAKES,
    PATH,
    WebSocketTransport,
)

DEADLINE = 20.0  # a bound against hangs (the handshake deadline is 5 s); waits end earlier
SECRET = "connection abuse mesh"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
NS = "decisions"

# --------------------------------------------------------------------------- raw WebSocket


def ws_frame(payload: bytes, *, opcode: int = 0x2, fin: bool = True, masked: bool = True) -> bytes:
    """One WebSocket frame (a zero mask key when masked: the payload goes as is)."""
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = bytes([first, bit | n])
    elif n < 65536:
        head = bytes([first, bit | 126]) + struct.pack(">H", n)
    else:
        head = bytes([first, bit | 127]) + struct.pack(">Q", n)
    return head + (b"\0\0\0\0" if masked else b"") + payload


def fragments(payload: bytes, size: int, *, ping_between: bool = False) -> bytes:
    """``payload`` as one binary message cut into fragments of ``size`` bytes, with a ping
    between fragments if asked (control frames may sit inside a fragmented message)."""
    parts = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    out = b""
    for i, part in enumerate(parts):
        if i and ping_between:
            out += ws_frame(b"p%d" % i, opcode=0x9)
        out += ws_frame(part, opcode=0x2 if i == 0 else 0x0, fin=i == len(parts) - 1)
    return out


def upgrade_request(port: int, path: str = PATH, method: str = "GET") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """One frame from the node (servers do not mask): (opcode, fin, payload)."""
    head = await reader.readexactly(2)
    size = head[1] & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2))
    elif size == 127:
        size = int.from_bytes(await reader.readexactly(8))
    mask = await reader.readexactly(4) if head[1] & 0x80 else b""
    payload = await reader.readexactly(size)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head[0] & 0x0F, bool(head[0] & 0x80), payload


async def close_code_from(reader: asyncio.StreamReader) -> int | None:
    """Read until the node's close frame; its code (None: the connection just ended)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            try:
                opcode, _fin, payload = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if opcode == 0x8:
                return int.from_bytes(payload[:2]) if len(payload) >= 2 else None


async def close_code_answering_pings(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> int | None:
    """Like ``close_code_from``, but answers the node's pings: a live, silent peer."""
    async with asyncio.timeout(DEADLINE):
        while True:
            try:
                opcode, _fin, payload = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if opcode == 0x9:
                writer.write(ws_frame(payload, opcode=0xA))
            elif opcode == 0x8:
                return int.from_bytes(payload[:2]) if len(payload) >= 2 else None


async def ended(reader: asyncio.StreamReader) -> bool:
    """Whether the node ends the connection (EOF or reset) before the deadline."""
    try:
        async with asyncio.timeout(DEADLINE):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def pack(kind: str, **fields: Any) -> bytes:
    data: bytes = msgpack.packb({"t": kind, "v": PROTOCOL_VERSION, **fields}, use_bin_type=True)
    return data


def secret_bytes(secret: str | None) -> bytes | None:
    return None if secret is None else secret.encode()


@asynccontextmanager
async def raw_socket(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TCP connection to the node; aborted (RST) on exit whatever state it is in."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        reset(writer)


def reset(writer: asyncio.StreamWriter) -> None:
    """End the connection with a TCP reset (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def open_upgraded(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int
) -> None:
    writer.write(upgrade_request(port))
    async with asyncio.timeout(DEADLINE):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head


async def raw_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    port: int,
    *,
    secret: str | None,
    node_id: str = "hostile",
    split: int | None = None,
) -> None:
    """The four-message handshake by hand (messages cut into ``split``-byte fragments with
    pings between them, when given)."""

    def send(message: bytes) -> None:
        if split is None:
            writer.write(ws_frame(message))
        else:
            writer.write(fragments(message, split, ping_between=True))

    async def receive() -> dict[str, Any]:
        async with asyncio.timeout(DEADLINE):
            while True:
                opcode, fin, payload = await read_frame(reader)
                if opcode == 0x2:
                    assert fin
                    out: dict[str, Any] = msgpack.unpackb(payload)
                    return out
                assert opcode == 0xA, opcode  # pongs for our pings

    await open_upgraded(reader, writer, port)
    nonce = auth.make_nonce()
    send(pack("hello", node_id=node_id, nonce=nonce))
    challenge = await receive()
    assert challenge["t"] == "challenge", challenge
    binding = auth.Binding(nonce, challenge["nonce"], node_id, challenge["node_id"])
    key = secret_bytes(secret)
    assert auth.verify_proof(key, "server", challenge["proof"], binding)
    proof = auth.make_proof(key, "client", binding)
    send(pack("auth", proof=proof, hello={"node_id": node_id, "url": None}))
    welcome = await receive()
    assert welcome["t"] == "welcome", welcome


def proto_hello(sessions: list[dict[str, Any]] | None = None) -> bytes:
    """The sync protocol's hello frame: [0, namespaces, filter, sessions, peers]."""
    data: bytes = msgpack.packb([0, [], None, sessions or [], []], use_bin_type=True)
    return data


# --------------------------------------------------------------------------- accounting


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def task_count() -> int:
    return len(asyncio.all_tasks())


class Baseline:
    """What the node holds before the abuse; ``released`` waits until it is back there."""

    def __init__(self, api: ConversationsApi) -> None:
        self.api = api
        self.fds = open_fds()
        self.tasks = task_count()
        self.state = api.state_hash(NS)

    async def released(self) -> None:
        transport = transport_of(self.api)
        await wait_for(lambda: transport._unauthenticated == 0, DEADLINE, "handshake slots")
        await wait_for(lambda: not transport._handshaking, DEADLINE, "handshakes ended")
        await wait_for(lambda: not self.api.peers(), DEADLINE, "no hostile peer left")
        await wait_for(lambda: open_fds() <= self.fds, DEADLINE, f"fds back to {self.fds}")
        await wait_for(lambda: task_count() <= self.tasks, DEADLINE, f"tasks to {self.tasks}")
        assert self.api.state_hash(NS) == self.state


def transport_of(api: ConversationsApi) -> WebSocketTransport:
    transport = api._transport
    assert isinstance(transport, WebSocketTransport)
    return transport


def port_of(api: ConversationsApi) -> int:
    return transport_of(api).port


@asynccontextmanager
async def target(tmp_path: Path, secret: str | None) -> AsyncIterator[ConversationsApi]:
    """The node under attack: durable, holding one memory."""
    async with ConversationsApi(
        data_dir=tmp_path / "target", mesh_secret=secret, host="127.0.0.1", discovery=()
    ) as api:
        session = await api.register_session("owner", subscribe=[NS])
        await session.capture(NS, "state before the abuse")
        yield api


async def serves_a_real_peer(api: ConversationsApi, secret: str | None) -> None:
    """A well-behaved node links to ``api`` and a memory it captures arrives there."""
    async with ConversationsApi(mesh_secret=secret, host="127.0.0.1", discovery=()) as peer:
        assert api.url is not None
        await peer.connect(api.url)
        session = await peer.register_session("real-peer", subscribe=[NS])
        await session.capture(NS, "written by a real peer during the abuse")
        await wait_for(
            lambda: api.state_hash(NS) == peer.state_hash(NS), DEADLINE, "real peer synced"
        )
        assert any(p.node_id == peer.node_id for p in api.peers())


SECRETS = [pytest.param(SECRET, id="secret"), pytest.param(None, id="loopback")]


# --------------------------------------------------------------------------- before the upgrade


async def test_tcp_connections_that_never_finish_an_http_request_are_closed(
    tmp_path: Path,
) -> None:
    """Connections that send nothing, or an HTTP request line and never the end of its
    headers, are closed by the node: they never reach the WebSocket handshake, so the
    handshake slots and their 5 s deadline do not bound them, and each holds a socket
    and a task. (They stay open for aiohttp's default keep-alive, ~1 h: a local process
    can exhaust the node's file descriptors; see the report.)"""
    async with target(tmp_path, SECRET) as api:
        port = port_of(api)
        before = Baseline(api)
        writers: list[asyncio.StreamWriter] = []
        readers: list[asyncio.StreamReader] = []
        try:
            for i in range(100):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if i % 2:
                    writer.write(f"GET {PATH} HTTP/1.1\r\nHost: x\r\n".encode())
                readers.append(reader)
                writers.append(writer)
            await serves_a_real_peer(api, SECRET)  # the node still accepts meanwhile
            closed = await asyncio.gather(*(ended(r) for r in readers))
            assert all(closed), f"{closed.count(False)} of 100 idle connections left open"
        finally:
            for writer in writers:
                reset(writer)
        before.state = api.state_hash(NS)  # the real peer's write
        await before.released()


REQUESTS: dict[str, tuple[bytes, int]] = {
    "get-without-upgrade": (f"GET {PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
    "head": (f"HEAD {PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
    "post": (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".encode(), 405),
    "put": (f"PUT {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode(), 405),
    "delete": (f"DELETE {PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 405),
    "root": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "unknown-path": (b"GET /nothing/here HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "prefix-path": (f"GET {PATH}/x HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 404),
    "connect": (b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n", 404),
    "options-star": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "huge-header": (f"GET {PATH} HTTP/1.1\r\nHost: x\r\nX: {'a' * 100_000}\r\n\r\n".encode(), 400),
    "many-headers": (
        f"GET {PATH} HTTP/1.1\r\nHost: x\r\n".encode()
        + b"".join(b"X-%d: y\r\n" % i for i in range(1000))
        + b"\r\n",
        400,
    ),
    "huge-request-line": (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "not-http": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(200)), 400),
    "upgrade-without-key": (
        f"GET {PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode(),
        400,
    ),
}


@pytest.mark.parametrize("secret", SECRETS)
async def test_plain_http_other_paths_and_methods_are_refused(
    tmp_path: Path, secret: str | None
) -> None:
    """Every non-WebSocket request, method other than GET, unknown path, oversized header or
    non-HTTP byte stream gets an HTTP error status: no handshake slot stays taken, no link,
    the data is unchanged, and real peers still link."""
    async with target(tmp_path, secret) as api:
        port = port_of(api)
        before = Baseline(api)
        statuses: dict[str, int] = {}
        for name, (request, _status) in REQUESTS.items():
            async with raw_socket(port) as (reader, writer):
                writer.write(request)
                async with asyncio.timeout(DEADLINE):
                    head = await reader.readuntil(b"\r\n\r\n")
                statuses[name] = int(head.split(b" ", 2)[1])
        assert statuses == {name: status for name, (_r, status) in REQUESTS.items()}
        await before.released()
        await serves_a_real_peer(api, secret)


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("GET", "/other"), ("POST", PATH)])
async def test_websocket_upgrade_on_another_path_or_method_is_refused(
    tmp_path: Path, secret: str | None, method: str, path: str
) -> None:
    """An upgrade request anywhere but ``GET /subcog/v1`` gets no 101."""
    async with target(tmp_path, secret) as api, raw_socket(port_of(api)) as (reader, writer):
        before = Baseline(api)
        writer.write(upgrade_request(port_of(api), path, method))
        async with asyncio.timeout(DEADLINE):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] in (b"404", b"405"), head
        reset(writer)
        await before.released()


# --------------------------------------------------------------------------- in the handshake


@pytest.mark.parametrize("secret", SECRETS)
async def test_hundreds_of_silent_websockets_are_capped_then_closed_with_4008(
    tmp_path: Path, secret: str | None
) -> None:
    """300 WebSockets that never send the hello: the node takes MAX_HANDSHAKES of them and
    refuses the rest with 503. Those that answer its pings are closed with 4008 at the
    handshake deadline, those that do not are dropped (no close frame: the heartbeat cuts
    the connection); every socket and task is released and real peers link again."""
    async with target(tmp_path, secret) as api:
        port = port_of(api)
        before = Baseline(api)
        opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        statuses: list[int] = []
        try:
            for _ in range(300):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                opened.append((reader, writer))
                writer.write(upgrade_request(port))
                async with asyncio.timeout(DEADLINE):
                    head = await reader.readuntil(b"\r\n\r\n")
                statuses.append(int(head.split(b" ", 2)[1]))
            assert statuses.count(101) == MAX_HANDSHAKES
            assert statuses.count(503) == 300 - MAX_HANDSHAKES
            upgraded = [c for c, status in zip(opened, statuses, strict=True) if status == 101]
            live, dead = upgraded[::2], upgraded[1::2]
            codes = await asyncio.gather(
                *(close_code_answering_pings(r, w) for r, w in live),
                *(close_code_from(r) for r, _w in dead),
            )
            assert codes == [CLOSE_HANDSHAKE_TIMEOUT] * len(live) + [None] * len(dead)
        finally:
            for _reader, writer in opened:
                reset(writer)
        await before.released()
        await serves_a_real_peer(api, secret)


# Where a reset (or a close frame) cuts the handshake short.
STEPS = ["connected", "request-sent", "upgraded", "hello-sent", "challenge-read", "auth-sent"]


async def go_to_step(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    port: int,
    step: str,
    secret: str | None,
) -> None:
    if step == "connected":
        return
    if step == "request-sent":
        writer.write(upgrade_request(port))
        await writer.drain()
        return
    await open_upgraded(reader, writer, port)
    if step == "upgraded":
        return
    nonce = auth.make_nonce()
    writer.write(ws_frame(pack("hello", node_id="hostile", nonce=nonce)))
    await writer.drain()
    if step == "hello-sent":
        return
    async with asyncio.timeout(DEADLINE):
        _opcode, _fin, payload = await read_frame(reader)
    challenge = msgpack.unpackb(payload)
    if step == "challenge-read":
        return
    binding = auth.Binding(nonce, challenge["nonce"], "hostile", challenge["node_id"])
    proof = auth.make_proof(secret_bytes(secret), "client", binding)
    writer.write(ws_frame(pack("auth", proof=proof, hello={"node_id": "hostile", "url": None})))
    await writer.drain()


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize("step", [*STEPS, "linked"])
async def test_a_tcp_reset_at_any_step_releases_everything(
    tmp_path: Path, secret: str | None, step: str
) -> None:
    """A peer that resets the connection anywhere in the handshake (or right after it)
    leaves no slot, link, socket or task behind, and the node's data unchanged."""
    async with target(tmp_path, secret) as api:
        port = port_of(api)
        before = Baseline(api)
        for _ in range(3):
            async with raw_socket(port) as (reader, writer):
                if step == "linked":
                    await raw_handshake(reader, writer, port, secret=secret)
                    writer.write(ws_frame(proto_hello()))
                    await writer.drain()
                    await wait_for(lambda: api.peers(), DEADLINE, "the hostile peer linked")
                else:
                    await go_to_step(reader, writer, port, step, secret)
                reset(writer)
            await before.released()
        await serves_a_real_peer(api, secret)


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize("step", ["upgraded", "hello-sent", "challenge-read"])
async def test_a_close_frame_in_the_handshake_is_answered_and_releases_the_slot(
    tmp_path: Path, secret: str | None, step: str
) -> None:
    """A peer that sends a close frame mid-handshake gets the close answered, no link, and
    the slot back."""
    async with target(tmp_path, secret) as api, raw_socket(port_of(api)) as (reader, writer):
        before = Baseline(api)
        await go_to_step(reader, writer, port_of(api), step, secret)
        writer.write(ws_frame(struct.pack(">H", 1000) + b"bye", opcode=0x8))
        assert await close_code_from(reader) is not None
        reset(writer)
        await before.released()


@pytest.mark.parametrize("secret", SECRETS)
async def test_a_ping_flood_before_authentication_is_cut_at_the_handshake_deadline(
    tmp_path: Path, secret: str | None
) -> None:
    """An unauthenticated peer that floods pings and never reads the pongs: the node stops
    reading it (TCP backpressure, not a growing buffer) and drops it at the handshake
    deadline, freeing its slot and socket."""
    async with target(tmp_path, secret) as api, raw_socket(port_of(api)) as (reader, writer):
        before = Baseline(api)
        await open_upgraded(reader, writer, port_of(api))
        flood = asyncio.create_task(ping_flood(writer))
        try:
            await wait_for(lambda: transport_of(api)._unauthenticated == 0, DEADLINE, "dropped")
        finally:
            await cancel(flood)
        reset(writer)
        await before.released()


# --------------------------------------------------------------------------- frames after it


async def ping_flood(writer: asyncio.StreamWriter) -> None:
    """Pings of 125 bytes as fast as the socket takes them; never reads the pongs."""
    batch = ws_frame(b"p" * 125, opcode=0x9) * 256
    while not writer.is_closing():
        if writer.transport.get_write_buffer_size() < 1 << 18:
            writer.write(batch)
        await asyncio.sleep(0.005)


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await task


@pytest.mark.parametrize("secret", SECRETS)
async def test_a_fragmented_handshake_and_frames_with_pings_between_fragments_link(
    tmp_path: Path, secret: str | None
) -> None:
    """Fragmentation is legal: handshake messages and the sync hello cut into 7-byte
    fragments, with pings between them, link the peer (its session shows up) and every
    ping is answered with its own payload."""
    async with target(tmp_path, secret) as api, raw_socket(port_of(api)) as (reader, writer):
        await raw_handshake(reader, writer, port_of(api), secret=secret, split=7)
        if secret is not None:
            return  # later messages carry link-key tags; the handshake is what is tested
        session = {"id": "fragmented-session", "user_id": "u", "subscriptions": [NS]}
        writer.write(fragments(proto_hello([session]), 5, ping_between=True))
        writer.write(ws_frame(b"last ping", opcode=0x9))
        await wait_for(
            lambda: "fragmented-session" in {s.id for s in api.sessions.list()},
            DEADLINE,
            "the fragmented hello's session",
        )
        async with asyncio.timeout(DEADLINE):
            while True:
                opcode, _fin, payload = await read_frame(reader)
                if opcode == 0xA and payload == b"last ping":
                    break


BAD_FRAMES: dict[str, bytes] = {
    "continuation-without-start": ws_frame(b"orphan", opcode=0x0),
    "data-inside-fragmented-message": ws_frame(b"first", fin=False) + ws_frame(b"second"),
    "text-frame": ws_frame(b"[0]", opcode=0x1),
    "text-continuation": ws_frame(b"a", opcode=0x1, fin=False) + ws_frame(b"b", opcode=0x0),
    "reserved-opcode": ws_frame(b"x", opcode=0x3),
    "reserved-control-opcode": ws_frame(b"x", opcode=0xB),
    "fragmented-ping": ws_frame(b"x", opcode=0x9, fin=False),
    "oversized-ping": ws_frame(b"x" * 126, opcode=0x9),
    "rsv-bits": bytes([0x80 | 0x40 | 0x2, 0x80 | 1]) + b"\0\0\0\0x",
    "not-msgpack": ws_frame(b"\xc1\xc1\xc1"),
}


@pytest.mark.parametrize("bad", list(BAD_FRAMES))
async def test_bad_frames_after_the_handshake_close_the_link_with_4000(
    tmp_path: Path, bad: str
) -> None:
    """Broken framing on an established link (loopback node: no tags, so the bytes reach
    the WebSocket layer as sent) closes that link with 4000; the data is unchanged."""
    async with target(tmp_path, None) as api, raw_socket(port_of(api)) as (reader, writer):
        before = Baseline(api)
        await raw_handshake(reader, writer, port_of(api), secret=None)
        writer.write(ws_frame(proto_hello()))
        await wait_for(lambda: api.peers(), DEADLINE, "the hostile peer linked")
        writer.write(BAD_FRAMES[bad])
        assert await close_code_from(reader) == CLOSE_PROTOCOL
        reset(writer)
        await before.released()
        await serves_a_real_peer(api, None)


@asynccontextmanager
async def flooding_peer(api: ConversationsApi) -> AsyncIterator[asyncio.StreamWriter]:
    """A linked peer that floods pings and never reads; aborted on exit."""
    async with raw_socket(port_of(api)) as (reader, writer):
        await raw_handshake(reader, writer, port_of(api), secret=None)
        writer.write(ws_frame(proto_hello()))
        await wait_for(lambda: api.peers(), DEADLINE, "the hostile peer linked")
        flood = asyncio.create_task(ping_flood(writer))
        try:
            yield writer
        finally:
            await cancel(flood)


async def test_a_linked_peer_that_floods_pings_and_never_reads_is_dropped(
    tmp_path: Path,
) -> None:
    """The node answers pings with pongs; a peer that never reads them fills the node's
    socket. The node must still drop it (it cannot answer the node's own heartbeat)
    instead of keeping a link that is dead both ways. Today the read pump waits forever
    inside aiohttp's automatic pong (a drain that never ends), aiohttp's heartbeat only
    half-closes the socket, and the link never ends: see the report."""
    async with target(tmp_path, None) as api, flooding_peer(api):
        await wait_for(lambda: not api.peers(), DEADLINE, "the flooding peer dropped")
        assert transport_of(api).links == {}


async def test_a_node_closes_while_a_linked_peer_floods_pings_and_never_reads(
    tmp_path: Path,
) -> None:
    """``aclose`` finishes in bounded time whatever a peer does; today it waits for the
    blocked read pump (``WebSocketLink.close`` awaits ``_done``) for as long as the flood
    lasts."""
    api = ConversationsApi(
        data_dir=tmp_path / "target", mesh_secret=None, host="127.0.0.1", discovery=()
    )
    await api.__aenter__()
    try:
        async with flooding_peer(api):
            link = transport_of(api)._links["hostile"]
            # Until aiohttp's heartbeat has given up on the peer (its pong never came, as
            # the node's socket is full): the state in which the read pump is stuck.
            await wait_for(lambda: link.closed or link._ws.closed, DEADLINE, "ping timeout")
            closing = asyncio.ensure_future(api.aclose())
            done, _ = await asyncio.wait([closing], timeout=DEADLINE)
            assert closing in done, "aclose still waiting for the flooding peer's link"
    finally:
        await api.aclose()  # the flood has stopped and the socket is reset: this ends


# --------------------------------------------------------------------------- the node dialling


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def hostile_server(handler: Handler) -> AsyncIterator[tuple[str, list[str]]]:
    """A TCP server on 127.0.0.1 running ``handler`` per connection; yields its URL and a
    log: "eof" is appended when the dialler ended the connection."""
    log: list[str] = []
    tasks: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
            if await ended(reader):
                log.append("eof")
        except (ConnectionError, asyncio.IncompleteReadError):
            log.append("eof")
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", log
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(DEADLINE):
        return await reader.readuntil(b"\r\n\r\n")


def _accept_key(request: bytes) -> bytes:
    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts the TCP connection, reads the request, never answers."""
    await _read_request(reader)


async def ok_without_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    # Connection: close, or aiohttp pools the connection (15 s) as for any HTTP response.
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")


async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"\0\1\2 this is not HTTP\r\n\r\n")


async def huge_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await _read_request(reader)
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + _accept_key(request) + b"\r\n"
        b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    )


async def upgraded_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await _read_request(reader)
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + _accept_key(request) + b"\r\n\r\n"
    )


async def upgraded_then_ping_flood(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Upgrades, then floods pings (unmasked, as a server sends) and never reads."""
    request = await _read_request(reader)
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + _accept_key(request) + b"\r\n\r\n"
    )
    batch = ws_frame(b"p" * 125, opcode=0x9, masked=False) * 256
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            if writer.transport.get_write_buffer_size() < 1 << 18:
                writer.write(batch)
            await asyncio.sleep(0.005)


HOSTILE_SERVERS: dict[str, tuple[Handler, type[Exception]]] = {
    "silent": (silent, PeerUnreachable),
    "200-without-upgrade": (ok_without_upgrade, PeerUnreachable),
    "not-http": (not_http, PeerUnreachable),
    "huge-headers": (huge_headers, PeerUnreachable),
    # Neither answers the dialler's pings before the handshake's deadline: a dead peer
    # (1006), and the connection is cut (the flooder never reads what it is sent).
    "101-then-silent": (upgraded_then_silent, PeerUnreachable),
    "101-then-ping-flood": (upgraded_then_ping_flood, PeerUnreachable),
}


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize("server", list(HOSTILE_SERVERS))
async def test_dialling_a_hostile_server_fails_cleanly(
    tmp_path: Path, secret: str | None, server: str
) -> None:
    """``connect`` to a server that never answers, answers without upgrading, answers
    garbage or oversized headers, or upgrades and then says nothing or only pings: the
    dial fails with the documented error within the handshake deadline, the node ends the
    connection, keeps no redial loop, and holds no socket or task for it."""
    handler, error = HOSTILE_SERVERS[server]
    async with target(tmp_path, secret) as api, hostile_server(handler) as (url, log):
        before = Baseline(api)
        with pytest.raises(error):
            async with asyncio.timeout(DEADLINE):
                await api.connect(url)
        await wait_for(lambda: log == ["eof"], DEADLINE, "the dialler closed the connection")
        assert transport_of(api)._redialers == {}
        await before.released()
        await serves_a_real_peer(api, secret)


@pytest.mark.parametrize("secret", SECRETS)
async def test_dialling_does_not_follow_redirects(tmp_path: Path, secret: str | None) -> None:
    """A server that answers the upgrade with a redirect does not steer the dial: the node
    dials the URL it was given and nothing else. (aiohttp's ``ws_connect`` follows up to
    10 redirects by default; the loopback-only check ran on the first URL only, so a
    loopback server could send a no-secret node's hello and data anywhere.)"""
    async with (
        target(tmp_path, secret) as api,
        ConversationsApi(mesh_secret=secret, host="127.0.0.1", discovery=()) as elsewhere,
    ):

        async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            assert elsewhere.url is not None
            location = elsewhere.url.replace("ws://", "http://") + PATH
            writer.write(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )

        async with hostile_server(redirect) as (url, _log):
            with contextlib.suppress(PeerUnreachable, ProtocolError):
                async with asyncio.timeout(DEADLINE):
                    await api.connect(url)
            assert [p.node_id for p in api.peers()] == []
            assert elsewhere.peers() == []
