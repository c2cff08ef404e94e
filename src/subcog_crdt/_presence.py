"""Sessions of nodes met only at a relay: each node's session list as its Yjs awareness
state in the relay's directory room (docs/yjs.md, "Relays").

A relay carries documents and awareness, not the node protocol, so this is how nodes that
never link see each other's sessions. Awareness suits it: the relay sends a newcomer every
state it holds, and when a connection ends (a node closing or killed: the socket closes)
it tells the others its states are gone. A state not renewed within ``STALE_AFTER`` is
dropped here too (a relay that never says so). The codec is y-protocols' awareness
update: ``varuint n``, then per client ``varuint id, varuint clock, varstring json``
(``"null"``: removed).
"""

from __future__ import annotations

import json
from typing import Any

from subcog_crdt._core.ydecode import ByteReader, UpdateDecodeError, varuint_bytes
from subcog_crdt._errors import ProtocolError
from subcog_crdt._sessions import MAX_SESSIONS, SessionInfo, sessions_from_wire

__all__ = ["MAX_STATE_BYTES", "RENEW_EVERY", "STALE_AFTER", "Presence", "encode_state"]

RENEW_EVERY = 15.0
"""Seconds between renewals of this node's state (Yjs clients drop a state after 30 s)."""
STALE_AFTER = 45.0
MAX_STATE_BYTES = 256 << 10
"""This node's state is cut to the sessions that fit (sessions are advisory)."""
_MAX_CLIENTS = 1024
"""States held at once; more (a hostile relay) are ignored."""
_MAX_NODE_ID = 256


def encode_state(client_id: int, clock: int, state: dict[str, Any] | None) -> bytes:
    """An awareness update of one client (its whole message body, without the type)."""
    text = "null" if state is None else json.dumps(state, separators=(",", ":"))
    data = text.encode()
    body = varuint_bytes(1) + varuint_bytes(client_id) + varuint_bytes(clock)
    body += varuint_bytes(len(data)) + data
    return varuint_bytes(len(body)) + body


def node_state(node_id: str, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """This node's state: its id and as many of its sessions as fit ``MAX_STATE_BYTES``."""
    kept: list[dict[str, Any]] = []
    size = 64 + len(node_id)
    for entry in sessions:
        size += len(json.dumps(entry, separators=(",", ":"))) + 1
        if size > MAX_STATE_BYTES:
            break
        kept.append(entry)
    return {"subcog": 1, "node_id": node_id, "sessions": kept}


class Presence:
    """The states of other nodes in one directory room, by awareness client id."""

    def __init__(self, own_client: int, own_node: str) -> None:
        self.own_client = own_client
        self._own_node = own_node
        self._states: dict[int, tuple[int, str, tuple[SessionInfo, ...], float]] = {}

    def apply(self, payload: bytes, now: float) -> bool:
        """An awareness update (the message body after its type); True if what is
        listed changed. ``ProtocolError`` if it is malformed; a well-formed state that is
        not a node's (a stock Yjs client's cursor, say) is ignored."""
        r = ByteReader(payload)
        changed = False
        try:
            body = ByteReader(r.raw(r.varuint()))
            for _ in range(body.varuint()):
                client, clock, text = body.varuint(), body.varuint(), body.string()
                if client == self.own_client:
                    continue
                old = self._states.get(client)
                if old is not None and clock < old[0]:
                    continue
                if text == "null":
                    changed |= self._states.pop(client, None) is not None
                    continue
                parsed = _parse(text, self._own_node)
                if parsed is None:
                    continue
                if old is None and len(self._states) >= _MAX_CLIENTS:
                    continue
                node_id, sessions = parsed
                self._states[client] = (clock, node_id, sessions, now)
                changed |= old is None or old[1:3] != (node_id, sessions)
        except UpdateDecodeError as exc:
            raise ProtocolError(f"malformed awareness message: {exc}") from exc
        return changed

    def expire(self, now: float) -> bool:
        """Drop states not renewed within ``STALE_AFTER``; True if any were."""
        stale = [c for c, (_, _, _, seen) in self._states.items() if now - seen > STALE_AFTER]
        for c in stale:
            del self._states[c]
        return bool(stale)

    def clear(self) -> bool:
        had = bool(self._states)
        self._states.clear()
        return had

    def sessions(self) -> dict[str, tuple[SessionInfo, ...]]:
        """Each node's sessions (a node on two connections: the later state's)."""
        out: dict[str, tuple[SessionInfo, ...]] = {}
        for _, node_id, sessions, _ in sorted(self._states.values(), key=lambda s: s[3]):
            out[node_id] = sessions
        return out


def _parse(text: str, own_node: str) -> tuple[str, tuple[SessionInfo, ...]] | None:
    try:
        state = json.loads(text)
    except ValueError:
        return None
    if not isinstance(state, dict) or state.get("subcog") != 1:
        return None
    node_id, sessions = state.get("node_id"), state.get("sessions")
    if not isinstance(node_id, str) or not 0 < len(node_id) <= _MAX_NODE_ID:
        return None
    if node_id == own_node or not isinstance(sessions, list) or len(sessions) > MAX_SESSIONS:
        return None
    try:
        return node_id, sessions_from_wire(node_id, sessions)
    except ProtocolError:
        return None
