"""Review 11 (late changes): recall's cut-off pairs, reads of compact memories through
transient views (``NamespaceDoc._view``), the fold order of entries a watched apply
reports (``_settle``) and journal records put into the log frame as they are.

Run as a script, this file is the child of the crash test: ``python FILE child DIR``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from pycrdt import Doc, Map

from core.test_fast_paths import indexed, plain_bm25
from subcog_crdt import ConversationsApi
from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.schema import encode_write
from support.coredocs import Counter, compact, doc_state, restarted, still_doc

NS = "ns"
NOW = 1_800_000_000_000


# -- the crash child ---------------------------------------------------------------------------


async def _child(data_dir: str) -> None:
    """Captures, an update, a delete and a conflict on a durable node whose log is never
    drained into SQLite; prints what it committed and published, then dies (kill -9)."""
    a = ConversationsApi(data_dir=data_dir, listen=False, discovery=())
    b = ConversationsApi(listen=False, discovery=())
    await a.open()
    await b.open()
    a._storage._drain_scheduled = True  # test-only: nothing reaches SQLite but via replay
    committed: list[list[Any]] = []
    published: list[str] = []
    real_commit = a._storage.commit

    async def commit(updates: Any, journal: Any) -> None:
        committed.extend([list(r) for r in journal])
        await real_commit(updates, journal)

    a._storage.commit = commit  # type: ignore[method-assign]
    real_publish = a._bus.publish

    def publish(events: Any) -> None:
        published.extend(repr(e) for e in events)
        real_publish(events)

    a._bus.publish = publish  # type: ignore[method-assign]
    wa = await a.register_session("wa", subscribe=[NS])
    wb = await b.register_session("wb", subscribe=[NS])
    m1 = await wa.capture(NS, "first fact here")
    m2 = await wa.capture(NS, "second fact here")
    await wa.capture(NS, "third fact here")
    await wa.update(m2.id, tags=["t1"])
    await wa.delete(m1.id)
    da, db = a._docs[NS], b._ensure_doc(NS)
    db.apply_update(da.diff(db.state_vector()))
    db.take_outbox()
    # Concurrent updates of the same field on both nodes: a conflict on each.
    await wa.update(m2.id, content="second fact from a")
    await wb.update(m2.id, content="second fact from b")
    r = a._apply_remote(NS, b.node_id, db.diff(da.state_vector()), None)  # type: ignore[arg-type]
    assert r is not None
    await a._persist([r])
    print(json.dumps({"committed": committed, "published": published}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "child":
    asyncio.run(_child(sys.argv[2]))
    raise SystemExit(3)


from hypothesis import given, settings  # noqa: E402  (the child needs no test dependencies)
from hypothesis import strategies as st  # noqa: E402

from subcog_crdt._core.recall import RecallIndex  # noqa: E402
from subcog_crdt._storage.base import JournalRecord  # noqa: E402

# -- 1. recall: pairs only at or above the cut-off ---------------------------------------------

_toks = st.lists(st.sampled_from(["ab", "cd", "ef", "gh"]), max_size=5)


def _tie(d: int) -> str:
    # Not the doc number's order: ties by tie_key must follow it, not the number.
    return f"{(d * 7) % 13:02d}-{d:03d}"


@settings(max_examples=600, deadline=None)
@given(
    st.lists(_toks, min_size=1, max_size=14),
    st.lists(st.tuples(st.integers(0, 13), _toks), max_size=6),
    st.lists(st.integers(0, 13), max_size=4),
    st.lists(st.sampled_from(["ab", "cd", "ef", "zz"]), min_size=1, max_size=3),
    st.integers(1, 16),
    st.booleans(),
)
def test_search_ranks_as_the_plain_bm25_for_every_limit(
    docs: list[list[str]],
    changes: list[tuple[int, list[str]]],
    dead: list[int],
    query: list[str],
    limit: int,
    with_tie_key: bool,
) -> None:
    """Ties at the cut, limit 1, limits above the matches, changed (dirty) and deleted
    documents: the top ``limit`` of the plain formula, ties by tie_key (or number)."""
    index, current = indexed(docs, changes)
    live = [True] * len(docs)
    for i in dead:
        live[i % len(docs)] = False
        index.set_live(i % len(docs), False)
    expected = plain_bm25(current, query, live)
    tie = _tie if with_tie_key else (lambda d: f"{d:03d}")
    best = sorted(expected.items(), key=lambda kv: (-kv[1], tie(kv[0])))[:limit]
    got = index.search(" ".join(query), limit, tie_key=_tie if with_tie_key else None)
    assert got == [(s, d) for d, s in best]


def test_many_equal_scores_at_the_cut_take_the_first_by_tie_key() -> None:
    index = RecallIndex()
    for i in range(40):
        d = index.new_doc()
        index.add(d, ["ab", "cd"] if i % 3 else ["ab", "ab"])
        index.set_live(d, True)
    score = {d: s for s, d in index.search("ab", 100)}
    assert len(score) == 40 and len(set(score.values())) == 2
    for limit in (1, 2, 13, 14, 15, 39, 40, 41, 100):
        got = index.search("ab", limit, tie_key=_tie)
        ranked = sorted(range(40), key=lambda d: (-score[d], _tie(d)))[:limit]
        assert got == [(score[d], d) for d in ranked]


# -- 2. reads of compact memories -----------------------------------------------------------


def make_doc(node: str = "00000000000000aa", cursor: Counter | None = None) -> NamespaceDoc:
    return still_doc(node, cursor)


def resolved(src: NamespaceDoc) -> NamespaceDoc:
    return restarted(src, resolve=True)


def state(doc: NamespaceDoc) -> Any:
    return doc_state(doc, "alpha beta gamma fact", at=True)


def test_reads_of_compact_memories_change_nothing_and_later_writes_keep_their_changes() -> None:
    src = make_doc()
    mems, _ = src.capture_many("s", [(f"{w} fact", {}) for w in ("alpha", "beta", "gamma")])
    doc = resolved(src)
    plain = resolved(src)
    ids = [m.id for m in mems]
    assert set(ids) <= compact(doc)
    for _ in range(3):  # reads, over and over: the memories stay compact, and alike
        for mid in ids:
            w = doc.writes(mid)
            assert doc.get(mid) == src.get(mid) and w == src.writes(mid)
            assert doc.write(w[0].key) == w[0]
            assert doc.memory_at(w[0].key) == src.memory_at(w[0].key) == src.get(mid)
    assert set(ids) <= compact(doc)
    # Then writes: an update, a delete, a capture deduped onto a compact memory.
    for d in (doc, plain, src):
        d.update("u", ids[0], {"tags": ["x"], "content": "alpha fact two"})
        d.delete("u", ids[1])
        d.capture("u", "GAMMA  fact", {"tags": ["y"]})
    assert state(doc) == state(plain) == state(src)
    assert doc.get(ids[0]).content == "alpha fact two" and doc.get(ids[0]).version == 2
    assert doc.get(ids[1]).deleted and doc.get(ids[2]).version == 2
    first = src.writes(ids[0])[0].key
    assert doc.memory_at(first).content == "alpha fact"
    assert state(resolved(doc)) == state(doc)


async def test_api_history_and_sync_of_compact_memories_after_a_restart(tmp_path: Path) -> None:
    async with ConversationsApi(data_dir=tmp_path / "a", listen=False, discovery=()) as api:
        w = await api.register_session("w", subscribe=[NS])
        await w.capture_many(NS, [f"fact {i}" for i in range(5)])
    async with ConversationsApi(data_dir=tmp_path / "a", listen=False, discovery=()) as api:
        doc = api._docs[NS]
        doc.resolve_all()
        ids = sorted(compact(doc))
        assert len(ids) == 5
        r = await api.register_session("r", subscribe=[NS])
        first = await r.sync(since=0)
        assert [e.memory.content for e in first.events] == [f"fact {i}" for i in range(5)]
        hist = {mid: api.history(mid) for mid in ids}
        assert set(ids) == compact(doc)  # read, not thawed
        w = await api.register_session("w", subscribe=[NS])
        for mid in ids[:2]:
            await w.update(mid, tags=["k"])
        await w.delete(ids[2])
        for mid in ids[:3]:
            assert api.history(mid)[:1] == hist[mid] and len(api.history(mid)) == 2
        assert [api.get(mid).tags for mid in ids[:2]] == [("k",), ("k",)]
        again = await r.sync(since=0)
        assert again.events[:5] == first.events
        assert [(type(e).__name__, e.memory_id) for e in again.events[5:]] == [
            ("Updated", ids[0]),
            ("Updated", ids[1]),
            ("Deleted", ids[2]),
        ]
        assert [e.changes for e in again.events[5:7]] == [{"tags": ["k"]}] * 2
    async with ConversationsApi(data_dir=tmp_path / "a", listen=False, discovery=()) as api:
        r = await api.register_session("r2", subscribe=[NS])
        assert (await r.sync(since=0)).events == again.events


# -- 3. entries a watched apply reports, in fold order ----------------------------------------


def _stamp(wall: int) -> str:
    return f"{wall:013d}{0:06x}"


def _hostile_scenario() -> tuple[list[str], int, Any, NamespaceDoc]:
    """A hostile peer overwrites a capture and adds writes it set twice in one update
    (the second with an origin: the decoder cannot see them, so ``_settle`` integrates
    them)."""
    cursor = Counter()
    src = make_doc("00000000000000aa", cursor)
    mems, _ = src.capture_many("s", [("alpha fact", {}), ("beta fact", {}), ("gamma fact", {})])
    dst = make_doc("00000000000000bb", cursor)
    dst.apply_update(src.diff())
    x: Doc[Any] = Doc()
    x.apply_update(dst.diff())
    before = x.get_state()
    m = x.get("entries", type=Map)
    m[src.writes(mems[0].id)[0].key] = encode_write("capture", "", {"content": "alpha overwritten"})
    for mem in mems:
        for j in range(6):
            key = f"{mem.id}/{_stamp(NOW + 10 + j)}/h{j}/00000000000000cc"
            m[key] = encode_write("update", "", {"tags": [f"t{j}x"]})
            changes = {"tags": [f"t{j}"], "content": f"c{j} {mem.content}"}
            m[key] = encode_write("update", "", changes)
    events = dst.apply_update(x.get_update(before))
    return [repr(e) for e in events], dst.released, state(dst), dst


def test_events_of_entries_released_by_a_watched_apply_are_the_same_every_run() -> None:
    events, released, st0, dst = _hostile_scenario()
    assert released == 18 and len(events) == 18  # all through _settle's integration
    for _ in range(30):
        again = _hostile_scenario()
        assert again[:3] == (events, released, st0)
    # Converged: as a node restarted from the map, and as a peer given all of it at once.
    assert state(resolved(dst))[:5] == st0[:5]
    peer = make_doc("00000000000000dd")
    peer.apply_update(dst.diff())
    assert state(peer)[:5] == st0[:5]
    assert dst.get(sorted(dst.memory_ids())[0]).content.startswith("c5 ")


# -- 4. journal records in the log frame, replayed after kill -9 --------------------------------


def _rows(path: Path) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(path / "store.sqlite3")
    try:
        return con.execute(
            "SELECT cursor, at_ms, ns, kind, write_id, session, other FROM journal ORDER BY cursor"
        ).fetchall()
    finally:
        con.close()


async def test_a_replayed_log_gives_the_journal_rows_and_sync_of_a_drained_one(
    tmp_path: Path,
) -> None:
    data = tmp_path / "d"
    out = subprocess.run(
        [sys.executable, __file__, "child", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    told = json.loads(out.stdout.splitlines()[-1])
    committed = [tuple(r) for r in told["committed"]]
    kinds = [r[3] for r in committed]
    assert kinds.count("conflict") == 1 and {"captured", "updated", "deleted"} <= set(kinds)
    assert _rows(data) == []  # nothing drained: the log alone holds them
    async with ConversationsApi(data_dir=data, listen=False, discovery=()) as api:
        r = await api.register_session("r", subscribe=[NS])
        batch = await r.sync(since=0)
        assert [repr(e) for e in batch.events] == told["published"]
        assert batch.cursor == max(c[0] for c in committed)
    expected = [(*rec[:6], rec[6] or None) for rec in committed]
    rows = _rows(data)
    assert rows == expected
    conflict = next(row for row in rows if row[3] == "conflict")
    assert conflict[6] and conflict[6] != conflict[4]
    assert all(row[6] is None for row in rows if row[3] != "conflict")
    async with ConversationsApi(data_dir=data, listen=False, discovery=()) as api:
        r = await api.register_session("r", subscribe=[NS])
        assert [repr(e) for e in (await r.sync(since=0)).events] == told["published"]


def test_a_record_made_without_the_named_tuples_new_is_a_record() -> None:
    from subcog_crdt._api import _new_record

    rec = _new_record(JournalRecord, (1, 2, NS, "captured", "w", "s", ""))
    assert type(rec) is JournalRecord and rec == JournalRecord(1, 2, NS, "captured", "w", "s")
    assert rec.other == "" and rec._replace(other="x").other == "x"
