"""Final review of the ninth session's change: core write paths, barrier frames, the
hello's transient flag, ``first_dials``/``wait_scanned`` and ``settle``, PeerInfo, and
surfaces mixed on one namespace. Loopback only; no mDNS."""

from __future__ import annotations

import asyncio
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Map

from helpers import frames_of, hand_driven_peer, pack, url_of, wait_for
from subcog_crdt import Captured, ClosedError, ConversationsApi, PeerInfo, _peering
from subcog_crdt._peering import F_BARRIER, F_BARRIER_ACK, F_HELLO, F_SESSIONS, F_UPDATE
from subcog_crdt._relay import room_name
from subcog_crdt._transport.base import Hello
from subcog_crdt._transport.memory import MemoryLink
from subcog_crdt._yjs import STEP1, UPDATE, sync_message
from support.mcpclient import call, mcp_server
from support.noderelay import NodeRelay
from test_relay import SECRET, room_contents

LOOPBACK = {"host": "127.0.0.1", "discovery": ()}


async def test_settle_confirms_a_discovered_peer_that_dialled_this_node_first() -> None:
    """Discovery reports a node whose link is already up (it dialled this node first: the
    usual case, both discover each other). The redial loop then makes no dial, so
    ``first_dials`` must not wait for one: ``settle`` confirms the linked peer."""
    b = ConversationsApi(**LOOPBACK)
    async with b, ConversationsApi(peers=[url_of(b)], **LOOPBACK) as a:
        await wait_for(lambda: a.node_id in b._links, 10, "a linked to b")
        # What discovery's on_found does for a node it found (src/subcog_crdt/_network.py).
        b._transport.add_peer(url_of(a), node_id=a.node_id)
        confirmed = await b.settle(timeout=3)
        assert [p.node_id for p in confirmed] == [a.node_id]


async def test_settle_on_a_node_that_discovered_a_peer_which_dialled_it(tmp_path: Path) -> None:
    """The same through the real same-machine registry: b runs, a one-shot node a joins
    and dials b; b's next scan finds a, already linked. b's settle confirms a."""
    opts: dict[str, Any] = {
        "host": "127.0.0.1",
        "discovery": ("local",),
        "discovery_dir": tmp_path / "registry",
    }
    async with ConversationsApi(**opts) as b:
        await wait_for(lambda: b._discovery[0].scans_done > 0, 10, "b's first scan")
        async with ConversationsApi(**opts, transient=True) as a:
            assert [p.node_id for p in await a.settle(timeout=5)] == [b.node_id]
            await wait_for(lambda: url_of(a) in b._transport._redialers, 10, "b found a")
            confirmed = await b.settle(timeout=3)
            assert [(p.node_id, p.transient) for p in confirmed] == [(a.node_id, True)]


