"""Review 13: the event bus's per-namespace weak targets (``EventBus._targets``), the
class-based ``gc_paused``, ``PeerSync._on_update`` inlined, and an accepted WebSocket
link's read pump in a task of its own (``WebSocketTransport._serve_ws``).

Real nodes throughout (in-process links, or loopback WebSockets); every wait ends on its
condition, with a deadline only against hangs."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import msgpack
import pytest

from helpers import drain, link, url_of, wait_for
from subcog_crdt import Captured, ConversationsApi, Lagged, _peering
from subcog_crdt._core.gcpause import gc_paused
from subcog_crdt._transport.base import Hello, Link
from subcog_crdt._transport.memory import MemoryLink
from subcog_crdt._transport.websocket import WebSocketLink, WebSocketTransport

DEADLINE = 20.0
LOOPBACK: dict[str, Any] = {"host": "127.0.0.1", "discovery": ()}
F_HELLO, F_SV, F_DIFF, F_UPDATE = range(4)


def local(**kw: Any) -> ConversationsApi:
    return ConversationsApi(listen=False, discovery=(), **kw)


def contents(items: list[Any]) -> list[str]:
    out = []
    for item in items:
        assert isinstance(item, Captured), item
        out.append(item.memory.content)
    return out


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """Everything the running loop's exception handler is given meanwhile ("Task was
    destroyed but it is pending", "Task exception was never retrieved", ...)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


def other_tasks(baseline: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} - baseline


def pump_task(peer_id: str) -> asyncio.Task[Any] | None:
    """The read pump task of this process's link to ``peer_id``."""
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == f"subcog-link-pump-{peer_id}"]
    assert len(tasks) <= 1, tasks
    return tasks[0] if tasks else None


# -- 1. the event bus: every change to who listens shows in the next publish ------------


async def test_resubscribing_a_session_retargets_its_open_streams_after_a_publish() -> None:
    async with local() as a:
        s = await a.register_session("s", subscribe=["x"])
        w = await a.register_session("w", subscribe=["x", "y", "z"])
        stream = s.events()
        await w.capture("x", "x1")  # the bus now holds targets for "x"
        await w.capture("y", "y0")  # and for "y" (s not among them)
        assert await a.register_session("s", subscribe=["y"]) is s
        await w.capture("x", "x2")
        await w.capture("y", "y1")
        await a.register_session("s", subscribe=["x", "z"])
        await w.capture("x", "x3")
        await w.capture("y", "y2")
        await w.capture("z", "z1")
        await a.register_session("s")  # None: kept as they are
        await w.capture("z", "z2")
        assert contents(drain(stream)) == ["x1", "y1", "x3", "z1", "z2"]


async def test_a_session_with_no_subscriptions_gets_events_once_it_subscribes() -> None:
    async with local() as a:
        t = await a.register_session("t")  # no namespaces: indexed nowhere
        w = await a.register_session("w", subscribe=["x"])
        stream = t.events()
        await w.capture("x", "before")
        await a.register_session("t", subscribe=["x"])
        await w.capture("x", "after")
        await a.register_session("t", subscribe=[])
        await w.capture("x", "gone again")
        assert contents(drain(stream)) == ["after"]


async def test_include_own_filters_hold_with_cached_targets_local_and_from_a_peer() -> None:
    async with local() as a, local() as b:
        link(a, b)
        s = await a.register_session("s", subscribe=["x"])
        remote_same_id = await b.register_session("s", subscribe=["x"])
        others = s.events()
        everything = s.events(include_own=True)
        await s.capture("x", "own 1")
        await wait_for(lambda: a.peers() and b.peers(), DEADLINE, "linked")
        await remote_same_id.capture("x", "same id on b")
        await wait_for(lambda: len(everything._queue) == 2, DEADLINE, "b's write on a")
        await s.capture("x", "own 2")
        assert contents(drain(others)) == ["same id on b"]
        assert contents(drain(everything)) == ["own 1", "same id on b", "own 2"]


