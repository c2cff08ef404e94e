"""Review of the hybrid logical clock and everything ordered by it (DESIGN "Conflict
handling": the later write by HLC wins, ties by session id; deletes ordered by the same
clock): wall clocks stepping back while running and across restarts, peers ahead of us,
hostile stamps, identical stamps, counters full within one millisecond."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest

from subcog_crdt import ConversationsApi
from subcog_crdt._core import hlc as hlc_module
from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.events import Conflict, Deleted, Event
from subcog_crdt._core.hlc import MAX_DRIFT_MS
from subcog_crdt._core.schema import encode_write, write_key
from subcog_crdt._errors import ConflictError
from support.coredocs import NOW
from support.coredocs import core_doc as _doc
from support.coredocs import foreign_update as _inject
from support.coredocs import send as _send
from support.coredocs import stamp as _stamp

END_OF_TIME = "9999999999999ffffff"


def _conflicts(events: list[Event]) -> list[Conflict]:
    return [e for e in events if isinstance(e, Conflict)]


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The wall clock of every ``ConversationsApi`` made in the test (ms), patched in the
    hlc module only."""
    now = [NOW]
    fake = SimpleNamespace(time_ns=lambda: now[0] * 1_000_000)
    monkeypatch.setattr(hlc_module, "time", fake)
    return now


def _durable(path: Path) -> ConversationsApi:
    return ConversationsApi(data_dir=path, listen=False, discovery=())


async def _inject_api(api: ConversationsApi, ns: str, entries: dict[str, str]) -> None:
    """Apply and persist raw entries as a peer's update would be (``_apply_remote``
    followed by the commit its caller makes)."""
    doc = api._ensure_doc(ns)
    events = doc.apply_update(_inject(doc, entries))
    await api._persist([api._propagate(doc, events)])


# -- the local clock stepping back ----------------------------------------------------


async def test_a_restart_resumes_after_the_stamps_it_issued_though_the_wall_went_back(
    tmp_path: Path, wall: list[int]
) -> None:
    """NTP moves the wall clock back 10 minutes between two runs: the first stamp after
    the restart still sorts after every stamp of the first run (the clock resumes from
    the stored stamps), for a new memory as for an existing one."""
    async with _durable(tmp_path) as api:
        s = await api.register_session("s1")
        first = await s.capture("d", "first run fact")
        wall[0] += 1
        last = await s.capture("d", "first run, last fact")
    wall[0] = NOW - 10 * 60 * 1000
    async with _durable(tmp_path) as api:
        s = await api.register_session("s1")
        fresh = await s.capture("d", "second run fact")
        updated = await s.update(first.id, status="done")
    assert first.clock < last.clock < fresh.clock < updated.clock
    assert updated.status == "done"


async def test_the_wall_going_back_while_running_never_reorders_writes(
    tmp_path: Path, wall: list[int]
) -> None:
    """The wall clock steps back 12 minutes again and again mid-run: every later write,
    to a new memory or an existing one, still gets a larger stamp, so the newest update
    is the value everyone sees."""
    async with _durable(tmp_path) as api:
        s = await api.register_session("s1")
        m = await s.capture("d", "stepping fact")
        stamps = [m.clock]
        for i in range(5):
            wall[0] -= 12 * 60 * 1000
            stamps.append((await s.capture("d", f"fact number {i}")).clock)
            stamps.append((await s.update(m.id, status=f"v{i}")).clock)
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        assert api.get(m.id).status == "v4"


