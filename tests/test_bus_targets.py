"""The event bus keeps, per namespace, the streams an event is offered to (built on first
publish, dropped when the index changes): every change to who listens must show in the
next publish, and a stream dropped without ``close()`` must neither receive nor break
anything."""

from __future__ import annotations

import gc
from datetime import UTC, datetime

from subcog_crdt._bus import EventBus, Subscription
from subcog_crdt._core.events import Deleted, Event

AT = datetime(2026, 1, 1, tzinfo=UTC)


def ev(ns: str, cursor: int) -> Event:
    return Deleted(
        namespace=ns,
        cursor=cursor,
        at=AT,
        source_session="s",
        node_id="n",
        write_id=f"w{cursor}",
        memory_id="m",
    )


def drain(sub: Subscription) -> list[int]:
    got = []
    while (item := sub.get_nowait()) is not None:
        assert isinstance(item, Event)
        got.append(item.cursor)
    return got


def everything(_: Event) -> bool:
    return True


def test_a_stream_opened_after_a_publish_gets_the_next_events() -> None:
    bus = EventBus()
    first = bus.subscribe(everything, namespaces=frozenset({"a"}))
    bus.publish([ev("a", 1)])
    later = bus.subscribe(everything, namespaces=frozenset({"a"}))
    anywhere = bus.subscribe(everything)  # every namespace
    bus.publish([ev("a", 2), ev("b", 3)])
    assert drain(first) == [1, 2]
    assert drain(later) == [2]
    assert drain(anywhere) == [2, 3]


def test_a_retargeted_stream_gets_its_new_namespaces_only() -> None:
    bus = EventBus()
    sub = bus.subscribe(everything, namespaces=frozenset({"a"}))
    bus.publish([ev("a", 1), ev("b", 2)])
    bus.retarget(sub, frozenset({"b"}))
    bus.publish([ev("a", 3), ev("b", 4)])
    bus.retarget(sub, None)
    bus.publish([ev("a", 5), ev("c", 6)])
    assert drain(sub) == [1, 4, 5, 6]


def test_a_closed_stream_gets_nothing_more_and_the_others_still_do() -> None:
    bus = EventBus()
    gone = bus.subscribe(everything, namespaces=frozenset({"a"}))
    stays = bus.subscribe(everything, namespaces=frozenset({"a"}))
    bus.publish([ev("a", 1)])
    gone.close()
    bus.publish([ev("a", 2)])
    assert drain(gone) == [1]
    assert drain(stays) == [1, 2]


def test_a_stream_dropped_without_close_is_forgotten() -> None:
    bus = EventBus()
    stays = bus.subscribe(everything, namespaces=frozenset({"a"}))
    dropped = bus.subscribe(everything, namespaces=frozenset({"a"}))
    bus.publish([ev("a", 1)])  # both are now in the per-namespace targets
    pushed: list[int] = []
    original = Subscription._push

    def spy(sub: Subscription, event: Event) -> None:
        pushed.append(id(sub))
        original(sub, event)

    del dropped
    gc.collect()
    Subscription._push = spy  # type: ignore[method-assign,assignment]
    try:
        bus.publish([ev("a", 2)])
    finally:
        Subscription._push = original  # type: ignore[method-assign]
    assert pushed == [id(stays)]
    assert drain(stays) == [1, 2]
    assert len(bus._subs) == 1
    assert len(bus._by_ns["a"]) == 1


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    bus = EventBus()

    def broken(_: Event) -> bool:
        raise RuntimeError("subscriber bug")

    bus.subscribe(broken, namespaces=frozenset({"a"}))
    fine = bus.subscribe(everything, namespaces=frozenset({"a"}))
    bus.publish([ev("a", 1), ev("a", 2)])
    assert drain(fine) == [1, 2]
