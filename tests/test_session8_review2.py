"""Review of the changes since 9f1eb9b (Origin refusal, mDNS scheme, TLS-only dialling,
self-claims that no longer end a kept peer, scrypt mesh key, ``_turn_due``, connect()
after close). Each failing test names the bug in its docstring; the others guard what
the change got right (each was seen to fail against a broken copy).

Only 127.0.0.1 is used: no test binds or dials another address."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path

import pytest
from aiohttp import web

from helpers import wait_for
from subcog_crdt import ClosedError, ConversationsApi, InvalidArgument
from subcog_crdt._transport.base import Hello, Link
from subcog_crdt._transport.websocket import PATH, WebSocketTransport

DEADLINE = 10.0
SECRET = b"a long random mesh secret for these tests"


async def _ignore(link: Link) -> None:
    async for _frame in link:
        pass


def transport(node_id: str, **kw: object) -> WebSocketTransport:
    kw.setdefault("host", "127.0.0.1")
    return WebSocketTransport(
        node_id=node_id,
        hello=lambda: Hello(node_id=node_id, url=None, user_id="u"),
        on_link=_ignore,
        **kw,  # type: ignore[arg-type]
    )


# -- connect() and close --------------------------------------------------------------


async def test_connect_raises_closed_error_when_the_node_closes_during_the_dial() -> None:
    """eea250d: "connect() raises ClosedError if the node closed while it waited". It does
    only for the wait for the link's registration (``_api.py`` ``connect``, the
    ``_check_open`` after the waiter). Closed while the dial itself is under way (the
    WebSocket open, the handshake waiting for the peer), the transport's shutdown closes
    its client session under the dial and ``connect`` raises ``PeerUnreachable``
    ("handshake ... failed (peer closed with 1006)" or "Connector is closed"), as if the
    peer were down, or, when the server's 101 has arrived, a bare ``AssertionError``
    from aiohttp (``client.py`` ``_ws_connect``: ``assert transport is not None``), which
    ``WebSocketTransport.connect`` does not map at all."""
    entered = asyncio.Event()
    release = asyncio.Event()

    async def silent_peer(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        entered.set()
        await release.wait()  # never answers the hello
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get(PATH, silent_peer)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"ws://127.0.0.1:{runner.addresses[0][1]}"
        api = ConversationsApi(user_id="u", host="127.0.0.1", discovery=())
        await api.open()
        dial = asyncio.create_task(api.connect(url))
        try:
            async with asyncio.timeout(DEADLINE):
                await entered.wait()
            await api.aclose()
            async with asyncio.timeout(DEADLINE):
                outcome = (await asyncio.gather(dial, return_exceptions=True))[0]
        finally:
            dial.cancel()
            await api.aclose()
        assert isinstance(outcome, ClosedError), f"connect() ended with {outcome!r}"
    finally:
        release.set()
        await runner.cleanup()


# -- a self-claim ends a kept peer only when this node's own server saw the dial ------


async def test_a_kept_url_naming_this_node_by_host_name_is_given_up() -> None:
    """The other direction, a regression of e326c43: before it, a kept URL that reached
    the node itself was given up at the first 4011. Now only URLs that ``_is_own_url``
    recognises are, so a URL naming this machine by its host name (or, on the LAN, by its
    address while it listens on 0.0.0.0: the shared ``peers=[...]`` list of a deployment
    names every node, itself too) is dialled again every ~5 s for as long as the node
    runs, each time a handshake slot and a WARNING "is this node itself (peer said so)".
    The node's own server saw that hello (its own id, and the dialler's nonce): that is
    proof enough, and the URL need not be guessed at (the node's own server marks a hello
    carrying a nonce of one of its own dials)."""
    # The machine's host name when it resolves to 127.0.0.1 (as here and on the CI kind);
    # else "localhost": either way a name the node's own URL does not spell.
    name = socket.gethostname()
    try:
        if socket.gethostbyname(name) != "127.0.0.1":
            name = "localhost"
    except OSError:
        name = "localhost"
    async with transport("b", secret=SECRET) as b:
        refused = 0

        class Count(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                nonlocal refused
                if "a node cannot link to itself" in record.getMessage():
                    refused += 1

        handler = Count(logging.WARNING)
        logger = logging.getLogger("subcog_crdt._transport.websocket")
        logger.addHandler(handler)
        try:
            url = f"ws://{name}:{b.port}"
            b.add_peer(url)
            loop_task = b._redialers[url]
            await wait_for(
                lambda: loop_task.done() or refused >= 2, DEADLINE, "a give-up or a redial"
            )
            assert loop_task.done(), f"dialled itself {refused} times and goes on"
            assert refused == 1
        finally:
            logger.removeHandler(handler)


# -- guards ---------------------------------------------------------------------------


async def test_a_tls_node_refuses_plaintext_off_this_machine_only() -> None:
    """A node set up for TLS (here ``client_ssl`` only) refuses a ``ws://`` URL off this
    machine before any connection (``_check_url``: the check is synchronous in
    ``add_peer``), but still accepts ``ws://`` on loopback and ``wss://`` anywhere."""
    ctx = ssl.create_default_context()
    async with transport("b", secret=SECRET, client_ssl=ctx) as b:
        for url in ("ws://192.0.2.7:8765", "ws://peer.example:8765", "ws://[2001:db8::1]:80"):
            with pytest.raises(InvalidArgument, match="TLS"):
                b._check_url(url)
        for url in ("ws://127.0.0.1:1", "ws://localhost:1", "wss://192.0.2.7:8765"):
            b._check_url(url)  # no error


