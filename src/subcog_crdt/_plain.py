"""Plain JSON-ready views of the public objects, for the MCP server, HTTP push and the CLI.

One place decides how a memory, an event or a session looks outside Python, so an agent
reading MCP tool results, an SSE stream or ``subcog-crdt sync --json`` sees the same
shapes. Datetimes are ISO 8601 strings in UTC; tuples are lists.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from subcog_crdt._core.events import Captured, Conflict, Event, Lagged, Updated
from subcog_crdt._core.memory import Memory
from subcog_crdt._core.schema import Write, copy_json

if TYPE_CHECKING:
    from subcog_crdt._api import PeerInfo
    from subcog_crdt._session import SyncBatch
    from subcog_crdt._sessions import SessionInfo

__all__ = [
    "batch_plain",
    "event_plain",
    "lagged_plain",
    "memory_plain",
    "peer_plain",
    "session_plain",
    "write_plain",
]


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).isoformat()


def _values(changes: Any) -> Any:
    """A change set with datetimes as strings (``expires_at``) and copies of the rest."""
    out = copy_json(dict(changes))
    for name, value in out.items():
        if isinstance(value, datetime):
            out[name] = _iso(value)
        elif isinstance(value, tuple):
            out[name] = list(value)
    return out


def memory_plain(m: Memory) -> dict[str, Any]:
    return {
        "id": m.id,
        "namespace": m.namespace,
        "content": m.content,
        "tags": list(m.tags),
        "metadata": copy_json(dict(m.metadata)),
        "source_session": m.source_session,
        "captured_by": list(m.captured_by),
        "created_at": _iso(m.created_at),
        "updated_at": _iso(m.updated_at),
        "updated_by": m.updated_by,
        "version": m.version,
        "deleted": m.deleted,
        "domain": m.domain,
        "status": m.status,
        "source": m.source,
        "expires_at": _iso(m.expires_at),
    }


def write_plain(w: Write) -> dict[str, Any]:
    return {
        "memory_id": w.memory_id,
        "at": w.at,
        "session": w.session,
        "node": w.node,
        "op": w.op,
        "changes": _values(w.changes),
    }


def event_plain(ev: Event) -> dict[str, Any]:
    """``type`` is ``captured``, ``updated``, ``deleted`` or ``conflict``."""
    out: dict[str, Any] = {
        "type": ev.kind,
        "cursor": ev.cursor,
        "namespace": ev.namespace,
        "memory_id": ev.memory_id,
        "source_session": ev.source_session,
        "node_id": ev.node_id,
        "write_id": ev.write_id,
        "at": _iso(ev.at),
    }
    if isinstance(ev, Captured):
        out["memory"] = memory_plain(ev.memory)
    elif isinstance(ev, Updated):
        out["changes"] = _values(ev.changes)
    elif isinstance(ev, Conflict):
        out["winner"] = write_plain(ev.winner)
        out["loser"] = write_plain(ev.loser)
        out["fields"] = list(ev.fields)
    return out


def lagged_plain(marker: Lagged) -> dict[str, Any]:
    """A stream's gap marker: catch up with ``sync(since=cursor)``."""
    return {"type": "lagged", "cursor": marker.cursor, "dropped": marker.dropped}


def batch_plain(batch: SyncBatch) -> dict[str, Any]:
    return {
        "events": [event_plain(ev) for ev in batch.events],
        "cursor": batch.cursor,
        "complete": batch.complete,
        "more": batch.more,
    }


def session_plain(info: SessionInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "user_id": info.user_id,
        "node_id": info.node_id,
        "subscriptions": list(info.subscriptions),
        "is_local": info.is_local,
        "last_sync": _iso(info.last_sync),
    }


def peer_plain(peer: PeerInfo) -> dict[str, Any]:
    return {
        "node_id": peer.node_id,
        "url": peer.url,
        "user_id": peer.user_id,
        "namespaces": list(peer.namespaces),
        "transient": peer.transient,
    }
