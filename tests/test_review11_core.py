"""Review 11: the core's "written once" tuple form (``_Once``), capture_many's inline
path and the plain-capture string scanner must change nothing observable.

Each test drives the documents (or the public API) through a path where a memory is
held as an untracked tuple and checks the outcome against the plain definition: capture
one by one, a node restarted from the same entries, or the general JSON parser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import wait_for
from subcog_crdt import ConversationsApi, NotFound
from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.schema import _CAPTURE_HEAD, _decode_json, decode_write, first_memory_id
from subcog_crdt._core.schema import normalise as norm
from support.coredocs import Counter, compact, doc_state, foreign_update, restarted, still_doc

END_OF_TIME = "9999999999999ffffff"


def make_doc(node: str = "00000000000000aa", cursor: Counter | None = None) -> NamespaceDoc:
    return still_doc(node, cursor)


def state(doc: NamespaceDoc) -> Any:
    return doc_state(doc, "we chose wal tests code zeta gamma b a")


POOL = ["We chose WAL", "we  chose wal", "Tests next to code", "A", "b", "B ", "zeta one"]

_history = st.lists(
    st.tuples(
        st.sampled_from(["capture", "many", "delete", "move", "end_of_time", "overwrite"]),
        st.sampled_from(POOL),
        st.integers(0, 50),
    ),
    max_size=8,
)
_batch = st.lists(
    st.tuples(
        st.sampled_from(POOL),
        st.sampled_from([{}, {"tags": []}, {"tags": ["x"]}, {"status": "draft"}]),
    ),
    min_size=1,
    max_size=6,
)


def _capture_value(content: str) -> str:
    return json.dumps({"v": 1, "op": "capture", "set": {"content": content}})


def _build(history: list[tuple[str, str, int]], cursor: Counter) -> NamespaceDoc:
    """A document with a past: captures (single and batched), deletes, content moved by
    updates, a hostile write at the end of time and a hostile overwrite."""
    doc = make_doc(cursor=cursor)
    for op, content, pick in history:
        ids = sorted(doc.memory_ids())
        if op == "capture" or not ids:
            doc.capture("s", content, {})
        elif op == "many":
            doc.capture_many("s", [(content, {}), (POOL[pick % len(POOL)], {"tags": ["y"]})])
        elif op in ("delete", "move"):
            mid = ids[pick % len(ids)]
            if doc.get(mid).clock == END_OF_TIME:
                continue  # no write can follow it (ConflictError)
            if op == "delete":
                doc.delete("s", mid)
            else:
                doc.update("s", mid, {"content": content})
        elif op == "end_of_time":
            mid = first_memory_id("ns", norm(content))
            value = _capture_value(content)
            doc.apply_update(foreign_update(doc, {f"{mid}/{END_OF_TIME}/h/cc": value}))
        else:  # a hostile writer overwrites a capture with other content
            keys = sorted(doc.entries.keys())
            value = _capture_value(content)
            doc.apply_update(foreign_update(doc, {keys[pick % len(keys)]: value}))
    return doc


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(_history, st.sampled_from([None, 0, 1, 3]), _batch)
def test_capture_many_after_a_restart_is_captures_one_by_one(
    history: list[tuple[str, str, int]], resolved: int | None, items: list[Any]
) -> None:
    """On a restarted node, some memories still lazy, some in the written-once form:
    the batch agrees with capture one by one in ids, dedupe, memories, events (cursors
    included), entries, history and recall."""
    base = _build(history, Counter())
    one_c, many_c = Counter(), Counter()
    one, many = restarted(base, one_c), restarted(base, many_c)
    if resolved is not None:
        one.resolve_some(resolved)
        many.resolve_some(resolved)
    singles = [one.capture("t", c, dict(f)) for c, f in items]
    mems, events = many.capture_many("t", [(c, dict(f)) for c, f in items])
    assert mems == [m for m, _ in singles]
    assert events == [e for _, evs in singles for e in evs]
    assert [e.cursor for e in events] == list(range(1, len(events) + 1))
    assert state(many) == state(one)
    # And what a node restarted from the batch's entries derives.
    again = restarted(many)
    assert state(again) == state(many)


def test_a_batch_dedupes_its_own_items_and_live_deleted_and_moved_memories() -> None:
    cursor = Counter()
    doc = make_doc(cursor=cursor)
    kept, _ = doc.capture("s", "Live fact", {})
    gone, _ = doc.capture("s", "Deleted fact", {})
    doc.delete("s", gone.id)
    moved, _ = doc.capture("s", "Before the move", {})
    doc.update("s", moved.id, {"content": "Moved fact"})
    mems, events = doc.capture_many(
        "t",
        [
            ("New fact", {}),
            ("new  FACT", {"tags": ["x"]}),  # the same fact, normalised
            ("live fact", {}),
            ("Deleted fact", {"tags": ["back"]}),
            ("moved fact", {}),
        ],
    )
    assert mems[1].id == mems[0].id and mems[1].captured_by == ("t",)
    assert mems[1].tags == ("x",) and mems[1].version == 2
    assert mems[2].id == kept.id and mems[2].captured_by == ("s", "t")
    assert mems[3].id == gone.id and not mems[3].deleted and mems[3].tags == ("back",)
    assert mems[4].id == moved.id and mems[4].content == "Moved fact"
    assert [e.memory_id for e in events] == [m.id for m in mems]
    assert [e.cursor for e in events] == sorted(e.cursor for e in events)
    assert len({e.cursor for e in events}) == len(events)
    assert len(set(doc.memory_ids())) == 4


def test_a_batch_never_joins_a_memory_stamped_at_the_end_of_time() -> None:
    doc = make_doc()
    mid = first_memory_id("ns", norm("Pinned fact"))
    hostile = '{"v":1,"op":"capture","set":{"content":"Pinned fact"}}'
    doc.apply_update(foreign_update(doc, {f"{mid}/{END_OF_TIME}/h/cc": hostile}))
    assert mid in compact(doc)  # a brand-new remote capture: the written-once form
    mems, _ = doc.capture_many("t", [("Pinned fact", {}), ("pinned FACT", {})])
    assert mems[0].id != mid and mems[1].id == mems[0].id
    assert mems[1].captured_by == ("t",)
    assert doc.get(mid).captured_by == ("h",)


def test_written_once_memories_after_restart_behave_like_any_other() -> None:
    """Load, background resolve (which keeps written-once memories as tuples), then read,
    update, delete, revive, recall and history, as the node that wrote them answers."""
    src = make_doc()
    mems, _ = src.capture_many(
        "s", [("alpha fact one", {"tags": ["t1"]}), ("beta fact two", {}), ("gamma three", {})]
    )
    a, b, c = (m.id for m in mems)
    doc = restarted(src)
    assert doc.resolve_some(None)
    assert {a, b, c} <= compact(doc)
    assert doc.has(a) and sorted(doc.memory_ids(True)) == sorted([a, b, c])
    assert [m.id for _, m in doc.search("fact", 10)] and doc.get(a) == src.get(a)
    assert doc.writes(b) == src.writes(b)
    assert doc.write(src.writes(c)[0].key) == src.writes(c)[0]
    assert doc.memory_at(src.writes(c)[0].key) == src.get(c)

    for d in (src, doc):  # the same writes on the writer and on the restarted node
        d.update("s", a, {"content": "alpha replaced", "tags": ["t2"]})
        d.delete("s", b)
    for d in (src, doc):
        assert d.get(a).content == "alpha replaced" and d.get(a).version == 2
        assert d.get(b).deleted and b not in set(d.memory_ids())
        assert b in set(d.memory_ids(include_deleted=True))
        assert [mid for _, mid in d.search_ids("fact", 10)] == []
        assert [mid for _, mid in d.search_ids("replaced t2", 10)] == [a]
        assert [mid for _, mid in d.search_ids("gamma", 10)] == [c]
    # Captures now dedupe onto what the updates made, on both alike.
    r1, _ = src.capture("u", "Beta fact two", {})
    r2, _ = doc.capture("u", "Beta fact two", {})
    assert r1.id == r2.id == b and not r2.deleted
    m1, _ = src.capture_many("u", [("ALPHA replaced", {}), ("alpha fact one", {})])
    m2, _ = doc.capture_many("u", [("ALPHA replaced", {}), ("alpha fact one", {})])
    assert m1 == m2 and m2[0].id == a and m2[1].id != a
    assert state(doc) == state(src)


def test_hostile_overwrite_of_a_written_once_memory_is_derived_as_a_restart_would() -> None:
    src = make_doc()
    mems, _ = src.capture_many("s", [("original words here", {}), ("untouched memory", {})])
    target, other = mems
    doc = restarted(src)
    doc.resolve_all()
    doc.flush_index()
    assert target.id in compact(doc)
    key = src.writes(target.id)[0].key
    value = '{"v":1,"op":"capture","set":{"content":"replacement text"}}'
    assert doc.apply_update(foreign_update(doc, {key: value})) == []
    assert doc.get(target.id).content == "replacement text"
    assert [mid for _, mid in doc.search_ids("original", 10)] == []
    assert [mid for _, mid in doc.search_ids("replacement", 10)] == [target.id]
    fresh = restarted(doc)
    assert state(fresh) == state(doc)
    # Neither content dedupes onto the overwritten memory: its id is on the old content's
    # chain (now holding other text), and a capture is not an update that moved it.
    n1, _ = doc.capture_many("t", [("original words here", {}), ("replacement text", {})])
    n2, _ = fresh.capture_many("t", [("original words here", {}), ("replacement text", {})])
    assert [m.id for m in n1] == [m.id for m in n2]
    assert target.id not in {m.id for m in n1} and n1[0].id != n1[1].id
    assert state(fresh) == state(doc)
    # Removing a written-once memory's only entry: it is gone, as after a restart.
    other_key = src.writes(other.id)[0].key
    doc = restarted(src)
    doc.resolve_all()
    assert other.id in compact(doc)
    doc.apply_update(foreign_update_removing(doc, other_key))
    assert not doc.has(other.id) and other.id not in set(doc.memory_ids(True))
    assert doc.get(other.id) is None
    assert [mid for _, mid in doc.search_ids("untouched", 10)] == []
    assert state(restarted(doc)) == state(doc)


def foreign_update_removing(doc: NamespaceDoc, key: str) -> bytes:
    from pycrdt import Doc, Map

    other: Doc[Any] = Doc()
    other.apply_update(doc.diff())
    before = other.get_state()
    m = other.get("entries", type=Map)
    del m[key]
    return other.get_update(before)


def test_a_peer_sees_a_batch_as_it_sees_captures_one_by_one() -> None:
    """The events another node raises for a batch written inline: one Captured each, in
    order, dedupe claims included, and the same derived state."""
    src = make_doc()
    mems, _ = src.capture_many(
        "s", [("one fact", {}), ("two fact", {"tags": ["x"]}), ("ONE  fact", {"tags": ["y"]})]
    )
    peer = make_doc("00000000000000bb")
    events = peer.apply_update(src.diff(peer.state_vector()))
    assert [(e.memory_id, e.source_session) for e in events] == [(m.id, "s") for m in mems]
    assert [e.memory.version for e in events] == [1, 1, 2]
    assert state(peer)[1:] == state(src)[1:]


# -- the plain-capture string scanner -----------------------------------------------------

_KEY = "0123456789abcdef0123/1800000000000000000/s/00000000000000aa"
_pieces = st.sampled_from(
    [
        *'"\\ \t\na,{}[]:É\x00\x1f\x7f\ufeff\u2028\x85\ud800',
        '\\"',
        "\\\\",
        "\\u",
        "\\ud800",
        "\\udc00",
        "\\ud83d\\ude00",
        "\\u0041",
        "\\n",
        "\\/",
        "\\x",
        '"tags"',
        "null",
    ]
)


@settings(max_examples=3000, deadline=None)
@given(
    st.sampled_from(["", " ", '"']),
    st.lists(_pieces, max_size=10).map("".join),
    st.sampled_from(['"', "", '" ']),
    st.sampled_from(["}}", ',"tags":[]}}', "}", " }}", ',"tags": []}}', ',"tags":[ ]}}', ""]),
)
def test_plain_capture_decodes_as_the_general_parser(
    head: str, middle: str, close: str, tail: str
) -> None:
    value = _CAPTURE_HEAD + head + middle + close + tail
    mid, at, by, node = _KEY.split("/")
    assert decode_write(_KEY, value) == _decode_json(_KEY, mid, at, by, node, value)


# -- the public API ------------------------------------------------------------------------


async def test_api_batch_restart_get_history_and_other_namespaces(tmp_path: Path) -> None:
    """Batches in two namespaces, a restart from disk with background resolving, then
    get / history / update / delete / recall / memories through the public API."""
    async with ConversationsApi(data_dir=tmp_path, listen=False, discovery=()) as api:
        s = await api.register_session("s1")
        a = await s.capture_many("alpha", ["Use WAL mode", "use  wal MODE", "Keep tests fast"])
        b = await s.capture_many("beta", ["Use WAL mode", {"content": "Beta only", "tags": ["b"]}])
        assert a[0].id == a[1].id and a[1].captured_by == ("s1",)
        assert b[0].id != a[0].id  # ids are per namespace
    async with ConversationsApi(data_dir=tmp_path, listen=False, discovery=()) as api:
        s = await api.register_session("s2")
        docs = api._docs
        await wait_for(lambda: not any(d.background_work for d in docs.values()), what="background")
        assert a[2].id in compact(docs["alpha"]) and b[1].id in compact(docs["beta"])
        assert api.get(b[1].id).namespace == "beta" and api.get(b[1].id).tags == ("b",)
        assert api.get(a[2].id).namespace == "alpha"
        assert [w.session for w in api.history(a[0].id)] == ["s1", "s1"]
        assert [w.op for w in api.history(b[1].id)] == ["capture"]
        up = await s.update(b[1].id, content="Beta changed")
        assert up.version == 2 and api.get(b[1].id).content == "Beta changed"
        await s.delete(a[2].id)
        assert [m.id for m in api.memories("alpha")] == [a[0].id]
        assert sorted(m.id for m in api.memories("alpha", include_deleted=True)) == sorted(
            [a[0].id, a[2].id]
        )
        assert [m.id for m in s.recall("changed", namespace="beta")] == [b[1].id]
        assert s.recall("only", namespace="beta") == []
        assert s.recall("tests fast", namespace="alpha") == []
        again = await s.capture_many("alpha", ["Keep tests fast", "Use WAL mode"])
        assert [m.id for m in again] == [a[2].id, a[0].id] and not again[0].deleted
        assert again[1].captured_by == ("s1", "s2")
        try:
            api.get("0" * 20)
        except NotFound:
            pass
        else:
            raise AssertionError("an unknown id must be NotFound")
