"""The MCP server: an agent reaches its node through the official MCP SDK, over stdio.

Each agent process (an editor window's assistant, a CLI agent) starts one server
(``subcog-crdt mcp``); the server is a node like any other, so the sessions of every
agent on the machine (and, with a secret, on the LAN) share one live memory. Needs the
optional ``mcp`` package: ``pip install 'subcog-crdt[mcp]'``.

Tools (DESIGN.md, "Integration surfaces"): ``subcog_session_register``,
``subcog_session_sync``, ``subcog_capture``, ``subcog_recall``, ``subcog_update``,
``subcog_delete``, ``subcog_get``, ``subcog_history``, ``subcog_sessions``,
``subcog_peers``. Results are the JSON views of ``subcog_crdt._plain``; a library error
is a tool error naming its class (``ConflictError: ...``), and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from subcog_crdt._api import ConversationsApi
from subcog_crdt._core.events import Event
from subcog_crdt._errors import SubcogError
from subcog_crdt._plain import (
    batch_plain,
    memory_plain,
    peer_plain,
    session_plain,
    write_plain,
)
from subcog_crdt._session import Session

__all__ = ["MAX_WAIT", "build_server", "serve_stdio"]

MAX_WAIT = 60.0
"""The longest ``subcog_session_sync`` waits for a first event (``wait=``), in seconds:
an MCP call that blocks longer looks hung to most clients."""

_INSTRUCTIONS = """\
Shared memory for parallel agent sessions. Memories (decisions, patterns, facts) are
captured into namespaces and reach every other session live, on this machine and the LAN.
Start with subcog_session_register (a stable session id, the namespaces to follow), then
subcog_session_sync(since="last") to read what others captured since you last looked
(exactly once; pass wait=seconds to block for the next one). Before capturing, recall:
capturing the same content again adds you to its captured_by instead of duplicating it.
Pass expected_version to update/delete to refuse a stale write."""


@contextlib.contextmanager
def _tool_errors() -> Iterator[None]:
    """A library error becomes a tool error the agent reads (the SDK would hide the
    text of any other exception)."""
    try:
        yield
    except SubcogError as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}") from exc


def _since(value: str | int) -> str | int | datetime:
    if isinstance(value, int) or value == "last":
        return value
    try:
        if value.isascii() and value.isdigit():
            return int(value)  # (ValueError past Python's digit limit)
        at = datetime.fromisoformat(value)
    except ValueError:
        raise ToolError(
            "since must be 'last', a cursor (an integer) or an ISO 8601 datetime, "
            f"not {value[:40]!r}"
        ) from None
    # Without an offset: UTC, as every time these tools return.
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class _Tools:
    """The tools' state: the node, and which session a call without ``session_id`` means
    (the one this client registered last, else the server's ``--session``)."""

    def __init__(self, api: ConversationsApi, default_session: str | None) -> None:
        self.api = api
        self.default_session = default_session

    def session(self, session_id: str | None) -> Session:
        api = self.api
        if session_id is None:
            session_id = self.default_session
        if session_id is None:
            local = api.sessions.local_sessions()
            if len(local) != 1:
                raise ToolError(
                    "pass session_id: "
                    + (
                        "no session is registered yet (call subcog_session_register first)"
                        if not local
                        else f"{len(local)} sessions are registered here"
                    )
                )
            return local[0]
        try:
            return api.sessions.local(session_id)
        except SubcogError:
            raise ToolError(
                f"session {session_id!r} is not registered here: call subcog_session_register"
            ) from None


def build_server(api: ConversationsApi, *, default_session: str | None = None) -> MCPServer:
    """The MCP server for ``api`` (an open node). A tool called without ``session_id``
    acts as the session the client registered last, else ``default_session``, else the
    only session registered here."""
    tools = _Tools(api, default_session)
    server: MCPServer = MCPServer(
        name="subcog-crdt", instructions=_INSTRUCTIONS, log_level="WARNING"
    )

    @server.tool()
    async def subcog_session_register(
        session_id: str, subscribe: list[str] | None = None
    ) -> dict[str, Any]:
        """Register (or resume) an agent session on this node. ``subscribe``: the
        namespaces whose events it follows (omitted: keep what it had, so a session that
        registers again after a restart resumes where it left off)."""
        with _tool_errors():
            s = await api.register_session(session_id, subscribe=subscribe)
        tools.default_session = s.id  # what later calls without session_id act as
        return session_plain(s.info())

    @server.tool()
    async def subcog_session_sync(
        session_id: str | None = None,
        since: str | int = "last",
        include_own: bool = False,
        limit: int = 100,
        wait: float = 0.0,
    ) -> dict[str, Any]:
        """Events of the session's namespaces: since "last" (what it has not seen yet,
        exactly once, also across restarts of a durable node), a cursor, or an ISO 8601
        datetime. ``wait``: seconds (at most 60) to wait for a first event when there is
        none yet. ``complete`` false: events older than the journal's retention are gone,
        read current memories instead; ``more`` true: call again for the rest."""
        s = tools.session(session_id)
        start = _since(since)
        if not 0 <= wait <= MAX_WAIT:
            raise ToolError(f"wait must be between 0 and {MAX_WAIT:g} seconds, not {wait!r}")
        with _tool_errors():
            stream = s.events(include_own=include_own) if wait > 0 else None
            try:
                batch = await s.sync(since=start, include_own=include_own, limit=limit)
                if stream is not None and not batch.events and batch.complete:
                    # Subscribed before the sync: an event after it is in the stream.
                    got: Event | None = None
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            got = await anext_event(stream)
                    if got is not None:
                        batch = await s.sync(since=start, include_own=include_own, limit=limit)
            finally:
                if stream is not None:
                    stream.close()
        return batch_plain(batch)

    @server.tool()
    async def subcog_capture(
        namespace: str,
        content: str,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        domain: str | None = None,
        status: str | None = None,
        source: str | None = None,
        expires_at: str | None = None,
        session_id: str | None = None,
    ) -> dict[str, Any]:
        """Capture a memory. The same content (ignoring whitespace and case) already in
        the namespace yields that memory, with this session added to ``captured_by``."""
        s = tools.session(session_id)
        with _tool_errors():
            m = await s.capture(
                namespace,
                content,
                tags=tags or (),
                metadata=metadata,
                domain=domain,
                status=status,
                source=source,
                expires_at=expires_at,
            )
        return memory_plain(m)

    @server.tool()
    async def subcog_recall(
        query: str,
        namespace: str | None = None,
        namespaces: list[str] | None = None,
        tags: list[str] | None = None,
        limit: int = 10,
        session_id: str | None = None,
    ) -> dict[str, Any]:
        """Ranked full-text search over content and tags, best first: in ``namespace``,
        in ``namespaces``, or (neither given) in the session's subscriptions; with
        ``tags``, only memories holding every one of them."""
        with _tool_errors():
            if namespace is None and namespaces is None:
                hits = tools.session(session_id).recall(query, tags=tags or (), limit=limit)
            else:
                hits = api.recall(
                    query, namespace=namespace, namespaces=namespaces, tags=tags or (), limit=limit
                )
        return {"memories": [memory_plain(m) for m in hits]}

    @server.tool()
    async def subcog_update(
        memory_id: str,
        content: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        domain: str | None = None,
        status: str | None = None,
        source: str | None = None,
        expires_at: str | None = None,
        clear: list[Literal["domain", "status", "source", "expires_at"]] | None = None,
        expected_version: int | None = None,
        session_id: str | None = None,
    ) -> dict[str, Any]:
        """Change fields of a memory (only those given; null means "not given"), and
        remove the optional ones named in ``clear`` (``expires_at``: it no longer
        expires). With ``expected_version``, a memory changed since that version is
        refused (ConflictError) and left as it is."""
        s = tools.session(session_id)
        given = {
            "content": content,
            "tags": tags,
            "metadata": metadata,
            "domain": domain,
            "status": status,
            "source": source,
            "expires_at": expires_at,
        }
        fields: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        for name in clear or ():
            if fields.get(name) is not None:
                raise ToolError(f"{name} is both given and cleared")
            fields[name] = None
        if not fields:
            raise ToolError("nothing to update: give at least one field, or clear one")
        with _tool_errors():
            m = await s.update(memory_id, expected_version=expected_version, **fields)
        return memory_plain(m)

    @server.tool()
    async def subcog_delete(
        memory_id: str, expected_version: int | None = None, session_id: str | None = None
    ) -> dict[str, Any]:
        """Delete a memory (a tombstone: capturing its content again revives it)."""
        s = tools.session(session_id)
        with _tool_errors():
            m = await s.delete(memory_id, expected_version=expected_version)
        return memory_plain(m)

    @server.tool()
    async def subcog_get(memory_id: str) -> dict[str, Any]:
        """One memory as it is now (a deleted one has ``deleted`` true)."""
        with _tool_errors():
            return memory_plain(api.get(memory_id))

    @server.tool()
    async def subcog_history(memory_id: str) -> dict[str, Any]:
        """Every write of a memory in clock order, the losers of conflicts included."""
        with _tool_errors():
            return {"writes": [write_plain(w) for w in api.history(memory_id)]}

    @server.tool()
    async def subcog_sessions() -> dict[str, Any]:
        """The sessions of this node and of every node it reaches."""
        with _tool_errors():
            return {"sessions": [session_plain(i) for i in api.sessions.list()]}

    @server.tool()
    async def subcog_peers() -> dict[str, Any]:
        """The nodes this node is connected to."""
        with _tool_errors():
            return {"node_id": api.node_id, "peers": [peer_plain(p) for p in api.peers()]}

    return server


async def anext_event(stream: Any) -> Event | None:
    """The stream's next item that is an event (a ``Lagged`` marker counts: there is
    something to sync), or None if the stream ended."""
    async for item in stream:
        return item  # type: ignore[no-any-return]
    return None


async def serve_stdio(
    api: ConversationsApi,
    *,
    session_id: str | None = None,
    subscribe: list[str] | None = None,
) -> None:
    """Serve MCP over stdin/stdout until the client closes stdin. With ``session_id``,
    that session is registered first (with ``subscribe``) and is what tools called
    without ``session_id`` act as."""
    if session_id is not None:
        await api.register_session(session_id, subscribe=subscribe)
    await build_server(api, default_session=session_id).run_stdio_async()
