"""The transport contract.

A transport gives the node ``Link`` objects: authenticated, ordered, bidirectional
channels of binary frames to one peer each. What the frames mean (the sync protocol) is
not the transport's business; it only moves ``bytes`` and enforces limits. The node hands
every new link to one callback, whichever side dialled.

A link's frames are read either by iterating it or, on the hot path, by
``Link.consume``: a synchronous callback run for each frame as soon as it arrives,
without a hand-off to another task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "DEFAULT_MAX_FRAME",
    "PROTOCOL_VERSION",
    "FrameConsumer",
    "Hello",
    "Link",
    "LinkHandler",
]

PROTOCOL_VERSION = 5
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


@dataclass(frozen=True)
class Hello:
    """What a node says about itself when a link opens (after authentication)."""

    node_id: str
    url: str | None
    """The URL this node accepts connections on (what peers dial), if it listens."""
    protocol: int = PROTOCOL_VERSION
    namespaces: tuple[str, ...] | None = None
    """Namespaces it syncs (None: every namespace except its private ones)."""
    user_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


FrameConsumer = Callable[[bytes], Awaitable[None] | None]
"""Called with each received frame; returns None, or an awaitable to finish first."""


class Link(Protocol):
    """One authenticated connection to one peer."""

    @property
    def peer(self) -> Hello: ...

    @property
    def closed(self) -> bool: ...

    async def send(self, frame: bytes) -> None:
        """Send one frame; waits (backpressure) while the peer is slow. Raises
        ``ClosedError`` when the link is closed, ``FrameTooLarge`` over the limit."""
        ...

    def send_now(self, frame: bytes) -> bool:
        """Send one frame within this call if ``send`` would not wait (no send under
        way, no backpressure, open, within the limit): True. Otherwise nothing is done
        and False is returned: use ``send``, which waits or raises as it must."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]:
        """Frames received, in order, until the link closes."""
        ...

    async def consume(self, consumer: FrameConsumer) -> None:
        """Hand every frame received, in order, to ``consumer`` (instead of iterating;
        once per link), until the link closes and the frames received before have been
        handed over; then return.

        ``consumer`` runs synchronously, as soon as the frame is there when nothing is
        waiting. If it returns an awaitable, later frames wait until that is done (they
        are buffered meanwhile, within the receive limit; past it the sender is slowed).
        If it (or that awaitable) raises, no further frame is handed over and the
        exception is raised here; the caller then closes the link."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


LinkHandler = Callable[[Link], Awaitable[None]]
"""Called once per established link; the link lives while the handler runs."""
