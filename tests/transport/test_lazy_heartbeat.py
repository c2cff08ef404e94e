"""The heartbeat's reset without a callback per receiving turn (``_LazyHeartbeat``): pings
keep aiohttp's schedule and an answered ping keeps the link up. A frozen peer is still
dropped: ``test_websocket.test_frozen_peer_is_dropped_by_the_heartbeat``."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from helpers import wait_for
from subcog_crdt._transport.websocket import WebSocketLink
from transport.test_websocket import pair

DEADLINE = 20.0


@pytest.fixture
def pings(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Pings sent by aiohttp's own heartbeat code, counted by side ("client"/"server")."""
    sent: Counter[str] = Counter()
    sides = (("client", aiohttp.ClientWebSocketResponse), ("server", web.WebSocketResponse))
    for side, cls in sides:
        inner: Callable[[Any], None] = cls._send_heartbeat

        def counted(self: Any, inner: Callable[[Any], None] = inner, side: str = side) -> None:
            before = self._pong_response_cb
            inner(self)
            if self._pong_response_cb is not None and self._pong_response_cb is not before:
                sent[side] += 1  # a ping went out: its pong deadline is armed

        monkeypatch.setattr(cls, "_send_heartbeat", counted)
    return sent


async def test_an_idle_link_answers_pings_and_stays_up(pings: Counter[str]) -> None:
    """Each answered ping's deadline finds the pong (data since the ping) and arms the next
    ping instead of dropping the peer; after several rounds the link still carries
    frames."""
    async with pair(heartbeat=0.1, dead_after=3.0) as (a, _ra, _b, rb):
        link = await a.connect(b_url := _b.url)
        assert b_url is not None
        await wait_for(
            lambda: pings["client"] >= 4 and pings["server"] >= 4, DEADLINE, "ping rounds"
        )
        assert not link.closed, link.close_reason
        await link.send(b"still here")
        assert await rb.next_frame("a") == b"still here"


async def test_traffic_postpones_the_ping(pings: Counter[str]) -> None:
    """Data received marks the time only; the heartbeat timer, firing with data since it
    was armed, sends no ping and re-arms itself for ``heartbeat`` after that data."""
    async with pair(heartbeat=30.0, dead_after=60.0) as (a, ra, b, _rb):
        assert b.url is not None
        link = await a.connect(b.url)
        peer = await _rb.next_link()
        ws: Any = link._ws
        assert isinstance(link, WebSocketLink)
        loop = asyncio.get_running_loop()
        ws._need_heartbeat_reset = False  # whatever the handshake left
        await peer.send(b"traffic")
        assert await ra.next_frame("b") == b"traffic"
        assert ws._need_heartbeat_reset
        data_at = ws._data_at
        assert 0 < loop.time() - data_at < DEADLINE
        ws._send_heartbeat()  # as its timer would
        assert pings["client"] == 0
        assert not ws._need_heartbeat_reset
        assert ws._heartbeat_when == data_at + ws._heartbeat
        assert ws._heartbeat_cb is not None
        assert ws._heartbeat_cb.when() == ws._heartbeat_when
        # No data since: aiohttp's code runs, and its timer is not due yet (no ping).
        ws._send_heartbeat()
        assert pings["client"] == 0
        assert ws._heartbeat_cb is not None and ws._heartbeat_cb.when() == ws._heartbeat_when
        # Once due, the ping goes out and its pong deadline is armed.
        ws._heartbeat_when = loop.time()
        ws._send_heartbeat()
        assert pings["client"] == 1
        assert ws._pong_response_cb is not None
        await wait_for(lambda: ws._need_heartbeat_reset, DEADLINE, "the pong arrives")
        ws._pong_not_received()  # as its deadline would: the pong came, so alive
        assert ws._pong_response_cb is None
        assert not link.closed
        assert ws._heartbeat_cb is not None
        assert ws._heartbeat_when == ws._data_at + ws._heartbeat