async def test_unregister_ends_streams_and_the_others_still_get_events() -> None:
    async with local() as a:
        s = await a.register_session("s", subscribe=["x"])
        keep = await a.register_session("keep", subscribe=["x"])
        gone = s.events(include_own=True)
        stays = keep.events(include_own=True)
        await s.capture("x", "one")
        await a.unregister_session("s")
        await keep.capture("x", "two")
        assert contents(drain(gone)) == ["one"]
        with pytest.raises(StopAsyncIteration):
            await gone.next(DEADLINE)
        assert contents(drain(stays)) == ["one", "two"]
        # Registered again: a new stream of the same id gets what comes next.
        again = await a.register_session("s", subscribe=["x"])
        fresh = again.events()
        await keep.capture("x", "three")
        assert contents(drain(fresh)) == ["three"]
        assert drain(gone) == []


async def test_closing_the_node_ends_a_stream_a_reader_waits_on() -> None:
    a = local()
    await a.open()
    try:
        s = await a.register_session("s", subscribe=["x"])
        stream = s.events(include_own=True)
        await s.capture("x", "one")
        assert contents(drain(stream)) == ["one"]
        reader = asyncio.ensure_future(stream.next(DEADLINE))
        await wait_for(lambda: a._bus._waiting, DEADLINE, "the reader waits")
    finally:
        await a.aclose()
    with pytest.raises(StopAsyncIteration):
        await reader
    assert not a._bus._subs


async def test_a_stream_dropped_without_close_is_skipped_and_new_ones_are_served() -> None:
    async with local() as a:
        s = await a.register_session("s", subscribe=["x"])
        w = await a.register_session("w", subscribe=["x"])
        kept = s.events()
        dropped = s.events()
        await w.capture("x", "one")
        assert contents(drain(dropped)) == ["one"]
        del dropped
        gc.collect()
        await w.capture("x", "two")  # the cached reference is dead: skipped
        later = s.events()
        await w.capture("x", "three")
        assert contents(drain(kept)) == ["one", "two", "three"]
        assert contents(drain(later)) == ["three"]
        assert set(a._bus._subs) == {kept, later}


async def test_a_reader_task_keeps_an_otherwise_unreferenced_stream_served() -> None:
    async with local() as a:
        s = await a.register_session("s", subscribe=["x"])
        w = await a.register_session("w", subscribe=["x"])
        got: list[str] = []

        async def read(stream: Any) -> None:
            async for item in stream:
                got.append(item.memory.content)

        await w.capture("x", "warm")  # targets built before the reader's stream exists
        task = asyncio.ensure_future(read(s.events()))
        await wait_for(lambda: a._bus._waiting, DEADLINE, "the reader waits")
        gc.collect()

        def has(n: int) -> Callable[[], bool]:
            return lambda: len(got) == n

        for i in range(3):
            await w.capture("x", f"live {i}")
            await wait_for(has(i + 1), DEADLINE, f"live {i}")
        await a.unregister_session("s")  # its streams end: the reader returns
        async with asyncio.timeout(DEADLINE):
            await task
        assert got == ["live 0", "live 1", "live 2"]


def _http(api: ConversationsApi) -> str:
    return url_of(api).replace("ws://", "http://", 1)


async def _sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


