"""``/yjs/<namespace>`` (docs/yjs.md; src/subcog_crdt/_yjs.py): a stock y-websocket client
(``WebsocketProvider`` from the pinned ``y-websocket`` 3.1.0, in Node) syncs with a node
directly.

What is asserted: the client gets the node's memories on connect (step 1 / step 2); a
memory it writes (as docs/schema.md says) becomes a ``Captured`` event naming its session
on the node and reaches the node's peer; the node's later capture reaches the client
live; and hostile or unauthorised clients are refused with the node's data unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helpers import url_of
from subcog_crdt import Captured, ConversationsApi
from subcog_crdt._core.ydecode import varuint_bytes

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"host": "127.0.0.1", "discovery": ()}

CLIENT = r"""
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const [url, room, id, token] = process.argv.slice(2)
const say = (o) => process.stdout.write(JSON.stringify(o) + '\n')
const doc = new Y.Doc()
const entries = doc.getMap('entries')
const params = token ? { token } : {}
const provider = new WebsocketProvider(url, room, doc,
  { WebSocketPolyfill: WebSocket, disableBc: true, params })
const contents = () => [...entries.values()].map((v) => JSON.parse(v).set?.content)
provider.on('sync', (synced) => {
  if (!synced) return
  say({ synced: contents() })
  const stamp = String(Date.now()).padStart(13, '0') + '000000'
  entries.set(`${id}/${stamp}/js-session/3f9a2b1c4d5e6f70`,
    JSON.stringify({ v: 1, op: 'capture', set: { content: 'From JS', tags: ['js'] } }))
  entries.observe(() => {
    if (contents().includes('from python, live')) {
      say({ live: contents() })
      provider.destroy()
      process.exit(0)
    }
  })
})
setTimeout(() => { say({ timeout: contents() }); process.exit(3) }, 60000)
"""


def schema_id(namespace: str, content: str) -> str:
    norm = " ".join(content.split()).casefold()
    return hashlib.sha256(f"{namespace}\0{norm}".encode()).hexdigest()[:20]


async def read_json_line(stream: asyncio.StreamReader) -> dict[str, Any]:
    async with asyncio.timeout(60):
        line = await stream.readline()
    assert line, "the Node client ended without a line"
    out: dict[str, Any] = json.loads(line)
    return out


async def run_client(
    node_js: str, tmp_path: Path, api: ConversationsApi, room: str, token: str = ""
) -> asyncio.subprocess.Process:
    (tmp_path / "node_modules").symlink_to(ROOT / "benchmarks" / "node" / "node_modules")
    script = tmp_path / "client.mjs"
    script.write_text(CLIENT)
    base = url_of(api) + "/yjs"
    return await asyncio.create_subprocess_exec(
        node_js,
        str(script),
        base,
        room,
        schema_id(room, "From JS"),
        token,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_a_stock_yjs_client_reads_writes_and_follows_a_namespace(
    node_js: str, tmp_path: Path
) -> None:
    async with (
        ConversationsApi(**LOOPBACK) as a,
        ConversationsApi(peers=[url_of(a)], **LOOPBACK) as b,
    ):
        s = await a.register_session("py", subscribe=["decisions"])
        await s.capture("decisions", "Use SQLite WAL", tags=["storage"])
        events = s.events()
        proc = await run_client(node_js, tmp_path, a, "decisions")
        try:
            assert proc.stdout is not None
            first = await read_json_line(proc.stdout)
            assert first == {"synced": ["Use SQLite WAL"]}
            ev = await events.next(60)
            assert isinstance(ev, Captured)
            mid = schema_id("decisions", "From JS")
            assert (ev.memory_id, ev.source_session, ev.node_id) == (
                mid,
                "js-session",
                "3f9a2b1c4d5e6f70",
            )
            assert a.get(mid).tags == ("js",)
            # Entered the mesh at a: a's peer gets it too.
            assert [p.node_id for p in await a.settle(timeout=10)] == [b.node_id]
            assert b.get(mid).content == "From JS"
            await s.capture("decisions", "from python, live")
            last = await read_json_line(proc.stdout)
            assert sorted(last["live"]) == ["From JS", "Use SQLite WAL", "from python, live"]
            async with asyncio.timeout(60):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_the_token_lets_a_yjs_client_into_a_mesh_node(node_js: str, tmp_path: Path) -> None:
    secret = "correct horse battery staple, long enough"
    async with ConversationsApi(mesh_secret=secret, host="127.0.0.1", discovery=()) as a:
        s = await a.register_session("py", subscribe=["d"])
        await s.capture("d", "mesh only")
        assert a.push_token is not None
        proc = await run_client(node_js, tmp_path, a, "d", a.push_token)
        try:
            assert proc.stdout is not None
            assert await read_json_line(proc.stdout) == {"synced": ["mesh only"]}
            await s.capture("d", "from python, live")
            assert "from python, live" in (await read_json_line(proc.stdout))["live"]
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


def sync_message(step: int, payload: bytes) -> bytes:
    return bytes((0, step)) + varuint_bytes(len(payload)) + payload


@pytest.mark.parametrize(
    "message",
    [
        b"",  # no type
        b"\x00",  # sync without a step
        b"\x00\x02\x05ab",  # a byte string longer than the message
        sync_message(2, b"\x01\x02garbage that is not an update"),
        sync_message(0, b"\xff\xff\xff"),  # a bad state vector
        sync_message(7, b""),  # no such step
    ],
)
async def test_hostile_messages_close_the_client_and_change_nothing(message: bytes) -> None:
    async with ConversationsApi(**LOOPBACK) as api:
        s = await api.register_session("py", subscribe=["d"])
        await s.capture("d", "kept")
        before = api.state_hash("d")
        url = url_of(api) + "/yjs/d"
        async with aiohttp.ClientSession() as client, client.ws_connect(url) as ws:
            step1 = await ws.receive(timeout=30)
            assert step1.data[:2] == b"\x00\x00"  # the node's state vector first
            await ws.send_bytes(message)
            while True:
                msg = await ws.receive(timeout=30)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    break
        assert ws.close_code == 4000
        assert api.state_hash("d") == before
        # Still serving: a well-behaved client syncs.
        async with aiohttp.ClientSession() as client, client.ws_connect(url) as ws:
            await ws.receive(timeout=30)
            await ws.send_bytes(sync_message(0, b"\x00"))
            step2 = await ws.receive(timeout=30)
            assert step2.data[:2] == b"\x00\x01"
            assert len(step2.data) > 50  # the memory "kept"


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/yjs/d", {"Origin": "https://evil.example"}, 403),
        ("/yjs/secret-notes", {}, 403),
        ("/yjs/Not%20A%20Namespace", {}, 400),
    ],
)
async def test_refused_connections(path: str, headers: dict[str, str], status: int) -> None:
    async with ConversationsApi(private_namespaces=["secret-notes"], **LOOPBACK) as api:
        s = await api.register_session("py", subscribe=["secret-notes"])
        await s.capture("secret-notes", "never leaves")
        url = url_of(api).replace("ws://", "http://") + path
        async with (
            aiohttp.ClientSession() as client,
            client.get(url, headers={**headers, "Upgrade": "websocket"}) as resp,
        ):
            assert resp.status == status
            assert "error" in await resp.json()


async def test_a_mesh_node_wants_the_token() -> None:
    secret = "correct horse battery staple, long enough"
    async with ConversationsApi(mesh_secret=secret, host="127.0.0.1", discovery=()) as api:
        url = url_of(api) + "/yjs/d"
        async with aiohttp.ClientSession() as client:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(url + "?token=" + "0" * 64)
            assert refused.value.status == 401
            async with client.ws_connect(f"{url}?token={api.push_token}") as ws:
                first = await ws.receive(timeout=30)
                assert first.data[:2] == b"\x00\x00"
