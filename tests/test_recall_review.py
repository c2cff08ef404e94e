"""Recall as a user sees it: read-your-writes (locally, from a peer, after a restart),
deleted and revived memories, tokenization of non-ASCII text, tag and namespace filters,
limits, and ranking against a plain BM25 written here."""

from __future__ import annotations

import asyncio
import math
import re
import unicodedata
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import converged, link, wait_for
from subcog_crdt import ConversationsApi, InvalidArgument, InvalidNamespace, Memory
from subcog_crdt._core.recall import RecallIndex

NS = "d"


def node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(listen=False, **kw)


def ids(mems: list[Memory]) -> list[str]:
    return [m.id for m in mems]


# -- a plain BM25 to rank against ------------------------------------------------------

_REF_K1 = 1.2
_REF_B = 0.75
# words: runs of anything but whitespace and ASCII punctuation ("_" is part of a word);
# the vocabulary below has no other punctuation, so this holds also once that splits
_REF_WORD = re.compile(r"[^\s!-/:-@\[-^`{-~]+")


def ref_tokens(text: str) -> list[str]:
    return _REF_WORD.findall(text.casefold())


def ref_recall(
    mems: list[Memory],
    query: str,
    limit: int,
    tags: frozenset[str] = frozenset(),
    *,
    count_deleted: bool = False,
) -> list[str]:
    """BM25 over a namespace's memories (content and tags), best first, ties by id.

    With ``count_deleted`` (the node's rule before the eighth session: a tombstone kept
    its words in the index) N, df and the average length count deleted memories too;
    only live ones are returned either way (see
    test_deleted_memories_do_not_sway_the_ranking)."""
    docs = {
        m.id: ref_tokens(m.content) + [t for tag in m.tags for t in ref_tokens(tag)] for m in mems
    }
    docs = {mid: toks for mid, toks in docs.items() if toks}
    if not count_deleted:
        docs = {m.id: docs[m.id] for m in mems if m.id in docs and not m.deleted}
    live = {m.id for m in mems if not m.deleted and tags <= set(m.tags)}
    n = max(1, len(docs))
    avg = (sum(len(t) for t in docs.values()) / n) or 1.0
    tf = {mid: Counter(toks) for mid, toks in docs.items()}
    scores: dict[str, float] = {}
    for term in dict.fromkeys(ref_tokens(query)):
        df = sum(1 for c in tf.values() if term in c)
        if not df:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for mid, c in tf.items():
            f = c.get(term, 0)
            if f and mid in live:
                norm = _REF_K1 * (1 - _REF_B + _REF_B * len(docs[mid]) / avg)
                scores[mid] = scores.get(mid, 0.0) + idf * f * (_REF_K1 + 1) / (f + norm)
    ranked = sorted(scores, key=lambda mid: (-scores[mid], mid))
    return ranked[:limit]


# -- read your writes ------------------------------------------------------------------


async def test_recall_right_after_each_write_sees_it() -> None:
    """Every write is visible to the very next recall: a capture, a batch, a tags-only
    update, a delete (gone, by its words and its tags) and a capture of the same content
    again (back, with the new capture's words only)."""
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        m = await s.capture(NS, "Pick msgpack framing", tags=["wire"])
        assert ids(s.recall("msgpack")) == [m.id]
        assert ids(s.recall("wire")) == [m.id]
        batch = await s.capture_many(NS, ["zstd for snapshots", {"content": "lz4 rejected"}])
        assert set(ids(s.recall("zstd lz4"))) == set(ids(batch))
        m = await s.update(m.id, tags=["protocol"])
        assert ids(s.recall("protocol")) == [m.id]
        assert s.recall("wire") == []  # an update's tags replace the old ones
        # a deleted memory leaves the ranking: the next best takes its place
        strong = await s.capture(NS, "jitter jitter jitter")
        weak = await s.capture(NS, "jitter once among other words")
        assert ids(s.recall("jitter", limit=1)) == [strong.id]
        await s.delete(strong.id)
        assert ids(s.recall("jitter", limit=1)) == [weak.id]
        await s.delete(m.id)
        assert s.recall("msgpack") == []
        assert s.recall("protocol") == []
        back = await s.capture(NS, "PICK   msgpack framing", tags=["again"])
        assert back.id == m.id and not back.deleted
        hits = s.recall("msgpack")
        assert ids(hits) == [m.id] and hits[0].content == "PICK   msgpack framing"
        assert ids(s.recall("again")) == [m.id]
        assert s.recall("protocol") == []  # the revived memory has the new capture's tags


