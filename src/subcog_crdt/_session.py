"""A local session: the handle an agent uses to capture, recall and follow memories."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from subcog_crdt._bus import Listener, Subscription
from subcog_crdt._core.events import Conflict, Event
from subcog_crdt._core.memory import Memory
from subcog_crdt._core.schema import check_bool
from subcog_crdt._errors import ClosedError, InvalidArgument
from subcog_crdt._sessions import SessionInfo

if TYPE_CHECKING:
    from subcog_crdt._api import ConversationsApi

__all__ = ["Session", "SyncBatch"]

_TAGS_AS_GIVEN = (str, dict, list, tuple, set, frozenset)
"""Tags of these types go to ``check_tags`` as they are (a tuple: ``isinstance`` with a
``X | Y`` union builds the union at every call)."""


@dataclass(frozen=True, slots=True)
class SyncBatch:
    """What ``Session.sync`` returns."""

    events: list[Event]
    cursor: int
    """Pass this as ``since=`` to continue from here (``"last"`` does it for you)."""
    complete: bool
    """False when events older than the journal's retention were asked for: some are gone,
    so read current memories (``recall`` / ``api.get``) instead of relying on events."""
    more: bool = False
    """True when ``limit`` cut the batch short; call again to get the rest."""


class Session:
    """An agent session registered on a node (``api.register_session``)."""

    def __init__(
        self,
        api: ConversationsApi,
        session_id: str,
        user_id: str,
        subscriptions: frozenset[str],
        last_cursor: int,
    ) -> None:
        self._api = api
        self.id = session_id
        self.user_id = user_id
        self._subscriptions = subscriptions
        self.last_cursor = last_cursor
        """The cursor ``sync(since="last")`` continues from."""
        self.last_sync: datetime | None = None
        self._sync_lock = asyncio.Lock()
        self._active = True
        self._streams: weakref.WeakSet[Subscription | Listener] = weakref.WeakSet()

    @property
    def subscriptions(self) -> frozenset[str]:
        """The namespaces whose events this session gets."""
        return self._subscriptions

    def _set_subscriptions(self, namespaces: frozenset[str]) -> None:
        """Through ``register_session`` only (the registry counts them). Its open streams
        follow (see events()): the bus offers them the new namespaces."""
        self._subscriptions = namespaces
        for stream in list(self._streams):
            self._api._bus.retarget(stream, namespaces)

    def _check_active(self) -> None:
        """ClosedError if the node is not open, or this session was unregistered."""
        self._api._check_open()
        if not self._active:
            raise ClosedError(f"session {self.id!r} was unregistered")

    def _end(self) -> None:
        """Unregistered: later calls raise ``ClosedError``, event streams end."""
        self._active = False
        for stream in list(self._streams):
            stream.close()

    def info(self) -> SessionInfo:
        return SessionInfo(
            id=self.id,
            user_id=self.user_id,
            node_id=self._api.node_id,
            subscriptions=tuple(sorted(self.subscriptions)),
            is_local=True,
            last_sync=self.last_sync,
        )

    async def capture(
        self,
        namespace: str,
        content: str,
        *,
        tags: Iterable[str] = (),
        metadata: dict[str, Any] | None = None,
        domain: str | None = None,
        status: str | None = None,
        source: str | None = None,
        expires_at: datetime | str | None = None,
    ) -> Memory:
        """Capture a memory. The same content (ignoring whitespace and case) already in the
        namespace yields that memory, with this session added to ``captured_by`` and
        ``tags`` added to its tags; its other fields are left as they are (change them
        with ``update``)."""
        try:
            # What check_tags judges goes as it is (it refuses a str or a dict, and orders
            # a set); any other iterable (a generator) becomes a list.
            fields: dict[str, Any] = {
                "tags": tags if isinstance(tags, _TAGS_AS_GIVEN) else list(tags)
            }
        except TypeError:  # None, a number...
            raise InvalidArgument(
                f"tags must be a list of strings, not {type(tags).__name__}"
            ) from None
        # (One test per field, not a loop over pairs built per call: this is the path of
        # every capture.)
        if metadata is not None:  # a falsy non-dict is refused as update refuses it
            fields["metadata"] = metadata
        if domain is not None:
            fields["domain"] = domain
        if status is not None:
            fields["status"] = status
        if source is not None:
            fields["source"] = source
        if expires_at is not None:
            fields["expires_at"] = expires_at
        return await self._api._capture(self, namespace, content, fields)

    async def capture_many(
        self, namespace: str, items: Iterable[str | dict[str, Any]]
    ) -> list[Memory]:
        """Capture several memories in one transaction and one durable commit. Each item
        is a content string or a dict with ``content`` and optional fields. If one item is
        invalid, nothing is captured.

        The batch runs with Python's cyclic garbage collector paused (``gc.disable``, then
        ``gc.enable`` if it was on; it runs as usual right after): a batch makes no
        reference cycles, and a collection inside it walks every memory the node holds.
        Peers' updates are applied the same way."""
        return await self._api._capture_many(self, namespace, items)

    async def update(
        self, memory_id: str, *, expected_version: int | None = None, **fields: Any
    ) -> Memory:
        """Change fields of a memory (``content``, ``tags``, ``metadata``, ``domain``,
        ``status``, ``source``, ``expires_at``). With ``expected_version`` a stale version
        raises ``ConflictError`` and changes nothing."""
        return await self._api._update(self, memory_id, fields, expected_version)

    async def delete(self, memory_id: str, *, expected_version: int | None = None) -> Memory:
        """Delete a memory (a tombstone). Capturing the content it was first captured with
        revives it (docs/schema.md, "Memory ids")."""
        return await self._api._delete(self, memory_id, expected_version)

    def recall(
        self,
        query: str,
        *,
        namespace: str | None = None,
        namespaces: Iterable[str] | None = None,
        tags: Iterable[str] = (),
        limit: int = 10,
    ) -> list[Memory]:
        """Ranked full-text search (BM25 over content and tags), best first, in one
        ``namespace`` or several ``namespaces``; without either, in this session's
        subscriptions. With ``tags``, only memories holding every one of them."""
        self._check_active()
        if namespace is None and namespaces is None:
            namespaces = sorted(self.subscriptions)
        return self._api.recall(
            query, namespace=namespace, namespaces=namespaces, tags=tags, limit=limit
        )

    async def sync(
        self,
        since: str | int | datetime = "last",
        *,
        include_own: bool = False,
        limit: int = 1000,
    ) -> SyncBatch:
        """Events in this session's subscriptions since ``"last"`` (what this session has
        not yet seen; exactly once, also across restarts of a durable node), a cursor, or
        a datetime. Own events (of this session on this node) are left out unless
        ``include_own``."""
        return await self._api._sync(self, since, include_own, limit)

    def events(self, *, include_own: bool = False, maxsize: int = 10_000) -> Subscription:
        """Live events for this session's subscriptions (as they are at each event), from
        now on (subscribed when called, not at first iteration). Own events (of this
        session on this node) are left out unless ``include_own``; ``maxsize`` bounds the
        queue (see ``Lagged``)."""
        self._check_active()
        check_bool("include_own", include_own)  # (maxsize: checked by the Subscription)
        stream = self._api._bus.subscribe(self._accepts(include_own), maxsize, self.subscriptions)
        self._streams.add(stream)
        return stream

    def listen(self, callback: Callable[[Event], object], *, include_own: bool = False) -> Listener:
        """Call ``callback(event)`` with each event ``events()`` would deliver, as the node
        publishes it: on the event loop, inside the write or the receive that made it,
        one loop iteration before an ``async for`` over ``events()`` would have it.

        The callback must return quickly and not block: the node's links wait for it.
        For async work, start a task from it. An exception it raises is logged and the
        event skipped for it alone. Until ``close()`` (or the end of a ``with`` block),
        or until the session is unregistered."""
        self._check_active()
        check_bool("include_own", include_own)
        listener = self._api._bus.listen(self._accepts(include_own), callback, self.subscriptions)
        self._streams.add(listener)
        return listener

    def _accepts(self, include_own: bool) -> Callable[[Event], bool]:
        """What a stream or listener of this session takes."""
        me = self.id
        node = self._api.node_id

        def accept(ev: Event) -> bool:
            # Read at each event: registering the session again with other subscriptions
            # also changes what its open streams get.
            if ev.namespace not in self.subscriptions:
                return False
            # Own means this session on this node: a session of the same name on another
            # node is someone else. A conflict concerns both writers, so it is never
            # filtered out as "own".
            return (
                include_own
                or ev.source_session != me
                or ev.node_id != node
                or isinstance(ev, Conflict)
            )

        return accept

    def __repr__(self) -> str:
        subs = sorted(self.subscriptions)
        return f"<Session {self.id!r} on {self._api.node_id} subscribed to {subs}>"
