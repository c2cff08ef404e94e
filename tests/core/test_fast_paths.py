"""Hot-path shortcuts must agree with the plain definitions they replace."""

from __future__ import annotations

import gc
import json
import math
import unicodedata
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.events import Captured, new_captured
from subcog_crdt._core.hlc import Hlc
from subcog_crdt._core.memory import captured_memory, fold_state
from subcog_crdt._core.recall import RecallIndex, tokenize
from subcog_crdt._core.schema import (
    _CAPTURE_HEAD,
    SCHEMA_VERSION,
    Write,
    _decode_json,
    decode_write,
    encode_write,
    normalise,
)

# Text that hits both paths: ASCII with every kind of whitespace, and some non-ASCII.
_text = st.text(
    alphabet=st.sampled_from(list("aB z.\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x00É ß\u2003")),
    max_size=40,
)


@given(_text)
def test_normalise_is_whitespace_collapsed_and_casefolded(text: str) -> None:
    assert normalise(text) == " ".join(text.split()).casefold()


def test_normalise_fast_path_cases() -> None:
    assert normalise("We chose SQLite WAL") == "we chose sqlite wal"
    assert normalise(" We  chose\tSQLite\nWAL ") == "we chose sqlite wal"
    assert normalise("STRASSE") == normalise("Straße".upper()) == "strasse"
    assert normalise("") == ""


_changes = st.fixed_dictionaries(
    {"content": st.text(max_size=30)},
    optional={
        "tags": st.lists(st.text(max_size=5), max_size=3) | st.just([]),
        "metadata": st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5)),
        "status": st.none() | st.text(max_size=5),
    },
)


@given(
    st.sampled_from(["capture", "update", "delete"]),
    st.sampled_from(["", "1795649794389000196"]),
    _changes,
)
def test_encode_write_is_compact_json(op: str, base: str, changes: dict[str, Any]) -> None:
    expected: dict[str, Any] = {"v": SCHEMA_VERSION, "op": op, "set": changes}
    if base:
        expected["base"] = base
    assert encode_write(op, base, changes) == json.dumps(
        expected, ensure_ascii=False, separators=(",", ":")
    )


def test_new_captured_builds_the_same_frozen_event() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    fast = new_captured("ns", 7, at, "sess", "n1", "w", "m", None)  # type: ignore[arg-type]
    plain = Captured(
        namespace="ns",
        cursor=7,
        at=at,
        source_session="sess",
        node_id="n1",
        write_id="w",
        memory_id="m",
        memory=None,  # type: ignore[arg-type]
    )
    assert fast == plain
    assert repr(fast) == repr(plain)
    assert fast.kind == "captured"
    with pytest.raises(AttributeError):
        fast.cursor = 8  # type: ignore[misc]


_KEY = "0123456789abcdef0123/1795649794389000196/sess/ab"


def _slow(value: str) -> object:
    mid, at, by, node = _KEY.split("/")
    return _decode_json(_KEY, mid, at, by, node, value)


@given(st.sampled_from(["capture", "update"]), _changes)
def test_decode_write_reads_what_encode_write_wrote(op: str, changes: dict[str, Any]) -> None:
    value = encode_write(op, "", changes)
    assert decode_write(_KEY, value) == _slow(value)


# Values that start like the plain form but are not it (or are invalid) must be decided
# exactly as the general parser decides them.
_MIDDLES = [
    '"a"',
    ' "a"',
    '"a" ',
    '"a\\"b"',
    '"a\\ud800"',
    '"a\tb"',
    '"a',
    '""',
    '" "',
    '"a\\u0000"',
    '"a"},"op":"delete","x":{"y":"b',
    "1",
    "null",
    '"a","tags":["x"]',
    '"a","status":"s"',
]
_tricky = st.builds(
    lambda middle, tail: _CAPTURE_HEAD + middle + tail,
    st.sampled_from(_MIDDLES) | st.text(max_size=12),
    st.sampled_from(["}}", ',"tags":[]}}', "}", ',"tags":[]}', "}},", ""]),
)


@given(_tricky)
def test_decode_write_fast_path_agrees_with_the_general_parser(value: str) -> None:
    assert decode_write(_KEY, value) == _slow(value)


