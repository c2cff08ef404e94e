"""Memories and the rule that derives a memory from its writes.

A memory is a pure function of its set of writes: sort them by ``(stamp, session, node)``
and fold. Every node that holds the same writes therefore shows the same memory, in
whatever order the writes arrived.

Fold rules:

- ``capture`` of an absent or deleted memory (re)creates it from the write's fields;
  ``capture`` of a live memory adds the session to ``captured_by`` and its tags to ``tags``
  (capturing the same fact twice never overwrites anything);
- ``update`` sets the fields it names (later wins, field by field);
- ``delete`` marks the memory deleted (a tombstone; a later capture revives it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from subcog_crdt._core.hlc import stamp_datetime
from subcog_crdt._core.schema import FIELDS, MAX_MEMORY_TAGS, Write, copy_json, normalise
from subcog_crdt._core.slots import slot_setters

__all__ = [
    "FoldState",
    "Memory",
    "WriteConflict",
    "find_conflicts",
    "first_capture",
    "fold",
    "fold_state",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Memory:
    """One memory as every node derives it from its writes."""

    id: str
    namespace: str
    content: str
    tags: tuple[str, ...]
    metadata: Mapping[str, Any]
    source_session: str
    """The session that captured it first."""
    captured_by: tuple[str, ...]
    """Every session that captured it, first capturer first."""
    created_at: datetime
    updated_at: datetime
    updated_by: str
    version: int
    """The number of writes folded into this memory; use with ``expected_version=``."""
    deleted: bool = False
    domain: str | None = None
    status: str | None = None
    source: str | None = None
    expires_at: datetime | None = None
    clock: str = field(default="", repr=False)
    """The stamp of the latest write (a hybrid-logical-clock string)."""

    def __repr__(self) -> str:
        # Short enough for a log line: content (up to 256K characters) cut, its length given.
        content = (
            self.content
            if len(self.content) <= _REPR_CONTENT
            else (f"{self.content[:_REPR_CONTENT]}…")
        )
        return (
            f"Memory(id={self.id!r}, namespace={self.namespace!r}, content={content!r}"
            f" ({len(self.content)} chars), tags={self.tags!r}, version={self.version},"
            f" deleted={self.deleted}, updated_by={self.updated_by!r})"
        )


_REPR_CONTENT = 80


_s = slot_setters(Memory, 17)


def _new_memory(
    id: str,
    namespace: str,
    content: str,
    tags: tuple[str, ...],
    metadata: Mapping[str, Any],
    source_session: str,
    captured_by: tuple[str, ...],
    created_at: datetime,
    updated_at: datetime,
    updated_by: str,
    version: int,
    deleted: bool,
    domain: str | None,
    status: str | None,
    source: str | None,
    expires_at: datetime | None,
    clock: str,
) -> Memory:
    """``Memory(...)`` filling the slots directly: a frozen dataclass's ``__init__`` sets
    each field through ``object.__setattr__`` (4.6 us for these 17 fields), this takes
    ~1.5 us, on a path taken for every capture. The object is the same."""
    m: Memory = object.__new__(Memory)
    s = _s
    s["id"](m, id)
    s["namespace"](m, namespace)
    s["content"](m, content)
    s["tags"](m, tags)
    s["metadata"](m, metadata)
    s["source_session"](m, source_session)
    s["captured_by"](m, captured_by)
    s["created_at"](m, created_at)
    s["updated_at"](m, updated_at)
    s["updated_by"](m, updated_by)
    s["version"](m, version)
    s["deleted"](m, deleted)
    s["domain"](m, domain)
    s["status"](m, status)
    s["source"](m, source)
    s["expires_at"](m, expires_at)
    s["clock"](m, clock)
    return m


@dataclass(frozen=True, slots=True)
class WriteConflict:
    """Two concurrent writes set the same field to different values; ``winner`` is later."""

    winner: Write
    loser: Write
    fields: tuple[str, ...]


class FoldState:
    """A fold in progress: the writes of one memory folded so far, in order. Folding the
    next write in order is ``step``; ``memory`` is the memory they make. A node
    keeps one per memory with several writes, so a write after the latest costs the same
    whatever the length of the history."""

    __slots__ = (
        "captured_by",
        "count",
        "created",
        "deleted",
        "exists",
        "last",
        "moved",
        "seen",
        "source_session",
        "values",
    )

    def __init__(self) -> None:
        self.exists = False
        self.deleted = False
        self.values: dict[str, Any] = {}
        # A dict as an ordered set: a fact captured by thousands of sessions (or again
        # and again) must not cost a scan per capture.
        self.captured_by: dict[str, None] = {}
        self.source_session = ""
        self.created = ""
        self.count = 0
        self.last: Write | None = None
        self.moved = False
        """Whether an update ever set the content (see "moved here" in docs/schema.md)."""
        self.seen: dict[str, str] = {}
        """Per node, the newest stamp of its updates and deletes folded so far
        (``Write.seen``: captures never conflict)."""

    def step(self, w: Write) -> None:
        """Fold ``w``, which must come after every write folded so far (by ``order``)."""
        self.count += 1
        self.last = w
        if w.op != "capture" and w.at > self.seen.get(w.node, ""):
            self.seen[w.node] = w.at
        if w.op == "capture":
            if not self.exists or self.deleted:
                if not self.exists:
                    self.created = w.at
                    self.source_session = w.session
                self.exists = True
                self.deleted = False
                self.values.update(w.changes)
            elif "tags" in w.changes:
                tags = list(self.values.get("tags", ()))
                seen = set(tags)
                for t in w.changes["tags"]:
                    if len(tags) >= MAX_MEMORY_TAGS:
                        break
                    if t not in seen:
                        seen.add(t)
                        tags.append(t)
                self.values["tags"] = tags
            self.captured_by.setdefault(w.session)
        elif w.op == "update":
            if "content" in w.changes:
                self.moved = True
            if self.exists:
                self.values.update(w.changes)
        elif self.exists:
            self.deleted = True

    def copy(self) -> FoldState:
        """An independent copy (values are shared: they are never mutated in place)."""
        c = FoldState()
        c.exists, c.deleted, c.count, c.last, c.moved = (
            self.exists,
            self.deleted,
            self.count,
            self.last,
            self.moved,
        )
        c.values = dict(self.values)
        c.captured_by = dict(self.captured_by)
        c.seen = dict(self.seen)
        c.source_session, c.created = self.source_session, self.created
        return c

    def memory(self, namespace: str) -> Memory | None:
        """The memory the writes folded so far make (``None``: never captured)."""
        last = self.last
        if not self.exists or last is None:
            return None
        v = self.values
        expires = v.get("expires_at")
        meta = v.get("metadata")
        return Memory(
            id=last.memory_id,
            namespace=namespace,
            content=v["content"],
            tags=tuple(v.get("tags", ())),
            metadata=_public_metadata(meta) if meta else _EMPTY,
            source_session=self.source_session,
            captured_by=tuple(self.captured_by),
            created_at=stamp_datetime(self.created),
            updated_at=stamp_datetime(last.at),
            updated_by=last.session,
            version=self.count,
            deleted=self.deleted,
            domain=v.get("domain"),
            status=v.get("status"),
            source=v.get("source"),
            expires_at=datetime.fromisoformat(expires) if expires else None,
            clock=last.at,
        )


def _public_metadata(meta: dict[str, Any]) -> Mapping[str, Any]:
    """Read-only at the top; nested dicts and lists are the node's own, so a caller gets
    copies of those (rare: most metadata is flat)."""
    for v in meta.values():
        if type(v) is dict or type(v) is list:
            return MappingProxyType(copy_json(meta))
    return MappingProxyType(meta)


def fold_state(writes: Iterable[Write]) -> FoldState:
    """Fold writes given in any order."""
    st = FoldState()
    for w in sorted(writes, key=lambda w: w.order):
        st.step(w)
    return st


def first_capture(namespace: str, w: Write) -> Memory:
    """``fold(namespace, [w])`` for a single capture, without the general machinery."""
    return captured_memory(namespace, w.memory_id, w.at, w.session, w.changes)


def captured_memory(
    namespace: str, memory_id: str, at: str, session: str, v: dict[str, Any]
) -> Memory:
    """The memory that one capture (stamped ``at``, setting ``v``) makes."""
    when = stamp_datetime(at)
    if len(v) == 1:  # bare content (most captures): nothing else to look up
        return _new_memory(
            memory_id, namespace, v["content"], (), _EMPTY, session, (session,), when, when,
            session, 1, False, None, None, None, None, at,
        )  # fmt: skip
    meta = v.get("metadata")
    expires = v.get("expires_at")
    return _new_memory(
        memory_id,
        namespace,
        v["content"],
        tuple(v.get("tags", ())),
        MappingProxyType(meta) if meta else _EMPTY,
        session,
        (session,),
        when,
        when,
        session,
        1,
        False,
        v.get("domain"),
        v.get("status"),
        v.get("source"),
        datetime.fromisoformat(expires) if expires else None,
        at,
    )


def fold(namespace: str, writes: Iterable[Write]) -> Memory | None:
    """Derive a memory from its writes (in any order); ``None`` if never captured."""
    ordered = sorted(writes, key=lambda w: w.order)
    if len(ordered) == 1 and ordered[0].op == "capture":
        return first_capture(namespace, ordered[0])
    return fold_state(ordered).memory(namespace)


def _effect(w: Write) -> dict[str, Any]:
    if w.op == "delete":
        return {"deleted": True}
    return w.changes


def _differs(name: str, a: Any, b: Any) -> bool:
    if name == "content":
        return bool(normalise(a) != normalise(b))
    return bool(a != b)


def find_conflicts(new: Write, others: Iterable[Write]) -> list[WriteConflict]:
    """Conflicts between ``new`` and earlier-known writes of the same memory.

    Two writes are concurrent when neither writer had folded the other (``Write.saw``:
    by its ``seen`` per node, or else its ``base`` stamp). Captures never conflict (they
    merge); a delete conflicts with any concurrent update, since it hides that update's
    values, and wins it whichever is later. Of two updates, the later wins.
    """
    if new.op == "capture":
        return []
    out: list[WriteConflict] = []
    for old in others:
        if old.op == "capture" or old.key == new.key:
            continue
        if new.saw(old) or old.saw(new):
            continue
        a, b = _effect(new), _effect(old)
        if new.op == "delete" or old.op == "delete":
            if new.op == old.op:
                continue
            names = tuple(sorted(set(a) | set(b)))
            # The delete is what takes effect, whichever is later: an update never
            # revives a deleted memory (only a capture does).
            if new.op == "delete":
                out.append(WriteConflict(new, old, names))
            else:
                out.append(WriteConflict(old, new, names))
            continue
        names = tuple(n for n in FIELDS if n in a and n in b and _differs(n, a[n], b[n]))
        if not names:
            continue
        if new.order > old.order:
            out.append(WriteConflict(new, old, names))
        else:
            out.append(WriteConflict(old, new, names))
    return out
