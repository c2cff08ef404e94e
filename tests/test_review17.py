"""Review 17: ``Session.listen`` (callbacks inside the publish), publishing before the
forwarding in ``_propagate``, and the receive-path changes (no GC pause for small updates,
``Hlc.observe_valid``, the one-entry decoder's cached heads). Real nodes over loopback
sockets, no discovery."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map

from helpers import converged, drain, node, wait_for
from subcog_crdt import (
    Captured,
    Conflict,
    ConversationsApi,
    Event,
    InvalidArgument,
    Updated,
)
from subcog_crdt._core import ydecode
from subcog_crdt._core.ydecode import one_entry_update, read_update


def has_length(items: list[Any], n: int) -> bool:
    return len(items) == n


def has_memories(api: ConversationsApi, n: int) -> bool:
    return len(api.memories("d")) == n


def ids(events: list[Any]) -> list[tuple[str, int, str]]:
    return [(type(e).__name__, e.cursor, e.memory_id) for e in events]


async def linked(a: ConversationsApi, b: ConversationsApi) -> None:
    n_a, n_b = len(a.peers()), len(b.peers())
    assert a.url is not None
    await b.connect(a.url)
    await wait_for(lambda: len(a.peers()) == n_a + 1 and len(b.peers()) == n_b + 1, what="linked")


# -- listeners and streams inside one publish -----------------------------------------


async def test_a_stream_closed_by_a_listener_is_not_handed_the_event_after_its_close() -> None:
    """A listener that closes streams (their consumers are done) on an event: a stream
    that did not hold the event yet when ``close()`` returned must not yield it. The
    bus's snapshot for this event still names the closed streams, and
    ``Subscription._push`` (unlike ``Listener._push``) does not check ``_closed``: the
    event is queued after the close, and the ended iteration yields it."""
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=[])
        streams = [s.events() for _ in range(8)]
        # And one the bus offers every namespace's events to: after those of a named
        # namespace (the listener's), whatever the WeakSets' order.
        streams.append(api._bus.subscribe(lambda ev: True, 100, None))
        empty_at_close: list[int] = []

        def closes_them(ev: Event) -> None:
            if empty_at_close:
                return
            for i, st in enumerate(streams):
                if not st._queue:  # not offered this event yet
                    empty_at_close.append(i)
                st.close()

        s.listen(closes_them)
        await w.capture("d", "their consumers are done before this")
        assert empty_at_close, "every stream was offered the event before the listener"
        leaked = {i: ids([x async for x in streams[i]]) for i in empty_at_close}
        assert leaked == {i: [] for i in empty_at_close}, f"closed streams yielded {leaked}"


class _AsyncCallable:
    def __init__(self) -> None:
        self.seen: list[Event] = []

    async def __call__(self, ev: Event) -> None:
        self.seen.append(ev)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_object_with_an_async_call_is_refused_like_a_coroutine_function() -> None:
    """An instance whose ``__call__`` is ``async def`` is a coroutine function in all but
    name: called, it makes a coroutine that is never awaited, so every event is lost
    silently (a RuntimeWarning at best). ``inspect.iscoroutinefunction`` says False for
    it, so ``Listener`` accepts it."""
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=[])
        handler = _AsyncCallable()
        try:
            s.listen(handler)
        except InvalidArgument:
            return  # refused: as documented for coroutine functions
        await w.capture("d", "an event the handler never sees")
        assert handler.seen, "accepted, called, and the event lost (coroutine never awaited)"


async def test_a_listener_registering_listeners_and_streams_inside_a_batch() -> None:
    """capture_many: one publish, many events. A listener opening a stream and another
    listener on the first event: both get exactly the later events of the batch, in
    order; a stream opened before gets each event once."""
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=[])
        before = s.events()
        opened: dict[str, Any] = {}
        late: list[Event] = []

        def opens(ev: Event) -> None:
            if not opened:
                opened["stream"] = s.events()
                opened["listener"] = s.listen(late.append)
                opened["first"] = ev.cursor

        s.listen(opens)
        mems = await w.capture_many("d", [f"batch item {i}" for i in range(6)])
        all_events = drain(before)
        assert [e.memory_id for e in all_events] == [m.id for m in mems]
        later = [e for e in all_events if e.cursor > opened["first"]]
        assert ids(drain(opened["stream"])) == ids(later)
        assert ids(late) == ids(later)


async def test_include_own_and_conflicts_reach_listeners_as_streams() -> None:
    """Concurrent updates on two nodes: each node publishes a Conflict. A listener
    without include_own still gets it (never filtered as own), and listeners get what
    the streams get, in the same order."""
    async with node() as a, node() as b:
        sa = await a.register_session("s", subscribe=["d"])
        sb = await b.register_session("s", subscribe=["d"])
        await linked(a, b)
        m = await sa.capture("d", "base fact")
        await wait_for(lambda: converged([a, b], "d"), what="converged")
        got_own: list[Event] = []
        got: list[Event] = []
        sb.listen(got_own.append, include_own=True)
        sb.listen(got.append)
        st_own = sb.events(include_own=True)
        st = sb.events()
        await asyncio.gather(
            sa.update(m.id, content="base fact, by a"),
            sb.update(m.id, content="base fact, by b"),
        )
        await wait_for(lambda: converged([a, b], "d"), what="converged")
        await wait_for(lambda: any(isinstance(e, Conflict) for e in got), 5, "a conflict")
        assert ids(got_own) == ids(drain(st_own))
        assert ids(got) == ids(drain(st))
        assert any(isinstance(e, Conflict) for e in got_own)
        own_updates = [e for e in got_own if isinstance(e, Updated) and e.node_id == b.node_id]
        assert own_updates and not [e for e in got if e in own_updates]


# -- listeners during a peer's (deferred) delivery --------------------------------------


async def test_a_listener_reading_and_subscribing_during_deferred_deliveries(
    tmp_path: Path,
) -> None:
    """Every read a listener can make, in the receive of a peer's live update (before
    pycrdt has it), plus listeners and streams opened and closed inside it and writes
    started from it: the nodes converge, the stream opened beforehand gets each event
    once, in order, and a restart of the receiver holds every memory."""
    async with node() as a, node(data_dir=tmp_path / "b") as b:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        witness = sb.events(include_own=True)
        await linked(a, b)
        seen: list[tuple[str, int, str, int]] = []
        extra: list[Any] = []
        tasks: set[asyncio.Task[Any]] = set()

        def reads(ev: Event) -> None:
            if not isinstance(ev, Captured) or ev.node_id != a.node_id:
                return
            doc = b._docs["d"]
            behind = doc.unapplied
            got = b.get(ev.memory_id)
            hist = b.history(ev.memory_id)
            mems = b.memories("d")
            hits = sb.recall(ev.memory.content, namespaces=["d"])
            b.state_hash("d")
            seen.append((got.content, len(hist), ev.cursor, behind))
            assert any(x.id == ev.memory_id for x in mems)
            assert any(x.id == ev.memory_id for x in hits)
            # subscribe and unsubscribe in the callback
            extra.append(sb.events())
            extra.append(sb.listen(lambda e: None))
            if len(extra) > 4:
                extra.pop(0).close()
                extra.pop(0).close()
            if ev.memory.content.endswith("3"):
                t = asyncio.get_running_loop().create_task(sb.capture("d", "reply to 3"))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

        sb.listen(reads)
        made = []
        for i in range(1, 9):
            made.append(await sa.capture("d", f"live fact {i - 1}"))
            # One at a time: a burst arrives merged (not deferred).
            await wait_for(partial(has_length, seen, i), what=f"fact {i - 1} delivered")
        await wait_for(lambda: not tasks, what="the reply written")
        await wait_for(lambda: len(a.memories("d")) == 9, what="the reply reached a")
        await wait_for(lambda: converged([a, b], "d"), what="converged")
        assert [c for c, _, _, _ in seen] == [m.content for m in made]
        assert any(behind for *_, behind in seen), "no delivery was deferred: probe is moot"
        got = drain(witness)
        assert len({e.cursor for e in got}) == len(got)
        assert [e.cursor for e in got] == sorted(e.cursor for e in got)
        assert sorted(e.memory_id for e in got) == sorted(m.id for m in b.memories("d"))
        assert b._docs["d"].unapplied == 0
        expect = sorted(m.id for m in a.memories("d"))
        await b.aclose()
    async with node(data_dir=tmp_path / "b") as b2:
        assert sorted(m.id for m in b2.memories("d")) == expect


async def test_a_middle_node_listener_that_raises_and_reads_still_forwards() -> None:
    """A - B - C, B linked to both: a listener on B runs before B forwards A's writes to
    C. One that raises and one that reads (catching pycrdt up) must not keep A's writes
    from C, nor make C see a different state."""
    async with node() as a, node() as b, node() as c:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        sc = await c.register_session("c1", subscribe=["d"])
        await linked(a, b)
        await linked(c, b)
        assert len(a.peers()) == 1 and len(c.peers()) == 1
        calls: list[int] = []

        def raises(ev: Event) -> None:
            calls.append(ev.cursor)
            raise RuntimeError("listener bug")

        def reads(ev: Event) -> None:
            b.state_hash("d")
            b.history(ev.memory_id)

        sb.listen(reads)
        sb.listen(raises)
        at_c = sc.events()
        logging.getLogger("subcog_crdt._bus").setLevel(logging.CRITICAL)
        try:
            made = [await sa.capture("d", f"from a {i}") for i in range(6)]
            m = made[0]
            await sa.update(m.id, content="from a 0, amended")
            await sa.delete(made[1].id)
            await wait_for(lambda: converged([a, b, c], "d"), what="converged")
        finally:
            logging.getLogger("subcog_crdt._bus").setLevel(logging.NOTSET)
        assert len(calls) == 8
        assert sorted(x.id for x in c.memories("d")) == sorted(x.id for x in a.memories("d"))
        assert c.get(m.id).content == "from a 0, amended"
        got = drain(at_c)
        assert [type(e).__name__ for e in got].count("Captured") == 6
        assert len(got) == 8


async def test_closing_the_receiver_from_a_listener_keeps_what_it_published(
    tmp_path: Path,
) -> None:
    """A listener that closes its node (from a task) on a peer's event: every memory the
    node published an event for is in its log after a restart."""
    async with node() as a:
        sa = await a.register_session("a1", subscribe=["d"])
        b = node(data_dir=tmp_path / "b")
        await b.open()
        try:
            sb = await b.register_session("b1", subscribe=["d"])
            await linked(a, b)
            published: list[str] = []
            closing: list[asyncio.Task[None]] = []

            def on_event(ev: Event) -> None:
                published.append(ev.memory_id)
                if len(published) == 3 and not closing:
                    closing.append(asyncio.get_running_loop().create_task(b.aclose()))

            sb.listen(on_event)
            await sa.capture_many("d", ["one", "two"])
            await sa.capture("d", "three")
            await sa.capture("d", "four")
            await wait_for(lambda: closing and closing[0].done(), what="b closed")
        finally:
            await b.aclose()
        assert len(published) >= 3
    async with node(data_dir=tmp_path / "b") as b2:
        held = {m.id for m in b2.memories("d")}
        assert set(published) <= held


async def test_a_listener_unregistering_its_session_leaves_the_others_whole() -> None:
    """A listener that unregisters its own session (from a task) on a peer's event: it
    is called no more after that, and another session's stream on the same node gets
    every event exactly once."""
    async with node() as a, node() as b:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        other = await b.register_session("b2", subscribe=["d"])
        watch = other.events()
        await linked(a, b)
        calls: list[int] = []
        done: list[asyncio.Task[None]] = []

        def on_event(ev: Event) -> None:
            calls.append(ev.cursor)
            if not done:
                done.append(asyncio.get_running_loop().create_task(b.unregister_session("b1")))

        lis = sb.listen(on_event)
        made = []
        for i in range(1, 6):
            made.append(await sa.capture("d", f"fact {i - 1}"))
            await wait_for(partial(has_memories, b, i), what=f"fact {i - 1}")
        assert done and done[0].done() and lis.closed
        assert len(calls) == 1
        got = drain(watch)
        assert [e.memory_id for e in got] == [m.id for m in made]


# -- the one-entry decoder ---------------------------------------------------------------


def _yrs_update(key: str, value: str, root: str = "entries") -> bytes:
    d = Doc()
    m = d.get(root, type=Map)
    out: list[bytes] = []
    d.observe(lambda e: out.append(e.update))
    m[key] = value
    return out[0]


@pytest.mark.parametrize("klen", [1, 126, 127, 128, 129, 255, 16383, 16384])
def test_the_one_entry_reader_at_key_length_boundaries(klen: int) -> None:
    key = "k" * klen
    data = _yrs_update(key, "v")
    one = ydecode._read_one_entry(data, "entries")
    general = ydecode._read_any(data, "entries")
    assert one is not None and one.inserts[0].key == key
    assert one._replace(canonical=False) == general
    ins = general.inserts[0]
    assert one_entry_update(ins.client, ins.clock, "entries", key, "v") == data


@pytest.mark.parametrize("key", ["é" * 63 + "x", "é" * 64, "é" * 63 + "xy", "🙂" * 32])
def test_the_one_entry_reader_with_multibyte_keys_near_the_boundary(key: str) -> None:
    data = _yrs_update(key, "value")
    one = ydecode._read_one_entry(data, "entries")
    assert one is not None and one.inserts[0].key == key
    assert one._replace(canonical=False) == ydecode._read_any(data, "entries")


@pytest.mark.parametrize("other", ["entrie", "entries2", "entriesentries", "Entries"])
def test_a_root_whose_name_is_near_entries_is_not_read_as_entries(other: str) -> None:
    data = _yrs_update("a-key", "v", root=other)
    assert ydecode._read_one_entry(data, "entries") is None
    assert read_update(data, "entries").inserts == []
    # and the other way round: a reader for the longer/shorter name
    assert ydecode._read_one_entry(_yrs_update("a-key", "v"), other) is None


def test_a_non_minimal_key_length_is_left_to_the_general_reader() -> None:
    """0x80 0x00 is a non-minimal varuint 0 for the key length: the inline read sees
    0x80 and hands it to _varuint_at, which refuses it (the general reader reports)."""
    data = bytearray(_yrs_update("", "v"))
    head = ydecode._item_head("entries")
    at = data.index(head) + len(head)
    assert data[at] == 0
    data[at : at + 1] = b"\x80\x00"
    assert ydecode._read_one_entry(bytes(data), "entries") is None


@pytest.mark.parametrize("client", [1, 127, 128, 16383, 16384, 2**32 - 1, 2**32, 2**53 - 1])
def test_one_entry_update_matches_yrs_for_client_ids_at_varuint_boundaries(client: int) -> None:
    """The cached client head encodes the id as yrs does, whatever its length."""
    d = Doc(client_id=client)
    m = d.get("entries", type=Map)
    out: list[bytes] = []
    d.observe(lambda e: out.append(e.update))
    m["k1"] = "v1"
    m["k2"] = "v2"
    assert one_entry_update(client, 0, "entries", "k1", "v1") == out[0]
    assert one_entry_update(client, 1, "entries", "k2", "v2") == out[1]
    one = ydecode._read_one_entry(out[1], "entries")
    assert one is not None and one.blocks == [(client, 1, 2)]


# -- more listener probes -----------------------------------------------------------------


async def test_a_listener_replacing_itself_on_every_event_gets_each_once() -> None:
    """Each call closes its own listener and opens a new one (churn inside one publish):
    every event of a batch reaches exactly one of them, once, in order."""
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=[])
        got: list[int] = []
        current: list[Any] = []

        def once(ev: Event) -> None:
            got.append(ev.cursor)
            current.pop().close()
            current.append(s.listen(once))

        current.append(s.listen(once))
        mems = await w.capture_many("d", [f"item {i}" for i in range(5)])
        await w.capture("d", "single")
        await w.update(mems[0].id, content="item 0 amended")
        assert len(got) == 7 and got == sorted(set(got))
        assert len(api._bus._listeners) == 1


async def test_partial_of_a_coroutine_function_is_refused() -> None:
    import functools

    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])

        async def handler(tag: str, ev: Event) -> None:
            pass

        with pytest.raises(InvalidArgument):
            s.listen(functools.partial(handler, "x"))
        assert api._bus._listeners == set()


async def test_listeners_during_a_catch_up_on_connect_read_and_raise(tmp_path: Path) -> None:
    """The catch-up of a node that joins late (one large step 2, paused GC, not
    deferred): a listener that reads and one that raises on every event; every memory
    still reaches the receiver, its stream, and its log."""
    async with node() as a, node(data_dir=tmp_path / "b") as b:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        made = await sa.capture_many("d", [f"backlog fact number {i:04d}" for i in range(300)])
        stream = sb.events()
        reads: list[str] = []

        def reader(ev: Event) -> None:
            reads.append(b.get(ev.memory_id).content)

        def raiser(ev: Event) -> None:
            raise ValueError("listener bug")

        sb.listen(raiser)
        sb.listen(reader)
        logging.getLogger("subcog_crdt._bus").setLevel(logging.CRITICAL)
        try:
            await linked(a, b)
            await wait_for(lambda: len(reads) == 300, what="the catch-up's events")
            await wait_for(lambda: converged([a, b], "d"), what="converged")
        finally:
            logging.getLogger("subcog_crdt._bus").setLevel(logging.NOTSET)
        assert sorted(reads) == sorted(m.content for m in made)
        assert sorted(e.memory_id for e in drain(stream)) == sorted(m.id for m in made)
        await b.aclose()
    async with node(data_dir=tmp_path / "b") as b2:
        assert len(b2.memories("d")) == 300


async def test_resubscribing_from_a_listener_retargets_it_and_its_streams() -> None:
    """A listener that re-registers its session (from a task) with other namespaces on a
    peer's event: from then on it and the session's streams follow the new ones."""
    async with node() as a, node() as b:
        sa = await a.register_session("a1", subscribe=["d", "p"])
        sb = await b.register_session("b1", subscribe=["d"])
        await b.register_session("keep", subscribe=["p"])  # b holds "p" too
        stream = sb.events()
        await linked(a, b)
        got: list[str] = []
        moved: list[asyncio.Task[Any]] = []

        def on_event(ev: Event) -> None:
            got.append(ev.namespace)
            if not moved:
                loop = asyncio.get_running_loop()
                moved.append(loop.create_task(b.register_session("b1", subscribe=["p"])))

        sb.listen(on_event)
        await sa.capture("d", "in d")
        await wait_for(lambda: moved and moved[0].done(), what="resubscribed")
        await sa.capture("d", "in d, after")
        await sa.capture("p", "in p, after")
        await wait_for(lambda: len(b.memories("p")) == 1 and len(b.memories("d")) == 2)
        assert got == ["d", "p"]
        assert [e.namespace for e in drain(stream)] == ["d", "p"]


async def test_a_listener_raising_cancelled_error_loses_nothing(tmp_path: Path) -> None:
    """A callback that reads a cancelled future's result (``fut.result()``) raises
    ``asyncio.CancelledError``, a BaseException: ``EventBus.publish`` catches only
    Exception. Publishing now comes first in ``_propagate``, so it escapes before the
    outbox is taken, the update forwarded to C, its journal record made and its commit
    handed back. What B published (the memory is in its documents) must still reach C,
    B's journal (``sync``) and B's log."""
    async with node() as a, node(data_dir=tmp_path / "b") as b, node() as c:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        other = await b.register_session("b2", subscribe=["d"])
        await linked(a, b)
        await linked(c, b)
        cancelled = asyncio.get_running_loop().create_future()
        cancelled.cancel()
        published: list[str] = []

        def on_event(ev: Event) -> None:
            published.append(ev.memory_id)
            cancelled.result()  # raises CancelledError

        sb.listen(on_event)
        first = await sa.capture("d", "the first fact")
        await wait_for(lambda: published, what="b published it")
        assert b.get(first.id).content == "the first fact"
        problems = []
        try:
            await wait_for(lambda: len(c.memories("d")) == 1, 2, "forwarded to c")
        except AssertionError:
            problems.append("c never got it")
        batch = await other.sync(since=0)
        if first.id not in [e.memory_id for e in batch.events]:
            problems.append("b's journal has no event for it")
        if len(b.peers()) != 2:
            problems.append(f"b has {len(b.peers())} links")
        await b.aclose()
        async with node(data_dir=tmp_path / "b") as b2:
            if b2.memories("d") == []:
                problems.append("b's log lost it")
        assert problems == [], problems


async def test_an_own_write_whose_listener_raises_cancelled_error_is_stored(
    tmp_path: Path,
) -> None:
    """The same for a local write (include_own): the callback's CancelledError escapes
    ``publish`` inside ``_commit``, before ``_persist``: the caller's ``capture`` raises
    CancelledError (although nobody cancelled it), and the write, in the document and
    sent to peers, is not in the log nor the journal."""
    async with node(data_dir=tmp_path / "n") as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=["d"])
        cancelled = asyncio.get_running_loop().create_future()
        cancelled.cancel()

        def on_event(ev: Event) -> None:
            cancelled.result()

        s.listen(on_event, include_own=True)
        outcome = "returned"
        try:
            await s.capture("d", "an acknowledged fact?")
        except asyncio.CancelledError:
            outcome = "raised CancelledError"
        in_doc = [m.content for m in api.memories("d")]
        journal = [e.memory_id for e in (await w.sync(since=0)).events]
    async with node(data_dir=tmp_path / "n") as again:
        stored = [m.content for m in again.memories("d")]
    assert (outcome, in_doc, len(journal), stored) == (
        "returned",
        ["an acknowledged fact?"],
        1,
        ["an acknowledged fact?"],
    )
