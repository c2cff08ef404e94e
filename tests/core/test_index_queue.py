"""Memories waiting to be indexed (new ones in a list by number, older ones in a dict),
and the cyclic collector paused around a batch of captures."""

from __future__ import annotations

import gc
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.gcpause import gc_paused
from support.coredocs import edit, restarted, send, still_doc

WORDS = ["alpha", "beta", "gamma", "delta", "eps"]
QUERIES = ["alpha", "beta gamma", "delta", "eps alpha", "t1", "t2"]

_content = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)
_tags = st.sampled_from([[], ["t1"], ["t1", "t2"]])
_op = st.one_of(
    st.tuples(st.just("many"), st.lists(st.tuples(_content, _tags), min_size=1, max_size=5)),
    st.tuples(st.just("one"), _content, _tags),
    st.tuples(st.just("peer"), _content, _tags),  # a new memory from another node
    st.tuples(st.just("update"), st.integers(0, 30), _content),
    st.tuples(st.just("retag"), st.integers(0, 30), _tags),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("flush"), st.integers(0, 4)),
)


def _live(doc: NamespaceDoc) -> list[str]:
    return sorted(doc.memory_ids())


def _run(doc: NamespaceDoc, peer: NamespaceDoc, ops: list[Any]) -> None:
    for op in ops:
        kind = op[0]
        if kind == "many":
            doc.capture_many("s", [(c, {"tags": t} if t else {}) for c, t in op[1]])
        elif kind == "one":
            doc.capture("s", op[1], {"tags": op[2]} if op[2] else {})
        elif kind == "peer":
            peer.capture("p", op[1], {"tags": op[2]} if op[2] else {})
            send(peer, doc)
        elif kind == "flush":
            doc.flush_index(op[1])
        else:
            ids = _live(doc)
            if not ids:
                continue
            edit(doc, kind, ids[op[1] % len(ids)], op[2] if len(op) > 2 else None)


@settings(max_examples=150, deadline=None)
@given(st.lists(_op, max_size=25))
def test_recall_after_any_mix_of_writes_and_partial_flushes_is_what_a_restart_builds(
    ops: list[Any],
) -> None:
    """New memories wait in a list by number, older ones (changed after the list was
    last emptied, or after a restart) in a dict; partial flushes take from both. Whatever
    the mix, the index ends as one built afresh from the same memories: the same hits
    with the same scores."""
    doc = still_doc("00000000000000aa")
    peer = still_doc("00000000000000bb")
    _run(doc, peer, ops)
    again = restarted(doc, resolve=True)
    for q in QUERIES:
        ranked = [[(round(s, 9), m) for s, m in d.search_ids(q, 50)] for d in (doc, again)]
        assert ranked[0] == ranked[1], q
    assert doc.flush_index() == 0 and not doc._fresh and not doc._to_index
    assert not doc.background_work


def test_a_partial_flush_leaves_the_rest_waiting_and_recall_finds_them_all() -> None:
    doc = still_doc()
    doc.capture_many("s", [(f"fact {i} alpha", {}) for i in range(10)])
    assert doc.flush_index(4) == 6
    assert doc.background_work
    older = sorted(doc.memory_ids())[:3]
    for mid in older:  # changed while others still wait
        doc.update("s", mid, {"content": f"beta {mid}"})
    assert len(doc.search_ids("alpha", 50)) == 7
    assert {m for _, m in doc.search_ids("beta", 50)} == set(older)
    assert not doc.background_work


def test_a_batch_of_captures_runs_no_garbage_collection_and_leaves_the_collector_on() -> None:
    """A batch of 256 makes well over the collector's first threshold of tracked objects
    (700): without the pause it collects in the middle of the batch, and each full pass
    walks every memory the node holds."""
    doc = still_doc()
    doc.capture_many("s", [(f"warm {i}", {}) for i in range(10)])
    during: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and doc._local_txn:
            during.append(info["generation"])

    assert gc.isenabled()
    gc.collect()
    gc.callbacks.append(note)
    try:
        mems, events = doc.capture_many("s", [(f"fact number {i}", {}) for i in range(256)])
    finally:
        gc.callbacks.remove(note)
    assert len(mems) == 256 and len(events) == 256
    assert during == []  # (one may run right after: the pause defers, it skips nothing)
    assert gc.isenabled()


def test_the_pause_restores_the_collector_as_it_was_even_on_error() -> None:
    assert gc.isenabled()
    try:
        with gc_paused():
            assert not gc.isenabled()
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the caller had it off: it stays off
    finally:
        gc.enable()


def test_a_peers_batch_is_applied_with_no_garbage_collection_in_it() -> None:
    """A peer's update of 300 captures: applied like a local batch, the collector does
    not run inside it (it would walk every memory the node holds, at every full pass)."""
    a = still_doc("00000000000000aa")
    b = still_doc("00000000000000bb")
    a.capture_many("s", [(f"fact number {i}", {}) for i in range(300)])
    inside = False
    during: list[int] = []
    real = b._apply_update

    def watched(update: bytes, defer: bool = False) -> Any:
        nonlocal inside
        inside = True
        try:
            return real(update, defer)
        finally:
            inside = False

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and inside:
            during.append(info["generation"])

    b._apply_update = watched  # type: ignore[method-assign]
    gc.collect()
    gc.callbacks.append(note)
    try:
        events = send(a, b)
    finally:
        gc.callbacks.remove(note)
    assert len(events) == 300 and len(list(b.memory_ids())) == 300
    assert during == []
    assert gc.isenabled()
