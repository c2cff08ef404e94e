"""``relay=``: a standard y-websocket server as a meeting point for nodes that cannot dial
each other (peers beyond the LAN). See docs/yjs.md, "Relays".

The node is an ordinary y-websocket client of the relay: one room per namespace it
shares, kept connected (redialled with backoff and jitter), through the same code as
``/yjs/<ns>`` clients (what changes the namespace here goes to the room; what the room
sends is applied like a Yjs client's update, so it reaches this node's peers and
sessions). A directory room (a Yjs map of namespace names) tells the nodes of the mesh
which rooms exist, so a namespace created on one of them is joined by the others; each
node's awareness state there lists its sessions (``_presence``).

With a mesh secret, room names are derived from it (nobody without the secret finds the
rooms); the relay itself sees everything written to them, as it does for any Yjs client.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import secrets
from typing import TYPE_CHECKING

import aiohttp
from pycrdt import Doc, Map

from subcog_crdt._core.schema import check_namespace
from subcog_crdt._core.ydecode import ByteReader, UpdateDecodeError
from subcog_crdt._errors import InvalidArgument, InvalidNamespace, ProtocolError
from subcog_crdt._presence import RENEW_EVERY, Presence, encode_state, node_state
from subcog_crdt._transport.auth import mesh_key
from subcog_crdt._transport.websocket import BACKOFF_CAP, BACKOFF_START
from subcog_crdt._yjs import (
    MSG_AWARENESS,
    MSG_SYNC,
    STEP1,
    STEP2,
    UPDATE,
    YjsClient,
    handle_message,
    sync_message,
)

if TYPE_CHECKING:
    from subcog_crdt._api import ConversationsApi

__all__ = ["MAX_ROOMS", "Relay", "room_name"]

log = logging.getLogger(__name__)

MAX_ROOMS = 1024
"""Namespace rooms one node joins at a relay: a directory listing more (a hostile relay,
say) cannot make it open unbounded connections."""
_EMPTY_SV = b"\x00"
_DIAL_WITHIN = 10.0
"""Seconds for a room's WebSocket handshake, and for its closing one."""
_DIRECTORY = ""
"""The directory's label here ("" is no namespace's name)."""


def room_name(secret: bytes | None, label: str) -> str:
    """The relay room of namespace ``label`` ("": the directory)."""
    plain = f"ns-{label}" if label else "directory"
    if secret is None:
        return f"subcog-{plain}"
    digest = hmac.new(mesh_key(secret), b"subcog-crdt relay room v1\0" + plain.encode(), "sha256")
    return "subcog-" + digest.hexdigest()[:32]


