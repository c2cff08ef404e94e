"""Reading raw WebSocket frames off a stream (for tests that speak to a node by hand)."""

from __future__ import annotations

import asyncio


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, int, bool, bytes]:
    """One WebSocket frame: (raw bytes, opcode, fin, unmasked payload)."""
    head = await reader.readexactly(2)
    size = head[1] & 0x7F
    ext = b""
    if size == 126:
        ext = await reader.readexactly(2)
        size = int.from_bytes(ext)
    elif size == 127:
        ext = await reader.readexactly(8)
        size = int.from_bytes(ext)
    mask = await reader.readexactly(4) if head[1] & 0x80 else b""
    payload = await reader.readexactly(size)
    raw = head + ext + mask + payload
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return raw, head[0] & 0x0F, bool(head[0] & 0x80), payload
