"""Small helpers shared by tests: waiting on conditions with a deadline (never sleeping as
synchronisation), and wiring in-memory nodes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack

from subcog_crdt import ConversationsApi
from subcog_crdt._peering import F_HELLO
from subcog_crdt._transport.base import Hello
from subcog_crdt._transport.memory import MemoryLink, memory_link_pair
from subcog_crdt._transport.websocket import WebSocketLink


async def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``cond`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def memory_nodes(count: int) -> AsyncIterator[list[ConversationsApi]]:
    """``count`` open in-memory nodes (no listening, no discovery), closed at the end."""
    nodes = [ConversationsApi(listen=False, discovery=()) for _ in range(count)]
    try:
        for n in nodes:
            await n.open()
        yield nodes
    finally:
        for n in nodes:
            await n.aclose()


def node(**kw: object) -> ConversationsApi:
    """A node with discovery off (on loopback unless told otherwise)."""
    return ConversationsApi(discovery=(), **kw)  # type: ignore[arg-type]


def listed(api: ConversationsApi) -> set[tuple[str, str]]:
    """(session id, node id) of every session ``api`` lists, its own included."""
    return {(s.id, s.node_id) for s in api.sessions.list()}


def link(a: ConversationsApi, b: ConversationsApi) -> tuple[MemoryLink, MemoryLink]:
    """Connect two in-memory nodes."""
    la, lb = memory_link_pair(a._hello(), b._hello())
    a.attach(la)
    b.attach(lb)
    return la, lb


def converged(nodes: list[ConversationsApi], ns: str) -> bool:
    return len({n.state_hash(ns) for n in nodes}) == 1 and nodes[0].state_hash(ns) != "0" * 64


def peer_lists_known(nodes: list[ConversationsApi]) -> bool:
    """Every node knows, for each peer, the peers that one is linked to (frame 5)."""
    by_id = {x.node_id: x for x in nodes}
    return all(
        p.peer_peers == frozenset(by_id[p.node_id]._links) for x in nodes for p in x._links.values()
    )


def drain(stream: Any) -> list[Any]:
    """Everything a stream holds right now (events and Lagged markers), without waiting."""
    out = []
    while (item := stream.get_nowait()) is not None:
        out.append(item)
    return out


def frames_of(messages: list[bytes]) -> list[list[Any]]:
    """Every sync frame in ``messages`` (a message may carry several)."""
    out: list[list[Any]] = []
    for m in messages:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(m)
        out.extend(unpacker)
    return out


def pack(frame: list[Any]) -> bytes:
    """A sync frame as a peer sends it."""
    out: bytes = msgpack.packb(frame, use_bin_type=True)
    return out


async def hand_driven_peer(api: ConversationsApi) -> tuple[MemoryLink, MemoryLink]:
    """Attach a peer "hostile" that the test drives by hand: (the node's end, the test's
    end). It has sent a valid hello naming namespace "d" and one session "ok", which the
    node lists by the time this returns."""
    ours = MemoryLink(Hello("hostile", None))
    theirs = MemoryLink(api._hello())
    ours._other, theirs._other = theirs, ours
    api.attach(ours)
    ok = {"id": "ok", "user_id": "u", "subscriptions": ["d"]}
    await theirs.send(pack([F_HELLO, ["d"], None, [ok], []]))
    await wait_for(
        lambda: any(s.id == "ok" and not s.is_local for s in api.sessions.list()),
        10,
        "the hand-driven peer's hello is in",
    )
    return ours, theirs


def url_of(api: ConversationsApi) -> str:
    """The url a listening node's peers dial (asserted to be there)."""
    assert api.url is not None, "the node does not listen"
    return api.url


def record_link_sends(
    monkeypatch: Any, record: Callable[[WebSocketLink, bytes, str], None]
) -> None:
    """Have ``record`` see every message any WebSocketLink sends, with the method that
    sent it: ``"send"`` (as it starts) or ``"send_now"`` (once written)."""
    send, send_now = WebSocketLink.send, WebSocketLink.send_now

    async def watched_send(self: WebSocketLink, frame: bytes) -> None:
        record(self, frame, "send")
        await send(self, frame)

    def watched_send_now(self: WebSocketLink, frame: bytes) -> bool:
        if not send_now(self, frame):
            return False
        record(self, frame, "send_now")
        return True

    monkeypatch.setattr(WebSocketLink, "send", watched_send)
    monkeypatch.setattr(WebSocketLink, "send_now", watched_send_now)
