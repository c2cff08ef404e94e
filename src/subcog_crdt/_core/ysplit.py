"""Cut a large Yjs v1 update into smaller updates that, applied in order, hold the same.

Why: a catch-up of a large namespace arrives as one update (36 MB for 100k memories), and
deriving its memories and events takes seconds of Python. Applied whole, it would stall the
event loop that long (heartbeats, other peers, local writes). Cut at struct boundaries, each
piece is an ordinary update that is applied, journalled and persisted on its own, with the
loop running in between; a crash between pieces leaves a consistent prefix that the peer
completes on the next catch-up.

A piece holds a run of consecutive structs of one client (Yjs integrates a client's
structs in clock order, and holds back what depends on a piece not yet applied until it
arrives, as for any update). The update's delete set travels with its last piece. The scan
only finds boundaries (strings are skipped, not decoded), and it runs a slice at a time, so
even the scan of a huge update never blocks for long. An update that is not well formed
is refused by the scan before any piece exists.
"""

from __future__ import annotations

from collections.abc import Iterator

from subcog_crdt._core.ydecode import (
    UpdateDecodeError,
    _Reader,
    skip_bytes,
    skip_content,
    varuint_bytes,
)

__all__ = ["UpdateScan"]


def _skip_any(r: _Reader, depth: int = 0) -> None:
    if depth > 64:
        raise UpdateDecodeError("value nested too deeply")
    t = r.u8()
    if t == 119:
        skip_bytes(r)
    elif t == 118:
        for _ in range(r.varuint()):
            skip_bytes(r)
            _skip_any(r, depth + 1)
    elif t == 117:
        for _ in range(r.varuint()):
            _skip_any(r, depth + 1)
    elif t == 125:
        r.varint()
    elif t in (123, 122):
        r.raw(8)
    elif t == 124:
        r.raw(4)
    elif t == 116:
        skip_bytes(r)  # a byte buffer: the same layout
    elif t not in (120, 121, 126, 127):
        raise UpdateDecodeError(f"unknown value type {t}")


class UpdateScan:
    """Scan an update a slice at a time (``step``), then cut it (``pieces``).

    ``piece_structs`` and ``piece_bytes`` bound each piece (a single struct larger than
    ``piece_bytes`` is a piece of its own)."""

    def __init__(self, update: bytes, *, piece_structs: int, piece_bytes: int) -> None:
        if piece_structs < 1 or piece_bytes < 1:
            raise ValueError("pieces must hold at least one struct")
        self._r = _Reader(update)
        self._piece_structs = piece_structs
        self._piece_bytes = piece_bytes
        self._clients_left = -1  # not read yet
        self._structs_left = 0
        self._client = 0
        self._clock = 0
        # The open cut: (first struct's position, its clock, structs in it so far).
        self._cut_pos = 0
        self._cut_clock = 0
        self._cut_n = 0
        self._cuts: list[tuple[int, int, int, int, int]] = []
        """(client, first clock, structs, start, end) per piece, in update order."""
        self.blocks: list[tuple[int, int, int]] = []
        """``(client, first clock, clock after the last struct)`` per client."""
        self._block_start = 0
        self._delete_set = b""
        self._items_only = True
        self.done = False

    def step(self, budget: int) -> bool:
        """Scan up to ``budget`` more structs; True once the whole update is scanned.
        Raises ``UpdateDecodeError`` if it is not a well-formed update."""
        r = self._r
        if self.done:
            return True
        if self._clients_left < 0:
            self._clients_left = r.varuint()
        while budget > 0:
            if self._structs_left == 0:
                if self._cut_n:
                    self._cut_at(r.pos, self._clock)
                if self._clients_left == 0:
                    self._finish()
                    return True
                self._clients_left -= 1
                budget -= 1  # a header counts: an update of empty blocks is paced too
                self._structs_left = r.varuint()
                self._client = r.varuint()
                self._clock = self._block_start = r.varuint()
                self._cut_pos, self._cut_clock, self._cut_n = r.pos, self._clock, 0
                if self._structs_left == 0:
                    self.blocks.append((self._client, self._clock, self._clock))
                continue
            start = r.pos
            clock_before = self._clock
            self._clock += self._skip_struct(r)
            self._structs_left -= 1
            budget -= 1
            if self._cut_n and r.pos - self._cut_pos > self._piece_bytes:
                self._cut_at(start, clock_before)  # this struct would make it too large
            self._cut_n += 1
            if self._cut_n >= self._piece_structs:
                self._cut_at(r.pos, self._clock)
            if self._structs_left == 0:
                self.blocks.append((self._client, self._block_start, self._clock))
        return False

    def _skip_struct(self, r: _Reader) -> int:
        info = r.u8()
        ref = info & 0x1F
        if ref in (0, 10):  # GC or skip: such an update is left whole (see pieces)
            self._items_only = False
            return r.varuint()
        has_origin = info & 0x80
        has_right = info & 0x40
        if has_origin:
            r.varuint()
            r.varuint()
        if has_right:
            r.varuint()
            r.varuint()
        if not has_origin and not has_right:
            if r.varuint() == 1:
                skip_bytes(r)
            else:
                r.varuint()
                r.varuint()
            if info & 0x20:
                skip_bytes(r)
        return skip_content(r, ref, skip_bytes, _skip_any)  # strings skipped, not decoded

    def _cut_at(self, pos: int, clock: int) -> None:
        """End the open piece at ``pos``; the next one starts there, at ``clock``."""
        self._cuts.append((self._client, self._cut_clock, self._cut_n, self._cut_pos, pos))
        self._cut_pos, self._cut_clock, self._cut_n = pos, clock, 0

    def _finish(self) -> None:
        r = self._r
        ds_start = r.pos
        for _ in range(r.varuint()):
            r.varuint()
            for _ in range(r.varuint()):
                r.varuint()
                r.varuint()
        # (Bytes after the delete set are ignored, as pycrdt ignores them.)
        self._delete_set = bytes(r.buf[ds_start : r.pos])
        self.done = True

    def pieces(self) -> Iterator[bytes]:
        """The update cut into pieces (after the scan is done), made one at a time (the
        update is not held twice). An update that fits one piece, or holds
        garbage-collected or skipped ranges (never in what a node sends, and not worth
        the risk of cutting), is one piece: itself."""
        if not self.done:
            raise RuntimeError("scan the update first")
        if len(self._cuts) < 2 or not self._items_only:
            return iter([bytes(self._r.buf)])
        return self._cut()

    def _cut(self) -> Iterator[bytes]:
        buf = self._r.buf
        last = len(self._cuts) - 1
        for i, (client, clock, n, start, end) in enumerate(self._cuts):
            head = b"\x01" + varuint_bytes(n) + varuint_bytes(client) + varuint_bytes(clock)
            tail = self._delete_set if i == last else b"\x00"
            yield head + buf[start:end] + tail
