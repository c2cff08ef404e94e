"""WebSocketTransport over real sockets on 127.0.0.1.

Every wait has a deadline (``asyncio.timeout``) that only guards against hangs; nothing
sleeps to synchronise, and no test asserts how fast something happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import psutil
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import wait_for
from subcog_crdt._errors import (
    AuthError,
    ClosedError,
    FrameTooLarge,
    InvalidArgument,
    ProtocolError,
)
from subcog_crdt._transport import auth
from subcog_crdt._transport.base import PROTOCOL_VERSION, Hello, Link
from subcog_crdt._transport.websocket import (
    CLOSE_ABNORMAL,
    CLOSE_AUTH,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_PROTOCOL,
    CLOSE_SELF,
    CLOSE_TOO_LARGE,
    CLOSE_VERSION,
    PATH,
    PeerUnreachable,
    WebSocketLink,
    WebSocketTransport,
)
from support.netns import in_ci

SRC = str(Path(__file__).resolve().parents[2] / "src")
DEADLINE = 20.0  # a bound against hangs on a loaded machine; waits end on their condition


class Recorder:
    """A link handler that records links and frames, and reads until each link ends."""

    def __init__(self) -> None:
        self.calls = 0
        self.links: asyncio.Queue[WebSocketLink] = asyncio.Queue()
        self.frames: dict[str, asyncio.Queue[bytes]] = defaultdict(asyncio.Queue)
        self.ended: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.echo = False

    async def __call__(self, link: Link) -> None:
        assert isinstance(link, WebSocketLink)
        self.calls += 1
        node = link.peer.node_id
        self.ended[node].clear()
        await self.links.put(link)
        try:
            async for frame in link:
                await self.frames[node].put(frame)
                if self.echo:
                    await link.send(frame)
        finally:
            self.ended[node].set()

    async def next_link(self) -> WebSocketLink:
        async with asyncio.timeout(DEADLINE):
            return await self.links.get()

    async def next_frame(self, node: str) -> bytes:
        async with asyncio.timeout(DEADLINE):
            return await self.frames[node].get()


def make(node_id: str, rec: Recorder, **kw: Any) -> WebSocketTransport:
    def hello() -> Hello:
        return Hello(
            node_id=node_id,
            url=None,
            namespaces=("decisions", "patterns"),
            user_id="u-" + node_id,
            extra={"k": [1, 2]},
        )

    return WebSocketTransport(node_id=node_id, hello=hello, on_link=rec, **kw)


@asynccontextmanager
async def pair(
    **kw: Any,
) -> AsyncIterator[tuple[WebSocketTransport, Recorder, WebSocketTransport, Recorder]]:
    ra, rb = Recorder(), Recorder()
    async with make("a", ra, **kw) as a, make("b", rb, **kw) as b:
        yield a, ra, b, rb


def pack(kind: str, **fields: Any) -> bytes:
    data: bytes = msgpack.packb({"t": kind, "v": PROTOCOL_VERSION, **fields}, use_bin_type=True)
    return data


async def raw_handshake(
    session: aiohttp.ClientSession, url: str, *, node_id: str = "raw", secret: bytes | None = None
) -> tuple[aiohttp.ClientWebSocketResponse, list[bytes]]:
    """Do the handshake by hand (the wire format, independent of the implementation)."""
    ws = await session.ws_connect(url + PATH)
    nonce = auth.make_nonce()
    first = pack("hello", node_id=node_id, nonce=nonce)
    await ws.send_bytes(first)
    msg = await ws.receive()
    assert msg.type is WSMsgType.BINARY, msg
    challenge = msgpack.unpackb(msg.data)
    assert challenge["t"] == "challenge"
    binding = auth.Binding(nonce, challenge["nonce"], node_id, challenge["node_id"])
    assert auth.verify_proof(secret, "server", challenge["proof"], binding)
    third = pack(
        "auth",
        proof=auth.make_proof(secret, "client", binding),
        hello={"node_id": node_id, "url": None},
    )
    await ws.send_bytes(third)
    msg = await ws.receive()
    assert msg.type is WSMsgType.BINARY, msg
    welcome = msgpack.unpackb(msg.data)
    assert welcome["t"] == "welcome"
    assert welcome["hello"]["node_id"] == challenge["node_id"]
    return ws, [first, third]


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read until the server closes; the close code it sent."""
    async with asyncio.timeout(DEADLINE):
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                return ws.close_code
            if msg.type is WSMsgType.ERROR:
                return ws.close_code


