"""A link handler that records what a WebSocketTransport's links deliver, and a transport
on loopback that hands its links to one (shared by the link-security tests)."""

from __future__ import annotations

import asyncio
from typing import Any

from subcog_crdt._transport.base import Hello, Link
from subcog_crdt._transport.websocket import WebSocketLink, WebSocketTransport

DEADLINE = 10.0  # a bound against hangs on a loaded machine; waits end on their condition


class Recorder:
    """Records each link and every frame it delivers; reads until the link ends."""

    def __init__(self) -> None:
        self.links: asyncio.Queue[WebSocketLink] = asyncio.Queue()
        self.frames: list[bytes] = []
        self.calls = 0

    async def __call__(self, link: Link) -> None:
        assert isinstance(link, WebSocketLink)
        self.calls += 1
        await self.links.put(link)
        async for frame in link:
            self.frames.append(frame)

    async def next_link(self) -> WebSocketLink:
        async with asyncio.timeout(DEADLINE):
            return await self.links.get()


def make(node_id: str, rec: Recorder, **kw: Any) -> WebSocketTransport:
    """A transport for ``node_id`` on 127.0.0.1 (unless ``host`` is given)."""
    kw.setdefault("host", "127.0.0.1")
    return WebSocketTransport(
        node_id=node_id,
        hello=lambda: Hello(node_id=node_id, url=None, user_id="u-" + node_id),
        on_link=rec,
        **kw,
    )
