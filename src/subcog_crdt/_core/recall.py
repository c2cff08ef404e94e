"""An incremental full-text index with BM25 ranking.

Postings are compact ``array('I')`` lists of document numbers (a term repeated in a
document appears repeatedly, which is its term frequency). Removal is lazy: a document
whose text changed keeps its old entries for a while and is marked dirty, with its
current words kept (only for dirty documents) so queries count those instead. Stale
entries are compacted away once they are a fair share of the postings (amortised O(1)
per stale entry), so changed documents cost nothing lasting. Deleted documents are
skipped. That keeps a write at a few microseconds and the index at a few bytes per term
occurrence.
"""

from __future__ import annotations

import heapq
import math
import re
import unicodedata
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from itertools import filterfalse

__all__ = ["RecallIndex", "tokenize"]

_K1 = 1.2
_B = 0.75
# ASCII punctuation and symbols separate words ("_" stays part of one, as in \w);
# translate + split runs in C, several times faster than a regex here.
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~"
# For ASCII text through bytes: a 256-byte table instead of a dict lookup per character
# (~8 us against ~13 us for 300 bytes here). casefold() is lower() on ASCII.
_ASCII_SEPARATORS = bytes.maketrans(_PUNCTUATION.encode(), b" " * len(_PUNCTUATION))
_CACHED_CHARS = 1 << 16  # a bound on the table below: text may hold any code point


def is_separator(ch: str) -> bool:
    """Whether ``ch`` separates words: ASCII punctuation and symbols, and any Unicode
    punctuation (curly quotes, dashes, CJK commas and full stops, ...); "_" joins."""
    return ch in _PUNCTUATION or (ch != "_" and unicodedata.category(ch)[0] == "P")


class _Separators(dict[int, str]):
    """A ``str.translate`` table mapping separators to spaces, filled per character as
    text brings it (the Unicode categories would make a table of 1.1M code points)."""

    def __missing__(self, code: int) -> str:
        ch = chr(code)
        out = " " if is_separator(ch) else ch
        if len(self) < _CACHED_CHARS:
            self[code] = out
        return out


_SEPARATORS = _Separators()


# Scripts written without spaces between words (Han, kana; Hangul, whose words carry
# particles): CJK radicals to CJK ideographs, Hangul syllables, compatibility ideographs,
# the supplementary ideograph planes.
_CJK_RUN = re.compile("[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f]+")


def tokenize(text: str) -> list[str]:
    """Words of ``text``: NFKC-normalised and case folded (so a word typed precomposed
    or decomposed, in fullwidth or with a ligature, is one word), split on whitespace and
    punctuation (``is_separator``). A run of CJK characters becomes its overlapping
    character pairs (one character alone stays one), and a word is split where such a
    run starts or ends: the usual way to search text written without spaces, so that
    "数据库使用SQLite" holds "数据", "据库", "库使", "使用" and "sqlite"."""
    if text.isascii():
        return text.lower().encode().translate(_ASCII_SEPARATORS).decode().split()
    # NFKC first too: it turns styled letters (mathematical bold, double-struck) into
    # capitals that casefold() must still see; then again, as folding can denormalise.
    nfkc = unicodedata.normalize
    folded = nfkc("NFKC", nfkc("NFKC", text).casefold()).translate(_SEPARATORS)
    if not _CJK_RUN.search(folded):
        return folded.split()
    out: list[str] = []
    for word in folded.split():
        pos = 0
        for run in _CJK_RUN.finditer(word):
            if run.start() > pos:
                out.append(word[pos : run.start()])
            chars = run.group()
            if len(chars) == 1:
                out.append(chars)
            else:
                out.extend(chars[i : i + 2] for i in range(len(chars) - 1))
            pos = run.end()
        if pos < len(word):
            out.append(word[pos:])
    return out


def _join(tokens: list[str]) -> str:
    """Words as one string, each between its own two spaces (tokens hold none), so
    ``text.count(" word ")`` counts a word's occurrences in C."""
    return f" {'  '.join(tokens)} " if tokens else ""


def _words(text: str) -> list[str]:
    return text.split(" ")[1::2]


def _new_posting() -> array[int]:
    return array("I")


