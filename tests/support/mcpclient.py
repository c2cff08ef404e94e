"""The official MCP client on a ``subcog-crdt mcp`` server process, for tests: start it,
call a tool and get its structured result, or the text of its tool error."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client


@contextlib.asynccontextmanager
async def mcp_server(
    args: Sequence[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> AsyncIterator[ClientSession]:
    """A client session with a fresh ``python -m subcog_crdt mcp *args`` (its stderr
    appended to ``log``); the server ends when the session does."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "subcog_crdt", "mcp", *args],
        env=env,
        cwd=cwd,
    )
    with open(log, "a") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session


async def call(client: ClientSession, tool: str, **arguments: Any) -> Any:
    """A tool's structured result; fails the test on a tool error."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} failed: {result.content}"
    return result.structured_content


async def call_error(client: ClientSession, tool: str, **arguments: Any) -> str:
    """The text of a tool error (fails the test if the call succeeded)."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, f"{tool} succeeded: {result.structured_content}"
    return " ".join(getattr(c, "text", "") for c in result.content)
