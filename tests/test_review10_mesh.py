"""Review 10: sessions of nodes beyond a node's links (frame 10 records, docs/protocol.md
"The mesh beyond a node's links") and of nodes met at a relay (awareness states in the
directory room, docs/yjs.md "Relays").

In-memory nodes for the mesh shapes, a hand-driven peer for what a hostile one sends, the
Node relay (``relay`` fixture) for awareness. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from helpers import frames_of, hand_driven_peer, link, listed, memory_nodes, pack, wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._peering import F_RECORD
from subcog_crdt._sessions import MAX_SUBSCRIPTIONS
from support.noderelay import NodeRelay
from test_relay import node

SEEN = 5.0
"""A change is announced within 0.1 s (docs/protocol.md); this only bounds a hang."""
GONE = 10.0
"""As in tests/test_relay_presence.py: under the 30 s a relay keeps an unrenewed state and
the 45 s a node does, so a drop within it came from the relay saying the connection
ended (docs/yjs.md, "Relays")."""
START = 30.0


def memory_node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(listen=False, discovery=(), **kw)


def entry(sid: str, subs: list[str] | None = None) -> dict[str, Any]:
    return {"id": sid, "user_id": "u", "subscriptions": ["d"] if subs is None else subs}


def record(origin: str, seq: int, peers: list[str], sessions: list[dict[str, Any]]) -> bytes:
    return pack([F_RECORD, origin, seq, peers, sessions])


@pytest.fixture
async def three() -> AsyncIterator[list[ConversationsApi]]:
    async with memory_nodes(3) as nodes:
        yield nodes


# -- a new link's records ------------------------------------------------------------------


async def test_a_node_joining_lists_far_sessions_of_a_node_with_a_long_list(
    three: list[ConversationsApi],
) -> None:
    """far - b, then a joins b: a reaches far through b and lists all of far's sessions.
    Far's session list is over 3 KiB (40 sessions, a few subscriptions each), ordinary
    for an agent host."""
    a, b, far = three
    for i in range(40):
        await far.register_session(
            f"agent-{i:02d}", subscribe=[f"project-{i:02d}-notes", "shared-decisions"]
        )
    link(b, far)
    await wait_for(lambda: len(b.sessions.list()) == 40, SEEN, "b lists far's sessions")
    await wait_for(lambda: far.node_id in dict(b._mesh.records()), SEEN, "b holds far's record")

    link(a, b)
    await wait_for(lambda: far.node_id in dict(a._mesh.records()), SEEN, "a has far's record")
    want = {(f"agent-{i:02d}", far.node_id) for i in range(40)}
    await wait_for(lambda: want <= listed(a), SEEN, "a lists far's sessions")


# -- sequence numbers ------------------------------------------------------------------------


async def test_a_restart_with_the_clock_behind_is_seen_when_the_old_record_comes_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, three: list[ConversationsApi]
) -> None:
    """a - b - c (c durable); c closes; c restarts with its clock an hour behind and links
    to d first, then d joins b (two parts of the mesh merging). a must list this run's
    session of c, not the previous run's: the previous run's record reaches d through b,
    never c itself."""
    a, b, d = three
    link(a, b)
    c = memory_node(data_dir=tmp_path / "c")
    async with c:
        await c.register_session("first-run")
        link(b, c)
        await wait_for(lambda: ("first-run", c.node_id) in listed(a), SEEN, "a sees c")
        c_id = c.node_id
    await wait_for(lambda: ("first-run", c_id) not in listed(a), SEEN, "c gone from a")

    import subcog_crdt._api as api_module

    behind = api_module.time.time_ns() - 3_600 * 10**9
    monkeypatch.setattr(api_module.time, "time_ns", lambda: behind)
    again = memory_node(data_dir=tmp_path / "c")
    monkeypatch.undo()
    async with again:
        assert again.node_id == c_id
        await again.register_session("second-run")
        link(again, d)
        await wait_for(lambda: ("second-run", c_id) in listed(d), SEEN, "d lists c (linked)")
        link(d, b)
        await wait_for(lambda: ("second-run", c_id) in listed(a), SEEN, "a lists this run")
        assert ("first-run", c_id) not in listed(a)


async def test_a_forged_record_of_a_real_node_does_not_outlive_the_hostile_link(
    three: list[ConversationsApi],
) -> None:
    """api - b - c, and a hostile peer on api. The hostile peer sends a record of c
    numbered a little past c's own, naming a node "ghost" with a made-up session. Once the
    hostile link is gone and c's sessions change, api lists c's real sessions, and
    neither the made-up ones nor "ghost"."""
    api, b, c = three
    await c.register_session("c-real")
    link(api, b)
    link(b, c)
    await wait_for(lambda: ("c-real", c.node_id) in listed(api), SEEN, "api sees c")
    ours, theirs = await hand_driven_peer(api)
    forged = c._record_seq + 1000
    await theirs.send(record(c.node_id, forged, [b.node_id, "ghost"], [entry("c-fake")]))
    await theirs.send(record("ghost", 1, [c.node_id], [entry("ghost-s")]))
    await wait_for(lambda: len(api._mesh) >= 3, SEEN, "the hostile records are in")
    await ours.close()
    await wait_for(lambda: "hostile" not in api._links, SEEN, "the hostile link is gone")

    await c.register_session("c-later")
    await wait_for(lambda: ("c-later", c.node_id) in listed(api), SEEN, "api sees c's change")
    assert ("c-fake", c.node_id) not in listed(api)
    assert ("ghost-s", "ghost") not in listed(api)


# -- bounds ------------------------------------------------------------------------------------


async def test_a_record_listing_more_subscriptions_than_a_node_may_host_is_refused() -> None:
    """check_record: "as strictly as a direct peer's lists". A direct peer listing more
    than MAX_SUBSCRIPTIONS subscriptions is refused (ProtocolError, the link closes
    4000); a record doing so must be too, or a peer makes the node hold up to 1024 records
    of a whole frame (16 MiB) each."""
    async with memory_node() as api:
        ours, theirs = await hand_driven_peer(api)
        subs = [f"n{i}" for i in range(MAX_SUBSCRIPTIONS + 1)]
        await theirs.send(pack([5, ["far"]]))
        await theirs.send(record("far", 1, ["hostile"], [entry("huge", subs)]))
        await theirs.send(record("later", 1, [], []))  # handled after the one above
        await wait_for(lambda: ours.closed or len(api._mesh) == 2, SEEN, "handled")
        held = sum(len(s.subscriptions) for _, r in api._mesh.records() for s in r.sessions)
        assert (ours.closed, ours.close_code, held) == (True, 4000, 0)


# -- what holds --------------------------------------------------------------------------------


async def test_private_namespaces_stay_out_of_records_and_a_local_id_wins_get() -> None:
    """A private namespace is named in no record (far nodes list the session without it),
    and a far session with the id of a local one does not shadow the local one."""
    async with (
        memory_node() as a,
        memory_node() as b,
        memory_node(private_namespaces=["secret-ns"]) as c,
    ):
        await a.register_session("same")
        await c.register_session("same", subscribe=["secret-ns", "public-ns"])
        _, lb = link(a, b)
        link(b, c)
        await wait_for(lambda: ("same", c.node_id) in listed(a), SEEN, "a sees c's session")
        far = [s for s in a.sessions.list() if s.node_id == c.node_id]
        assert [(s.id, s.subscriptions) for s in far] == [("same", ("public-ns",))]
        assert a.sessions.get("same").is_local
        records = [f for f in frames_of(lb.sent_frames) if f[0] == F_RECORD]
        assert records and "secret-ns" not in repr(records)


# -- relay presence ----------------------------------------------------------------------------


async def test_a_node_closing_after_its_directory_connection_came_back_is_dropped(
    relay: NodeRelay,
) -> None:
    """a's directory connection to the relay drops and comes back (a network blip; the
    relay stays up). When a then closes, b drops a's sessions because the relay says a's
    connection ended, as it does for a node that never reconnected."""
    async with node(relay.url) as a, node(relay.url) as b:
        await a.register_session("agent-a")
        await wait_for(lambda: ("agent-a", a.node_id) in listed(b), START, "b lists a")
        r = a._relays[0]
        old = r._directory_ws
        assert old is not None
        await old.ws.close()
        await wait_for(
            lambda: r._directory_ws is not None and r._directory_ws is not old,
            START,
            "a's directory connection is back",
        )
        await a.register_session("agent-a2")  # announced on the new connection
        await wait_for(lambda: ("agent-a2", a.node_id) in listed(b), GONE, "b lists a2")
        await a.aclose()
        await wait_for(
            lambda: not any(node_id == a.node_id for _, node_id in listed(b)),
            GONE,
            "a's sessions gone from b",
        )
