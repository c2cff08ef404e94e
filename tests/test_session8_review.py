"""Review of the changes since e35cac6 (session 8): tests that try to break what the change
introduced or left. Each failing test names the bug in its docstring."""

from __future__ import annotations

import shutil
import sqlite3
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc

from helpers import frames_of, hand_driven_peer, link, pack, wait_for
from subcog_crdt import ConversationsApi, Lagged, StorageError
from subcog_crdt._core.recall import tokenize
from subcog_crdt._core.ydecode import decode_state_vector
from subcog_crdt._peering import F_DIFF, F_PEERS, F_SV
from subcog_crdt._storage.sqlite import SqliteStorage


def memory_node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(listen=False, discovery=(), **kw)


# -- a queued step 2 moved forward by what the peer sent ----------------------------------


async def test_a_step2_with_held_back_writes_does_not_hide_what_the_peer_lacks() -> None:
    """A peer's step 2 carries the writes its document holds back (pycrdt's diff includes
    pending structs, with a Skip over the missing clocks; a relay's forwarded update does
    too). ``_advance_pending_sv`` takes the update's block ``(client, first, after last)``
    from ``read_update``, which counts a Skip as held, so the queued answer's state vector
    jumps over the very write the peer lacks and the answer leaves it out: the peer never
    gets it, its held-back write stays held back, and nothing asks again."""
    async with memory_node() as n, memory_node() as c:
        await (await n.register_session("s")).capture("d", "a fact of n")
        ours, theirs = await hand_driven_peer(n)
        step1 = await wait_for(
            lambda: [f for f in frames_of(ours.sent_frames) if f[0] == F_SV and f[1] == "d"],
            10,
            "the node's step 1 for d",
        )
        n_sv = step1[0][2]
        # The peer is linked to c too: the node leaves c's writes to that link.
        await theirs.send(pack([F_PEERS, [c.node_id]]))
        await wait_for(lambda: c.node_id in n._links["hostile"].peer_peers, 10, "peers in")
        # c writes three facts, u1..u3 (one write each).
        w = await c.register_session("w")
        await w.capture("d", "fact one")
        u1 = c._docs["d"].diff()
        sv1 = c._docs["d"].state_vector()
        await w.capture("d", "fact two")
        u2 = c._docs["d"].diff(sv1)
        sv2 = c._docs["d"].state_vector()
        await w.capture("d", "fact three")
        u3 = c._docs["d"].diff(sv2)
        assert u2 not in (u1, u3)
        link(n, c)
        await wait_for(lambda: len(n.memories("d")) == 4, 10, "n has c's facts")
        sent_before = len(ours.sent_frames)
        # The peer holds u1, and u3 held back (u2 is missing).
        p: Doc[Any] = Doc()
        p.apply_update(u1)
        p.apply_update(u3)
        client = c._docs["d"].doc.client_id
        assert decode_state_vector(p.get_state())[client] == 1
        # Its step 1, then its answer to the node's step 1 (as its writer sends them:
        # one message each), both in before the node's writer answers the first.
        await theirs.send(pack([F_SV, "d", p.get_state()]))
        await theirs.send(pack([F_DIFF, "d", p.get_update(n_sv), False]))

        def answer() -> list[list[Any]]:
            new = frames_of(ours.sent_frames[sent_before:])
            return [f for f in new if f[0] == F_DIFF and f[1] == "d"]

        for f in await wait_for(answer, 10, "the node's step 2"):
            p.apply_update(f[2])
        got = decode_state_vector(p.get_state())
        assert got.get(client) == 3, f"the peer still lacks c's write 2: {got}"


# -- persisted subscriptions -------------------------------------------------------------


