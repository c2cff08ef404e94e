"""Bad arguments raise InvalidArgument (a SubcogError) and change nothing: no memory, no
namespace, no event, no journal record, here or on a peer. Also: what counts as a
session's "own" events, and a subscriber that fails cannot fail someone else's write."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from helpers import link, wait_for
from subcog_crdt import (
    Captured,
    ConversationsApi,
    InvalidArgument,
    InvalidNamespace,
    Retention,
    Session,
    SubcogError,
)
from subcog_crdt import _sessions as sessions_module
from subcog_crdt._bus import Subscription
from subcog_crdt._core.schema import MAX_CONTENT, MAX_ENTRY, encode_write

NS = "ns"
BARRIER = "barrier"


def node(**kw: Any) -> ConversationsApi:
    return ConversationsApi(listen=False, discovery=(), **kw)


@dataclass
class Pair:
    """Two linked in-memory nodes, a session on each, and a live feed of every event
    (own ones included) on each."""

    a: ConversationsApi
    b: ConversationsApi
    sa: Session
    sb: Session
    ea: Subscription
    eb: Subscription
    barriers: int = 0

    def state(self) -> list[Any]:
        """Everything a bad call must leave alone, on both nodes (the barrier aside)."""
        out = []
        for n in (self.a, self.b):
            names = [ns for ns in n.namespaces() if ns != BARRIER]
            out.append(
                (
                    names,
                    {ns: n.state_hash(ns) for ns in names},
                    {ns: n.memories(ns, include_deleted=True) for ns in names},
                    sorted((s.id, s.node_id, s.subscriptions) for s in n.sessions.list()),
                )
            )
        return out

    async def settle(self) -> None:
        """Return once b has everything a sent before now: links are FIFO, so once a
        later capture arrived, whatever a bad call might have sent has too."""
        self.barriers += 1
        m = await self.sa.capture(BARRIER, f"barrier {self.barriers}")
        await wait_for(lambda: self._has(m.id), what="the barrier reaches b")

    def _has(self, mid: str) -> bool:
        try:
            self.b.get(mid)
        except SubcogError:
            return False
        return True

    def no_events(self) -> None:
        assert self.ea.get_nowait() is None
        assert self.eb.get_nowait() is None

    def drain(self) -> None:
        while self.ea.get_nowait() is not None:
            pass
        while self.eb.get_nowait() is not None:
            pass


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    async with node() as a, node() as b:
        link(a, b)
        sa = await a.register_session("sa", subscribe=[NS])
        sb = await b.register_session("sb", subscribe=[NS])
        await wait_for(lambda: len(b.sessions.list()) == 2, what="b sees sa")
        p = Pair(a, b, sa, sb, sa.events(include_own=True), sb.events(include_own=True))
        await p.settle()
        yield p


async def _call(call: Callable[[], Any]) -> Any:
    result = call()
    return await result if hasattr(result, "__await__") else result


async def expect_nothing_changed(p: Pair, call: Callable[[], Any]) -> None:
    before = p.state()
    cursor = (await p.sa.sync(since=0, include_own=True)).cursor
    with pytest.raises(InvalidArgument):
        await _call(call)
    await p.settle()
    assert p.state() == before
    p.no_events()
    # no journal record: nothing in the session's namespaces after the cursor
    batch = await p.sa.sync(since=cursor, include_own=True)
    assert batch.events == []


# -- 1. a str where a collection of names is expected ---------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"private_namespaces": "secret"},
        {"sync_namespaces": "decisions"},
        {"peers": "ws://127.0.0.1:9"},
        {"mdns_interfaces": "eth0"},
        {"private_namespaces": None},
        {"sync_namespaces": 5},
        {"user_id": 5},
        {"user_id": "bad \udc80"},
    ],
)
def test_constructor_refuses_a_str_for_a_collection(kw):
    with pytest.raises(InvalidArgument):
        ConversationsApi(listen=False, **kw)


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"data_dir": 123}, "data_dir"),
        ({"discovery_dir": 5}, "discovery_dir"),
        ({"host": 5}, "host"),
        ({"advertise_host": 5}, "advertise_host"),
        ({"mesh_secret": 5}, "mesh_secret"),
        ({"listen": "no"}, "listen"),
        ({"retention": 5}, "retention"),
        ({"heartbeat": "x"}, "heartbeat"),
        ({"heartbeat": -1}, "heartbeat"),
        ({"heartbeat": True}, "heartbeat"),
        ({"max_frame": "big"}, "max_frame"),
        ({"max_frame": 10}, "max_frame"),
        ({"ssl": 5}, "ssl"),
        ({"client_ssl": "x"}, "client_ssl"),
    ],
)
def test_constructor_names_a_wrongly_typed_argument(kw: dict[str, Any], named: str) -> None:
    """Refused at construction, naming the argument: these used to pass and fail later
    (at open, at the first write, at a dial) with a TypeError or AttributeError."""
    with pytest.raises(InvalidArgument, match=named):
        ConversationsApi(discovery=(), **kw)


@pytest.mark.parametrize(
    "kw",
    [{"max_events": 0}, {"max_events": -1}, {"max_events": "x"}, {"max_age": 0}, {"max_age": "x"}],
)
def test_retention_is_checked_when_made(kw: dict[str, Any]) -> None:
    """A bad retention failed at the first write (IndexError, TypeError) or made a durable
    node refuse writes."""
    with pytest.raises(InvalidArgument, match="Retention"):
        Retention(**kw)


# -- 2. content within its limit whose entry would be too long ------------------------


def _dense(n: int) -> str:
    """n characters that JSON escapes to 6 each (but the first)."""
    return "x" + "\x01" * (n - 1)


async def test_content_whose_entry_exceeds_the_limit_is_refused(pair):
    content = _dense(MAX_CONTENT)  # within the character limit
    await expect_nothing_changed(pair, lambda: pair.sa.capture(NS, content))
    await expect_nothing_changed(pair, lambda: pair.sa.capture("fresh", content))
    await expect_nothing_changed(pair, lambda: pair.sa.capture_many(NS, ["ok", content]))
    m = await pair.sa.capture(NS, "small")
    await pair.settle()
    assert pair.ea.get_nowait() is not None and pair.eb.get_nowait() is not None
    await expect_nothing_changed(pair, lambda: pair.sa.update(m.id, content=content))
    assert pair.a.get(m.id).version == 1


async def test_the_longest_accepted_entry_is_read_back_everywhere(pair):
    # The largest dense content whose entry, as the longest op with a base, fits
    # (Session.capture always sends tags, [] here).
    def size(content: str) -> int:
        return len(encode_write("capture", "0" * 19, {"content": content, "tags": []}))

    n = (MAX_ENTRY - size("x")) // 6 + 1
    assert size(_dense(n)) <= MAX_ENTRY < size(_dense(n + 1))
    m = await pair.sa.capture(NS, _dense(n))
    assert pair.a.get(m.id).content == _dense(n)
    await pair.settle()
    assert pair.b.get(m.id).content == _dense(n)
    with pytest.raises(InvalidArgument):
        await pair.sa.capture(NS, _dense(n + 1))
    # plain text at the character limit is far below the entry limit
    big = await pair.sa.capture(NS, "y" * MAX_CONTENT)
    await pair.settle()
    assert pair.b.get(big.id).content == "y" * MAX_CONTENT


# -- 3. text UTF-8 cannot encode (lone surrogates) -------------------------------------

BAD = "bad \udc80 text"

SURROGATE_CAPTURES = {
    "content": {"content": BAD},
    "tag": {"content": "c1", "tags": ["fine", BAD]},
    "metadata value": {"content": "c2", "metadata": {"k": BAD}},
    "metadata key": {"content": "c3", "metadata": {BAD: 1}},
    "nested metadata": {"content": "c4", "metadata": {"a": [{"b": {"c": BAD}}]}},
    "domain": {"content": "c5", "domain": BAD},
    "status": {"content": "c6", "status": BAD},
    "source": {"content": "c7", "source": BAD},
    "expires_at": {"content": "c8", "expires_at": "2030-01-01T00:00:00+00:00" + BAD},
}


@pytest.mark.parametrize("item", SURROGATE_CAPTURES.values(), ids=SURROGATE_CAPTURES.keys())
async def test_lone_surrogate_anywhere_is_refused(pair, item):
    fields = dict(item)
    content = fields.pop("content")
    await expect_nothing_changed(pair, lambda: pair.sa.capture(NS, content, **fields))
    await expect_nothing_changed(pair, lambda: pair.sa.capture("fresh", content, **fields))
    # in a batch: the good items before it are not written either
    await expect_nothing_changed(
        pair, lambda: pair.sa.capture_many(NS, ["first item", "second item", item])
    )
    m = await pair.sa.capture(NS, "target")
    await pair.settle()
    pair.drain()
    update = fields or {"content": content}
    await expect_nothing_changed(pair, lambda: pair.sa.update(m.id, **update))


async def test_bad_batch_item_writes_none_of_the_batch_and_valid_text_is_kept(pair):
    # the reviewer's case: the first item used to be written and sent, with no event
    bad = {"content": "second", "tags": ["\udc80"]}
    await expect_nothing_changed(pair, lambda: pair.sa.capture_many(NS, ["first item", bad]))
    assert pair.a.memories(NS) == [] and pair.b.memories(NS) == []
    # text that is valid Unicode, however far from ASCII, is accepted
    m = await pair.sa.capture(
        NS, "naïve café 😀", tags=["日本"], metadata={"ключ": "значение"}, domain="ü"
    )
    await pair.settle()
    got = pair.b.get(m.id)
    assert (got.content, got.tags, dict(got.metadata)) == (
        "naïve café 😀",
        ("日本",),
        {"ключ": "значение"},
    )


# -- 4. update with None for content or tags -------------------------------------------


@pytest.mark.parametrize(
    "fields", [{"content": None}, {"tags": None}, {"content": None, "tags": []}]
)
async def test_update_with_none_is_refused(pair, fields):
    m = await pair.sa.capture(NS, "hello world")
    await pair.settle()
    pair.drain()
    await expect_nothing_changed(pair, lambda: pair.sa.update(m.id, **fields))
    assert pair.a.get(m.id).version == 1
    assert len(pair.a.history(m.id)) == 1


# -- 5. a failed capture creates no namespace ------------------------------------------


NEW_NS_CALLS: dict[str, Callable[[Session], Any]] = {
    "content 123": lambda s: s.capture("brand-new", 123),
    "blank content": lambda s: s.capture("brand-new", "   "),
    "tag 5": lambda s: s.capture("brand-new", "x", tags=[5]),  # type: ignore[list-item]
    "metadata object": lambda s: s.capture("brand-new", "x", metadata={"k": object()}),
    "batch content 5": lambda s: s.capture_many("brand-new", [{"content": 5}]),
    "batch unknown field": lambda s: s.capture_many("brand-new", ["ok", {"content": "x", "x": 1}]),
}


@pytest.mark.parametrize("call", NEW_NS_CALLS.values(), ids=NEW_NS_CALLS.keys())
async def test_failed_capture_into_a_new_namespace_creates_nothing(pair, call):
    await expect_nothing_changed(pair, lambda: call(pair.sa))
    assert "brand-new" not in pair.a.namespaces() + pair.b.namespaces()


async def test_empty_batch_into_a_new_namespace_creates_nothing(pair):
    assert await pair.sa.capture_many("brand-new", []) == []
    await pair.settle()
    assert "brand-new" not in pair.a.namespaces() + pair.b.namespaces()


# -- 6. events(maxsize=...) and subscribers that fail ----------------------------------


@pytest.mark.parametrize("maxsize", ["big", 0, -1, True, 2.5, None])
async def test_events_maxsize_is_checked(pair, maxsize):
    await expect_nothing_changed(pair, lambda: pair.sb.events(maxsize=maxsize))
    assert len(pair.a._bus._subs) == 1 and len(pair.b._bus._subs) == 1


async def test_a_failing_subscriber_cannot_fail_another_sessions_write(tmp_path, caplog):
    async with node(data_dir=tmp_path) as api:
        s1 = await api.register_session("s1", subscribe=[NS])
        s2 = await api.register_session("s2", subscribe=[NS])
        # its filter raises (kept: the bus holds streams weakly)
        bad = api._bus.subscribe(lambda ev: 1 / 0)  # type: ignore[return-value]
        healthy = s2.events()
        with caplog.at_level(logging.ERROR, logger="subcog_crdt._bus"):
            m = await s1.capture(NS, "fact")
        assert "subscriber failed" in caplog.text
        ev = healthy.get_nowait()
        assert isinstance(ev, Captured) and ev.memory.id == m.id
        batch = await s2.sync(since=0)
        assert [e.memory.id for e in batch.events if isinstance(e, Captured)] == [m.id]
        assert not bad._queue  # the event was skipped for it alone
    async with node(data_dir=tmp_path) as api:  # and it was persisted
        assert api.get(m.id).content == "fact"
        s2 = await api.register_session("s2", subscribe=[NS])
        assert len((await s2.sync(since=0)).events) == 1


# -- 7. wrong types raise InvalidArgument, never a raw TypeError -----------------------

BAD_CALLS: dict[str, Callable[[Pair], Any]] = {
    "register subscribe=5": lambda p: p.a.register_session("s3", subscribe=5),
    "register user_id=5": lambda p: p.a.register_session("s4", user_id=5),
    "unregister ['x']": lambda p: p.a.unregister_session(["x"]),
    "capture tags=None": lambda p: p.sa.capture(NS, "x", tags=None),
    "capture tags=5": lambda p: p.sa.capture(NS, "x", tags=5),
    "capture namespace list": lambda p: p.sa.capture([NS], "x"),
    "capture_many namespace list": lambda p: p.sa.capture_many([NS], ["x"]),
    "capture_many None": lambda p: p.sa.capture_many(NS, None),
    "capture_many str": lambda p: p.sa.capture_many(NS, "hello"),
    "capture_many dict": lambda p: p.sa.capture_many(NS, {"content": "x"}),
    "capture_many 5": lambda p: p.sa.capture_many(NS, 5),
    "recall tags=[['a']]": lambda p: p.a.recall("x", tags=[["a"]]),  # type: ignore[list-item]
    "recall tags=None": lambda p: p.a.recall("x", tags=None),
    "recall tags='db'": lambda p: p.a.recall("hello", tags="db"),
    "recall namespaces='ns'": lambda p: p.a.recall("hello", namespaces=NS),
    "recall limit=True": lambda p: p.a.recall("hello", limit=True),
    "session recall tags=None": lambda p: p.sa.recall("x", tags=None),
    "session recall tags='db'": lambda p: p.sa.recall("x", tags="db"),
    "sessions.get list": lambda p: p.a.sessions.get(["x"]),
    "sessions.local list": lambda p: p.a.sessions.local(["x"]),
    "sync limit=True": lambda p: p.sa.sync(limit=True),
    "sync include_own='yes'": lambda p: p.sa.sync(include_own="yes"),
    "events include_own=1": lambda p: p.sa.events(include_own=1),
    "recall namespace and namespaces": lambda p: p.a.recall("x", namespace=NS, namespaces=[NS]),
    "recall a blank tag": lambda p: p.a.recall("x", tags=["  "]),
    "sync since a cursor ahead": lambda p: p.sa.sync(since=10**6),
    "re-register as another user": lambda p: p.a.register_session(p.sa.id, user_id="mallory"),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
async def test_wrong_types_raise_invalid_argument(pair, call):
    await pair.sa.capture(NS, "hello world", tags=["db"])
    await pair.settle()
    pair.drain()
    await expect_nothing_changed(pair, lambda: call(pair))


@pytest.mark.parametrize("version", ["1", True, 1.0, [1]])
@pytest.mark.parametrize("op", ["update", "delete"])
async def test_expected_version_of_a_wrong_type_is_invalid_not_a_conflict(pair, op, version):
    m = await pair.sa.capture(NS, "fact")
    await pair.settle()
    pair.drain()
    if op == "update":
        call = lambda: pair.sa.update(m.id, content="y", expected_version=version)  # noqa: E731
    else:
        call = lambda: pair.sa.delete(m.id, expected_version=version)  # noqa: E731
    await expect_nothing_changed(pair, call)
    assert pair.a.get(m.id).version == 1


async def test_namespace_list_is_invalid_namespace(pair):
    with pytest.raises(InvalidNamespace):
        await pair.sa.capture([NS], "x")
    with pytest.raises(InvalidNamespace):
        pair.sa.recall("x", namespace=5)


# -- 8. a session of the same name on another node is someone else ---------------------


async def test_same_session_name_on_two_nodes_are_different_sessions():
    async with node() as a, node() as b:
        link(a, b)
        sa = await a.register_session("agent", subscribe=[NS])
        sb = await b.register_session("agent", subscribe=[NS])
        eb = sb.events()
        ea = sa.events()
        m = await sa.capture(NS, "captured on node A")
        ev = await eb.next(10)
        assert isinstance(ev, Captured) and (ev.memory.id, ev.node_id) == (m.id, a.node_id)
        batch = await sb.sync(since=0)
        assert [e.write_id for e in batch.events] == [ev.write_id]
        # B's own write stays out of B's feed and sync, and reaches A's "agent"
        m2 = await sb.capture(NS, "captured on node B")
        ev2 = await ea.next(10)
        assert isinstance(ev2, Captured) and ev2.memory.id == m2.id
        assert ea.get_nowait() is None  # A's own capture was not in A's feed
        assert eb.get_nowait() is None
        assert [e.write_id for e in (await sb.sync(since=0)).events] == [ev.write_id]
        assert [e.write_id for e in (await sa.sync(since=0)).events] == [ev2.write_id]
        # captured_by lists session ids: both nodes' "agent" are one name there
        m3 = await sb.capture(NS, "captured on node A")
        assert m3.captured_by == ("agent",)


async def test_sync_pages_past_own_events_without_skipping_or_repeating():
    async with node() as a, node() as b:
        link(a, b)
        me = await a.register_session("agent", subscribe=[NS])
        other_local = await a.register_session("other", subscribe=[NS])
        twin = await b.register_session("agent", subscribe=[NS])  # same name, node b
        expected = []
        for i in range(6):
            for j in range(5):
                await me.capture(NS, f"own {i}.{j}")
            m = await other_local.capture(NS, f"local other {i}")
            expected.append(m.id)
            m = await twin.capture(NS, f"twin {i}")
            await wait_for(lambda m=m: any(x.id == m.id for x in a.memories(NS)))  # type: ignore[misc]
            expected.append(m.id)
        for j in range(4):
            await me.capture(NS, f"own tail {j}")
        for limit in (1, 2, 3, 5, 1000):
            got: list[str] = []
            cursor = 0
            while True:
                batch = await me.sync(since=cursor, limit=limit)
                assert len(batch.events) <= limit
                got.extend(e.memory.id for e in batch.events if isinstance(e, Captured))
                assert batch.more == (batch.cursor != a._committed_cursor)
                cursor = batch.cursor
                if not batch.more:
                    break
            assert got == expected, limit
        # "last" continues the same way, exactly once
        got = []
        while True:
            batch = await me.sync(limit=2)
            got.extend(e.memory.id for e in batch.events)
            if not batch.more:
                break
        assert got == expected
        assert (await me.sync()).events == []


# -- 9. naive datetimes: no time zone, no instant --------------------------------------

NAIVE = datetime(2030, 1, 1, 12, 0)


@pytest.mark.parametrize("expires_at", [NAIVE, "2030-01-01T12:00:00"], ids=["datetime", "str"])
async def test_a_naive_expires_at_is_refused_and_changes_nothing(pair, expires_at):
    """expires_at without a time zone names no instant (each node would read it in its
    own zone): refused on capture, batch and update, and nothing is written."""
    await expect_nothing_changed(pair, lambda: pair.sa.capture(NS, "x", expires_at=expires_at))
    await expect_nothing_changed(pair, lambda: pair.sa.capture("fresh", "x", expires_at=expires_at))
    await expect_nothing_changed(
        pair,
        lambda: pair.sa.capture_many(NS, ["ok", {"content": "x", "expires_at": expires_at}]),
    )
    m = await pair.sa.capture(NS, "target", expires_at=datetime(2030, 1, 1, tzinfo=UTC))
    await pair.settle()
    pair.drain()
    await expect_nothing_changed(pair, lambda: pair.sa.update(m.id, expires_at=expires_at))
    assert pair.b.get(m.id).expires_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert pair.a.get(m.id).version == 1


async def test_sync_since_a_naive_datetime_is_refused_and_moves_no_cursor(pair):
    """sync(since=<datetime>) compares with write times: a naive one is refused (not read
    in the local zone), and the refused call does not advance "last"."""
    other = await pair.a.register_session("other", subscribe=[NS])
    await pair.sa.sync()  # "last" is now
    m = await other.capture(NS, "written by another session")  # committed once returned
    last = pair.sa.last_cursor
    with pytest.raises(InvalidArgument, match="timezone"):
        await pair.sa.sync(since=NAIVE)
    with pytest.raises(InvalidArgument, match="timezone"):
        await pair.sa.sync(since=datetime(2000, 1, 1))
    assert pair.sa.last_cursor == last
    batch = await pair.sa.sync()
    assert [e.memory_id for e in batch.events] == [m.id]


# -- 9. the bounds that peers hold a node's session list to --------------------------------


async def test_a_session_past_the_nodes_bound_is_refused_and_nothing_changes(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peers refuse a session list longer than MAX_SESSIONS (or with more than
    MAX_SUBSCRIPTIONS subscriptions), so a node must not host more: registering past
    the bound is refused before anything changes, while registering a hosted session
    again still works."""
    monkeypatch.setattr(sessions_module, "MAX_SESSIONS", 1)  # A hosts sa
    await expect_nothing_changed(pair, lambda: pair.a.register_session("third", subscribe=[NS]))
    again = await pair.a.register_session("sa", subscribe=[NS, "other"])
    assert again is pair.sa and again.subscriptions == {NS, "other"}


async def test_subscriptions_past_the_nodes_bound_are_refused_and_nothing_changes(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions_module, "MAX_SUBSCRIPTIONS", 3)
    # sa holds NS: two more fit, three more do not; a new session counts the same way.
    await expect_nothing_changed(
        pair, lambda: pair.a.register_session("sa", subscribe=[NS, "x1", "x2", "x3"])
    )
    await expect_nothing_changed(
        pair, lambda: pair.a.register_session("s9", subscribe=["x1", "x2", "x3"])
    )
    await pair.a.register_session("sa", subscribe=["x1", "x2", "x3"])  # replaces: fits
    await pair.a.unregister_session("sa")
    s9 = await pair.a.register_session("s9", subscribe=["x1", "x2", "x3"])  # freed
    assert s9.subscriptions == {"x1", "x2", "x3"}