class _SlowToClose:
    """A discovery mechanism whose withdrawal takes a while (an mDNS goodbye is awaited,
    docs: Discovery.aclose): the node is closing, its links still up."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.release = asyncio.Event()

    async def wait_scanned(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closing.set()
        await self.release.wait()


async def test_a_closing_node_does_not_answer_a_barrier_for_an_update_it_dropped(
    tmp_path: Path,
) -> None:
    """A peer's update arriving while the node closes is dropped (``_apply_remote``: "the
    update stays with the peer"). The barrier after it must then not be answered: the
    answer tells the peer (a one-shot CLI capture, say) its write is stored here."""
    writer = ConversationsApi(listen=False, discovery=())
    async with writer:
        w = await writer.register_session("w")
        mem = await w.capture("d", "written on a one-shot node")
        update = writer._docs["d"].diff()
    data = tmp_path / "a"
    a = ConversationsApi(data_dir=data, listen=False, discovery=())
    await a.open()
    slow = _SlowToClose()
    closing: asyncio.Task[None] | None = None
    try:
        s = await a.register_session("me")
        await s.capture("d", "the namespace exists here")
        ours, theirs = await hand_driven_peer(a)
        a._discovery.append(slow)
        closing = asyncio.ensure_future(a.aclose())
        await asyncio.wait_for(slow.closing.wait(), 10)
        later = {"id": "later", "user_id": "u", "subscriptions": ["d"]}
        ok = {"id": "ok", "user_id": "u", "subscriptions": ["d"]}
        await theirs.send(
            pack([F_UPDATE, "d", writer.node_id, update])
            + pack([F_BARRIER, 77])
            + pack([F_SESSIONS, [ok, later]])
        )
        # The sessions frame follows the barrier in the same message: once it is in, the
        # node has decided whether to answer.
        await wait_for(
            lambda: any(x.id == "later" for x in a.sessions.list()), 10, "the message handled"
        )
        await wait_for(lambda: not a._links["hostile"]._queue, 10, "the link's queue sent")
        answered = [F_BARRIER_ACK, 77] in frames_of(ours.sent_frames)
    finally:
        slow.release.set()
        if closing is not None:
            await closing
        await a.aclose()
    async with ConversationsApi(data_dir=data, listen=False, discovery=()) as again:
        stored = any(m.id == mem.id for m in again.memories("d"))
    assert not (answered and not stored), "barrier answered for an update never stored"


async def test_two_concurrent_settles_both_confirm_the_peer() -> None:
    async with ConversationsApi(**LOOPBACK) as a:
        s = await a.register_session("w")
        await s.capture_many("d", [f"memory {i}" for i in range(50)])
        async with ConversationsApi(peers=[url_of(a)], **LOOPBACK) as b:
            one, two = await asyncio.gather(b.settle(timeout=10), b.settle(timeout=10))
            assert [p.node_id for p in one] == [p.node_id for p in two] == [a.node_id]
            assert b.state_hash("d") == a.state_hash("d")
            assert not b._links[a.node_id]._barriers  # no barrier left waiting


async def test_settle_under_way_when_the_node_closes_raises_closed_not_an_empty_list() -> None:
    """The peer never answers: settle waits in its barrier round; closing the node ends
    it with ClosedError (an empty list would read as "no peer has it")."""
    a = ConversationsApi(listen=False, discovery=())
    await a.open()
    try:
        await hand_driven_peer(a)
        call = asyncio.ensure_future(a.settle(timeout=30))
        await wait_for(lambda: a._links["hostile"]._barriers, 10, "the barrier sent")
        await a.aclose()
        with pytest.raises(ClosedError):
            await call
        with pytest.raises(ClosedError):
            await a.settle(timeout=1)
    finally:
        await a.aclose()


def _holds(node: ConversationsApi, memory_id: str) -> bool:
    return memory_id in {m.id for m in node.memories("d")}


async def test_a_yjs_client_write_with_a_link_and_a_relay_is_one_event_per_node(
    relay: NodeRelay,
) -> None:
    """Node a and node b are linked directly and both in the relay's rooms; a Yjs client
    writes a memory through a's /yjs/d. Every path carries it (client -> a -> b over the
    link, a -> relay -> b, b -> relay): each node has one event and one write of it."""
    writer = ConversationsApi(listen=False, discovery=())
    async with writer:
        w = await writer.register_session("yjs-writer")
        mem = await w.capture("d", "written by a Yjs client")
        update = writer._docs["d"].diff()
    opts: dict[str, Any] = {"mesh_secret": SECRET, "relay": relay.url, **LOOPBACK}
    async with ConversationsApi(**opts) as a, ConversationsApi(peers=[url_of(a)], **opts) as b:
        seed = await a.register_session("seed")
        await seed.capture("d", "the namespace exists")
        assert [p.node_id for p in await b.settle(timeout=10)] == [a.node_id]
        await wait_for(lambda: "d" in a._relays[0].connected, 30, "a in the room")
        await wait_for(lambda: "d" in b._relays[0].connected, 30, "b in the room")
        watch = {n: await n.register_session("watch", subscribe=["d"]) for n in (a, b)}
        url = f"{url_of(a)}/yjs/d?token={a.push_token}"
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            await ws.send_bytes(sync_message(STEP1, b"\x00"))
            await ws.send_bytes(sync_message(UPDATE, update))
            for n in (a, b):
                await wait_for(partial(_holds, n, mem.id), 30, "the memory on both nodes")
            secret = SECRET.encode()

            async def at_relay() -> bool:
                room = await room_contents(relay.url, room_name(secret, "d"))
                return len(room.get("entries", type=Map)) == 2

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not await at_relay():
                assert loop.time() < deadline, "the write never reached the relay"
            assert [p.node_id for p in await b.settle(timeout=10)] == [a.node_id]
            assert [p.node_id for p in await a.settle(timeout=10)] == [b.node_id]
        for n in (a, b):
            batch = await watch[n].sync()
            mine = [e for e in batch.events if e.memory_id == mem.id]
            assert len(mine) == 1 and isinstance(mine[0], Captured), (n, batch.events)
            assert mine[0].source_session == "yjs-writer"
            assert len(n.history(mem.id)) == 1
            assert n.get(mem.id).content == "written by a Yjs client"
        assert a.state_hash("d") == b.state_hash("d")


async def _json_line(stream: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), 30)
    assert line, "the run process ended"
    out: dict[str, Any] = json.loads(line)
    return out


async def test_an_mcp_server_a_cli_run_and_a_one_shot_capture_on_one_machine(
    tmp_path: Path,
) -> None:
    """``subcog-crdt run`` and ``subcog-crdt mcp`` on one machine find each other through
    the registry; an MCP capture and a one-shot CLI capture each show once in run's
    event stream, the one-shot capture counts as kept (two durable peers confirm it),
    and the MCP session reads the CLI's memory once."""
    registry = tmp_path / "registry"
    node_opts = ["--host", "127.0.0.1", "--no-mdns", "--discovery-dir", str(registry)]
    run = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "subcog_crdt",
        "run",
        *node_opts,
        "--subscribe",
        "d",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert run.stdout is not None
        first = await _json_line(run.stdout)
        assert first["type"] == "node"
        async with mcp_server(node_opts, tmp_path / "mcp.log") as client:
            await call(client, "subcog_session_register", session_id="agent", subscribe=["d"])

            async def linked() -> bool:
                peers = (await call(client, "subcog_peers"))["peers"]
                return first["node_id"] in [p["node_id"] for p in peers]

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not await linked():
                assert loop.time() < deadline, "mcp and run never linked"
            via_mcp = await call(client, "subcog_capture", namespace="d", content="from mcp")
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "subcog_crdt",
                "capture",
                *node_opts,
                "--wait",
                "20",
                "--json",
                "d",
                "from the cli",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await asyncio.wait_for(cli.communicate(), 60)
            finally:
                if cli.returncode is None:
                    cli.kill()
                    await cli.wait()
            assert cli.returncode == 0, err
            via_cli = json.loads(out)
            assert "only" not in err.decode()  # not "stored in ... only"
            sentinel = await call(client, "subcog_capture", namespace="d", content="last")
            seen: list[str] = []
            while sentinel["id"] not in seen:
                line = await _json_line(run.stdout)
                if line.get("type") == "captured":
                    seen.append(line["memory_id"])
            assert sorted(seen) == sorted([via_mcp["id"], via_cli["id"], sentinel["id"]])
            batch = await call(client, "subcog_session_sync")
            ids = [e["memory_id"] for e in batch["events"]]
            assert ids.count(via_cli["id"]) == 1
            history = await call(client, "subcog_history", memory_id=via_cli["id"])
            assert len(history["writes"]) == 1
    finally:
        if run.returncode is None:
            run.terminate()
            try:
                await asyncio.wait_for(run.wait(), 20)
            except TimeoutError:
                run.kill()
                await run.wait()


