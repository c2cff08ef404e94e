"""Large updates (a catch-up of a big namespace, a large batch) are applied in pieces with
the event loop running between them, each piece journalled and persisted on its own
(docs/protocol.md, "Large updates"), and nothing else about them changes: every write
arrives once, with its event, and survives a restart, also with several peers catching
up one durable node while it writes, or the node closing part way; frames after a large
step 2 keep their order; hostile overwrites and deletes end as applied whole; a
malformed or refused update still changes nothing, and buffered step 2s stay bounded."""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pycrdt import Array, Doc, Map, merge_updates

from helpers import converged, drain, link, wait_for
from subcog_crdt import Captured, ClosedError, Conflict, ConversationsApi, _peering
from subcog_crdt._core.schema import encode_write
from subcog_crdt._transport.base import Hello
from subcog_crdt._transport.memory import MemoryLink

F_HELLO, F_SV, F_DIFF, F_UPDATE = range(4)


def texts(n: int, tag: str) -> list[str]:
    # ~300 bytes each: 1000 writes make ~350 KB, over the 256 KiB piece bound
    return [f"{tag} memory {i}: " + "lorem ipsum dolor " * 16 for i in range(n)]


def pack(*frames: list[Any]) -> bytes:
    return b"".join(msgpack.packb(f, use_bin_type=True) for f in frames)


def hostile_link(node: ConversationsApi, name: str) -> tuple[MemoryLink, MemoryLink]:
    """(the node's end, the test's end) of a link to a peer played by the test."""
    ours = MemoryLink(Hello(name, None))
    theirs = MemoryLink(node._hello())
    ours._other, theirs._other = theirs, ours
    node.attach(ours)
    return ours, theirs


async def all_events(session: Any) -> list[Any]:
    out: list[Any] = []
    since: Any = 0
    while True:
        batch = await session.sync(since=since, limit=1000)
        out.extend(batch.events)
        since = batch.cursor
        if not batch.more:
            return out


def sent_kinds(link: MemoryLink) -> list[int]:
    """The types of the frames a node sent on ``link``."""
    out = []
    for message in link.sent_frames:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(message))
        unpacker.feed(message)
        out.extend(frame[0] for frame in unpacker)
    return out


def writes_once_captured_first(events: list[Any]) -> tuple[Counter[str], list[str]]:
    """Write ids seen (how often), and memories whose first event is not Captured."""
    seen: Counter[str] = Counter()
    first: dict[str, bool] = {}
    for e in events:
        if isinstance(e, Conflict):
            continue
        seen[e.write_id] += 1
        first.setdefault(e.memory_id, isinstance(e, Captured))
    return seen, [m for m, ok in first.items() if not ok]


def entry_keys(node: ConversationsApi, ns: str) -> set[str]:
    return set(node._docs[ns].entries.keys())


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


