"""Review 15: the guard's whole-message fast path (``_HandshakeGuard._take_whole``) and
``WebSocketLink.send_now``, probed with hostile frame streams and concurrent senders.

The guard is compared against aiohttp's reader alone (what the pump would deliver without
the fast path): the same messages, in the same order, the same end (close, refusal,
protocol error), for random frame streams cut at random points, with and without a mesh
secret. Once without sockets (the guard in front of aiohttp's own reader and queue, a
model of the pump), once over real loopback sockets against a link whose fast path is
switched off."""

from __future__ import annotations

import asyncio
import os
import random
import struct
from collections import deque
from typing import Any, cast

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import wait_for
from subcog_crdt._transport import auth
from subcog_crdt._transport.websocket import WebSocketLink, _HandshakeGuard
from transport.test_link_security import SECRET
from transport.test_take import Taker

DEADLINE = 20.0
TAG = auth.TAG_SIZE


# --------------------------------------------------------------------------- raw frames


def raw_frame(
    payload: bytes,
    *,
    opcode: int = 0x2,
    fin: bool = True,
    rsv: int = 0,
    key: bytes | None = None,
    enc: str = "min",
) -> bytes:
    """One frame as a hostile peer may write it: any RSV bits, masked with ``key`` or not,
    the length in its minimal encoding or in a longer one (``enc``: 16 or 64 bits)."""
    size = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if key is not None else 0
    if enc == "64" or size >= 65536:
        head = bytes([first, bit | 127]) + struct.pack(">Q", size)
    elif enc == "16" or size >= 126:
        head = bytes([first, bit | 126]) + struct.pack(">H", size)
    else:
        head = bytes([first, bit | size])
    if key is None:
        return head + payload
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


KINDS = [
    *["bin"] * 10,
    *["frag"] * 3,
    "nested",
    "nested",
    "ping",
    "pong",
    "text",
    "close",
    "rsv",
    "badop",
    "stray",
    "badfrag",
    "bigctl",
    "forged",
    "over",
]
"""What a stream item is, mostly messages ("nested": one whose payload is itself a
whole frame, for a guard that loses track of frame boundaries to take); from "text" on,
each ends the stream (the reader or the pump refuses it; "over" is a message just over
the link's limit; "badfrag": a whole message inside a fragmented one)."""

SIZES = [0, 1, 5, 5, 17, 17, 40, 125, 126, 127, 300, 65535, 65536, -1]
"""Wire payload sizes; -1: exactly the link's limit (max_frame + tag)."""

item = st.tuples(
    st.sampled_from(KINDS),
    st.sampled_from(SIZES),
    st.booleans(),  # masked
    st.sampled_from(["min", "min", "16", "64"]),
    st.integers(0, 2**32 - 1),  # seed for payload and mask key
)


def build(
    items: list[tuple[str, int, bool, str, int]],
    *,
    max_frame: int,
    seal: Any,
    welcome: bool,
) -> tuple[bytes, list[int]]:
    """The bytes of a stream of ``items`` (a hostile mix), sealed with ``seal`` if any,
    and where each frame starts."""
    limit = max_frame + (TAG if seal else 0)
    out = [raw_frame(b"welcome", key=b"\1\2\3\4")] if welcome else []
    for kind, size, is_masked, enc, seed in items:
        rng = random.Random(seed)
        key = rng.randbytes(4) if is_masked else None
        wire = limit if size < 0 else size
        if kind == "over":
            wire = limit + 1
        body = rng.randbytes(max(0, wire - (TAG if seal else 0)))
        message = seal(body) if seal and kind in ("bin", "frag", "over", "badfrag") else body
        if kind in ("bin", "over"):
            out.append(raw_frame(message, key=key, enc=enc))
        elif kind == "nested":
            inner = raw_frame(body[: rng.randrange(0, 60)], key=key)
            payload = seal(inner) if seal else inner
            out.append(raw_frame(payload, key=None if rng.random() < 0.5 else bytes(4), enc=enc))
        elif kind == "badfrag":
            out.append(raw_frame(message[:20], fin=False, key=key))
            out.append(raw_frame(message[20:40], key=key))
        elif kind == "frag":
            cut = rng.randrange(0, len(message) + 1)
            out.append(raw_frame(message[:cut], fin=False, key=key, enc=enc))
            if rng.random() < 0.5:
                out.append(raw_frame(b"p", opcode=0x9, key=key))
            out.append(raw_frame(message[cut:], opcode=0x0, key=key, enc=enc))
        elif kind in ("ping", "pong"):
            out.append(raw_frame(body[:125], opcode=0x9 if kind == "ping" else 0xA, key=key))
        elif kind == "text":
            out.append(raw_frame(b"text", opcode=0x1, key=key, enc=enc))
        elif kind == "close":
            out.append(raw_frame(struct.pack(">H", 1000) + b"bye", opcode=0x8, key=key))
        elif kind == "rsv":
            out.append(raw_frame(message[:200], rsv=rng.choice([1, 2, 4, 7]), key=key, enc=enc))
        elif kind == "badop":
            out.append(raw_frame(body[:50], opcode=rng.choice([3, 7, 0xB, 0xF]), key=key))
        elif kind == "stray":
            out.append(raw_frame(body[:50], opcode=0x0, key=key, enc=enc))
        elif kind == "bigctl":
            out.append(raw_frame(rng.randbytes(126), opcode=0x9, key=key, enc=enc))
        elif kind == "forged":
            out.append(raw_frame(body + rng.randbytes(TAG), key=key, enc=enc))
    starts, at = [], 0
    for frame in out:
        starts.append(at)
        at += len(frame)
    return b"".join(out), starts


