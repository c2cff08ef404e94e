"""A peer's live update derived now and given to pycrdt later (``apply_update(defer=True)``,
``catch_up``) must be indistinguishable from applying it at once: same events, same reads
at any moment, same document and outbox; and only the update whose fate is certain is
deferred."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from subcog_crdt._core import ydecode
from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.ydecode import read_update
from support.coredocs import Counter, foreign_update, still_doc


def updates_of(doc: NamespaceDoc) -> list[bytes]:
    """Every update ``doc``'s local writes make from now on, as its peers get them."""
    out: list[bytes] = []
    doc.on_local_update = lambda _ns, u: out.append(u)
    return out


def derived(doc: NamespaceDoc) -> Any:
    """What a document shows without reading the pycrdt document for it."""
    ids = sorted(doc.memory_ids(True))
    return (
        ids,
        [doc.get(mid) for mid in ids],
        [doc.writes(mid) for mid in ids],
        doc.search_ids("fact", 50),
    )


def writer_and_updates(n: int) -> tuple[NamespaceDoc, list[bytes]]:
    w = still_doc("00000000000000aa")
    ups = updates_of(w)
    for i in range(n):
        w.capture("s", f"fact {i}", {})
    return w, ups


def test_the_next_update_of_a_writer_is_derived_now_and_given_to_pycrdt_later() -> None:
    w, ups = writer_and_updates(2)
    d = still_doc("00000000000000bb")
    d.apply_update(ups[0])  # the first update from a client: a full check
    events = d.apply_update(ups[1], defer=True)
    assert [e.memory.content for e in events] == ["fact 1"]  # type: ignore[attr-defined]
    assert d.unapplied == 1
    assert d.outbox == [ups[0], ups[1]]
    assert len(d._entries) == 1  # pycrdt has only the first (read around the catch-up)
    d.catch_up()
    assert d.unapplied == 0
    assert len(d._entries) == 2
    assert d.outbox == [ups[0], ups[1]]  # the catch-up adds nothing to it
    assert d.state_hash() == w.state_hash()


def _pending(n: int = 3) -> tuple[NamespaceDoc, NamespaceDoc, NamespaceDoc]:
    """The writer, a document holding its last update deferred, and one that applied
    every update at once."""
    w, ups = writer_and_updates(n)
    d = still_doc("00000000000000bb", Counter())
    e = still_doc("00000000000000bb", Counter())
    for u in ups:
        d.apply_update(u, defer=True)
        e.apply_update(u)
    assert d.unapplied >= 1
    return w, d, e


READS: dict[str, Callable[[NamespaceDoc], Any]] = {
    "doc": lambda d: d.doc.get_update(),
    "entries": lambda d: dict(d.entries.items()),
    "state_vector": lambda d: d.state_vector(),
    "diff": lambda d: d.diff(),
    "state_hash": lambda d: d.state_hash(),
    "local capture": lambda d: d.capture("t", "another fact", {})[0].content,
    "local update": lambda d: d.update("t", next(d.memory_ids()), {"content": "x"})[0].content,
    "capture_many": lambda d: [m.content for m in d.capture_many("t", [("two", {})])[0]],
    "resolve_all": lambda d: d.resolve_all(),
    # reads of the derived state (a memory written once reads its entry back)
    "memory_ids": lambda d: sorted(d.memory_ids(True)),
    "get": lambda d: [d.get(mid) for mid in sorted(d.memory_ids())],
    "writes": lambda d: [d.writes(mid) for mid in sorted(d.memory_ids())],
    "memory_at": lambda d: [d.memory_at(w.key) for w in d.writes(max(d.memory_ids()))],
    "search": lambda d: d.search_ids("fact", 50),
}


@pytest.mark.parametrize("read", list(READS))
def test_every_read_of_the_pycrdt_document_gives_it_the_deferred_updates_first(
    read: str,
) -> None:
    _, d, e = _pending()
    got = READS[read](d)
    want = READS[read](e)
    if read == "state_vector":
        assert ydecode.decode_state_vector(got) == ydecode.decode_state_vector(want)
    elif read in ("doc", "diff"):
        # The same entries (the byte order of clients may differ)
        rebuilt = [still_doc("00000000000000cc") for _ in range(2)]
        rebuilt[0].apply_update(got)
        rebuilt[1].apply_update(want)
        assert rebuilt[0].state_hash() == rebuilt[1].state_hash() != "0" * 64
    else:
        assert got == want
    d.catch_up()
    assert d.state_hash() == e.state_hash()
    assert derived(d) == derived(e)