def other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait (yielding to the loop, with a deadline) until ``check()`` holds."""
    await wait_for(check, DEADLINE, what)


# --------------------------------------------------------------------------- auth helpers


def test_proofs_bind_role_nonces_and_ids() -> None:
    b = auth.Binding(b"c" * 32, b"s" * 32, "a", "b")
    proof = auth.make_proof(b"k", "client", b)
    assert auth.verify_proof(b"k", "client", proof, b)
    assert not auth.verify_proof(b"k", "server", proof, b)  # no reflection
    assert not auth.verify_proof(b"other", "client", proof, b)
    for changed in (
        auth.Binding(b"x" * 32, b"s" * 32, "a", "b"),
        auth.Binding(b"c" * 32, b"x" * 32, "a", "b"),
        auth.Binding(b"c" * 32, b"s" * 32, "ab", ""),
    ):
        assert not auth.verify_proof(b"k", "client", proof, changed)
    assert auth.make_proof(None, "client", b) == b""
    assert not auth.verify_proof(None, "client", proof, b)
    assert auth.make_nonce() != auth.make_nonce()


def test_mesh_tag_is_stable_and_reveals_nothing() -> None:
    tag = auth.mesh_tag(b"hunter2-secret")
    assert tag == auth.mesh_tag(b"hunter2-secret")
    assert tag != auth.mesh_tag(b"hunter3-secret")
    assert len(tag) == 16
    assert "hunter" not in tag


# --------------------------------------------------------------------------- links


@pytest.mark.parametrize("secret", [None, b"mesh-secret"])
async def test_link_both_ways_frames_in_order(secret: bytes | None) -> None:
    async with pair(secret=secret, host="127.0.0.1") as (a, ra, b, rb):
        link_ab = await a.connect(b.url)
        assert link_ab.dialled_by_us
        assert link_ab.peer == Hello(
            node_id="b",
            url=None,
            namespaces=("decisions", "patterns"),
            user_id="u-b",
            extra={"k": [1, 2]},
        )
        link_ba = await rb.next_link()
        assert link_ba.peer.node_id == "a"
        assert a.links == {"b": link_ab}
        assert b.links == {"a": link_ba}
        assert (await ra.next_link()) is link_ab

        frames = [i.to_bytes(4, "big") * (i % 7 + 1) for i in range(300)]
        for frame in frames:
            await link_ab.send(frame)
            await link_ba.send(frame[::-1])
        assert [await rb.next_frame("a") for _ in frames] == frames
        assert [await ra.next_frame("b") for _ in frames] == [f[::-1] for f in frames]
        assert ra.calls == rb.calls == 1

        await link_ab.close()
        async with asyncio.timeout(DEADLINE):
            await rb.ended["a"].wait()
        assert link_ba.closed
        assert link_ba.close_code == 1000
        with pytest.raises(ClosedError):
            await link_ab.send(b"late")
        await eventually(lambda: not a.links and not b.links, "links unregistered")


@pytest.mark.parametrize(
    ("secret_a", "secret_b"),
    [(b"one", b"two"), (None, b"two"), (b"one", None)],
)
async def test_wrong_or_missing_secret_refused_before_any_frame(
    secret_a: bytes | None, secret_b: bytes | None
) -> None:
    ra, rb = Recorder(), Recorder()
    async with (
        make("a", ra, secret=secret_a, host="127.0.0.1") as a,
        make("b", rb, secret=secret_b, host="127.0.0.1") as b,
    ):
        with pytest.raises(AuthError):
            await a.connect(b.url)
        with pytest.raises(AuthError):
            await b.connect(a.url)
        assert a.links == {}
        assert b.links == {}
    assert ra.calls == 0
    assert rb.calls == 0


async def test_replayed_handshake_is_refused() -> None:
    rb = Recorder()
    secret = b"mesh-secret"
    async with make("b", rb, secret=secret, host="127.0.0.1") as b, aiohttp.ClientSession() as s:
        ws, recorded = await raw_handshake(s, b.url, secret=secret)
        link = await rb.next_link()
        assert link.peer.node_id == "raw"
        await ws.close()
        async with asyncio.timeout(DEADLINE):
            await rb.ended["raw"].wait()

        replay = await s.ws_connect(b.url + PATH)
        await replay.send_bytes(recorded[0])
        msg = await replay.receive()
        assert msg.type is WSMsgType.BINARY  # a fresh challenge
        await replay.send_bytes(recorded[1])  # proof over the old nonce
        assert await close_code(replay) == CLOSE_AUTH
        await replay.close()
    assert rb.calls == 1


async def test_without_secret_loopback_only() -> None:
    rec = Recorder()
    for host in ("0.0.0.0", "192.0.2.1", "example.com"):
        with pytest.raises(InvalidArgument):
            make("a", rec, host=host)
    async with make("a", rec) as a:
        assert a.url.startswith("ws://127.0.0.1:")
        listening = [
            c
            for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == a.port
        ]
        assert listening
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
        for url in ("ws://192.0.2.1:9", "ws://example.com:9", "ws://[2001:db8::1]:9"):
            with pytest.raises(InvalidArgument):
                await a.connect(url)
        with pytest.raises(InvalidArgument):
            await a.connect("http://127.0.0.1:9")
        # the server side refuses remote addresses even if a socket got through
        transport = _FakeTransport(("192.0.2.7", 40000))
        request = make_mocked_request(
            "GET", PATH, headers={"Upgrade": "websocket"}, transport=transport
        )
        assert request.remote == "192.0.2.7"
        with pytest.raises(web.HTTPForbidden):
            await a._handle_ws(request)
    assert rec.calls == 0


class _FakeTransport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self._peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default


async def test_self_connection_refused() -> None:
    rec = Recorder()
    async with make("a", rec) as a:
        with pytest.raises(InvalidArgument):
            await a.connect(a.url)
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(a.url + PATH)
            await ws.send_bytes(pack("hello", node_id="a", nonce=auth.make_nonce()))
            assert await close_code(ws) == CLOSE_SELF
            await ws.close()
    assert rec.calls == 0


async def test_wrong_version_refused() -> None:
    rec = Recorder()
    async with make("a", rec) as a, aiohttp.ClientSession() as s:
        ws = await s.ws_connect(a.url + PATH)
        await ws.send_bytes(
            msgpack.packb({"t": "hello", "v": 99, "node_id": "x", "nonce": auth.make_nonce()})
        )
        assert await close_code(ws) == CLOSE_VERSION
        await ws.close()
    assert rec.calls == 0


async def test_version_mismatch_raises_protocol_error_on_dialler() -> None:
    # A fake server that answers the hello with a challenge of another version.
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await ws.send_bytes(
            msgpack.packb(
                {"t": "challenge", "v": 1, "node_id": "z", "nonce": b"n" * 32, "proof": b""}
            )
        )
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get(PATH, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec = Recorder()
    try:
        async with make("a", rec) as a:
            with pytest.raises(ProtocolError):
                await a.connect(f"ws://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
    assert rec.calls == 0


async def test_handshake_timeout_closes() -> None:
    rec = Recorder()
    async with make("a", rec, handshake_timeout=0.3) as a, aiohttp.ClientSession() as s:
        ws = await s.ws_connect(a.url + PATH)
        assert await close_code(ws) == CLOSE_HANDSHAKE_TIMEOUT
        await ws.close()
    assert rec.calls == 0


async def test_unreachable_peer() -> None:
    rec = Recorder()
    async with make("a", rec) as a:
        async with make("gone", Recorder()) as gone:
            url = gone.url
        with pytest.raises(PeerUnreachable) as info:
            await a.connect(url)
        assert isinstance(info.value, ConnectionError)


# --------------------------------------------------------------------------- one link per pair


async def test_simultaneous_dial_keeps_exactly_one_link() -> None:
    for _ in range(10):
        async with pair() as (a, ra, b, rb):
            la, lb = await asyncio.gather(a.connect(b.url), b.connect(a.url))
            assert a.links == {"b": la}
            assert b.links == {"a": lb}
            # the two survivors are the two ends of one connection
            await la.send(b"ping")
            assert await rb.next_frame("a") == b"ping"
            await lb.send(b"pong")
            assert await ra.next_frame("b") == b"pong"
            assert la.dialled_by_us != lb.dialled_by_us
            # lower node id dialled the survivor
            assert la.dialled_by_us
            assert ra.calls == rb.calls == 1
            assert not la.closed
            assert not lb.closed
        assert other_tasks() == set()


async def test_existing_link_is_reused_and_undisturbed() -> None:
    async with pair() as (a, ra, b, rb):
        la = await a.connect(b.url)
        assert await a.connect(b.url) is la
        lb = await rb.next_link()
        assert await b.connect(a.url) is lb
        await la.send(b"still here")
        assert await rb.next_frame("a") == b"still here"
        assert ra.calls == rb.calls == 1
        assert not la.closed
        assert not lb.closed


# --------------------------------------------------------------------------- bad frames


async def test_oversize_frames() -> None:
    async with pair(max_frame=1024) as (a, _ra, b, rb), aiohttp.ClientSession() as s:
        la = await a.connect(b.url)
        with pytest.raises(FrameTooLarge):
            await la.send(b"x" * 1025)
        await la.send(b"y" * 1024)
        assert await rb.next_frame("a") == b"y" * 1024

        raw, _ = await raw_handshake(s, b.url)
        await raw.send_bytes(b"z" * 1025)
        assert await close_code(raw) == CLOSE_TOO_LARGE
        await raw.close()

        raw, _ = await raw_handshake(s, b.url, node_id="raw2")
        await raw.send_str("text is not a frame")
        assert await close_code(raw) == CLOSE_PROTOCOL
        await raw.close()

        # the other link keeps working
        await la.send(b"after")
        assert await rb.next_frame("a") == b"after"
        assert not la.closed
        assert set(b.links) == {"a"}


_HANDSHAKE_KEYS = st.sampled_from(["t", "v", "node_id", "nonce", "proof", "hello", "x"])
_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can encode
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    _INTS,
    st.binary(max_size=40),
    st.text(max_size=20),
    st.sampled_from(["hello", "auth", "challenge", "welcome", 1, 2]),
    st.lists(_INTS, max_size=3),
)
_GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100),
    st.dictionaries(_HANDSHAKE_KEYS, _VALUES, max_size=7).map(
        lambda d: msgpack.packb(d, use_bin_type=True)
    ),
)


def test_garbage_during_handshake_never_crashes_the_server() -> None:
    """Hostile first or third handshake messages close only that connection."""
    with asyncio.Runner() as runner:
        rec = Recorder()
        transport = make("srv", rec, secret=b"mesh", host="127.0.0.1")
        runner.run(transport.__aenter__())
        session = runner.run(_new_session())
        try:

            @settings(max_examples=60, deadline=None, database=None)
            @given(garbage=_GARBAGE, after_hello=st.booleans())
            def one(garbage: bytes | str, after_hello: bool) -> None:
                runner.run(_send_garbage(session, transport.url, garbage, after_hello))

            one()
            # and the server still serves real peers
            good = Recorder()

            async def real_peer() -> None:
                async with make("good", good, secret=b"mesh", host="127.0.0.1") as peer:
                    link = await peer.connect(transport.url)
                    await link.send(b"hello after garbage")
                    assert await rec.next_frame("good") == b"hello after garbage"

            runner.run(real_peer())
            assert rec.calls == 1
        finally:
            runner.run(session.close())
            runner.run(transport.__aexit__(None, None, None))


async def _new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


async def _send_garbage(
    session: aiohttp.ClientSession, url: str, garbage: bytes | str, after_hello: bool
) -> None:
    ws = await session.ws_connect(url + PATH)
    try:
        if after_hello:
            await ws.send_bytes(pack("hello", node_id="hostile", nonce=auth.make_nonce()))
            msg = await ws.receive()
            assert msg.type is WSMsgType.BINARY
        if isinstance(garbage, str):
            await ws.send_str(garbage)
        else:
            await ws.send_bytes(garbage)
        code = await close_code(ws)
        assert code in {CLOSE_PROTOCOL, CLOSE_VERSION, CLOSE_AUTH, CLOSE_TOO_LARGE}, code
    finally:
        await ws.close()


# --------------------------------------------------------------------------- liveness


PEER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from subcog_crdt._transport.base import Hello
    from subcog_crdt._transport.websocket import WebSocketTransport

    async def on_link(link):
        async for frame in link:
            await link.send(frame)

    async def main():
        async with WebSocketTransport(
            node_id="frozen", hello=lambda: Hello(node_id="frozen", url=None), on_link=on_link
        ) as t:
            print(t.url, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)


@asynccontextmanager
async def echo_peer_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A node "frozen" in a child process that echoes every frame (``PEER_SCRIPT``):
    (the process, its url). Left running (SIGCONT first, if a test stopped it) and then
    killed at the end."""
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PEER_SCRIPT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(15):
            url = (await proc.stdout.readline()).decode().strip()
        assert url.startswith("ws://127.0.0.1:")
        yield proc, url
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        await proc.communicate()


