"""Self-tests of the namespace LAN and the zeroconf guard.

They skip where namespaces are unavailable (not root, no iproute2); under CI=true they fail.
zeroconf only ever runs in subprocesses inside the LAN's host namespaces.
"""

from __future__ import annotations

import itertools
import json
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .netns import (
    NETNS_ENV,
    Host,
    NetnsError,
    NetnsLan,
    _netns_names,
    netns_lan,
    require_netns,
)
from .zeroconf_guard import (
    _STATE,
    FORBIDDEN_MESSAGE,
    zeroconf_allowed,
    zeroconf_guard,
)

__all__ = ["netns_lan", "zeroconf_guard"]  # fixtures used by this module

TESTS_DIR = Path(__file__).resolve().parents[1]
SERVICE_TYPE = "_subcog-test._tcp.local."

_REGISTER = """
import asyncio, socket, sys
from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

name, addr = sys.argv[1], sys.argv[2]

async def main() -> None:
    azc = AsyncZeroconf(interfaces=[addr])
    info = ServiceInfo(
        "_subcog-test._tcp.local.",
        f"{name}._subcog-test._tcp.local.",
        addresses=[socket.inet_aton(addr)],
        port=7777,
        properties={"host": name},
        server=f"{name}.local.",
    )
    await (await azc.async_register_service(info))
    print("registered", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await (await azc.async_unregister_service(info))
    await azc.async_close()

asyncio.run(main())
"""

_BROWSE = """
import asyncio, json, sys
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

addr, want, deadline = sys.argv[1], set(sys.argv[2].split(",")), float(sys.argv[3])
TYPE = "_subcog-test._tcp.local."

async def main() -> None:
    found: set[str] = set()
    done = asyncio.Event()

    def on_change(zeroconf, service_type, name, state_change):
        if state_change is ServiceStateChange.Added:
            found.add(name)
            if want <= {n.split(".")[0] for n in found}:
                done.set()

    azc = AsyncZeroconf(interfaces=[addr])
    browser = AsyncServiceBrowser(azc.zeroconf, TYPE, handlers=[on_change])
    try:
        await asyncio.wait_for(done.wait(), deadline)
    except TimeoutError:
        pass
    result = {}
    for name in sorted(found):
        info = AsyncServiceInfo(TYPE, name)
        ok = await info.async_request(azc.zeroconf, 3000)
        result[name.split(".")[0]] = info.parsed_addresses() if ok else None
    await browser.async_cancel()
    await azc.async_close()
    print(json.dumps(result), flush=True)

asyncio.run(main())
"""

_GUARD_IN_NETNS = """
import sys
sys.path.insert(0, sys.argv[1])
from support.zeroconf_guard import install_zeroconf_guard, zeroconf_allowed
install_zeroconf_guard()
from zeroconf import Zeroconf
print(zeroconf_allowed(), flush=True)
zc = Zeroconf(interfaces=[sys.argv[2]])
zc.close()
print("constructed", flush=True)
"""


def _root_links() -> list[str]:
    """`index: name` of every link in the root namespace."""
    out = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return sorted(m.group(1) for m in re.finditer(r"^(\d+: [^:]+):", out, re.MULTILINE))


