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