async def test_http_push_streams_subscribe_follow_resubscribe_and_end_with_the_client() -> None:
    async with ConversationsApi(**LOOPBACK) as api:
        await api.register_session("reader", subscribe=["x"])
        w = await api.register_session("w", subscribe=["x", "y"])
        await w.capture("x", "warm the targets")
        url = f"{_http(api)}/v1/sessions/reader/events"
        async with aiohttp.ClientSession() as client:
            async with client.get(url) as resp:
                assert resp.status == 200
                data = _sse_data(resp)
                await wait_for(lambda: len(api._bus._subs) == 1, DEADLINE, "the push stream")
                await w.capture("x", "x live")
                async with asyncio.timeout(DEADLINE):
                    first = await anext(data)
                await api.register_session("reader", subscribe=["y"])
                await w.capture("x", "x after resubscribe")
                await w.capture("y", "y after resubscribe")
                async with asyncio.timeout(DEADLINE):
                    second = await anext(data)
            assert first["memory"]["content"] == "x live"
            assert second["memory"]["content"] == "y after resubscribe"
            # The client left: the next event finds it gone and its stream ends.
            await w.capture("y", "nobody reads this")
            await wait_for(lambda: not api._bus._subs, DEADLINE, "the push stream closed")
            await w.capture("y", "after the push stream ended")
            async with client.get(url) as resp:
                data = _sse_data(resp)
                await wait_for(lambda: len(api._bus._subs) == 1, DEADLINE, "a new push stream")
                await w.capture("y", "for the new client")
                async with asyncio.timeout(DEADLINE):
                    third = await anext(data)
            assert third["memory"]["content"] == "for the new client"


# -- 2. gc_paused -------------------------------------------------------------------------


@contextlib.contextmanager
def collector(on: bool) -> Iterator[None]:
    was = gc.isenabled()
    (gc.enable if on else gc.disable)()
    try:
        yield
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("on", [True, False])
def test_gc_paused_nests_and_restores_the_callers_state_also_on_errors(on: bool) -> None:
    with collector(on):
        with gc_paused():
            assert not gc.isenabled()
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the inner one found it off: leaves it off
            with pytest.raises(KeyError), gc_paused():
                raise KeyError("inside")
            assert not gc.isenabled()
        assert gc.isenabled() is on
        with pytest.raises(ValueError, match="outer"), gc_paused():
            raise ValueError("outer")
        assert gc.isenabled() is on
        pause = gc_paused()
        with pytest.raises(RuntimeError), pause:
            raise RuntimeError("x")
        assert gc.isenabled() is on


@pytest.mark.parametrize("on", [True, False])
async def test_capture_many_and_a_peers_batch_leave_the_collector_as_found(on: bool) -> None:
    async with local() as a, local() as b:
        link(a, b)
        sa = await a.register_session("s", subscribe=["x"])
        sb = await b.register_session("r", subscribe=["x"])
        stream = sb.events()
        with collector(on):
            await sa.capture_many("x", [f"fact {i}" for i in range(50)])
            assert gc.isenabled() is on
            got: list[Any] = []

            def all_in() -> bool:
                got.extend(drain(stream))
                return len(got) >= 50

            await wait_for(all_in, DEADLINE, "b applied a's batch")
            assert gc.isenabled() is on
            with gc_paused():  # a caller's pause around both
                await sa.capture_many("x", ["inside a pause"])
                await wait_for(lambda: drain(stream), DEADLINE, "b applied it")
                assert not gc.isenabled()
            assert gc.isenabled() is on
        assert sorted(contents(got)) == sorted(f"fact {i}" for i in range(50))


# -- 3. PeerSync._on_update inlined ---------------------------------------------------------


def _pack(*frames: list[Any]) -> bytes:
    return b"".join(msgpack.packb(f, use_bin_type=True) for f in frames)


def _hostile(node: ConversationsApi, name: str) -> tuple[MemoryLink, MemoryLink]:
    ours = MemoryLink(Hello(name, None))
    theirs = MemoryLink(node._hello())
    ours._other, theirs._other = theirs, ours
    node.attach(ours)
    return ours, theirs


def _texts(n: int, tag: str) -> list[str]:
    return [f"{tag} memory {i}: " + "lorem ipsum dolor " * 16 for i in range(n)]