async def test_a_restarted_node_follows_no_stamp_its_running_self_ignored(
    tmp_path: Path, wall: list[int]
) -> None:
    """Was a bug. Entries that do not decode (a key of another shape, a value that is not a
    write) are ignored by every node, and a running node's clock does not follow their
    stamps. ``NamespaceDoc.load`` takes ``max_stamp`` from raw keys (any key with a valid
    stamp at characters 21-40), so a restarted node jumps its clock to a junk entry's
    stamp (here 30 minutes ahead): it then stamps differently from the running node."""
    ahead = _stamp(NOW + 30 * 60 * 1000)
    async with _durable(tmp_path) as api:
        s = await api.register_session("s1")
        m = await s.capture("d", "a fact")
        junk = {
            f"{m.id}/{ahead}/bad session!/ee": encode_write("update", "", {"status": "x"}),
            f"{m.id}/{ahead}0/s/ee": encode_write("update", "", {"status": "x"}),
            f"{m.id}/{ahead}/s/ee": "not a write",
            f"{'z' * 20}/{ahead}/s/ee": "x",
        }
        await _inject_api(api, "d", junk)
        running = await s.capture("d", "written while running")
        assert running.clock < ahead  # the running node ignored the junk
    async with _durable(tmp_path) as api:
        s = await api.register_session("s1")
        restarted = await s.capture("d", "written after the restart")
    assert restarted.clock < ahead, "the restarted node followed a junk entry's stamp"


async def test_a_far_future_entry_does_not_stop_a_restart_resuming_after_own_stamps(
    tmp_path: Path, wall: list[int]
) -> None:
    """Was a bug. The store holds one write from a peer two hours fast (beyond MAX_DRIFT_MS);
    the wall clock then steps back 10 minutes between runs. ``load`` keeps only the
    largest stamp, the peer's, which ``Hlc.observe`` refuses as too far ahead, so the
    clock does not resume after this node's own stamps: it issues stamps smaller than
    ones it issued before (without that entry it resumes correctly, see above)."""
    async with _durable(tmp_path) as api:
        s = await api.register_session("s1")
        other = await s.capture("d", "the peer's fact")
        far = _stamp(NOW + 2 * 3600 * 1000)
        await _inject_api(
            api, "d", {write_key(other.id, far, "peer", "ee"): encode_write("update", "", {})}
        )
        wall[0] += 1
        mine = await s.capture("d", "my last fact of the first run")
    wall[0] = NOW - 10 * 60 * 1000
    async with _durable(tmp_path) as api:
        s = await api.register_session("s1")
        fresh = await s.capture("d", "my first fact of the second run")
    assert fresh.clock > mine.clock, "the restarted node issued a stamp below its own"


# -- peers ahead of us ----------------------------------------------------------------


def test_a_peer_ahead_within_the_drift_bound_pulls_our_clock() -> None:
    """A peer 30 minutes fast: once we saw its write, our writes to any memory sort
    after it (the clock follows), so a write made after seeing another wins as users
    expect."""
    a = _doc("aa", lambda: NOW)
    b = _doc("bb", lambda: NOW + 30 * 60 * 1000)
    m, _ = a.capture("sa", "shared fact", {})
    _send(a, b)
    theirs, _ = b.update("sb", m.id, {"content": "peer wording"})
    _send(b, a)
    mine, events = a.update("sa", m.id, {"content": "my wording"})
    other, _ = a.capture("sa", "an unrelated fact", {})
    assert theirs.clock < mine.clock and theirs.clock < other.clock
    assert not _conflicts(events)  # we had seen it: not concurrent
    _send(a, b)
    assert a.get(m.id) == b.get(m.id) and b.get(m.id).content == "my wording"


def test_a_peer_beyond_the_drift_bound_does_not_drag_our_clock() -> None:
    """A peer two hours fast: our clock does not follow it (new memories keep our own
    time), but a write to the memory it wrote still sorts after its write."""
    a = _doc("aa", lambda: NOW)
    b = _doc("bb", lambda: NOW + MAX_DRIFT_MS + 3_600_000)
    m, _ = a.capture("sa", "shared fact", {})
    _send(a, b)
    theirs, _ = b.update("sb", m.id, {"status": "peer"})
    _send(b, a)
    other, _ = a.capture("sa", "an unrelated fact", {})
    assert other.clock[:13] == f"{NOW:013d}"
    mine, _ = a.update("sa", m.id, {"status": "mine"})
    assert mine.clock > theirs.clock and mine.clock[:13] == theirs.clock[:13]
    _send(a, b)
    assert a.get(m.id) == b.get(m.id) and b.get(m.id).status == "mine"


