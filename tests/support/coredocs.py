"""Namespace documents driven by hand, for core tests of clocks and conflicts: a document
with an injectable wall clock, delivery between two of them, and raw entries from a
foreign (or hostile) Yjs writer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pycrdt import Doc, Map

from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.events import Event
from subcog_crdt._core.hlc import Hlc

NOW = 1_800_000_000_000


def stamp(wall: int, counter: int = 0) -> str:
    return f"{wall:013d}{counter:06x}"


def core_doc(node_id: str, clock: Callable[[], int]) -> NamespaceDoc:
    return NamespaceDoc("ns", node_id=node_id, hlc=Hlc(clock=clock), next_cursor=lambda: 1)


def send(src: NamespaceDoc, dst: NamespaceDoc) -> list[Event]:
    """Deliver what ``dst`` misses of ``src``; return the events ``dst`` raised."""
    return dst.apply_update(src.diff(dst.state_vector()))


def foreign_update(doc: NamespaceDoc, entries: dict[str, str]) -> bytes:
    """An update from another Yjs client (a foreign or hostile writer) adding raw entries
    to what ``doc`` holds."""
    other: Doc[Any] = Doc()
    other.apply_update(doc.diff())
    before = other.get_state()
    m = other.get("entries", type=Map)
    for key, value in entries.items():
        m[key] = value
    return other.get_update(before)


class Counter:
    """A shared event cursor, so cursors are compared too (core_doc's is constant)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def still_doc(node: str = "00000000000000aa", cursor: Counter | None = None) -> NamespaceDoc:
    """A document whose wall clock never moves: every stamp is NOW plus a counter, so two
    documents driven alike stamp alike however often they read the clock."""
    return NamespaceDoc(
        "ns", node_id=node, hlc=Hlc(clock=lambda: NOW), next_cursor=cursor or Counter()
    )


def restarted(
    src: NamespaceDoc, cursor: Counter | None = None, *, resolve: bool = False
) -> NamespaceDoc:
    """A node restarted from ``src``'s entries (resolved at once with ``resolve``)."""
    doc = still_doc(src.node_id, cursor)
    doc.load([src.diff()])
    if doc.max_stamp:
        doc._hlc.observe(doc.max_stamp)
    if resolve:
        doc.resolve_all()
    return doc


def edit(doc: NamespaceDoc, kind: str, mid: str, value: Any = None) -> None:
    """A write of session "s" to memory ``mid``: ``update`` (content ``value``), ``retag``
    (tags ``value``) or ``delete``."""
    if kind == "update":
        doc.update("s", mid, {"content": value})
    elif kind == "retag":
        doc.update("s", mid, {"tags": value})
    else:
        doc.delete("s", mid)


def compact(doc: NamespaceDoc) -> set[str]:
    """The memories held in the written-once form (to know the tests reach it)."""
    return {mid for mid, m in doc._mems.items() if isinstance(m, tuple)}


def doc_state(doc: NamespaceDoc, query: str, *, at: bool = False) -> Any:
    """What a document shows: entries, ids, memories, writes, and recall of ``query``
    (with ``at``, also every write's ``memory_at``)."""
    ids = sorted(doc.memory_ids(True))
    return (
        dict(doc.entries.items()),
        ids,
        sorted(doc.memory_ids()),
        [doc.get(mid) for mid in ids],
        [doc.writes(mid) for mid in ids],
        [[doc.memory_at(w.key) for w in doc.writes(mid)] for mid in ids] if at else None,
        [doc.has(mid) for mid in ids],
        doc.search_ids(query, 50),
    )
