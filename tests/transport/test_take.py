"""Messages handed over in the turn that received them: whole ones straight from the
chunk, before aiohttp's reader (``_HandshakeGuard._take_whole``), and others as the reader
parsed them (``WebSocketLink._take``; the pump skips them later). The order is kept
whatever the consumer, the inbox, control frames and chunk boundaries do, and a message
that fails its tag is still refused by the pump."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader

from helpers import wait_for
from subcog_crdt._transport.base import Hello, Link
from subcog_crdt._transport.websocket import (
    CLOSE_MAC,
    CLOSE_PROTOCOL,
    CLOSE_TOO_LARGE,
    WebSocketLink,
    WebSocketTransport,
    _HandshakeGuard,
)
from transport.test_link_security import SECRET, client_frame, ended, relay
from transport.test_websocket import Recorder, make

DEADLINE = 20.0


GUARD, TAKE = "_take_one", "_take"
"""Who handed a message over: the guard, before aiohttp's reader saw it; ``_take``, as
the reader parsed it. (The others: ``_pump`` and ``_drain``.)"""


def handed_over_by() -> str:
    """Called inside a link's consumer: the step that handed the message over (the
    nearest caller among the link's four)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in (GUARD, TAKE, "_pump", "_drain"):
            return frame.f_code.co_name
        frame = frame.f_back  # type: ignore[assignment]
    raise AssertionError("not called by a link")


class Taker:
    """Node "b"'s link consumer: records each frame, which step handed it over (see
    GUARD), and returns a pending commit for the frames ``busy`` picks (finished a few
    loop turns later)."""

    def __init__(self, busy: Any = None) -> None:
        self.link: WebSocketLink | None = None
        self.seen: list[bytes] = []
        self.how: list[str] = []
        self.busy = busy or (lambda _frame: 0)

    def __call__(self, frame: bytes) -> Any:
        assert self.link is not None
        self.seen.append(frame)
        caller = handed_over_by()
        if caller == TAKE:
            assert self.link._taken, "_take hands over what the reader still holds"
        self.how.append(caller)
        turns = self.busy(frame)
        if not turns:
            return None
        return self._later(turns)

    @staticmethod
    async def _later(turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)

    async def handler(self, link: Link) -> None:
        assert isinstance(link, WebSocketLink)
        self.link = link
        await link.consume(self)

    @asynccontextmanager
    async def linked(self, **options: Any) -> AsyncIterator[WebSocketLink]:
        """A link dialled from "a" to "b", whose end at "b" this consumes."""
        async with (
            make("a", Recorder(), **options) as a,
            WebSocketTransport(
                node_id="b",
                hello=lambda: Hello(node_id="b", url=None),
                on_link=self.handler,
                **options,
            ) as b,
        ):
            assert b.url is not None
            link = await a.connect(b.url)
            await wait_for(lambda: self.link is not None, DEADLINE, "b has the link")
            yield link


async def test_a_frame_is_handed_over_before_the_reader_sees_it() -> None:
    """One message per read, small and up to 64 KiB: the guard takes each (masked, at
    the server), and aiohttp's reader never gets it (the pump does not wake)."""
    t = Taker()
    async with t.linked() as link:
        b_end = t.link
        assert b_end is not None
        sizes = [0, 1, 125, 126, 65535 - 10, 300]
        for i, size in enumerate(sizes):
            await link.send(os.urandom(size))
            await wait_for(lambda: len(t.seen) == i + 1, DEADLINE, f"frame {i}")  # noqa: B023
            assert len(t.seen[-1]) == size
        assert t.how == [GUARD] * len(sizes), t.how
        assert not b_end._taken and not b_end._ws._reader._buffer


async def test_the_dialler_takes_unmasked_frames_too() -> None:
    """The server's frames are not masked: the dialler's guard takes them as they are."""
    t = Taker()
    rec = Recorder()
    async with (
        make("a", Recorder()) as a,
        WebSocketTransport(
            node_id="b", hello=lambda: Hello(node_id="b", url=None), on_link=rec
        ) as b,
    ):
        assert b.url is not None
        link = await a.connect(b.url)
        t.link = link
        consuming = asyncio.create_task(link.consume(t))
        try:
            b_end = await rec.next_link()
            frames = [b"server %d" % i + os.urandom(i * 40) for i in range(10)]
            for i, f in enumerate(frames):
                await b_end.send(f)
                await wait_for(lambda: len(t.seen) == i + 1, DEADLINE, f"frame {i}")  # noqa: B023
            assert t.seen == frames
            assert t.how == [GUARD] * len(frames), t.how
        finally:
            consuming.cancel()