async def test_a_barrier_behind_a_large_update_is_answered_once_all_of_it_is_stored(
    tmp_path: Path,
) -> None:
    """One message: an update larger than a slice (applied in pieces, after the message)
    and a barrier. The answer goes out only once every piece is applied and committed
    (durability="fsync": commits are awaited)."""
    writer = ConversationsApi(listen=False, discovery=())
    async with writer:
        w = await writer.register_session("w")
        await w.capture_many("d", [f"memory {i} " + "x" * 200 for i in range(2000)])
        update = writer._docs["d"].diff()
    assert len(update) > _peering._SLICE_BYTES
    async with ConversationsApi(
        data_dir=tmp_path / "a", durability="fsync", listen=False, discovery=()
    ) as a:
        s = await a.register_session("me")
        await s.capture("d", "the namespace exists")
        ours, theirs = await hand_driven_peer(a)
        at_answer: list[tuple[int, int]] = []
        send = ours.send

        async def watched(data: bytes) -> None:
            if pack([F_BARRIER_ACK, 5]) in data:
                at_answer.append((len(a.memories("d")), a._in_flight))
            await send(data)

        ours.send = watched  # type: ignore[method-assign,assignment]
        await theirs.send(pack([F_UPDATE, "d", writer.node_id, update]) + pack([F_BARRIER, 5]))
        await wait_for(lambda: at_answer, 30, "the answer")
        assert at_answer == [(2001, 0)]


