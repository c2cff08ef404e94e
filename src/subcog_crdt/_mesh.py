"""What a node knows of the mesh beyond its own links: each node's last record (its links
and sessions, frame 10), flooded hop by hop, and which of those nodes it can reach now.

A record carries its origin's sequence number, so a node keeps only the newest it has seen
of each origin and forwards only what is new to it: a change crosses each link once,
whatever the mesh's shape, and a stale copy arriving late changes nothing. Reachability is
walked from this node's own links outward through the records of the nodes reached, so a
node that died (its last record still held) drops out as soon as its neighbours' records
stop listing it: no timer, no count to infinity.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

from subcog_crdt._errors import ProtocolError
from subcog_crdt._sessions import (
    MAX_SESSIONS,
    MAX_SUBSCRIPTIONS,
    SessionInfo,
    sessions_from_wire,
)

__all__ = ["MAX_FAR_NODES", "MAX_FAR_SESSIONS", "MAX_SEQ", "MeshMap", "NodeRecord"]

MAX_FAR_NODES = 1024
"""Records a node holds of nodes beyond its links; one more is taken only in place of a
node it cannot reach."""
MAX_FAR_SESSIONS = 4 * MAX_SESSIONS
"""Sessions of all held records together: past it a record is kept without its sessions
(they are advisory; reachability still counts it)."""
MAX_FAR_NAMES = 4 * MAX_SUBSCRIPTIONS
"""Subscriptions and peer ids of all held records together (the same way; a record whose
peer ids alone do not fit is not kept)."""
_MAX_RECORD_PEERS = 4096
MAX_SEQ = (1 << 63) - 1
_MAX_NODE_ID = 256


class NodeRecord(NamedTuple):
    seq: int
    peers: frozenset[str]
    sessions: tuple[SessionInfo, ...]

    def frame(self, origin: str, kind: int) -> list[Any]:
        """The record as frame ``kind`` (10), made from what was checked, never the bytes
        received (a peer's unknown keys are not passed on)."""
        return [kind, origin, self.seq, sorted(self.peers), [s.to_wire() for s in self.sessions]]


def check_record(frame: list[Any]) -> tuple[str, int, frozenset[str], tuple[SessionInfo, ...]]:
    """Frame ``[10, origin, seq, peers, sessions]`` checked as strictly as a direct peer's
    lists: ``ProtocolError`` for anything a conforming node never sends."""
    if len(frame) != 5:
        raise ProtocolError("bad node record frame")
    _, origin, seq, peers, sessions = frame
    if not isinstance(origin, str) or not 0 < len(origin) <= _MAX_NODE_ID:
        raise ProtocolError("bad node record: origin")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise ProtocolError("bad node record: sequence number")
    if not isinstance(peers, list) or len(peers) > _MAX_RECORD_PEERS:
        raise ProtocolError("bad node record: peers")
    if not all(isinstance(p, str) and 0 < len(p) <= _MAX_NODE_ID for p in peers):
        raise ProtocolError("bad node record: peer id")
    if not isinstance(sessions, list):
        raise ProtocolError("bad node record: sessions")
    infos = sessions_from_wire(origin, sessions)
    if sum(len(s.subscriptions) for s in infos) > MAX_SUBSCRIPTIONS:
        raise ProtocolError(f"bad node record: more than {MAX_SUBSCRIPTIONS} subscriptions")
    return origin, seq, frozenset(peers), infos


def _names(sessions: tuple[SessionInfo, ...]) -> int:
    return sum(len(s.subscriptions) for s in sessions)


class MeshMap:
    """Records of other nodes by origin, and the sessions of those reachable now."""

    def __init__(self, node_id: str) -> None:
        self._me = node_id
        self._records: dict[str, NodeRecord] = {}
        self._held_sessions = 0
        self._held_names = 0  # subscriptions and peer ids
        self._reachable: frozenset[str] = frozenset()
        self.refused = False
        """A record was dropped or stripped for the bounds (for a one-time warning)."""

    def __len__(self) -> int:
        return len(self._records)

    def offer(
        self, origin: str, seq: int, peers: frozenset[str], sessions: tuple[SessionInfo, ...]
    ) -> NodeRecord | None:
        """Keep the record if it is newer than the one held, and return it as kept (the
        caller forwards it and recomputes reachability); None if it was not."""
        if origin == self._me:
            return None  # this node's own record, come back round a loop
        old = self._records.get(origin)
        if old is not None and old.seq >= seq:
            return None
        if old is None and len(self._records) >= MAX_FAR_NODES and not self._evict():
            self.refused = True
            return None
        held = self._held_sessions
        names = self._held_names
        if old is not None:
            held -= len(old.sessions)
            names -= len(old.peers) + _names(old.sessions)
        if names + len(peers) > MAX_FAR_NAMES:
            self.refused = True
            return None
        if held + len(sessions) > MAX_FAR_SESSIONS or (
            names + len(peers) + _names(sessions) > MAX_FAR_NAMES
        ):
            self.refused = True
            sessions = ()
        record = self._records[origin] = NodeRecord(seq, peers, sessions)
        self._held_sessions = held + len(sessions)
        self._held_names = names + len(peers) + _names(sessions)
        return record

    def _evict(self) -> bool:
        for node_id in self._records:
            if node_id not in self._reachable:
                old = self._records.pop(node_id)
                self._held_sessions -= len(old.sessions)
                self._held_names -= len(old.peers) + _names(old.sessions)
                return True
        return False

    def records(self) -> list[tuple[str, NodeRecord]]:
        return list(self._records.items())

    def walk(self, links: Mapping[str, frozenset[str]]) -> dict[str, tuple[SessionInfo, ...]]:
        """The sessions of every node reachable beyond this node's links.

        ``links``: each linked peer's id and the ids it says it is linked to (its own word,
        fresher than its record). Linked peers' sessions are not included (their links
        list them). A node is reached only along links that a reached node lists."""
        seen = {self._me, *links}
        queue: deque[str] = deque()
        for peers in links.values():
            queue.extend(peers)
        far: dict[str, tuple[SessionInfo, ...]] = {}
        while queue:
            node_id = queue.popleft()
            if node_id in seen:
                continue
            seen.add(node_id)
            record = self._records.get(node_id)
            if record is None:
                continue  # listed by a neighbour, its record not (yet) here
            far[node_id] = record.sessions
            queue.extend(record.peers)
        self._reachable = frozenset(far)
        return far
