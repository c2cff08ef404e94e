"""Pausing the cyclic garbage collector around bounded bursts of allocation."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_paused"]


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the block with the cyclic collector off, and turn it back on after (if it was).

    For synchronous bursts that allocate many objects and make no reference cycles: a
    batch of captures, loading a document. A full collection walks every memory a node
    holds (~15-25 ms at 100k), and a burst's short-lived objects trigger and then
    survive collections it would not need: ~15 % of a durable bulk load went to them.
    Nothing is skipped: the counts the collector keeps still grow meanwhile, so it runs
    at the next allocation after the block if they call for it. (Another thread that
    switches the collector at the same time may find it in our state; that only moves
    when a collection runs.)"""
    was_on = gc.isenabled()
    if was_on:
        gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
