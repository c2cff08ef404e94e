"""Property: nodes that exchange updates late, reordered and duplicated converge, and
lose nothing (DESIGN.md, conflict handling)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.events import Captured, Conflict, Deleted, Event, Updated
from subcog_crdt._core.hlc import Hlc
from subcog_crdt._core.memory import fold
from subcog_crdt._core.schema import normalise
from subcog_crdt._errors import NotFound

CONTENTS = ["Use SQLite WAL", "use sqlite  wal", "Tests live next to code", "Prefer msgpack", "X"]


@dataclass
class Node:
    name: str
    doc: NamespaceDoc
    events: list[Event] = field(default_factory=list)


@dataclass
class World:
    nodes: list[Node]
    clock: list[int]
    queues: dict[tuple[int, int], list[bytes]]
    writes: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (op, session)

    def flush(self, i: int) -> None:
        for u in self.nodes[i].doc.take_outbox():
            for j in range(len(self.nodes)):
                if j != i:
                    self.queues[(i, j)].append(u)

    def deliver(self, i: int, j: int, pick: int, dup: bool) -> None:
        q = self.queues[(i, j)]
        if not q:
            return
        u = q.pop(pick % len(q))
        if dup:
            q.append(u)
        node = self.nodes[j]
        node.events.extend(node.doc.apply_update(u))
        self.flush_remote(j)

    def burst(self, i: int, j: int, count: int) -> None:
        """Deliver the next ``count`` queued updates merged into one, as a link does
        with live updates that arrive together (``_peering._merge_runs``)."""
        from pycrdt import merge_updates

        q = self.queues[(i, j)]
        take, q[:] = q[:count], q[count:]
        if not take:
            return
        node = self.nodes[j]
        node.events.extend(node.doc.apply_update(merge_updates(*take)))
        self.flush_remote(j)

    def flush_remote(self, j: int) -> None:
        # Remote applies also land in the outbox (for storage); peers already have them
        # from the origin, so in this full mesh nothing is forwarded.
        self.nodes[j].doc.take_outbox()


def _own_write(events: list[Event], node_id: str) -> str:
    """The write a local operation made: the newest write made here among its events. (A
    capture can also release events held for its memory, e.g. an update from another
    node that arrived before the memory's first capture; those come first.)"""
    return max(
        (e.write_id for e in events if e.node_id == node_id and not isinstance(e, Conflict)),
        key=lambda k: k.split("/")[1],
    )


def make_world(n: int) -> World:
    clock = [1_800_000_000_000]
    nodes = []
    for i in range(n):
        counter = [0]

        def next_cursor(c: list[int] = counter) -> int:
            c[0] += 1
            return c[0]

        hlc = Hlc(clock=lambda: clock[0])
        doc = NamespaceDoc("decisions", node_id=f"{i + 1:016x}", hlc=hlc, next_cursor=next_cursor)
        nodes.append(Node(f"n{i}", doc))
    queues = {(i, j): [] for i in range(n) for j in range(n) if i != j}
    return World(nodes, clock, queues)


step = st.one_of(
    st.tuples(st.just("capture"), st.integers(0, 4), st.integers(0, 2), st.integers(0, 4)),
    st.tuples(st.just("update"), st.integers(0, 4), st.integers(0, 2), st.integers(0, 50)),
    st.tuples(st.just("tags"), st.integers(0, 4), st.integers(0, 2), st.integers(0, 50)),
    st.tuples(st.just("delete"), st.integers(0, 4), st.integers(0, 2), st.integers(0, 50)),
    st.tuples(st.just("deliver"), st.integers(0, 4), st.integers(0, 4), st.integers(0, 50)),
    st.tuples(st.just("dup"), st.integers(0, 4), st.integers(0, 4), st.integers(0, 50)),
    st.tuples(st.just("burst"), st.integers(0, 4), st.integers(0, 4), st.integers(2, 8)),
    st.tuples(st.just("tick"), st.integers(0, 2), st.integers(0, 0), st.integers(0, 0)),
)


@settings(
    max_examples=int(os.environ.get("SUBCOG_EXAMPLES", "60")),  # raise for a deeper hunt
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(n=st.integers(2, 5), steps=st.lists(step, max_size=60), seed=st.integers(0, 2**16))
# An update that reaches a node before its memory's capture, then the same content
# captured there: the capture also releases the held Updated event.
@example(
    n=3,
    steps=[
        ("capture", 1, 0, 2),
        ("deliver", 1, 0, 0),
        ("update", 0, 0, 0),
        ("deliver", 0, 2, 0),
        ("capture", 2, 0, 2),
    ],
    seed=0,
)
# A delete arriving before later re-captures: they revive the memory with their own tags,
# so the words a node had indexed (a tag of an earlier capture) must be replaced.
@example(
    n=2, steps=[("capture", 0, 0, 0)] * 8 + [("capture", 1, 1, 0), ("delete", 1, 0, 0)], seed=1
)
def test_random_writes_converge_and_lose_nothing(n, steps, seed):
    w = make_world(n)
    rng = random.Random(seed)
    update_no = 0
    for op, a, b, c in steps:
        node_i = a % n
        node = w.nodes[node_i]
        session = f"s{node_i}-{b}"
        ids = sorted(node.doc.memory_ids())
        if op == "capture":
            mem, evs = node.doc.capture(session, CONTENTS[c], {"tags": [f"t{b}"]})
            node.events.extend(evs)
            w.writes[_own_write(evs, node.doc.node_id)] = ("capture", session)
        elif op in ("update", "tags", "delete") and ids:
            mid = ids[c % len(ids)]
            try:
                if op == "update":
                    update_no += 1
                    # unique contents: updates never collide with captured text
                    _, evs = node.doc.update(session, mid, {"content": f"v{update_no} {mid}"})
                elif op == "tags":
                    _, evs = node.doc.update(session, mid, {"tags": [f"tag{c}"]})
                else:
                    _, evs = node.doc.delete(session, mid)
            except NotFound:
                continue  # deleted here already
            node.events.extend(evs)
            w.writes[_own_write(evs, node.doc.node_id)] = (op, session)
        elif op in ("deliver", "dup"):
            i, j = a % n, b % n
            if i != j:
                w.deliver(i, j, c, dup=op == "dup")
        elif op == "burst":
            i, j = a % n, b % n
            if i != j:
                w.burst(i, j, c)
        elif op == "tick":
            w.clock[0] += a  # 0 keeps wall time equal: ties broken by the counter/session
        w.flush(node_i)
    # full delivery, in random order, with duplicates
    for i in range(n):
        w.flush(i)
    pending = [(k, u) for k, q in w.queues.items() for u in q]
    pending += rng.sample(pending, k=min(len(pending), 5))
    rng.shuffle(pending)
    for (_i, j), u in pending:
        node = w.nodes[j]
        node.events.extend(node.doc.apply_update(u))
        node.doc.take_outbox()

    docs = [x.doc for x in w.nodes]
    # 1. equal state everywhere
    assert len({d.state_hash() for d in docs}) == 1
    ref = docs[0]
    all_ids = sorted(ref.memory_ids(include_deleted=True))
    for d in docs[1:]:
        assert sorted(d.memory_ids(include_deleted=True)) == all_ids
        for mid in all_ids:
            assert d.get(mid) == ref.get(mid)
    # ... and what each node folded write by write is what its writes fold to at once
    for d in docs:
        for mid in all_ids:
            assert d.get(mid) == fold("decisions", d.writes(mid)), mid
    # 2. nothing lost: every write is in every node's history, once
    for d in docs:
        keys = [wr.key for mid in all_ids for wr in d.writes(mid)]
        assert sorted(keys) == sorted(w.writes)
    # 3. captured_by complete; 4. one live memory per normalised content
    capturers: dict[str, set[str]] = {}
    for key, (op, session) in w.writes.items():
        if op == "capture":
            capturers.setdefault(key.split("/")[0], set()).add(session)
    live_norms = []
    for mid in all_ids:
        mem = ref.get(mid)
        assert mem is not None
        assert set(mem.captured_by) == capturers[mid]
        if not mem.deleted:
            live_norms.append(normalise(mem.content))
    # Captures dedupe by content. An update that moves a memory's content away, racing a
    # capture of the old content on a node that had not seen it, can leave two memories
    # with one content (docs/schema.md, "Known limits"); everywhere else: one.
    moved = any(op == "update" for op, _ in w.writes.values())
    if not moved:
        assert len(live_norms) == len(set(live_norms))
    # 5. the HLC-later content update wins (unless a later capture revived a deletion)
    for mid in all_ids:
        writes = sorted(ref.writes(mid), key=lambda x: x.order)
        mem = ref.get(mid)
        content_writes = [x for x in writes if x.op == "update" and "content" in x.changes]
        last_delete = max((x.order for x in writes if x.op == "delete"), default=None)
        last_capture = max(x.order for x in writes if x.op == "capture")
        if (
            content_writes
            and (last_delete is None or last_delete < content_writes[-1].order)
            and (
                last_delete is None
                or last_capture < last_delete
                or last_capture < content_writes[-1].order
            )
        ):
            assert mem.content == content_writes[-1].changes["content"]
    # 6. every node emitted exactly one write event per write, naming its session,
    #    and the same conflicts
    conflict_sets = []
    for node in w.nodes:
        seen: dict[str, int] = {}
        conflicts: list[tuple[str, str]] = []
        for ev in node.events:
            if isinstance(ev, Captured | Updated | Deleted):
                seen[ev.write_id] = seen.get(ev.write_id, 0) + 1
                assert ev.source_session == w.writes[ev.write_id][1]
            elif isinstance(ev, Conflict):
                conflicts.append((ev.winner.key, ev.loser.key))
                assert ev.loser.key in w.writes
                # the later write wins, except that a delete wins over an update
                assert ev.winner.order > ev.loser.order or (
                    ev.winner.op == "delete" and ev.loser.op == "update"
                )
        assert seen == dict.fromkeys(w.writes, 1)
        assert len(conflicts) == len(set(conflicts)), "a conflict reported twice"
        conflict_sets.append(sorted(conflicts))
    assert all(c == conflict_sets[0] for c in conflict_sets)
    cursors = [ev.cursor for ev in w.nodes[0].events]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    # 7. a node restarted from this state (memories loaded lazily, resolved on first use
    #    or in bulk) holds the same memories, finds the same, dedupes the same
    restarted = []
    for bulk in (False, True):
        fresh = make_world(1).nodes[0].doc
        fresh.load([ref.diff()])
        if bulk:
            fresh.resolve_all()
        assert sorted(fresh.memory_ids(include_deleted=True)) == all_ids
        for mid in all_ids:
            assert fresh.get(mid) == ref.get(mid)
        for query in ("sqlite", "tests code", "t1", "v1"):
            assert [m.id for _, m in fresh.search(query, 10)] == [
                m.id for _, m in ref.search(query, 10)
            ]
        restarted.append(fresh)
    for text in CONTENTS:
        got = {d.capture("s9", text, {})[0].id for d in (ref, *restarted)}
        assert len(got) == 1, (text, got)


def test_nested_map_trap_same_content_captured_concurrently():
    """Two nodes capture the same fact at the same instant: in a naive schema (one Y.Map
    per memory under one key) Yjs keeps one map and drops the other session. Here both
    sessions end up in captured_by, on both nodes."""
    w = make_world(2)
    a, b = w.nodes
    ma, _ = a.doc.capture("claude-1", "Use SQLite WAL for the journal", {"tags": ["db"]})
    mb, _ = b.doc.capture("cursor-2", "use sqlite WAL  for the journal", {"tags": ["storage"]})
    assert ma.id == mb.id  # same id chosen independently
    w.flush(0)
    w.flush(1)
    w.deliver(0, 1, 0, dup=False)
    w.deliver(1, 0, 0, dup=False)
    for node in (a, b):
        mem = node.doc.get(ma.id)
        assert mem is not None
        assert set(mem.captured_by) == {"claude-1", "cursor-2"}
        assert set(mem.tags) == {"db", "storage"}
        assert len(list(node.doc.memory_ids())) == 1
    assert a.doc.state_hash() == b.doc.state_hash()


def test_concurrent_updates_later_wins_and_loser_in_history():
    w = make_world(2)
    a, b = w.nodes
    m, _ = a.doc.capture("s1", "Deploy on Fridays", {})
    w.flush(0)
    w.deliver(0, 1, 0, dup=False)
    w.clock[0] += 5
    _, ev_a = a.doc.update("s1", m.id, {"content": "Never deploy on Fridays"})
    w.clock[0] += 5
    _, ev_b = b.doc.update("s2", m.id, {"content": "Deploy on Fridays before noon"})
    w.flush(0)
    w.flush(1)
    w.deliver(0, 1, 0, dup=False)
    w.deliver(1, 0, 0, dup=False)
    sides = (
        (a, ev_a, "Never deploy on Fridays", ev_b),
        (b, ev_b, "Deploy on Fridays before noon", ev_a),
    )
    for node, own, wrote, theirs in sides:
        mem = node.doc.get(m.id)
        assert mem is not None
        assert mem.content == "Deploy on Fridays before noon"  # b's write is later
        keys = [x.key for x in node.doc.writes(m.id)]
        assert ev_a[0].write_id in keys  # the loser stays in history
        conflicts = [e for e in node.events if isinstance(e, Conflict)]
        assert [(c.winner.key, c.loser.key) for c in conflicts] == [
            (ev_b[0].write_id, ev_a[0].write_id)
        ]
        assert conflicts[0].fields == ("content",)
        # each side emitted one Updated for its own write, and one for the other's on
        # arrival (every write yields one event on every node, loser included)
        assert [(type(e), dict(e.changes)) for e in own] == [(Updated, {"content": wrote})]
        received = [e for e in node.events if isinstance(e, Updated)]
        assert [e.write_id for e in received] == [theirs[0].write_id]


def test_ties_break_by_session_id():
    w = make_world(2)
    a, b = w.nodes
    m, _ = a.doc.capture("s1", "Same instant", {})
    w.flush(0)
    w.deliver(0, 1, 0, dup=False)
    b.doc._hlc._wall = a.doc._hlc._wall
    b.doc._hlc._counter = a.doc._hlc._counter
    _, ea = a.doc.update("zed", m.id, {"status": "a"})
    _, eb = b.doc.update("amy", m.id, {"status": "b"})
    assert ea[0].write_id.split("/")[1] == eb[0].write_id.split("/")[1]  # same stamp
    w.flush(0)
    w.flush(1)
    w.deliver(0, 1, 0, dup=False)
    w.deliver(1, 0, 0, dup=False)
    assert a.doc.get(m.id).status == b.doc.get(m.id).status == "a"  # "zed" > "amy"


def test_orphan_updates_report_each_conflict_once():
    """Two concurrent updates that arrive before their capture: the conflict is reported
    once, exactly as on a node that received everything in order."""
    w = make_world(3)
    a, b, c = w.nodes
    m, _ = a.doc.capture("s1", "base fact", {})
    w.flush(0)
    w.deliver(0, 1, 0, dup=False)
    capture_for_c = w.queues[(0, 2)].pop()
    a.doc.update("s1", m.id, {"status": "x"})
    b.doc.update("s2", m.id, {"status": "y"})
    w.flush(0)
    w.flush(1)
    for i, j in ((0, 2), (1, 2), (0, 1), (1, 0)):
        while w.queues[(i, j)]:
            w.deliver(i, j, 0, dup=False)
    c.events.extend(c.doc.apply_update(capture_for_c))  # the capture last
    for node in (a, b, c):
        kinds = [type(e).__name__ for e in node.events if type(e).__name__ == "Conflict"]
        assert kinds == ["Conflict"], (node.name, kinds)


def test_far_future_stamp_does_not_break_the_clock():
    w = make_world(2)
    _, b = w.nodes
    from pycrdt import Doc, Map

    hostile = Doc()
    hostile.get("entries", type=Map)["0123456789abcdef0123/9999999999999ffffff/evil/ee"] = (
        '{"v":1,"op":"capture","set":{"content":"from the far future"}}'
    )
    b.doc.apply_update(hostile.get_update())
    mem, evs = b.doc.capture("s2", "written after seeing it", {})
    assert b.doc.get(mem.id) == mem  # a valid key: the local clock stayed sane
    assert len(evs[0].write_id.split("/")[1]) == 19


def test_deeply_nested_value_is_ignored_not_fatal():
    from pycrdt import Doc, Map

    src = Doc()
    entries = src.get("entries", type=Map)
    entries["0123456789abcdef0123/1700000000000000001/evil/ee"] = "[" * 100_000 + "]" * 100_000
    entries["0123456789abcdef0124/1700000000000000002/good/ee"] = (
        '{"v":1,"op":"capture","set":{"content":"legit"}}'
    )
    w = make_world(1)
    doc = w.nodes[0].doc
    events = doc.apply_update(src.get_update())
    assert [e.memory.content for e in events] == ["legit"]
    fresh = make_world(1).nodes[0].doc
    fresh.load([doc.diff()])
    assert [fresh.get(i).content for i in fresh.memory_ids()] == ["legit"]


def test_junk_entry_beside_a_memory_is_ignored_after_a_restart_too():
    from pycrdt import Doc, Map

    doc = make_world(1).nodes[0].doc
    mem, _ = doc.capture("s1", "legit", {"tags": ["t"]})
    src = Doc()
    src.get("entries", type=Map)[f"{mem.id}/1700000000000000001/evil/ee"] = "not json"
    doc.apply_update(src.get_update())
    for bulk in (False, True):
        fresh = make_world(1).nodes[0].doc
        fresh.load([doc.diff()])
        if bulk:
            fresh.resolve_all()
        assert fresh.get(mem.id) == doc.get(mem.id) == mem
        assert [w.key for w in fresh.writes(mem.id)] == [w.key for w in doc.writes(mem.id)]
        assert [m.id for _, m in fresh.search("legit t", 5)] == [mem.id]


def test_junk_under_a_memory_id_does_not_block_that_memory_after_a_restart():
    """A junk entry under the id of some content, then a restart: writes to that memory
    (a peer's capture, a local one) used to fail with IndexError there."""
    from pycrdt import Doc, Map

    from subcog_crdt._core.schema import first_memory_id, normalise

    mid = first_memory_id("decisions", normalise("real fact"))
    src = Doc()
    src.get("entries", type=Map)[f"{mid}/1700000000000000001/evil/ee"] = "junk"
    a = make_world(1).nodes[0].doc
    assert a.apply_update(src.get_update()) == []
    restarted = make_world(1).nodes[0].doc
    restarted.load([a.diff()])
    peer = make_world(1).nodes[0].doc
    mem, _ = peer.capture("s1", "real fact", {})
    assert mem.id == mid
    events = restarted.apply_update(peer.diff())
    assert [type(e).__name__ for e in events] == ["Captured"]
    assert restarted.get(mid) == peer.get(mid)
    assert [m.id for _, m in restarted.search("real fact", 5)] == [mid]
    assert restarted.capture("s2", "real fact", {})[0].id == mid


def test_an_overwritten_entry_is_derived_alike_running_and_restarted():
    """A hostile writer overwrites a capture's entry with another valid write. Every node
    reads the new value; a running node must also search and dedupe by it, as a node
    restarted from the same document does."""
    from pycrdt import Doc, Map

    from subcog_crdt._core.schema import encode_write

    running = make_world(1).nodes[0].doc
    mem, _ = running.capture("s1", "original", {})
    key = running.writes(mem.id)[0].key
    evil = Doc()
    evil.apply_update(running.diff())
    evil.get("entries", type=Map)[key] = encode_write("capture", "", {"content": "replaced"})
    running.apply_update(evil.get_update(running.doc.get_state()))
    restarted = make_world(1).nodes[0].doc
    restarted.load([running.diff()])
    for doc in (running, restarted):
        assert doc.get(mem.id).content == "replaced"
        assert [m.id for _, m in doc.search("replaced", 5)] == [mem.id]
        assert doc.search("original", 5) == []
    for text in ("original", "replaced"):
        assert running.capture("s2", text, {})[0].id == restarted.capture("s2", text, {})[0].id


def test_a_hostile_overwrite_is_handled_without_reading_the_whole_map(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flagged update is watched, so only the entries it touched are read again: reading
    every entry per hostile update made each one cost O(namespace) (CPU for a peer)."""
    from pycrdt import Doc, Map

    from subcog_crdt._core.schema import encode_write

    running = make_world(1).nodes[0].doc
    mems = [running.capture("s1", f"fact {i}", {})[0] for i in range(50)]
    key = running.writes(mems[7].id)[0].key
    evil = Doc()
    evil.apply_update(running.diff())
    evil.get("entries", type=Map)[key] = encode_write("capture", "", {"content": "replaced"})
    update = evil.get_update(running.doc.get_state())

    def whole_map(*args: Any) -> Any:
        raise AssertionError("read every entry of the map")

    for name in ("items", "keys", "values", "__iter__", "to_py"):
        monkeypatch.setattr(Map, name, whole_map)
    running.apply_update(update)
    monkeypatch.undo()
    assert running.get(mems[7].id).content == "replaced"
    _same_as_restarted(running, ("replaced", "fact 7"))


def test_an_update_reusing_our_own_client_ids_is_a_duplicate_not_a_write():
    """A peer sends items under this node's own Yjs client id at clocks it already used.
    pycrdt ignores them (those ids are taken); the node must too, not derive a memory
    that is in no document (it used to: the fast path tracked no clock for itself)."""
    from pycrdt import Doc, Map

    a, b, c = (make_world(1).nodes[0].doc for _ in range(3))
    a.capture("s1", "first from a", {})
    b.apply_update(a.diff())  # a remote update first: the node now tracks clocks
    b.capture("s2", "b's own write", {})
    phantom, _ = c.capture("evil", "PHANTOM: only b would show this", {})
    key = c.writes(phantom.id)[0].key
    crafted = Doc(client_id=b.doc.client_id)
    crafted.get("entries", type=Map)[key] = c.doc.get("entries", type=Map)[key]
    before = sorted(b.memory_ids(include_deleted=True))
    assert b.apply_update(crafted.get_update()) == []
    assert sorted(b.memory_ids(include_deleted=True)) == before
    assert b.get(phantom.id) is None
    _same_as_restarted(b, ("phantom",))


def test_state_hash_is_equal_exactly_when_the_entries_are():
    """Junk entries are part of the state: a cached hash must not survive one arriving,
    and a document holding only junk is not an empty one."""
    from pycrdt import Doc, Map

    a, b, empty = (make_world(1).nodes[0].doc for _ in range(3))
    a.capture("s1", "legit", {})
    b.apply_update(a.diff())
    assert a.state_hash() == b.state_hash()  # cached on a now
    src = Doc()
    src.get("entries", type=Map)["0123456789abcdef0123/1700000000000000001/evil/ee"] = "junk"
    junk = src.get_update()
    a.apply_update(junk)
    assert a.state_hash() != b.state_hash()
    b.apply_update(junk)
    assert a.state_hash() == b.state_hash()
    only_junk = make_world(1).nodes[0].doc
    only_junk.apply_update(junk)
    assert only_junk.state_hash() != empty.state_hash()
    restarted = make_world(1).nodes[0].doc
    restarted.load([only_junk.diff()])
    assert restarted.state_hash() == only_junk.state_hash()


def test_junk_entries_do_not_change_recall_scores_after_a_restart():
    """A restarted node groups raw keys, junk ones included; BM25's document count must
    not include them, or its scores (and so rankings) differ from a running node's."""
    from pycrdt import Doc, Map

    running = make_world(1).nodes[0].doc
    for text in ("alpha beta", "alpha", "gamma delta", "alpha gamma words here"):
        running.capture("s1", text, {})
    src = Doc()
    entries = src.get("entries", type=Map)
    for i in range(20):
        entries[f"{i:020x}/1700000000000000001/evil/ee"] = "not json"
    running.apply_update(src.get_update())
    restarted = make_world(1).nodes[0].doc
    restarted.load([running.diff()])
    for q in ("alpha", "alpha beta", "gamma"):
        assert [(sc, m.id) for sc, m in running.search(q, 5)] == [
            (sc, m.id) for sc, m in restarted.search(q, 5)
        ]


def test_a_capture_joins_the_same_moved_memory_running_and_restarted():
    """Two memories were updated to the same content, then the smaller id was deleted.
    A capture of that content must join the other one on a running node as on a
    restarted one (the running node remembered only one moved memory per content)."""
    running = make_world(1).nodes[0].doc
    ids = [running.capture("s1", f"p{i}", {})[0].id for i in range(2)]
    p, q = sorted(ids)
    running.update("s1", p, {"content": "target"})
    running.update("s1", q, {"content": "target"})
    running.delete("s1", p)
    restarted = make_world(1).nodes[0].doc
    restarted.load([running.diff()])
    assert running.capture("s2", "target", {})[0].id == q
    assert restarted.capture("s2", "target", {})[0].id == q


def test_a_write_after_seeing_a_far_future_one_still_sorts_after_it():
    """A peer's clock is two hours fast (beyond what our clock follows). An update made
    after seeing its write must still win over it, not silently lose (no conflict: it
    saw that write)."""
    from subcog_crdt._core.hlc import Hlc

    now = 1_800_000_000_000

    def node(nid: str, skew: int) -> NamespaceDoc:
        return NamespaceDoc(
            "ns", node_id=nid, hlc=Hlc(clock=lambda: now + skew), next_cursor=lambda: 1
        )

    a, b = node("00000000000000aa", 0), node("00000000000000bb", 2 * 3600 * 1000)
    m, _ = a.capture("sa", "Use SQLite", {})
    b.apply_update(a.diff())
    b.update("sb", m.id, {"content": "Use Postgres"})
    a.apply_update(b.diff(a.state_vector()))
    mem, events = a.update("sa", m.id, {"content": "Use SQLite WAL"}, expected_version=2)
    assert mem.content == "Use SQLite WAL" and mem.version == 3
    assert [type(e).__name__ for e in events] == ["Updated"]
    b.apply_update(a.diff(b.state_vector()))
    assert a.get(m.id) == b.get(m.id)


def test_no_write_can_follow_one_stamped_at_the_end_of_time():
    from pycrdt import Doc, Map

    from subcog_crdt._core.schema import encode_write, write_key
    from subcog_crdt._errors import ConflictError

    running = make_world(1).nodes[0].doc
    m, _ = running.capture("s1", "fact", {})
    evil = Doc()
    evil.apply_update(running.diff())
    key = write_key(m.id, "9999999999999ffffff", "evil", "ee")
    evil.get("entries", type=Map)[key] = encode_write("update", "", {"content": "owned"})
    running.apply_update(evil.get_update(running.doc.get_state()))
    state = running.state_hash()
    with pytest.raises(ConflictError, match="end of time"):
        running.update("s1", m.id, {"content": "mine"})
    assert running.state_hash() == state


def _same_as_restarted(running: NamespaceDoc, queries: tuple[str, ...]) -> None:
    restarted = make_world(1).nodes[0].doc
    restarted.load([running.diff()])
    ids = sorted(running.memory_ids(include_deleted=True))
    assert sorted(restarted.memory_ids(include_deleted=True)) == ids
    for mid in ids:
        assert running.get(mid) == restarted.get(mid)
        assert [w.key for w in running.writes(mid)] == [w.key for w in restarted.writes(mid)]
    for q in queries:  # the same hits with the same scores (N, avgdl and df alike)
        ranked = [[(round(sc, 9), m.id) for sc, m in d.search(q, 5)] for d in (running, restarted)]
        assert ranked[0] == ranked[1], q


def _evil_copy(doc: NamespaceDoc) -> Any:
    from pycrdt import Doc

    evil = Doc()
    evil.apply_update(doc.diff())
    return evil


def test_a_hostile_removal_is_derived_alike_running_and_restarted():
    from pycrdt import Map

    running = make_world(1).nodes[0].doc
    mem, _ = running.capture("s1", "original fact", {})
    running.capture("s1", "another fact kept", {})
    running.search("fact", 5)  # indexed before the removal
    evil = _evil_copy(running)
    sv = running.doc.get_state()
    del evil.get("entries", type=Map)[running.writes(mem.id)[0].key]
    running.apply_update(evil.get_update(sv))
    assert running.get(mem.id) is None
    # the removed memory's words no longer count (N, avgdl, df), as after a restart
    _same_as_restarted(running, ("original fact", "fact"))


def test_a_hostile_update_held_back_then_released_is_derived_alike():
    """The overwrite arrives before the write it overwrites: pycrdt holds it back and
    applies it inside the next (innocent-looking) update."""
    from pycrdt import Map

    from subcog_crdt._core.schema import encode_write, write_key

    running = make_world(1).nodes[0].doc
    mem, _ = running.capture("s1", "original fact", {})
    evil = _evil_copy(running)
    entries = evil.get("entries", type=Map)
    k2 = write_key(mem.id, "1900000000000000001", "evil", "ff")
    sv0 = evil.get_state()
    entries[k2] = encode_write("update", "", {"content": "first"})
    u1 = evil.get_update(sv0)
    sv1 = evil.get_state()
    entries[k2] = encode_write("update", "", {"content": "second"})
    u2 = evil.get_update(sv1)
    running.apply_update(u2)
    running.apply_update(u1)
    assert running.get(mem.id).content == "second"
    _same_as_restarted(running, ("second", "first", "original fact"))


def test_junk_then_a_valid_overwrite_leaves_no_stale_words():
    from pycrdt import Map

    from subcog_crdt._core.schema import encode_write

    running = make_world(1).nodes[0].doc
    mem, _ = running.capture("s1", "Use SQLite WAL", {})
    key = running.writes(mem.id)[0].key
    for value in ("junk", encode_write("capture", "", {"content": "Prefer msgpack"})):
        evil = _evil_copy(running)
        sv = running.doc.get_state()
        evil.get("entries", type=Map)[key] = value
        running.apply_update(evil.get_update(sv))
    assert running.get(mem.id).content == "Prefer msgpack"
    assert running.search("sqlite wal", 5) == []
    _same_as_restarted(running, ("sqlite wal", "prefer msgpack"))


def test_content_set_by_an_update_dedupes_alike_running_and_restarted():
    """B's content comes from an update that did not change it; A's capture entry is then
    junked. A capture of that content must pick the same memory on a running node and on
    a restarted one (the "moved here" rule was applied differently)."""
    from pycrdt import Map

    running = make_world(1).nodes[0].doc
    a, _ = running.capture("s1", "Use SQLite WAL", {})
    running.update("s1", a.id, {"content": "Tests live next to code"})
    b, _ = running.capture("s1", "Use SQLite WAL", {})
    running.update("s1", b.id, {"content": "Use SQLite WAL"})
    evil = _evil_copy(running)
    sv = running.doc.get_state()
    evil.get("entries", type=Map)[running.writes(a.id)[0].key] = "junk"
    running.apply_update(evil.get_update(sv))
    restarted = make_world(1).nodes[0].doc
    restarted.load([running.diff()])
    got = running.capture("s2", "Use SQLite WAL", {})[0].id
    assert got == restarted.capture("s2", "Use SQLite WAL", {})[0].id == b.id


def test_an_item_claiming_an_id_we_hold_is_not_integrated():
    from pycrdt import Doc, Map

    honest = Doc(client_id=4242)
    honest.get("entries", type=Map)["0123456789abcdef0123/1700000000000000002/good/ee"] = (
        '{"v":1,"op":"capture","set":{"content":"honest"}}'
    )
    forged = Doc(client_id=4242)  # same client id and clock, other content
    forged.get("entries", type=Map)["fedcba9876543210fedc/1700000000000000003/forged/ee"] = (
        '{"v":1,"op":"capture","set":{"content":"phantom"}}'
    )
    doc = make_world(1).nodes[0].doc
    doc.apply_update(honest.get_update())
    assert doc.apply_update(forged.get_update()) == []
    assert list(doc.memory_ids()) == ["0123456789abcdef0123"]


def _status_history(n: int) -> tuple[World, NamespaceDoc, NamespaceDoc, Any]:
    """Node a captures a status memory and updates it ``n`` times; node b gets it all."""
    world = make_world(2)
    a, b = world.nodes[0].doc, world.nodes[1].doc
    mem, _ = a.capture("s1", "status: starting", {})
    for i in range(n):
        world.clock[0] += 1
        mem, _ = a.update("s1", mem.id, {"content": f"status: step {i}"}, mem.version)
    b.apply_update(a.diff())
    a.take_outbox()
    b.take_outbox()
    return world, a, b, mem


def _count_reads(monkeypatch: pytest.MonkeyPatch, *docs: NamespaceDoc) -> list[str]:
    """The keys the documents read from now on."""
    reads: list[str] = []
    for doc in docs:

        def counting(key: str, real: Any = doc._read) -> Any:
            reads.append(key)
            return real(key)

        monkeypatch.setattr(doc, "_read", counting)
    return reads


def test_a_write_to_a_long_history_reads_no_earlier_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """An update of a memory with a long history (a status note updated all day) folds onto
    what is folded already: it used to read and fold every earlier write, and check every
    one for a conflict, so the 4000th update of one memory took ~0.13 s. Counted in reads
    of the document, not in time."""
    world, a, b, mem = _status_history(200)
    reads = _count_reads(monkeypatch, a, b)
    world.clock[0] += 1
    mem, events = a.update("s1", mem.id, {"content": "status: done"}, mem.version)
    assert [type(e) for e in events] == [Updated] and mem.version == 202
    assert a.get(mem.id).content == "status: done"
    update = a.take_outbox()[-1]
    assert b.apply_update(update)[0].write_id == events[0].write_id
    assert b.get(mem.id) == a.get(mem.id)
    assert reads == [], f"{len(reads)} earlier writes read"


def test_random_writes_with_a_checkpoint_every_two_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The random test again with fold checkpoints every two writes (16 in use), so that
    writes arriving before later ones refold from checkpoints in every example."""
    from subcog_crdt._core import document

    monkeypatch.setattr(document, "_MARK_EVERY", 2)
    test_random_writes_converge_and_lose_nothing()


def test_a_write_arriving_before_later_ones_refolds_from_a_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two nodes updating one memory at once: nearly every write from the other node
    lands before the latest one here. That refolded the memory's whole history (120 ms at
    4000 writes); now it reads at most the writes since the last checkpoint."""
    world, a, b, mem = _status_history(1000)
    # b writes, then a writes later by clock; a then receives b's (earlier) write.
    world.clock[0] += 1
    _, from_b = b.update("s2", mem.id, {"status": "from b"})
    update_b = b.take_outbox()[-1]
    world.clock[0] += 1
    a.update("s1", mem.id, {"content": "status: a wins"})
    reads = _count_reads(monkeypatch, a)
    events = a.apply_update(update_b)
    got = a.get(mem.id)
    assert len(reads) <= 16 + 2, f"{len(reads)} writes read"
    assert [e.write_id for e in events] == [from_b[0].write_id]
    assert (got.content, got.status, got.version) == ("status: a wins", "from b", 1003)
    assert got == fold("decisions", a.writes(mem.id))