async def test_recall_sees_a_peers_writes_as_soon_as_they_arrive() -> None:
    """On the receiving node, recall agrees with get() at every step: a peer's capture,
    content update and delete change the results the moment the memory shows them."""
    async with node() as a, node() as b:
        link(a, b)
        sa = await a.register_session("sa", subscribe=[NS])
        sb = await b.register_session("sb", subscribe=[NS])
        m = await sa.capture(NS, "the peer chose sqlite")
        await wait_for(lambda: NS in b.namespaces() and b.memories(NS), what="capture at b")
        assert ids(sb.recall("sqlite")) == [m.id]
        m = await sa.update(m.id, content="the peer chose postgres")
        await wait_for(lambda: b.get(m.id).version == m.version, what="update at b")
        assert sb.recall("sqlite") == []
        assert ids(sb.recall("postgres")) == [m.id]
        await sa.delete(m.id)
        await wait_for(lambda: b.get(m.id).deleted, what="delete at b")
        assert sb.recall("postgres") == []
        # b's capture of the first content revives it (its id is that content's), on both
        back = await sb.capture(NS, "The peer chose SQLite")
        assert back.id == m.id
        assert ids(sb.recall("sqlite")) == [m.id]
        assert sb.recall("postgres") == []
        await wait_for(lambda: not a.get(m.id).deleted, what="revival at a")
        assert ids(sa.recall("sqlite")) == [m.id]
        assert sa.recall("postgres") == []


async def test_recall_is_equal_on_two_nodes_over_a_loopback_socket() -> None:
    """Two nodes that wrote concurrently (same-scored memories, arriving in a different
    order on each) return the same ranked results once converged: ties go by memory id,
    not by arrival."""
    async with (
        ConversationsApi(host="127.0.0.1", discovery=()) as a,
        ConversationsApi(host="127.0.0.1", discovery=()) as b,
    ):
        sa = await a.register_session("sa", subscribe=[NS])
        sb = await b.register_session("sb", subscribe=[NS])
        for i in range(30):
            await sa.capture(NS, f"shared word a{i:02d}")
            await sb.capture(NS, f"shared word b{i:02d}")
        x = await sa.capture(NS, "shared shared extra")
        await sb.delete((await sb.capture(NS, "shared gone")).id)
        assert a.url is not None
        await b.connect(a.url)
        await wait_for(lambda: converged([a, b], NS), what="converged")
        for query, limit in (("shared", 7), ("word", 13), ("shared word", 40), ("gone", 5)):
            on_a, on_b = ids(a.recall(query, limit=limit)), ids(b.recall(query, limit=limit))
            assert on_a == on_b, query
            assert on_a == ref_recall(a.memories(NS, include_deleted=True), query, limit)
        assert ids(a.recall("shared", limit=1)) == [x.id]


async def test_recall_is_the_same_before_and_after_a_restart(tmp_path: Path) -> None:
    """A durable node returns the same ranked results after a restart (the index is
    rebuilt from the document, lazily) as before it, right after opening, for memories
    captured, updated, retagged, deleted and revived."""
    data = tmp_path / "node"
    queries = ["sqlite", "wal journal", "tag3", "fsync", "revived", "note", "nothing here"]
    async with ConversationsApi(data_dir=data, listen=False) as a:
        s = await a.register_session("s", subscribe=[NS, "p"])
        mems = [
            await s.capture(
                NS, f"note {i} about sqlite {'wal ' * (i % 4)}journal", tags=[f"tag{i % 5}"]
            )
            for i in range(40)
        ]
        await s.capture("p", "a pattern note about sqlite fsync")
        for m in mems[::3]:
            await s.update(m.id, content=f"{m.content} fsync")
        for m in mems[1::4]:
            await s.update(m.id, tags=["tag3", "retagged"])
        for m in mems[2::5]:
            await s.delete(m.id)
        gone = await s.capture(NS, "revived note")
        await s.delete(gone.id)
        await s.capture(NS, "Revived note", tags=["tag3"])
        before = {(q, lim): ids(s.recall(q, limit=lim)) for q in queries for lim in (1, 5, 50)}
        tagged = ids(s.recall("note", tags=["tag3"], limit=50))
    async with ConversationsApi(data_dir=data, listen=False) as a:
        s = await a.register_session("s")
        after = {
            (q, lim): ids(s.recall(q, namespaces=[NS, "p"], limit=lim))
            for q in queries
            for lim in (1, 5, 50)
        }
        assert after == before
        assert ids(s.recall("note", namespaces=[NS, "p"], tags=["tag3"], limit=50)) == tagged
        assert ids(a.recall("note", namespace=NS, limit=50)) == ref_recall(
            a.memories(NS, include_deleted=True), "note", 50
        )