async def _updates(ns: str) -> tuple[bytes, bytes, bytes, bytes]:
    """A large update (> _SLICE_BYTES) of ``ns`` and three small ones of another writer."""
    async with local() as src, local() as other:
        s = await src.register_session("w", subscribe=[ns])
        await s.capture_many(ns, _texts(1200, "big"))
        big = src._docs[ns].diff()
        o = await other.register_session("o", subscribe=[ns])
        smalls = []
        sv = None
        for i in range(3):
            await o.capture(ns, f"small {i}")
            smalls.append(other._docs[ns].diff(sv))
            sv = other._docs[ns].doc.get_state()
    assert len(big) > _peering._SLICE_BYTES
    assert all(len(x) <= _peering._SLICE_BYTES for x in smalls)
    return big, smalls[0], smalls[1], smalls[2]


async def test_live_updates_behind_a_large_one_keep_their_order_across_messages() -> None:
    big, s0, s1, s2 = await _updates("d")
    async with local() as b:
        watcher = await b.register_session("watcher", subscribe=["d"])
        stream = watcher.events(maxsize=100_000)
        ours, theirs = _hostile(b, "peer")
        await theirs.send(_pack([F_HELLO, ["d"], None, [], []]))
        await theirs.send(_pack([F_UPDATE, "d", "w", big], [F_UPDATE, "d", "o", s0]))
        await theirs.send(_pack([F_UPDATE, "d", "o", s1]))
        await theirs.send(_pack([F_UPDATE, "d", "o", s2]))
        got: list[Any] = []

        def all_in() -> bool:
            got.extend(drain(stream))
            return len(got) >= 1203

        await wait_for(all_in, 60, "everything applied")
        assert ours.close_code is None
        names = contents(got)
        assert sorted(names[:1200]) == sorted(_texts(1200, "big"))
        assert names[1200:] == ["small 0", "small 1", "small 2"]
        assert not any(isinstance(x, Lagged) for x in got)


@pytest.mark.parametrize("large", [False, True])
async def test_live_updates_of_unshared_namespaces_adopted_or_dropped_as_before(
    large: bool,
) -> None:
    big, small, _, _ = await _updates("e")
    update = big if large else small
    big_p, small_p, _, _ = await _updates("p")
    update_p = big_p if large else small_p
    async with local(private_namespaces=["p"]) as b:
        ours, theirs = _hostile(b, "peer")
        await theirs.send(_pack([F_HELLO, ["d"], None, [], []]))
        # "e": not in the peer's hello, not held here: content adopts it (and b offers it
        # back with its state vector). "p": private here, dropped without applying.
        await theirs.send(_pack([F_UPDATE, "p", "o", update_p], [F_UPDATE, "e", "o", update]))
        expected = 1200 if large else 1
        await wait_for(lambda: "e" in b._docs and len(b.memories("e")) == expected, 60, "e adopted")
        peer = b._links["peer"]
        await wait_for(lambda: "e" in peer.shared, DEADLINE, "e offered to the peer")
        assert "p" not in b._docs
        assert "p" not in peer.shared
        assert ours.close_code is None


async def test_a_namespace_outside_sync_namespaces_is_dropped_live() -> None:
    _, small_e, _, _ = await _updates("e")
    _, small_d, _, _ = await _updates("d")
    async with local(sync_namespaces=["d"]) as b:
        watcher = await b.register_session("watcher", subscribe=["d"])
        stream = watcher.events()
        ours, theirs = _hostile(b, "peer")
        await theirs.send(_pack([F_HELLO, ["d", "e"], None, [], []]))
        await theirs.send(_pack([F_UPDATE, "e", "o", small_e]))
        await theirs.send(_pack([F_UPDATE, "d", "o", small_d]))  # handled after it
        got = await stream.next(DEADLINE)
        assert contents([got]) == ["small 0"]
        assert "e" not in b._docs
        assert "e" not in b._links["peer"].shared
        assert ours.close_code is None