def cut(data: bytes, starts: list[int], points: list[tuple[int, int]]) -> list[bytes]:
    """``data`` cut near frame starts: (which frame, how far from its start)."""
    if not data:
        return []
    at = sorted({min(max(starts[i % len(starts)] + off, 0), len(data)) for i, off in points})
    at = [a for a in at if 0 < a < len(data)]
    return [data[i:j] for i, j in zip([0, *at], [*at, len(data)], strict=True)]


# --------------------------------------------------------------------------- a model pump


class _Protocol:
    """aiohttp's protocol as the queue sees it: reading paused and resumed."""

    def __init__(self) -> None:
        self._reading_paused = False

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False


class Pump:
    """What a link does with what arrives, either way: binary messages opened (with a
    secret) and handed over; the stream ends at a text message, a close, a failed tag,
    or the reader's error."""

    def __init__(self, mac: auth.MessageAuth | None, welcome: bool) -> None:
        self.mac = mac
        self.out: list[Any] = []
        self.end: Any = None
        self.welcome = welcome  # the first message is the handshake's last (not sealed)

    def hand_over(self, message: bytes) -> bool:
        if self.mac is not None:
            opened = self.mac.open(message)
            if opened is None:
                return False
            message = opened
        assert type(message) is bytes, type(message)
        self.out.append(message)
        return True

    def read(self, msg: Any) -> None:
        if self.end is not None:
            return
        if self.welcome and msg.type is WSMsgType.BINARY:
            assert msg.data == b"welcome"
            self.welcome = False
            return
        if msg.type is WSMsgType.BINARY:
            if not self.hand_over(msg.data):
                self.end = "refused (tag)"
        elif msg.type is WSMsgType.TEXT:
            self.end = "text"
        elif msg.type is WSMsgType.CLOSE:
            self.end = ("close", msg.data)

    def finish(self, queue: Any) -> list[Any]:
        exc = queue.exception()
        if self.end is None and exc is not None:
            self.end = ("error", getattr(exc, "code", repr(exc)))
        return [*self.out, self.end]


class ModelLink:
    """What the guard asks of a link (``_may_take``, ``_take_one``, ``_take``)."""

    def __init__(self, pump: Pump, take_max: int) -> None:
        self.pump = pump
        self._take_max = take_max
        self._taken: deque[Any] = deque()
        self.busy = False  # the pump holds a message (waits for room in the inbox, say)
        self.took = 0

    def _may_take(self) -> bool:
        return not self.busy and self.pump.end is None

    def _take_one(self, message: bytes) -> bool:
        if self.pump.hand_over(message):
            self.took += 1
            return True
        return False

    def _take(self, buffer: deque[Any], start: int) -> None:
        pass  # the pump reads them


def read_now(queue: Any) -> Any:
    """The queue's next message, which it holds (its ``read`` does not suspend then)."""
    coro = queue.read()
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("read suspended with a message buffered")


def macs() -> tuple[auth.MessageAuth, auth.MessageAuth, auth.MessageAuth]:
    keys = (os.urandom(32), os.urandom(32))
    return (
        auth.MessageAuth.for_role("client", keys),
        auth.MessageAuth.for_role("server", keys),
        auth.MessageAuth.for_role("server", keys),
    )