async def test_two_peers_catch_up_a_durable_node_while_it_writes(tmp_path: Path) -> None:
    """Two peers holding the same large namespace catch up a fresh durable node at once
    (their pieces interleave), updates and deletes of the other peer's memories among
    them (so an update can arrive in a piece before its capture), while the node captures
    and updates memories itself: one memory per content, every write exactly once on the
    live stream and in the journal, Captured first for every memory, all of it restored
    by a restart."""
    n = 1500
    async with (
        ConversationsApi(listen=False, discovery=()) as a,
        ConversationsApi(listen=False, discovery=()) as c,
    ):
        sa = await a.register_session("wa", subscribe=["d"])
        sc = await c.register_session("wc", subscribe=["d"])
        mine_a = await sa.capture_many("d", texts(n, "a"))
        link(a, c)
        await wait_for(lambda: converged([a, c], "d"), 60, "a and c")
        mine_c = await sc.capture_many("d", texts(n, "c"))
        await wait_for(lambda: converged([a, c], "d"), 60, "c's captures")
        # Each edits the other's memories: whichever client id is larger, some updates
        # come before their captures in the catch-up.
        for m in mine_a[:100]:
            await sc.update(m.id, content=m.content + " (edited by c)")
        for m in mine_c[:100]:
            await sa.update(m.id, tags=["seen-by-a"])
        for m in mine_a[100:150]:
            await sc.delete(m.id)
        await wait_for(lambda: converged([a, c], "d"), 60, "edits")
        async with ConversationsApi(data_dir=tmp_path, listen=False, discovery=()) as b:
            sb = await b.register_session("rb", subscribe=["d"])
            watcher = await b.register_session("watcher", subscribe=["d"])
            stream = watcher.events(maxsize=100_000)
            link(b, a)
            link(b, c)
            first = await stream.next(30)
            assert isinstance(first, Captured)
            assert len(list(b._docs["d"].memory_ids())) < 2 * n  # still in pieces
            # Local writes between pieces: a content the catch-up holds (dedupe), a new
            # one, and an update and a delete of memories already here.
            await sb.capture("d", texts(n, "a")[n - 1])
            await sb.capture("d", "only on b")
            deleted = {m.id for m in mine_a[100:150]}
            target = next(m.id for m in b.memories("d") if m.id not in deleted)
            await sb.update(target, tags=["touched on b"])
            await wait_for(lambda: converged([a, b, c], "d"), 120, "catch-up")
            keys = entry_keys(b, "d")
            got = [first]

            def all_seen() -> bool:
                got.extend(drain(stream))
                return keys <= {e.write_id for e in got}

            await wait_for(all_seen, 30, "every write's event")
            live = b.memories("d")
            assert len(live) == 2 * n - 50 + 1
            assert max(Counter(m.content for m in live).values()) == 1
            seen, not_first = writes_once_captured_first(got)
            assert set(seen) == keys and max(seen.values()) == 1
            assert not_first == []
            journal = await all_events(watcher)
            jseen, jnot_first = writes_once_captured_first(journal)
            assert set(jseen) == keys and max(jseen.values()) == 1
            assert jnot_first == []
            cursors = [e.cursor for e in journal]
            assert cursors == sorted(set(cursors))
            state = b.state_hash("d")
        async with ConversationsApi(data_dir=tmp_path, listen=False, discovery=()) as b2:
            assert b2.state_hash("d") == state
            watcher2 = await b2.register_session("watcher", subscribe=["d"])
            again, _ = writes_once_captured_first(await all_events(watcher2))
            assert again == jseen


@pytest.mark.parametrize("durability", ["process", "fsync"])
async def test_closing_part_way_through_the_pieces_then_restart_and_reconnect(
    tmp_path: Path, durability: str
) -> None:
    """The joining node closes while its catch-up is in pieces: a restart from its data
    directory holds the pieces applied so far, each with its events, and the next
    catch-up brings the rest: every write once in the journal, nothing lost."""
    n = 3000
    async with ConversationsApi(listen=False, discovery=()) as a:
        sa = await a.register_session("wa", subscribe=["d"])
        for i in range(0, n, 1000):
            await sa.capture_many("d", texts(n, "a")[i : i + 1000])
        keys = entry_keys(a, "d")
        b = ConversationsApi(data_dir=tmp_path, durability=durability, listen=False, discovery=())
        async with b:
            watcher = await b.register_session("watcher", subscribe=["d"])
            stream = watcher.events(maxsize=100_000)
            link(b, a)
            assert isinstance(await stream.next(30), Captured)
        # (closed in the turn after the first piece's events)
        async with ConversationsApi(
            data_dir=tmp_path, durability=durability, listen=False, discovery=()
        ) as b2:
            held = len(b2.memories("d"))
            assert 0 < held < n
            watcher2 = await b2.register_session("watcher", subscribe=["d"])
            before = await all_events(watcher2)
            assert len(before) == held
            link(b2, a)
            await wait_for(lambda: converged([a, b2], "d"), 60, "the rest")
            seen, not_first = writes_once_captured_first(await all_events(watcher2))
            assert set(seen) == keys and max(seen.values()) == 1
            assert not_first == []
            assert len(b2.memories("d")) == n


