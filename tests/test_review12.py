"""Review 12: new memories waiting for indexing in a list by number (``_fresh`` from
``_fresh_base``, older ones in ``_to_index``), the cyclic collector paused around batches
(``gc_paused``), ``prepare_content``, journal rows written through a generator in chunks
(``_journal_rows`` / ``_insert_rows``), and a peer's arrivals counting as writes for the
background indexer and compaction (``_apply_remote``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import subcog_crdt._api as api_module
from helpers import link, wait_for
from subcog_crdt import ConversationsApi, CorruptStorage, InvalidArgument, ProtocolError
from subcog_crdt._core import schema
from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.gcpause import gc_paused
from subcog_crdt._storage import sqlite as sqlite_mod
from subcog_crdt._storage.base import JournalRecord
from subcog_crdt._storage.sqlite import LOG_NAME, STORE_NAME, SqliteStorage
from support.coredocs import Counter, edit, foreign_update, restarted, send, still_doc

DEADLINE = 10.0
WORDS = ["alpha", "beta", "gamma", "delta", "eps"]
QUERIES = ["alpha", "beta gamma", "delta", "eps alpha", "t1", "t2", "alpha t1"]
NODES = ["00000000000000aa", "00000000000000bb", "00000000000000cc"]


def _ranked(doc: NamespaceDoc, q: str) -> list[tuple[float, str]]:
    return [(round(s, 9), m) for s, m in doc.search_ids(q, 100)]


def _capture_value(content: str, tags: list[str] | None = None) -> str:
    fields: dict[str, Any] = {"content": content}
    if tags:
        fields["tags"] = tags
    return json.dumps({"v": 1, "op": "capture", "set": fields})


# -- the index queue: a differential beyond tests/core/test_index_queue.py -----------------

_content = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)
_tags = st.sampled_from([[], ["t1"], ["t1", "t2"], ["t2"]])
_who = st.integers(0, 2)  # 0: the node under test; 1, 2: peers
_op = st.one_of(
    st.tuples(st.just("many"), _who, st.lists(st.tuples(_content, _tags), min_size=1, max_size=5)),
    st.tuples(st.just("one"), _who, _content, _tags),
    st.tuples(st.just("update"), _who, st.integers(0, 40), _content),
    st.tuples(st.just("retag"), _who, st.integers(0, 40), _tags),
    st.tuples(st.just("delete"), _who, st.integers(0, 40)),
    st.tuples(st.just("send"), st.integers(0, 2), st.integers(0, 2)),  # peer-to-peer too
    st.tuples(st.just("hostile"), st.integers(0, 60), _content, st.integers(0, 3)),
    st.tuples(st.just("restart"), st.sampled_from([None, 0, 1, 3])),
    st.tuples(st.just("flush"), st.integers(0, 4)),
    st.tuples(st.just("resolve"), st.integers(0, 3)),
    st.tuples(st.just("recall"), st.sampled_from(QUERIES)),
)


def _drive(ops: list[Any]) -> NamespaceDoc:
    """Three nodes; node 0 is the one under test. Peers write and deliver to each other in
    any order (so node 0 gets writes out of order, captures after their updates), a
    hostile writer overwrites entries on node 0, node 0 restarts (partly resolved)
    between writes, and its index is flushed and resolved in slices."""
    cursor = Counter()
    docs = [still_doc(n, cursor if i == 0 else Counter()) for i, n in enumerate(NODES)]
    for op in ops:
        kind = op[0]
        a = docs[0]
        if kind == "many":
            docs[op[1]].capture_many("s", [(c, {"tags": t} if t else {}) for c, t in op[2]])
        elif kind == "one":
            docs[op[1]].capture("s", op[2], {"tags": op[3]} if op[3] else {})
        elif kind in ("update", "retag", "delete"):
            d = docs[op[1]]
            ids = sorted(d.memory_ids())
            if not ids:
                continue
            try:
                edit(d, kind, ids[op[2] % len(ids)], op[3] if len(op) > 3 else None)
            except Exception:  # (a memory a hostile write put at the end of time)
                continue
        elif kind == "send":
            if op[1] != op[2]:
                send(docs[op[1]], docs[op[2]])
        elif kind == "hostile":
            keys = sorted(k for k in a.entries.keys() if k[20:21] == "/")  # noqa: SIM118
            if not keys:
                continue
            key = keys[op[1] % len(keys)]
            how = op[3]
            if how == 0:
                value = _capture_value(op[2])
            elif how == 1:
                value = _capture_value(op[2], ["t1"])
            elif how == 2:
                value = "junk"
            else:  # another entry's value
                value = str(a.entries[keys[(op[1] + 1) % len(keys)]])
            a.apply_update(foreign_update(a, {key: value}))
        elif kind == "restart":
            docs[0] = restarted(a, cursor)
            if op[1] is not None:
                docs[0].resolve_some(op[1])
        elif kind == "flush":
            a.flush_index(op[1])
        elif kind == "resolve":
            a.resolve_some(op[1])
        else:
            a.search_ids(op[1], 5)
    return docs[0]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_op, max_size=30))
def test_recall_of_a_running_node_is_what_a_restart_builds_under_peers_hostility_and_restarts(
    ops: list[Any],
) -> None:
    """Whatever the mix (writes from several peers arriving out of order, hostile
    overwrites, restarts followed by more writes and partial flushes and resolves, tags,
    deletes and revivals), the node's recall gives the same hits with the same scores as a
    node restarted from the same entries, and nothing is left waiting after a recall."""
    doc = _drive(ops)
    again = restarted(doc, resolve=True)
    for q in QUERIES:
        assert _ranked(doc, q) == _ranked(again, q), q
    assert doc.flush_index() == 0
    assert not doc._fresh and not doc._to_index and not doc.background_work
    # Every waiting entry was a live document's number (none beyond the documents).
    assert doc._fresh_base == len(doc._by_doc)


def test_the_latest_text_is_indexed_when_a_doc_is_rewritten_in_the_list_and_in_the_dict() -> None:
    """A memory changed while it waits (in ``_fresh``), and one changed after the list was
    emptied (in ``_to_index``): each ends indexed with its latest words only."""
    doc = still_doc()
    mems, _ = doc.capture_many("s", [("alpha one", {}), ("alpha two", {})])
    doc.update("s", mems[0].id, {"content": "beta one"})  # still waiting in the list
    assert doc._fresh and not doc._to_index
    assert doc.flush_index() == 0
    doc.update("s", mems[1].id, {"content": "gamma two"})  # now in the dict
    doc.update("s", mems[1].id, {"content": "delta two", "tags": ["t1"]})
    assert set(doc._to_index) == {1} and not doc._fresh
    assert [m for _, m in doc.search_ids("alpha", 10)] == []
    assert [m for _, m in doc.search_ids("beta", 10)] == [mems[0].id]
    assert [m for _, m in doc.search_ids("gamma", 10)] == []
    assert [m for _, m in doc.search_ids("delta t1", 10)] == [mems[1].id]
    assert _ranked(doc, "two") == _ranked(restarted(doc, resolve=True), "two")


def test_a_partial_flush_after_a_restart_then_new_writes_loses_no_document() -> None:
    """Restart: the loaded documents wait from number 0 (the list's base did not move),
    new captures come after a gap; flushing in slices in between loses none of them."""
    doc = still_doc()
    doc.capture_many("s", [(f"alpha {w} {i}", {"tags": ["t1"]}) for i, w in enumerate(WORDS)])
    again = restarted(doc)
    again.resolve_some(2)  # docs 0 and 1 wait in the list, the rest unresolved
    assert again.flush_index(1) == 1
    mems, _ = again.capture_many("s", [("alpha new", {}), ("beta new", {})])
    assert again.flush_index(2) >= 0
    again.resolve_some(1)
    again.flush_index(1)
    hits = {m for _, m in again.search_ids("alpha", 50)}
    assert hits == set(doc.memory_ids()) | {mems[0].id}
    assert {m for _, m in again.search_ids("t1", 50)} == set(doc.memory_ids())
    assert not again.background_work


class _Text(str):
    """A str subclass, as users pass them (numpy.str_, markupsafe.Markup, a StrEnum)."""


async def test_content_of_a_str_subclass_is_recalled() -> None:
    """Content given as a str subclass (numpy.str_, Markup, a StrEnum member) is stored as
    the plain str it holds (found in review: the index queue took a subclass for a
    (content, tags) pair, and recall raised TypeError)."""
    async with ConversationsApi(listen=False, discovery=()) as api:
        s = await api.register_session("s", subscribe=["d"])
        one = await s.capture("d", _Text("alpha single fact"))
        many = await s.capture_many("d", [_Text("alpha batch fact")])
        hits = {m.id for m in api.recall("alpha", namespace="d")}
        assert hits == {one.id, many[0].id}
        assert type(one.content) is str and type(many[0].content) is str


def test_a_two_letter_str_subclass_is_indexed_as_itself() -> None:
    """(Found in review: "ab" was unpacked as the word "a" tagged "b".)"""
    doc = still_doc()
    mems, _ = doc.capture_many("s", [(_Text("ab"), {})])
    assert [m for _, m in doc.search_ids("ab", 5)] == [mems[0].id]
    assert _ranked(doc, "ab") == _ranked(restarted(doc, resolve=True), "ab")


# -- the collector's pause -------------------------------------------------------------------


def test_an_invalid_item_in_a_batch_changes_nothing_and_leaves_the_collector_on() -> None:
    doc = still_doc()
    doc.capture_many("s", [("alpha kept", {})])
    doc.outbox.clear()
    before = (dict(doc.entries.items()), list(doc._fresh), dict(doc._to_index), doc._n_writes)
    for bad in [("", {}), (5, {}), ("x", {"tags": "t"}), ("a\x00b", {}), ("ok", {"nope": 1})]:
        assert gc.isenabled()
        with pytest.raises(InvalidArgument):
            doc.capture_many("s", [("beta fine", {}), bad, ("gamma fine", {})])  # type: ignore[list-item]
        assert gc.isenabled()
        after = (dict(doc.entries.items()), list(doc._fresh), dict(doc._to_index), doc._n_writes)
        assert after == before
        assert doc._local_txn == 0 and not doc.outbox
    assert [m for _, m in doc.search_ids("beta gamma", 10)] == []


def test_a_malformed_update_raises_protocol_error_and_leaves_the_collector_on() -> None:
    doc = still_doc()
    for junk in [b"", b"\x00", b"\xff" * 40, b"not an update at all"]:
        with pytest.raises(ProtocolError):
            doc.apply_update(junk)
        assert gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(ProtocolError):
            doc.apply_update(b"\xff" * 40)
        assert not gc.isenabled()  # the caller had it off: it stays off
    finally:
        gc.enable()


def test_nested_pauses_restore_the_collector_only_at_the_outermost() -> None:
    a = still_doc(NODES[0])
    b = still_doc(NODES[1])
    a.capture_many("s", [(f"fact {i}", {}) for i in range(5)])
    with gc_paused():
        with gc_paused():
            b.capture_many("t", [("inner", {})])
            send(a, b)
            assert not gc.isenabled()
        assert not gc.isenabled()
        with pytest.raises(KeyError), gc_paused():
            raise KeyError("x")
        assert not gc.isenabled()
    assert gc.isenabled()


async def test_a_failed_batch_through_the_api_captures_nothing_and_gc_stays_on() -> None:
    async with ConversationsApi(listen=False, discovery=()) as api:
        s = await api.register_session("s", subscribe=["d"])
        await s.capture("d", "alpha kept")
        with pytest.raises(InvalidArgument):
            await s.capture_many("d", ["beta", {"content": "gamma", "tags": 3}, "delta"])
        assert gc.isenabled()
        with pytest.raises(InvalidArgument):
            await s.capture_many("d", ["beta", "   "])
        assert gc.isenabled()
        assert [m.content for m in api.memories("d")] == ["alpha kept"]
        assert api.recall("beta", namespace="d") == []


async def test_an_open_whose_load_fails_leaves_the_collector_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _durable(tmp_path) as api:
        s = await api.register_session("s", subscribe=["d"])
        await s.capture("d", "alpha")

    def broken(self: NamespaceDoc, updates: Any) -> None:
        raise ValueError("damaged")

    monkeypatch.setattr(NamespaceDoc, "load", broken)
    with pytest.raises(CorruptStorage):
        await _durable(tmp_path).open()
    assert gc.isenabled()


# -- prepare_content -------------------------------------------------------------------------

_EDGE = [
    "x",
    " x ",
    "",
    " ",
    "\t\n",
    "a\x00",
    "\ud800",
    "é" * 10,
    None,
    5,
    b"bytes",
    ["list"],
    "x" * schema.MAX_CONTENT,
    "x" * (schema.MAX_CONTENT + 1),
    '"' * (schema._CONTENT_FITS + 1),
    "\x01" * (schema._CONTENT_FITS + 1),
    '"' * schema._CONTENT_FITS,
    "\x01" * schema.MAX_CONTENT,
    '"' * schema.MAX_CONTENT,
]


def _outcome(fn: Any, arg: Any) -> Any:
    try:
        return ("ok", fn(arg))
    except Exception as exc:
        return (type(exc), str(exc))


@pytest.mark.parametrize("content", _EDGE, ids=range(len(_EDGE)))
def test_prepare_content_is_prepare_fields_of_the_content_errors_included(content: Any) -> None:
    assert _outcome(schema.prepare_content, content) == _outcome(
        lambda c: schema.prepare_fields({"content": c}), content
    )


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet=st.characters(codec="utf-8")), st.binary()))
def test_prepare_content_agrees_with_prepare_fields_on_any_text(content: Any) -> None:
    assert _outcome(schema.prepare_content, content) == _outcome(
        lambda c: schema.prepare_fields({"content": c}), content
    )


# -- journal rows through _journal_rows / _insert_rows ----------------------------------------

NS = "d"
_NOW_MS = int(time.time() * 1000)  # (older records would go with the default retention)


def _rec(cursor: int, other: str = "") -> JournalRecord:
    return JournalRecord(cursor, _NOW_MS + cursor, NS, "captured", f"w{cursor}", "s", other)


def _db_view(data: Path) -> tuple[list[tuple[Any, ...]], dict[str, str]]:
    conn = sqlite3.connect(data / STORE_NAME)
    try:
        rows = conn.execute(
            "SELECT cursor, at_ms, ns, kind, write_id, session, other FROM journal ORDER BY cursor"
        ).fetchall()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()
    return rows, {k: str(v) for k, v in meta.items()}


def _expected(recs: list[JournalRecord]) -> list[tuple[Any, ...]]:
    return sorted(
        (r.cursor, r.at_ms, NS, "captured", r.write_id, "s", r.other or None) for r in recs
    )


def _frames_of_records() -> list[list[JournalRecord]]:
    """Frames whose records are out of cursor order, cross chunk boundaries (128 rows),
    and fill a chunk exactly; every third has a conflict's ``other``."""
    cursors = list(range(1, 128 * 3 + 40))
    cursors.reverse()
    cursors[10], cursors[300] = cursors[300], cursors[10]
    recs = [_rec(c, f"o{c}" if c % 3 == 0 else "") for c in cursors]
    sizes = [1, 127, 128, 3, 200]
    frames, at = [], 0
    for n in sizes:
        frames.append(recs[at : at + n])
        at += n
    frames.append(recs[at:])
    return frames


async def test_every_journal_record_is_written_once_with_null_for_no_other(tmp_path: Path) -> None:
    frames = _frames_of_records()
    allrecs = [r for f in frames for r in f]
    async with SqliteStorage(tmp_path) as s:
        await s.open("n")
        for recs in frames:
            await s.commit([(NS, b"u")], recs)
        await s.flush()
        got = await s.read_journal(0, 10_000)
        assert [r.cursor for r in got] == sorted(r.cursor for r in allrecs)
    rows, meta = _db_view(tmp_path)
    assert rows == _expected(allrecs)
    assert meta["last_cursor"] == str(max(r.cursor for r in allrecs))
    assert meta["journal_count"] == str(len(allrecs))


async def test_a_failed_apply_is_retried_with_no_row_missing_or_doubled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The apply fails after its first chunk went in (a full disk): rolled back, frames
    requeued; the next drain writes every row once, with an exact count and cursor."""
    monkeypatch.setattr(sqlite_mod, "_DRAIN_DELAY", 3600.0)
    frames = _frames_of_records()
    allrecs = [r for f in frames for r in f]
    s = SqliteStorage(tmp_path)
    await s.open("n")
    try:
        real = s._insert_rows
        fails = [1]

        def flaky(prefix: str, width: int, parts: Any) -> int:
            if width == 7 and fails[0]:
                fails[0] -= 1
                it = iter(parts)
                s._db.execute(sqlite_mod._values_sql(prefix, width, 128), next(it))
                raise sqlite3.OperationalError("database or disk is full")
            return real(prefix, width, parts)

        s._insert_rows = flaky  # type: ignore[method-assign]
        for recs in frames:
            await s.commit([(NS, b"u")], recs)
        # The drain job or this flush meets the failure; the frames go back to the queue.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(s.flush(), DEADLINE)
        assert fails == [0]
        await asyncio.wait_for(s.flush(), DEADLINE)
        assert not s._pending and s._applied_lsn == len(frames)
        got = await s.read_journal(0, 10_000)
        assert [r.cursor for r in got] == sorted(r.cursor for r in allrecs)
        assert s._journal_count == len(allrecs)
    finally:
        await asyncio.wait_for(s.aclose(), DEADLINE)
    rows, meta = _db_view(tmp_path)
    assert rows == _expected(allrecs)
    assert meta["last_cursor"] == str(max(r.cursor for r in allrecs))
    assert meta["journal_count"] == str(len(allrecs))
    assert meta["applied_lsn"] == str(len(frames))


async def test_the_last_cursor_never_moves_back_and_a_duplicate_is_counted_once(
    tmp_path: Path,
) -> None:
    async with SqliteStorage(tmp_path) as s:
        await s.open("n")
        await s.commit([], [_rec(500), _rec(7)])
        await s.flush()
        await s.commit([], [_rec(9), _rec(7, "dup")])  # lower cursors, one duplicate
        await s.flush()
    rows, meta = _db_view(tmp_path)
    assert [r[0] for r in rows] == [7, 9, 500] and rows[0][6] is None
    assert meta["last_cursor"] == "500" and meta["journal_count"] == "3"
    async with SqliteStorage(tmp_path) as s:
        state = await s.open("n")
        assert state.last_cursor == 500


async def test_frames_left_in_the_log_by_a_crash_are_applied_once_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data directory copied while frames wait in the log (what kill -9 leaves):
    opening the copy applies them from the log (``_decode_payload``), once, with updates,
    journal (NULL others), cursors and counts; a retire (compaction) then keeps them."""
    import shutil

    monkeypatch.setattr(sqlite_mod, "_DRAIN_DELAY", 3600.0)
    frames = _frames_of_records()
    allrecs = [r for f in frames for r in f]
    crashed = tmp_path / "crashed"
    s = SqliteStorage(tmp_path / "live")
    await s.open("n")
    try:
        await s.commit([(NS, b"first")], frames[0])
        await s.flush()
        for i, recs in enumerate(frames[1:]):
            await s.commit([(NS, b"u%d" % i)], recs)
        await s.save_cursor("s", 42)
        assert len(s._pending) == len(frames)  # (the drain job waits for more)
        shutil.copytree(tmp_path / "live", crashed)
    finally:
        await asyncio.wait_for(s.aclose(), DEADLINE)
    ups = [b"first"] + [b"u%d" % i for i in range(len(frames) - 1)]
    for _ in range(2):  # the second open finds them applied already
        async with SqliteStorage(crashed) as again:
            state = await again.open("n")
            assert state.docs[NS] == ups
            assert state.last_cursor == max(r.cursor for r in allrecs)
            assert state.cursors["s"] == 42
        rows, meta = _db_view(crashed)
        assert rows == _expected(allrecs)
        assert meta["journal_count"] == str(len(allrecs))
    async with SqliteStorage(crashed) as again:
        await again.open("n")
        await again.compact(NS, b"SNAP", 2)  # retires the rest into SQLite
        await again.commit([(NS, b"after")], [_rec(10_000)])
    assert (crashed / LOG_NAME).stat().st_size > 0
    async with SqliteStorage(crashed) as again:
        state = await again.open("n")
        assert state.docs[NS] == [b"SNAP", *ups[2:], b"after"]
    rows, meta = _db_view(crashed)
    assert rows == _expected([*allrecs, _rec(10_000)])
    assert meta["journal_count"] == str(len(allrecs) + 1)


# -- a peer's arrivals count as writes --------------------------------------------------------


def _durable(path: Path) -> ConversationsApi:
    return ConversationsApi(data_dir=path, listen=False, discovery=())


async def test_recall_on_a_receiving_node_is_current_after_every_arrival(tmp_path: Path) -> None:
    a = _durable(tmp_path / "a")
    b = _durable(tmp_path / "b")
    async with a, b:
        link(a, b)
        sa = await a.register_session("sa", subscribe=[NS])
        ids: list[str] = []
        for i in range(30):
            if i % 10 == 9:
                mems = await sa.capture_many(NS, [f"alpha batch {i} {j}" for j in range(50)])
                ids.extend(m.id for m in mems)
            else:
                ids.append((await sa.capture(NS, f"alpha single {i}")).id)
            await wait_for(lambda: len(b.memories(NS)) == len(ids), DEADLINE, "arrival")
            # At once, whatever the background indexer did meanwhile.
            assert {m.id for m in b.recall("alpha", namespace=NS, limit=10_000)} == set(ids)
        await sa.update(ids[0], content="omega rewritten", tags=["t9"])
        await sa.delete(ids[1])
        await wait_for(lambda: len(b.memories(NS)) == len(ids) - 1, DEADLINE, "the delete")
        await wait_for(lambda: b.get(ids[0]).content == "omega rewritten", DEADLINE, "update")
        assert [m.id for m in b.recall("omega", namespace=NS)] == [ids[0]]
        assert [m.id for m in b.recall("t9", namespace=NS)] == [ids[0]]
        hits = {m.id for m in b.recall("alpha", namespace=NS, limit=10_000)}
        assert hits == set(ids[2:])
    async with _durable(tmp_path / "b") as again:
        assert {m.id for m in again.recall("alpha", namespace=NS, limit=10_000)} == hits


async def test_a_node_that_only_receives_still_compacts_once_the_stream_pauses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_module, "_COMPACT_BYTES", 4096)
    a = ConversationsApi(listen=False, discovery=())
    b = _durable(tmp_path / "b")
    async with a, b:
        link(a, b)
        sa = await a.register_session("sa", subscribe=[NS])
        for i in range(20):
            await sa.capture_many(NS, [f"fact {i} {j} " + "x" * 40 for j in range(10)])
        await wait_for(lambda: len(b.memories(NS)) == 200, DEADLINE, "arrival")
        await wait_for(lambda: b._snapshot_bytes.get(NS, 0) > 0, DEADLINE, "a compaction")
        await wait_for(lambda: NS not in b._compacting, DEADLINE, "the compaction done")
        assert b._storage.tail_bytes(NS) < 4096
        # And the background indexer, held back while the stream ran, did its work.
        await wait_for(lambda: not b._docs[NS].background_work, DEADLINE, "indexing")
    async with _durable(tmp_path / "b") as again:
        assert len(again.memories(NS)) == 200


async def test_an_update_that_brings_nothing_new_does_not_count_as_a_write() -> None:
    """A peer re-sending one update must not hold compaction and indexing back for ever
    (found in review: every arrival counted as a write)."""
    a = ConversationsApi(listen=False, discovery=())
    b = ConversationsApi(listen=False, discovery=())
    async with a, b:
        sa = await a.register_session("sa", subscribe=[NS])
        await sa.capture(NS, "alpha")
        update = a._docs[NS].diff()
        assert b._apply_remote(NS, "x", update, None) is not None  # type: ignore[arg-type]
        b._last_write = before = time.monotonic() - 3600.0
        assert b._apply_remote(NS, "x", update, None) is None  # type: ignore[arg-type]
        assert b._last_write == before
