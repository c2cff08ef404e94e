"""Sessions of nodes beyond a node's own links (DESIGN "Behaviour" 2: remote sessions
appear in ``api.sessions`` while their node is reachable, and disappear within seconds
after it leaves or dies; docs/protocol.md, frame 10).

Every node floods its record (its links and sessions) hop by hop; each node lists the
sessions of the nodes it reaches through the records of the nodes it reached. In-memory
links for the shapes (lines, rings), real sockets and a SIGKILLed node process for a death,
hand-driven peers for what a hostile one may send. Waits are on conditions with
deadlines."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from helpers import frames_of, hand_driven_peer, link, listed, memory_nodes, pack, wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._mesh import MAX_FAR_NODES, MAX_FAR_SESSIONS, MeshMap
from subcog_crdt._peering import F_RECORD
from subcog_crdt._sessions import SessionInfo
from subcog_crdt._transport.memory import MemoryLink
from support.nodeproc import NodeProc, stop_all

DEAD_AFTER = 3.0
"""protocol.md section 3: a dead peer is dropped within 3 s, its sessions with it (on
nodes two hops away too: its neighbour's peer list says so at once)."""
START = 20.0  # a bound against hangs while processes start on a loaded machine


def memory_node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(listen=False, discovery=(), **kw)


@pytest.fixture
async def five() -> AsyncIterator[list[ConversationsApi]]:
    async with memory_nodes(5) as nodes:
        yield nodes


# -- shapes -----------------------------------------------------------------------------------


async def test_a_line_of_five_lists_every_session_and_follows_changes(
    five: list[ConversationsApi],
) -> None:
    """A - B - C - D - E: E lists A's session four hops away, named with A's node id;
    A's new session, new subscriptions and unregistration reach E over the links already
    up; cutting B - C takes each half's sessions off the other half; linking them again
    brings them back, each listed once."""
    a, b, c, d, e = five
    await a.register_session("a1", subscribe=["x"])
    await e.register_session("e1")
    links = [link(x, y) for x, y in itertools.pairwise(five)]
    everyone = {("a1", a.node_id), ("e1", e.node_id)}
    await wait_for(lambda: all(listed(n) == everyone for n in five), 10, "all see a1, e1")
    info = e.sessions.get("a1")
    assert (info.is_local, info.node_id, info.subscriptions) == (False, a.node_id, ("x",))

    await a.register_session("a2")
    await a.register_session("a1", subscribe=["x", "y"])
    await wait_for(lambda: ("a2", a.node_id) in listed(e), 10, "e sees a2")
    await wait_for(lambda: e.sessions.get("a1").subscriptions == ("x", "y"), 10, "new subs")
    await a.unregister_session("a2")
    await wait_for(lambda: ("a2", a.node_id) not in listed(e), 10, "a2 gone from e")

    await links[1][0].close()  # B - C
    await wait_for(lambda: listed(e) == {("e1", e.node_id)}, DEAD_AFTER, "a1 gone from e")
    await wait_for(lambda: listed(d) == {("e1", e.node_id)}, DEAD_AFTER, "a1 gone from d")
    await wait_for(lambda: listed(a) == {("a1", a.node_id)}, DEAD_AFTER, "e1 gone from a")

    link(b, c)
    await wait_for(lambda: all(listed(n) == everyone for n in five), 10, "all see both again")
    for n in five:
        ids = [s.id for s in n.sessions.list()]
        assert sorted(ids) == ["a1", "e1"], ids  # once each, not once per path


async def test_a_ring_keeps_no_phantom_of_a_node_that_left(
    five: list[ConversationsApi],
) -> None:
    """A ring A - B - C - D - A with E hanging off C. Cutting one ring link loses no
    session (the other way round still reaches); E leaving is seen everywhere, and no
    node keeps E's session alive by hearing of it back round the ring (a loop that
    re-advertised it would keep it listed forever)."""
    a, b, c, d, e = five
    for n in five:
        await n.register_session(f"{n.node_id[:4]}-s")
    everyone = {(f"{n.node_id[:4]}-s", n.node_id) for n in five}
    ab, _ = link(a, b)
    link(b, c)
    link(c, d)
    link(d, a)
    ce, _ = link(c, e)
    await wait_for(lambda: all(listed(n) == everyone for n in five), 10, "ring up")

    await ab.close()
    await wait_for(lambda: b.node_id not in a._links, 10, "a - b cut")
    # Still reachable the other way: nothing dropped, whatever the order frames crossed.
    await wait_for(lambda: all(listed(n) == everyone for n in five), 10, "still all")

    await e.aclose()
    rest = everyone - {(f"{e.node_id[:4]}-s", e.node_id)}
    await wait_for(lambda: all(listed(n) == rest for n in five[:4]), DEAD_AFTER, "e gone")
    # A further round of records (a new session on every node) crosses the ring: E's
    # stays gone once they have all been heard.
    for n in five[:4]:
        await n.register_session("late")
    late = rest | {("late", n.node_id) for n in five[:4]}
    await wait_for(lambda: all(listed(n) == late for n in five[:4]), 10, "late ones seen")
    assert ce.closed


# -- a node that dies ---------------------------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[NodeProc]]:
    started: list[NodeProc] = []
    yield started
    for p in started:
        p.kill()
    stop_all(started)


async def test_sessions_of_a_sigkilled_process_two_hops_away_vanish(
    procs: list[NodeProc],
) -> None:
    """A - B - child over real sockets on loopback, the child a separate node process:
    A lists the child's session (two hops away, the child's node id); the child killed
    with SIGKILL, A drops it within the documented 3 s (B's heartbeat notices, B's peer
    list tells A), and A's and B's own sessions stay."""
    async with (
        ConversationsApi(host="127.0.0.1", discovery=()) as a,
        ConversationsApi(host="127.0.0.1", discovery=()) as b,
    ):
        await a.register_session("a1")
        await b.register_session("b1")
        child = await asyncio.to_thread(
            NodeProc.start, "--session", "child-1", "--subscribe", "d", name="child"
        )
        procs.append(child)
        assert b.url is not None
        await a.connect(b.url)
        await b.connect(child.url)
        await wait_for(
            lambda: ("child-1", child.node_id) in listed(a), START, "a sees the child's session"
        )
        assert child.node_id not in {p.node_id for p in a.peers()}  # not linked to a
        await asyncio.to_thread(child.kill)
        await wait_for(
            lambda: listed(a) == {("a1", a.node_id), ("b1", b.node_id)},
            DEAD_AFTER,
            "the child's session gone from a",
        )


# -- what a peer may say ------------------------------------------------------------------------


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[ConversationsApi, MemoryLink, MemoryLink]]:
    async with memory_node() as api:
        await api.register_session("mine", subscribe=["d"])
        ours, theirs = await hand_driven_peer(api)
        yield api, ours, theirs