def take_turn(api: ConversationsApi) -> None:
    """Make the next write yield (``_turn_due``): the loop has had no turn (its mark is
    pending) for longer than ``_TURN_EVERY``."""
    if api._turn_mark is not None:
        api._turn_mark.cancel()  # it would clear the mark below
    api._turn_at = 0.0
    api._turn_mark = asyncio.get_running_loop().call_soon(lambda: None)


async def test_a_write_parked_in_its_fair_turn_when_the_node_closes_changes_nothing(
    tmp_path: Path,
) -> None:
    """A write yields before it writes (``_turn_due``); ``close()`` called meanwhile (it marks the
    node closed synchronously) must make the parked capture raise ``ClosedError`` and
    leave nothing on disk (the checks come after the yield)."""
    async with ConversationsApi(data_dir=tmp_path, user_id="u", listen=False, discovery=()) as a:
        s = await a.register_session("s", subscribe=["d"])
        await s.capture("d", "before")
        take_turn(a)
        t = asyncio.create_task(s.capture("d", "parked during the close"))
        await asyncio.sleep(0)  # the capture runs up to its yield (a loop turn, no timing)
        assert not t.done()
        await a.aclose()
        outcome = (await asyncio.gather(t, return_exceptions=True))[0]
        assert isinstance(outcome, ClosedError), repr(outcome)
    async with ConversationsApi(data_dir=tmp_path, user_id="u", listen=False, discovery=()) as a:
        assert [m.content for m in a.memories("d")] == ["before"]


async def test_a_capture_cancelled_in_its_fair_turn_writes_nothing() -> None:
    """A capture cancelled while it yields (``_turn_due`` said to) has written nothing: no
    memory, no event, and the next capture of the same content is new."""
    async with ConversationsApi(user_id="u", listen=False, discovery=()) as a:
        s = await a.register_session("s", subscribe=["d"])
        take_turn(a)
        t = asyncio.create_task(s.capture("d", "cancelled"))
        await asyncio.sleep(0)  # parked in its turn
        t.cancel()
        outcome = (await asyncio.gather(t, return_exceptions=True))[0]
        assert isinstance(outcome, asyncio.CancelledError)
        assert a.memories("d") == []
        batch = await s.sync(0, include_own=True)
        assert list(batch.events) == []
