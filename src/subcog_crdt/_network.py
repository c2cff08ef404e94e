"""Wires a node to the network: the WebSocket transport, static peers and discovery.

Kept apart from ``_api`` so that an in-memory node (``listen=False``) never imports
aiohttp or zeroconf.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from subcog_crdt._discovery.base import Advert, Found, mesh_tag
from subcog_crdt._transport.base import PROTOCOL_VERSION
from subcog_crdt._transport.websocket import WebSocketTransport

if TYPE_CHECKING:
    from subcog_crdt._api import ConversationsApi

__all__ = ["start_network"]

log = logging.getLogger(__name__)


async def start_network(api: ConversationsApi) -> None:
    """Start listening, dial static peers, and start discovery. Undone by ``api.aclose``."""
    transport = WebSocketTransport(
        node_id=api.node_id,
        hello=api._hello,
        on_link=api._on_link,
        secret=api._secret,
        host=api._host,
        port=api._port,
        max_frame=api._max_frame,
        heartbeat=api._heartbeat,
        setup_app=api._setup_app,
        ssl=api._ssl,
        client_ssl=api._client_ssl,
    )
    await transport.__aenter__()
    api._transport = transport
    api.url = transport.url
    for url in api._static_peers:
        transport.add_peer(url)
    await _start_discovery(api, transport)


async def _start_discovery(api: ConversationsApi, transport: WebSocketTransport) -> None:
    kinds = set(api._discovery_kinds)
    tag = mesh_tag(api._secret)
    url = mdns_url = transport.url
    if api._secret is not None and api._advertise_host:
        url = mdns_url = _with_host(transport.url, api._advertise_host)
        api.url = url  # what peers dial
    elif api._secret is not None and api._host in (None, "", "0.0.0.0"):
        # Listening on every IPv4 interface: transport.url names loopback, which is right
        # for same-machine peers but useless on the LAN. An unspecified host makes
        # MdnsDiscovery advertise the addresses of the interfaces it runs on.
        mdns_url = _with_host(transport.url, "0.0.0.0")
    advert = Advert(node_id=api.node_id, url=url, protocol=PROTOCOL_VERSION, mesh_tag=tag)
    mdns_advert = replace(advert, url=mdns_url)
    mechanisms: list[tuple[Any, Advert]] = []
    if "local" in kinds:
        from subcog_crdt._discovery.local import LocalDiscovery

        mechanisms.append((LocalDiscovery(api._discovery_dir), advert))
    if "mdns" in kinds and api._secret is not None:
        # mDNS only with a secret: without one the node is loopback-only by design.
        from subcog_crdt._discovery.mdns import MdnsDiscovery

        mechanisms.append((MdnsDiscovery(api._mdns_interfaces), mdns_advert))

    # What each mechanism reports now: (mechanism, node id) -> url. A discovered url keeps
    # its redial loop while some mechanism reports it, for whichever node.
    reported: dict[tuple[int, str], str] = {}

    def release(url: str) -> None:
        """Stop redialling ``url`` unless a mechanism still reports it or the user asked to
        keep it (``peers=``, ``connect``)."""
        if url in api._kept_urls:
            return
        still = [node for (_, node), u in reported.items() if u == url]
        if still:
            # Reported for another node (the one lost was a second id at this url): its
            # loop must expect that one, not the node just lost.
            with contextlib.suppress(Exception):
                transport.add_peer(url, node_id=still[0])
            return
        # The loop stops now (a found at this url right after starts a new one); only the
        # wait for its end runs later.
        api._spawn(transport.remove_peer(url))

    def on_found(mech: int, found: Found) -> None:
        if found.node_id == api.node_id or found.protocol != PROTOCOL_VERSION:
            return
        if found.mesh_tag != tag:
            return  # another mesh: never dialled
        old = reported.get((mech, found.node_id))
        reported[(mech, found.node_id)] = found.url
        if old is not None and old != found.url:
            release(old)  # the node moved (restarted on another port, say)
        try:
            transport.add_peer(found.url, node_id=found.node_id)
        except Exception as exc:  # a bad advert must not stop discovery
            log.warning("not dialling %s: %s", found.url, exc)

    def on_lost(mech: int, node_id: str) -> None:
        url = reported.pop((mech, node_id), None)
        if url is not None:
            release(url)

    for i, (mech, mech_advert) in enumerate(mechanisms):
        api._discovery.append(mech)  # first: closing also undoes a start cut short
        await mech.start(mech_advert, partial(on_found, i), partial(on_lost, i))


def _with_host(url: str, host: str) -> str:
    """``url`` (``ws://`` or ``wss://``, with a port) with its host replaced by ``host``."""
    scheme, _, rest = url.partition("://")
    port = rest.rsplit(":", 1)[1].split("/", 1)[0]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"{scheme}://{host}:{port}"