def test_decode_write_never_raises_on_deep_nesting() -> None:
    # found in review: the plain-capture shortcut let RecursionError through
    assert decode_write(_KEY, _CAPTURE_HEAD + "[" * 5000 + "}}") is None
    assert decode_write(_KEY, _CAPTURE_HEAD + '"a"' + "}" * 5000) is None


def test_memory_built_fast_is_the_same_frozen_dataclass() -> None:
    import dataclasses

    from subcog_crdt._core.memory import Memory, _new_memory

    at = datetime(2026, 1, 2, tzinfo=UTC)
    values: tuple[Any, ...] = (
        "m", "ns", "c", ("t",), {}, "s", ("s",), at, at, "s", 1, False,
        "d", None, None, None, "1795649794389000196",
    )  # fmt: skip
    fast, plain = _new_memory(*values), Memory(*values)
    assert fast == plain and repr(fast) == repr(plain)
    assert dataclasses.is_dataclass(fast)
    assert dataclasses.replace(fast, content="x").content == "x"
    assert fast != values  # type: ignore[comparison-overlap]  # not a tuple
    assert "clock=" not in repr(fast)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.content = "y"  # type: ignore[misc]


_words = st.text(
    alphabet=st.sampled_from(
        list(
            "aZ_9 \t\n\x0b\x1c.,-'\"!@#$%^&*()[]{}\\/|~`<>?;:+=É ßİ\u2003"
            "\u201c\u201d\u2014\u3001\u3002\uff01\ufb01e\u0301\u00e9\u203f\u00bf"
            "\u6570\u636e\u3042\ud55c\uff21\U0001d412\u210d"
        )
    ),
    max_size=60,
)


def _is_cjk(c: str) -> bool:
    name = unicodedata.name(c, "")
    return name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL SYLLABLE"))


def _plain_tokens(text: str) -> list[str]:
    """The definition: NFKC of the case-folded text, split on whitespace, ASCII
    punctuation and symbols, and Unicode punctuation other than "_"; then each run of
    CJK characters in a word is its own part, as overlapping pairs of characters."""
    nfkc = unicodedata.normalize
    folded = nfkc("NFKC", nfkc("NFKC", text).casefold())
    punct = "!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~"
    words = "".join(
        " " if c in punct or (c != "_" and unicodedata.category(c).startswith("P")) else c
        for c in folded
    ).split()
    out: list[str] = []
    for word in words:
        parts: list[str] = []
        for c in word:
            if parts and _is_cjk(c) == _is_cjk(parts[-1][-1]):
                parts[-1] += c
            else:
                parts.append(c)
        for part in parts:
            if _is_cjk(part[0]) and len(part) > 1:
                out.extend(part[i : i + 2] for i in range(len(part) - 1))
            else:
                out.append(part)
    return out


@given(_words)
def test_tokenize_is_casefold_punctuation_split(text: str) -> None:
    assert tokenize(text) == _plain_tokens(text)
    ascii_only = text.encode("ascii", "ignore").decode()
    assert tokenize(ascii_only) == _plain_tokens(ascii_only)


@given(
    st.lists(st.lists(st.sampled_from(["ab", "cd", "ef", "gh"]), max_size=6), max_size=25),
    st.lists(st.sampled_from(["ab", "cd", "ef", "zz"]), min_size=1, max_size=3),
)
def test_bm25_search_matches_the_plain_formula(docs: list[list[str]], query: list[str]) -> None:
    index, _ = indexed(docs, [])
    expected = plain_bm25(docs, query)
    best = sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert index.search(" ".join(query), 5, lambda d: docs[d]) == [(s, d) for d, s in best]


def plain_bm25(
    docs: list[list[str]], query: list[str], live: list[bool] | None = None
) -> dict[int, float]:
    """BM25 scores by the textbook formula (k1 1.2, b 0.75) of the live documents."""
    # N counts documents with words (a restarted node holds wordless numbers for junk)
    n = max(1, sum(1 for tokens in docs if tokens))
    avg = (sum(map(len, docs)) / n) or 1.0
    expected: dict[int, float] = {}
    for term in dict.fromkeys(query):
        having = [d for d, tokens in enumerate(docs) if term in tokens]
        idf = math.log(1 + (n - len(having) + 0.5) / (len(having) + 0.5))
        for d in having:
            if live is not None and not live[d]:
                continue
            f = docs[d].count(term)
            norm = 1.2 * (1 - 0.75 + 0.75 * len(docs[d]) / avg)
            expected[d] = expected.get(d, 0.0) + idf * f * (1.2 + 1) / (f + norm)
    return expected