# -- hostile stamps -------------------------------------------------------------------


def _end_of_time_writes() -> tuple[NamespaceDoc, str, str]:
    """A node holding a deleted and a live memory, each with a hostile write stamped at
    the end of time (a delete, and an update of tags only)."""
    a = _doc("aa", lambda: NOW)
    gone, _ = a.capture("sa", "a deleted fact", {})
    live, _ = a.capture("sa", "a live fact", {})
    a.apply_update(
        _inject(
            a,
            {
                write_key(gone.id, END_OF_TIME, "evil", "ee"): encode_write("delete", "", {}),
                write_key(live.id, END_OF_TIME, "evil", "ee"): encode_write(
                    "update", "", {"tags": ["evil"]}
                ),
            },
        )
    )
    return a, gone.id, live.id


def test_an_end_of_time_delete_does_not_block_capturing_the_fact_again() -> None:
    """Was a bug. A hostile delete stamped at the end of time: updating is refused with
    "capture the content anew", but capturing that content again is refused the same way
    (the capture revives that very memory): the fact can never be captured again here."""
    a, gone, _ = _end_of_time_writes()
    assert a.get(gone).deleted
    again, _ = a.capture("sb", "A deleted fact", {})
    assert not again.deleted and again.content == "A deleted fact"


def test_an_end_of_time_update_does_not_block_another_session_capturing_the_fact() -> None:
    """Was a bug. A hostile tags-only update stamped at the end of time on a live memory: a
    capture of the same fact by another session (which would only add it to
    ``captured_by``) is refused with ConflictError, whose advice ("capture the content
    anew") is what the caller just did."""
    a, _, live = _end_of_time_writes()
    with pytest.raises(ConflictError, match="capture the content anew"):
        a.update("sa", live, {"status": "x"})
    claimed, _ = a.capture("sb", "a live fact", {})  # here or in a fresh memory
    assert not claimed.deleted and claimed.content == "a live fact"
    assert "sb" in claimed.captured_by


def test_an_entry_stamped_far_ahead_but_not_at_the_end_of_time_stays_writable() -> None:
    """A hostile update stamped in the year 2286 (beyond any drift bound): later local
    writes to that memory still win over it, and the node's clock is not dragged there."""
    a = _doc("aa", lambda: NOW)
    m, _ = a.capture("sa", "fact", {})
    far = "9999999999999000000"
    a.apply_update(
        _inject(
            a, {write_key(m.id, far, "evil", "ee"): encode_write("update", "", {"status": "evil"})}
        )
    )
    assert a.get(m.id).status == "evil"
    mem, _ = a.update("sa", m.id, {"status": "mine"})
    assert mem.status == "mine" and mem.clock == "9999999999999000001"
    assert a.capture("sa", "another fact", {})[0].clock[:13] == f"{NOW:013d}"


@pytest.mark.parametrize(
    "stamp",
    [
        "1800001800000ABCDEF",  # upper-case hex
        "18000018000000000g0",  # a non-hex counter digit
        "1800001800000" + "\u0660" * 6,  # other scripts' digits
        "180000180000000000",  # one short
    ],
)
def test_hostile_stamps_are_ignored_by_running_and_restarted_nodes_alike(stamp: str) -> None:
    """Keys whose stamp is not 13 ASCII digits + 6 lower-case hex: no write on either node,
    and neither clock moves."""
    running = _doc("aa", lambda: NOW)
    m, _ = running.capture("sa", "fact", {})
    key = f"{m.id}/{stamp}/evil/ee"
    running.apply_update(_inject(running, {key: encode_write("update", "", {"status": "x"})}))
    restarted = _doc("bb", lambda: NOW)
    restarted.load([running.diff()])
    for d in (running, restarted):
        assert [w.key for w in d.writes(m.id)] == [m.id + "/" + m.clock + "/sa/aa"]
        assert d.get(m.id).status is None
    assert restarted.max_stamp == m.clock
    assert running.capture("sa", "next", {})[0].clock[:13] == f"{NOW:013d}"


