"""The storage contract.

Storage is dumb on purpose: it keeps opaque Yjs update bytes per namespace (a snapshot plus
a tail of updates), the event journal as small rows, and per-session cursors. It knows
nothing about memories; the node rebuilds everything else from the documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

from subcog_crdt._errors import InvalidArgument

__all__ = ["Durability", "JournalRecord", "Retention", "Storage", "StoredState"]

Durability = Literal["process", "fsync"]


class JournalRecord(NamedTuple):
    """One event as the journal keeps it; the event itself is rebuilt from the document.
    (A named tuple: one is made per event, and tuples are cheap to build.)"""

    cursor: int
    at_ms: int
    """The write's wall-clock time in ms (for ``since=<datetime>``)."""
    namespace: str
    kind: str
    """``captured``, ``updated``, ``deleted`` or ``conflict``."""
    write_id: str
    session: str
    """The session that caused it (the winner's, for a conflict)."""
    other: str = ""
    """For a conflict: the losing write's id."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of the journal is kept: the newest ``max_events`` no older than ``max_age``
    seconds (None: no age limit)."""

    max_events: int = 100_000
    max_age: float | None = 30 * 24 * 3600.0

    def __post_init__(self) -> None:
        n = self.max_events
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgument(f"Retention.max_events must be an int >= 1, not {n!r}")
        age = self.max_age
        if age is not None and (
            isinstance(age, bool) or not isinstance(age, int | float) or not age > 0
        ):
            raise InvalidArgument(f"Retention.max_age must be seconds > 0 or None, not {age!r}")


@dataclass
class StoredState:
    """What ``Storage.open`` returns."""

    node_id: str | None = None
    docs: dict[str, list[bytes]] = field(default_factory=dict)
    """Per namespace, the updates to apply in order (snapshot first)."""
    last_cursor: int = 0
    cursors: dict[str, int] = field(default_factory=dict)
    """Per session id, its ``last_sync`` cursor."""
    subscriptions: dict[str, frozenset[str]] = field(default_factory=dict)
    """Per session id, the namespaces it last subscribed to."""
    snapshot_bytes: dict[str, int] = field(default_factory=dict)
    """Per compacted namespace, the size of its snapshot (the first of its ``docs``): the
    node's next compaction threshold grows with it, across restarts too."""


class Storage(Protocol):
    """What the node needs from storage. All methods run on the event loop and must not
    block it (implementations move disk work to their own thread)."""

    async def open(self, node_id: str) -> StoredState:
        """Open (creating if new) and load. ``node_id`` is stored if none is yet."""
        ...

    async def commit(
        self, updates: Sequence[tuple[str, bytes]], journal: Sequence[JournalRecord]
    ) -> None:
        """Make these durable (per the durability setting) before returning. Concurrent
        callers are grouped into one commit."""
        ...

    def tail_seq(self, namespace: str) -> int:
        """Sequence number of the last committed update of ``namespace`` (0: none)."""
        ...

    def tail_bytes(self, namespace: str) -> int:
        """Bytes of updates stored for ``namespace`` since its snapshot."""
        ...

    async def compact(self, namespace: str, snapshot: bytes, upto_seq: int) -> None:
        """Replace the snapshot with ``snapshot``, which covers every update up to
        ``upto_seq``; drop those updates."""
        ...

    async def save_cursor(self, session_id: str, cursor: int) -> None: ...

    async def save_subscriptions(self, session_id: str, namespaces: frozenset[str]) -> None:
        """Keep a session's subscriptions, so that registering it again after a restart
        resumes them with its cursor."""
        ...

    async def read_journal(
        self,
        after: int,
        limit: int,
        *,
        namespaces: frozenset[str] | None = None,
        exclude_session: str | None = None,
        since_ms: int | None = None,
    ) -> list[JournalRecord]:
        """Records with ``cursor > after`` (and ``at_ms >= since_ms``), oldest first."""
        ...

    def oldest_cursor(self) -> int:
        """The first cursor still kept (retention); 1 when nothing was ever dropped."""
        ...

    def pruned_max_at_ms(self) -> int:
        """The largest ``at_ms`` of any record retention ever dropped; 0 when none was.
        Kept across reopens. Records are not in ``at_ms`` order (an update received from
        a peer keeps its own, older time), so this, not the oldest record kept, tells
        whether a read with ``since_ms`` can have missed something: it can iff
        ``since_ms <= pruned_max_at_ms()``. Exact as of the last ``read_journal()``,
        like ``oldest_cursor``."""
        ...

    async def aclose(self) -> None: ...
