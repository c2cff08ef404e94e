"""Anchor measurements for the sync benchmark.

Reference figures that any sync design of ours is compared against, all on loopback
(127.0.0.1) with every party in its own process:

* :func:`aiohttp_roundtrip_floor` - the transport floor: an aiohttp WebSocket echo server in a
  child process, round trips of 300-byte binary messages one at a time, and a one-way stream.
* :func:`pycrdt_websocket_relay` - pycrdt-websocket's ``WebsocketServer`` behind aiohttp as a
  relay, with two pycrdt client processes A and B in one room.
* :func:`node_relay` - the same measurement with the Node relay ``@y/websocket-server@0.1.1``
  (pinned in ``benchmarks/node``).
* :func:`pycrdt_direct_pair` - the same client A sending straight to a bare pycrdt document
  B behind an aiohttp server: no relay, what any node on pycrdt and aiohttp could at best
  reach (it stores, checks and publishes nothing).

Both relay measurements use the same minimal y-websocket protocol client (pycrdt's public sync
helpers over aiohttp, one message per capture, as the standard providers do). A captures
~300-byte strings under unique keys of the root map ``entries``; each value embeds A's
``time.monotonic_ns()`` (CLOCK_MONOTONIC is system-wide, so A's and B's clocks agree) and B
measures the propagation latency in its ``Map.observe`` callback.

Run ``python benchmarks/anchors.py`` for a table (``--json`` for machine-readable output).
Every child runs in its own process group, is killed (by group) in a ``finally`` block, and
also exits by itself when its stdin closes or after ``--lifetime`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any

import aiohttp
from aiohttp import web
from pycrdt import (
    Doc,
    Map,
    TransactionEvent,
    YMessageType,
    YSyncMessageType,
    create_sync_message,
    create_update_message,
    handle_sync_message,
)

HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node"
NODE_PINS: dict[str, str] = {
    "@y/websocket-server": "0.1.1",
    "yjs": "13.6.33",
    "y-websocket": "3.1.0",
    "ws": "8.23.0",
}
RECORD_SIZE = 300
CHILD_LIFETIME_S = 300.0  # every child process exits by itself after this long
STARTUP_TIMEOUT_S = 30.0
ROOM = "anchors"


# --------------------------------------------------------------------------------------------
# small helpers


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _latency_summary(samples_ns: list[int]) -> dict[str, float]:
    values = sorted(v / 1e6 for v in samples_ns)
    return {
        "p50_ms": round(_percentile(values, 50), 3),
        "p99_ms": round(_percentile(values, 99), 3),
        "mean_ms": round(sum(values) / len(values), 3) if values else math.nan,
        "max_ms": round(values[-1], 3) if values else math.nan,
        "n": len(values),
    }


def _record(kind: str, index: int) -> tuple[str, str]:
    """A key and a ~RECORD_SIZE-character value embedding the capture time (monotonic ns)."""
    head = f"{kind}|{index}|{time.monotonic_ns()}|"
    return f"{kind}-{index}", head + "x" * max(0, RECORD_SIZE - len(head))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _wait_stdin_eof(reader: asyncio.StreamReader) -> None:
    while await reader.readline():
        pass


def _emit(tag: str, payload: object = "") -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    print(f"{tag} {text}".rstrip(), flush=True)


class _Child:
    """A child process in its own session / process group, talking line by line."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, stderr: IO[bytes]) -> None:
        self.name = name
        self.proc = proc
        self._stderr = stderr

    @classmethod
    async def start(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> _Child:
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            stderr.close()
            raise
        return cls(name, proc, stderr)

    @classmethod
    async def python_role(cls, name: str, role: str, *args: str) -> _Child:
        argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, *args]
        return await cls.start(name, argv)

    def stderr_tail(self, limit: int = 1500) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-limit:].strip()

    async def expect(self, prefix: str, timeout: float) -> str:
        """Read lines until one starts with ``prefix``; return the rest of that line."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no {prefix!r} within {timeout:.0f} s")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except TimeoutError:
                raise TimeoutError(
                    f"{self.name}: no {prefix!r} within {timeout:.0f} s; "
                    f"stderr: {self.stderr_tail()}"
                ) from None
            if not line:
                await self.proc.wait()
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}) before {prefix!r}; "
                    f"stderr: {self.stderr_tail()}"
                )
            text = line.decode(errors="replace").strip()
            if text.startswith(prefix):
                return text[len(prefix) :].strip()

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        if self.proc.returncode is None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(text.encode() + b"\n")

    async def stop(self) -> None:
        """Terminate the whole process group, then kill it if it lingers."""
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        try:
            if self.proc.stdin is not None and not self.proc.stdin.is_closing():
                self.proc.stdin.close()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5.0)
            except TimeoutError:
                pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, 0)  # anyone (e.g. node under npx) still in the group?
                os.killpg(pgid, signal.SIGKILL)
            await asyncio.wait_for(self.proc.wait(), 5.0)
        finally:
            self._stderr.close()


async def _stop_all(children: Sequence[_Child]) -> None:
    for child in reversed(children):
        with contextlib.suppress(Exception):
            await child.stop()


# --------------------------------------------------------------------------------------------
# 1. transport floor


async def _role_echo_server(lifetime: float) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def sink(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        count = 0
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                count += 1
            elif msg.type == aiohttp.WSMsgType.TEXT and msg.data == "END":
                await ws.send_str(str(count))
                count = 0
        return ws

    async def oneway(request: web.Request) -> web.WebSocketResponse:
        # Each binary message starts with the sender's monotonic_ns (little endian); the
        # latency is taken where an application would see the message.
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        samples: list[int] = []
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                samples.append(time.monotonic_ns() - int.from_bytes(msg.data[:8], "little"))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                warmup = int(msg.data)
                await ws.send_str(json.dumps(_latency_summary(samples[warmup:])))
                samples.clear()
        return ws

    app = web.Application()
    app.router.add_get("/echo", echo)
    app.router.add_get("/sink", sink)
    app.router.add_get("/oneway", oneway)
    await _serve_until_stdin_eof(app, lifetime)


@contextlib.asynccontextmanager
async def _serving(app: web.Application) -> AsyncIterator[None]:
    """Serve ``app`` on a free loopback port (told to the parent as ``PORT``)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        _emit("PORT", str(runner.addresses[0][1]))
        yield
    finally:
        await runner.cleanup()