_toks = st.lists(st.sampled_from(["ab", "cd", "ef", "gh"]), max_size=6)


def indexed(
    docs: list[list[str]], changes: list[tuple[int, list[str]]]
) -> tuple[RecallIndex, list[list[str]]]:
    """An index of ``docs`` (all live), then ``changes`` (document ``i % len(docs)``
    rewritten); and the documents' current words."""
    index = RecallIndex()
    current = [list(t) for t in docs]
    for tokens in docs:
        d = index.new_doc()
        index.add(d, tokens)
        index.set_live(d, True)
    for i, tokens in changes:
        i %= len(docs)
        current[i] = list(tokens)
        index.replace(i, list(tokens))
    return index, current


@given(
    st.lists(_toks, min_size=1, max_size=12),
    st.lists(st.tuples(st.integers(0, 11), _toks), max_size=8),
    st.lists(st.sampled_from(["ab", "cd", "ef", "zz"]), min_size=1, max_size=3),
)
def test_an_index_with_changed_documents_ranks_like_one_built_afresh(
    docs: list[list[str]], changes: list[tuple[int, list[str]]], query: list[str]
) -> None:
    """Removal is lazy (a changed document's old words stay in the postings); scores and
    order must still equal those of an index holding only the current words, which is
    what a restarted node builds."""
    live, current = indexed(docs, changes)
    fresh, _ = indexed(current, [])
    q = " ".join(query)
    assert live.search(q, 5, lambda d: current[d]) == fresh.search(q, 5, lambda d: current[d])


def _binary_facts(n: int) -> list[tuple[str, dict[str, Any]]]:
    """``n`` distinct contents from three words, so the recall index holds three terms
    whatever ``n`` (its posting lists are objects of their own)."""
    return [
        ("fact " + " ".join("one" if i >> b & 1 else "zero" for b in range(12)), {})
        for i in range(n)
    ]


def _tracked_growth(make: Any) -> tuple[int, Any]:
    gc.collect()
    before = len(gc.get_objects())
    kept = make()
    gc.collect()
    return len(gc.get_objects()) - before, kept


def test_memories_written_once_cost_the_cyclic_gc_no_object_each() -> None:
    """A bulk load must not leave one GC-tracked object per memory: every full collection
    walks them all (~25 ms at 100k). Such memories then behave as any other."""
    doc = NamespaceDoc("n", node_id="00000000000000aa", hlc=Hlc(), next_cursor=lambda: 1)
    doc.capture("s", "warm up the index and the map", {})
    doc.flush_index()

    def load() -> list[str]:
        mems, _ = doc.capture_many("s", _binary_facts(2000))
        doc.flush_index()
        return [m.id for m in mems]

    growth, ids = _tracked_growth(load)
    assert growth < 100, growth  # the 2000-item id list is one

    def read_all() -> int:
        return sum(doc.get(mid) is not None and len(doc.writes(mid)) for mid in ids)

    growth, read = _tracked_growth(read_all)
    assert read == 2000 and growth < 100, growth  # reading does not bring the objects back
    assert len(set(ids)) == 2000 and all(doc.has(mid) for mid in ids)
    assert set(ids) < set(doc.memory_ids()) and len(list(doc.memory_ids())) == 2001
    # Read, updated, deleted, captured again: as any memory.
    assert doc.get(ids[1]) is not None and doc.get(ids[1]).content == _binary_facts(2)[1][0]
    updated, _ = doc.update("s", ids[2], {"content": "fact changed", "tags": ["x"]})
    assert updated.version == 2 and doc.get(ids[2]).tags == ("x",)
    doc.delete("s", ids[3])
    assert doc.get(ids[3]).deleted and ids[3] not in set(doc.memory_ids())
    again, _ = doc.capture("t", _binary_facts(5)[4][0], {})
    assert again.id == ids[4] and again.captured_by == ("s", "t")
    assert [mid for _, mid in doc.search_ids("changed", 10)] == [ids[2]]
    assert len(doc.search_ids("zero one", 5000)) == 1998  # the deleted and changed go

    # A restart: loaded lazily, resolved in the background, compact again.
    other = NamespaceDoc("n", node_id="00000000000000bb", hlc=Hlc(), next_cursor=lambda: 1)

    def restart() -> None:
        other.load([doc.diff()])
        other.resolve_all()
        other.flush_index()

    growth, _ = _tracked_growth(restart)
    assert growth < 100, growth
    assert other.state_hash() == doc.state_hash()
    for mid in ids[:6]:
        assert other.get(mid) == doc.get(mid)
    assert set(other.memory_ids()) == set(doc.memory_ids())