# -- tokenization ----------------------------------------------------------------------


async def test_non_ascii_words_match_across_case_and_separators() -> None:
    """Accents, ß, Greek final sigma and mixed case fold alike in content and query; emoji
    and ASCII punctuation separate words; a no-break space separates words."""
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        cafe = await s.capture(NS, "CAFÉ au lait, Straße (ΟΔΟΣ)")
        rocket = await s.capture(NS, "🚀 launch-day checklist")
        nbsp = await s.capture(NS, "mot\u00a0insécable")
        assert ids(s.recall("café")) == [cafe.id]
        assert ids(s.recall("STRASSE")) == [cafe.id]
        assert ids(s.recall("οδος")) == [cafe.id]
        assert ids(s.recall("Launch")) == [rocket.id]
        assert ids(s.recall("🚀")) == [rocket.id]
        assert ids(s.recall("day")) == [rocket.id]
        assert ids(s.recall("insécable")) == [nbsp.id]


async def test_a_word_in_typographic_quotes_dashes_or_cjk_punctuation_is_found() -> None:
    """BUG: only ASCII punctuation separates words, so text as agents and editors write it
    hides its words: “SQLite”, SQLite—fast, «SQLite», SQLite<fullwidth comma>WAL,
    SQLite<ideographic full stop>, ¿SQLite? and SQLite… are each one word that a recall
    for "sqlite" does not find (while SQLite in ASCII quotes or dashes is found)."""
    texts = [
        "We chose “SQLite” for storage",
        "SQLite—fast enough",
        "«SQLite» partout",
        "数据库\uff0cSQLite\uff0cWAL",
        "我们用 SQLite。",
        "maybe sqlite…",
        "¿SQLite?",
    ]
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        mems = [await s.capture(NS, t) for t in texts]
        found = {m.id for m in s.recall("sqlite", limit=100)}
        missed = [m.content for m in mems if m.id not in found]
        assert missed == [], f"recall('sqlite') misses {missed}"
        assert ids(s.recall("“sqlite”", limit=100)) == ids(s.recall("sqlite", limit=100))


async def test_a_word_inside_cjk_text_is_found() -> None:
    """Chinese and Japanese are written without spaces: a whole clause was one word, so
    neither the Chinese word for database nor SQLite, inside it, was found. CJK runs are
    indexed as character pairs now."""
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        m = await s.capture(NS, "数据库使用SQLite存储")
        assert ids(s.recall("sqlite")) == [m.id]
        assert ids(s.recall("数据库")) == [m.id]


