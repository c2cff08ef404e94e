"""A throwaway LAN built from Linux network namespaces, for tests.

Layout of one :class:`NetnsLan` with prefix ``sc1a2b``::

    sc1a2bbr   bridge namespace: lo, bridge ``br0`` (multicast snooping off), ports ``p1..pN``
    sc1a2bh1   host namespace:   lo, ``lan0`` (10.213.77.1/24), route 224.0.0.0/4 dev lan0
    sc1a2bh2   ...

Every veth pair is created inside the bridge namespace with its peer born directly in the
host namespace, so no interface ever appears in the root namespace, and the test address
range only exists inside the LAN. Interface names are per namespace, so they can be short
and fixed; only the namespace names carry the random prefix.

Processes are started with ``ip netns exec`` in their own process group. Teardown (always
run, idempotent) kills those process groups, then whatever ``ip netns pids`` still lists,
then deletes the namespaces.

Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2. Use :func:`require_netns` or
the :data:`netns_lan` fixture, which skip where that is missing, but fail under ``CI=true``.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from types import TracebackType
from typing import Any, Self

import pytest

__all__ = [
    "DEFAULT_SUBNET",
    "NETNS_ENV",
    "NETNS_NAME_RE",
    "Host",
    "NetnsError",
    "NetnsLan",
    "in_ci",
    "make_lan_fixture",
    "netns_available",
    "netns_lan",
    "require_netns",
]

#: Test range; it exists only inside the LAN's namespaces.
DEFAULT_SUBNET = "10.213.77.0/24"
#: Set to "1" in the environment of every process started through :meth:`Host.popen`.
NETNS_ENV = "SUBCOG_TEST_NETNS"
#: Names of the namespaces a :class:`NetnsLan` creates (``sc`` + 4 hex + ``br``/``hN``).
NETNS_NAME_RE = re.compile(r"^sc[0-9a-f]{4}(?:br|h[0-9]+)$")

BRIDGE_IF = "br0"
HOST_IF = "lan0"
IP_TIMEOUT = 15.0
_REAP_TIMEOUT = 5.0


class NetnsError(RuntimeError):
    """An ``ip`` command failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` and return the result; raise :class:`NetnsError` if ``check``."""
    try:
        res = subprocess.run(
            ["ip", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            raise NetnsError(f"ip {' '.join(args)}: {exc}") from exc
        return subprocess.CompletedProcess(["ip", *args], 255, "", str(exc))
    if check and res.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} -> {res.returncode}: {res.stderr.strip()}")
    return res


def _netns_names() -> set[str]:
    res = _ip("netns", "list", check=False)
    return {line.split()[0] for line in res.stdout.splitlines() if line.strip()}


def _netns_pids(ns: str) -> list[int]:
    res = _ip("netns", "pids", ns, check=False)
    return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def in_ci() -> bool:
    """True when the ``CI`` environment variable says so (``true``/``1``/``yes``)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@cache
def netns_available() -> tuple[bool, str]:
    """Whether this machine can build a :class:`NetnsLan`, and if not, why.

    Checks root, ``ip`` on PATH, and that a throwaway namespace holding a bridge and a veth
    pair can be created and deleted. The result is cached for the process.
    """
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 `ip` not found on PATH"
    probe = f"sc{secrets.token_hex(2)}probe"
    try:
        _ip("netns", "add", probe)
        try:
            _ip("-n", probe, "link", "add", "b0", "type", "bridge")
            _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
            _ip("-n", probe, "link", "set", "lo", "up")
        finally:
            _ip("netns", "del", probe, check=False)
    except NetnsError as exc:
        return False, f"cannot build a test namespace: {exc}"
    if probe in _netns_names():
        return False, f"cannot delete test namespace {probe}"
    return True, "ok"


def require_netns() -> None:
    """Skip the calling test if namespaces are unavailable; under ``CI=true`` fail instead."""
    ok, why = netns_available()
    if ok:
        return
    msg = f"network-namespace LAN unavailable: {why}"
    if in_ci():
        pytest.fail(f"{msg} (CI=true: namespace tests must run, not skip)", pytrace=False)
    pytest.skip(msg)


@dataclass(eq=False)
class Host:
    """One machine on the LAN: a network namespace with one address."""

    name: str
    """Short name, ``h1``, ``h2``..."""
    netns: str
    """Namespace name, for ``ip netns exec`` / ``ip -n``."""
    address: str
    """IPv4 address of :attr:`interface` (no prefix length)."""
    interface: str
    _lan: NetnsLan = field(repr=False)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this namespace, in its own process group (session).

        Keyword arguments go to :class:`subprocess.Popen`; ``env`` (default: this
        process's environment) gets ``SUBCOG_TEST_NETNS=1`` added. The process is killed
        at :meth:`NetnsLan.kill` / teardown.
        """
        if self._lan.closed:
            raise NetnsError(f"{self.netns}: LAN already torn down")
        env = dict(os.environ if kw.get("env") is None else kw["env"])
        env[NETNS_ENV] = "1"
        kw["env"] = env
        kw["start_new_session"] = True
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *argv], **kw
        )
        self._procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = False,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside this namespace; capture text stdout/stderr.

        On timeout the whole process group is killed and ``TimeoutExpired`` propagates.
        """
        proc = self.popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        with proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid)
                proc.communicate()
                raise
        res = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check:
            res.check_returncode()
        return res

    def ping(self, address: str, timeout: float = 2.0) -> bool:
        """One ICMP echo to ``address``: ``ping -c1 -W<timeout>`` if installed, else a raw
        socket echo in Python (same semantics)."""
        wait = max(1, round(timeout))
        if shutil.which("ping") is not None:
            argv = ["ping", "-n", "-c1", f"-W{wait}", address]
        else:
            argv = [sys.executable, "-c", _PY_PING, address, str(float(wait))]
        return self.run(argv, timeout=wait + 10.0).returncode == 0

    def pids(self) -> list[int]:
        """PIDs of all processes currently inside this namespace."""
        return _netns_pids(self.netns)


class NetnsLan:
    """A bridge namespace plus ``hosts`` host namespaces on one L2 segment.

    Use as a context manager (or call :meth:`start` / :meth:`close`). Teardown always
    runs: on normal exit, on an exception in the body, and when setup fails halfway.
    """

    def __init__(self, hosts: int = 3, *, subnet: str = DEFAULT_SUBNET) -> None:
        if hosts < 0:
            raise ValueError("hosts must be >= 0")
        self._want = hosts
        self.subnet = ipaddress.IPv4Network(subnet)
        self.prefix = self._fresh_prefix()
        self.bridge_netns = f"{self.prefix}br"
        self._hosts: list[Host] = []
        self._created: list[str] = []  # namespaces we attempted to create, in order
        self._started = False
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def _fresh_prefix() -> str:
        existing = _netns_names()
        for _ in range(64):
            prefix = f"sc{secrets.token_hex(2)}"
            if not any(name.startswith(prefix) for name in existing):
                return prefix
        raise NetnsError("could not find a free namespace prefix")

    def start(self) -> Self:
        """Build the LAN. On any failure, tears down what was built and re-raises."""
        if self.closed:
            raise NetnsError("LAN already closed")
        if self._started:
            return self
        self._started = True
        atexit.register(self.close)
        try:
            self._add_netns(self.bridge_netns)
            br = self.bridge_netns
            _ip("-n", br, "link", "set", "lo", "up")
            _ip("-n", br, "link", "add", BRIDGE_IF, "type", "bridge", "mcast_snooping", "0")
            _ip("-n", br, "link", "set", BRIDGE_IF, "up")
            for _ in range(self._want):
                self.add_host()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process, then delete every namespace. Safe to call repeatedly."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        errors: list[str] = []
        for host in reversed(self._hosts):
            try:
                self._kill_host(host)
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"{host.netns}: kill: {exc!r}")
        for ns in reversed(self._created):
            self._kill_netns_pids(ns)
        for ns in reversed(self._created):
            res = _ip("netns", "del", ns, check=False)
            if res.returncode != 0 and ns in _netns_names():
                errors.append(f"{ns}: {res.stderr.strip()}")
        self._created.clear()
        if errors:
            raise NetnsError("teardown incomplete: " + "; ".join(errors))

    # -- topology ----------------------------------------------------------------------------

    @property
    def hosts(self) -> list[Host]:
        """The hosts, in creation order (a copy)."""
        return list(self._hosts)

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this LAN created and has not yet deleted."""
        return list(self._created)

    def __getitem__(self, name: str) -> Host:
        """Host by short name: ``lan["h2"]``."""
        for host in self._hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def _add_netns(self, ns: str) -> None:
        # Recorded only once created: a name clash must never make us delete someone else's.
        _ip("netns", "add", ns)
        self._created.append(ns)

    def _next_address(self, index: int) -> str:
        try:
            return str(self.subnet[index])
        except IndexError:
            raise NetnsError(f"subnet {self.subnet} has no room for host {index}") from None

    def add_host(self) -> Host:
        """Add (also late, while others run) a host namespace plugged into the bridge."""
        if self.closed:
            raise NetnsError("LAN already closed")
        if not self._started:
            raise NetnsError("start the LAN first")
        index = len(self._hosts) + 1
        host = Host(
            name=f"h{index}",
            netns=f"{self.prefix}h{index}",
            address=self._next_address(index),
            interface=HOST_IF,
            _lan=self,
        )
        self._add_netns(host.netns)
        self._hosts.append(host)
        self._configure_host(host, index)
        return host

    def _configure_host(self, host: Host, index: int) -> None:
        br, ns, port = self.bridge_netns, host.netns, f"p{index}"
        # Both ends are born in namespaces of ours: the root namespace never sees them.
        _ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", HOST_IF, "netns", ns)
        _ip("-n", br, "link", "set", port, "master", BRIDGE_IF)
        _ip("-n", br, "link", "set", port, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", HOST_IF)
        _ip("-n", ns, "link", "set", HOST_IF, "up")
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", HOST_IF)

    # -- processes ---------------------------------------------------------------------------

    def kill(self, host: Host) -> None:
        """SIGKILL everything started in ``host`` (process groups, then stragglers)."""
        if host._lan is not self:
            raise ValueError(f"{host.name} is not on this LAN")
        self._kill_host(host)

    def _kill_host(self, host: Host) -> None:
        for proc in host._procs:
            _killpg(proc.pid)
        self._kill_netns_pids(host.netns)
        for proc in host._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_REAP_TIMEOUT)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()
        host._procs[:] = [p for p in host._procs if p.returncode is None]

    @staticmethod
    def _kill_netns_pids(ns: str) -> None:
        deadline = time.monotonic() + _REAP_TIMEOUT
        while True:
            pids = [p for p in _netns_pids(ns) if p != os.getpid()]
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)


def make_lan_fixture(
    hosts: int = 3,
    *,
    name: str | None = None,
    scope: Any = "function",
    subnet: str = DEFAULT_SUBNET,
) -> Callable[[], Iterator[NetnsLan]]:
    """Build a pytest fixture yielding a started :class:`NetnsLan` with ``hosts`` hosts.

    ``scope`` is passed to :func:`pytest.fixture`. The fixture skips where namespaces are
    unavailable, and fails under ``CI=true``. In a conftest::

        from support.netns import make_lan_fixture
        lan5 = make_lan_fixture(5, name="lan5")
    """

    @pytest.fixture(name=name, scope=scope)
    def _lan_fixture() -> Iterator[NetnsLan]:
        require_netns()
        with NetnsLan(hosts, subnet=subnet) as lan:
            yield lan

    return _lan_fixture


#: Ready-made fixture: a 3-host LAN per test. Import it into a conftest or test module.
netns_lan = make_lan_fixture(3, name="netns_lan")


# Fallback for machines without iputils `ping`: one ICMP echo over a raw socket (root).
_PY_PING = r"""
import os, socket, struct, sys, time
dst, timeout = sys.argv[1], float(sys.argv[2])
def csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
ident, payload = os.getpid() & 0xFFFF, b"subcog-ping"
hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
pkt = struct.pack("!BBHHH", 8, 0, csum(hdr + payload), ident, 1) + payload
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.sendto(pkt, (dst, 0))
deadline = time.monotonic() + timeout
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data, addr = s.recvfrom(2048)
    except socket.timeout:
        break
    ihl = (data[0] & 0x0F) * 4
    typ, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
    if typ == 0 and rid == ident and addr[0] == dst:
        sys.exit(0)
sys.exit(1)
"""
