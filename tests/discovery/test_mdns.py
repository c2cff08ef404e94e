"""MdnsDiscovery on a LAN of network namespaces (tests/support/netns.py).

zeroconf never runs in this process: each node is ``mdns_probe.py`` started inside a
NetnsLan host, and a raw AF_PACKET sniffer in the bridge namespace records every frame
that crosses the LAN, so the test can check what mDNS actually put on the wire.
Argument checks that stop before any socket is opened run in-process.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from zeroconf._dns import DNSText
from zeroconf._protocol.incoming import DNSIncoming

from subcog_crdt._discovery.base import Advert, mesh_tag
from subcog_crdt._discovery.mdns import SERVICE_TYPE, MdnsDiscovery
from subcog_crdt._errors import InvalidArgument
from support.netns import Host, NetnsLan
from support.sniff import sniff

PROBE = Path(__file__).with_name("mdns_probe.py")
FIND_DEADLINE = 15.0
# Bounds against hangs, not speed claims. Without the goodbye a peer's records stay cached
# for their TTL (PTR 75 min, SRV 2 min), so a loss seen within this bound is the goodbye.
LOST_DEADLINE = 20.0


class Probe:
    """One ``mdns_probe.py`` process in a LAN host, its events collected by a thread."""

    def __init__(self, host: Host, node_id: str, url: str, secret: str, *extra: str) -> None:
        self.host, self.node_id, self.url = host, node_id, url
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        argv = [sys.executable, str(PROBE), "--node-id", node_id, "--url", url]
        argv += ["--secret", secret, "--seconds", "60", *extra]
        self.proc = host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr = ""
        self._out = threading.Thread(target=self._read, daemon=True)
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._out.start()
        self._err.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError), self._lock:
                self.events.append(json.loads(line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == kind]

    def found_ids(self) -> set[str]:
        return {e["node_id"] for e in self.of("found")}

    def lost_ids(self) -> list[str]:
        return [e["node_id"] for e in self.of("lost")]

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self._out.join(timeout=2.0)
            self._err.join(timeout=2.0)
        return rc

    def describe(self) -> str:
        with self._lock:
            events = list(self.events)
        return f"{self.host.name} {self.node_id}: events={events} stderr={self.stderr[-2000:]!r}"


def finds(p: Probe, node_ids: set[str]) -> Callable[[], bool]:
    return lambda: p.found_ids() == node_ids


def wait_until(pred: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what()}")
        time.sleep(0.02)


def txt_keys(payloads: list[bytes]) -> dict[str, set[str]]:
    """TXT keys announced per service instance name."""
    keys: dict[str, set[str]] = {}
    for p in payloads:
        msg = DNSIncoming(p)
        for rec in msg.answers():
            if isinstance(rec, DNSText) and rec.name.endswith(SERVICE_TYPE) and rec.text:
                i, text = 0, rec.text
                while i < len(text):
                    n = text[i]
                    entry = text[i + 1 : i + 1 + n]
                    keys.setdefault(rec.name, set()).add(entry.split(b"=", 1)[0].decode())
                    i += 1 + n
    return keys


def test_mdns_mesh_on_a_lan(netns_lan: NetnsLan, tmp_path: Path) -> None:
    lan = netns_lan
    h1, h2, h3 = lan.hosts
    h4 = lan.add_host()
    secret = f"mesh-secret-{secrets.token_hex(8)}"
    other_secret = f"other-secret-{secrets.token_hex(8)}"
    tag, other_tag = mesh_tag(secret.encode()), mesh_tag(other_secret.encode())
    run = secrets.token_hex(3)
    capture = tmp_path / "lan.frames"

    with sniff(lan.bridge_netns, capture) as cap:
        probes = [
            # all interfaces, explicit address in the url
            Probe(h1, f"n1-{run}", f"ws://{h1.address}:7001", secret),
            # interface chosen by name
            Probe(h2, f"n2-{run}", f"ws://{h2.address}:7002", secret, "--interface", "lan0"),
            # listening on every address: the interface addresses are advertised
            Probe(h3, f"n3-{run}", "ws://0.0.0.0:7003", secret, "--interface", h3.address),
            # another mesh on the same LAN
            Probe(h4, f"n4-{run}", f"ws://{h4.address}:7004", other_secret),
        ]
        p1, p2, p3, p4 = probes
        mesh = [p1, p2, p3]
        expected_url = {p.node_id: f"ws://{p.host.address}:{7001 + i}" for i, p in enumerate(mesh)}
        try:
            for p in mesh:
                wait_until(
                    finds(p, {q.node_id for q in mesh if q is not p}),
                    FIND_DEADLINE,
                    lambda: "\n".join(q.describe() for q in probes),
                )
            for p in mesh:
                for e in p.of("found"):
                    assert e["url"] == expected_url[e["node_id"]], p.describe()
                    assert e["mesh_tag"] == tag
                    assert e["protocol"] == 1
            # The other mesh is visible on the wire (checked below) yet never reported.
            assert p4.of("started"), p4.describe()
            assert p4.of("found") == [], p4.describe()
            for p in mesh:
                assert p4.node_id not in p.found_ids()

            # A clean shutdown (SIGTERM -> aclose, awaiting the goodbye) is seen by the others.
            assert p1.stop() == 0, p1.describe()
            assert p1.of("closed"), p1.describe()
            wait_until(
                lambda: p2.lost_ids() == [p1.node_id] and p3.lost_ids() == [p1.node_id],
                LOST_DEADLINE,
                lambda: "\n".join(q.describe() for q in probes),
            )
            assert p4.lost_ids() == []
            for p in (p2, p3, p4):
                assert p.stop() == 0, p.describe()
        finally:
            for p in probes:
                with contextlib.suppress(Exception):
                    lan.kill(p.host)

    frames = cap.frames()
    payloads = cap.udp_payloads(5353)
    assert payloads, f"no mDNS captured ({len(frames)} frames)"
    wire = b"".join(frames)
    # Positive control: the capture does hold the announcements, tags and node ids...
    assert b"\x0c_subcog-crdt\x04_tcp\x05local" in wire  # DNS labels
    for p in probes:
        assert p.node_id.encode() in wire
    assert tag.encode() in wire
    assert other_tag.encode() in wire
    # ...and never a secret. (Content cannot be checked here: a probe holds none, and
    # discovery is never given any. tests/test_lan.py::
    # test_mdns_packets_carry_no_secret_and_no_content checks it with real nodes.)
    for s in (secret, other_secret):
        assert s.encode() not in wire
        assert s.encode().hex().encode() not in wire
    # The TXT records carry exactly id, v, s (the scheme) and mesh.
    keys = txt_keys(payloads)
    assert {f"{p.node_id}.{SERVICE_TYPE}" for p in probes} <= set(keys)
    for name, ks in keys.items():
        assert ks == {"id", "v", "s", "mesh"}, name


def test_probe_refuses_the_host_namespace() -> None:
    res = subprocess.run(
        [sys.executable, str(PROBE), "--node-id", "x", "--url", "ws://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2, res
    assert "refusing" in res.stderr


# -- argument checks (no socket is opened, so they run in this process) -------------------


ADVERT = Advert("node1", "ws://10.1.2.3:1", 1, mesh_tag(b"s"))


@pytest.mark.parametrize("interfaces", [[], ["::1"], ["fe80::1"], [""], "eth0"])
def test_bad_interfaces_are_refused_at_construction(interfaces: Any) -> None:
    with pytest.raises(InvalidArgument):
        MdnsDiscovery(interfaces)


@pytest.mark.parametrize("interfaces", [["no-such-if0"], ["192.0.2.77"]])
async def test_unknown_interfaces_are_refused_at_start(interfaces: list[str]) -> None:
    d = MdnsDiscovery(interfaces)
    with pytest.raises(InvalidArgument):
        await d.start(ADVERT, print, print)
    await d.aclose()


@pytest.mark.parametrize(
    "advert",
    [
        Advert("node1", "ws://10.1.2.3:1", 1, ""),  # no secret: loopback-only, no mDNS
        Advert("has.dot", "ws://10.1.2.3:1", 1, mesh_tag(b"s")),
        Advert("x" * 64, "ws://10.1.2.3:1", 1, mesh_tag(b"s")),
        Advert("node1", "ws://10.1.2.3", 1, mesh_tag(b"s")),
    ],
)
async def test_bad_adverts_are_refused(advert: Advert) -> None:
    d = MdnsDiscovery()
    with pytest.raises(InvalidArgument):
        await d.start(advert, print, print)
    await d.aclose()