async def test_nfc_and_nfd_forms_of_the_same_word_match() -> None:
    """BUG: text is not Unicode-normalised, so "café" typed precomposed (NFC) and
    decomposed (NFD: e + combining accent, as macOS file names and some editors give it)
    are different words: a recall in one form misses a memory written in the other."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        m1 = await s.capture(NS, f"{nfc} near the office")
        m2 = await s.capture(NS, f"crème brûlée at the {nfd}")
        assert set(ids(s.recall(nfc))) == {m1.id, m2.id}
        assert set(ids(s.recall(nfd))) == {m1.id, m2.id}


@pytest.mark.parametrize("query", ["", "   \n\t", "!!! ... ---", "“”", "\u200b"])
async def test_a_query_without_words_returns_nothing(query: str) -> None:
    """An empty, blank or punctuation-only query is a valid query with no results (not an
    error, not everything)."""
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        await s.capture(NS, "some fact")
        assert s.recall(query) == []


async def test_a_very_long_query_ranks_like_its_distinct_words() -> None:
    """A query of 200k words (repeats of a few) finds what its distinct words find, in
    the same order: repeats of a query word do not change the ranking."""
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        await s.capture(NS, "alpha beta gamma")
        await s.capture(NS, "beta beta delta")
        await s.capture(NS, "unrelated words")
        short = ids(s.recall("alpha beta"))
        assert len(short) == 2
        assert ids(s.recall("alpha beta " * 100_000)) == short
        many = " ".join(f"w{i}" for i in range(50_000))
        assert ids(s.recall(f"{many} alpha")) == ids(s.recall("alpha"))


async def test_deleted_memories_do_not_sway_the_ranking() -> None:
    """A tombstone's words leave the index's statistics (N, document frequency, average
    length). Two live memories, each matching one word of the query and equally rare among
    live memories, tie (so go by id); 20 deleted notes using the first one's word must not
    make that word count as common (it did: the other memory won)."""
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        one = await s.capture(NS, "sqlite thing")
        two = await s.capture(NS, "wal thing")
        first, word = (one, "sqlite") if one.id < two.id else (two, "wal")
        for i in range(20):
            await s.delete((await s.capture(NS, f"{word} note {i}")).id)
        live_only = ref_recall(
            a.memories(NS, include_deleted=True), "sqlite wal", 10, count_deleted=False
        )
        assert live_only[0] == first.id
        assert ids(s.recall("sqlite wal")) == live_only


# -- filters ---------------------------------------------------------------------------


async def test_a_tags_filter_needs_every_tag_exactly_as_stored() -> None:
    """tags= keeps memories holding every tag given (all, not any), compared exactly as
    stored after trimming (case matters, as capture keeps "DB" and "db" apart), and never
    a deleted one."""
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        both = await s.capture(NS, "sqlite both", tags=["db", "storage"])
        one = await s.capture(NS, "sqlite one", tags=["db"])
        upper = await s.capture(NS, "sqlite upper", tags=["DB", "storage"])
        dead = await s.capture(NS, "sqlite dead", tags=["db", "storage"])
        await s.delete(dead.id)
        assert set(ids(s.recall("sqlite", tags=["db"]))) == {both.id, one.id}
        assert ids(s.recall("sqlite", tags=["db", "storage"])) == [both.id]
        assert ids(s.recall("sqlite", tags=[" storage", "db ", "db"])) == [both.id]
        assert ids(s.recall("sqlite", tags=["DB"])) == [upper.id]
        assert s.recall("sqlite", tags=["db", "missing"]) == []
        # a tag is a word too: found by the query, filtered the same
        assert set(ids(s.recall("storage"))) == {both.id, upper.id}
        # equal scores under a filter are cut by memory id, as without one
        same = await s.capture_many(
            NS, [{"content": f"tied {i}", "tags": ["t"]} for i in range(30)]
        )
        assert ids(s.recall("tied", tags=["t"], limit=7)) == sorted(ids(same))[:7]
        assert ids(s.recall("tied", limit=7)) == sorted(ids(same))[:7]


async def test_duplicate_namespaces_do_not_duplicate_results() -> None:
    """BUG: namespaces=["d", "d"] searches "d" twice and returns every hit twice (and
    the doubles push other results past the limit)."""
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS, "e"])
        m1 = await s.capture(NS, "alpha beta")
        m2 = await s.capture("e", "alpha alpha")
        assert ids(a.recall("alpha", namespaces=[NS, NS])) == [m1.id]
        got = ids(a.recall("alpha", namespaces=[NS, NS, "e", "e"], limit=2))
        assert sorted(got) == sorted([m1.id, m2.id])


async def test_namespace_filters_unknown_private_and_invalid() -> None:
    """An unknown namespace has no results and is not created by asking; an invalid name
    anywhere in the list raises InvalidNamespace and creates nothing; a session's recall
    without namespaces covers its subscriptions only; a private namespace is recalled on
    its own node, never on a peer."""
    async with node(private_namespaces=["mine"]) as a, node() as b:
        link(a, b)
        sa = await a.register_session("sa", subscribe=[NS, "mine"])
        sb = await b.register_session("sb", subscribe=[NS, "mine"])
        other = await a.register_session("other", subscribe=["elsewhere"])
        shared = await sa.capture(NS, "the fact everyone sees")
        private = await sa.capture("mine", "the fact only a sees")
        await other.capture("elsewhere", "the fact in another namespace")
        before = a.namespaces()
        assert a.recall("fact", namespace="never-written") == []
        assert a.recall("fact", namespaces=["never-written", "nor-this"]) == []
        for bad in (["Bad"], [NS, "Bad"], ["", NS], [NS, "x" * 65]):
            with pytest.raises(InvalidNamespace):
                a.recall("fact", namespaces=bad)
        with pytest.raises(InvalidNamespace):
            a.recall("fact", namespace="UPPER")
        assert a.namespaces() == before
        assert set(ids(sa.recall("fact"))) == {shared.id, private.id}
        await wait_for(lambda: b.memories(NS), what="the shared fact at b")
        assert ids(sb.recall("fact")) == [shared.id]
        assert b.recall("fact", namespace="mine") == []
        assert sb.recall("fact", namespaces=[]) == []


@pytest.mark.parametrize("limit", [0, -1, 10_001, 10**30, 2.0, "3", None, True])
async def test_a_bad_limit_is_refused_and_changes_nothing(limit: Any) -> None:
    """limit is an int in 1..10000: anything else is an InvalidArgument naming limit."""
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        await s.capture(NS, "fact")
        with pytest.raises(InvalidArgument, match="limit"):
            s.recall("fact", limit=limit)
        assert a.namespaces() == [NS]


async def test_the_largest_limit_returns_every_match_ranked() -> None:
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        await s.capture_many(NS, [f"word {'filler ' * (i % 7)}{i}" for i in range(300)])
        got = ids(s.recall("word", limit=10_000))
        assert got == ref_recall(a.memories(NS), "word", 10_000)
        assert len(got) == 300
        assert ids(s.recall("word", limit=17)) == got[:17]


async def test_expired_and_archived_memories_are_still_recalled() -> None:
    """docs/schema.md: the node gives expires_at and status no meaning; a memory past its
    expires_at is still recalled."""
    async with node() as a:
        s = await a.register_session("s", subscribe=[NS])
        past = await s.capture(NS, "expired fact", expires_at=datetime.now(UTC) - timedelta(days=1))
        archived = await s.capture(NS, "archived fact", status="archived")
        assert set(ids(s.recall("fact"))) == {past.id, archived.id}


# -- ranking against the reference, writes interleaved ---------------------------------

WORDS = ["alpha", "Beta", "GAMMA", "delta,", "eps-ilon", "zeta!", "café", "ΟΔΟΣ", "?!"]
TAGS = ["t1", "t2", "T1"]

texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("capture"), texts, st.lists(st.sampled_from(TAGS), max_size=2)),
        st.tuples(st.just("update"), st.integers(0, 50), texts),
        st.tuples(
            st.just("retag"), st.integers(0, 50), st.lists(st.sampled_from(TAGS), max_size=2)
        ),
        st.tuples(st.just("delete"), st.integers(0, 50), st.just(None)),
        st.tuples(st.just("again"), st.integers(0, 50), st.just(None)),
    ),
    min_size=1,
    max_size=40,
)
queries = st.lists(
    st.tuples(
        st.lists(st.sampled_from([*WORDS, "absent"]), min_size=1, max_size=3).map(" ".join),
        st.integers(1, 12),
        st.sampled_from([(), ("t1",), ("t1", "t2")]),
    ),
    min_size=1,
    max_size=6,
)


class _TinyThresholds:
    """Compact and rebuild posting lists after a handful of changes, so short examples
    reach those paths (the class attributes are there for tests)."""

    def __enter__(self) -> None:
        self._patches = [
            patch.object(RecallIndex, "_MIN_STALE", 3),
            patch.object(RecallIndex, "_MIN_DIRTY", 2),
            patch.object(RecallIndex, "_MIN_TERM_STALE", 2),
        ]
        for p in self._patches:
            p.start()

    def __exit__(self, *exc: object) -> None:
        for p in self._patches:
            p.stop()


async def _run_against_reference(
    program: list[tuple[str, Any, Any]], asks: list[tuple[str, int, tuple[str, ...]]]
) -> None:
    async with node() as a, node() as b:
        link(a, b)
        s = await a.register_session("s", subscribe=[NS])
        made: list[Memory] = []
        for op, x, y in program:
            if op == "capture":
                made.append(await s.capture(NS, x, tags=y))
                continue
            if not made:
                continue
            m = a.get(made[x % len(made)].id)
            if op == "again":
                made.append(await s.capture(NS, m.content.upper()))
            elif m.deleted:
                continue
            elif op == "update":
                await s.update(m.id, content=y)
            elif op == "retag":
                await s.update(m.id, tags=y)
            else:
                await s.delete(m.id)
            # read your writes, at every step
            mems = a.memories(NS, include_deleted=True)
            for limit in (1, 50):
                assert ids(s.recall(WORDS[0], limit=limit)) == ref_recall(mems, WORDS[0], limit)
        if not made:
            return
        await wait_for(lambda: converged([a, b], NS), what="converged")
        mems = a.memories(NS, include_deleted=True)
        for query, limit, tags in asks:
            want = ref_recall(mems, query, limit, frozenset(tags))
            assert ids(a.recall(query, limit=limit, tags=tags)) == want, (query, limit, tags)
            assert ids(b.recall(query, limit=limit, tags=tags)) == want, (query, limit, tags)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=ops, asks=queries, tiny=st.booleans())
def test_recall_ranks_like_plain_bm25_through_updates_and_deletes(
    program: list[tuple[str, Any, Any]],
    asks: list[tuple[str, int, tuple[str, ...]]],
    tiny: bool,
) -> None:
    """After any mix of captures, content and tag updates, deletes and revivals, recall
    on the writer and on a synced peer equals a plain BM25 over the memories' current
    content and tags (ties by id, deleted ones left out, tags= as "all of")."""
    if tiny:
        with _TinyThresholds():
            asyncio.run(_run_against_reference(program, asks))
    else:
        asyncio.run(_run_against_reference(program, asks))
