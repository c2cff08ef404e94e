"""Peer sync between real nodes over loopback WebSockets (DESIGN items 1, 2, 5-8)."""

from __future__ import annotations

import asyncio

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import converged, record_link_sends, wait_for
from subcog_crdt import AuthError, Captured, ConversationsApi, Deleted, InvalidArgument, Updated
from subcog_crdt._transport.base import Hello
from subcog_crdt._transport.websocket import WebSocketLink, WebSocketTransport

SECRET = "correct horse battery staple"


def node(**kw) -> ConversationsApi:
    kw.setdefault("discovery", ())
    return ConversationsApi(**kw)


@pytest.fixture
def wire(monkeypatch):
    """Every frame any node sends, as (sender node id, bytes)."""
    sent: list[tuple[str, bytes]] = []
    record_link_sends(
        monkeypatch, lambda link, frame, _how: sent.append((link.peer.node_id, frame))
    )
    return sent


async def test_write_events_reach_peers_naming_the_session():
    async with node() as a, node() as b, node() as c:
        sa = await a.register_session("claude-1", subscribe=["decisions"])
        subs = [
            await n.register_session(f"s-{i}", subscribe=["decisions"])
            for i, n in enumerate((b, c))
        ]
        streams = [s.events() for s in subs]
        await b.connect(a.url)
        await c.connect(a.url)
        await c.connect(b.url)
        await wait_for(lambda: len(a.peers()) == 2 and len(b.peers()) == 2 and len(c.peers()) == 2)
        m = await sa.capture("decisions", "Use SQLite WAL")
        await sa.update(m.id, tags=["db"])
        await sa.delete(m.id)
        for stream in streams:
            kinds = [await stream.next(5) for _ in range(3)]
            assert [type(k) for k in kinds] == [Captured, Updated, Deleted]
            assert {k.source_session for k in kinds} == {"claude-1"}
            assert {k.node_id for k in kinds} == {a.node_id}
        await wait_for(lambda: converged([a, b, c], "decisions"))


async def test_line_topology_converges_over_sockets():
    async with node() as a, node() as b, node() as c:
        sa = await a.register_session("a1", subscribe=["d"])
        sc = await c.register_session("c1", subscribe=["d"])
        ev = sc.events()
        await a.connect(b.url)
        await c.connect(b.url)
        await wait_for(lambda: len(b.peers()) == 2)
        await sa.capture("d", "from a, via b")
        got = await ev.next(5)
        assert isinstance(got, Captured)
        assert got.source_session == "a1"
        await wait_for(lambda: converged([a, b, c], "d"))
        assert not any(p.node_id == a.node_id for p in c.peers())


async def test_partition_heal_sends_only_the_missing_updates(wire):
    async with node() as a, node() as b:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        await sa.capture_many("d", [f"shared fact number {i} " + "x" * 200 for i in range(2000)])
        await b.connect(a.url)
        await wait_for(lambda: converged([a, b], "d"))
        full_state = len(a._docs["d"].diff())
        # partition: drop the link and stop redialling, write on both sides
        await a._transport.remove_peer(b.url)
        await b._transport.remove_peer(a.url)
        for p in list(a._links.values()):
            await p.link.close(1000, "partition")
        await wait_for(lambda: not a.peers() and not b.peers())
        await sa.capture("d", "written on a during the partition")
        await sb.capture("d", "written on b during the partition")
        wire.clear()
        await b.connect(a.url)
        await wait_for(lambda: converged([a, b], "d"))
        healed = sum(len(f) for _, f in wire)
        assert full_state > 400_000
        assert healed < full_state / 50, (healed, full_state)
        assert len(a.memories("d")) == 2002


async def test_wrong_secret_refused_before_any_document_byte(wire):
    async with (
        node(mesh_secret=SECRET, host="127.0.0.1") as a,
        node(mesh_secret="another secret", host="127.0.0.1") as b,
    ):
        s = await a.register_session("a1", subscribe=["d"])
        await s.capture("d", "MARKER-secret-content")
        with pytest.raises(AuthError):
            await b.connect(a.url)
        assert a.peers() == []
        assert b.peers() == []
        assert wire == []  # no link ever formed, so no frame was sent on one
        assert b.memories("d") == []


async def test_same_secret_links_and_syncs():
    async with (
        node(mesh_secret=SECRET, host="127.0.0.1") as a,
        node(mesh_secret=SECRET, host="127.0.0.1") as b,
    ):
        s = await a.register_session("a1", subscribe=["d"])
        await s.capture("d", "shared within the mesh")
        await b.connect(a.url)
        await wait_for(lambda: converged([a, b], "d"))


