"""Large updates (a catch-up of a big namespace, a large batch) are applied in pieces with
the event loop running between them, each piece journalled and persisted on its own, and
nothing else about them changes: every write arrives once, with its event, and survives a
restart; a malformed one still changes nothing (docs/protocol.md, "Large updates")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from helpers import converged, wait_for
from subcog_crdt import Captured, ConversationsApi, _peering
from subcog_crdt._transport.base import Hello
from subcog_crdt._transport.memory import MemoryLink

F_HELLO, F_SV, F_DIFF, F_UPDATE, F_SESSIONS = range(5)


def texts(n: int, tag: str) -> list[str]:
    # ~300 bytes each, so 1000 writes make ~350 KB (over the 256 KiB piece bound)
    return [f"{tag} memory {i}: " + "lorem ipsum dolor " * 16 for i in range(n)]


async def all_events(session: Any) -> list[Any]:
    out: list[Any] = []
    since: Any = 0
    while True:
        batch = await session.sync(since=since, limit=1000)
        out.extend(batch.events)
        since = batch.cursor
        if not batch.more:
            return out


async def test_a_large_catch_up_and_a_large_batch_arrive_in_pieces_once_each(tmp_path: Path):
    n = 3000
    async with ConversationsApi(host="127.0.0.1", discovery=()) as a:
        sa = await a.register_session("writer", subscribe=["d"])
        for i in range(0, n, 500):
            await sa.capture_many("d", texts(n, "old")[i : i + 500])
        assert len(a._docs["d"].diff()) > 4 * _peering._SLICE_BYTES
        async with ConversationsApi(data_dir=tmp_path, host="127.0.0.1", discovery=()) as b:
            sb = await b.register_session("reader", subscribe=["d"])
            stream = sb.events(maxsize=100_000)
            await b.connect(a.url)
            first = await stream.next(30)
            # This stream's task ran while the catch-up was still being applied: the loop
            # was not held for the whole of it (applied whole, all 3000 were in first).
            assert isinstance(first, Captured)
            held = len(list(b._docs["d"].memory_ids()))
            assert 0 < held < n
            await wait_for(lambda: converged([a, b], "d"), 60, "catch-up")
            # A live batch larger than a piece: applied in pieces too, in order.
            await sa.capture_many("d", texts(1000, "new"))
            await wait_for(lambda: converged([a, b], "d"), 60, "live batch")
            got = [first]
            while len(got) < n + 1000:
                got.append(await stream.next(10))
            assert all(isinstance(e, Captured) for e in got)
            contents = [e.memory.content for e in got]
            assert sorted(contents) == sorted(texts(n, "old") + texts(1000, "new"))
            assert {e.source_session for e in got} == {"writer"}
            journal = await all_events(sb)
            assert sorted(e.memory.content for e in journal) == sorted(contents)
            assert [e.cursor for e in journal] == sorted({e.cursor for e in journal})
            contents_seen = contents
        # Each piece was persisted with its events: a restart holds all, once.
        async with ConversationsApi(data_dir=tmp_path, listen=False, discovery=()) as b2:
            assert len(b2.memories("d")) == n + 1000
            assert b2.state_hash("d") == a.state_hash("d")
            sb2 = await b2.register_session("reader", subscribe=["d"])
            journal2 = await all_events(sb2)  # nothing missed, nothing twice
            assert sorted(e.memory.content for e in journal2) == sorted(contents_seen)


def pack(frame: list[Any]) -> bytes:
    out: bytes = msgpack.packb(frame, use_bin_type=True)
    return out


@pytest.mark.parametrize("kind", ["step 2", "live update"])
async def test_a_large_malformed_update_changes_nothing_and_closes_the_link(kind: str):
    """A valid prefix of a large update with its tail cut off: the scan refuses it before
    any piece is applied, as the whole update was refused before."""
    async with ConversationsApi(listen=False, discovery=()) as src:
        s = await src.register_session("w", subscribe=["d"])
        await s.capture_many("d", texts(2000, "x"))
        update = src._docs["d"].diff()
    bad = update[: len(update) - 40]
    assert len(bad) > 2 * _peering._SLICE_BYTES
    async with ConversationsApi(listen=False, discovery=()) as b:
        sb = await b.register_session("reader", subscribe=["d"])
        await sb.capture("d", "already here")
        before = b.state_hash("d")
        ours = MemoryLink(Hello("hostile", None))
        theirs = MemoryLink(b._hello())
        ours._other, theirs._other = theirs, ours
        b.attach(ours)
        await theirs.send(pack([F_HELLO, ["d"], None, [], []]))
        if kind == "step 2":
            await theirs.send(pack([F_DIFF, "d", bad, False]))
        else:
            await theirs.send(pack([F_UPDATE, "d", "hostile", bad]))
        await wait_for(lambda: ours.close_code is not None, 30, "link closed")
        assert ours.close_code == 4000
        assert "invalid Yjs update" in (ours.close_reason or "")
        assert b.state_hash("d") == before
        assert [m.content for m in b.memories("d")] == ["already here"]