async def _serve_until_stdin_eof(app: web.Application, lifetime: float) -> None:
    async with _serving(app):
        stdin = await _stdin_lines()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_wait_stdin_eof(stdin), lifetime)


async def aiohttp_roundtrip_floor(
    n: int = 2000,
    size: int = 300,
    stream_n: int = 50_000,
    warmup: int = 200,
    oneway_n: int = 1000,
    oneway_rate: float = 200.0,
) -> dict[str, Any]:
    """Round trip p50/p99 (ms), one-way latency at ``oneway_rate`` messages/s (what a
    sync at that rate can at best reach), and one-way stream rate over an aiohttp
    WebSocket on loopback.

    The echo server runs in a child process; this process is the client.
    """
    payload = os.urandom(size)
    children: list[_Child] = []
    try:
        server = await _Child.python_role("echo-server", "echo-server")
        children.append(server)
        port = int(await server.expect("PORT", STARTUP_TIMEOUT_S))
        timeout = aiohttp.ClientWSTimeout(ws_receive=30.0)
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://{HOST}:{port}/echo", timeout=timeout) as ws:
                samples: list[int] = []
                for i in range(warmup + n):
                    t0 = time.perf_counter_ns()
                    await ws.send_bytes(payload)
                    reply = await ws.receive()
                    t1 = time.perf_counter_ns()
                    if reply.type != aiohttp.WSMsgType.BINARY or len(reply.data) != size:
                        raise RuntimeError(f"unexpected echo reply: {reply.type!r}")
                    if i >= warmup:
                        samples.append(t1 - t0)
            async with session.ws_connect(f"ws://{HOST}:{port}/oneway", timeout=timeout) as ws:
                start = time.monotonic()
                for i in range(warmup + oneway_n):
                    delay = start + i / oneway_rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)  # pacing, not synchronisation
                    stamp = time.monotonic_ns().to_bytes(8, "little")
                    await ws.send_bytes(stamp + payload[8:])
                await ws.send_str(str(warmup))
                reply = await ws.receive()
                if reply.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"unexpected one-way reply: {reply.type!r}")
                oneway = json.loads(reply.data)
            async with session.ws_connect(f"ws://{HOST}:{port}/sink", timeout=timeout) as ws:
                for _ in range(warmup):
                    await ws.send_bytes(payload)
                await ws.send_str("END")
                await ws.receive()
                t0 = time.perf_counter_ns()
                for _ in range(stream_n):
                    await ws.send_bytes(payload)
                await ws.send_str("END")
                reply = await ws.receive()
                t1 = time.perf_counter_ns()
                if reply.type != aiohttp.WSMsgType.TEXT or int(reply.data) != stream_n:
                    raise RuntimeError(f"sink counted {reply.data!r}, expected {stream_n}")
        lat = _latency_summary(samples)
        return {
            "transport": f"aiohttp {aiohttp.__version__}",
            "size": size,
            "rtt_p50_ms": lat["p50_ms"],
            "rtt_p99_ms": lat["p99_ms"],
            "rtt_n": n,
            "oneway_p50_ms": oneway["p50_ms"],
            "oneway_p99_ms": oneway["p99_ms"],
            "oneway_rate": oneway_rate,
            "oneway_n": oneway["n"],
            "stream_msgs_per_s": round(stream_n / ((t1 - t0) / 1e9)),
            "stream_n": stream_n,
        }
    finally:
        await _stop_all(children)


