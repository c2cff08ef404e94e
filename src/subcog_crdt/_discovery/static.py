"""Discovery from a fixed list of URLs (for networks without multicast)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from subcog_crdt._lifecycle import AsyncClosing

from .._errors import InvalidArgument
from .base import Advert, Found, _check_advert, _check_startable, _State, _url_host_port

__all__ = ["StaticDiscovery"]


class StaticDiscovery(AsyncClosing):
    """Reports each configured URL once, at ``start``, and never loses one.

    The node id behind a static URL is unknown (``Found.node_id == ""``): the caller dials
    and learns it from the handshake. Such peers are assumed to speak our protocol and to be
    in our mesh (``Found.protocol`` / ``Found.mesh_tag`` are copied from the advert); the
    handshake proves both. The advert's own URL is skipped.
    """

    def __init__(self, urls: Iterable[str]) -> None:
        if isinstance(urls, str):
            raise InvalidArgument("urls must be a collection of URLs, not one string")
        seen: dict[str, None] = {}
        for url in urls:
            if not isinstance(url, str):
                raise InvalidArgument(f"bad url {url!r}: want ws://host:port")
            _url_host_port(url)
            seen.setdefault(url, None)
        self._urls = tuple(seen)
        self._state = _State.NEW

    @property
    def urls(self) -> tuple[str, ...]:
        """The configured URLs, deduplicated, in order."""
        return self._urls

    async def start(
        self,
        advert: Advert,
        on_found: Callable[[Found], None],
        on_lost: Callable[[str], None],
    ) -> None:
        """Call ``on_found`` once per configured URL (except the advert's own)."""
        _check_startable(self._state, "StaticDiscovery")
        _check_advert(advert)
        self._state = _State.STARTED
        for url in self._urls:
            if url != advert.url:
                on_found(Found("", url, advert.protocol, advert.mesh_tag))

    async def wait_scanned(self) -> None:
        """Every url was reported by ``start``."""

    async def aclose(self) -> None:
        """Nothing to withdraw. Idempotent."""
        self._state = _State.CLOSED