@pytest.mark.parametrize("large", [False, True])
async def test_a_namespace_outside_the_peers_own_filter_is_dropped_live(large: bool) -> None:
    """The peer's hello filter says it does not sync "e": its content for "e" is not
    applied here (``_accepts_content``; ``_apply_remote`` checks only this node's side)."""
    big_e, small_e, _, _ = await _updates("e")
    _, small_d, _, _ = await _updates("d")
    async with local() as b:
        watcher = await b.register_session("watcher", subscribe=["d"])
        stream = watcher.events()
        ours, theirs = _hostile(b, "peer")
        await theirs.send(_pack([F_HELLO, ["d"], ["d"], [], []]))
        await theirs.send(_pack([F_UPDATE, "e", "o", big_e if large else small_e]))
        await theirs.send(_pack([F_UPDATE, "d", "o", small_d]))
        got = await stream.next(60)
        assert contents([got]) == ["small 0"]
        assert "e" not in b._docs
        assert ours.close_code is None


async def test_a_live_update_without_content_creates_no_namespace() -> None:
    """Adopting needs content: an update holding no blocks (only deletions, or nothing)
    for an unheld namespace is dropped (``_adopt``), before and after the inlining."""
    from pycrdt import Doc

    update = Doc().get_update()
    _, small_d, _, _ = await _updates("d")
    async with local() as b:
        watcher = await b.register_session("watcher", subscribe=["d"])
        stream = watcher.events()
        ours, theirs = _hostile(b, "peer")
        await theirs.send(_pack([F_HELLO, ["d"], None, [], []]))
        await theirs.send(_pack([F_UPDATE, "f", "o", update]))
        await theirs.send(_pack([F_UPDATE, "d", "o", small_d]))
        got = await stream.next(DEADLINE)
        assert contents([got]) == ["small 0"]
        assert "f" not in b._docs
        assert ours.close_code is None


# -- 4. an accepted link's read pump in its own task -------------------------------------


async def test_closing_the_accepting_node_with_links_open_leaves_nothing_behind() -> None:
    baseline = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    with loop_errors() as errors:
        a = ConversationsApi(**LOOPBACK)
        b = ConversationsApi(**LOOPBACK)
        c = ConversationsApi(**LOOPBACK)
        for n in (a, b, c):
            await n.open()
        await a.connect(url_of(b))  # b accepts both
        await c.connect(url_of(b))
        await wait_for(lambda: len(b.peers()) == 2, DEADLINE, "b has both")
        assert pump_task(a.node_id) is not None  # b's accepted link from a
        sb = await b.register_session("s", subscribe=["x"])
        await sb.capture("x", "over the accepted links")
        await wait_for(lambda: a.memories("x") and c.memories("x"), DEADLINE, "synced")
        async with asyncio.timeout(DEADLINE):
            await b.aclose()
        assert pump_task(a.node_id) is None
        assert pump_task(c.node_id) is None
        await wait_for(lambda: not a.peers() and not c.peers(), DEADLINE, "b gone")
        async with asyncio.timeout(DEADLINE):
            await a.aclose()
            await c.aclose()
        gc.collect()
        assert other_tasks(baseline) == set()
    assert errors == []


async def test_a_peer_that_disconnects_leaves_the_acceptors_peers() -> None:
    with loop_errors() as errors:
        async with ConversationsApi(**LOOPBACK) as b:
            a = ConversationsApi(**LOOPBACK)
            await a.open()
            try:
                await a.connect(url_of(b))
                await wait_for(lambda: b.peers(), DEADLINE, "b accepted a")
                pump = pump_task(a.node_id)
                assert pump is not None
            finally:
                await a.aclose()
            await wait_for(lambda: not b.peers(), DEADLINE, "a gone from b's peers")
            await wait_for(pump.done, DEADLINE, "b's pump for a ended")
            assert not pump.cancelled() and pump.exception() is None
            assert b._transport.links == {}
        gc.collect()
    assert errors == []


