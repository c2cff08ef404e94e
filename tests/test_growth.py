"""Unbounded growth in a long-running process: repetitions that should leave nothing
behind must not grow a node's structures or the set of live objects.

Each test repeats an operation N times and asserts a count (never a time): the size of
the structure that would grow, or how many of the objects made stay alive after a
garbage collection."""

from __future__ import annotations

import asyncio
import gc
import weakref
from functools import partial

from helpers import wait_for
from subcog_crdt import ConversationsApi, Subscription
from subcog_crdt._core.document import NamespaceDoc

ROUNDS = 30


async def test_dropped_event_streams_are_released() -> None:
    """A stream the caller drops without ``close()`` must not stay subscribed: the bus
    would keep it, and queue up to ``maxsize`` events in it, for the node's lifetime."""
    async with ConversationsApi(listen=False) as api:
        reader = await api.register_session("reader", subscribe=["ns"])
        writer = await api.register_session("writer", subscribe=["ns"])
        for _ in range(ROUNDS):
            reader.events()  # subscribed now, then dropped: no reference is left
        gc.collect()
        for i in range(20):
            await writer.capture("ns", f"memory {i}")
        held = sum(len(sub._queue) for sub in api._bus._subs if isinstance(sub, Subscription))
        assert len(api._bus._subs) == 0, f"{len(api._bus._subs)} dropped streams subscribed"
        assert held == 0, f"dropped streams hold {held} events"


async def test_stream_left_by_break_is_released() -> None:
    """``async for ev in s.events(): break`` (the usual way to wait for one event) ends
    the loop without closing the stream: repeating it must not pile up subscriptions."""
    async with ConversationsApi(listen=False) as api:
        reader = await api.register_session("reader", subscribe=["ns"])
        writer = await api.register_session("writer", subscribe=["ns"])
        got = []
        for i in range(ROUNDS):
            stream = reader.events()
            await writer.capture("ns", f"memory {i}")
            async for ev in stream:
                got.append(ev)
                break
            del stream
        gc.collect()
        assert len(got) == ROUNDS  # each loop got its event
        assert len(api._bus._subs) <= 1, f"{len(api._bus._subs)} abandoned streams subscribed"


async def test_closed_nodes_are_garbage_collected() -> None:
    """A node opened and closed many times in one process (tests, tools, an agent that
    reopens its node) must not leave every closed node, its documents and memories
    alive: a document's pycrdt observer (held on the Rust side, invisible to the cyclic
    collector) closes a cycle through the node."""
    nodes: list[weakref.ref[ConversationsApi]] = []
    docs: list[weakref.ref[NamespaceDoc]] = []
    for i in range(10):
        async with ConversationsApi(listen=False) as api:
            s = await api.register_session("s", subscribe=["ns"])
            await s.capture("ns", f"memory of node {i}")
            nodes.append(weakref.ref(api))
            docs.append(weakref.ref(api._docs["ns"]))
        del api, s
    gc.collect()
    alive_nodes = sum(r() is not None for r in nodes)
    alive_docs = sum(r() is not None for r in docs)
    assert alive_nodes == 0, f"{alive_nodes} of 10 closed nodes still alive"
    assert alive_docs == 0, f"{alive_docs} of 10 documents of closed nodes still alive"


def _parked(api: ConversationsApi) -> bool:
    return any(sub._waiters for sub in api._bus._subs)


async def test_a_parked_consumer_nobody_holds_still_gets_its_events() -> None:
    """The bus holds streams weakly (above), so a consumer task that nobody references,
    parked on its stream, must still be kept alive by the stream while it waits: else the
    collector takes the task, its stream and its future (a cycle), and it never wakes."""
    async with ConversationsApi(listen=False) as api:
        reader = await api.register_session("reader", subscribe=["ns"])
        writer = await api.register_session("writer", subscribe=["ns"])
        got: list[str] = []

        async def consume() -> None:
            async for ev in reader.events():
                got.append(ev.memory.content)  # type: ignore[union-attr]
                if len(got) == 2:
                    return

        asyncio.get_running_loop().create_task(consume())  # no reference kept
        await wait_for(partial(_parked, api), 10, "the consumer waiting on its stream")
        gc.collect()
        await writer.capture("ns", "first")
        await writer.capture("ns", "second")
        await wait_for(lambda: len(got) == 2, 10, "the parked consumer's events")
        assert got == ["first", "second"]