async def frozen_until_dropped(proc: asyncio.subprocess.Process, rec: Recorder) -> None:
    """Freeze the peer process (SIGSTOP: its socket stays open, no FIN ever comes) until
    its link has ended at ``rec``'s node; then let it run again."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(DEADLINE):
            await rec.ended["frozen"].wait()
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def test_frozen_peer_is_dropped_by_the_heartbeat() -> None:
    """A peer that stops answering (SIGSTOP: its TCP socket stays open, so no FIN ever
    comes) is dropped by the heartbeat, and the heartbeat is set up so that it fires within
    ``dead_after``: the interval is lowered to fit (``heartbeat=5`` would be 7.5 s)."""
    rec = Recorder()
    async with (
        echo_peer_process() as (proc, url),
        make("a", rec, heartbeat=5.0, dead_after=3.0) as a,
    ):
        link = await a.connect(url)
        # The schedule aiohttp runs: a ping `heartbeat` after the last traffic, dead
        # `heartbeat / 2` after an unanswered ping; together within dead_after.
        ws: Any = link._ws
        assert ws._heartbeat is not None
        assert ws._heartbeat + ws._pong_heartbeat <= 3.0, (ws._heartbeat, ws._pong_heartbeat)
        await link.send(b"alive?")
        assert await rec.next_frame("frozen") == b"alive?"

        await frozen_until_dropped(proc, rec)
        assert link.closed
        assert link.close_code == CLOSE_ABNORMAL
        # aiohttp's heartbeat timeout ("No PONG received after ...") closed it, not a
        # broken connection or a close frame.
        assert "No PONG received" in link.close_reason, link.close_reason
        assert "frozen" not in a.links


async def test_add_peer_redials_after_restart() -> None:
    ra, rb = Recorder(), Recorder()
    async with make("a", ra) as a:
        async with make("b", rb) as b:
            url, port = b.url, b.port
            a.add_peer(url)
            first = await ra.next_link()
            assert first.peer.node_id == "b"
        async with asyncio.timeout(DEADLINE):
            await ra.ended["b"].wait()
        assert first.closed

        rb2 = Recorder()
        async with make("b", rb2, port=port) as b2:
            second = await ra.next_link()
            assert second is not first
            assert second.peer.node_id == "b"
            assert a.links == {"b": second}
            await second.send(b"back")
            assert await rb2.next_frame("a") == b"back"
            await a.remove_peer(url)
            assert b2.links.keys() == {"a"}
        a.add_peer(url)  # the redialer runs (failing) until the transport closes
    assert other_tasks() == set()


def fail_first_dial(
    monkeypatch: pytest.MonkeyPatch, t: WebSocketTransport, exc: Exception
) -> list[Exception]:
    """Make ``t``'s next dial raise ``exc``, later ones dial for real; returns the list
    that holds ``exc`` until it was raised."""
    real_connect = t.connect
    pending = [exc]

    async def connect(url: str, **kw: Any) -> Any:
        if pending:
            raise pending.pop()
        return await real_connect(url, **kw)

    monkeypatch.setattr(t, "connect", connect)
    return pending


async def test_add_peer_keeps_redialling_after_an_unexpected_error(monkeypatch, caplog) -> None:
    """An error the dialler does not expect (not one of ours) is logged and retried with
    backoff; it used to end the redial task, so that peer was never dialled again."""
    ra, rb = Recorder(), Recorder()
    async with make("a", ra) as a, make("b", rb) as b:
        failures = fail_first_dial(monkeypatch, a, RuntimeError("unexpected, once"))
        a.add_peer(b.url)
        link = await ra.next_link()
        assert link.peer.node_id == "b"
        assert not failures
        assert "unexpected, once" in caplog.text
        await a.remove_peer(b.url)


async def test_add_peer_does_not_duplicate_an_incoming_link() -> None:
    async with pair() as (a, ra, b, rb):
        lb = await b.connect(a.url)  # b dialled a
        la = await ra.next_link()
        a.add_peer(b.url)  # a should adopt the existing link, not dial a second one
        await lb.send(b"one")
        assert await ra.next_frame("b") == b"one"
        await la.send(b"two")
        assert await rb.next_frame("a") == b"two"
        assert a.links == {"b": la}
        assert b.links == {"a": lb}
        assert ra.calls == rb.calls == 1
        await a.remove_peer(b.url)


# --------------------------------------------------------------------------- lifecycle


async def test_lifecycle_close_twice_and_use_after_close() -> None:
    rec = Recorder()
    t = make("a", rec)
    with pytest.raises(ClosedError):
        _ = t.url
    async with t:
        url = t.url
    await t.aclose()
    with pytest.raises(ClosedError):
        await t.connect(url)
    with pytest.raises(ClosedError):
        t.add_peer(url)
    with pytest.raises(ClosedError):
        async with t:
            pass


async def test_shutdown_closes_links_with_going_away() -> None:
    async with pair() as (a, ra, b, rb):
        la = await a.connect(b.url)
        lb = await rb.next_link()
        await b.aclose()
        async with asyncio.timeout(DEADLINE):
            await ra.ended["b"].wait()
        assert la.close_code == 1001
        assert lb.close_code == 1001
        assert a.links == {}


async def test_handler_error_closes_link_with_1011() -> None:
    async def boom(link: Link) -> None:
        raise RuntimeError("handler bug")

    rb = Recorder()
    async with (
        WebSocketTransport(
            node_id="a", hello=lambda: Hello(node_id="a", url=None), on_link=boom
        ) as a,
        make("b", rb) as b,
    ):
        await a.connect(b.url)
        async with asyncio.timeout(DEADLINE):
            await rb.ended["a"].wait()
        link = await rb.next_link()
        assert link.close_code == 1011


async def test_setup_app_routes_are_served() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="node route")

    def setup(app: web.Application) -> None:
        app.router.add_get("/hello", hello)

    rec = Recorder()
    async with make("a", rec, setup_app=setup) as a, aiohttp.ClientSession() as s:
        assert a.app.router is not None
        async with s.get(a.url.replace("ws://", "http://") + "/hello") as resp:
            assert resp.status == 200
            assert await resp.text() == "node route"


async def test_port_in_use_is_reported() -> None:
    async with make("a", Recorder()) as a:
        with pytest.raises(InvalidArgument):
            async with make("b", Recorder(), port=a.port):
                pass


def write_self_signed(cert: Path, key: Path) -> None:
    """A self-signed P-256 certificate for IP 127.0.0.1, valid for a day, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (server context, client context).

    Made in Python with ``cryptography`` where it is installed, else with the openssl CLI;
    with neither the test skips, but fails under ``CI=true`` (it must run there)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            reason = "neither the cryptography package nor the openssl CLI is available"
            if in_ci():
                pytest.fail(f"{reason} (CI=true: the TLS test must run)")
            pytest.skip(reason)
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(key), "-out", str(cert),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
    else:
        write_self_signed(cert, key)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


