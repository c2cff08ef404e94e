"""``Session.listen``: a callback called with each event as the node publishes it. Real
nodes; the peer tests over loopback sockets."""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import drain, node, wait_for
from subcog_crdt import (
    Captured,
    ClosedError,
    Deleted,
    Event,
    InvalidArgument,
    Updated,
)


def holds(items: list[Any], n: int) -> Callable[[], bool]:
    return lambda: len(items) == n


def summary(events: list[Any]) -> list[tuple[str, int, str, str]]:
    return [(type(e).__name__, e.cursor, e.memory_id, e.source_session) for e in events]


async def test_a_listener_gets_what_a_stream_gets_in_the_same_order() -> None:
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d", "p"])
        other = await api.register_session("s2", subscribe=["d"])
        got: list[Event] = []
        own: list[Event] = []
        s.listen(got.append)  # no reference kept: the node holds it until closed
        gc.collect()
        s.listen(own.append, include_own=True)
        stream = s.events()
        own_stream = s.events(include_own=True)
        m = await other.capture("d", "shared fact")
        await other.update(m.id, content="shared fact, amended")
        await s.capture("d", "my own fact")
        await other.capture("x", "outside the subscriptions")
        await other.delete(m.id)
        assert summary(got) == summary(drain(stream))
        assert [type(e) for e in got] == [Captured, Updated, Deleted]
        assert summary(own) == summary(drain(own_stream))
        assert len(own) == 4


async def test_the_callback_runs_inside_the_write_before_it_returns() -> None:
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        seen_while_writing: list[bool] = []
        writing = False

        def on_event(ev: Event) -> None:
            seen_while_writing.append(writing)

        s.listen(on_event, include_own=True)
        writing = True
        await s.capture("d", "during the call")
        writing = False
        assert seen_while_writing == [True]


async def test_a_peers_capture_reaches_the_callback_in_the_receive_turn_and_reads_see_it() -> None:
    """Over real sockets: the callback runs before any stream consumer could (the stream
    holds the event unread), and a read inside it sees the memory although the update
    may not be in pycrdt yet (every read catches up first)."""
    async with node() as a, node() as b:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        stream = sb.events()
        consumed: list[Event] = []
        read_back: list[str | None] = []
        consumed_at_callback: list[int] = []

        async def consume() -> None:
            async for ev in stream:
                assert isinstance(ev, Event)
                consumed.append(ev)

        def on_event(ev: Event) -> None:
            assert isinstance(ev, Captured)
            got = b.get(ev.memory.id)
            read_back.append(got.content if got else None)
            consumed_at_callback.append(len(consumed))

        sb.listen(on_event)
        consumer = asyncio.get_running_loop().create_task(consume())
        await b.connect(a.url)
        await wait_for(lambda: len(a.peers()) == 1 and len(b.peers()) == 1, what="linked")
        for i in range(1, 6):
            await sa.capture("d", f"peer fact {i - 1}")
            await wait_for(holds(consumed, i), what=f"event {i} consumed")
        assert read_back == [f"peer fact {i}" for i in range(5)]
        assert b._docs["d"].unapplied == 0
        assert [e.memory.content for e in consumed if isinstance(e, Captured)] == read_back
        # Each event reached the callback while the stream's consumer had not had it.
        assert consumed_at_callback == [0, 1, 2, 3, 4]
        consumer.cancel()


async def test_a_failing_callback_is_logged_and_fails_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=[])
        calls: list[str] = []

        def fails(ev: Event) -> None:
            assert isinstance(ev, Captured)
            calls.append(ev.memory.content)
            raise RuntimeError("listener bug")

        s.listen(fails)
        after: list[Event] = []
        s.listen(after.append)
        stream = s.events()
        with caplog.at_level(logging.ERROR, logger="subcog_crdt._bus"):
            m1 = await w.capture("d", "first")
            m2 = await w.capture("d", "second")
        assert calls == ["first", "second"]  # still called for later events
        assert [e.memory_id for e in after] == [m1.id, m2.id]
        assert [e.memory_id for e in drain(stream)] == [m1.id, m2.id]
        assert api.get(m1.id) is not None and api.get(m2.id) is not None
        failures = [r for r in caplog.records if "a subscriber failed" in r.getMessage()]
        assert len(failures) == 2
        assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in failures)


async def test_bad_callbacks_are_refused_and_change_nothing() -> None:
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])

        async def coroutine_function(ev: Event) -> None:
            pass

        before = set(api._bus._listeners)
        with pytest.raises(InvalidArgument, match="plain function"):
            s.listen(coroutine_function)
        with pytest.raises(InvalidArgument, match="callable"):
            s.listen("print")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            s.listen(print, include_own=1)  # type: ignore[arg-type]
        assert set(api._bus._listeners) == before
        w = await api.register_session("w", subscribe=[])
        await w.capture("d", "nobody listening broke")  # nothing half-registered