class RecallIndex:
    """Maps document numbers to ranked matches. The index keeps no copy of a memory's
    text, except the current words of documents changed since the last compaction."""

    __slots__ = (
        "_dirty",
        "_entries",
        "_lengths",
        "_live",
        "_n_indexed",
        "_postings",
        "_term_stale",
        "_total_len",
    )

    # Compaction thresholds (class attributes so tests can lower them in a subclass).
    # All stale entries go once they exceed 1/_STALE_SHARE of all entries (or dirty
    # documents 1/_DIRTY_SHARE of all documents), past a floor that keeps small indexes
    # from compacting on every change. A compaction costs O(all entries), so it must be
    # rare: about every N/8 changed documents (~50 us amortised per change at 100k
    # memories of ~30 words).
    _STALE_SHARE = 8
    _DIRTY_SHARE = 8
    _MIN_STALE = 4096
    _MIN_DIRTY = 256
    # One term's list is rebuilt when its known stale entries are half of it: a document
    # rewritten over and over must not grow the lists of its words.
    _MIN_TERM_STALE = 64

    def __init__(self) -> None:
        self._postings: defaultdict[str, array[int]] = defaultdict(_new_posting)
        self._lengths = array("I")
        self._live = bytearray()
        # Dirty documents (their postings may hold entries of earlier texts): their
        # current words (see _join), ~1 byte a character.
        self._dirty: dict[int, str] = {}
        # Stale entries known per term (from dirty documents changed again).
        self._term_stale: dict[str, int] = {}
        self._total_len = 0
        # All posting entries; _entries - _total_len of them are stale.
        self._entries = 0
        # Documents with at least one word: BM25's N. Not len(_lengths): a node restarted
        # from a document with junk entries holds numbers for them that a running node
        # never made, and both must rank alike.
        self._n_indexed = 0

    def new_docs(self, count: int) -> int:
        """Make ``count`` new (empty, not live) documents; return the first's number."""
        first = len(self._lengths)
        self._lengths.extend(array("I", bytes(4 * count)))
        self._live.extend(bytes(count))
        return first

    def new_doc(self) -> int:
        self._lengths.append(0)
        self._live.append(0)
        return len(self._lengths) - 1

    def add(self, doc: int, tokens: Iterable[str]) -> None:
        """Index a document's tokens (first version of its text). Whether it is searchable
        is set separately (``set_live``)."""
        if self._lengths[doc] or doc in self._dirty:
            # Not its first text after all: its earlier words must not count.
            self.replace(doc, list(tokens))
            return
        self._append(doc, tokens)

    def _append(self, doc: int, tokens: Iterable[str]) -> None:
        n = 0
        postings = self._postings
        for tok in tokens:
            postings[tok].append(doc)
            n += 1
        before = self._lengths[doc]
        self._total_len += n - before
        self._entries += n
        self._n_indexed += (n > 0) - (before > 0)
        self._lengths[doc] = n

    def replace(self, doc: int, tokens: list[str]) -> None:
        """The document's text changed: index the new tokens; its old entries go stale."""
        dirty = self._dirty
        old = dirty.get(doc)
        if old is None and not self._lengths[doc]:
            self._append(doc, tokens)  # nothing indexed for it yet: nothing goes stale
            return
        self._append(doc, tokens)
        dirty[doc] = _join(tokens)
        if old:
            # Its previous words are known: note where they went stale, and rebuild a
            # list once half of it is stale.
            term_stale = self._term_stale
            postings = self._postings
            for term, count in Counter(_words(old)).items():
                stale = term_stale.get(term, 0) + count
                p = postings.get(term)
                if p is not None and stale >= self._MIN_TERM_STALE and 2 * stale > len(p):
                    self._rebuild(term, p, dirty)
                else:
                    term_stale[term] = stale
        stale = self._entries - self._total_len
        if (stale > self._MIN_STALE and stale * self._STALE_SHARE > self._entries) or (
            len(dirty) > self._MIN_DIRTY and len(dirty) * self._DIRTY_SHARE > len(self._lengths)
        ):
            self.compact()

    def _rebuild(self, term: str, p: array[int], dirty: dict[int, str]) -> None:
        """Rewrite one posting list: dirty documents' entries as their current words say."""
        hit = {d for d in set(p) if d in dirty}
        keep = array("I", filterfalse(hit.__contains__, p))
        word = f" {term} "
        for d in hit:
            count = dirty[d].count(word)
            if count:
                keep.extend([d] * count)
        self._entries += len(keep) - len(p)
        self._term_stale.pop(term, None)
        self._put(term, keep)

    def _put(self, term: str, p: array[int]) -> None:
        """Store a rewritten posting list (an empty one is dropped)."""
        if p:
            self._postings[term] = p
        else:
            del self._postings[term]

    def compact(self) -> None:
        """Drop every stale entry; then no document is dirty. O(all entries), mostly in
        C: every entry of a dirty document goes, then its current words are appended."""
        dirty = self._dirty
        if not dirty:
            return
        dirty_docs = set(dirty)
        is_dirty = dirty_docs.__contains__
        postings = self._postings
        removed = 0
        for term, p in list(postings.items()):
            if dirty_docs.isdisjoint(p):  # in C, ~20 ns an entry
                continue
            keep = array("I", filterfalse(is_dirty, p))  # in C too, ~80 ns an entry
            if len(keep) != len(p):
                removed += len(p) - len(keep)
                self._put(term, keep)
        added = 0
        for d, text in dirty.items():
            for tok in _words(text):
                postings[tok].append(d)
                added += 1
        self._entries += added - removed
        dirty.clear()
        self._term_stale.clear()

    def set_live(self, doc: int, live: bool) -> None:
        self._live[doc] = 1 if live else 0

    @property
    def size(self) -> int:
        return sum(self._live)

    def search(
        self,
        query: str,
        limit: int,
        tokens_of: Callable[[int], list[str] | None] | None = None,
        accept: Callable[[int], bool] | None = None,
        tie_key: Callable[[int], str] | None = None,
    ) -> list[tuple[float, int]]:
        """Top ``limit`` (score, doc) by BM25. ``accept`` filters; it is asked in ranking
        order, only until ``limit`` documents are accepted. Equal scores are ordered by
        ``tie_key(doc)`` (default: the doc number). ``tokens_of`` is unused (the index
        keeps the current words of changed documents itself); kept for callers."""
        if limit <= 0:
            return []
        postings = self._postings
        found = [(t, p) for t in dict.fromkeys(tokenize(query)) if (p := postings.get(t))]
        if not found:
            return []
        n_docs = max(1, self._n_indexed)
        avg = (self._total_len / n_docs) or 1.0
        lengths = self._lengths
        live = self._live
        dirty = self._dirty
        scores: dict[int, float] = {}
        # Hoisted, same arithmetic as the plain formula (so the same floats, same ranking).
        one_minus_b = 1 - _B
        k1_plus_1 = _K1 + 1
        for term, p in found:
            tf = Counter(p)  # counts in C; a dict loop took ~2x as long
            df = len(tf)
            fixed: dict[int, int] = {}
            if dirty:
                # Postings keep a changed document's old words (removal is lazy): count
                # only its current words, as an index built afresh (after a restart)
                # would, so both rank alike.
                word = f" {term} "
                for d in dirty.keys() & tf.keys():
                    f = fixed[d] = dirty[d].count(word)
                    if not f:
                        df -= 1
            idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
            for d, f in tf.items():
                if not live[d]:
                    continue
                if fixed and d in fixed:
                    f = fixed[d]
                    if not f:
                        continue
                norm = _K1 * (one_minus_b + _B * lengths[d] / avg)
                scores[d] = scores.get(d, 0.0) + idf * f * k1_plus_1 / (f + norm)
        if accept is not None:
            return _accepted(scores, limit, accept, tie_key)
        if len(scores) > limit:
            # The cut-off score by a C sort of the floats; everything above it is in, and
            # of the (often many: equal lengths give equal scores) documents at it, the
            # first by tie_key. ~3x faster than nlargest with a key over every document.
            # Pairs are made only for those at or above it: a query of common words scores
            # tens of thousands, and a pair each kept the cyclic GC busy.
            cut = sorted(scores.values(), reverse=True)[limit - 1]
            top = [(d, sc) for d, sc in scores.items() if sc >= cut]
            if len(top) > limit:
                above = [kv for kv in top if kv[1] > cut]
                at_cut = [d for d, sc in top if sc == cut]
                need = limit - len(above)
                if tie_key is None:
                    chosen = heapq.nsmallest(need, at_cut)
                else:
                    chosen = heapq.nsmallest(need, at_cut, key=tie_key)
                top = above + [(d, cut) for d in chosen]
        else:
            top = list(scores.items())
        _rank(top, tie_key)
        best = top[:limit]
        return [(score, d) for d, score in best]


