"""Recall stays as cheap after content changes as before them, and a tags filter loads
only the memories it must. The tests count work (memory loads, filter calls, posting
entries), never time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.hlc import Hlc
from subcog_crdt._core.recall import RecallIndex


def _namespace_doc() -> NamespaceDoc:
    counter = [0]

    def next_cursor() -> int:
        counter[0] += 1
        return counter[0]

    return NamespaceDoc(
        "decisions",
        node_id="00000000000000aa",
        hlc=Hlc(clock=lambda: 1_800_000_000_000),
        next_cursor=next_cursor,
    )


def _count_gets(doc: NamespaceDoc, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every memory load (what made recall slow: one per changed candidate)."""
    loaded: list[str] = []
    real = doc.get

    def get(memory_id: str) -> Any:
        loaded.append(memory_id)
        return real(memory_id)

    monkeypatch.setattr(doc, "get", get)
    return loaded


def test_recall_after_content_updates_loads_only_the_hits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Changed memories used to be re-read and re-tokenized on every query sharing a
    word, forever; a query must load only the memories it returns."""
    doc = _namespace_doc()
    mems, _ = doc.capture_many("s", [(f"note {i} alpha beta", {}) for i in range(300)])
    for i, m in enumerate(mems):
        doc.update("s", m.id, {"content": f"note {i} alpha gamma"})
    doc.search("alpha", 5)  # indexes the updates
    loaded = _count_gets(doc, monkeypatch)
    hits = doc.search("alpha", 5)
    assert len(hits) == 5
    assert all("gamma" in m.content for _, m in hits)
    assert len(loaded) == 5  # the hits themselves; was 305 (every changed candidate)
    assert doc.search("beta", 5) == []  # the old words are gone


def test_a_tags_filter_loads_memories_only_until_the_limit_is_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tags filter used to load every scored memory before ranking (seconds at 100k)."""
    doc = _namespace_doc()
    items = [(f"alpha {'alpha ' * (i % 7)}x{i}", {"tags": [f"g{i % 10}"]}) for i in range(400)]
    doc.capture_many("s", items)
    everything = [m.id for _, m in doc.search("alpha", 1000)]
    tagged = [m.id for _, m in doc.search("alpha", 1000, frozenset({"g3"}))]
    loaded = _count_gets(doc, monkeypatch)
    hits = doc.search("alpha", 5, frozenset({"g3"}))
    assert [m.id for _, m in hits] == tagged[:5]
    # walked in ranking order up to the fifth accepted memory, each loaded once
    assert loaded == everything[: everything.index(tagged[4]) + 1]


def test_rewriting_one_document_does_not_grow_its_posting_lists() -> None:
    """A memory rewritten thousands of times grew each of its words' lists by one
    entry per rewrite (561k entries, 2 s recalls, until a restart)."""
    index = RecallIndex()
    for i in range(100):
        d = index.new_doc()
        index.add(d, ["note", str(i), "w0"])
        index.set_live(d, True)
    for k in range(5000):
        index.replace(0, ["status", "report", str(k), "w0"])
    assert len(index._postings["w0"]) <= 2 * 100 + 2 * RecallIndex._MIN_TERM_STALE
    assert len(index._postings["status"]) <= 2 * RecallIndex._MIN_TERM_STALE
    # every rewrite's number was a new word: the compaction dropped the old ones
    assert index._entries - index._total_len <= RecallIndex._MIN_STALE
    assert len(index._term_stale) <= RecallIndex._MIN_STALE  # bounded bookkeeping too
    assert index.search("status", 5) == _fresh(
        [["status", "report", "4999", "w0"]] + [["note", str(i), "w0"] for i in range(1, 100)]
    ).search("status", 5)