# --------------------------------------------------------------------------------------------
# 2. relays and the pycrdt client


class _AiohttpChannel:
    """pycrdt ``Channel`` over an aiohttp server-side WebSocket (for pycrdt-websocket)."""

    def __init__(self, ws: web.WebSocketResponse, path: str) -> None:
        self._ws = ws
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> _AiohttpChannel:
        return self

    async def __anext__(self) -> bytes:
        while True:
            msg = await self._ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                return bytes(msg.data)
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                raise StopAsyncIteration

    async def recv(self) -> bytes:
        return await self.__anext__()

    async def send(self, message: bytes) -> None:
        # The room broadcasts in its own task group: a send to a peer that just left must
        # not bring the room down.
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._ws.send_bytes(message)


async def _role_py_relay(lifetime: float) -> None:
    from pycrdt.websocket import WebsocketServer, exception_logger

    async with WebsocketServer(auto_clean_rooms=False, exception_handler=exception_logger) as ys:

        async def handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ys.serve(_AiohttpChannel(ws, request.path))
            return ws

        app = web.Application()
        app.router.add_get("/{room:.*}", handler)
        await _serve_until_stdin_eof(app, lifetime)


class _YClient:
    """Minimal y-websocket protocol client: one update message per local transaction."""

    def __init__(self, doc: Doc[Any], ws: aiohttp.ClientWebSocketResponse) -> None:
        self.doc = doc
        self.ws = ws
        self.synced = asyncio.Event()
        self._applying_remote = False
        self._outbox: list[bytes] = []
        self._subscription = doc.observe(self._on_update)

    def _on_update(self, event: TransactionEvent) -> None:
        if not self._applying_remote:  # never send back what the relay gave us
            self._outbox.append(event.update)

    async def flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for update in outbox:
            await self.ws.send_bytes(create_update_message(update))

    async def run(self) -> None:
        await self.ws.send_bytes(create_sync_message(self.doc))
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            data = bytes(msg.data)
            if len(data) < 2 or data[0] != YMessageType.SYNC:
                continue  # awareness and the like
            self._applying_remote = True
            try:
                reply = handle_sync_message(data[1:], self.doc)
            finally:
                self._applying_remote = False
            if reply is not None:
                await self.ws.send_bytes(reply)
            if data[1] == YSyncMessageType.SYNC_STEP2:
                self.synced.set()