async def test_wss_with_secret(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    kw: dict[str, Any] = {
        "secret": b"s",
        "host": "127.0.0.1",
        "ssl": server_ctx,
        "client_ssl": client_ctx,
    }
    async with pair(**kw) as (a, _ra, b, rb):
        assert b.url.startswith("wss://127.0.0.1:")
        link = await a.connect(b.url)
        await link.send(b"over tls")
        assert await rb.next_frame("a") == b"over tls"
        # The certificate is really checked: a dialler that does not trust it is refused.
        async with make("c", Recorder(), secret=b"s", host="127.0.0.1") as c:
            with pytest.raises(AuthError, match="certificate"):
                await c.connect(b.url)
        assert rb.calls == 1


# --------------------------------------------------------------------------- consume()


class Consumer:
    """A link handler that hands the link to ``consume()`` once ``go`` is set."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.link: WebSocketLink | None = None
        self.seen: list[bytes] = []
        self.gate: asyncio.Future[None] | None = None
        self.gate_at = b""
        self.fail_at = b""
        self.early: list[bytes] = []  # frames handed over while the gate was still shut
        self.error: BaseException | None = None
        self.returned = asyncio.Event()

    def __call__(self, frame: bytes) -> asyncio.Future[None] | None:
        if self.gate is not None and not self.gate.done():
            self.early.append(frame)
        self.seen.append(frame)
        if frame == self.fail_at:
            raise ProtocolError("refused")
        if frame == self.gate_at:
            self.gate = asyncio.get_running_loop().create_future()
            return self.gate
        return None

    @asynccontextmanager
    async def link_from_a(self, **b_options: Any) -> AsyncIterator[Link]:
        """Node "b" hands its links to this consumer; yield a link dialled from node "a"."""
        async with (
            make("a", Recorder()) as a,
            WebSocketTransport(
                node_id="b",
                hello=lambda: Hello(node_id="b", url=None),
                on_link=self.handler,
                **b_options,
            ) as b,
        ):
            yield await a.connect(b.url)

    async def pump_waiting_for_room(self, limit: int) -> None:
        """Wait until the link's inbox holds ``limit`` bytes and its read pump waits."""

        def inbox() -> Any:
            assert self.link is not None
            return self.link._inbox

        await eventually(lambda: self.link is not None and inbox()._size >= limit, "full")
        await eventually(lambda: not inbox()._writable.is_set(), "the pump waiting for room")

    async def handler(self, link: Link) -> None:
        assert isinstance(link, WebSocketLink)
        self.link = link
        await self.go.wait()
        try:
            await link.consume(self)
        except ProtocolError as exc:
            self.error = exc
            await link.close(CLOSE_PROTOCOL, "refused")
        finally:
            self.returned.set()


async def test_consume_hands_over_every_frame_in_order_and_stops_at_a_failure() -> None:
    c = Consumer()
    frames = [i.to_bytes(2, "big") for i in range(30)]
    c.gate_at, c.fail_at = frames[10], frames[20]
    async with c.link_from_a() as link:
        for f in frames[:5]:  # before consume(): buffered, handed over first
            await link.send(f)
        await eventually(lambda: c.link is not None and bool(c.link._inbox), "frames buffered")
        c.go.set()
        for f in frames[5:11]:  # frame 10 returns an awaitable that stays pending
            await link.send(f)
        await eventually(lambda: len(c.seen) == 11, "frames 0-10 handed over")
        for f in frames[11:20]:  # they wait behind it
            await link.send(f)
        await eventually(lambda: c.link is not None and bool(c.link._inbox), "later frames held")
        assert c.gate is not None
        c.gate.set_result(None)
        await eventually(lambda: len(c.seen) == 20, "frames 11-19 handed over")
        for f in frames[20:]:  # frame 20 raises: nothing after it is handed over
            with contextlib.suppress(ClosedError):
                await link.send(f)
        async with asyncio.timeout(DEADLINE):
            await c.returned.wait()
            await link.wait_closed()
        assert c.seen == frames[:21]
        assert c.early == []
        assert isinstance(c.error, ProtocolError)
        assert link.close_code == CLOSE_PROTOCOL


async def test_consume_after_the_link_closed_still_hands_over_what_arrived() -> None:
    c = Consumer()
    frames = [b"one", b"two", b"three"]
    async with c.link_from_a() as link:
        for f in frames:
            await link.send(f)
        await link.close()
        await eventually(lambda: c.link is not None and c.link.closed, "closed at b")
        c.go.set()
        async with asyncio.timeout(DEADLINE):
            await c.returned.wait()
        assert c.seen == frames
        assert c.error is None


async def test_a_frame_held_for_a_full_inbox_before_consume_is_handed_over() -> None:
    """Frames fill the inbox before consume() starts; the pump holds the next one, waiting
    for room. consume() drains the inbox; the held frame must follow without the peer
    sending anything more (it used to wait in the inbox for the next frame)."""
    c = Consumer()
    frames = [i.to_bytes(2, "big") for i in range(3)]  # two fill the inbox, the last waits
    async with c.link_from_a(recv_buffer=4) as link:
        for f in frames:
            await link.send(f)
        await c.pump_waiting_for_room(4)
        c.go.set()
        await eventually(lambda: len(c.seen) == len(frames), "every frame handed over")
        assert c.seen == frames


async def test_consume_keeps_order_when_the_inbox_filled_during_a_drain() -> None:
    """The pump waits for room in a full inbox while the consumer is busy; the drain task
    empties the inbox and ends; the frame the pump was holding must still come next."""
    c = Consumer()
    frames = [i.to_bytes(2, "big") for i in range(12)]
    c.gate_at = frames[0]
    c.go.set()
    async with c.link_from_a(recv_buffer=4) as link:
        await link.send(frames[0])
        await eventually(lambda: len(c.seen) == 1, "frame 0 handed over")
        for f in frames[1:4]:
            await link.send(f)
        await c.pump_waiting_for_room(4)
        assert c.gate is not None
        c.gate.set_result(None)
        for f in frames[4:]:
            await link.send(f)
        await eventually(lambda: len(c.seen) == len(frames), "every frame handed over")
        assert c.seen == frames


# --------------------------------------------------------------------------- add_peer: node ids


async def test_add_peer_replaces_a_redialer_that_expects_another_node() -> None:
    """A redialer expecting a node that is gone from ``url`` is replaced when the node now
    found there is added; it used to be kept (add_peer deduplicated by url alone), failing
    with AuthError forever, and the new node was never dialled."""
    ra, rc = Recorder(), Recorder()
    async with make("a", ra) as a, make("c", rc) as c:
        a.add_peer(c.url, node_id="b")  # b used to listen there
        a.add_peer(c.url, node_id="c")
        link = await ra.next_link()
        assert link.peer.node_id == "c"
        kept = a._redialers[c.url]
        a.add_peer(c.url, node_id="c")  # the same node again: the loop stays
        assert a._redialers[c.url] is kept
        a.add_peer(c.url)  # any node (a static peer, say): replaces the loop for c ...
        assert a._redialers[c.url] is not kept
        kept = a._redialers[c.url]
        a.add_peer(c.url, node_id="b")  # ... and is not replaced: it accepts any node
        assert a._redialers[c.url] is kept
        await a.remove_peer(c.url)
        assert c.url not in a._redialers
        assert a.links == {"c": link}  # removing the redialer leaves the link open


async def test_remove_peer_stops_the_redialer_before_it_is_awaited() -> None:
    """remove_peer() stops the loop when called, so an add_peer() right after (discovery
    reporting a node lost and another found at its url in one scan) keeps a loop; the loop
    used to be removed only once the returned coroutine ran, taking the new one with it."""
    ra, rc = Recorder(), Recorder()
    async with make("a", ra) as a, make("c", rc) as c:
        a.add_peer(c.url, node_id="b")
        old = a._redialers[c.url]
        pending = a.remove_peer(c.url)
        assert c.url not in a._redialers
        a.add_peer(c.url, node_id="c")
        await pending
        assert old.done()
        assert not a._redialers[c.url].done()
        link = await ra.next_link()
        assert link.peer.node_id == "c"


async def test_add_peer_again_after_its_redial_loop_gave_up(monkeypatch) -> None:
    """A redial loop ends on an error that retrying cannot fix; adding the url again must
    start a new one (the ended loop stayed registered, so it was a no-op)."""
    ra, rb = Recorder(), Recorder()
    async with make("a", ra) as a, make("b", rb) as b:
        fail_first_dial(monkeypatch, a, InvalidArgument("refused once"))
        a.add_peer(b.url)
        await eventually(lambda: a._redialers[b.url].done(), "the loop gave up")
        a.add_peer(b.url)
        link = await ra.next_link()
        assert link.peer.node_id == "b"
        await a.remove_peer(b.url)


async def test_a_start_cancelled_while_binding_leaves_no_listening_socket(monkeypatch) -> None:
    """Cancelled at asyncio's create_server's last step (the socket is bound, aiohttp has
    not recorded the server yet): the bind must finish and be cleaned up, not leave a
    listening socket behind until garbage collection (review)."""
    import asyncio.base_events as base_events
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    real_create_server = asyncio.BaseEventLoop.create_server
    real_sleep = base_events.tasks.sleep
    binding = {"on": False}
    starter: list[asyncio.Task[Any]] = []

    async def create_server(self: Any, *a: Any, **kw: Any) -> Any:
        binding["on"] = True
        try:
            return await real_create_server(self, *a, **kw)
        finally:
            binding["on"] = False

    async def sleep(delay: float, result: Any = None) -> Any:
        if delay == 0 and binding["on"] and starter and not starter[0].done():
            starter[0].cancel()  # the socket is listening at this point
        return await real_sleep(delay, result)

    monkeypatch.setattr(asyncio.BaseEventLoop, "create_server", create_server)
    monkeypatch.setattr(base_events.tasks, "sleep", sleep)
    t = make("a", Recorder(), port=port)
    starter.append(asyncio.ensure_future(t.__aenter__()))
    with pytest.raises(asyncio.CancelledError):
        await starter[0]
    monkeypatch.undo()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