def run_reader_alone(chunks: list[bytes], max_msg: int, pump: Pump) -> list[Any]:
    loop = asyncio.new_event_loop()
    try:
        queue = WebSocketDataQueue(cast(Any, _Protocol()), 1 << 30, loop=loop)
        reader = WebSocketReader(queue, max_msg, compress=False, decode_text=True)
        for chunk in chunks:
            if reader.feed_data(chunk)[0]:
                break
        while queue._buffer:
            pump.read(read_now(queue))
        return pump.finish(queue)
    finally:
        loop.close()


def run_guarded(
    chunks: list[bytes],
    max_msg: int,
    take_max: int,
    pump: Pump,
    schedule: list[tuple[bool, bool]],
    queue_limit: int,
) -> tuple[list[Any], int]:
    """The guard in front of the reader: the link attached once the welcome is read (or
    from the start), the pump reading between chunks or not, busy or not."""
    loop = asyncio.new_event_loop()
    try:
        protocol = _Protocol()
        queue = WebSocketDataQueue(cast(Any, protocol), queue_limit, loop=loop)
        reader = WebSocketReader(queue, max_msg, compress=False, decode_text=True)
        guard = _HandshakeGuard(reader, queue, limit=1024, messages=2)
        link = ModelLink(pump, take_max)
        if pump.welcome:
            guard.release(after=1)
        else:
            guard.release()
            guard._link = link  # type: ignore[assignment]

        held: list[Any] = []  # a message the pump read and cannot hand on yet

        def read_one(hold: bool = False) -> None:
            msg = read_now(queue)
            if hold:
                held.append(msg)
                link.busy = True
                return
            pump.read(msg)
            if guard._link is None and not pump.welcome:
                guard._link = link  # type: ignore[assignment]
            if not queue._buffer and queue.exception() is not None:
                # A stalled reader resumed by this read failed: the pump's next receive
                # raises at once (no turn passes), and the link closes.
                pump.finish(queue)

        def release_held() -> None:
            link.busy = False
            if held:
                pump.read(held.pop())

        for n, chunk in enumerate(chunks):
            while protocol._reading_paused and queue._buffer:  # no bytes come while paused
                release_held()
                read_one()
            assert not protocol._reading_paused
            reads, busy = schedule[n % len(schedule)] if schedule else (True, False)
            if guard.feed_data(chunk)[0]:
                break  # aiohttp drops the parser
            release_held()  # room in the inbox: the pump hands on what it held
            if reads:
                while queue._buffer and not held:  # holding one, the pump reads no more
                    read_one(hold=busy and len(queue._buffer) == 1)
        release_held()
        while queue._buffer:
            read_one()
        return pump.finish(queue), link.took
    finally:
        loop.close()