def test_a_local_write_after_a_deferred_update_pushes_only_itself() -> None:
    _, d, _ = _pending(2)
    pushed = updates_of(d)
    d.capture("t", "local fact", {})
    assert len(pushed) == 1  # the catch-up before it is not a local write
    assert d.outbox[-1] == pushed[0]
    assert len(d.outbox) == 3  # both received updates, then the local one, in order
    r = still_doc("00000000000000cc")
    for u in d.outbox:
        r.apply_update(u)
    assert r.state_hash() == d.state_hash()


def _fresh_with(ups: list[bytes]) -> NamespaceDoc:
    d = still_doc("00000000000000bb")
    for u in ups:
        d.apply_update(u)
    return d


def test_what_is_not_certain_is_applied_at_once() -> None:
    w, ups = writer_and_updates(4)
    # a duplicate: nothing new, nothing deferred, nothing to forward
    d = _fresh_with(ups[:2])
    d.take_outbox()
    assert d.apply_update(ups[1], defer=True) == []
    assert d.unapplied == 0 and d.outbox == []
    # a gap: held back as before, not deferred
    d = _fresh_with(ups[:1])
    assert d.apply_update(ups[2], defer=True) == []
    assert d.unapplied == 0 and d.holds_back == 1
    assert [e.memory.content for e in d.apply_update(ups[1], defer=True)] == [  # type: ignore[attr-defined]
        "fact 1",
        "fact 2",
    ]
    assert d.unapplied == 0  # releasing held writes asks pycrdt
    # two entries in one update: not the one-entry form
    both = w.diff(_fresh_with(ups[:2]).state_vector())
    assert not read_update(both, "entries").canonical
    d = _fresh_with(ups[:2])
    assert len(d.apply_update(both, defer=True)) == 2
    assert d.unapplied == 0
    # a document that once saw an overwrite checks every value against pycrdt
    d = _fresh_with(ups[:1])
    key = next(iter(d.entries.keys()))
    d.apply_update(foreign_update(d, {key: "junk"}))
    assert d._tainted
    d.apply_update(ups[1], defer=True)
    assert d.unapplied == 0


def test_an_update_in_the_documents_own_client_id_is_applied_at_once() -> None:
    """Items claiming this document's own client id (a hostile peer's, or a clone's): its
    account of the state vector follows remote clients only."""
    _, ups = writer_and_updates(1)
    d = _fresh_with(ups)
    assert d._sv is not None
    other: Doc[Any] = Doc(client_id=d._own_client)
    other.get("entries", type=Map)["0123456789abcdef0123/x"] = "y"
    u = other.get_update()
    assert read_update(u, "entries").canonical
    d.apply_update(u, defer=True)
    assert d.unapplied == 0


@pytest.mark.parametrize(
    "client_bytes",
    [
        b"\x80\x80\x80\x80\x80\x80\x80\x10",  # 2**53: beyond a JS number
        b"\x85\x00",  # 5 in two bytes: a needless continuation
    ],
)
def test_the_one_entry_form_is_minimal_varuints_below_2_53(client_bytes: bytes) -> None:
    good = b"\x01\x01\x05\x00(\x01\x07entries\x01k\x01w\x01v\x00"
    assert read_update(good, "entries").canonical
    odd = b"\x01\x01" + client_bytes + good[3:]
    got = read_update(odd, "entries")  # the general reader takes it
    assert not got.canonical
    assert got.inserts[0].key == "k" and got.inserts[0].value == "v"


