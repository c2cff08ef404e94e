"""The exception tree of subcog-crdt. Every error raised through the public API derives
from ``SubcogError``; errors of aiohttp, sqlite3 and zeroconf are mapped at the seam.

```
SubcogError
├── InvalidArgument (also ValueError)   bad argument; nothing was changed
│   └── InvalidNamespace                name outside [a-z0-9][a-z0-9_.-]{0,63}
├── NotFound (also KeyError)            no such memory or session
├── ConflictError                       expected_version did not match; nothing was changed
├── PeerUnreachable (also ConnectionError)  a peer could not be reached
├── AuthError                           a peer could not prove the mesh secret
├── ProtocolError                       a peer sent something outside the protocol
│   └── FrameTooLarge                   a frame over the configured maximum
├── StorageError                        the data directory cannot be used
│   ├── StorageLocked                   another process holds the data directory
│   └── CorruptStorage                  a file is damaged; names the file
└── ClosedError                         the object was closed (or not yet opened)
```
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ClosedError",
    "ConflictError",
    "CorruptStorage",
    "FrameTooLarge",
    "InvalidArgument",
    "InvalidNamespace",
    "NotFound",
    "PeerUnreachable",
    "ProtocolError",
    "StorageError",
    "StorageLocked",
    "SubcogError",
]


class SubcogError(Exception):
    """Root of every error raised by subcog-crdt."""


class InvalidArgument(SubcogError, ValueError):
    """An argument was rejected; nothing was changed."""


class InvalidNamespace(InvalidArgument):
    """A namespace name does not match ``[a-z0-9][a-z0-9_.-]{0,63}``."""


class NotFound(SubcogError, KeyError):
    """No memory or session with that id."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "not found"


class ConflictError(SubcogError):
    """Optimistic locking failed: the memory moved on since ``expected_version``."""

    def __init__(self, message: str, *, memory_id: str = "", expected: int = 0, actual: int = 0):
        super().__init__(message)
        self.memory_id = memory_id
        self.expected = expected
        self.actual = actual


class PeerUnreachable(SubcogError, ConnectionError):
    """A peer could not be reached (refused, timed out, or shutting down)."""


class AuthError(SubcogError):
    """A peer could not prove the mesh secret (or we could not)."""


class ProtocolError(SubcogError):
    """A peer sent a frame that breaks the protocol."""


class FrameTooLarge(ProtocolError):
    """A frame exceeds the configured maximum size."""


class StorageError(SubcogError):
    """The data directory cannot be used."""


class StorageLocked(StorageError):
    """Another process has the data directory open."""


class CorruptStorage(StorageError):
    """A stored file is damaged. ``path`` names it."""

    def __init__(self, message: str, *, path: str = ""):
        super().__init__(message)
        self.path = path


class ClosedError(SubcogError):
    """The object is closed, or was used before it was opened."""