async def test_close_stops_it_also_from_inside_its_own_callback() -> None:
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=[])
        once: list[Event] = []
        with s.listen(once.append) as scoped:
            await w.capture("d", "inside the block")
        assert scoped.closed
        got: list[str] = []

        def first_only(ev: Event) -> None:
            assert isinstance(ev, Captured)
            got.append(ev.memory.content)
            handle.close()

        handle = s.listen(first_only)
        await w.capture_many("d", ["one", "two", "three"])  # one publish, three events
        await w.capture("d", "four")
        assert [e.memory.content for e in once if isinstance(e, Captured)] == ["inside the block"]
        assert got == ["one"]
        assert api._bus._listeners == set()


async def test_it_follows_the_sessions_subscriptions_and_ends_with_it() -> None:
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=[])
        got: list[str] = []
        listener = s.listen(lambda ev: got.append(ev.namespace))
        await w.capture("d", "in d")
        await w.capture("p", "in p, not followed yet")
        await api.register_session("s1", subscribe=["p"])  # the same session, new namespaces
        await w.capture("d", "in d, no longer followed")
        await w.capture("p", "in p, followed now")
        assert got == ["d", "p"]
        await api.unregister_session("s1")
        assert listener.closed
        await w.capture("p", "after the session ended")
        assert got == ["d", "p"]
        with pytest.raises(ClosedError):
            s.listen(print)


async def test_a_callback_may_start_async_work() -> None:
    """The documented way to do async work from a listener: start a task."""
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=["d"])
        done: list[str] = []

        async def react(ev: Event) -> None:
            assert isinstance(ev, Captured)
            if ev.memory.content.startswith("ping"):
                await s.capture("d", "pong for " + ev.memory.content)
            done.append(ev.memory.content)

        tasks: set[asyncio.Task[None]] = set()

        def on_event(ev: Event) -> None:
            task = asyncio.get_running_loop().create_task(react(ev))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        s.listen(on_event)
        await w.capture("d", "ping 1")
        await wait_for(lambda: len(done) == 1 and not tasks, what="the reaction")
        assert sorted(m.content for m in api.memories("d")) == ["ping 1", "pong for ping 1"]


async def test_a_listener_closed_by_another_for_the_same_event_is_not_called() -> None:
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=[])
        calls: list[str] = []
        handles: dict[str, Any] = {}

        def closes(me: str, other: str) -> Callable[[Event], None]:
            def on_event(ev: Event) -> None:
                calls.append(me)
                handles[other].close()

            return on_event

        handles["x"] = s.listen(closes("x", "y"))
        handles["y"] = s.listen(closes("y", "x"))
        await w.capture("d", "one event, two listeners")
        # Whichever ran first closed the other before its turn.
        assert len(calls) == 1, calls


_EXITING_LISTENER = """
import asyncio, sys
from subcog_crdt import ConversationsApi

async def main() -> None:
    async with ConversationsApi(data_dir=sys.argv[1], discovery=(), listen=False) as api:
        s = await api.register_session("s1", subscribe=["d"])
        def leave(ev):
            raise SystemExit(3)
        s.listen(leave, include_own=True)
        await s.capture("d", "the write that made the listener exit")
        print("the capture returned", flush=True)
        await asyncio.Event().wait()  # for ever, unless the SystemExit reaches the loop

asyncio.run(main())
"""


def test_a_listener_exiting_the_process_exits_it_after_the_write_is_stored(
    tmp_path: Path,
) -> None:
    """SystemExit from a callback is not raised inside the write (the write would then
    be in memory and not stored): the loop gets it right after, and the process ends
    with it, the write on disk."""
    out = subprocess.run(
        [sys.executable, "-c", _EXITING_LISTENER, str(tmp_path / "n")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3, out.stderr

    async def reopened() -> list[str]:
        async with node(data_dir=tmp_path / "n", listen=False) as api:
            return [m.content for m in api.memories("d")]

    assert asyncio.run(reopened()) == ["the write that made the listener exit"]


async def test_a_callback_returning_a_coroutine_is_reported_and_the_coroutine_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain callable that returns a coroutine (a lambda around an async function)
    passes the registration check; its coroutine would never run. It is closed (no
    "never awaited" warning later) and the mistake logged, for every such event."""
    async with node() as api:
        s = await api.register_session("s1", subscribe=["d"])
        w = await api.register_session("w", subscribe=[])
        ran: list[Event] = []
        made: list[Any] = []

        async def handle(ev: Event) -> None:
            ran.append(ev)

        def wrapper(ev: Event) -> Any:
            made.append(handle(ev))
            return made[-1]

        s.listen(wrapper)
        with caplog.at_level(logging.ERROR, logger="subcog_crdt._bus"):
            await w.capture("d", "one")
            await w.capture("d", "two")
        assert len(made) == 2 and ran == []
        assert all(c.cr_frame is None for c in made)  # closed, not left pending
        reported = [r for r in caplog.records if "returned a coroutine" in r.getMessage()]
        assert len(reported) == 2