async def test_a_damaged_subscriptions_row_costs_that_session_its_subscriptions_only(
    tmp_path: Path,
) -> None:
    """A subscriptions row that is not a JSON list of names (a damaged file, a hand edit),
    or that names a namespace no node accepts, leaves that session with none after a
    restart; the node opens, and the other sessions resume theirs (and get their events)."""
    data = tmp_path / "node"

    def durable() -> ConversationsApi:
        return ConversationsApi(data_dir=data, listen=False, discovery=())

    async with durable() as api:
        await api.register_session("torn", subscribe=["a"])
        await api.register_session("odd", subscribe=["b"])
        await api.register_session("fine", subscribe=["a", "b"])
    db = sqlite3.connect(data / "store.sqlite3")
    try:
        db.execute("UPDATE subscriptions SET namespaces='[\"a\", 5' WHERE session='torn'")
        db.execute("UPDATE subscriptions SET namespaces='[\"bad/name\"]' WHERE session='odd'")
        db.commit()
    finally:
        db.close()
    async with durable() as api:
        assert (await api.register_session("torn")).subscriptions == frozenset()
        assert (await api.register_session("odd")).subscriptions == frozenset()
        fine = await api.register_session("fine")
        assert fine.subscriptions == {"a", "b"}
        stream = fine.events(include_own=True)
        m = await fine.capture("b", "still delivered")
        ev = await stream.next(timeout=10)
        assert not isinstance(ev, Lagged) and ev.memory_id == m.id


# -- a removed data directory under durability="fsync" ------------------------------------


async def test_an_fsynced_write_is_not_acknowledged_after_the_removal_was_noticed(
    tmp_path: Path,
) -> None:
    """Under ``durability="fsync"`` a capture waits for the storage thread, whose drain
    (queued before the capture's fsync) notices that the log was unlinked and fails the
    storage; the fsync job that follows then succeeds on the unlinked file and the capture
    is acknowledged as durable anyway. It is gone after a restart. The thread knew before
    it answered: the fsync job must refuse once the storage failed."""
    data = tmp_path / "node"
    async with ConversationsApi(
        data_dir=data, listen=False, discovery=(), durability="fsync"
    ) as api:
        w = await api.register_session("w")
        await w.capture("d", "before")
        storage = api._storage
        assert isinstance(storage, SqliteStorage)
        await storage.flush()  # idle: nothing queued in the storage thread
        shutil.rmtree(data)
        with pytest.raises(StorageError):
            await w.capture("d", "after the data directory was removed")


# -- recall: NFKC and case folding -----------------------------------------------------


@pytest.mark.parametrize(
    "styled",
    [
        "\U0001d412\U0001d410\U0001d40b\U0001d422\U0001d42d\U0001d41e",  # bold SQLite
        "\U0001d446\U0001d444\U0001d43f\U0001d456\U0001d461\U0001d452",  # italic
        "\u210dello",  # double-struck H
    ],
)
def test_nfkc_forms_of_capitals_are_folded_like_their_plain_letters(styled: str) -> None:
    """``tokenize`` folds case and then applies NFKC, but NFKC maps mathematical and
    letterlike capitals (U+1D400.., U+210D) to plain ASCII capitals that no one folds
    afterwards: 'SQLite' in bold is indexed as 'SQLite' and never matches the query
    'sqlite' (ASCII text is lowered). docs/index.md promises case folded and
    NFKC-normalised words."""
    plain = unicodedata.normalize("NFKC", styled).lower()
    assert tokenize(styled + " journal") == [plain, "journal"]


async def test_recall_finds_a_word_written_in_mathematical_bold() -> None:
    """End to end: a memory whose content says SQLite in mathematical bold (as "fancy
    text" generators and some model output write it) is found by recall('sqlite')."""
    async with memory_node() as api:
        s = await api.register_session("s")
        bold = "\U0001d412\U0001d410\U0001d40b\U0001d422\U0001d42d\U0001d41e"
        m = await s.capture("d", f"{bold} is the journal")
        assert [h.id for h in s.recall("sqlite", namespace="d")] == [m.id]
