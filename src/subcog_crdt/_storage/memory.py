"""In-memory storage: nothing touches disk; the journal is bounded like the durable one."""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Sequence
from itertools import islice, pairwise
from typing import Any

from subcog_crdt._storage.base import JournalRecord, Retention, StoredState

__all__ = ["MemoryStorage"]

_CURSOR, _AT_MS, _NAMESPACE, _SESSION = (
    JournalRecord._fields.index(name) for name in ("cursor", "at_ms", "namespace", "session")
)


def _cursor_of(row: tuple[Any, ...]) -> Any:
    return row[_CURSOR]


class MemoryStorage:
    """Keeps everything in process memory (``data_dir=None``)."""

    def __init__(self, retention: Retention | None = None, *, keep_documents: bool = True) -> None:
        """``keep_documents=False`` drops document updates instead of keeping them: a node
        without a data directory holds its documents itself and never reopens storage, so
        a second copy would only cost memory (and compaction work)."""
        self.retention = retention or Retention()
        self._keep_documents = keep_documents
        # Plain tuples, not JournalRecords: a tuple of ints and strs is untracked by the
        # cyclic GC (a NamedTuple instance is not), so a long journal costs no GC time.
        self._journal: deque[tuple[Any, ...]] = deque()
        self._docs: dict[str, list[bytes]] = {}
        self._seq: dict[str, int] = {}
        self._tail_bytes: dict[str, int] = {}
        self._cursors: dict[str, int] = {}
        self._subscriptions: dict[str, frozenset[str]] = {}
        self._node_id: str | None = None
        self._oldest = 1
        self._pruned_max_at_ms = 0
        self._last_cursor = 0
        self._snapshot_bytes: dict[str, int] = {}
        self._in_order = True
        """Whether the journal's cursors increase (they do when commits come in cursor
        order, as the node makes them): then a read starts by bisection."""

    async def open(self, node_id: str) -> StoredState:
        if self._node_id is None:
            self._node_id = node_id
        return StoredState(
            node_id=self._node_id,
            docs={ns: list(u) for ns, u in self._docs.items()},
            last_cursor=self._last_cursor,
            cursors=dict(self._cursors),
            subscriptions=dict(self._subscriptions),
            snapshot_bytes=dict(self._snapshot_bytes),
        )

    async def commit(
        self, updates: Sequence[tuple[str, bytes]], journal: Sequence[JournalRecord]
    ) -> None:
        self.commit_nowait(updates, journal)

    def commit_nowait(
        self, updates: Sequence[tuple[str, bytes]], journal: Sequence[JournalRecord]
    ) -> None:
        for ns, update in updates:
            if not self._keep_documents:
                continue
            self._docs.setdefault(ns, []).append(update)
            self._seq[ns] = self._seq.get(ns, 0) + 1
            self._tail_bytes[ns] = self._tail_bytes.get(ns, 0) + len(update)
        if journal:
            j = self._journal
            if self._in_order and (
                (j and journal[0].cursor <= j[-1][_CURSOR])
                or any(a.cursor >= b.cursor for a, b in pairwise(journal))
            ):
                self._in_order = False
            j.extend(map(tuple, journal))
            self._last_cursor = journal[-1].cursor
            self._prune()

    def _prune(self) -> None:
        r = self.retention
        j = self._journal
        while len(j) > r.max_events:
            self._dropped(j.popleft())
        if r.max_age is not None:
            limit = int((time.time() - r.max_age) * 1000)
            while j and j[0][_AT_MS] < limit:
                self._dropped(j.popleft())

    def _dropped(self, row: tuple[Any, ...]) -> None:
        self._oldest = row[_CURSOR] + 1
        if row[_AT_MS] > self._pruned_max_at_ms:
            self._pruned_max_at_ms = row[_AT_MS]

    def tail_seq(self, namespace: str) -> int:
        return self._seq.get(namespace, 0)

    def tail_bytes(self, namespace: str) -> int:
        return self._tail_bytes.get(namespace, 0)

    async def compact(self, namespace: str, snapshot: bytes, upto_seq: int) -> None:
        docs = self._docs.get(namespace, [])
        # updates after upto_seq are the last (seq - upto_seq) entries
        keep = self._seq.get(namespace, 0) - upto_seq
        tail = docs[len(docs) - keep :] if keep > 0 else []
        self._docs[namespace] = [snapshot, *tail]
        self._snapshot_bytes[namespace] = len(snapshot)
        self._tail_bytes[namespace] = sum(len(u) for u in tail)

    async def save_cursor(self, session_id: str, cursor: int) -> None:
        self._cursors[session_id] = cursor

    async def save_subscriptions(self, session_id: str, namespaces: frozenset[str]) -> None:
        self._subscriptions[session_id] = frozenset(namespaces)

    async def read_journal(
        self,
        after: int,
        limit: int,
        *,
        namespaces: frozenset[str] | None = None,
        exclude_session: str | None = None,
        since_ms: int | None = None,
    ) -> list[JournalRecord]:
        self._prune()
        out: list[JournalRecord] = []
        j = self._journal
        # Skip what is at or before ``after`` without running Python over it: paging
        # through a long journal must not cost a Python pass from its start per page.
        start = bisect.bisect_right(j, after, key=_cursor_of) if self._in_order else 0
        for row in islice(j, start, None):
            if row[_CURSOR] <= after:
                continue
            if namespaces is not None and row[_NAMESPACE] not in namespaces:
                continue
            if exclude_session is not None and row[_SESSION] == exclude_session:
                continue
            if since_ms is not None and row[_AT_MS] < since_ms:
                continue
            out.append(JournalRecord._make(row))
            if len(out) >= limit:
                break
        return out

    def oldest_cursor(self) -> int:
        return self._oldest

    def pruned_max_at_ms(self) -> int:
        return self._pruned_max_at_ms

    async def aclose(self) -> None:
        return None