@settings(
    max_examples=int(os.environ.get("R15_EXAMPLES", 200)),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# The cases the fast path must get right, whatever Hypothesis draws:
# a message the reader holds (unread) before a whole one at the next chunk's start;
@example(
    items=[("bin", 5, True, "min", 1), ("bin", 5, True, "min", 2), ("bin", 5, True, "min", 3)],
    points=[(0, 3), (2, 0)],
    schedule=[(True, False), (False, False), (True, False)],
    with_secret=False,
    welcome=False,
    max_frame=1000,
    queue_limit=1 << 16,
)
# the pump holding a message (no room in the inbox) when a whole one arrives;
@example(
    items=[("bin", 5, True, "64", 1), ("bin", 5, True, "min", 2)],
    points=[(1, 0)],
    schedule=[(True, True), (True, False)],
    with_secret=False,
    welcome=False,
    max_frame=1000,
    queue_limit=1 << 16,
)
# a binary frame with extension (RSV) bits set, whole at a chunk's start;
@example(
    items=[("rsv", 5, True, "min", 1), ("bin", 5, True, "min", 2)],
    points=[],
    schedule=[],
    with_secret=False,
    welcome=False,
    max_frame=1000,
    queue_limit=1 << 16,
)
# a message one byte over the link's limit, alone in its chunk;
@example(
    items=[("over", 5, True, "min", 1)],
    points=[],
    schedule=[],
    with_secret=True,
    welcome=False,
    max_frame=100,
    queue_limit=1 << 16,
)
# a whole message right after a fragment (inside a fragmented message);
@example(
    items=[("badfrag", 40, True, "min", 1)],
    points=[(1, 0)],
    schedule=[],
    with_secret=False,
    welcome=False,
    max_frame=1000,
    queue_limit=1 << 16,
)
# a frame smuggled in a payload, the chunk starting where it does (after the header);
@example(
    items=[("nested", 40, False, "min", 4)],
    points=[(0, 2), (0, 6)],
    schedule=[],
    with_secret=False,
    welcome=True,
    max_frame=1000,
    queue_limit=1 << 16,
)
# ... after a release in mid-chunk (the welcome and the header in one read).
@example(
    items=[("nested", 40, False, "min", 4)],
    points=[(1, 2), (1, 6)],
    schedule=[],
    with_secret=False,
    welcome=True,
    max_frame=1000,
    queue_limit=1 << 16,
)
@given(
    items=st.lists(item, min_size=1, max_size=16),
    points=st.lists(st.tuples(st.integers(0, 30), st.integers(-3, 9)), max_size=12),
    schedule=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=12),
    with_secret=st.booleans(),
    welcome=st.booleans(),
    max_frame=st.sampled_from([100, 1000, 65535 - TAG, 65535, 1 << 20]),
    queue_limit=st.sampled_from([64, 1024, 1 << 16]),
)
def test_the_guard_delivers_what_the_reader_alone_would(
    items: list[tuple[str, int, bool, str, int]],
    points: list[tuple[int, int]],
    schedule: list[tuple[bool, bool]],
    with_secret: bool,
    welcome: bool,
    max_frame: int,
    queue_limit: int,
) -> None:
    """Any hostile stream, any cuts, the pump reading or busy between chunks, a stalled
    reader (a small queue): the guard plus the reader hand over exactly what the reader
    alone would, in order, and end the same way; a forged or over-limit message is
    never handed over."""
    seal_mac, open_a, open_b = macs() if with_secret else (None, None, None)
    stream, starts = build(
        items, max_frame=max_frame, seal=seal_mac.seal if seal_mac else None, welcome=welcome
    )
    chunks = cut(stream, starts, points)
    max_msg = max_frame + (TAG if with_secret else 0) + 1  # the link's reader limit
    take_max = min(0xFFFF, max_frame + (TAG if with_secret else 0))
    expected = run_reader_alone(chunks, max_msg, Pump(open_a, welcome))
    got, _took = run_guarded(
        chunks, max_msg, take_max, Pump(open_b, welcome), schedule, queue_limit
    )
    assert got == expected


def test_the_differential_model_sees_the_guard_take() -> None:
    """The model above exercises the fast path (it is not vacuous): whole messages at
    chunk starts are taken, and the result still matches the reader alone."""
    seal_mac, open_a, open_b = macs()
    items = [("bin", 17, True, "min", i) for i in range(5)] + [("bin", 300, False, "16", 9)]
    stream, starts = build(items, max_frame=1000, seal=seal_mac.seal, welcome=False)
    chunks = cut(stream, starts, [(2, 0)])
    expected = run_reader_alone(chunks, 1000 + TAG + 1, Pump(open_a, False))
    got, took = run_guarded(chunks, 1000 + TAG + 1, 1000 + TAG, Pump(open_b, False), [], 1024)
    assert got == expected and len(expected) == 7 and expected[-1] is None
    assert took == 6


def test_a_non_minimal_length_and_a_zero_length_message_are_taken_as_the_reader_reads_them() -> (
    None
):
    """Length 5 written with the 16-bit and the 64-bit form, and an empty message: the
    guard takes the 16-bit form itself (the 64-bit one goes to the reader), each
    arrives as sent."""
    pump = Pump(None, False)
    stream = (
        raw_frame(b"12345", enc="16", key=b"wxyz")
        + raw_frame(b"", key=b"abcd")
        + raw_frame(b"abcde", enc="64")
        + raw_frame(b"after", enc="16")
    )
    got, took = run_guarded([stream], 1001, 1000, pump, [], 1 << 16)
    assert got == [b"12345", b"", b"abcde", b"after", None]
    assert took == 2