def record(origin: Any, seq: Any, peers: Any, sessions: Any) -> bytes:
    return pack([F_RECORD, origin, seq, peers, sessions])


def _session(sid: str) -> dict[str, Any]:
    return {"id": sid, "user_id": "u", "subscriptions": ["d"]}


_BAD_RECORDS: dict[str, bytes] = {
    "too short": pack([F_RECORD, "far", 1, []]),
    "too long": pack([F_RECORD, "far", 1, [], [], 0]),
    "origin not a str": record(5, 1, [], []),
    "empty origin": record("", 1, [], []),
    "origin of 1 MB": record("x" * 1_000_000, 1, [], []),
    "negative seq": record("far", -1, [], []),
    "seq a float": record("far", 1.5, [], []),
    "seq past 63 bits": record("far", 1 << 63, [], []),
    "peers not a list": record("far", 1, "hostile", []),
    "a peer id not a str": record("far", 1, [7], []),
    "too many peers": record("far", 1, [f"p{i}" for i in range(5000)], []),
    "sessions not a list": record("far", 1, [], {"id": "s"}),
    "an invalid session": record("far", 1, [], [{"id": "bad/id", "subscriptions": []}]),
    "a session twice": record("far", 1, [], [_session("s"), _session("s")]),
}


@pytest.mark.parametrize("case", list(_BAD_RECORDS))
async def test_a_bad_record_closes_the_link_and_changes_nothing(
    hostile: tuple[ConversationsApi, MemoryLink, MemoryLink],
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api, ours, theirs = hostile
    caplog.set_level(logging.WARNING)
    await theirs.send(_BAD_RECORDS[case])
    await wait_for(lambda: ours.closed, 10, "the link closed")
    assert ours.close_code == 4000
    assert "node record" in caplog.text or "session" in caplog.text
    assert listed(api) == {("mine", api.node_id)}
    assert len(api._mesh) == 0


async def test_records_list_far_sessions_newest_wins_and_own_is_ignored(
    hostile: tuple[ConversationsApi, MemoryLink, MemoryLink],
) -> None:
    """A record of a node the peer is linked to lists its sessions under that node's id;
    an older record of it arriving later changes nothing; a record claiming to be this
    node's own is ignored (it cannot add sessions to this node)."""
    api, _, theirs = hostile
    await theirs.send(pack([5, ["far"]]))  # the peer is linked to "far"
    await theirs.send(record("far", 10, ["hostile"], [_session("f-new")]))
    await wait_for(lambda: ("f-new", "far") in listed(api), 10, "far's session listed")
    await theirs.send(record("far", 9, ["hostile"], [_session("f-old")]))
    await theirs.send(record(api.node_id, 1 << 62, ["hostile"], [_session("fake")]))
    # A later valid record from the same peer is handled after those two: once it is in,
    # they were too.
    await theirs.send(record("other", 1, [], [_session("o")]))
    await wait_for(lambda: len(api._mesh) == 2, 10, "the later record is in")
    assert listed(api) == {("mine", api.node_id), ("ok", "hostile"), ("f-new", "far")}
    assert api.sessions.get("f-new").node_id == "far"


async def test_a_far_node_is_listed_only_while_a_reached_node_lists_it(
    hostile: tuple[ConversationsApi, MemoryLink, MemoryLink],
) -> None:
    """Reachability goes through records of reached nodes only: a record of "far" alone
    lists nothing until the peer says it is linked to it; when the peer's list drops
    "far", its sessions go although its record is still held."""
    api, _, theirs = hostile
    await theirs.send(record("far", 1, ["hostile"], [_session("f1")]))
    await wait_for(lambda: len(api._mesh) == 1, 10, "the record is held")
    assert ("f1", "far") not in listed(api)
    await theirs.send(pack([5, ["far"]]))
    await wait_for(lambda: ("f1", "far") in listed(api), 10, "far reached")
    await theirs.send(pack([5, []]))
    await wait_for(lambda: ("f1", "far") not in listed(api), 10, "far no longer reached")
    assert len(api._mesh) == 1


async def test_records_are_forwarded_as_checked_never_as_received() -> None:
    """A record from one peer reaches this node's other peers once, rebuilt from what was
    checked: keys a session entry should not have are not passed on. A repeat of it
    (same sequence number) is not forwarded again."""
    async with memory_node() as api:
        ours1, theirs1 = await hand_driven_peer(api)
        b = memory_node()
        async with b:
            lab, _ = link(api, b)
            await wait_for(lambda: b.node_id in api._links, 10, "b linked")
            entry = {**_session("f1"), "evil": "x" * 1000}
            await theirs1.send(pack([5, ["far"]]))
            # b reaches "far" through the hand-driven peer's own record, as a node sends
            await theirs1.send(record("hostile", 1, [api.node_id, "far"], []))
            await theirs1.send(record("far", 3, ["hostile"], [entry]))
            await wait_for(lambda: ("f1", "far") in listed(b), 10, "b sees far's session")
            await theirs1.send(record("far", 3, ["hostile"], [entry]))
            await theirs1.send(record("later", 1, [], []))
            await wait_for(lambda: len(b._mesh) >= 3, 10, "the later record reached b")
            sent = [f for f in frames_of(lab.sent_frames) if f[0] == F_RECORD and f[1] == "far"]
            assert len(sent) == 1
            assert sent[0] == [F_RECORD, "far", 3, ["hostile"], [_session("f1")]]
        assert not ours1.closed


async def test_a_record_too_large_for_a_peer_goes_without_its_sessions() -> None:
    """A peer that accepts small frames gets a record whose sessions do not fit without
    them (sessions are advisory): it still learns the node and its links, and the link
    stays up."""
    async with memory_node() as api, memory_node() as far_node:
        for i in range(60):
            subs = [f"n{j:02d}-{'d' * 50}" for j in range(3)]
            await far_node.register_session(f"session-{i:03d}", subscribe=subs)
        link(api, far_node)
        await wait_for(lambda: len(api.sessions.list()) == 60, 10, "far_node's sessions")
        small = MemoryLink(api._hello())
        ours = MemoryLink(type(api._hello())("tiny", None))
        ours._other, small._other = small, ours
        api.attach(ours)
        await small.send(pack([0, [], None, [], [], 4096]))
        await wait_for(lambda: "tiny" in api._links, 10, "tiny linked")
        await small.send(pack([F_RECORD, "later", 1, [], []]))  # flush: handled after
        await wait_for(lambda: len(api._mesh) == 1, 10, "tiny's record is in")

        def got() -> list[list[Any]]:
            return [f for f in frames_of(ours.sent_frames) if f[0] == F_RECORD]

        await wait_for(lambda: any(f[1] == far_node.node_id for f in got()), 10, "record sent")
        rec = next(f for f in got() if f[1] == far_node.node_id)
        assert rec[3] == sorted(far_node._links) and rec[4] == []
        assert all(len(m) <= 4096 for m in ours.sent_frames)
        assert not ours.closed


# -- bounds -------------------------------------------------------------------------------------


def _info(node: str, sid: str) -> SessionInfo:
    return SessionInfo(sid, "u", node, ("d",), is_local=False)


def test_the_map_holds_at_most_max_far_nodes_making_room_from_unreachable_ones() -> None:
    m = MeshMap("me")
    for i in range(MAX_FAR_NODES):
        assert m.offer(f"n{i}", 1, frozenset(), ()) is not None
    # n0 reachable (a link lists it), the rest not: a new node takes an unreachable's place
    m.walk({"peer": frozenset({"n0"})})
    assert m.offer("new", 1, frozenset(), ()) is not None
    assert len(m) == MAX_FAR_NODES and "n0" in dict(m.records())
    # all reachable: the next one is refused, and says so
    m.walk({"peer": frozenset(name for name, _ in m.records())})
    assert m.offer("one-more", 1, frozenset(), ()) is None and m.refused
    assert "one-more" not in dict(m.records())


def test_past_max_far_sessions_a_record_is_kept_without_sessions() -> None:
    m = MeshMap("me")
    big = tuple(_info("a", f"s{i}") for i in range(MAX_FAR_SESSIONS))
    assert m.offer("a", 1, frozenset(), big) is not None
    kept = m.offer("b", 1, frozenset({"a"}), (_info("b", "x"),))
    assert kept is not None and kept.sessions == () and m.refused
    # a newer record of a, with fewer sessions, makes room again
    assert m.offer("a", 2, frozenset(), big[:10]) is not None
    again = m.offer("b", 2, frozenset({"a"}), (_info("b", "x"),))
    assert again is not None and [s.id for s in again.sessions] == ["x"]
    far = m.walk({"b": frozenset({"a"})})
    assert set(far) == {"a"} and len(far["a"]) == 10  # b is a link: its own list counts


async def test_a_node_restarted_with_its_clock_behind_is_not_ignored(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records are numbered from the clock at startup. A durable node restarted with its
    clock behind (same node id) hears its previous run's record back from its neighbour
    and numbers past it, so the far side lists this run's sessions, not the old run's."""
    async with memory_node() as a, memory_node() as b:
        link(a, b)
        c = memory_node(data_dir=tmp_path / "c")
        async with c:
            await c.register_session("first-run")
            link(b, c)
            await wait_for(lambda: ("first-run", c.node_id) in listed(a), 10, "a sees c")
            c_id = c.node_id
        await wait_for(lambda: ("first-run", c_id) not in listed(a), DEAD_AFTER, "c gone")
        import subcog_crdt._api as api_module

        behind = api_module.time.time_ns() - 3_600 * 10**9  # an hour back
        monkeypatch.setattr(api_module.time, "time_ns", lambda: behind)
        again = memory_node(data_dir=tmp_path / "c")
        monkeypatch.undo()
        async with again:
            assert again.node_id == c_id
            await again.register_session("second-run")
            link(b, again)
            await wait_for(lambda: ("second-run", c_id) in listed(a), 10, "this run's session")
            assert ("first-run", c_id) not in listed(a)


async def test_a_record_of_this_node_with_a_huge_number_is_not_followed(
    hostile: tuple[ConversationsApi, MemoryLink, MemoryLink],
) -> None:
    """A peer claiming this node's own record with a number near the top cannot push
    this node's numbering past what its peers accept (their links would close)."""
    api, ours, theirs = hostile
    before = api._record_seq
    await theirs.send(record(api.node_id, (1 << 63) - 2, [], []))
    await theirs.send(record("later", 1, [], []))  # handled after the one above
    await wait_for(lambda: len(api._mesh) == 1, 10, "the later record is in")
    assert api._record_seq == before
    assert not ours.closed
