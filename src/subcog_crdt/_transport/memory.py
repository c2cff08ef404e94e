"""An in-memory link pair: two nodes in one process, no sockets. Optionally delays,
reorders and duplicates frames (those that ``chaos_filter`` accepts), so convergence can
be tested against an unreliable network without one."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

from subcog_crdt._errors import ClosedError, FrameTooLarge
from subcog_crdt._transport.base import DEFAULT_MAX_FRAME, FrameConsumer, Hello

__all__ = ["MemoryLink", "memory_link_pair"]

_CLOSED = object()


class MemoryLink:
    """One end of an in-memory link."""

    def __init__(self, peer: Hello, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._peer = peer
        self._inbox: asyncio.Queue[bytes | object] = asyncio.Queue()
        self._other: MemoryLink | None = None
        self._closed = False
        self.max_frame = max_frame
        self.sent_frames: list[bytes] = []
        self.delay = 0.0
        self.reorder = 0.0
        self.duplicate = 0.0
        self.chaos_filter: Callable[[bytes], bool] = lambda _f: True
        self.rng = random.Random(0)
        self._tasks: set[asyncio.Task[None]] = set()
        self.close_code: int | None = None
        self.close_reason = ""

    @property
    def peer(self) -> Hello:
        return self._peer

    @property
    def closed(self) -> bool:
        return self._closed

    def send_now(self, frame: bytes) -> bool:
        # Never here: ``send`` does not wait anyway, and tests subclass this link to gate
        # or watch what goes through ``send``.
        return False

    async def send(self, frame: bytes) -> None:
        if self._closed:
            raise ClosedError("link is closed")
        if len(frame) > self.max_frame:
            raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds {self.max_frame}")
        other = self._other
        assert other is not None
        self.sent_frames.append(frame)
        chaotic = self.chaos_filter(frame)
        copies = 2 if chaotic and self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            delay = self.delay
            if chaotic and self.rng.random() < self.reorder:
                delay += self.rng.random() * 0.01
            if delay <= 0:
                other._inbox.put_nowait(frame)
            else:
                t = asyncio.get_running_loop().create_task(self._later(other, frame, delay))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _later(other: MemoryLink, frame: bytes, delay: float) -> None:
        await asyncio.sleep(delay)  # simulated network delay, not synchronisation
        if not other._closed:
            other._inbox.put_nowait(frame)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._inbox.get()
            if item is _CLOSED:
                return
            assert isinstance(item, bytes)
            yield item

    async def consume(self, consumer: FrameConsumer) -> None:
        async for frame in self:
            pending = consumer(frame)
            if pending is not None:
                await pending

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        self.close_code, self.close_reason = code, reason
        for t in list(self._tasks):
            t.cancel()
        self._inbox.put_nowait(_CLOSED)
        other = self._other
        if other is not None and not other._closed:
            other._closed = True
            other.close_code, other.close_reason = code, reason
            other._inbox.put_nowait(_CLOSED)


def memory_link_pair(a: Hello, b: Hello) -> tuple[MemoryLink, MemoryLink]:
    """Links for node ``a`` (whose peer is ``b``) and node ``b`` (whose peer is ``a``)."""
    la, lb = MemoryLink(b), MemoryLink(a)
    la._other, lb._other = lb, la
    return la, lb
