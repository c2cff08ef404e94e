"""The discovery contract.

A discovery mechanism announces this node (an ``Advert``) and reports other nodes of
the same mesh (``Found``) and their departure (``on_lost(node_id)``). It never dials
and never authenticates: it only hands URLs to the node, which connects and proves the mesh
secret over the transport. Mechanisms compare *mesh tags* (a one-way digest of the secret,
see ``mesh_tag``) to skip peers of another mesh before any connection is attempted.

Implementations: ``LocalDiscovery`` (same machine, a
registry directory), ``MdnsDiscovery`` (LAN, mDNS) and
``StaticDiscovery`` (configured URLs).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol
from urllib.parse import urlsplit

from .._errors import ClosedError, InvalidArgument
from .._transport import auth

__all__ = [
    "Advert",
    "Discovery",
    "Found",
    "FoundCallback",
    "LostCallback",
    "is_loopback_url",
    "mesh_tag",
]

_MESH_TAG_RE = re.compile(r"^(?:[0-9a-f]{16})?$")


def mesh_tag(secret: bytes | None) -> str:
    """A short public tag naming the mesh of ``secret``; ``""`` when there is no secret.

    One-way (``auth.mesh_tag``: an HMAC keyed by the scrypt-stretched secret, 64 bits). It
    lets nodes skip peers of another mesh without revealing anything usable to prove the
    secret.
    """
    if secret is None:
        return ""
    if not isinstance(secret, bytes | bytearray | memoryview):
        raise InvalidArgument("mesh secret must be bytes")
    return auth.mesh_tag(bytes(secret))


@dataclass(frozen=True)
class Advert:
    """What this node announces about itself."""

    node_id: str
    url: str
    """Where peers dial this node, e.g. ``ws://10.0.0.5:8765``."""
    protocol: int
    mesh_tag: str
    """``mesh_tag`` of the mesh secret; ``""`` when the node has no secret."""


@dataclass(frozen=True)
class Found:
    """A peer reported by discovery. ``node_id`` is ``""`` when unknown (static URLs)."""

    node_id: str
    url: str
    protocol: int
    mesh_tag: str


FoundCallback = Callable[[Found], None]
LostCallback = Callable[[str], None]


class Discovery(Protocol):
    """One discovery mechanism. Callbacks run on the event loop and must not block."""

    async def start(
        self,
        advert: Advert,
        on_found: Callable[[Found], None],
        on_lost: Callable[[str], None],
    ) -> None:
        """Announce ``advert`` and start reporting peers. Called once per instance."""
        ...

    async def aclose(self) -> None:
        """Withdraw the announcement (awaiting any goodbye) and stop. Idempotent."""
        ...

    async def wait_scanned(self) -> None:
        """Return once the peers announced when ``start`` returned have been reported
        (``api.settle`` waits for it). A mechanism that cannot tell (mDNS answers come
        whenever they come) returns at once."""
        ...


# -- helpers shared by the implementations ------------------------------------------------


class _State(Enum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


def _check_startable(state: _State, what: str) -> None:
    if state is _State.CLOSED:
        raise ClosedError(f"{what} is closed")
    if state is _State.STARTED:
        raise InvalidArgument(f"{what} was already started")


def _check_advert(advert: Advert) -> None:
    if not isinstance(advert, Advert):
        raise InvalidArgument("advert must be an Advert")
    if not advert.node_id:
        raise InvalidArgument("advert.node_id must not be empty")
    if not _MESH_TAG_RE.match(advert.mesh_tag):
        raise InvalidArgument("advert.mesh_tag must be '' or 16 lowercase hex digits")
    _url_host_port(advert.url)


def _url_host_port(url: str) -> tuple[str, int]:
    """``(host, port)`` of a ``ws://`` / ``wss://`` URL; InvalidArgument otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"bad url {url!r}: {exc}") from exc
    if parts.scheme not in ("ws", "wss") or not parts.hostname or port is None:
        raise InvalidArgument(f"bad url {url!r}: want ws://host:port")
    return parts.hostname, port


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names a loopback host (``127.0.0.0/8``, ``::1`` or ``localhost``)."""
    try:
        host, _ = _url_host_port(url)
    except InvalidArgument:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
