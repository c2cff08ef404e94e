"""HTTP push (docs/push.md; src/subcog_crdt/_push.py): a local session's events over
Server-Sent Events and a WebSocket, from the node's own server, read with a real aiohttp
client on loopback.

What is asserted: a peer's capture arrives as an SSE event naming its session, with the
cursor as ``id``; a client that reconnects with ``Last-Event-ID`` gets exactly what it
missed, then live events (no gap, no duplicate); a burst larger than the stream's queue
arrives whole (refilled from the journal, no ``lagged``); the WebSocket variant sends the
same JSON; browsers, strangers without the token, unknown sessions and bad cursors are
refused with clear statuses; and closing the node ends open streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from helpers import url_of
from subcog_crdt import ConversationsApi
from subcog_crdt._push import _Pump

LOOPBACK = {"host": "127.0.0.1", "discovery": ()}


def http(api: ConversationsApi) -> str:
    return url_of(api).replace("ws://", "http://", 1)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Each SSE message as ``{"id": .., "event": .., "data": ..}`` (comments skipped)."""
    fields: dict[str, Any] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line == "":
            if fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value


async def take(it: AsyncIterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    out = []
    async with asyncio.timeout(60):
        while len(out) < n:
            out.append(await anext(it))
    return out


async def pair() -> tuple[ConversationsApi, ConversationsApi]:
    a = ConversationsApi(**LOOPBACK)
    await a.open()
    b = ConversationsApi(peers=[url_of(a)], **LOOPBACK)
    await b.open()
    await b.settle(timeout=10)
    return a, b


async def test_sse_streams_a_peers_writes_and_resumes_with_last_event_id() -> None:
    a, b = await pair()
    try:
        await a.register_session("reader", subscribe=["decisions"])
        writer = await b.register_session("writer", subscribe=["decisions"])
        url = f"{http(a)}/v1/sessions/reader/events"
        async with aiohttp.ClientSession() as client:
            async with client.get(url) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/event-stream"
                events = sse_events(resp)
                first = await writer.capture("decisions", "we chose SQLite WAL")
                (got,) = await take(events, 1)
                assert got["event"] == "captured"
                assert got["data"]["source_session"] == "writer"
                assert got["data"]["memory"]["id"] == first.id
                assert got["data"]["memory"]["content"] == "we chose SQLite WAL"
                assert int(got["id"]) == got["data"]["cursor"]
                resume_at = got["id"]
            # Disconnected: two writes are missed, then the client comes back.
            m2 = await writer.capture("decisions", "tests live next to the code")
            await writer.update(m2.id, status="accepted")
            assert await b.settle(timeout=10)  # a has both now
            assert a.get(m2.id).status == "accepted"
            headers = {"Last-Event-ID": resume_at}
            async with client.get(url, headers=headers) as resp:
                events = sse_events(resp)
                missed = await take(events, 2)
                assert [(e["event"], e["data"]["memory_id"]) for e in missed] == [
                    ("captured", m2.id),
                    ("updated", m2.id),
                ]
                assert missed[1]["data"]["changes"] == {"status": "accepted"}
                m3 = await writer.capture("decisions", "live again")
                (live,) = await take(events, 1)
                assert live["data"]["memory_id"] == m3.id
                cursors = [int(e["id"]) for e in [*missed, live]]
                assert cursors == sorted(set(cursors))
    finally:
        await b.aclose()
        await a.aclose()


async def test_a_burst_larger_than_the_queue_arrives_whole() -> None:
    async with ConversationsApi(**LOOPBACK) as api:
        reader = await api.register_session("reader", subscribe=["d"])
        writer = await api.register_session("writer", subscribe=["d"])
        n = 10_050  # the stream queue holds 10,000: the rest is refilled from the journal
        async with aiohttp.ClientSession() as client:
            url = f"{http(api)}/v1/sessions/{reader.id}/events"
            async with client.get(url) as resp:
                events = sse_events(resp)
                await writer.capture("d", "the stream is live")
                (first,) = await take(events, 1)
                await writer.capture_many("d", [f"fact {i}" for i in range(n)])
                rest = await take(events, n)
        assert {e["event"] for e in rest} == {"captured"}
        cursors = [int(e["id"]) for e in rest]
        assert cursors == list(range(int(first["id"]) + 1, int(first["id"]) + 1 + n))
        assert sorted(e["data"]["memory"]["content"] for e in rest) == sorted(
            f"fact {i}" for i in range(n)
        )


async def test_the_websocket_variant_sends_the_same_json() -> None:
    async with ConversationsApi(**LOOPBACK) as api:
        await api.register_session("reader", subscribe=["d"])
        writer = await api.register_session("writer", subscribe=["d"])
        old = await writer.capture("d", "before the client")
        async with aiohttp.ClientSession() as client:
            url = f"{http(api)}/v1/sessions/reader/ws?since=0"
            async with client.ws_connect(url) as ws:
                replayed = json.loads((await ws.receive(timeout=30)).data)
                assert (replayed["type"], replayed["memory_id"]) == ("captured", old.id)
                m = await writer.delete(old.id)
                live = json.loads((await ws.receive(timeout=30)).data)
                assert (live["type"], live["memory_id"], live["source_session"]) == (
                    "deleted",
                    m.id,
                    "writer",
                )
                assert live["cursor"] > replayed["cursor"]


async def test_own_events_only_when_asked() -> None:
    async with ConversationsApi(**LOOPBACK) as api:
        me = await api.register_session("me", subscribe=["d"])
        other = await api.register_session("other", subscribe=["d"])
        async with aiohttp.ClientSession() as client:
            base = f"{http(api)}/v1/sessions/me/events"
            async with client.get(base) as plain, client.get(f"{base}?include_own=true") as own:
                await me.capture("d", "mine")
                await other.capture("d", "theirs")
                (a,) = await take(sse_events(plain), 1)
                b = await take(sse_events(own), 2)
        assert a["data"]["memory"]["content"] == "theirs"
        assert [e["data"]["memory"]["content"] for e in b] == ["mine", "theirs"]


@pytest.mark.parametrize(
    ("path", "headers", "status", "says"),
    [
        ("/v1/sessions/reader/events", {"Origin": "https://evil.example"}, 403, "browsers"),
        ("/v1/sessions/nobody/events", {}, 404, "no session 'nobody'"),
        ("/v1/sessions/reader/events", {"Last-Event-ID": "-1"}, 400, "cursor"),
        ("/v1/sessions/reader/events?since=abc", {}, 400, "cursor"),
        ("/v1/sessions/reader/ws", {"Origin": "http://127.0.0.1"}, 403, "browsers"),
    ],
)
async def test_refused_requests(path: str, headers: dict[str, str], status: int, says: str) -> None:
    async with ConversationsApi(**LOOPBACK) as api:
        await api.register_session("reader", subscribe=["d"])
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{http(api)}{path}", headers=headers) as resp,
        ):
            assert resp.status == status
            assert says in (await resp.json())["error"]
        assert api.push_token is None


