"""Lifecycle helpers: ``async with`` closing for long-lived objects, cancelling an owned
task without swallowing our own cancellation, and finishing a coroutine started by hand."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, Self

__all__ = ["AsyncClosing", "Resume", "cancel_and_wait", "start_now"]

log = logging.getLogger(__name__)


class AsyncClosing:
    """``async with x:`` returns ``x`` and awaits ``x.aclose()`` on the way out."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task we own and wait for it, without swallowing our own cancellation."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        log.exception("task %s failed at close", task.get_name())


class Resume:
    """Continue a coroutine that was started by hand (``coro.send(None)``) and suspended
    on ``suspended_on``: awaiting this inside a task drives it to the end, passing results
    and exceptions through, exactly as if the task had started it."""

    def __init__(self, coro: Any, suspended_on: Any) -> None:
        self._coro = coro
        self._next = suspended_on

    def __await__(self) -> Any:
        coro, nxt = self._coro, self._next
        while True:
            try:
                yield nxt
            except BaseException as exc:
                try:
                    nxt = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    nxt = coro.send(None)
                except StopIteration as stop:
                    return stop.value


def start_now(coro: Any) -> Resume | None:
    """Run ``coro`` up to its first suspension now, in the caller's turn (so what it does
    first, such as a log append, is ordered before anything later); None if it finished,
    else a ``Resume`` to await the rest. Its errors are raised as from the coroutine."""
    try:
        suspended_on = coro.send(None)
    except StopIteration:
        return None
    return Resume(coro, suspended_on)