def test_the_guard_hands_over_bytes_even_when_fed_a_bytearray() -> None:
    """aiohttp's reader accepts bytes, bytearray or memoryview (it converts them); what
    the guard hands over must be ``bytes`` whatever it was fed (a consumer keeps it)."""
    pump = Pump(None, False)
    stream = bytearray(raw_frame(b"plain") + raw_frame(b"masked", key=b"kkkk"))
    got, took = run_guarded([cast(bytes, stream)], 1001, 1000, pump, [], 1 << 16)
    assert got == [b"plain", b"masked", None] and took == 2


# --------------------------------------------------------------------------- sockets


SOCKET_KINDS = [
    *["bin"] * 8,
    "frag",
    "frag",
    "nested",
    "nested",
    "ping",
    "pong",
    "text",
    "close",
    "stray",
    "forged",
    "badfrag",
]
"""Mostly messages (ending kinds rarer, so most streams run on past a few chunks)."""


@settings(
    max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
# A frame smuggled in a payload, the next write starting where it does; a whole
# message right after a fragment, in the next write.
@example(
    items=[("nested", 40, False, "min", 4), ("bin", 5, True, "min", 5)],
    points=[(0, 2), (0, 6)],
    with_secret=False,
)
@example(items=[("badfrag", 40, True, "min", 1)], points=[(1, 0)], with_secret=False)
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from(SOCKET_KINDS),
            st.sampled_from([0, 5, 125, 126, 900, -1]),
            st.just(True),
            st.sampled_from(["min", "16", "64"]),
            st.integers(0, 2**32 - 1),
        ),
        min_size=1,
        max_size=10,
    ),
    points=st.lists(st.tuples(st.integers(0, 30), st.integers(-3, 9)), max_size=8),
    with_secret=st.booleans(),
)
def test_over_sockets_the_fast_path_changes_nothing_a_peer_can_see(
    items: list[tuple[str, int, bool, str, int]],
    points: list[tuple[int, int]],
    with_secret: bool,
) -> None:
    """The same raw stream, cut the same way, written to a link with the fast path and
    to one with ``_take_whole`` switched off: the consumers get the same messages and
    the links end with the same code."""
    secret = SECRET if with_secret else None

    async def both() -> tuple[list[Any], list[Any]]:
        # Sealed with each dialler's own MessageAuth (keys are per connection).
        fast = await run_stream(items, points, secret, fast=True)
        slow = await run_stream(items, points, secret, fast=False)
        return fast, slow

    fast_result, slow_result = asyncio.run(both())
    assert fast_result == slow_result


async def run_stream(
    items: list[tuple[str, int, bool, str, int]],
    points: list[tuple[int, int]],
    secret: bytes | None,
    fast: bool,
) -> list[Any]:
    original = _HandshakeGuard._take_whole
    if not fast:
        _HandshakeGuard._take_whole = lambda self, link, data: data  # type: ignore[method-assign]
    try:
        t = Taker()
        options: dict[str, Any] = {"max_frame": 1000}
        if secret is not None:
            options["secret"] = secret
        async with t.linked(**options) as link:
            b_end = t.link
            assert b_end is not None
            mac = link._mac
            stream, starts = build(
                items, max_frame=1000, seal=mac.seal if mac else None, welcome=False
            )
            writer = link._ws._writer
            assert writer is not None
            for chunk in cut(stream, starts, points):
                writer.transport.write(chunk)
                await asyncio.sleep(0)
            marker = b"marker"
            sent = link.send_now(marker) if not link.closed else False
            if not sent and not link.closed:
                await link.send(marker)
            await wait_for(
                lambda: (t.seen and t.seen[-1] == marker) or b_end.closed,
                DEADLINE,
                "the marker or the end",
            )
            if t.seen and t.seen[-1] == marker:
                return [*t.seen[:-1], None]
            await asyncio.wait_for(b_end.wait_closed(), DEADLINE)
            return [*t.seen, b_end.close_code]
    finally:
        _HandshakeGuard._take_whole = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------- send_now


async def suspended_sender(link: WebSocketLink, stop: list[bool], after: list[bool]) -> int:
    """Send 1 MiB frames until told to stop; right after the last ``send`` returns (in
    the turn that released the lock), ``send_now`` one frame "C"."""
    chunk = os.urandom(1 << 20)
    n = 0
    while not stop:
        await link.send(b"big%d|" % n + chunk)
        n += 1
    after.append(link.send_now(b"C"))
    return n


