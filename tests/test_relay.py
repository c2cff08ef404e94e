"""``relay=`` (docs/yjs.md, "Relays"; src/subcog_crdt/_relay.py): nodes that never dial
each other meet at the standard Node relay ``@y/websocket-server`` 0.1.1, on loopback.

What is asserted: a capture in a namespace that did not exist yet reaches the other node
as an event naming its session (the directory room tells it to join); an update comes
back the same way; a private namespace is in no room and not in the directory; rooms are
named from the secret (a node of another mesh on the same relay sees nothing); and after
the relay restarts empty, the nodes reconnect by themselves and what was written while it
was down arrives."""

from __future__ import annotations

import asyncio

import aiohttp
from pycrdt import Doc, Map

from helpers import wait_for
from subcog_crdt import Captured, ConversationsApi, Updated
from subcog_crdt._core.ydecode import ByteReader
from subcog_crdt._relay import room_name
from subcog_crdt._yjs import STEP1, sync_message
from support.noderelay import NodeRelay

SECRET = "correct horse battery staple, long enough"


def node(relay_url: str, secret: str = SECRET, **kw: object) -> ConversationsApi:
    return ConversationsApi(
        mesh_secret=secret, host="127.0.0.1", discovery=(), relay=relay_url, **kw
    )


async def room_contents(relay_url: str, room: str) -> Doc[Map[str]]:
    """What the relay holds in ``room``: joined as a plain y-websocket client."""
    doc: Doc[Map[str]] = Doc()
    async with aiohttp.ClientSession() as client, client.ws_connect(f"{relay_url}/{room}") as ws:
        await ws.send_bytes(sync_message(STEP1, b"\x00"))
        async with asyncio.timeout(30):
            while True:
                msg = await ws.receive()
                r = ByteReader(msg.data)
                if r.varuint() == 0 and r.varuint() == 1:  # sync step 2
                    doc.apply_update(r.raw(r.varuint()))
                    return doc


async def test_nodes_that_never_dial_each_other_sync_through_the_relay(relay: NodeRelay) -> None:
    async with (
        node(relay.url, private_namespaces=["secret-notes"]) as a,
        node(relay.url) as b,
    ):
        assert a.peers() == [] and b.peers() == []
        sb = await b.register_session("agent-b", subscribe=["decisions"])
        events = sb.events()
        sa = await a.register_session("agent-a", subscribe=["decisions", "secret-notes"])
        await sa.capture("secret-notes", "never leaves a")
        m = await sa.capture("decisions", "we chose SQLite WAL")  # a new namespace
        ev = await events.next(60)
        assert isinstance(ev, Captured)
        assert (ev.memory_id, ev.source_session, ev.node_id) == (m.id, "agent-a", a.node_id)
        assert b.get(m.id).content == "we chose SQLite WAL"

        a_events = sa.events()
        await sb.update(m.id, status="accepted")
        got = await a_events.next(60)
        assert isinstance(got, Updated)
        assert (got.source_session, dict(got.changes)) == ("agent-b", {"status": "accepted"})

        secret = SECRET.encode()
        directory = await room_contents(relay.url, room_name(secret, ""))
        assert sorted(directory.get("namespaces", type=Map).keys()) == ["decisions"]
        private = await room_contents(relay.url, room_name(secret, "secret-notes"))
        assert len(private.get("entries", type=Map)) == 0
        shared = await room_contents(relay.url, room_name(secret, "decisions"))
        assert len(shared.get("entries", type=Map)) == 2  # the capture and the update
        assert not any(n in b._docs for n in ("secret-notes",))


async def test_another_mesh_on_the_same_relay_sees_nothing(relay: NodeRelay) -> None:
    async with node(relay.url) as a, node(relay.url, secret="another mesh entirely") as other:
        sa = await a.register_session("agent-a", subscribe=["decisions"])
        await sa.capture("decisions", "for this mesh only")
        rooms = {"", "decisions"}
        await wait_for(lambda: a._relays[0].connected >= rooms, 30, "a's rooms joined")
        await wait_for(lambda: other._relays[0].connected == {""}, 30, "other's directory")
        # a's write reaches the relay (y-websocket has no acknowledgement: look again
        # until it is there, within a deadline).
        async with asyncio.timeout(30):
            while True:
                ours = await room_contents(relay.url, room_name(SECRET.encode(), "decisions"))
                if len(ours.get("entries", type=Map)) == 1:
                    break
        # other's directory is another room: it never hears of "decisions".
        assert room_name(b"another mesh entirely", "") != room_name(SECRET.encode(), "")
        theirs = await room_contents(relay.url, room_name(b"another mesh entirely", ""))
        assert len(theirs.get("namespaces", type=Map)) == 0
        assert "decisions" not in other._docs


async def test_after_the_relay_restarts_empty_the_nodes_catch_up(
    node_js: str, relay: NodeRelay
) -> None:
    async with node(relay.url) as a, node(relay.url) as b:
        sb = await b.register_session("agent-b", subscribe=["decisions"])
        events = sb.events()
        sa = await a.register_session("agent-a", subscribe=["decisions"])
        await sa.capture("decisions", "before the restart")
        assert (await events.next(60)).source_session == "agent-a"
        relay.stop()
        # Written while the relay is down: only a holds it.
        m = await sa.capture("decisions", "while the relay was down")
        again = NodeRelay(node_js, relay.port)
        try:
            ev = await events.next(60)  # b and a redial; a's step 2 brings it
            assert isinstance(ev, Captured)
            assert ev.memory_id == m.id
        finally:
            again.stop()