async def test_without_secret_only_loopback_listens() -> None:
    """A node without a mesh secret must not be reachable from the network: every socket
    listening on its port is bound to 127.0.0.1 (read from the OS, not from our config)."""
    async with node() as a:
        port = a._transport.port
        assert a.url == f"ws://127.0.0.1:{port}"
        listening = [
            c
            for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert listening
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
    with pytest.raises(InvalidArgument):
        async with node(host="0.0.0.0"):
            pass


async def test_private_namespace_never_in_any_frame(wire):
    async with node(private_namespaces=["scratch"]) as a, node() as b:
        s = await a.register_session("a1", subscribe=["scratch", "d"])
        await s.capture("scratch", "MARKER-9c1e private before link")
        await b.connect(a.url)
        await s.capture("scratch", "MARKER-9c1e private after link")
        await s.capture("d", "public")
        await wait_for(lambda: converged([a, b], "d"))
        assert wire
        for _, frame in wire:
            assert b"MARKER-9c1e" not in frame
            assert b"scratch" not in frame


async def test_a_private_namespace_also_named_in_the_sync_filter_is_never_sent(wire):
    """Private wins over sync_namespaces, also in the filter peers are told (the filter
    travels in both hellos: a private name in it was sent)."""
    async with (
        node(private_namespaces=["scratch"], sync_namespaces=["scratch", "d"]) as a,
        node() as b,
    ):
        s = await a.register_session("a1", subscribe=["scratch", "d"])
        await s.capture("scratch", "MARKER-4b7d private")
        await b.connect(a.url)
        await s.capture("d", "public")
        await wait_for(lambda: converged([a, b], "d"))
        seen_by_b = b._links[a.node_id]
        assert seen_by_b.peer_filter == frozenset({"d"})
        assert "scratch" not in (seen_by_b.link.peer.namespaces or ())
        for _, frame in wire:
            assert b"scratch" not in frame and b"MARKER-4b7d" not in frame


class _Hostile:
    """A raw peer that completes the handshake and then sends what it is told to."""

    def __init__(self) -> None:
        self.link: WebSocketLink | None = None
        self.ready = asyncio.Event()
        self.done = asyncio.Event()
        self.answered = asyncio.Event()

    async def on_link(self, link) -> None:
        self.link = link
        self.ready.set()
        async for message in link:
            for frame in msgpack.Unpacker(__import__("io").BytesIO(message), raw=False):
                if frame[0] == 2:  # a step-2 reply: the node is still talking to us
                    self.answered.set()
        self.done.set()


hostile_frames = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda x: msgpack.packb(x, use_bin_type=True),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-10, 10)
            | st.binary(max_size=40)
            | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=5),
            max_leaves=12,
        ),
    ),
    st.builds(
        lambda ns, data: msgpack.packb([3, ns, "0123", data], use_bin_type=True),
        st.sampled_from(["d", "Bad!", ""]),
        st.binary(max_size=200),
    ),
    st.builds(
        lambda ns, data: msgpack.packb([2, ns, data, False], use_bin_type=True),
        st.sampled_from(["d", "other"]),
        st.binary(max_size=200),
    ),
    # Barriers and their answers (frames 8 and 9), well-formed or not: a node answers a
    # barrier, ignores an answer to none of its own, and refuses a bad one.
    st.builds(
        lambda kind, token: msgpack.packb([kind, token], use_bin_type=True),
        st.sampled_from([8, 9]),
        st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.none()),
    ),
    # Node records (frame 10), well-formed or not: a node keeps a valid one (it changes
    # no document) and refuses a bad one.
    st.builds(
        lambda origin, seq, peers, sessions: msgpack.packb(
            [10, origin, seq, peers, sessions], use_bin_type=True
        ),
        st.one_of(st.sampled_from(["far", "", "x" * 300]), st.integers(-5, 5), st.none()),
        st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=3)),
        st.one_of(st.lists(st.sampled_from(["ffffffffffffffff", "far", ""]), max_size=3)),
        st.lists(
            st.fixed_dictionaries(
                {"id": st.sampled_from(["s1", "", "a/b"]), "subscriptions": st.just(["d"])}
            ),
            max_size=3,
        ),
    ),
)