async def test_both_sides_dialling_ends_with_one_link_and_it_works() -> None:
    with loop_errors() as errors:
        async with ConversationsApi(**LOOPBACK) as a, ConversationsApi(**LOOPBACK) as b:
            results = await asyncio.gather(
                a.connect(url_of(b)), b.connect(url_of(a)), return_exceptions=True
            )
            assert all(r is None for r in results), results
            await wait_for(
                lambda: len(a.peers()) == 1 and len(b.peers()) == 1, DEADLINE, "one link"
            )
            la, lb = a._links[b.node_id].link, b._links[a.node_id].link
            assert la.dialled_by_us != lb.dialled_by_us
            sa = await a.register_session("s", subscribe=["x"])
            sb = await b.register_session("r", subscribe=["x"])
            stream = sb.events()
            await sa.capture("x", "through the surviving link")
            assert isinstance(await stream.next(DEADLINE), Captured)
            # Exactly one pump task per side for the pair.
            assert pump_task(a.node_id) is not None and pump_task(b.node_id) is not None
        gc.collect()
    assert errors == []


class _Reader:
    """A transport-level link handler that reads each link until it ends."""

    def __init__(self) -> None:
        self.links: asyncio.Queue[WebSocketLink] = asyncio.Queue()

    async def __call__(self, link: Link) -> None:
        assert isinstance(link, WebSocketLink)
        await self.links.put(link)
        async for _ in link:
            pass


def _transport(node_id: str, rec: _Reader) -> WebSocketTransport:
    def hello() -> Hello:
        return Hello(node_id=node_id, url=None, namespaces=("d",), user_id="u")

    return WebSocketTransport(node_id=node_id, hello=hello, on_link=rec, host="127.0.0.1")


def _handler_awaiting(task: asyncio.Task[Any]) -> asyncio.Task[Any]:
    """The task (aiohttp's request handler) that awaits ``task``."""
    waiting = [t for t in asyncio.all_tasks() if getattr(t, "_fut_waiter", None) is task]
    assert len(waiting) == 1, waiting
    return waiting[0]


async def test_cancelling_the_server_handler_cancels_the_pump_and_drops_the_link() -> None:
    baseline = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    with loop_errors() as errors:
        ra, rb = _Reader(), _Reader()
        async with _transport("a", ra) as a, _transport("b", rb) as b:
            la = await a.connect(b.url)
            async with asyncio.timeout(DEADLINE):
                lb = await rb.links.get()
            pump = pump_task("a")  # b's pump of the link it accepted from a
            assert pump is not None
            handler = _handler_awaiting(pump)
            handler.cancel()  # as aiohttp's shutdown does
            async with asyncio.timeout(DEADLINE):
                await lb.wait_closed()
                await la.wait_closed()
            await wait_for(pump.done, DEADLINE, "the pump ended")
            assert pump.cancelled()
            await wait_for(handler.done, DEADLINE, "the handler ended")
            assert b.links == {} and a.links == {}
            # b still accepts: a dials again.
            la2 = await a.connect(b.url)
            async with asyncio.timeout(DEADLINE):
                await rb.links.get()
            assert not la2.closed
        gc.collect()
        assert other_tasks(baseline) == set()
    assert errors == []


async def test_an_error_in_an_accepted_links_pump_is_logged_not_lost(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = WebSocketLink._pump

    async def failing(self: WebSocketLink) -> None:
        if self.dialled_by_us:
            await original(self)
            return
        self._pump_started = True
        try:
            raise RuntimeError("pump bug")
        finally:
            self._finish()

    monkeypatch.setattr(WebSocketLink, "_pump", failing)
    with loop_errors() as errors:
        ra, rb = _Reader(), _Reader()
        async with _transport("a", ra) as a, _transport("b", rb) as b:
            with caplog.at_level(logging.ERROR):
                la = await a.connect(b.url)
                async with asyncio.timeout(DEADLINE):
                    await la.wait_closed()
                await wait_for(
                    lambda: any(
                        r.exc_info and isinstance(r.exc_info[1], RuntimeError)
                        for r in caplog.records
                    ),
                    DEADLINE,
                    "the pump's error logged",
                )
            assert b.links == {}
        gc.collect()
    assert errors == []