async def _role_client_a(
    url: str, rate: float, warmup: int, n_lat: int, sustained_n: int, yield_every: int
) -> None:
    """Producer: paced captures for latency, then captures as fast as possible."""
    stdin = await _stdin_lines()
    doc: Doc[Any] = Doc()
    entries = doc.get("entries", type=Map)
    timeout = aiohttp.ClientWSTimeout(ws_receive=None)
    async with aiohttp.ClientSession() as session, session.ws_connect(url, timeout=timeout) as ws:
        client = _YClient(doc, ws)
        reader = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(client.synced.wait(), STARTUP_TIMEOUT_S)
            _emit("READY")

            async def capture(kind: str, index: int) -> None:
                key, value = _record(kind, index)
                with doc.transaction():
                    entries[key] = value
                await client.flush()

            async def paced(kind: str, count: int, first: int = 0) -> None:
                start = time.monotonic()
                for i in range(count):
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)  # pacing, not synchronisation
                    await capture(kind, first + i)

            command = (await stdin.readline()).strip()
            if command == b"GO_LAT":
                await paced("w", warmup)
                await paced("l", n_lat)
            elif command == b"GO_WARM":
                await paced("w", warmup)
                if not await _paced_in_chunks(stdin, n_lat, paced):
                    return
            else:
                return
            _emit("LAT_SENT")

            if (await stdin.readline()).strip() != b"GO_SUS":
                return
            t0 = time.monotonic_ns()
            for i in range(sustained_n):
                await capture("s", i)
                if i % yield_every == yield_every - 1:
                    await asyncio.sleep(0)
            t1 = time.monotonic_ns()
            _emit("SUS_SENT", {"t0_ns": t0, "t1_ns": t1})
            await _wait_stdin_eof(stdin)  # the parent closes stdin when B has everything
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


async def _paced_in_chunks(
    stdin: asyncio.StreamReader, n_lat: int, paced: Callable[[str, int, int], Awaitable[None]]
) -> bool:
    """The latency phase in chunks the parent asks for (``GO_CHUNK n``, answered with
    ``CHUNK_SENT``), so that it can interleave several systems' phases; False if the
    parent asked for something else."""
    _emit("WARM_SENT")
    sent = 0
    while sent < n_lat:
        command = (await stdin.readline()).strip().split()
        if len(command) != 2 or command[0] != b"GO_CHUNK":
            return False
        count = min(int(command[1]), n_lat - sent)
        await paced("l", count, sent)
        sent += count
        _emit("CHUNK_SENT")
    return True


class _Arrivals:
    """B's side of a measurement: latency per capture from the embedded timestamps (in a
    ``Map.observe`` callback), then the arrival times of the sustained phase."""

    def __init__(self, warmup: int, n_lat: int, sustained_n: int) -> None:
        self.n_lat = n_lat
        self.sustained_n = sustained_n
        self.lat_ns: list[int] = []
        self.counts = {"w": 0, "l": 0, "s": 0}
        self.sus = {"first_ns": 0, "last_ns": 0}
        self.lat_done = asyncio.Event()
        self.sus_done = asyncio.Event()

    def on_change(self, event: Any) -> None:
        now = time.monotonic_ns()
        counts = self.counts
        for change in event.keys.values():
            if change.get("action") != "add":
                continue
            kind, _, stamp, _ = str(change["newValue"]).split("|", 3)
            counts[kind] += 1
            if kind == "l":
                self.lat_ns.append(now - int(stamp))
                if counts["l"] == self.n_lat:
                    self.lat_done.set()
            elif kind == "s":
                if counts["s"] == 1:
                    self.sus["first_ns"] = now
                self.sus["last_ns"] = now
                if counts["s"] == self.sustained_n:
                    self.sus_done.set()


