"""Pausing the cyclic garbage collector around bounded bursts of allocation."""

from __future__ import annotations

import gc
from types import TracebackType

__all__ = ["gc_paused"]


class gc_paused:  # lower case: used like the function it replaced, ``with gc_paused():``
    """Run the block with the cyclic collector off, and turn it back on after (if it was).

    For synchronous bursts that allocate many objects and make no reference cycles: a
    batch of captures, loading a document. A full collection walks every memory a node
    holds (~15-25 ms at 100k), and a burst's short-lived objects trigger and then
    survive collections it would not need: ~15 % of a durable bulk load went to them.
    Nothing is skipped: the counts the collector keeps still grow meanwhile, so it runs
    at the next allocation after the block if they call for it. (Another thread that
    switches the collector at the same time may find it in our state; that only moves
    when a collection runs.) A class, not a generator-based context manager: it wraps
    every update a peer sends, where the latter's five extra calls showed."""

    __slots__ = ("_was_on",)

    def __enter__(self) -> None:
        self._was_on = was_on = gc.isenabled()
        if was_on:
            gc.disable()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._was_on:
            gc.enable()