async def test_a_larger_message_is_taken_as_the_reader_parsed_it() -> None:
    """Over 64 KiB (a 64-bit length): the reader parses it, then ``_take`` hands it over
    in that turn and the pump skips it; small ones after it go to the guard again."""
    t = Taker()
    async with t.linked() as link:
        big = os.urandom(200_000)
        await link.send(big)
        await wait_for(lambda: len(t.seen) == 1, DEADLINE, "the large frame")
        await link.send(b"small")
        await wait_for(lambda: len(t.seen) == 2, DEADLINE, "the small frame")
        assert t.seen == [big, b"small"]
        assert t.how == [TAKE, GUARD], t.how
        b_end = t.link
        assert b_end is not None
        await wait_for(lambda: not b_end._taken, DEADLINE, "the pump skipped it")


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_order_holds_with_a_busy_consumer_a_full_inbox_and_pings(seed: int) -> None:
    """Bursts of frames of random sizes, pings between them, a consumer that is busy with
    a commit now and then, and an inbox so small that the pump waits for room: every
    frame arrives once, in order, and some went each way (taken, and through the pump)."""
    rng = random.Random(seed)
    t = Taker(busy=lambda _f: rng.choice([0, 0, 0, 0, 1, 3]))
    frames = [b"%d:" % i + b"x" * rng.randrange(0, 200) for i in range(400)]
    async with t.linked(recv_buffer=256) as link:
        ws: Any = link._ws
        i = 0
        while i < len(frames):
            burst = frames[i : i + rng.randrange(1, 12)]
            for f in burst:
                await link.send(f)  # back to back: several messages per read at b
            i += len(burst)
            if rng.random() < 0.3:
                await ws.ping()
            if rng.random() < 0.5:
                await asyncio.sleep(0)
        await wait_for(lambda: len(t.seen) >= len(frames), DEADLINE, "every frame")
        assert t.seen == frames
        assert GUARD in t.how and set(t.how) - {GUARD}, set(t.how)
        assert not link.closed


async def test_a_forged_message_behind_taken_ones_is_refused_by_the_pump() -> None:
    """With a secret, behind a relay that injects a forged message right after an
    authentic one: the authentic ones are handed over (as parsed), the forged one is not,
    and the link closes with 4012."""

    def attack(count: int, raw: bytes, payload: bytes) -> list[bytes]:
        # (messages 1 and 2 are the handshake's): behind the third authentic one
        return [raw, client_frame(b"forged")] if count == 5 else [raw]

    t = Taker()
    async with (
        make("a", Recorder(), secret=SECRET) as a,
        WebSocketTransport(
            node_id="b",
            hello=lambda: Hello(node_id="b", url=None),
            on_link=t.handler,
            secret=SECRET,
        ) as b,
        relay(b.port, attack) as url,
    ):
        link = await a.connect(url)
        for i in range(3):
            await link.send(b"authentic %d" % i)
        assert await ended(link) == CLOSE_MAC
        assert t.link is not None
        assert await ended(t.link) == CLOSE_MAC
        assert t.seen == [b"authentic 0", b"authentic 1", b"authentic 2"]
        assert b"forged" not in t.seen


def raw_transport(link: WebSocketLink) -> Any:
    """The dialler's socket transport, to write frames past aiohttp's writer."""
    writer = link._ws._writer
    assert writer is not None
    return writer.transport