def _raw_peer(api: ConversationsApi) -> tuple[MemoryLink, MemoryLink]:
    ours = MemoryLink(Hello("raw", None))
    theirs = MemoryLink(api._hello())
    ours._other, theirs._other = theirs, ours
    api.attach(ours)
    return ours, theirs


@pytest.mark.parametrize("flag", [1, 0, "true", None, [True], {"t": True}])
async def test_a_hello_with_a_transient_flag_that_is_no_boolean_ends_the_link(flag: Any) -> None:
    async with ConversationsApi(listen=False, discovery=()) as api:
        ours, theirs = _raw_peer(api)
        await theirs.send(pack([F_HELLO, ["d"], None, [], [], 1 << 20, flag]))
        await wait_for(lambda: ours.closed, 10, "the link closed")
        assert ours.close_code == 4000 and "transient" in ours.close_reason
        assert api.peers() == []


async def test_peer_info_says_transient_from_the_hello_and_compares_positionally() -> None:
    async with ConversationsApi(listen=False, discovery=()) as api:
        _ours, theirs = _raw_peer(api)
        # A later version's extra element after the flag is ignored.
        await theirs.send(pack([F_HELLO, [], None, [], [], None, True, "future"]))
        await wait_for(lambda: api.peers(), 10, "the peer listed")
        (info,) = api.peers()
        assert info.transient is True
        assert info == PeerInfo("raw", None, api.peers()[0].user_id, (), True)
        assert info != PeerInfo("raw", None, info.user_id, ())  # the default is False


async def test_a_barrier_behind_a_large_update_is_not_answered_if_closing_cut_the_update(
    tmp_path: Path,
) -> None:
    """The barrier arrives while the node is open, behind an update applied in pieces;
    the node starts closing after the first piece, so the later ones are dropped
    (``_apply_remote``). The answer would tell the peer all of it is stored here."""
    writer = ConversationsApi(listen=False, discovery=())
    async with writer:
        w = await writer.register_session("w")
        await w.capture_many("d", [f"memory {i} " + "x" * 200 for i in range(2000)])
        update = writer._docs["d"].diff()
        written = {m.id for m in writer.memories("d")}
    data = tmp_path / "a"
    a = ConversationsApi(data_dir=data, listen=False, discovery=())
    await a.open()
    slow = _SlowToClose()
    closing: list[asyncio.Future[None]] = []
    try:
        s = await a.register_session("me")
        await s.capture("d", "the namespace exists")
        ours, theirs = await hand_driven_peer(a)
        a._discovery.append(slow)
        apply_remote = a._apply_remote

        def first_piece_then_close(*args: Any) -> Any:
            out = apply_remote(*args)
            if not closing:
                closing.append(asyncio.ensure_future(a.aclose()))
            return out

        a._apply_remote = first_piece_then_close  # type: ignore[method-assign,assignment]
        await theirs.send(pack([F_UPDATE, "d", writer.node_id, update]) + pack([F_BARRIER, 9]))
        await wait_for(lambda: closing, 10, "the first piece applied")
        await asyncio.wait_for(slow.closing.wait(), 10)
        peer = a._links["hostile"]
        await wait_for(lambda: not peer._large and not peer._tasks, 30, "the update handled")
        await wait_for(lambda: not peer._queue and not peer._busy, 10, "the queue sent")
        answered = [F_BARRIER_ACK, 9] in frames_of(ours.sent_frames)
    finally:
        slow.release.set()
        for c in closing:
            await c
        await a.aclose()
    async with ConversationsApi(data_dir=data, listen=False, discovery=()) as again:
        missing = written - {m.id for m in again.memories("d")}
    assert not (answered and missing), f"answered with {len(missing)} memories not stored"
