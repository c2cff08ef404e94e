"""Checks every ``Storage`` implementation must pass.

Like automerge-repo's ``runStorageAdapterTests(setup)``: the suite ships with the library
and each implementation's tests run it with a factory::

    def make(retention: Retention | None, reopen: bool) -> Storage: ...

``reopen=False`` returns a new, unopened storage over a fresh, empty location;
``reopen=True`` returns an unopened storage over the location of the previous call, after
the suite closed that one (a durable implementation reads its files back; the in-memory one
may return the same object). Each check runs on its own fresh location.

Run them all with ``await run_storage_conformance(make)``, or one by one from
``CHECKS`` (name -> coroutine function taking the factory) to get one test per check.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from subcog_crdt._storage.base import JournalRecord, Retention, Storage

__all__ = ["CHECKS", "StorageFactory", "run_storage_conformance"]

StorageFactory = Callable[[Retention | None, bool], Storage]
Check = Callable[[StorageFactory], Awaitable[None]]

NODE = "node-a"


def _rec(
    cursor: int, ns: str = "decisions", session: str = "s1", at_ms: int | None = None
) -> JournalRecord:
    at = int(time.time() * 1000) if at_ms is None else at_ms
    return JournalRecord(cursor, at, ns, "captured", f"w{cursor}", session)


async def _reopen(
    make: StorageFactory, old: Storage, retention: Retention | None = None
) -> Storage:
    await old.aclose()
    new = make(retention, True)
    return new


async def check_open_new(make: StorageFactory) -> None:
    s = make(None, False)
    state = await s.open(NODE)
    assert state.node_id == NODE
    assert state.docs == {}
    assert state.last_cursor == 0
    assert state.cursors == {}
    assert s.tail_seq("decisions") == 0
    assert s.tail_bytes("decisions") == 0
    assert s.oldest_cursor() == 1
    assert s.pruned_max_at_ms() == 0
    await s.aclose()


async def check_node_id_kept(make: StorageFactory) -> None:
    s = make(None, False)
    await s.open(NODE)
    s = await _reopen(make, s)
    state = await s.open("another-id")
    assert state.node_id == NODE, "the first stored node id wins"
    await s.aclose()


async def check_round_trip(make: StorageFactory) -> None:
    s = make(None, False)
    await s.open(NODE)
    await s.commit([("decisions", b"u1"), ("patterns", b"p1")], [_rec(1), _rec(2, "patterns")])
    await s.commit([("decisions", b"u2")], [_rec(3)])
    await s.commit([("decisions", b"u3")], [])
    assert s.tail_seq("decisions") == 3
    assert s.tail_seq("patterns") == 1
    assert s.tail_bytes("decisions") == 6
    s = await _reopen(make, s)
    state = await s.open(NODE)
    assert state.docs == {"decisions": [b"u1", b"u2", b"u3"], "patterns": [b"p1"]}
    assert state.last_cursor == 3
    assert s.tail_seq("decisions") == 3
    assert s.tail_bytes("decisions") == 6
    assert s.tail_bytes("patterns") == 2
    # Sequence numbers continue after a reopen.
    await s.commit([("decisions", b"u4")], [_rec(4)])
    assert s.tail_seq("decisions") == 4
    s = await _reopen(make, s)
    state = await s.open(NODE)
    assert state.docs["decisions"] == [b"u1", b"u2", b"u3", b"u4"]
    assert state.last_cursor == 4
    await s.aclose()


async def check_empty_commit(make: StorageFactory) -> None:
    s = make(None, False)
    await s.open(NODE)
    await s.commit([], [])
    assert s.tail_seq("decisions") == 0
    assert await s.read_journal(0, 10) == []
    await s.aclose()


async def check_compact_keeps_later(make: StorageFactory) -> None:
    s = make(None, False)
    await s.open(NODE)
    for i in range(1, 6):
        await s.commit([("decisions", b"u%d" % i)], [_rec(i)])
    await s.commit([("patterns", b"p1")], [_rec(6, "patterns")])
    await s.compact("decisions", b"SNAP(1-3)", 3)
    assert s.tail_seq("decisions") == 5
    assert s.tail_bytes("decisions") == 4  # u4 + u5
    await s.commit([("decisions", b"u6")], [_rec(7)])
    assert s.tail_seq("decisions") == 6
    assert s.tail_bytes("decisions") == 6
    s = await _reopen(make, s)
    state = await s.open(NODE)
    assert state.docs["decisions"] == [b"SNAP(1-3)", b"u4", b"u5", b"u6"]
    assert state.docs["patterns"] == [b"p1"], "other namespaces are untouched"
    assert s.tail_bytes("decisions") == 6
    # A second compaction replaces the first snapshot.
    await s.compact("decisions", b"SNAP(1-6)", 6)
    assert s.tail_bytes("decisions") == 0
    s = await _reopen(make, s)
    state = await s.open(NODE)
    assert state.docs["decisions"] == [b"SNAP(1-6)"]
    assert s.tail_seq("decisions") == 6
    await s.commit([("decisions", b"u7")], [])
    assert s.tail_seq("decisions") == 7
    s = await _reopen(make, s)
    state = await s.open(NODE)
    assert state.docs["decisions"] == [b"SNAP(1-6)", b"u7"]
    await s.aclose()


async def check_read_journal_filters(make: StorageFactory) -> None:
    s = make(None, False)
    await s.open(NODE)
    now = int(time.time() * 1000)
    recs = [
        _rec(1, "decisions", "s1", now - 5000),
        _rec(2, "patterns", "s2", now - 4000),
        _rec(3, "decisions", "s2", now - 3000),
        _rec(4, "facts", "s1", now - 2000),
        _rec(5, "decisions", "s1", now - 1000),
        JournalRecord(6, now, "decisions", "conflict", "w6", "s2", other="w5"),
    ]
    await s.commit([], recs[:3])
    await s.commit([], recs[3:])
    assert await s.read_journal(0, 100) == recs
    assert await s.read_journal(2, 100) == recs[2:]
    assert await s.read_journal(0, 2) == recs[:2]
    assert await s.read_journal(6, 100) == []
    got = await s.read_journal(0, 100, namespaces=frozenset({"decisions"}))
    assert [r.cursor for r in got] == [1, 3, 5, 6]
    got = await s.read_journal(0, 100, namespaces=frozenset({"decisions", "facts"}))
    assert [r.cursor for r in got] == [1, 3, 4, 5, 6]
    assert await s.read_journal(0, 100, namespaces=frozenset()) == []
    got = await s.read_journal(0, 100, exclude_session="s1")
    assert [r.cursor for r in got] == [2, 3, 6]
    got = await s.read_journal(0, 100, since_ms=now - 3000)
    assert [r.cursor for r in got] == [3, 4, 5, 6]
    got = await s.read_journal(
        1, 1, namespaces=frozenset({"decisions"}), exclude_session="s1", since_ms=now - 3500
    )
    assert [r.cursor for r in got] == [3]
    assert got[0] == recs[2]
    s = await _reopen(make, s)
    await s.open(NODE)
    assert await s.read_journal(0, 100) == recs, "the journal survives a reopen, records intact"
    await s.aclose()


async def check_retention_by_count(make: StorageFactory) -> None:
    retention = Retention(max_events=5, max_age=None)
    s = make(retention, False)
    await s.open(NODE)
    for i in range(1, 13):
        await s.commit([], [_rec(i)])
    got = await s.read_journal(0, 100)
    assert [r.cursor for r in got] == [8, 9, 10, 11, 12]
    assert s.oldest_cursor() == 8
    s = await _reopen(make, s, retention)
    await s.open(NODE)
    assert s.oldest_cursor() == 8, "the retention point survives a reopen"
    await s.commit([], [_rec(13)])
    got = await s.read_journal(0, 100)
    assert [r.cursor for r in got] == [9, 10, 11, 12, 13]
    assert s.oldest_cursor() == 9
    await s.aclose()


async def check_retention_by_age(make: StorageFactory) -> None:
    retention = Retention(max_events=1000, max_age=3600.0)
    s = make(retention, False)
    await s.open(NODE)
    now = int(time.time() * 1000)
    old = now - 2 * 3600 * 1000
    await s.commit([], [_rec(1, at_ms=old), _rec(2, at_ms=old + 1)])
    await s.commit([], [_rec(3, at_ms=now), _rec(4, at_ms=now)])
    got = await s.read_journal(0, 100)
    assert [r.cursor for r in got] == [3, 4]
    assert s.oldest_cursor() == 3
    s = await _reopen(make, s, retention)
    await s.open(NODE)
    assert s.oldest_cursor() == 3
    assert [r.cursor for r in await s.read_journal(0, 100)] == [3, 4]
    await s.aclose()


async def check_retention_all_expired(make: StorageFactory) -> None:
    retention = Retention(max_events=1000, max_age=60.0)
    s = make(retention, False)
    await s.open(NODE)
    old = int(time.time() * 1000) - 3600 * 1000
    await s.commit([], [_rec(1, at_ms=old), _rec(2, at_ms=old)])
    assert await s.read_journal(0, 100) == []
    assert s.oldest_cursor() == 3
    await s.aclose()


async def check_pruned_max_at_ms(make: StorageFactory) -> None:
    """The largest time of any dropped record, not the time of the newest one dropped: a
    record received from a peer keeps its own (older) time, so times do not grow with
    cursors."""
    retention = Retention(max_events=2, max_age=None)
    s = make(retention, False)
    await s.open(NODE)
    now = int(time.time() * 1000)
    await s.commit([], [_rec(1, at_ms=now - 1000), _rec(2, at_ms=now - 9000)])
    await s.read_journal(0, 100)
    assert s.pruned_max_at_ms() == 0, "nothing dropped yet"
    await s.commit([], [_rec(3, at_ms=now - 5000), _rec(4, at_ms=now - 7000)])
    assert [r.cursor for r in await s.read_journal(0, 100)] == [3, 4]
    assert s.pruned_max_at_ms() == now - 1000, "the largest at_ms among cursors 1 and 2"
    s = await _reopen(make, s, retention)
    await s.open(NODE)
    assert s.pruned_max_at_ms() == now - 1000, "kept across a reopen"
    await s.commit([], [_rec(5, at_ms=now - 8000)])
    assert [r.cursor for r in await s.read_journal(0, 100)] == [4, 5]
    assert s.pruned_max_at_ms() == now - 1000, "it never goes down"
    await s.commit([], [_rec(6, at_ms=now), _rec(7, at_ms=now - 6000), _rec(8, at_ms=now)])
    assert [r.cursor for r in await s.read_journal(0, 100)] == [7, 8]
    assert s.pruned_max_at_ms() == now
    await s.aclose()
    # Dropped by age: every dropped record is older than the limit.
    retention = Retention(max_events=1000, max_age=3600.0)
    s = make(retention, False)
    await s.open(NODE)
    old = now - 2 * 3600 * 1000
    await s.commit([], [_rec(1, at_ms=old + 5), _rec(2, at_ms=old), _rec(3, at_ms=now)])
    assert [r.cursor for r in await s.read_journal(0, 100)] == [3]
    assert s.pruned_max_at_ms() == old + 5
    s = await _reopen(make, s, retention)
    await s.open(NODE)
    assert s.pruned_max_at_ms() == old + 5
    await s.aclose()


async def check_cursors_persist(make: StorageFactory) -> None:
    s = make(None, False)
    await s.open(NODE)
    await s.save_cursor("s1", 5)
    await s.save_cursor("s2", 7)
    await s.save_cursor("s1", 9)
    s = await _reopen(make, s)
    state = await s.open(NODE)
    assert state.cursors == {"s1": 9, "s2": 7}
    await s.aclose()


async def check_subscriptions_persist(make: StorageFactory) -> None:
    s = make(None, False)
    state = await s.open(NODE)
    assert state.subscriptions == {}
    await s.save_subscriptions("s1", frozenset({"decisions", "patterns"}))
    await s.save_subscriptions("s2", frozenset())
    await s.save_subscriptions("s1", frozenset({"decisions"}))
    s = await _reopen(make, s)
    state = await s.open(NODE)
    assert state.subscriptions == {"s1": frozenset({"decisions"}), "s2": frozenset()}
    await s.aclose()


async def check_many_updates(make: StorageFactory) -> None:
    s = make(None, False)
    await s.open(NODE)
    expected = [b"%05d" % i + b"x" * (i % 50) for i in range(500)]
    for start in range(0, 500, 50):
        await s.commit(
            [("decisions", u) for u in expected[start : start + 50]],
            [_rec(i + 1) for i in range(start, start + 50)],
        )
    assert s.tail_seq("decisions") == 500
    assert s.tail_bytes("decisions") == sum(map(len, expected))
    s = await _reopen(make, s)
    state = await s.open(NODE)
    assert state.docs["decisions"] == expected
    assert state.last_cursor == 500
    got = await s.read_journal(490, 100)
    assert [r.cursor for r in got] == list(range(491, 501))
    await s.aclose()


CHECKS: dict[str, Check] = {
    "open_new": check_open_new,
    "node_id_kept": check_node_id_kept,
    "round_trip": check_round_trip,
    "empty_commit": check_empty_commit,
    "compact_keeps_later": check_compact_keeps_later,
    "read_journal_filters": check_read_journal_filters,
    "retention_by_count": check_retention_by_count,
    "retention_by_age": check_retention_by_age,
    "retention_all_expired": check_retention_all_expired,
    "pruned_max_at_ms": check_pruned_max_at_ms,
    "cursors_persist": check_cursors_persist,
    "subscriptions_persist": check_subscriptions_persist,
    "many_updates": check_many_updates,
}


async def run_storage_conformance(make: StorageFactory) -> None:
    """Run every check; the first failure raises AssertionError naming the check."""
    for name, check in CHECKS.items():
        try:
            await check(make)
        except AssertionError as exc:
            raise AssertionError(f"storage conformance check {name!r} failed: {exc}") from exc