_batch_items = st.lists(
    st.tuples(
        st.sampled_from(["We chose WAL", "we  chose wal", "Tests next to code", "A", "b", "B "]),
        st.sampled_from([{}, {"tags": []}, {"tags": ["x"]}, {"status": "draft"}]),
    ),
    min_size=1,
    max_size=8,
)


@given(st.lists(st.sampled_from(["capture", "delete", "move"]), max_size=4), _batch_items)
def test_capture_many_is_captures_one_by_one(before: list[str], items: list[Any]) -> None:
    """The batch's inline path for new content agrees with ``capture`` in everything: ids,
    dedupe (within the batch, and with live, deleted and moved memories), memories, events
    and the entries written."""
    from support.coredocs import NOW, core_doc

    def prepared() -> NamespaceDoc:
        ticks = iter(range(NOW, NOW + 10_000))
        doc = core_doc("00000000000000aa", lambda: next(ticks))
        last = None
        for i, op in enumerate(before):
            if op == "capture" or last is None:
                last, _ = doc.capture("s", ["We chose WAL", "b", f"other {i}"][i % 3], {})
            elif op == "delete" and not last.deleted:
                last, _ = doc.delete("s", last.id)
            elif op == "move" and not last.deleted:
                last, _ = doc.update("s", last.id, {"content": "Tests next to code"})
        return doc

    one, many = prepared(), prepared()
    singles = [one.capture("t", content, dict(fields)) for content, fields in items]
    mems, events = many.capture_many("t", [(c, dict(f)) for c, f in items])
    assert mems == [m for m, _ in singles]
    assert events == [e for _, evs in singles for e in evs]
    assert dict(many.entries.items()) == dict(one.entries.items())
    assert sorted(many.memory_ids(True)) == sorted(one.memory_ids(True))
    for mid in one.memory_ids(True):
        assert many.get(mid) == one.get(mid)


@given(
    st.fixed_dictionaries(
        {"content": st.text(min_size=1, max_size=20).filter(lambda t: t.strip())},
        optional={"tags": st.just(["x"]) | st.just([]), "status": st.just("s")},
    )
)
def test_a_captured_memory_is_the_fold_of_its_capture(changes: dict[str, Any]) -> None:
    """``captured_memory`` (and its shortcut for bare content) makes what the general fold
    makes of the one capture."""
    at = "1800000000000000001"
    w = Write(f"{'a' * 20}/{at}/s/{'b' * 16}", "a" * 20, at, "s", "b" * 16, "capture", "", changes)
    assert captured_memory("ns", w.memory_id, at, "s", changes) == fold_state([w]).memory("ns")


@given(
    st.one_of(
        _text,
        st.text(
            alphabet=st.sampled_from(['"', "\\", "\x01", "a", "é"]), min_size=1, max_size=9
        ).map(lambda t: t * (200_000 // len(t) + 1)),  # past the length that needs measuring
        st.none(),
        st.integers(),
    )
)
def test_prepare_content_is_prepare_fields_of_bare_content(content: Any) -> None:
    """A batch's bare captures skip building their fields twice; the result (or the
    error) must be what the general path gives."""
    from subcog_crdt._core.schema import prepare_content, prepare_fields

    try:
        expected: Any = prepare_fields({"content": content})
    except Exception as exc:
        expected = (type(exc), str(exc))
    try:
        got: Any = prepare_content(content)
    except Exception as exc:
        got = (type(exc), str(exc))
    assert got == expected