async def _role_client_b(url: str, warmup: int, n_lat: int, sustained_n: int) -> None:
    """Consumer: latency per capture from the embedded timestamps, then arrival times."""
    doc: Doc[Any] = Doc()
    entries = doc.get("entries", type=Map)
    arrivals = _Arrivals(warmup, n_lat, sustained_n)
    entries.observe(arrivals.on_change)
    timeout = aiohttp.ClientWSTimeout(ws_receive=None)
    async with aiohttp.ClientSession() as session, session.ws_connect(url, timeout=timeout) as ws:
        client = _YClient(doc, ws)
        reader = asyncio.create_task(client.run())
        parent_gone = asyncio.create_task(_wait_stdin_eof(await _stdin_lines()))

        async def until(event: asyncio.Event) -> None:
            waiter = asyncio.create_task(event.wait())
            await asyncio.wait({waiter, reader, parent_gone}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                waiter.cancel()
                raise RuntimeError("relay connection closed or parent gone")

        try:
            await asyncio.wait_for(client.synced.wait(), STARTUP_TIMEOUT_S)
            _emit("READY")
            await until(arrivals.lat_done)
            _emit("LAT", _latency_summary(arrivals.lat_ns))
            await until(arrivals.sus_done)
            _emit("SUS", arrivals.sus)
        finally:
            for task in (reader, parent_gone):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def _role_direct_b(warmup: int, n_lat: int, sustained_n: int) -> None:
    """B of the direct pair: a bare pycrdt document behind an aiohttp WebSocket server,
    answering A's sync and applying its updates (no relay, storage, events or auth)."""
    doc: Doc[Any] = Doc()
    entries = doc.get("entries", type=Map)
    arrivals = _Arrivals(warmup, n_lat, sustained_n)
    entries.observe(arrivals.on_change)

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            data = bytes(msg.data)
            if len(data) < 2 or data[0] != YMessageType.SYNC:
                continue
            reply = handle_sync_message(data[1:], doc)
            if reply is not None:
                await ws.send_bytes(reply)
        return ws

    app = web.Application()
    app.router.add_get("/{room:.*}", handler)
    async with _serving(app):
        stdin = await _stdin_lines()
        await arrivals.lat_done.wait()
        _emit("LAT", _latency_summary(arrivals.lat_ns))
        await arrivals.sus_done.wait()
        _emit("SUS", arrivals.sus)
        await _wait_stdin_eof(stdin)


async def _measure_through_relay(
    url: str, rate: float, seconds: float, sustained_n: int, warmup: int, yield_every: int
) -> dict[str, Any]:
    """Run clients B then A (separate processes) against a running relay at ``url``."""
    n_lat = max(1, round(rate * seconds))
    children: list[_Child] = []
    try:
        b = await _Child.python_role(
            "client-b", "client-b", url, "--warmup", str(warmup), "--n-lat", str(n_lat),
            "--sustained-n", str(sustained_n),
        )  # fmt: skip
        children.append(b)
        await b.expect("READY", STARTUP_TIMEOUT_S)
        return await _measure_with_b(b, url, rate, seconds, sustained_n, warmup, yield_every)
    finally:
        await _stop_all(children)


async def _measure_with_b(
    b: _Child,
    url: str,
    rate: float,
    seconds: float,
    sustained_n: int,
    warmup: int,
    yield_every: int,
) -> dict[str, Any]:
    """Start client A against ``url`` and measure what B (ready, reading) receives."""
    n_lat = max(1, round(rate * seconds))
    children: list[_Child] = []
    try:
        a = await _Child.python_role(
            "client-a", "client-a", url, "--rate", str(rate), "--warmup", str(warmup),
            "--n-lat", str(n_lat), "--sustained-n", str(sustained_n),
            "--yield-every", str(yield_every),
        )  # fmt: skip
        children.append(a)
        await a.expect("READY", STARTUP_TIMEOUT_S)

        a.send_line("GO_LAT")
        lat = json.loads(await b.expect("LAT", (warmup + n_lat) / rate + 60))
        await a.expect("LAT_SENT", 30)

        a.send_line("GO_SUS")
        sent = json.loads(await a.expect("SUS_SENT", 300))
        arrived = json.loads(await b.expect("SUS", 300))
        sustained_s = (arrived["last_ns"] - sent["t0_ns"]) / 1e9
        produced_s = (sent["t1_ns"] - sent["t0_ns"]) / 1e9
        return {
            "rate": rate,
            "n": lat["n"],
            "p50_ms": lat["p50_ms"],
            "p99_ms": lat["p99_ms"],
            "mean_ms": lat["mean_ms"],
            "max_ms": lat["max_ms"],
            "sustained_n": sustained_n,
            "sustained_captures_per_s": round(sustained_n / sustained_s),
            "producer_captures_per_s": round(sustained_n / produced_s),
            "sustained_lag_ms": round((arrived["last_ns"] - sent["t1_ns"]) / 1e6, 1),
        }
    finally:
        await _stop_all(children)


async def pycrdt_direct_pair(
    rate: float = 200,
    seconds: float = 5,
    sustained_n: int = 20_000,
    warmup: int = 100,
    yield_every: int = 16,
) -> dict[str, Any]:
    """Propagation A -> B directly, no relay: the same client A, and B a bare pycrdt
    document behind an aiohttp WebSocket server. What any node built on pycrdt and
    aiohttp could at best reach between two processes (it stores nothing, publishes no
    events, checks nothing and authenticates no one)."""
    n_lat = max(1, round(rate * seconds))
    children: list[_Child] = []
    try:
        b = await _Child.python_role(
            "direct-b", "direct-b", "--warmup", str(warmup), "--n-lat", str(n_lat),
            "--sustained-n", str(sustained_n),
        )  # fmt: skip
        children.append(b)
        port = int(await b.expect("PORT", STARTUP_TIMEOUT_S))
        url = f"ws://{HOST}:{port}/{ROOM}"
        result = await _measure_with_b(b, url, rate, seconds, sustained_n, warmup, yield_every)
        return {"relay": "none (pycrdt A -> pycrdt B direct)", **result}
    finally:
        await _stop_all(children)


async def pycrdt_websocket_relay(
    rate: float = 200,
    seconds: float = 5,
    sustained_n: int = 20_000,
    warmup: int = 100,
    yield_every: int = 16,
) -> dict[str, Any]:
    """Propagation A -> pycrdt-websocket relay -> B: latency at ``rate``/s, then throughput."""
    from importlib.metadata import version

    children: list[_Child] = []
    try:
        relay = await _Child.python_role("py-relay", "py-relay")
        children.append(relay)
        port = int(await relay.expect("PORT", STARTUP_TIMEOUT_S))
        result = await _measure_through_relay(
            f"ws://{HOST}:{port}/{ROOM}", rate, seconds, sustained_n, warmup, yield_every
        )
        return {"relay": f"pycrdt-websocket {version('pycrdt-websocket')}", **result}
    finally:
        await _stop_all(children)


def _installed_node_version(package: str, node_dir: Path) -> str | None:
    manifest = node_dir / "node_modules" / package / "package.json"
    try:
        found = json.loads(manifest.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None
    return str(found)


def ensure_node_deps(node_dir: Path = NODE_DIR, timeout: float = 600.0) -> str | None:
    """Install the pinned Node packages (``npm ci``) if they are missing or differ.

    Returns None when ready, otherwise the reason they are not.
    """
    if shutil.which("node") is None:
        return "node not found on PATH"
    npm = shutil.which("npm")
    if npm is None:
        return "npm not found on PATH"
    if all(_installed_node_version(p, node_dir) == v for p, v in NODE_PINS.items()):
        return None
    lock = node_dir / "package-lock.json"
    verb = "ci" if lock.exists() else "install"
    cmd = [npm, verb, "--no-audit", "--no-fund", "--ignore-scripts"]
    try:
        done = subprocess.run(
            cmd, cwd=node_dir, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"npm {verb} failed: {exc}"
    if done.returncode != 0:
        return f"npm {verb} failed ({done.returncode}): {done.stderr.strip()[-500:]}"
    wrong = {p: _installed_node_version(p, node_dir) for p in NODE_PINS}
    wrong = {p: v for p, v in wrong.items() if v != NODE_PINS[p]}
    return f"after npm {verb}, unexpected versions: {wrong}" if wrong else None


async def _start_node_relay(children: list[_Child]) -> str:
    """Start ``@y/websocket-server`` (Node) and return its URL; raise ``_Skipped`` (with
    the reason) for a missing Node toolchain or packages."""
    reason = await asyncio.to_thread(ensure_node_deps)
    npx = shutil.which("npx")
    if reason is None and npx is None:
        reason = "npx not found on PATH"
    if reason is not None or npx is None:
        raise _Skipped(reason)
    port = _free_port()
    env = {
        **os.environ,
        "HOST": HOST,
        "PORT": str(port),
        "npm_config_update_notifier": "false",
    }
    # `timeout` keeps the group bounded even if this process dies without its finally.
    argv = ["timeout", "-k", "5", str(int(CHILD_LIFETIME_S)), npx, "--no", "y-websocket"]
    if shutil.which("timeout") is None:
        argv = argv[4:]
    try:
        relay = await _Child.start("node-relay", argv, cwd=NODE_DIR, env=env)
    except OSError as exc:
        raise _Skipped(f"cannot start: {exc}") from exc
    children.append(relay)
    await relay.expect("running at", STARTUP_TIMEOUT_S)
    return f"ws://{HOST}:{port}/{ROOM}"


class _Skipped(Exception):
    """A system that cannot run here (the reason is its message)."""


async def node_relay(
    rate: float = 200,
    seconds: float = 5,
    sustained_n: int = 20_000,
    warmup: int = 100,
    yield_every: int = 16,
) -> dict[str, Any]:
    """The same measurement through ``@y/websocket-server`` (Node). Never raises for a
    missing Node toolchain or packages: returns ``{"skipped": reason}`` instead."""
    children: list[_Child] = []
    try:
        try:
            url = await _start_node_relay(children)
        except _Skipped as exc:
            return {"relay": "@y/websocket-server", "skipped": str(exc)}
        result = await _measure_through_relay(url, rate, seconds, sustained_n, warmup, yield_every)
        version = NODE_PINS["@y/websocket-server"]
        return {"relay": f"@y/websocket-server {version} (node)", **result}
    finally:
        await _stop_all(children)


ANCHOR_PAIRS = ("pycrdt direct pair", "pycrdt-websocket relay", "node relay")


async def start_anchor_pair(
    name: str, children: list[_Child], rate: float, n_lat: int, warmup: int
) -> tuple[_Child, _Child]:
    """Start one of ``ANCHOR_PAIRS`` (its relay, then B, then A, both READY) for a latency
    phase in chunks (``GO_WARM``, then ``GO_CHUNK n``: see ``_paced_in_chunks``); the
    children go to ``children``. Raises ``_Skipped`` for a Node relay that cannot run."""
    lat = ("--warmup", str(warmup), "--n-lat", str(n_lat), "--sustained-n", "1")
    if name == "pycrdt direct pair":
        b = await _Child.python_role("direct-b", "direct-b", *lat)
        children.append(b)
        url = f"ws://{HOST}:{int(await b.expect('PORT', STARTUP_TIMEOUT_S))}/{ROOM}"
    else:
        if name == "node relay":
            url = await _start_node_relay(children)
        else:
            relay = await _Child.python_role("py-relay", "py-relay")
            children.append(relay)
            url = f"ws://{HOST}:{int(await relay.expect('PORT', STARTUP_TIMEOUT_S))}/{ROOM}"
        b = await _Child.python_role("client-b", "client-b", url, *lat)
        children.append(b)
        await b.expect("READY", STARTUP_TIMEOUT_S)
    a = await _Child.python_role(
        "client-a", "client-a", url, "--rate", str(rate), *lat, "--yield-every", "16"
    )
    children.append(a)
    await a.expect("READY", STARTUP_TIMEOUT_S)
    return a, b


# --------------------------------------------------------------------------------------------
# command line


def _run_role(ns: argparse.Namespace) -> None:
    role: str = ns.role
    lifetime: float = ns.lifetime
    coro: Any
    if role == "echo-server":
        coro = _role_echo_server(lifetime)
    elif role == "py-relay":
        coro = _role_py_relay(lifetime)
    elif role == "client-a":
        coro = asyncio.wait_for(
            _role_client_a(ns.url, ns.rate, ns.warmup, ns.n_lat, ns.sustained_n, ns.yield_every),
            lifetime,
        )
    elif role == "client-b":
        coro = asyncio.wait_for(
            _role_client_b(ns.url, ns.warmup, ns.n_lat, ns.sustained_n), lifetime
        )
    elif role == "direct-b":
        coro = asyncio.wait_for(_role_direct_b(ns.warmup, ns.n_lat, ns.sustained_n), lifetime)
    else:
        raise SystemExit(f"unknown role {role!r}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _print_table(results: dict[str, dict[str, Any]]) -> None:
    rows: list[tuple[str, str, str, str, str]] = [
        ("anchor", "p50 ms", "p99 ms", "stream / sustained per s", "notes")
    ]
    floor = results.get("floor", {})
    if "error" in floor:
        rows.append(("aiohttp round trip", "-", "-", "-", f"error: {floor['error']}"))
    elif floor:
        rows.append((
            f"{floor['transport']} round trip ({floor['size']} B)",
            _fmt(floor["rtt_p50_ms"]),
            _fmt(floor["rtt_p99_ms"]),
            _fmt(floor["stream_msgs_per_s"]) + " msgs",
            f"n={floor['rtt_n']:,}, stream n={floor['stream_n']:,}",
        ))  # fmt: skip
        rows.append((
            f"{floor['transport']} one way at {floor['oneway_rate']:g}/s",
            _fmt(floor["oneway_p50_ms"]),
            _fmt(floor["oneway_p99_ms"]),
            "-",
            f"n={floor['oneway_n']:,}",
        ))  # fmt: skip
    for key in ("pycrdt_websocket", "node", "direct"):
        res = results.get(key)
        if res is None:
            continue
        name = str(res.get("relay", key))
        if "skipped" in res or "error" in res:
            why = f"skipped: {res['skipped']}" if "skipped" in res else f"error: {res['error']}"
            rows.append((name, "-", "-", "-", why))
            continue
        rows.append((
            f"{name} A->B",
            _fmt(res["p50_ms"]),
            _fmt(res["p99_ms"]),
            _fmt(res["sustained_captures_per_s"]) + " captures",
            f"{res['n']} @ {res['rate']:g}/s; max {res['max_ms']} ms; producer "
            f"{res['producer_captures_per_s']:,}/s; n={res['sustained_n']:,}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for j, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


async def _run_all(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    # SIGTERM / SIGINT cancel the run, so every `finally` stops its children's groups.
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    results: dict[str, dict[str, Any]] = {}
    try:
        results["floor"] = await aiohttp_roundtrip_floor(n=ns.n, size=RECORD_SIZE)
    except Exception as exc:
        results["floor"] = {"error": repr(exc)}
    for key, func, relay in (
        ("pycrdt_websocket", pycrdt_websocket_relay, "pycrdt-websocket"),
        ("node", node_relay, "@y/websocket-server"),
        ("direct", pycrdt_direct_pair, "none (pycrdt A -> pycrdt B direct)"),
    ):
        try:
            results[key] = await func(rate=ns.rate, seconds=ns.seconds, sustained_n=ns.sustained_n)
        except Exception as exc:
            results[key] = {"relay": relay, "error": repr(exc)}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--n", type=int, default=2000, help="round trips for the floor")
    parser.add_argument("--rate", type=float, default=200.0, help="captures/s for latency")
    parser.add_argument("--seconds", type=float, default=5.0, help="latency phase length")
    parser.add_argument("--sustained-n", type=int, default=20_000)
    # internal: child process roles
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("url", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--n-lat", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--yield-every", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=CHILD_LIFETIME_S, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.role:
        _run_role(ns)
        return 0
    try:
        results = asyncio.run(_run_all(ns))
    except asyncio.CancelledError:
        print("anchors: interrupted; child processes stopped", file=sys.stderr)
        return 130
    if ns.json:
        print(json.dumps(results, indent=2))
    else:
        _print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