@given(
    client=st.integers(0, 2**53 - 1),
    before=st.integers(0, 300),
    key=st.text(max_size=200),
    value=st.text(max_size=600),
)
@settings(max_examples=200, deadline=None)
def test_a_canonical_update_is_byte_for_byte_what_pycrdt_puts_in_the_outbox(
    client: int, before: int, key: str, value: str
) -> None:
    """The deferred update goes to the outbox (and so to the log and other peers) as
    received; applied at once, pycrdt's transaction would have put exactly these bytes
    there."""
    src: Doc[Any] = Doc(client_id=client)
    m = src.get("entries", type=Map)
    for i in range(before):
        m[f"before {i}"] = "x"
    dst: Doc[Any] = Doc()
    dst.apply_update(src.get_update())  # the receiver holds everything before it
    made: list[bytes] = []
    src.observe(lambda e: made.append(e.update))
    m[key] = value
    u = made[-1]
    assert read_update(u, "entries").canonical
    emitted: list[bytes] = []
    dst.observe(lambda e: emitted.append(e.update))
    dst.apply_update(u)
    assert emitted == [u]


_ops = st.lists(
    st.tuples(
        # (captures and deliveries weighted up: most examples then defer some updates)
        st.sampled_from(
            ["capture"] * 3 + ["deliver"] * 4 + ["update", "delete", "dup", "skip", "read"]
        ),
        st.integers(0, 7),
    ),
    min_size=6,
    max_size=40,
)


@given(_ops)
@settings(max_examples=120, deadline=None)
def test_a_deferring_document_and_an_eager_one_agree_at_every_step(ops: Any) -> None:
    """Two writers' captures, updates and deletes reach a deferring document and an eager
    one in the same order, with duplicates, gaps and reads between; local writes of
    their own in between too. At every step: the same events and derived state; at the
    end the same entries, and outboxes that rebuild the same document."""
    writers = [still_doc("00000000000000a1"), still_doc("00000000000000a2")]
    made = [updates_of(w) for w in writers]
    cd, ce = Counter(), Counter()
    d = still_doc("00000000000000bb", cd)
    e = still_doc("00000000000000bb", ce)
    sent = [0, 0]
    skipped: list[bytes] = []
    deferred = 0
    for op, n in ops:
        w = writers[n % 2]
        ids = sorted(w.memory_ids())
        if op == "capture":
            w.capture("s", f"fact {n} {len(made[n % 2])}", {})
        elif op in ("update", "delete") and ids:
            mid = ids[n % len(ids)]
            if op == "update":
                w.update("s", mid, {"content": f"fact changed {n}"})
            else:
                w.delete("s", mid)
        elif op in ("deliver", "dup", "skip"):
            i = n % 2
            if sent[i] < len(made[i]):
                u = made[i][sent[i]]
                if op == "dup" and sent[i]:
                    u = made[i][sent[i] - 1]
                else:
                    sent[i] += 1
                if op == "skip":
                    skipped.append(u)  # arrives later, after the ones behind it
                    continue
                ev_d = d.apply_update(u, defer=True)
                deferred += d.unapplied
                assert ev_d == e.apply_update(u)
        elif op == "read":
            if n % 3 == 0:
                assert d.state_vector() is not None  # a catch-up
                e.state_vector()
            elif n % 3 == 1:
                d.capture("t", f"local {n}", {})
                e.capture("t", f"local {n}", {})
        assert derived(d) == derived(e)
    for u in skipped:
        assert d.apply_update(u, defer=True) == e.apply_update(u)
    assert derived(d) == derived(e)
    event(f"deferred some: {deferred > 0}")  # (Hypothesis statistics: both kinds run)
    assert dict(d.entries.items()) == dict(e.entries.items())
    assert d.unapplied == 0
    rebuilt = [still_doc("00000000000000cc") for _ in range(2)]
    for r, src in zip(rebuilt, (d, e), strict=True):
        for u in src.outbox:
            r.apply_update(u)
    assert dict(rebuilt[0].entries.items()) == dict(rebuilt[1].entries.items())


def test_a_refused_catch_up_is_logged_and_pycrdt_is_asked_from_then_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not expected to happen (the one-entry form is read exactly), so forced: pycrdt's
    native document is wrapped to refuse. The node keeps serving and stops trusting its
    own account of the state vector."""
    _, d, _ = _pending()
    real = d._ydoc

    class Refusing:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def apply_update(self, txn: Any, update: bytes) -> None:
            raise ValueError("refused")

    d._ydoc = Refusing()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        d.catch_up()
    d._ydoc = real
    assert "pycrdt refused" in caplog.text
    assert d.unapplied == 0 and d._sv is None and d._tainted
