"""A local write's update goes to peers before pycrdt's transaction makes it
(``NamespaceDoc._send_ahead``): it must be byte for byte what pycrdt makes, whatever came
before (other writers' updates, deferred ones, batches, an item claiming this document's
own client id); and when it is not, pycrdt's update follows it."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.ydecode import read_update
from support.coredocs import still_doc


class Pushes:
    """What a document hands its peers, and whether pycrdt held each write yet."""

    def __init__(self, doc: NamespaceDoc) -> None:
        self.doc = doc
        self.sent: list[bytes] = []
        self.held_by_pycrdt: list[bool | None] = []
        doc.on_local_update = self

    def __call__(self, _ns: str, update: bytes) -> None:
        self.sent.append(update)
        key = read_update(update, "entries").inserts[-1].key
        try:
            self.held_by_pycrdt.append(key in self.doc._entries)
        except RuntimeError:  # "Already in a transaction": called from pycrdt's commit
            self.held_by_pycrdt.append(None)


def test_a_local_write_is_sent_before_pycrdt_makes_it_and_is_what_pycrdt_makes() -> None:
    d = still_doc("00000000000000aa")
    p = Pushes(d)
    m, _ = d.capture("s", "we chose SQLite WAL", {"tags": ["db"]})
    d.update("s", m.id, {"content": "we chose SQLite WAL mode"})
    d.delete("s", m.id)
    assert p.held_by_pycrdt == [False, False, False]  # sent ahead, every one
    assert p.sent == d.outbox  # and exactly pycrdt's bytes
    assert d._own_clock == 3


_chars = st.characters(blacklist_categories=("Cs", "Cc"))
_text = st.text(_chars, max_size=300) | st.text("xé€𝄞", min_size=120, max_size=20_000)
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("capture"), _text),
        st.tuples(st.just("update"), _text),
        st.tuples(st.just("delete"), st.just("")),
        st.tuples(st.just("batch"), st.lists(_text, max_size=3)),
        st.tuples(st.just("remote"), _text),
        st.tuples(st.just("deferred"), _text),
    ),
    max_size=25,
)


@given(_steps)
@settings(max_examples=80, deadline=None)
def test_what_is_sent_ahead_is_always_pycrdts_update(steps: list[tuple[str, Any]]) -> None:
    """Every update a local write hands to peers equals the one pycrdt's transaction makes
    (the outbox holds those); so a peer given only what was pushed (plus the other
    writer's updates) ends with the same entries."""
    d = still_doc("00000000000000aa")
    other = still_doc("00000000000000bb")
    from_other: list[bytes] = []
    other.on_local_update = lambda _ns, u: from_other.append(u)
    p = Pushes(d)
    local_outbox: list[bytes] = []
    peer: Doc[Any] = Doc()
    for op, arg in steps:
        ids = sorted(d.memory_ids())
        before = len(d.outbox)
        if op == "capture":
            d.capture("s", arg if arg.strip() else "x", {})
        elif op == "update" and ids:
            d.update("s", ids[len(arg) % len(ids)], {"content": arg if arg.strip() else "y"})
        elif op == "delete" and ids:
            d.delete("s", ids[0])
        elif op == "batch" and arg:
            d.capture_many("s", [(t if t.strip() else "z", {}) for t in arg])
        elif op in ("remote", "deferred"):
            other.capture("t", arg if arg.strip() else "w", {})
            d.apply_update(from_other[-1], defer=op == "deferred")
            peer.apply_update(from_other[-1])
            d.take_outbox()
            continue
        local_outbox.extend(d.outbox[before:])
    assert p.sent == local_outbox
    assert True not in p.held_by_pycrdt  # a single write: sent before pycrdt had it
    for u in p.sent:
        peer.apply_update(u)
    assert sorted(peer.get("entries", type=Map).items()) == sorted(d.entries.items())


def test_an_item_claiming_this_documents_client_id_moves_its_clock() -> None:
    """A peer's update under this document's own client id (hostile, or a clone) takes
    the clock the next local write would have used: that write asks pycrdt again."""
    d = still_doc("00000000000000aa")
    p = Pushes(d)
    d.capture("s", "first", {})
    clone: Doc[Any] = Doc(client_id=d._own_client)
    clone.apply_update(d.diff())
    before = clone.get_state()
    clone.get("entries", type=Map)["0123456789abcdef0123/x"] = "taken"
    d.apply_update(clone.get_update(before))
    d.capture("s", "second", {})
    assert p.sent == d.outbox[:1] + d.outbox[2:]
    assert read_update(p.sent[-1], "entries").blocks[0][1] == 2


def test_bytes_sent_ahead_that_pycrdt_did_not_make_are_followed_by_pycrdts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Forced (the clock the document keeps is set wrong by hand): not expected, but if
    it happens peers still get the write pycrdt made, and the clock is asked for again."""
    d = still_doc("00000000000000aa")
    p = Pushes(d)
    d.capture("s", "first", {})
    d._own_clock = 7
    with caplog.at_level(logging.WARNING):
        d.capture("s", "second", {})
    assert "sent ahead as other bytes" in caplog.text
    assert len(p.sent) == 3 and p.sent[2] == d.outbox[1] != p.sent[1]
    assert d._own_clock is None
    d.capture("s", "third", {})
    assert p.sent[3] == d.outbox[2]