def _rank(pairs: list[tuple[int, float]], tie_key: Callable[[int], str] | None) -> None:
    """Sort (doc, score) pairs best first. Ties by tie_key (the memory id: the same on
    every node, unlike doc numbers, which follow arrival order), so every node returns
    the same top results."""
    if tie_key is None:
        pairs.sort(key=lambda kv: (-kv[1], kv[0]))
    else:
        pairs.sort(key=lambda kv: (-kv[1], tie_key(kv[0])))


def _accepted(
    scores: dict[int, float],
    limit: int,
    accept: Callable[[int], bool],
    tie_key: Callable[[int], str] | None,
) -> list[tuple[float, int]]:
    """The first ``limit`` accepted documents in ranking order (score down, then
    tie_key): what filtering all, then ranking, gives, but ``accept`` (which may load a
    memory) is asked only until enough are found. Documents are ranked in bands of
    score, each twice as wide as the last, so a selective filter costs a few passes."""
    values = sorted(scores.values(), reverse=True)
    out: list[tuple[float, int]] = []
    start = 0
    width = limit
    upper = math.inf
    while start < len(values):
        cut = values[min(len(values), start + width) - 1]
        band = [(d, sc) for d, sc in scores.items() if cut <= sc < upper]
        _rank(band, tie_key)
        for d, sc in band:
            if accept(d):
                out.append((sc, d))
                if len(out) == limit:
                    return out
        start += len(band)
        upper = cut
        width *= 2
    return out