@pytest.mark.parametrize("secret", [None, SECRET])
async def test_under_backpressure_interleaved_senders_keep_the_tags_valid(
    secret: bytes | None,
) -> None:
    """The peer stops reading; one task's ``send`` waits for the socket to drain, another
    ``send`` waits for the lock, ``send_now`` is refused meanwhile; then the peer reads
    again: every frame arrives once, whole, and (with a secret) every tag checks out:
    the link stays open."""
    t = Taker()
    options: dict[str, Any] = {} if secret is None else {"secret": secret}
    async with t.linked(**options) as link:
        b_end = t.link
        assert b_end is not None
        peer = b_end._ws._writer
        assert peer is not None
        peer.transport.pause_reading()
        stop: list[bool] = []
        after: list[bool] = []
        first = asyncio.create_task(suspended_sender(link, stop, after))
        writer = link._ws._writer
        assert writer is not None
        await wait_for(
            lambda: writer.protocol._paused and link._send_lock.locked(), DEADLINE, "a send waits"
        )
        assert link.send_now(b"refused") is False
        second = asyncio.create_task(link.send(b"B"))
        await wait_for(lambda: link._send_lock._waiters, DEADLINE, "B waits for the lock")
        assert link.send_now(b"refused too") is False
        stop.append(True)
        peer.transport.resume_reading()
        n = await asyncio.wait_for(first, DEADLINE)
        await asyncio.wait_for(second, DEADLINE)
        await wait_for(lambda: len(t.seen) >= n + 1, DEADLINE, "every frame")
        # C came while B still waited for the lock: refused (send_now never overtakes).
        assert t.seen[n:] == [b"B"] and after == [False]
        assert [f.split(b"|")[0] for f in t.seen[:n]] == [b"big%d" % i for i in range(n)]
        assert not b_end.closed and not link.closed
        assert b"refused" not in t.seen and b"refused too" not in t.seen


@pytest.mark.parametrize("secret", [None, SECRET])
async def test_send_now_does_not_overtake_a_send_waiting_for_the_lock(
    secret: bytes | None,
) -> None:
    """Task A's ``send`` waits for the socket to drain; task B's ``send(b"B")`` then
    waits for the lock; A, right after its send returns, ``send_now(b"C")``. B was called
    first and ``send`` keeps call order: the peer must get B before C."""
    t = Taker()
    options: dict[str, Any] = {} if secret is None else {"secret": secret}
    async with t.linked(**options) as link:
        b_end = t.link
        assert b_end is not None
        peer = b_end._ws._writer
        assert peer is not None
        peer.transport.pause_reading()
        stop: list[bool] = []
        after: list[bool] = []
        first = asyncio.create_task(suspended_sender(link, stop, after))
        writer = link._ws._writer
        assert writer is not None
        await wait_for(
            lambda: writer.protocol._paused and link._send_lock.locked(), DEADLINE, "a send waits"
        )
        second = asyncio.create_task(link.send(b"B"))
        await wait_for(lambda: link._send_lock._waiters, DEADLINE, "B waits for the lock")
        stop.append(True)
        peer.transport.resume_reading()
        n = await asyncio.wait_for(first, DEADLINE)
        await asyncio.wait_for(second, DEADLINE)
        await wait_for(lambda: len(t.seen) >= n + 1, DEADLINE, "every frame")
        assert after == [False]  # B was still under way: C is refused, not sent first
        assert t.seen[n:] == [b"B"]
        assert link.send_now(b"C") is True  # once B is written
        await wait_for(lambda: t.seen[n:] == [b"B", b"C"], DEADLINE, "C after B")


async def test_send_now_after_the_peer_closed_writes_nothing_and_send_raises() -> None:
    """The peer closes its end: once our link has seen the close, ``send_now`` writes
    nothing (False) and ``send`` raises ClosedError; nothing reaches the socket."""
    from subcog_crdt._errors import ClosedError

    t = Taker()
    async with t.linked() as link:
        b_end = t.link
        assert b_end is not None
        writer = link._ws._writer
        assert writer is not None
        written: list[bytes] = []
        write = writer.transport.write

        def recorded(data: Any) -> None:
            written.append(bytes(data))
            write(data)

        writer.transport.write = recorded  # type: ignore[method-assign]
        await b_end.close()
        await wait_for(lambda: link.closed, DEADLINE, "the dialler saw the close")
        before = len(written)
        assert link.send_now(b"late") is False
        with pytest.raises(ClosedError):
            await link.send(b"late too")
        assert len(written) == before
        assert all(b"late" not in w for w in written)
