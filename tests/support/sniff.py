"""A raw packet sniffer for the namespace LAN (tests/support/netns.py).

:func:`sniff` runs a small Python AF_PACKET recorder inside one network namespace (usually
the LAN's bridge namespace, where every frame between the hosts passes) and yields a
:class:`Capture`. The recorder writes every frame seen on any interface of that namespace
to a file (4-byte big-endian length + frame) until it is stopped or its time limit ends.
Nothing is sent: the socket only receives. Needs root, like the LAN itself.

    with sniff(lan.bridge_netns, tmp_path / "lan.frames") as cap:
        ...  # traffic
    mdns = cap.udp_payloads(5353)
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Capture", "read_frames", "sniff", "tcp_syns", "udp_payloads"]

_STOP_TIMEOUT = 5.0

# argv: output path, time limit in seconds. Prints "ready" once the socket is bound.
_RECORDER = r"""
import signal, socket, struct, sys, time
out, seconds = sys.argv[1], float(sys.argv[2])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
s.settimeout(0.05)
print("ready", flush=True)
deadline = time.monotonic() + seconds
with open(out, "wb") as f:
    while not stop and time.monotonic() < deadline:
        try:
            frame = s.recv(65535)
        except (socket.timeout, InterruptedError):
            continue
        f.write(struct.pack("!I", len(frame)) + frame)
        f.flush()
"""


def read_frames(path: Path) -> list[bytes]:
    """The frames recorded in ``path`` (a truncated last record is dropped)."""
    data = path.read_bytes() if path.exists() else b""
    frames: list[bytes] = []
    i = 0
    while i + 4 <= len(data):
        (n,) = struct.unpack_from("!I", data, i)
        if i + 4 + n > len(data):
            break
        frames.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    return frames


def _ipv4(frames: list[bytes], proto: int, header: int) -> Iterator[tuple[bytes, int]]:
    """``(IP packet, IP header length)`` of the IPv4 Ethernet frames carrying ``proto``
    (6 TCP, 17 UDP) with at least ``header`` bytes of it."""
    for f in frames:
        if len(f) < 14 + 20 + 8 or f[12:14] != b"\x08\x00":  # IPv4 only
            continue
        ip = f[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] == proto and len(ip) >= ihl + header:
            yield ip, ihl


def udp_payloads(frames: list[bytes], port: int) -> list[bytes]:
    """UDP payloads sent from or to ``port`` in the IPv4 Ethernet frames ``frames``."""
    out: list[bytes] = []
    for ip, ihl in _ipv4(frames, 17, 8):
        sport, dport = struct.unpack_from("!HH", ip, ihl)
        if port in (sport, dport):
            out.append(ip[ihl + 8 :])
    return out


def tcp_syns(frames: list[bytes]) -> set[tuple[str, str, int]]:
    """``(source, destination, destination port)`` of every TCP connection attempt (SYN
    without ACK) in the IPv4 Ethernet frames ``frames``."""
    out: set[tuple[str, str, int]] = set()
    for ip, ihl in _ipv4(frames, 6, 14):
        (dport,) = struct.unpack_from("!H", ip, ihl + 2)
        flags = ip[ihl + 13]
        if flags & 0x02 and not flags & 0x10:
            src, dst = (".".join(str(b) for b in ip[i : i + 4]) for i in (12, 16))
            out.add((src, dst, dport))
    return out


@dataclass
class Capture:
    """Where a running (or finished) :func:`sniff` records its frames."""

    path: Path
    proc: subprocess.Popen[str]

    def frames(self) -> list[bytes]:
        """Every frame recorded so far."""
        return read_frames(self.path)

    def udp_payloads(self, port: int) -> list[bytes]:
        """UDP payloads from or to ``port`` recorded so far."""
        return udp_payloads(self.frames(), port)

    def stop(self) -> None:
        """Stop the recorder (SIGTERM, then SIGKILL of its process group). Idempotent."""
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=_STOP_TIMEOUT)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()


@contextlib.contextmanager
def sniff(netns: str, out: Path, seconds: float = 120.0) -> Iterator[Capture]:
    """Record every frame in namespace ``netns`` into ``out`` while the block runs (at
    most ``seconds``). The recorder is stopped on exit, on failure too; the frames stay
    readable through the yielded :class:`Capture` afterwards."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", _RECORDER, str(out), str(seconds)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    cap = Capture(out, proc)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the recorder prints or exits at once
        if line.strip() != "ready":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate(timeout=_STOP_TIMEOUT)
            raise RuntimeError(f"sniffer in {netns} did not start: {line!r} {err[-2000:]!r}")
        yield cap
    finally:
        cap.stop()
