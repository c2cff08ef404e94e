"""Review 16: deferred apply on the receiver (``apply_update(defer=True)``, ``catch_up``)
and send-ahead on the writer (``_send_ahead``). Hostile peers' bytes are real Yjs bytes
given to real pycrdt; the outcomes asserted are what a peer, a restart or the log holds.

Each test here first failed on the code it reviewed; the fixes are in the same commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map

from helpers import converged, link, wait_for
from subcog_crdt import Captured, ConversationsApi
from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.schema import encode_write, first_memory_id, normalise, write_key
from subcog_crdt._core.ydecode import (
    MAX_CLOCK,
    decode_state_vector,
    one_entry_update,
    read_update,
    varuint_bytes,
)
from subcog_crdt._errors import ProtocolError
from support.coredocs import NOW, restarted, stamp, still_doc


def pushed(doc: NamespaceDoc) -> list[bytes]:
    """Every update ``doc`` hands its peers from now on."""
    out: list[bytes] = []
    doc.on_local_update = lambda _ns, u: out.append(u)
    return out


def contents(doc: NamespaceDoc) -> list[str]:
    return sorted(m.content for i in doc.memory_ids() if (m := doc.get(i)) is not None)


def capture_entry(content: str, node: str, counter: int = 0) -> tuple[str, str]:
    """The key and value of a capture by ``node`` (session "s") of ``content``."""
    mid = first_memory_id("ns", normalise(content))
    return write_key(mid, stamp(NOW, counter), "s", node), encode_write(
        "capture", "", {"content": content}
    )


def _writer_w() -> list[bytes]:
    w = still_doc("00000000000000aa")
    ups = pushed(w)
    w.capture("s", "w fact zero", {})
    w.capture("s", "w fact one", {})
    return ups


def _held_by_pycrdt() -> tuple[int, bytes, bytes]:
    """Client X's capture (X:0, canonical) and X's next item, under another root map
    (X:1, so pycrdt holds it until X:0 arrives; the decoder sees no entry in it)."""
    x = still_doc("00000000000000cc")
    ups = pushed(x)
    x.capture("s", "x fact zero", {})
    before = x.doc.get_state()
    x.doc.get("other", type=Map)["a"] = "b"
    return x._own_client, ups[0], x.doc.get_update(before)


def _behind_held(defer: bool) -> tuple[NamespaceDoc, int]:
    """A document that got X:1 first (held by pycrdt), then X:0 (asked to defer it or
    not: while pycrdt holds items back, nothing is deferred)."""
    w = _writer_w()
    client, x0, x1 = _held_by_pycrdt()
    d = still_doc("00000000000000bb")
    d.apply_update(w[0])
    d.apply_update(x1)  # held back by pycrdt (X:0 missing); nothing in the outbox
    d.apply_update(w[1])  # (the document knows its state vector again)
    d.apply_update(x0, defer=defer)
    assert d.unapplied == 0
    d.catch_up()  # (nothing to do)
    return d, client


def test_items_pycrdt_releases_at_a_catch_up_reach_the_outbox() -> None:
    """The outbox is what the node logs and forwards. X:0's transaction also releases
    the held X:1 and its update carries both. (Deferred, the catch-up's transaction was
    dropped and only X:0's received bytes were in the outbox: X:1 was never logged nor
    forwarded live. Now nothing is deferred while pycrdt holds items back.)"""
    for defer in (False, True):
        d, client = _behind_held(defer)
        rebuilt = still_doc("00000000000000dd")
        for u in d.outbox:
            rebuilt.apply_update(u)
        held = decode_state_vector(d.state_vector()).get(client)
        got = decode_state_vector(rebuilt.state_vector()).get(client)
        assert (defer, got) == (defer, held)


def test_a_clock_pycrdt_released_is_not_taken_by_a_later_write() -> None:
    """(The eager fast path shared it.) After pycrdt released X:1, the document's own
    account said X was at 1 (it counted only X:0); pycrdt says 2. X's next "canonical"
    update at X:1 (a different item at an id pycrdt has) was derived and published;
    pycrdt ignores it. The running node showed a memory its restarted self did not."""
    d, client = _behind_held(True)
    key, value = capture_entry("x fact one", "00000000000000cc", 1)
    fake = one_entry_update(client, 1, "entries", key, value)
    events = d.apply_update(fake, defer=True)
    d.catch_up()
    assert key not in d.entries  # pycrdt holds the other item at X:1
    assert contents(d) == contents(restarted(d))
    assert events == []


def test_a_write_sent_ahead_under_a_key_the_map_holds_reaches_peers_as_pycrdt_made_it() -> None:
    """A hostile peer planted (junk, ignored by the decoder, so the clock does not move
    past it) the key this node's next capture uses. pycrdt inserts with the planted
    item as origin; bytes sent ahead have no origin, so they differ, under the same item
    id: a peer that got them ignored pycrdt's as a duplicate and ended without the
    memory. Now a key the map holds is never sent ahead; and a peer that had the junk
    derives the write that replaced it (it ignored it before)."""
    twin = still_doc("00000000000000aa")  # still clocks: the same next key
    tw = pushed(twin)
    twin.capture("s", "we chose SQLite", {})
    key = read_update(tw[0], "entries").inserts[0].key
    d = still_doc("00000000000000aa")
    sent = pushed(d)
    hostile: Doc[Any] = Doc(client_id=2**53 - 1)  # above ours: its item wins a tie
    hostile.get("entries", type=Map)[key] = "junk"
    plant = hostile.get_update()
    assert hostile.client_id > d._own_client
    d.apply_update(plant, defer=True)
    m, _ = d.capture("s", "we chose SQLite", {})
    peer = still_doc("00000000000000cc")
    peer.apply_update(plant)
    for u in sent:
        peer.apply_update(u)
    assert d.has(m.id)
    assert dict(peer.entries.items()) == dict(d.entries.items())
    assert peer.has(m.id)


def test_a_push_that_raises_in_send_ahead_does_not_leave_a_peer_with_another_write() -> None:
    """``on_local_update`` hands the first peer the write and then raises (the
    second peer's push, say). The write is never made here (the raise skips _insert),
    but ``_own_clock`` has not moved: the next write goes out under the same id, which
    the first peer drops as a duplicate. It keeps a write this node never made and
    never gets the one it did. (Before send-ahead the callback ran in the commit: the
    write was made and its bytes were true.) Now the error is logged and the write is
    made as sent."""
    d = still_doc("00000000000000aa")
    got: list[bytes] = []
    fail = [True]

    def push(_ns: str, u: bytes) -> None:
        got.append(u)  # the first peer has it
        if fail[0]:
            fail[0] = False
            raise RuntimeError("the second peer's push failed")

    d.on_local_update = push
    try:
        d.capture("s", "first fact", {})
    except RuntimeError:
        pass
    d.capture("s", "second fact", {})
    peer = still_doc("00000000000000cc")
    for u in got:
        peer.apply_update(u)
    assert contents(peer) == contents(d)


def test_an_update_with_clocks_near_yrs_32_bit_limit_is_refused() -> None:
    """yrs keeps clocks in 32 bits; the one-entry form took any clock below 2**53. A
    hostile writer filled its clocks up to 2**32 - 2 (one GC struct), then sent three
    canonical captures continuing them exactly: all three were deferred and derived,
    while pycrdt wrapped the clock and held none of them (at 2**32 - 1 a restart
    panicked in yrs). Now clocks from 2**31 on are refused at decoding, before pycrdt
    sees anything, and the node's state is unchanged."""
    client = 4242
    w = _writer_w()
    d = still_doc("00000000000000bb")
    d.apply_update(w[0])
    state = d.state_hash()
    for length in (2**32 - 2, MAX_CLOCK):
        gc = b"\x01\x01" + varuint_bytes(client) + b"\x00\x00" + varuint_bytes(length) + b"\x00"
        with pytest.raises(ProtocolError, match="beyond"):
            d.apply_update(gc)
    key, value = capture_entry("x fact", "00000000000000cc")
    u = one_entry_update(client, MAX_CLOCK - 1, "entries", key, value)
    with pytest.raises(ProtocolError, match="beyond"):
        d.apply_update(u, defer=True)
    assert d.state_hash() == state and d.unapplied == 0
    below = b"\x01\x01" + varuint_bytes(client) + b"\x00\x00" + varuint_bytes(MAX_CLOCK - 1)
    d.apply_update(below + b"\x00")  # just below: taken
    assert decode_state_vector(d.state_vector())[client] == MAX_CLOCK - 1


def test_a_canonical_update_under_a_key_the_document_holds_is_not_trusted() -> None:
    """(The eager fast path shared it.) A hostile client with a higher id sends
    the key of a memory's update write again, one plain new item with other content:
    canonical, next in its clocks, so it was deferred and derived as a duplicate
    (nothing). But yrs places the new item after the old one (higher client id) and the
    map holds the hostile value: the running node folded the old content, a restart the
    new. Now a new item under a key the map holds is applied watched, as an overwrite."""
    w = still_doc("00000000000000aa")
    ups = pushed(w)
    m, _ = w.capture("s", "fact one", {})
    w.update("s", m.id, {"content": "fact one changed"})
    d = still_doc("00000000000000bb")
    for u in ups:
        d.apply_update(u)
    writer = read_update(ups[0], "entries").blocks[0][0]
    ukey = read_update(ups[1], "entries").inserts[0].key
    evil = d.entries[ukey].replace("fact one changed", "fact evil")
    hostile = one_entry_update(writer + 1, 0, "entries", ukey, evil)
    d.apply_update(hostile, defer=True)
    assert d.unapplied == 0
    mem = d.get(m.id)
    again = restarted(d).get(m.id)
    assert mem is not None and again is not None
    assert mem.content == again.content


# -- what holds (pins) ------------------------------------------------------------------


def test_reads_inside_a_batch_after_a_deferred_update_see_it() -> None:
    """A batch opened right after a deferred update (its transaction is opened through
    ``doc``, which catches up first): what it pushes is pycrdt's, and a peer given the
    outbox holds what this document holds."""
    w = still_doc("00000000000000aa")
    ups = pushed(w)
    for i in range(3):
        w.capture("s", f"fact {i}", {})
    d = still_doc("00000000000000bb")
    sent = pushed(d)
    d.apply_update(ups[0])
    d.apply_update(ups[1], defer=True)
    d.apply_update(ups[2], defer=True)
    assert d.unapplied == 2
    mems, _ = d.capture_many("t", [("fact 1", {}), ("new fact", {})])  # "fact 1" joins
    assert mems[0].id in set(w.memory_ids())  # the deferred capture's memory
    assert d.unapplied == 0
    d.capture("t", "single fact", {})
    assert sent == d.outbox[3:]
    peer = still_doc("00000000000000cc")
    for u in d.outbox:
        peer.apply_update(u)
    assert dict(peer.entries.items()) == dict(d.entries.items())


def node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(listen=False, discovery=(), **kw)


async def test_a_line_of_three_forwards_logs_and_restarts_what_b_deferred(
    tmp_path: Path,
) -> None:
    """A - B - C over memory links: B derives A's live captures before pycrdt, forwards
    them to C as received and logs them; C converges, and B restarted from its log holds
    the same entries."""
    async with node() as a, node(data_dir=tmp_path / "b") as b, node() as c:
        sa = await a.register_session("a1", subscribe=["d"])
        sc = await c.register_session("c1", subscribe=["d"])
        stream = sc.events()
        link(a, b)
        link(b, c)
        await wait_for(lambda: len(b.peers()) == 2, what="linked")
        deferred: list[int] = []
        catch_up = b._catch_up

        def counted() -> None:
            deferred.append(sum(doc.unapplied for doc in b._behind))
            catch_up()

        b._catch_up = counted  # type: ignore[method-assign]
        await sa.capture("d", "first fact")  # (the namespace reaches everyone)
        assert isinstance(await anext(stream), Captured)
        for i in range(5):
            m = await sa.capture("d", f"fact number {i}")
            ev = await anext(stream)
            assert isinstance(ev, Captured) and ev.memory.id == m.id
        assert sum(deferred) >= 1  # B did defer some of them
        await wait_for(lambda: converged([a, b, c], "d"), what="converged")
        want = b.state_hash("d")
        await b.aclose()
    async with node(data_dir=tmp_path / "b") as b2:
        assert b2.state_hash("d") == want
