"""Sessions of nodes met only at a relay (docs/yjs.md, "Relays"; src/subcog_crdt/_presence.py):
each node's session list is its awareness state in the directory room of the standard
Node relay ``@y/websocket-server`` 0.1.1 on loopback, so nodes that never link list each
other's sessions, follow changes, and drop a node's when its connection to the relay ends
(closed, or the process killed). Plus the codec and bounds of what a relay may send.
Waits are on conditions with deadlines."""

from __future__ import annotations

import asyncio
import json

import pytest

from helpers import listed, url_of, wait_for
from subcog_crdt import ProtocolError
from subcog_crdt._core.ydecode import varuint_bytes
from subcog_crdt._presence import MAX_STATE_BYTES, STALE_AFTER, Presence, encode_state, node_state
from support.nodeproc import NodeProc, stop_all
from support.noderelay import NodeRelay
from test_relay import SECRET, node

GONE = 10.0
"""Under the 15 s between renewals and the 45 s a state lives unrenewed: a change seen
within it was announced when it happened, and a drop came from the relay saying the
connection ended, not from expiry."""
START = 30.0


async def test_nodes_met_at_the_relay_list_each_others_sessions(relay: NodeRelay) -> None:
    async with node(relay.url) as a, node(relay.url) as b:
        await a.register_session("agent-a", subscribe=["decisions"])
        await b.register_session("agent-b")
        both = {("agent-a", a.node_id), ("agent-b", b.node_id)}
        await wait_for(lambda: listed(a) == both and listed(b) == both, START, "both listed")
        assert a.peers() == [] and b.peers() == []  # never linked: the relay told them
        info = b.sessions.get("agent-a")
        assert (info.is_local, info.node_id, info.subscriptions) == (
            False,
            a.node_id,
            ("decisions",),
        )
        await a.register_session("agent-a2")
        await wait_for(lambda: ("agent-a2", a.node_id) in listed(b), GONE, "a new session")
        await a.unregister_session("agent-a")
        await wait_for(lambda: ("agent-a", a.node_id) not in listed(b), GONE, "unregistered")
        await a.aclose()
        await wait_for(lambda: listed(b) == {("agent-b", b.node_id)}, GONE, "a's gone from b")


async def test_a_killed_node_process_leaves_the_others_lists(
    relay: NodeRelay, node_js: str
) -> None:
    started: list[NodeProc] = []
    try:
        async with node(relay.url) as a:
            await a.register_session("agent-a")
            child = await asyncio.to_thread(
                NodeProc.start,
                "--relay",
                relay.url,
                "--secret",
                SECRET,
                "--host",
                "127.0.0.1",
                "--session",
                "child-1",
                name="child",
            )
            started.append(child)
            await wait_for(
                lambda: ("child-1", child.node_id) in listed(a), START, "a sees the child"
            )
            await asyncio.to_thread(child.kill)
            await wait_for(
                lambda: listed(a) == {("agent-a", a.node_id)}, GONE, "the child's session gone"
            )
    finally:
        for p in started:
            p.kill()
        stop_all(started)


async def test_a_node_both_linked_and_met_at_the_relay_is_listed_once(
    relay: NodeRelay,
) -> None:
    async with node(relay.url) as a, node(relay.url) as b:
        await b.register_session("agent-b")
        await wait_for(lambda: ("agent-b", b.node_id) in listed(a), START, "via the relay")
        await a.connect(url_of(b))
        await wait_for(lambda: b.node_id in a._links, START, "linked")
        await wait_for(
            lambda: b.node_id in a._relays[0].presence.sessions(), START, "still at the relay"
        )
        assert [s.id for s in a.sessions.list()] == ["agent-b"]


# -- the codec and its bounds -----------------------------------------------------------------


def update(*clients: tuple[int, int, str]) -> bytes:
    body = varuint_bytes(len(clients))
    for cid, clock, text in clients:
        data = text.encode()
        body += varuint_bytes(cid) + varuint_bytes(clock) + varuint_bytes(len(data)) + data
    return varuint_bytes(len(body)) + body


def state(node_id: str, *sessions: str) -> str:
    entries = [{"id": s, "user_id": "u", "subscriptions": ["d"]} for s in sessions]
    return json.dumps({"subcog": 1, "node_id": node_id, "sessions": entries})


def test_presence_keeps_nodes_states_and_ignores_the_rest() -> None:
    p = Presence(own_client=1, own_node="me")
    assert p.apply(update((2, 1, state("n2", "s2"))), now=0.0)
    assert not p.apply(update((1, 5, state("n1", "x"))), now=0.0)  # our own client
    assert not p.apply(update((3, 1, state("me", "x"))), now=0.0)  # claims our node
    assert not p.apply(update((4, 1, '{"user": {"name": "cursor"}}')), now=0.0)  # stock
    assert not p.apply(update((5, 1, "not json")), now=0.0)
    assert not p.apply(update((6, 1, state("n6", "bad/id"))), now=0.0)
    assert not p.apply(update((2, 0, state("n2", "older"))), now=0.0)  # older clock
    assert {n: [s.id for s in ss] for n, ss in p.sessions().items()} == {"n2": ["s2"]}
    assert p.apply(update((2, 2, state("n2", "s2", "s3"))), now=1.0)
    assert [s.id for s in p.sessions()["n2"]] == ["s2", "s3"]
    assert p.sessions()["n2"][0].node_id == "n2" and not p.sessions()["n2"][0].is_local
    assert p.apply(update((2, 3, "null")), now=2.0)  # the relay: its connection ended
    assert p.sessions() == {}


def test_presence_expires_states_not_renewed() -> None:
    p = Presence(own_client=1, own_node="me")
    p.apply(update((2, 1, state("n2", "s"))), now=0.0)
    p.apply(update((3, 1, state("n3", "s"))), now=STALE_AFTER)
    assert not p.expire(STALE_AFTER)
    assert p.expire(STALE_AFTER + 1)
    assert set(p.sessions()) == {"n3"}


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x05\x01", update((2, 1, "x"))[:-1], varuint_bytes(3) + b"\x01\x02"],
)
def test_a_malformed_awareness_message_is_a_protocol_error(payload: bytes) -> None:
    p = Presence(own_client=1, own_node="me")
    p.apply(update((2, 1, state("n2", "s"))), now=0.0)
    with pytest.raises(ProtocolError):
        p.apply(payload, now=0.0)


def test_presence_holds_at_most_1024_clients() -> None:
    p = Presence(own_client=0, own_node="me")
    p.apply(update(*((i, 1, state(f"n{i}", "s")) for i in range(1, 1100))), now=0.0)
    assert len(p.sessions()) == 1024


def test_this_nodes_state_is_cut_to_what_fits_and_round_trips() -> None:
    sessions = [{"id": f"s{i:05d}", "user_id": "u" * 100, "subscriptions": []} for i in range(5000)]
    st = node_state("me", sessions)
    text = json.dumps(st, separators=(",", ":"))
    assert len(text) <= MAX_STATE_BYTES
    assert 0 < len(st["sessions"]) < 5000 and st["sessions"] == sessions[: len(st["sessions"])]
    p = Presence(own_client=1, own_node="other")
    assert p.apply(encode_state(9, 1, st), now=0.0)
    assert [s.id for s in p.sessions()["me"]] == [e["id"] for e in st["sessions"]]
    assert p.apply(encode_state(9, 2, None), now=0.0) and p.sessions() == {}
