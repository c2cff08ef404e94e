"""The event bus: fans events out to subscribers through bounded queues.

A subscriber that falls behind never makes the node hold unbounded memory: past
``maxsize`` queued events new ones are dropped and, once the consumer has read what was
queued, it receives one ``Lagged`` marker saying how many it missed and the cursor
to resync from.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterable

from subcog_crdt._core.events import Event, Lagged
from subcog_crdt._errors import InvalidArgument

__all__ = ["EventBus", "Listener", "Subscription"]

log = logging.getLogger(__name__)


class Subscription:
    """An async iterator of events (and ``Lagged`` markers). Subscribed from creation,
    not from the first iteration. ``close()`` ends the iteration."""

    def __init__(self, bus: EventBus, accept: Callable[[Event], bool], maxsize: int) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise InvalidArgument(f"maxsize must be an int >= 1, not {maxsize!r}")
        self._bus = bus
        self._namespaces: frozenset[str] | None = None
        """The namespaces whose events it is offered (None: all), as the bus indexes it."""
        self._accept = accept
        self._maxsize = maxsize
        self._queue: deque[Event] = deque()
        self._waiters: list[asyncio.Future[None]] = []
        """One per task waiting in ``__anext__`` (several tasks may read one stream)."""
        self._dropped = 0
        self._last_queued = 0
        self._lag_cursor = 0
        self._closed = False

    def _push(self, event: Event) -> None:
        # Closed by a listener of the same publish: the bus's snapshot still names it.
        if self._closed or not self._accept(event):
            return
        if self._dropped or len(self._queue) >= self._maxsize:
            if not self._dropped:
                self._lag_cursor = self._last_queued
            self._dropped += 1
            return
        self._queue.append(event)
        self._last_queued = event.cursor
        self._wake()

    def _wake(self) -> None:
        # Every waiting reader: those that find nothing wait again.
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def get_nowait(self) -> Event | Lagged | None:
        """The next queued item, or None if there is none right now."""
        if self._queue:
            return self._queue.popleft()
        if self._dropped:
            marker = Lagged(cursor=self._lag_cursor, dropped=self._dropped)
            self._dropped = 0
            return marker
        return None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event | Lagged:
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            if self._closed:
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            # Held while a consumer waits: the bus holds streams weakly, and a consumer
            # task nobody references, parked here, would be collectable with its stream.
            self._bus._waiting.add(self)
            try:
                await waiter
            finally:
                if waiter in self._waiters:  # not woken (cancelled, a timeout)
                    self._waiters.remove(waiter)
                if not self._waiters:
                    self._bus._waiting.discard(self)

    async def next(self, timeout: float | None = None) -> Event | Lagged:
        """The next item, waiting at most ``timeout`` seconds (TimeoutError)."""
        item = self.get_nowait()
        if item is not None:  # no timer needed: the common case under load
            return item
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bus._subs.discard(self)
            self._bus._unindex(self)
            self._wake()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _reraise(exc: BaseException) -> None:
    raise exc


class Listener:
    """A callback called with each event as the node publishes it (``Session.listen``):
    on the event loop, inside the write or the receive that made the event, before the
    next one. No queue, so it never lags; ``close()`` (or leaving its ``with`` block)
    stops it. Unlike a ``Subscription`` the bus holds it until closed."""

    def __init__(
        self, bus: EventBus, accept: Callable[[Event], bool], callback: Callable[[Event], object]
    ) -> None:
        if not callable(callback):
            raise InvalidArgument(f"callback must be callable, not {callback!r}")
        if inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
            type(callback).__call__
        ):
            # Its coroutine would be made and never awaited: the event lost, silently.
            raise InvalidArgument(
                "callback must be a plain function: for async work, iterate "
                "session.events() or start a task from the callback"
            )
        self._bus = bus
        self._namespaces: frozenset[str] | None = None
        self._accept = accept
        self._callback = callback
        self._closed = False

    def _push(self, event: Event) -> None:
        # Closed by an earlier callback of the same publish: the bus's snapshot still
        # names it.
        if self._closed or not self._accept(event):
            return
        try:
            result = self._callback(event)
        except Exception:
            raise  # logged by the bus, as any subscriber's
        except (KeyboardInterrupt, SystemExit) as exc:
            # Not in the middle of a write or a receive (what the node took would not be
            # stored): the loop gets it right after this turn's step.
            asyncio.get_running_loop().call_soon(_reraise, exc)
            return
        except BaseException:
            # CancelledError (from a future the callback touched), say: it must not pass
            # for a cancellation of the write or the receive that published the event.
            log.exception(
                "a listener failed on %s event %d; skipped for it",
                type(event).__name__,
                event.cursor,
            )
            return
        if result is not None and inspect.iscoroutine(result):
            # A callable returning a coroutine (a lambda around an async function): it
            # would never run.
            result.close()
            log.error(
                "a listener returned a coroutine for %s event %d; it was not run: "
                "listen() takes a plain function (start a task from it for async work)",
                type(event).__name__,
                event.cursor,
            )

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bus._subs.discard(self)
            self._bus._listeners.discard(self)
            self._bus._unindex(self)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Delivers each published event to every subscription that accepts it. Subscriptions
    are indexed by the namespaces they follow, so an event is offered only to those that
    may want it (a node with thousands of streams pays per interested stream)."""

    def __init__(self) -> None:
        # Weakly: a stream its caller dropped without close() (``async for ...: break``)
        # must not stay subscribed, queueing events, for the node's lifetime.
        self._subs: weakref.WeakSet[Subscription | Listener] = weakref.WeakSet()
        self._any: weakref.WeakSet[Subscription | Listener] = weakref.WeakSet()
        self._by_ns: dict[str, weakref.WeakSet[Subscription | Listener]] = {}
        self._waiting: set[Subscription] = set()
        self._listeners: set[Listener] = set()
        """Held until closed: a callback is handed over, not iterated, so a caller that
        keeps no reference to its ``Listener`` still means it to run."""
        self._closed = False
        self._targets: dict[str, tuple[weakref.ref[Subscription | Listener], ...]] = {}
        """Per namespace, references to the subscriptions offered its events: built on
        first use, dropped whenever the index changes. Publishing runs inside every write,
        and iterating WeakSets costs a dozen Python calls each time."""

    def subscribe(
        self,
        accept: Callable[[Event], bool],
        maxsize: int = 10_000,
        namespaces: frozenset[str] | None = None,
    ) -> Subscription:
        """A new subscription, offered the events of ``namespaces`` (None: every one) that
        ``accept`` takes; an ended one if the bus is closed (no event can come)."""
        sub = Subscription(self, accept, maxsize)
        if self._closed:
            sub.close()
        else:
            self._subs.add(sub)
            self._index(sub, namespaces)
        return sub

    def listen(
        self,
        accept: Callable[[Event], bool],
        callback: Callable[[Event], object],
        namespaces: frozenset[str] | None = None,
    ) -> Listener:
        """A new listener calling ``callback`` with the events of ``namespaces`` (None:
        every one) that ``accept`` takes; a closed one if the bus is closed."""
        listener = Listener(self, accept, callback)
        if self._closed:
            listener.close()
        else:
            self._subs.add(listener)
            self._listeners.add(listener)
            self._index(listener, namespaces)
        return listener

    def retarget(self, sub: Subscription | Listener, namespaces: frozenset[str] | None) -> None:
        """Offer ``sub`` the events of other namespaces from now on."""
        if sub._closed:
            return
        self._unindex(sub)
        self._index(sub, namespaces)

    def _index(self, sub: Subscription | Listener, namespaces: frozenset[str] | None) -> None:
        self._targets.clear()
        sub._namespaces = namespaces
        if namespaces is None:
            self._any.add(sub)
            return
        by_ns = self._by_ns
        for ns in namespaces:
            subs = by_ns.get(ns)
            if subs is None:
                subs = by_ns[ns] = weakref.WeakSet()
            subs.add(sub)

    def _unindex(self, sub: Subscription | Listener) -> None:
        self._targets.clear()
        if sub._namespaces is None:
            self._any.discard(sub)
            return
        for ns in sub._namespaces:
            subs = self._by_ns.get(ns)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_ns[ns]

    def publish(self, events: Iterable[Event]) -> None:
        """Never raises: publishing runs inside every write (after the document changed,
        before it is persisted), so a failing subscriber must not fail someone's write.
        Its error is logged and the event is skipped for that subscriber alone."""
        targets = self._targets
        for ev in events:
            refs = targets.get(ev.namespace)
            if refs is None:
                refs = targets[ev.namespace] = self._refs_for(ev.namespace)
            for ref in refs:
                sub = ref()
                if sub is None:
                    continue  # collected (dropped without close): the WeakSets forget it
                try:
                    sub._push(ev)
                except Exception:
                    log.exception(
                        "a subscriber failed on %s event %d; skipped for it",
                        type(ev).__name__,
                        ev.cursor,
                    )

    def _refs_for(self, namespace: str) -> tuple[weakref.ref[Subscription | Listener], ...]:
        these = self._by_ns.get(namespace)
        return tuple(weakref.ref(sub) for sub in (*(these or ()), *self._any))

    def close(self) -> None:
        self._closed = True
        for sub in list(self._subs):
            sub.close()