# -- ordering: equal stamps, deletes, revives -----------------------------------------


def _two_at_the_same_instant() -> tuple[NamespaceDoc, NamespaceDoc, str]:
    a, b = _doc("aa", lambda: NOW), _doc("bb", lambda: NOW)
    m, _ = a.capture("sa", "shared fact", {})
    _send(a, b)
    return a, b, m.id


def test_a_conflict_with_a_delete_names_the_write_that_took_effect() -> None:
    """Was a bug. A delete and a concurrent update stamped after it: the fold keeps the memory
    deleted (an update never revives), yet the Conflict event on both nodes says the
    update won and the delete lost (``find_conflicts`` picks the winner by order alone)."""
    a, b, mid = _two_at_the_same_instant()
    a.delete("sa", mid)
    b.update("sb", mid, {"status": "kept?"})  # the same stamp; "sb" > "sa": sorts after
    events = _send(b, a) + _send(a, b)
    assert a.get(mid) == b.get(mid) and a.get(mid).deleted
    conflicts = _conflicts(events)
    assert len(conflicts) == 2  # one per node
    for c in conflicts:
        assert (c.winner.op, c.loser.op) == ("delete", "update"), "winner did not take effect"


def test_a_delete_and_an_update_at_one_stamp_converge_on_every_node() -> None:
    """Equal stamps (same millisecond, counter 0), ordered by session id either way: the
    memory ends deleted on both nodes, each raises one Updated, one Deleted and one
    Conflict naming both writes."""
    for deleter, updater in (("sa", "sb"), ("sb", "sa")):
        a, b, mid = _two_at_the_same_instant()
        _, ea = a.delete(deleter, mid)
        _, eb = b.update(updater, mid, {"status": "x"})
        assert ea[0].write_id.split("/")[1] == eb[0].write_id.split("/")[1]
        ra, rb = _send(b, a), _send(a, b)
        assert a.get(mid) == b.get(mid) and a.get(mid).deleted
        for own, received in ((ea, ra), (eb, rb)):
            kinds = sorted(type(e).__name__ for e in own + received)
            assert kinds == ["Conflict", "Deleted", "Updated"]
            (c,) = _conflicts(own + received)
            assert {c.winner.op, c.loser.op} == {"delete", "update"}


def test_identical_stamps_from_two_nodes_still_raise_the_conflict() -> None:
    """Two nodes can make the same stamp. B saw C's write but not A's, stamped alike:
    with ``base`` alone B's write counted as having seen A's, and A's content lost
    without a Conflict event (a documented limit until writes recorded ``seen`` per
    node). Now every node raises it; the later write wins everywhere and the loser
    stays in the history."""
    clock = [NOW]
    a, b, c = (_doc(n, lambda: clock[0]) for n in ("aa", "bb", "cc"))
    m, _ = a.capture("sa", "shared fact", {})
    _send(a, b)
    _send(a, c)
    clock[0] += 1
    loser, _ = a.update("sa", m.id, {"content": "A wording"})
    seen, _ = c.update("sc", m.id, {"tags": ["t"]})
    assert loser.clock == seen.clock  # the same millisecond, counter 0
    _send(c, b)
    clock[0] += 1
    winner, _ = b.update("sb", m.id, {"content": "B wording"})  # base: that stamp
    events: list[Event] = []
    for _ in range(2):
        for x in (a, b, c):
            for y in (a, b, c):
                if x is not y:
                    events += _send(x, y)
    won = next(w.key for w in b.writes(m.id) if w.at == winner.clock)
    lost = next(w.key for w in a.writes(m.id) if w.at == loser.clock and w.node == "aa")
    assert {(c.winner.key, c.loser.key, c.fields) for c in _conflicts(events)} == {
        (won, lost, ("content",))
    }
    for d in (a, b, c):
        assert d.get(m.id).content == "B wording" and d.get(m.id).clock == winner.clock
        assert [w.at for w in d.writes(m.id)].count(loser.clock) == 2  # kept in history


