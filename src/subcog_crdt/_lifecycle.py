"""Lifecycle helpers: ``async with`` closing for long-lived objects, and cancelling a
owned task without swallowing our own cancellation."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, Self

__all__ = ["AsyncClosing", "cancel_and_wait"]

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
