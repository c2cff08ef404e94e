"""Sessions: the agent sessions a node hosts, and those it sees on its peers."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from subcog_crdt._core.schema import check_namespace, check_session_id
from subcog_crdt._errors import InvalidArgument, InvalidNamespace, NotFound, ProtocolError

if TYPE_CHECKING:
    from subcog_crdt._session import Session

__all__ = [
    "MAX_SESSIONS",
    "MAX_SUBSCRIPTIONS",
    "SessionInfo",
    "SessionRegistry",
    "sessions_from_wire",
]

MAX_SESSIONS = 10_000
"""Sessions one node may host, and so what a peer may list: a peer listing more (or
anything invalid) is refused, so a node never holds an unbounded list for a peer."""
MAX_SUBSCRIPTIONS = 100_000
"""Subscriptions of all the sessions one node hosts, together (the same reason)."""
_MAX_USER_ID = 256


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session as any node sees it."""

    id: str
    user_id: str
    node_id: str
    subscriptions: tuple[str, ...]
    is_local: bool
    last_sync: datetime | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "user_id": self.user_id, "subscriptions": list(self.subscriptions)}


class SessionRegistry:
    """``api.sessions``: local sessions, those of the peers this node is linked to, and
    those of the nodes it reaches through them (``_mesh``)."""

    def __init__(self) -> None:
        self._local: dict[str, Session] = {}
        self._remote: dict[str, tuple[SessionInfo, ...]] = {}
        self._far: dict[str, tuple[SessionInfo, ...]] = {}
        self._subscriptions = 0
        """Subscriptions of the local sessions, together (bounded by MAX_SUBSCRIPTIONS)."""

    def list(self) -> builtins.list[SessionInfo]:
        """Every known session: local ones first, then those of linked peers, then those
        of nodes reached through them."""
        out = [s.info() for s in self._local.values()]
        for infos in self._remote.values():
            out.extend(infos)
        for infos in self._far.values():
            out.extend(infos)
        return out

    def get(self, session_id: str) -> SessionInfo:
        """A session by id: the local one if this node hosts it, else one of a linked
        peer, else one of a node reached through them (sessions of the same id on two
        nodes are two sessions: ``list()`` shows both). NotFound if none."""
        _check_str(session_id)
        s = self._local.get(session_id)
        if s is not None:
            return s.info()
        for group in (self._remote, self._far):
            for infos in group.values():
                for info in infos:
                    if info.id == session_id:
                        return info
        raise NotFound(f"no session {session_id!r}")

    def local(self, session_id: str) -> Session:
        _check_str(session_id)
        s = self._local.get(session_id)
        if s is None:
            raise NotFound(f"no local session {session_id!r}")
        return s

    def _check_room(self, session_id: str, subscriptions: int) -> None:
        """InvalidArgument unless session ``session_id`` (new, or registered again) with
        ``subscriptions`` fits the bounds that peers hold this node's list to."""
        existing = self._local.get(session_id)
        if existing is None and len(self._local) >= MAX_SESSIONS:
            raise InvalidArgument(f"this node hosts {MAX_SESSIONS} sessions, the most it may")
        held = self._subscriptions - (len(existing.subscriptions) if existing else 0)
        if held + subscriptions > MAX_SUBSCRIPTIONS:
            raise InvalidArgument(
                f"{subscriptions} subscriptions would pass the node's {MAX_SUBSCRIPTIONS} "
                f"(its other sessions hold {held})"
            )

    def _add_local(self, session: Session) -> None:
        self._local[session.id] = session
        self._subscriptions += len(session.subscriptions)

    def _resubscribe(self, session: Session, subscriptions: frozenset[str]) -> None:
        self._subscriptions += len(subscriptions) - len(session.subscriptions)
        session._set_subscriptions(subscriptions)

    def _pop_local(self, session_id: str) -> Session | None:
        session = self._local.pop(session_id, None)
        if session is not None:
            self._subscriptions -= len(session.subscriptions)
        return session

    def local_sessions(self) -> builtins.list[Session]:
        return list(self._local.values())

    def _set_remote(self, node_id: str, infos: tuple[SessionInfo, ...]) -> None:
        self._remote[node_id] = infos

    def _drop_remote(self, node_id: str) -> None:
        self._remote.pop(node_id, None)

    def _set_far(self, far: dict[str, tuple[SessionInfo, ...]]) -> None:
        self._far = far

    def __len__(self) -> int:
        return len(self.list())


def sessions_from_wire(
    node_id: str, entries: list[Any], seen: set[str] | None = None
) -> tuple[SessionInfo, ...]:
    """A peer's session list (hello or frame 4), checked as strictly as local sessions
    are: ``ProtocolError`` for anything a conforming node never sends (an invalid id or
    namespace, one id twice, more than ``MAX_SESSIONS``). Keys other than ``id``,
    ``user_id`` and ``subscriptions`` are ignored: a session belongs to the node on
    whose link it is listed, whatever an entry claims. ``seen``: the ids of the list's
    earlier parts (updated)."""
    if len(entries) > MAX_SESSIONS:
        raise ProtocolError(f"peer lists {len(entries)} sessions (at most {MAX_SESSIONS})")
    infos: list[SessionInfo] = []
    if seen is None:
        seen = set()
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProtocolError("bad session entry: not a map")
        sid, uid = entry.get("id"), entry.get("user_id", "")
        subs = entry.get("subscriptions", [])
        try:
            sid = check_session_id(sid)
        except InvalidArgument as exc:
            raise ProtocolError(f"bad session entry: {exc}") from exc
        if sid in seen:
            raise ProtocolError(f"peer lists session {sid!r} twice")
        seen.add(sid)
        if not isinstance(uid, str) or len(uid) > _MAX_USER_ID:
            raise ProtocolError(f"bad user id for session {sid!r}")
        if not isinstance(subs, list):
            raise ProtocolError(f"bad subscriptions for session {sid!r}")
        try:
            names = tuple(check_namespace(x) for x in subs)
        except InvalidNamespace as exc:
            raise ProtocolError(f"bad subscription of session {sid!r}: {exc}") from exc
        infos.append(SessionInfo(sid, uid, node_id, names, is_local=False))
    return tuple(infos)


def _check_str(session_id: object) -> None:
    if not isinstance(session_id, str):
        raise InvalidArgument(f"a session id is a str, not {type(session_id).__name__}")
