"""``WebSocketLink.send_now``: a frame written within the call (aiohttp's own frame
write, without the coroutines around it) when ``send`` would not wait, and nothing done
otherwise. Real loopback sockets; the peer's end reads what was written."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from helpers import record_link_sends, wait_for
from subcog_crdt import ConversationsApi
from subcog_crdt._transport.websocket import WebSocketLink
from transport.test_link_security import SECRET
from transport.test_take import Taker

DEADLINE = 20.0


@pytest.mark.parametrize("secret", [None, SECRET])
async def test_frames_sent_now_and_by_send_arrive_whole_and_in_order(
    secret: bytes | None,
) -> None:
    """Masked from the dialler, sealed with a secret, mixed with ``send`` (one message
    sequence for the tags): the peer gets every frame as it was, in order."""
    t = Taker()
    options: dict[str, Any] = {} if secret is None else {"secret": secret}
    async with t.linked(**options) as link:
        frames = [b"%d|" % i + os.urandom(i * 97 % 3000) for i in range(60)]
        now = []
        for i, f in enumerate(frames):
            if i % 3 == 2:
                await link.send(f)
            else:
                now.append(link.send_now(f))
            if i % 7 == 0:
                await asyncio.sleep(0)  # vary the reads at the peer
        await wait_for(lambda: len(t.seen) >= len(frames), DEADLINE, "every frame")
        assert t.seen == frames
        assert all(now)
        assert not link.closed


async def test_nothing_is_sent_now_behind_a_waiting_send_or_past_the_limits() -> None:
    """While a ``send`` holds the link (here: its lock, as a send waiting for the socket
    to drain does), over ``max_frame``, near aiohttp's flow-control limit, or once
    closed, ``send_now`` writes nothing and says so; ``send`` then does what it must."""
    t = Taker()
    async with t.linked(max_frame=4096) as link:
        ws: Any = link._ws
        writer = ws._writer
        written: list[bytes] = []
        write = writer.transport.write

        def recorded(data: bytes) -> None:
            written.append(data)
            write(data)

        writer.transport.write = recorded
        async with link._send_lock:
            assert link.send_now(b"behind a send") is False
        assert link.send_now(b"x" * 4097) is False
        saved = writer._output_size
        writer._output_size = writer._limit - 10
        assert link.send_now(b"near the limit") is False
        writer._output_size = saved
        assert written == []
        assert link.send_now(b"now") is True
        assert len(written) == 1
        await wait_for(lambda: t.seen == [b"now"], DEADLINE, "the frame sent now")
        closing = asyncio.create_task(link.close())
        await asyncio.sleep(0)  # one turn: close() began, and waits for aiohttp's
        assert link.closed and not closing.done()
        assert link.send_now(b"closing") is False  # closing: nothing more goes out
        await closing
        assert link.send_now(b"closed") is False
        assert len(written) == 2  # "now", then only the close frame


async def test_a_peer_end_sends_now_unmasked() -> None:
    """The accepting end writes unmasked frames: the dialler reads them as sent."""
    t = Taker()
    async with t.linked() as link:
        b_end = t.link
        assert isinstance(b_end, WebSocketLink)
        got: list[bytes] = []
        reading = asyncio.create_task(collect(link, got, 5))
        frames = [os.urandom(n) for n in (0, 1, 125, 126, 70_000)]
        assert all(b_end.send_now(f) for f in frames)
        async with asyncio.timeout(DEADLINE):
            await reading
        assert got == frames


async def collect(link: WebSocketLink, into: list[bytes], count: int) -> None:
    async for frame in link:
        into.append(frame)
        if len(into) == count:
            return


async def test_a_write_to_an_idle_link_goes_out_through_send_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two nodes on loopback: the update of a capture made on an idle link is written by
    ``send_now`` (no coroutine), and the peer gets the memory."""
    how: list[tuple[str, bytes]] = []
    record_link_sends(monkeypatch, lambda _link, frame, method: how.append((method, frame)))
    async with (
        ConversationsApi(host="127.0.0.1", discovery=()) as a,
        ConversationsApi(host="127.0.0.1", discovery=()) as b,
    ):
        s = await a.register_session("writer", subscribe=["d"])
        await s.capture("d", "the namespace exists")
        assert b.url is not None
        await a.connect(b.url)
        await wait_for(lambda: len(b.memories("d")) == 1, DEADLINE, "the catch-up")
        await wait_for(lambda: not a._links[b.node_id]._busy, DEADLINE, "an idle link")
        a._links[b.node_id]._last_eager = 0.0  # no burst: the next write goes eagerly
        how.clear()
        await s.capture("d", "marker 7f3a")
        await wait_for(lambda: len(b.memories("d")) == 2, DEADLINE, "the live update")
        updates = [m for m, frame in how if b"marker 7f3a" in frame]
        assert updates == ["send_now"], how