async def test_hostile_frames_never_crash_or_change_a_node():
    async with node() as a:
        s = await a.register_session("a1", subscribe=["d"])
        m = await s.capture("d", "precious fact")
        before = a.state_hash("d")

        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(frames=st.lists(hostile_frames, min_size=1, max_size=4))
        def run(frames):
            pending.append(frames)  # collected here, replayed on the running loop below

        pending: list[list[bytes]] = []
        codes: list[int | None] = []
        run()
        hostile = _Hostile()
        async with WebSocketTransport(
            node_id="ffffffffffffffff",
            hello=lambda: Hello(node_id="ffffffffffffffff", url=None),
            on_link=hostile.on_link,
        ) as t:
            for frames in pending:
                hostile.ready.clear()
                hostile.done.clear()
                hostile.answered.clear()
                await t.connect(a.url)
                await asyncio.wait_for(hostile.ready.wait(), 5)
                link = hostile.link
                # a valid hello first, so the node parses what follows as protocol frames
                await link.send(msgpack.packb([0, ["d"], None, [], []], use_bin_type=True))
                for f in frames:
                    if link.closed:
                        break
                    try:
                        await link.send(f)
                    except Exception:
                        break
                # probe: a step 1 that a healthy link answers; a refused one is closed
                if not link.closed:
                    try:
                        await link.send(msgpack.packb([1, "d", b"\x00"], use_bin_type=True))
                    except Exception:
                        pass
                closed = asyncio.ensure_future(hostile.done.wait())
                answered = asyncio.ensure_future(hostile.answered.wait())
                await asyncio.wait({closed, answered}, timeout=5, return_when="FIRST_COMPLETED")
                answered.cancel()
                await link.close()
                await asyncio.wait_for(closed, 5)
                # 4000: the node refused the frame; 1000: it accepted it as harmless.
                # 1011 would mean the node's handler crashed on it.
                codes.append(link.close_code)
                assert a.state_hash("d") == before
                assert a.get(m.id).content == "precious fact"
        assert set(codes) <= {1000, 4000}, codes
        assert 4000 in codes
        # still serving
        async with node() as b:
            await b.connect(a.url)
            await wait_for(lambda: converged([a, b], "d"))


@pytest.mark.parametrize("enabled", [True, False])
async def test_an_eager_send_to_a_local_peer_yields_the_cpu(monkeypatch, enabled):
    from subcog_crdt import _peering

    yields: list[int] = []
    monkeypatch.setattr(_peering, "YIELD_TO_LOCAL_PEERS", enabled)
    monkeypatch.setattr(_peering.os, "sched_yield", lambda: yields.append(1))
    async with node() as a, node() as b:
        await b.connect(a.url)
        await wait_for(lambda: a.peers() and b.peers())
        events = (await b.register_session("b1", subscribe=["d"])).events()
        s = await a.register_session("a1", subscribe=["d"])
        await s.capture("d", "one fact")
        assert isinstance(await events.next(5), Captured)
    assert bool(yields) == enabled


async def test_fsync_receiver_under_backpressure_gets_every_write(tmp_path, monkeypatch):
    """A receiver whose commits wait for fsync, with a tiny receive buffer, interleaved
    updates and control frames: every write still arrives (frames are never reordered
    or dropped while the consumer is busy)."""
    from subcog_crdt._transport import websocket as ws_module

    class SmallInbox(ws_module._Inbox):
        def __init__(self, limit: int) -> None:
            super().__init__(256)

    monkeypatch.setattr(ws_module, "_Inbox", SmallInbox)
    async with (
        ConversationsApi(discovery=(), host="127.0.0.1") as a,
        ConversationsApi(
            discovery=(), host="127.0.0.1", data_dir=tmp_path / "b", durability="fsync"
        ) as b,
    ):
        await b.connect(a.url)
        await wait_for(lambda: a.peers() and b.peers(), 5)
        sa = await a.register_session("sa", subscribe=["d"])
        await b.register_session("sb", subscribe=["d"])
        await sa.capture("d", "first")
        await wait_for(lambda: len(b.memories("d")) == 1, 5)
        for i in range(200):
            await sa.capture("d", f"fact number {i} " + "p" * 300)
            await a.register_session(f"extra-{i}")  # a control frame: no commit at b
            if i % 5 == 0:
                await asyncio.sleep(0)  # interleave with b's work: shapes the load, not a wait
        await wait_for(lambda: len(b.memories("d")) == 201, 20, "b to have every write")
