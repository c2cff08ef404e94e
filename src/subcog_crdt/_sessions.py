"""Sessions: the agent sessions a node hosts, and those it sees on its peers."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from subcog_crdt._errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from subcog_crdt._session import Session

__all__ = ["SessionInfo", "SessionRegistry"]


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
    """``api.sessions``: local sessions and those of connected peers."""

    def __init__(self) -> None:
        self._local: dict[str, Session] = {}
        self._remote: dict[str, tuple[SessionInfo, ...]] = {}

    def list(self) -> builtins.list[SessionInfo]:
        """Every known session: local ones first, then those of connected peers."""
        out = [s.info() for s in self._local.values()]
        for infos in self._remote.values():
            out.extend(infos)
        return out

    def get(self, session_id: str) -> SessionInfo:
        _check_str(session_id)
        s = self._local.get(session_id)
        if s is not None:
            return s.info()
        for infos in self._remote.values():
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

    def local_sessions(self) -> builtins.list[Session]:
        return list(self._local.values())

    def _set_remote(self, node_id: str, sessions: Iterable[Any]) -> None:
        infos: list[SessionInfo] = []
        for s in sessions:
            if not isinstance(s, dict):
                continue
            sid, uid, subs = s.get("id"), s.get("user_id", ""), s.get("subscriptions", [])
            if not isinstance(sid, str) or not isinstance(uid, str) or not isinstance(subs, list):
                continue
            names = tuple(x for x in subs if isinstance(x, str))
            infos.append(SessionInfo(sid, uid, node_id, names, is_local=False))
        self._remote[node_id] = tuple(infos)

    def _drop_remote(self, node_id: str) -> None:
        self._remote.pop(node_id, None)

    def __len__(self) -> int:
        return len(self.list())


def _check_str(session_id: object) -> None:
    if not isinstance(session_id, str):
        raise InvalidArgument(f"a session id is a str, not {type(session_id).__name__}")
