"""subcog-crdt: real-time, serverless memory sync for parallel AI-agent sessions."""

from subcog_crdt._api import ConversationsApi, PeerInfo
from subcog_crdt._bus import Listener, Subscription
from subcog_crdt._core.events import Captured, Conflict, Deleted, Event, Lagged, Updated
from subcog_crdt._core.memory import Memory
from subcog_crdt._core.schema import Write
from subcog_crdt._errors import (
    AuthError,
    ClosedError,
    ConflictError,
    CorruptStorage,
    FrameTooLarge,
    InvalidArgument,
    InvalidNamespace,
    NotFound,
    PeerUnreachable,
    ProtocolError,
    StorageError,
    StorageLocked,
    SubcogError,
)
from subcog_crdt._session import Session, SyncBatch
from subcog_crdt._sessions import SessionInfo
from subcog_crdt._storage.base import Retention

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "Captured",
    "ClosedError",
    "Conflict",
    "ConflictError",
    "ConversationsApi",
    "CorruptStorage",
    "Deleted",
    "Event",
    "FrameTooLarge",
    "InvalidArgument",
    "InvalidNamespace",
    "Lagged",
    "Listener",
    "Memory",
    "NotFound",
    "PeerInfo",
    "PeerUnreachable",
    "ProtocolError",
    "Retention",
    "Session",
    "SessionInfo",
    "StorageError",
    "StorageLocked",
    "SubcogError",
    "Subscription",
    "SyncBatch",
    "Updated",
    "Write",
    "__version__",
]