class Relay:
    """This node's rooms at one relay."""

    def __init__(self, api: ConversationsApi, url: str) -> None:
        self.api = api
        self.url = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._directory: Doc[Map[bool]] = Doc()
        self._names: Map[bool] = self._directory.get("namespaces", type=Map)
        self._directory_ws: YjsClient | None = None
        self._closed = False
        # This node's awareness client in the directory room (53-bit, as Yjs' are).
        self._client_id = secrets.randbits(53)
        self._clock = 0
        self.presence = Presence(self._client_id, api.node_id)
        """Other nodes' sessions, as their states in the directory room say."""
        self.connected: set[str] = set()
        """Rooms (namespaces, and ``directory``) whose connection is up."""

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._tasks[_DIRECTORY] = asyncio.create_task(self._keep(_DIRECTORY))
        for ns in sorted(self.api._shareable_namespaces()):
            self.add_namespace(ns)

    def add_namespace(self, ns: str) -> None:
        """Join ``ns``'s room (once) and list it in the directory."""
        if self._closed or ns in self._tasks or not self.api._may_share(ns):
            return
        if len(self._tasks) > MAX_ROOMS:
            log.warning("relay %s: not joining %r: %d rooms already", self.url, ns, MAX_ROOMS)
            return
        self._tasks[ns] = asyncio.create_task(self._keep(ns))
        if ns not in self._names:
            before = self._directory.get_state()
            self._names[ns] = True
            if self._directory_ws is not None:
                self._directory_ws.send_update(self._directory.get_update(before))

    async def aclose(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _keep(self, label: str) -> None:
        """Keep the room of ``label`` connected until closed."""
        delay = BACKOFF_START
        url = f"{self.url}/{room_name(self.api._secret, label)}"
        while not self._closed:
            # Its own task: a relay that stops reading has it cancelled (YjsClient.cut).
            conn = asyncio.create_task(self._connect(label, url))
            try:
                await asyncio.wait([conn])
            except asyncio.CancelledError:
                conn.cancel()
                await asyncio.gather(conn, return_exceptions=True)
                raise
            if conn.cancelled():
                log.info("relay %s: room of %r cut: the relay does not read", self.url, label)
            elif (exc := conn.exception()) is None:
                delay = BACKOFF_START
            elif isinstance(exc, aiohttp.ClientError | OSError | ProtocolError | TimeoutError):
                log.info("relay %s: room of %r: %s", self.url, label, exc)
            else:
                # Not one we expect: still only this room's connection, to be redialled.
                log.error("relay %s: room of %r failed", self.url, label, exc_info=exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # backoff, not a sync
            delay = min(delay * 2, BACKOFF_CAP)

    async def _connect(self, label: str, url: str) -> None:
        assert self._session is not None
        api = self.api
        this = asyncio.current_task()
        assert this is not None
        async with asyncio.timeout(_DIAL_WITHIN):
            ws = await self._session.ws_connect(
                url,
                max_msg_size=api._max_frame,
                heartbeat=15.0,  # (no receive timeout: an idle room is not a dead one)
                timeout=aiohttp.ClientWSTimeout(ws_close=_DIAL_WITHIN),
            )

        def abort() -> None:
            this.cancel()

        async with ws:
            client = YjsClient(ws, label, abort)
            client.start()
            sinks = None
            renew = None
            try:
                if label == _DIRECTORY:
                    # A fresh awareness id per connection: a relay that saw an id before
                    # takes it as "updated", not as this connection's, and would not
                    # remove it when this connection ends.
                    self._client_id = self.presence.own_client = secrets.randbits(53)
                    self._directory_ws = client
                    client.send(sync_message(STEP1, self._directory.get_state()))
                    renew = asyncio.create_task(self._renew(client))
                else:
                    sinks = api._yjs_rooms.setdefault(label, set())
                    sinks.add(client)
                    doc = api._docs.get(label)
                    sv = _EMPTY_SV if doc is None else doc.state_vector()
                    client.send(sync_message(STEP1, sv))
                self.connected.add(label)
                async for msg in ws:
                    if msg.type is not aiohttp.WSMsgType.BINARY:
                        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                            break
                        continue
                    if label == _DIRECTORY:
                        self._on_directory(client, msg.data)
                    else:
                        await handle_message(api, client, msg.data, None)
                    if client.writer_failed:
                        break
            finally:
                self.connected.discard(label)
                if renew is not None:
                    renew.cancel()
                    await asyncio.gather(renew, return_exceptions=True)
                if label == _DIRECTORY:
                    self._directory_ws = None
                    if self.presence.clear():  # not known any more, not gone either
                        api._remap()
                elif sinks is not None:
                    sinks.discard(client)
                    if not sinks and api._yjs_rooms.get(label) is sinks:
                        del api._yjs_rooms[label]
                await client.stop()

    def announce(self) -> None:
        """Send this node's sessions to the directory room (they changed)."""
        if self._directory_ws is not None:
            self._send_state(self._directory_ws)

    def _send_state(self, client: YjsClient) -> None:
        self._clock += 1
        api = self.api
        state = node_state(api.node_id, api._sessions_wire())
        client.send(bytes((MSG_AWARENESS,)) + encode_state(self._client_id, self._clock, state))

    async def _renew(self, client: YjsClient) -> None:
        """Keep this node's state fresh (Yjs clients and relays drop one after 30 s) and
        drop others' that were not."""
        loop = asyncio.get_running_loop()
        while True:
            self._send_state(client)
            await asyncio.sleep(RENEW_EVERY)  # a period, not a synchronisation
            if self.presence.expire(loop.time()):
                self.api._remap()

    def _on_directory(self, client: YjsClient, data: bytes) -> None:
        r = ByteReader(data)
        try:
            kind = r.varuint()
            if kind == MSG_AWARENESS:
                if self.presence.apply(data[r.pos :], asyncio.get_running_loop().time()):
                    self.api._remap()
                return
            if kind != MSG_SYNC:
                return  # the rest: not used here
            step = r.varuint()
            payload = r.raw(r.varuint())
        except UpdateDecodeError as exc:
            raise ProtocolError(f"malformed directory message: {exc}") from exc
        if step == STEP1:
            try:
                client.send(sync_message(STEP2, self._directory.get_update(payload)))
            except Exception as exc:  # pycrdt refuses a malformed state vector
                raise ProtocolError(f"invalid directory state vector: {exc}") from exc
        elif step in (STEP2, UPDATE):
            try:
                self._directory.apply_update(payload)
            except Exception as exc:
                raise ProtocolError(f"invalid directory update: {exc}") from exc
            self._join_listed()

    def _join_listed(self) -> None:
        """Join every valid namespace the directory lists that this node shares."""
        try:
            names = list(self._names.keys())
        except Exception:  # a hostile relay's document of another shape
            log.warning("relay %s: the directory is not a map of names", self.url)
            return
        for name in names:
            try:
                ns = check_namespace(name)
            except (InvalidNamespace, InvalidArgument):
                continue
            self.add_namespace(ns)