def test_updating_every_document_once_keeps_few_dirty_documents() -> None:
    """Dirty documents keep their words (and cost work per query): compaction must bound
    them to a small share of the index, and leave exact postings behind."""
    index = RecallIndex()
    n = 20_000
    first = index.new_docs(n)
    for d in range(first, first + n):
        index.add(d, ["alpha", f"x{d}"])
        index.set_live(d, True)
    most_dirty = 0
    for d in range(n):
        index.replace(d, ["alpha", "gamma", f"y{d}"])
        most_dirty = max(most_dirty, len(index._dirty))
    assert most_dirty <= max(RecallIndex._MIN_DIRTY, n // RecallIndex._DIRTY_SHARE) + 1
    index.compact()
    assert not index._dirty
    assert index._entries == index._total_len == 3 * n
    assert "x5" not in index._postings


class _EagerIndex(RecallIndex):
    """Compacts at tiny sizes, so short random runs cross every compaction path."""

    _MIN_STALE = 4
    _MIN_DIRTY = 1
    _MIN_TERM_STALE = 2
    _DIRTY_SHARE = 4


class _RebuildingIndex(RecallIndex):
    """Never compacts whole, but rebuilds a word's list at its first stale entry."""

    _MIN_STALE = 10**9
    _MIN_DIRTY = 10**9
    _MIN_TERM_STALE = 1


def _fresh(contents: list[list[str] | None], live: list[bool] | None = None) -> RecallIndex:
    """What a restarted node builds: each document's current words, added once."""
    index = RecallIndex()
    for i, tokens in enumerate(contents):
        d = index.new_doc()
        if tokens is not None:
            index.add(d, tokens)
        index.set_live(d, True if live is None else live[i])
    return index


_WORDS = ["ab", "cd", "ef", "gh", "ij"]
_tokens = st.lists(st.sampled_from(_WORDS), max_size=6)
_op = st.one_of(
    st.tuples(st.just("add"), _tokens, st.booleans()),
    st.tuples(st.just("replace"), st.integers(0, 7), _tokens),
    st.tuples(st.just("live"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("compact")),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([RecallIndex, _EagerIndex, _RebuildingIndex]),
    st.lists(_op, max_size=60),
    st.lists(st.sampled_from([*_WORDS, "zz"]), min_size=1, max_size=3),
    st.integers(1, 8),
    st.sampled_from([None, frozenset({0, 2, 4, 6, 8}), frozenset()]),
)
def test_a_changed_index_ranks_exactly_like_one_built_afresh(
    kind: type[RecallIndex],
    ops: list[tuple[Any, ...]],
    query: list[str],
    limit: int,
    accepted: frozenset[int] | None,
) -> None:
    """Lazy removal, compaction and the ranked walk of a filter must not change a
    single score or position: a restarted node builds the index afresh, and both must
    answer alike."""
    index = kind()
    contents: list[list[str]] = []
    live: list[bool] = []
    for op in ops:
        if op[0] == "add":
            d = index.new_doc()
            contents.append(list(op[1]))
            live.append(op[2])
            index.add(d, list(op[1]))
            index.set_live(d, op[2])
        elif op[0] == "compact":
            index.compact()
        elif contents:
            d = op[1] % len(contents)
            if op[0] == "replace":
                contents[d] = list(op[2])
                index.replace(d, list(op[2]))
            else:
                live[d] = op[2]
                index.set_live(d, op[2])
    assert index._entries - index._total_len >= 0
    fresh = _fresh(list(contents), live)
    q = " ".join(query)
    calls: list[int] = []
    accept: Callable[[int], bool] | None = None
    if accepted is not None:

        def accept(d: int) -> bool:
            calls.append(d)
            return d in accepted

    def tie(d: int) -> str:
        return f"{(d * 7) % 11:02d}-{d}"  # not the doc order, as memory ids are not

    got = index.search(q, limit, None, accept, tie)
    asked = list(calls)
    assert got == fresh.search(q, limit, None, accept, tie)
    if accepted is not None:
        ranked = [d for _, d in fresh.search(q, 10_000, None, None, tie)]
        chosen = [d for d in ranked if d in accepted][:limit]
        assert [d for _, d in got] == chosen
        # asked in ranking order, once each, and only until the limit was reached
        walked = ranked[: ranked.index(chosen[-1]) + 1] if len(chosen) == limit else ranked
        assert asked == walked
    index.compact()
    assert not index._dirty and not index._term_stale  # nothing left to compact
    assert index._entries == index._total_len
    assert index.search(q, limit, None, accept, tie) == got


def test_adding_a_document_again_replaces_its_words() -> None:
    """A second add() for a document (its text indexed again without replace) must not
    leave its first words counted twice."""
    index = RecallIndex()
    for tokens in (["ab", "cd"], ["ab"]):
        d = index.new_doc()
        index.add(d, tokens)
        index.set_live(d, True)
    index.add(0, ["ef"])
    assert index.search("ab ef", 5) == _fresh([["ef"], ["ab"]]).search("ab ef", 5)