async def test_a_cursor_ahead_of_the_node_is_an_error_message() -> None:
    async with ConversationsApi(**LOOPBACK) as api:
        await api.register_session("reader", subscribe=["d"])
        async with aiohttp.ClientSession() as client:
            url = f"{http(api)}/v1/sessions/reader/events"
            async with client.get(url, headers={"Last-Event-ID": "999"}) as resp:
                (msg,) = await take(sse_events(resp), 1)
                assert msg["event"] == "error"
                assert "ahead" in msg["data"]["error"]
                assert await resp.content.read() == b""  # then the stream ends


async def test_with_a_secret_the_token_is_required() -> None:
    secret = "correct horse battery staple, long enough"
    async with ConversationsApi(mesh_secret=secret, host="127.0.0.1", discovery=()) as api:
        writer = await api.register_session("writer", subscribe=["d"])
        await api.register_session("reader", subscribe=["d"])
        token = api.push_token
        assert token is not None and len(token) == 64
        url = f"{http(api)}/v1/sessions/reader/events"
        async with aiohttp.ClientSession() as client:
            for auth in (None, "Bearer " + "0" * 64, token, f"Basic {token}", "Bearer é" + token):
                headers = {} if auth is None else {"Authorization": auth}
                async with client.get(url, headers=headers) as resp:
                    assert resp.status == 401
                    assert "Bearer" in (await resp.json())["error"]
            good = {"Authorization": f"Bearer {token}"}
            async with client.get(url, headers=good) as resp:
                assert resp.status == 200
                await writer.capture("d", "for the mesh only")
                (got,) = await take(sse_events(resp), 1)
                assert got["data"]["memory"]["content"] == "for the mesh only"


async def test_closing_the_node_ends_open_streams() -> None:
    api = ConversationsApi(**LOOPBACK)
    await api.open()
    await api.register_session("reader", subscribe=["d"])
    writer = await api.register_session("writer", subscribe=["d"])
    async with aiohttp.ClientSession() as client:
        url = f"{http(api)}/v1/sessions/reader/events"
        async with client.get(url) as resp, client.ws_connect(url.replace("events", "ws")) as ws:
            await writer.capture("d", "one")
            await take(sse_events(resp), 1)
            assert json.loads((await ws.receive(timeout=30)).data)["type"] == "captured"
            async with asyncio.timeout(30):
                await api.aclose()
                assert await resp.content.read() == b""  # the SSE stream ended
                msg = await ws.receive()
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_an_event_both_replayed_and_live_is_sent_once() -> None:
    """The stream opens before the replay: a write made while the journal is replayed is
    in both. Driven through the pump itself, so the write lands at a known moment."""
    async with ConversationsApi(**LOOPBACK) as api:
        reader = await api.register_session("reader", subscribe=["d"])
        writer = await api.register_session("writer", subscribe=["d"])
        await writer.capture_many("d", [f"old {i}" for i in range(700)])  # two replay batches
        sent: list[dict[str, Any]] = []

        async def send(payload: dict[str, Any], cursor: int | None) -> None:
            if payload:
                sent.append(payload)
            if len(sent) == 1:  # during the replay's first batch
                await writer.capture("d", "written during the replay")
            elif len(sent) == 701:  # replayed all: the live copy is queued before this one
                await writer.capture("d", "sentinel")
            elif payload.get("memory", {}).get("content") == "sentinel":
                await api.unregister_session("reader")  # ends the stream, and the pump

        await _Pump(reader, 0, False, set()).run(send)
        contents = [e["memory"]["content"] for e in sent]
        assert contents.count("written during the replay") == 1
        assert len(sent) == 702
        cursors = [e["cursor"] for e in sent]
        assert cursors == sorted(set(cursors))
