"""LAN discovery over mDNS / DNS-SD (python-zeroconf), IPv4 only.

Each node registers one service of type ``SERVICE_TYPE`` whose instance name is its
node id, with exactly three TXT keys: ``id`` (node id), ``v`` (protocol version) and
``mesh`` (``mesh_tag`` of the secret). Nothing else goes
on the wire: never the secret, never content. Peers whose mesh tag differs are ignored
before any connection; the node itself is never reported.

mDNS is only for *finding* peers: a peer killed with ``kill -9`` sends no goodbye and
receivers keep its records for a long time, so liveness belongs to the transport
(heartbeats). A clean ``MdnsDiscovery.aclose`` awaits the goodbye packets, which peers
see within milliseconds.

Registration (probing + announcing, about a second) runs in the background, so
``MdnsDiscovery.start`` returns as soon as the sockets are open and browsing runs.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Callable

import ifaddr
import zeroconf
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from subcog_crdt._lifecycle import AsyncClosing

from .._errors import InvalidArgument, SubcogError
from .base import Advert, Found, _check_advert, _check_startable, _State, _url_host_port

__all__ = ["SERVICE_TYPE", "MdnsDiscovery"]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_subcog-crdt._tcp.local."
"""The DNS-SD service type every node registers and browses."""

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_RESOLVE_TIMEOUT_MS = 3000


def _local_ipv4() -> list[tuple[str, str, ipaddress.IPv4Network]]:
    """``(interface name, address, network)`` for every IPv4 address of this namespace."""
    out: list[tuple[str, str, ipaddress.IPv4Network]] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and isinstance(ip.ip, str):
                net = ipaddress.IPv4Network(f"{ip.ip}/{ip.network_prefix}", strict=False)
                out.append((adapter.nice_name, ip.ip, net))
    return out


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def _specific_ipv4(host: str) -> bool:
    try:
        return not ipaddress.IPv4Address(host).is_unspecified
    except ValueError:
        return False


class MdnsDiscovery(AsyncClosing):
    """Announce this node and find the nodes of its mesh on the LAN by mDNS.

    ``interfaces``: ``None`` for every IPv4 interface (``InterfaceChoice.All``), or a list
    of interface names (``"eth0"``) and/or IPv4 addresses of this machine. Requires a mesh
    secret: an advert with ``mesh_tag == ""`` is refused (without a secret a node is
    loopback-only, which the LAN cannot reach).
    """

    def __init__(self, interfaces: list[str] | None = None) -> None:
        if interfaces is not None:
            if isinstance(interfaces, str) or not all(
                isinstance(i, str) and i.strip() for i in interfaces
            ):
                raise InvalidArgument("interfaces must be a list of interface names or addresses")
            if not interfaces:
                raise InvalidArgument("interfaces must not be empty (None means all)")
            for item in interfaces:
                if _is_ipv6(item):
                    raise InvalidArgument(f"mDNS discovery is IPv4 only, not {item!r}")
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._state = _State.NEW
        self._advert: Advert | None = None
        self._on_found: Callable[[Found], None] | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._register_task: asyncio.Task[None] | None = None
        self._registered = False
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._known: dict[str, Found] = {}  # node id -> last reported
        self._names: dict[str, str] = {}  # lower-cased instance name -> node id reported
        self._networks: list[ipaddress.IPv4Network] = []

    @property
    def peers(self) -> dict[str, Found]:
        """The peers reported as found and not lost since (a copy)."""
        return dict(self._known)

    # -- lifecycle -------------------------------------------------------------------------

    def _resolve_interfaces(self) -> tuple[list[str] | None, list[str]]:
        """(zeroconf interface addresses or None for All, addresses to advertise)."""
        local = _local_ipv4()
        if self._interfaces is None:
            if not local:
                raise SubcogError("mDNS discovery: this machine has no IPv4 address")
            chosen = [(addr, net) for _, addr, net in local]
            self._networks = [net for _, net in chosen]
            usable = [a for a, _ in chosen if not ipaddress.ip_address(a).is_loopback]
            return None, usable or [a for a, _ in chosen]
        addrs: list[str] = []
        nets: list[ipaddress.IPv4Network] = []
        for item in self._interfaces:
            try:
                ipaddress.IPv4Address(item)
            except ValueError:
                match = [(a, n) for name, a, n in local if name == item]
                if not match:
                    raise InvalidArgument(f"no IPv4 interface named {item!r}") from None
            else:
                match = [(a, n) for _, a, n in local if a == item]
                if not match:
                    raise InvalidArgument(f"no interface has the address {item}") from None
            for a, n in match:
                if a not in addrs:
                    addrs.append(a)
                    nets.append(n)
        self._networks = nets
        return addrs, addrs

    async def start(
        self,
        advert: Advert,
        on_found: Callable[[Found], None],
        on_lost: Callable[[str], None],
    ) -> None:
        """Open the mDNS sockets, start browsing and register ``advert`` (in the
        background). Raises ``InvalidArgument`` for unusable interfaces or adverts."""
        _check_startable(self._state, "MdnsDiscovery")
        _check_advert(advert)
        if not _NODE_ID_RE.match(advert.node_id):
            raise InvalidArgument(
                f"node id {advert.node_id!r} is not a valid mDNS instance label "
                "(letters, digits, '-', '_'; at most 63)"
            )
        if advert.mesh_tag == "":
            raise InvalidArgument("mDNS discovery needs a mesh secret (mesh_tag is empty)")
        host, port = _url_host_port(advert.url)
        zc_addrs, advertised = self._resolve_interfaces()
        if _specific_ipv4(host):
            advertised = [host]  # else a name or 0.0.0.0: advertise the interfaces' addresses
        if not advertised:
            raise InvalidArgument("mDNS discovery: no IPv4 address to advertise")

        self._state = _State.STARTED
        self._advert = advert
        self._on_found, self._on_lost = on_found, on_lost
        try:
            self._aiozc = AsyncZeroconf(
                interfaces=zc_addrs if zc_addrs is not None else zeroconf.InterfaceChoice.All,
                ip_version=IPVersion.V4Only,
            )
            self._info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{advert.node_id}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(a) for a in advertised],
                port=port,
                properties={
                    "id": advert.node_id,
                    "v": str(advert.protocol),
                    "mesh": advert.mesh_tag,
                    # How to dial it: a TLS node found as ws:// would be unreachable.
                    "s": "wss" if advert.url.startswith("wss://") else "ws",
                },
                server=f"{advert.node_id}.local.",
            )
            self._browser = AsyncServiceBrowser(
                self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
            )
        except (OSError, zeroconf.Error) as exc:
            await self.aclose()
            if self._interfaces is not None:
                raise InvalidArgument(
                    f"mDNS discovery cannot use interfaces {self._interfaces}: {exc}"
                ) from exc
            raise SubcogError(f"mDNS discovery cannot start: {exc}") from exc
        except BaseException:
            await self.aclose()
            raise
        self._register_task = asyncio.create_task(
            self._register(), name=f"MdnsDiscovery.register({advert.node_id})"
        )

    async def _register(self) -> None:
        assert self._aiozc is not None
        assert self._info is not None
        try:
            announced = await self._aiozc.async_register_service(self._info)
            self._registered = True
            await announced
        except zeroconf.NonUniqueNameException:
            log.error("mDNS: node id %s is already announced on the LAN", self._info.name)
        except (OSError, zeroconf.Error) as exc:
            log.error("mDNS: registering %s failed: %s", self._info.name, exc)

    async def wait_scanned(self) -> None:
        """mDNS answers arrive whenever peers send them: nothing to wait for."""

    async def aclose(self) -> None:
        """Stop browsing, send the goodbye and await it, then close the sockets.
        Idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        pending = list(self._resolving.values())
        self._resolving.clear()
        if self._register_task is not None and not self._register_task.done():
            pending.append(self._register_task)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is None:
            return
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
                self._browser = None
            if self._registered and self._info is not None:
                goodbye = await aiozc.async_unregister_service(self._info)
                await goodbye
        except (OSError, zeroconf.Error) as exc:
            log.warning("mDNS: unregistering failed: %s", exc)
        finally:
            try:
                await aiozc.async_close()
            except (OSError, zeroconf.Error) as exc:
                log.warning("mDNS: closing failed: %s", exc)

    # -- browsing (event loop) -------------------------------------------------------------

    def _on_state_change(self, *, name: str, state_change: ServiceStateChange, **_: object) -> None:
        # Called by the browser on the event loop with zeroconf=, service_type=, name=,
        # state_change= keywords.
        if self._state is not _State.STARTED:
            return
        key = name.lower()
        old = self._resolving.pop(key, None)
        if old is not None:
            old.cancel()
        if state_change is ServiceStateChange.Removed:
            self._forget(key)
            return
        # Added or Updated: (re)resolve, replacing a resolution still under way.
        task = asyncio.create_task(self._resolve(name), name=f"MdnsDiscovery.resolve({name})")
        self._resolving[key] = task
        task.add_done_callback(functools.partial(self._resolved, key))

    def _resolved(self, key: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(key) is task:
            del self._resolving[key]

    def _forget(self, key: str) -> None:
        node_id = self._names.pop(key, None)
        if node_id is not None and self._known.pop(node_id, None) is not None:
            self._call(self._on_lost, node_id)

    async def _resolve(self, name: str) -> None:
        aiozc, advert = self._aiozc, self._advert
        if aiozc is None or advert is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            ok = await info.async_request(aiozc.zeroconf, _RESOLVE_TIMEOUT_MS)
        except (OSError, zeroconf.Error) as exc:
            log.debug("mDNS: resolving %s failed: %s", name, exc)
            return
        if not ok or self._state is not _State.STARTED:
            return
        key = name.lower()
        found = self._parse(name, info, advert)
        if found is None:
            self._forget(key)  # e.g. its TXT now names another mesh
            return
        if self._names.get(key, found.node_id) != found.node_id:
            self._forget(key)
        self._names[key] = found.node_id
        if self._known.get(found.node_id) != found:
            self._known[found.node_id] = found
            self._call(self._on_found, found)

    def _parse(self, name: str, info: AsyncServiceInfo, advert: Advert) -> Found | None:
        props = info.decoded_properties
        node_id, version, tag = props.get("id"), props.get("v"), props.get("mesh")
        if not node_id or node_id == advert.node_id:
            return None  # malformed, or ourselves
        if tag != advert.mesh_tag:
            return None  # another mesh: never dialled
        if name.lower() != f"{node_id}.{SERVICE_TYPE}".lower():
            log.debug("mDNS: %s announces id %r; ignored", name, node_id)
            return None
        try:
            protocol = int(version or "")
        except ValueError:
            log.debug("mDNS: %s has a bad protocol version %r; ignored", name, version)
            return None
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or not info.port:
            return None
        address = next(
            (
                a
                for a in addresses
                if any(ipaddress.IPv4Address(a) in net for net in self._networks)
            ),
            addresses[0],
        )
        scheme = "wss" if props.get("s") == "wss" else "ws"
        return Found(node_id, f"{scheme}://{address}:{info.port}", protocol, tag)

    @staticmethod
    def _call(cb: Callable[[Found], None] | Callable[[str], None] | None, arg: object) -> None:
        if cb is None:
            return
        try:
            cb(arg)  # type: ignore[arg-type]
        except Exception:
            log.exception("discovery callback %r failed", cb)