def _root_addrs() -> str:
    return subprocess.run(
        ["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout


def _wait_line(proc: subprocess.Popen[str], expect: str, timeout: float) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip() == expect:
            return
    pytest.fail(f"no {expect!r} from {proc.args!r} within {timeout}s (rc={proc.poll()})")


def _ours(prefix: str) -> set[str]:
    return {name for name in _netns_names() if name.startswith(prefix)}


# -- the LAN -----------------------------------------------------------------------------------


def test_hosts_ping_each_other(netns_lan: NetnsLan) -> None:
    hosts = netns_lan.hosts
    assert [h.name for h in hosts] == ["h1", "h2", "h3"]
    assert len({h.address for h in hosts}) == 3
    assert all(h.address.startswith("10.213.77.") for h in hosts)
    assert netns_lan["h2"] is hosts[1]
    for src, dst in itertools.permutations(hosts, 2):
        assert src.ping(dst.address), f"{src.name} cannot reach {dst.name} ({dst.address})"
    assert not hosts[0].ping("10.213.77.250", timeout=1)  # nobody there: ping really checks


def test_nothing_of_the_lan_in_root_namespace() -> None:
    require_netns()
    before_links, before_addrs = _root_links(), _root_addrs()
    with NetnsLan(3) as lan:
        assert lan.hosts[0].ping(lan.hosts[2].address)
        assert _root_links() == before_links
        assert "10.213.77." not in _root_addrs()
        assert _ours(lan.prefix) == {f"{lan.prefix}{s}" for s in ("br", "h1", "h2", "h3")}
        for host in lan.hosts:  # the address really is inside the host namespace
            res = host.run(["ip", "-o", "-4", "addr", "show", "dev", host.interface])
            assert f"{host.address}/24" in res.stdout
    assert _root_links() == before_links
    assert _root_addrs() == before_addrs
    assert not _ours(lan.prefix)


def _body_that_raises(lan: NetnsLan, procs: list[subprocess.Popen[bytes]]) -> None:
    with lan:
        procs.extend(h.popen(["sleep", "300"]) for h in lan.hosts)
        # A child that leaves the process group (setsid) is found by `ip netns pids`.
        procs.append(lan.hosts[0].popen(["sh", "-c", "setsid sleep 300 & wait"]))
        deadline = time.monotonic() + 5  # until the setsid child exists, so teardown must find it
        while len(lan.hosts[0].pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(lan.hosts[0].pids()) >= 3
        assert len(lan.namespaces) == 3
        assert len(_ours(lan.prefix)) == 3
        raise RuntimeError("boom")


def test_teardown_when_body_raises() -> None:
    require_netns()
    lan = NetnsLan(2)
    procs: list[subprocess.Popen[bytes]] = []
    with pytest.raises(RuntimeError, match="boom"):
        _body_that_raises(lan, procs)
    assert lan.closed
    assert not _ours(lan.prefix)
    assert len(procs) == 3
    assert all(p.returncode is not None for p in procs)
    lan.close()  # idempotent


def test_teardown_when_setup_fails_halfway(monkeypatch: pytest.MonkeyPatch) -> None:
    require_netns()
    real = NetnsLan._configure_host

    def flaky(self: NetnsLan, host: Host, index: int) -> None:
        if index == 2:
            raise NetnsError("injected failure")
        real(self, host, index)

    monkeypatch.setattr(NetnsLan, "_configure_host", flaky)
    lan = NetnsLan(3)
    with pytest.raises(NetnsError, match="injected"):
        lan.start()
    assert lan.closed
    assert lan.namespaces == []
    assert not _ours(lan.prefix)


def test_late_host_and_kill() -> None:
    require_netns()
    with NetnsLan(2) as lan:
        h1, h2 = lan.hosts
        h3 = lan.add_host()
        assert h3.name == "h3"
        assert h3.ping(h1.address)
        assert h1.ping(h3.address)
        h2.popen(["sleep", "300"])
        h2.popen(["sh", "-c", "setsid sleep 300 & wait"])
        deadline = time.monotonic() + 5
        while len(h2.pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(h2.pids()) >= 3
        lan.kill(h2)
        assert h2.pids() == []
        assert h2.ping(h1.address)  # the host itself is still on the LAN
        prefix = lan.prefix
    assert not _ours(prefix)
    with pytest.raises(NetnsError):
        lan.add_host()


def test_zeroconf_discovery_across_hosts(netns_lan: NetnsLan) -> None:
    h1, h2, h3 = netns_lan.hosts
    registrars = [
        h.popen(
            [sys.executable, "-c", _REGISTER, h.name, h.address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for h in (h1, h2)
    ]
    for proc in registrars:
        _wait_line(proc, "registered", timeout=20)
    res = h3.run([sys.executable, "-c", _BROWSE, h3.address, "h1,h2", "10"], timeout=40, check=True)
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(found) == {"h1", "h2"}, res
    assert found["h1"] == [h1.address]
    assert found["h2"] == [h2.address]
    for proc in registrars:  # graceful goodbye: close stdin
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in registrars:
        assert proc.wait(timeout=15) == 0


# -- the guard ---------------------------------------------------------------------------------


def _never_reach_original(*args: object, **kwargs: object) -> None:
    raise AssertionError("guard let a Zeroconf through in the host namespace")


def test_guard_raises_in_host_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    from zeroconf import Zeroconf
    from zeroconf.asyncio import AsyncZeroconf

    # Belt and braces: should the guard fail, no socket is ever opened in the host namespace.
    monkeypatch.setattr(_STATE, "original", _never_reach_original)
    allowed, _ = zeroconf_allowed()
    assert not allowed
    with pytest.raises(RuntimeError, match=FORBIDDEN_MESSAGE):
        Zeroconf(interfaces=["127.0.0.1"])
    with pytest.raises(RuntimeError, match=FORBIDDEN_MESSAGE):
        AsyncZeroconf(interfaces=["127.0.0.1"])


def test_guard_env_var_alone_is_not_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NETNS_ENV, "1")
    allowed, why = zeroconf_allowed()
    assert not allowed
    assert NETNS_ENV in why


def test_guard_allows_inside_a_test_namespace(netns_lan: NetnsLan) -> None:
    host = netns_lan.hosts[0]
    res = host.run(
        [sys.executable, "-c", _GUARD_IN_NETNS, str(TESTS_DIR), host.address], timeout=30
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "constructed"