def masked(payload: bytes, rng: random.Random, *, opcode: int = 0x2, fin: bool = True) -> bytes:
    """A client frame with a random mask key (the guard must unmask as the reader does)."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = bytes([first, 0x80 | size])
    elif size < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack(">H", size)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack(">Q", size)
    key = rng.randbytes(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


def message_frames(message: bytes, rng: random.Random) -> list[bytes]:
    """``message`` as one frame, or fragmented (pings may sit between fragments)."""
    if len(message) < 2 or rng.random() < 0.6:
        return [masked(message, rng)]
    cuts = sorted(rng.sample(range(1, len(message)), min(len(message) - 1, rng.randrange(1, 4))))
    parts = [message[i:j] for i, j in zip([0, *cuts], [*cuts, len(message)], strict=True)]
    out = []
    for n, part in enumerate(parts):
        out.append(masked(part, rng, opcode=0x2 if n == 0 else 0x0, fin=n == len(parts) - 1))
        if rng.random() < 0.3:
            out.append(masked(b"ping", rng, opcode=0x9))
    return out


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
@pytest.mark.parametrize("secret", [None, SECRET])
async def test_any_chunking_of_any_framing_arrives_whole_and_in_order(
    seed: int, secret: bytes | None
) -> None:
    """Raw frames written straight to the dialler's socket: whole messages and
    fragmented ones, pings (also between fragments), sizes around the 125 and 64 KiB
    edges, cut into writes at random points. Every message arrives once, whole, in
    order, and the guard took some (it must resume after a split frame or a message it
    left to the reader)."""
    rng = random.Random(seed)
    t = Taker(busy=lambda _f: rng.choice([0, 0, 0, 0, 0, 2]))
    options: dict[str, Any] = {} if secret is None else {"secret": secret}
    async with t.linked(**options) as link:
        mac = link._mac
        sizes = [0, 5, 125, 126, 200, 65535, 70_000]
        messages = [
            b"%d|" % i + rng.randbytes(max(0, rng.choice(sizes) - (16 if mac else 0) - 8))
            for i in range(150)
        ]
        frames = [f for m in messages for f in message_frames(mac.seal(m) if mac else m, rng)]
        # Half the frames cut into pieces at random points; writes of 1 to 3 pieces.
        pieces: list[bytes] = []
        for f in frames:
            if rng.random() < 0.5:
                pieces.append(f)
                continue
            cuts = sorted(rng.sample(range(1, len(f)), min(len(f) - 1, rng.randrange(1, 4))))
            pieces += [f[i:j] for i, j in zip([0, *cuts], [*cuts, len(f)], strict=True)]
        transport = raw_transport(link)
        while pieces:
            n = rng.randrange(1, 4)
            transport.write(b"".join(pieces[:n]))
            del pieces[:n]
            if rng.random() < 0.7:
                await asyncio.sleep(0)  # let b read between writes: other chunk boundaries
        await wait_for(lambda: len(t.seen) >= len(messages), DEADLINE, "every message")
        assert t.seen == messages
        assert GUARD in t.how and set(t.how) - {GUARD}, set(t.how)
        assert not link.closed and t.link is not None and not t.link.closed


async def test_a_framing_error_after_release_stops_the_guard_taking() -> None:
    """A continuation frame without a message, between two valid messages in one write:
    the first is handed over, the reader refuses the stream (1002), and the message
    after the fault is never handed over (the guard does not skip past what it cannot
    follow)."""
    rng = random.Random(5)
    t = Taker()
    async with t.linked() as link:
        transport = raw_transport(link)
        transport.write(
            masked(b"before", rng) + masked(b"stray", rng, opcode=0x0) + masked(b"after", rng)
        )
        b_end = t.link
        assert b_end is not None
        assert await ended(b_end) == CLOSE_PROTOCOL
        assert t.seen == [b"before"]


async def test_a_message_over_the_link_limit_is_refused_not_taken() -> None:
    """Both ends at max_frame=1000: a 2000-byte message written raw (``send`` refuses
    it) is one the guard could parse, but the reader's limit is the link's: it refuses
    it (4009) and nothing is handed over."""
    rng = random.Random(6)
    t = Taker()
    async with t.linked(max_frame=1000) as link:
        transport = raw_transport(link)
        transport.write(masked(b"fits", rng))
        await wait_for(lambda: t.seen == [b"fits"], DEADLINE, "the small message")
        transport.write(masked(rng.randbytes(2000), rng))
        b_end = t.link
        assert b_end is not None
        assert await ended(b_end) == CLOSE_TOO_LARGE
        assert t.seen == [b"fits"]


class StubLink:
    """What the guard asks of a link, recorded (for the guard against aiohttp's own
    reader, without sockets: which bytes it takes and which it leaves to the reader)."""

    def __init__(self) -> None:
        self._take_max = 0xFFFF
        self._taken: deque[Any] = deque()
        self.took: list[bytes] = []
        self.offered: list[int] = []

    def _may_take(self) -> bool:
        return True

    def _take_one(self, message: bytes) -> bool:
        self.took.append(message)
        return True

    def _take(self, buffer: deque[Any], start: int) -> None:
        self.offered.append(len(buffer) - start)  # the pump reads them: nothing taken


class _Protocol:
    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def released_guard() -> tuple[_HandshakeGuard, StubLink, Any]:
    queue = WebSocketDataQueue(cast(Any, _Protocol()), 1 << 20, loop=asyncio.get_running_loop())
    reader = WebSocketReader(queue, 1 << 20, compress=False, decode_text=True)
    guard = _HandshakeGuard(reader, queue, limit=1024, messages=2)
    guard.release()
    link = StubLink()
    guard._link = link  # type: ignore[assignment]
    return guard, link, queue


async def test_the_guard_takes_nothing_past_what_it_cannot_follow() -> None:
    """After a continuation frame without a message (the reader fails the stream), the
    next chunk's valid message is left to the reader, not taken."""
    rng = random.Random(7)
    guard, link, queue = released_guard()
    guard.feed_data(masked(b"one", rng))
    assert link.took == [b"one"] and not queue._buffer
    guard.feed_data(masked(b"stray", rng, opcode=0x0))
    guard.feed_data(masked(b"two", rng))
    assert link.took == [b"one"]


async def test_the_guard_takes_nothing_while_the_reader_holds_a_message() -> None:
    """A ping the pump has not read yet sits in the reader's buffer: the binary message
    in the next chunk must follow it, through the reader."""
    rng = random.Random(8)
    guard, link, queue = released_guard()
    guard.feed_data(masked(b"ping", rng, opcode=0x9))
    assert len(queue._buffer) == 1
    guard.feed_data(masked(b"after the ping", rng))
    assert link.took == [] and len(queue._buffer) == 2
    # A split frame: the chunk after it starts mid-frame, and is not taken either.
    frame = masked(b"split", rng)
    guard2, link2, queue2 = released_guard()
    guard2.feed_data(frame[:3])
    guard2.feed_data(frame[3:] + masked(b"whole", rng))
    assert link2.took == [] and len(queue2._buffer) == 2
    guard2.feed_data(masked(b"next", rng))  # at a boundary again, but behind those two
    assert link2.took == []
    queue2._buffer.clear()
    guard2.feed_data(masked(b"later", rng))
    assert link2.took == [b"later"]
