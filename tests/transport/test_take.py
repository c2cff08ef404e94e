"""Messages handed over in the turn aiohttp parsed them (``WebSocketLink._take``): the
pump skips them later, the order is kept whatever the consumer, the inbox and control
frames do, and a message that fails its tag is still refused by the pump."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from helpers import wait_for
from subcog_crdt._transport.base import Hello, Link
from subcog_crdt._transport.websocket import CLOSE_MAC, WebSocketLink, WebSocketTransport
from transport.test_link_security import SECRET, client_frame, ended, relay
from transport.test_websocket import Recorder, make

DEADLINE = 20.0


class Taker:
    """Node "b"'s link consumer: records each frame, whether ``_take`` handed it over
    (the message was still in aiohttp's reader), and returns a pending commit for the
    frames ``busy`` picks (finished a few loop turns later)."""

    def __init__(self, busy: Any = None) -> None:
        self.link: WebSocketLink | None = None
        self.seen: list[bytes] = []
        self.taken: list[bool] = []
        self.busy = busy or (lambda _frame: 0)

    def __call__(self, frame: bytes) -> Any:
        assert self.link is not None
        self.seen.append(frame)
        self.taken.append(bool(self.link._taken))
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


async def test_a_frame_is_handed_over_in_the_turn_it_is_parsed() -> None:
    t = Taker()
    async with t.linked() as link:
        for i in range(20):
            await link.send(b"frame %d" % i)
            await wait_for(lambda: len(t.seen) == i + 1, DEADLINE, f"frame {i}")  # noqa: B023
        assert t.seen == [b"frame %d" % i for i in range(20)]
        # Each was handed over while aiohttp's reader still held it (the pump read it later).
        assert all(t.taken), t.taken
        b_end = t.link
        assert b_end is not None
        await wait_for(lambda: not b_end._taken, DEADLINE, "the pump skipped them")


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
        assert any(t.taken) and not all(t.taken), t.taken.count(True)
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