def test_a_concurrent_update_behind_a_third_writers_base_raises_a_conflict() -> None:
    """Was a limit of ``base`` alone (writes now record ``seen`` per node). A updates the content at
    T+10; C sets tags at T+15; B, having seen C's write but not A's, sets the content at
    T+20. A and B wrote concurrently, A's content is lost, and no node raises a Conflict:
    B's ``base`` (T+15) is above A's stamp, so ``find_conflicts`` takes A's write as seen.
    No clock skew, no equal stamps: any write delivered late behind a later one."""
    clock = [NOW]
    a, b, c = (_doc(n, lambda: clock[0]) for n in ("aa", "bb", "cc"))
    m, _ = a.capture("sa", "shared fact", {})
    _send(a, b)
    _send(a, c)
    clock[0] += 10
    a.update("sa", m.id, {"content": "A wording"})
    clock[0] += 5
    c.update("sc", m.id, {"tags": ["t"]})
    _send(c, b)
    clock[0] += 5
    b.update("sb", m.id, {"content": "B wording"})
    events: list[Event] = []
    for _ in range(2):
        for x in (a, b, c):
            for y in (a, b, c):
                if x is not y:
                    events += _send(x, y)
    assert {d.get(m.id).content for d in (a, b, c)} == {"B wording"}
    lost = [e for e in _conflicts(events) if e.loser.changes.get("content") == "A wording"]
    assert lost, "A's concurrent content update was overwritten without a Conflict event"


def _first(values: list[int]) -> int:
    return values[0]


def test_a_capture_racing_a_delete_is_ordered_by_the_clock() -> None:
    """A deletes while B, not having seen it, captures the same fact: stamped after the
    delete the capture revives the memory, stamped before it the memory stays deleted;
    both nodes agree either way, and a capture raises no Conflict."""
    for capture_later in (True, False):
        wa = [NOW]
        wb = [NOW]
        a, b = _doc("aa", functools.partial(_first, wa)), _doc("bb", functools.partial(_first, wb))
        m, _ = a.capture("sa", "racing fact", {"tags": ["x"]})
        _send(a, b)
        wa[0] = NOW + 10
        wb[0] = NOW + (20 if capture_later else 5)
        a.delete("sa", m.id)
        again, _ = b.capture("sb", "Racing fact", {})
        assert again.id == m.id
        events = _send(b, a) + _send(a, b)
        assert a.get(m.id) == b.get(m.id)
        assert a.get(m.id).deleted is (not capture_later)
        assert set(a.get(m.id).captured_by) == {"sa", "sb"}
        assert not _conflicts(events)
        assert any(isinstance(e, Deleted) for e in events)


# -- many writes within one millisecond -----------------------------------------------


def test_a_full_counter_within_one_millisecond_keeps_write_order() -> None:
    """The clock is frozen and a peer's stamp has filled the counter: our writes (new
    memories and updates alike) carry on into the next millisecond, strictly increasing,
    and the last update wins."""
    a, b = _doc("aa", lambda: NOW), _doc("bb", lambda: NOW)
    m, _ = a.capture("sa", "busy fact", {})
    _send(a, b)
    b._hlc.observe(_stamp(NOW, 0xFFFFFD))
    stamps = []
    for i in range(3):
        stamps.append(b.capture("sb", f"new fact {i}", {})[0].clock)
        stamps.append(b.update("sb", m.id, {"status": f"v{i}"})[0].clock)
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert stamps[:3] == [_stamp(NOW, 0xFFFFFE), _stamp(NOW, 0xFFFFFF), _stamp(NOW + 1, 0)]
    _send(b, a)
    assert a.get(m.id) == b.get(m.id) and a.get(m.id).status == "v2"