async def test_frames_after_a_large_step_2_in_one_message_keep_their_order() -> None:
    """A peer sends a large step 2 and, in the same message, live updates of another
    writer: these wait for every piece (their events come after all of the step 2's),
    and all of it is applied."""
    async with (
        ConversationsApi(listen=False, discovery=()) as src,
        ConversationsApi(listen=False, discovery=()) as other,
    ):
        s = await src.register_session("w", subscribe=["d"])
        await s.capture_many("d", texts(2000, "big"))
        big = src._docs["d"].diff()
        o = await other.register_session("o", subscribe=["d"])
        await o.capture("d", "a later fact from another node")
        small1 = other._docs["d"].diff()
        sv = other._docs["d"].doc.get_state()
        await o.capture("d", "and one more")
        small2 = other._docs["d"].diff(sv)
    assert len(big) > 2 * _peering._SLICE_BYTES and len(small1) < 4096
    async with ConversationsApi(listen=False, discovery=()) as b:
        watcher = await b.register_session("watcher", subscribe=["d"])
        stream = watcher.events(maxsize=100_000)
        ours, theirs = hostile_link(b, "peer")
        await theirs.send(pack([F_HELLO, ["d"], None, [], []]))
        await theirs.send(
            pack(
                [F_DIFF, "d", big, False],
                [F_UPDATE, "d", "other", small1],
                [F_UPDATE, "d", "other", small2],
            )
        )
        got: list[Any] = []

        def all_in() -> bool:
            got.extend(drain(stream))
            return len(got) >= 2002

        await wait_for(all_in, 60, "all")
        assert ours.close_code is None
        contents = [e.memory.content for e in got]
        assert sorted(contents[:2000]) == sorted(texts(2000, "big"))
        assert contents[2000:] == ["a later fact from another node", "and one more"]
        assert len(b.memories("d")) == 2002


def _hostile_update(base: bytes, client_id: int) -> bytes:
    """``base`` with entries overwritten (a key set twice, thrice) and removed, by a
    writer that keeps deleted content (so early pieces hold what later ones remove)."""
    h = Doc(client_id=client_id, skip_gc=True)
    h.apply_update(base)
    m = h.get("entries", type=Map)
    keys = sorted(m.keys())
    for i, k in enumerate(keys[:40]):
        m[k] = encode_write("capture", "", {"content": f"hostile content {i}", "tags": []})
    for k in keys[-40:]:
        del m[k]
    for k in keys[1000:1010]:
        m[k] = encode_write("capture", "", {"content": f"second {k}", "tags": []})
        m[k] = encode_write("capture", "", {"content": f"third {k}", "tags": []})
    return h.get_update()


def _memories(node: ConversationsApi) -> list[tuple[Any, ...]]:
    return sorted(
        (m.id, m.content, m.deleted, tuple(m.tags), m.version)
        for m in node.memories("d", include_deleted=True)
    )


async def _feed_and_read(update: bytes, data_dir: Path) -> list[tuple[Any, ...]]:
    async with ConversationsApi(data_dir=data_dir, listen=False, discovery=()) as b:
        s = await b.register_session("r", subscribe=["d"])
        await s.capture("d", "already here")
        ours, theirs = hostile_link(b, "hostile")
        await theirs.send(pack([F_HELLO, ["d"], None, [], []]))
        await theirs.send(pack([F_UPDATE, "d", "hostile", update]))
        # A step 1 behind it is answered only once the update is applied.
        await theirs.send(pack([F_SV, "d", b"\x00"]))
        await wait_for(lambda: F_DIFF in sent_kinds(ours), 60, "the answer to step 1")
        assert ours.close_code is None
        running = _memories(b)
    async with ConversationsApi(data_dir=data_dir, listen=False, discovery=()) as b2:
        assert _memories(b2) == running  # what a restarted node derives from the map
    return running


@pytest.mark.parametrize("client_id", [1, 1 << 52])
async def test_hostile_overwrites_and_deletes_in_pieces_end_as_applied_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_id: int
) -> None:
    """A large update that overwrites and removes entries (its delete set goes with the
    last piece; the pieces take the watched path): the node ends with the memories it
    derived when such an update was applied whole, and a restart derives the same."""
    async with ConversationsApi(listen=False, discovery=()) as src:
        s = await src.register_session("w", subscribe=["d"])
        await s.capture_many("d", texts(2000, "x"))
        update = _hostile_update(src._docs["d"].diff(), client_id)
    assert len(update) > 2 * _peering._SLICE_BYTES
    in_pieces = await _feed_and_read(update, tmp_path / "pieces")
    monkeypatch.setattr(_peering, "_SLICE_BYTES", 1 << 62)  # the whole-apply path
    whole = await _feed_and_read(update, tmp_path / "whole")
    assert in_pieces == whole
    assert sum(1 for m in whole if not m[2]) == 2000 - 40 + 1


@pytest.mark.parametrize("defect", ["invalid utf-8", "unknown type"])
async def test_a_large_update_refused_part_way_changes_nothing(defect: str) -> None:
    """A large update whose last client's block pycrdt refuses (invalid UTF-8 that the
    scan skips over; a type pycrdt does not know) closes the link with nothing of it
    applied, as applied whole (docs/protocol.md). The pieces were applied before the
    refused one was reached (found in review): every piece is now checked first."""
    async with ConversationsApi(listen=False, discovery=()) as src:
        s = await src.register_session("w", subscribe=["d"])
        await s.capture_many("d", texts(2000, "x"))
        base = src._docs["d"].diff()
    junk = Doc(client_id=1)  # the smallest id: its block comes last in the merged update
    m = junk.get("entries", type=Map)
    m["junk"] = "MARKMARK"
    m["typed"] = Array()
    bad = bytearray(merge_updates(base, junk.get_update()))
    if defect == "invalid utf-8":
        at = bad.index(b"MARKMARK")
        bad[at : at + 4] = b"\xff\xfe\xff\xfe"
    else:
        at = bad.index(b"typed") + len(b"typed")
        assert bad[at] == 0  # an Array's type ref
        bad[at] = 42
    assert len(bad) > 2 * _peering._SLICE_BYTES
    assert bad.index(b"MARK") > len(bad) - 100  # the last piece holds the defect
    async with ConversationsApi(listen=False, discovery=()) as b:
        sb = await b.register_session("reader", subscribe=["d"])
        stream = sb.events(maxsize=100_000)
        await sb.capture("d", "already here")
        before = b.state_hash("d")
        ours, theirs = hostile_link(b, "hostile")
        await theirs.send(pack([F_HELLO, ["d"], None, [], []]))
        await theirs.send(pack([F_UPDATE, "d", "hostile", bytes(bad)]))
        await wait_for(lambda: ours.close_code is not None, 30, "link closed")
        assert ours.close_code == 4000
        assert "invalid Yjs update" in (ours.close_reason or "")
        assert [m.content for m in b.memories("d")] == ["already here"]
        assert b.state_hash("d") == before
        assert drain(stream) == []


async def test_a_step_2_waiting_for_its_pieces_counts_against_the_reassembly_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Step 2 bytes a node buffers are bounded for all links together (_MAX_DIFF: "more
    links must not multiply what peers can make this node buffer"). A reassembled step 2
    is held for seconds while its pieces are applied, and stays counted meanwhile (found
    in review: it was not, so a second link could reassemble another one)."""
    async with ConversationsApi(listen=False, discovery=()) as src:
        s = await src.register_session("w", subscribe=["d"])
        for i in range(0, 8000, 2000):
            await s.capture_many("d", texts(8000, "x")[i : i + 2000])
        update = src._docs["d"].diff()
    monkeypatch.setattr(_peering, "_MAX_DIFF", len(update) * 3 // 2)
    half = len(update) // 2
    async with ConversationsApi(listen=False, discovery=()) as b:
        sb = await b.register_session("r", subscribe=["d"])
        stream = sb.events(maxsize=100_000)
        links = [hostile_link(b, name) for name in ("h1", "h2")]
        for _, theirs in links:
            await theirs.send(pack([F_HELLO, ["d"], None, [], []]))
        (o1, t1), (o2, t2) = links
        await t1.send(pack([F_DIFF, "d", update[:half], True]))
        await t1.send(pack([F_DIFF, "d", update[half:], False]))
        assert isinstance(await stream.next(30), Captured)
        assert len(b.memories("d")) < 8000  # h1's step 2 is still held, in pieces
        with contextlib.suppress(ClosedError):  # h2 may be closed at its first part
            await t2.send(pack([F_DIFF, "d", update[:half], True]))
            await t2.send(pack([F_DIFF, "d", update[half:], False]))
        await wait_for(lambda: len(b.memories("d")) == 8000, 60, "h1's step 2 applied")
        # h2 is answered only once it got past its step 2 (or is closed).
        with contextlib.suppress(ClosedError):
            await t2.send(pack([F_SV, "d", b"\x00"]))
        await wait_for(
            lambda: o2.close_code is not None or F_DIFF in sent_kinds(o2), 60, "h2 handled"
        )
        assert o1.close_code is None
        assert o2.close_code == 4000
        assert "exceeds" in (o2.close_reason or "")


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
        ours, theirs = hostile_link(b, "hostile")
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
