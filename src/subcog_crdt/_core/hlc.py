"""Hybrid logical clock.

A stamp is a fixed-width string ``WWWWWWWWWWWWWCCCCCC``: 13 decimal digits of wall-clock
milliseconds and 6 hex digits of a logical counter. Fixed width makes string order equal
time order, which JavaScript clients can compare without parsing. The clock never goes
backwards, and after ``Hlc.observe`` it is ahead of everything seen, so a write made
after seeing another always sorts after it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache

__all__ = ["STAMP_LEN", "Hlc", "stamp_after", "stamp_datetime", "stamp_wall_ms", "valid_stamp"]

STAMP_LEN = 19
_COUNTER_MAX = 0xFFFFFF
MAX_DRIFT_MS = 3_600_000
"""How far ahead of local time an observed stamp may pull the clock (one hour)."""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Hlc:
    """A hybrid logical clock; ``now()`` returns strictly increasing stamps."""

    __slots__ = ("_clock", "_counter", "_prefix", "_wall")

    def __init__(self, clock: Callable[[], int] = _wall_ms) -> None:
        self._clock = clock
        self._wall = 0
        self._counter = 0
        self._prefix = "0" * 13
        """``_wall`` formatted (it changes at most once per millisecond; stamps are made
        for every write, so it is formatted once, not per stamp)."""

    def _set(self, wall: int, counter: int) -> None:
        if wall != self._wall:
            self._wall = wall
            self._prefix = f"{wall:013d}"
        self._counter = counter

    def now(self) -> str:
        wall = self._clock()
        if wall > self._wall:
            self._set(wall, 0)
            return self._prefix + "000000"
        counter = self._counter + 1
        if counter > _COUNTER_MAX:
            self._set(self._wall + 1, 0)
            return self._prefix + "000000"
        self._counter = counter
        return self._prefix + f"{counter:06x}"

    def follows(self, stamp: str) -> bool:
        """Whether ``observe`` would take ``stamp`` into account (valid, not too far
        ahead); it moves the clock only if the stamp is also newer."""
        return valid_stamp(stamp) and int(stamp[:13]) <= self._clock() + MAX_DRIFT_MS

    def observe(self, stamp: str) -> None:
        """Move ahead of a stamp seen from elsewhere (never backwards). A stamp more than
        ``MAX_DRIFT_MS`` ahead of our wall clock is not followed: one bad clock (or a
        hostile peer) must not drag every node's clock into the far future, where its
        stamps would stop fitting the fixed width."""
        if valid_stamp(stamp):
            self.observe_valid(stamp)

    def observe_valid(self, stamp: str) -> None:
        """``observe`` for a stamp already known to be valid (a decoded write's)."""
        wall = int(stamp[:13])
        if wall < self._wall or wall > self._clock() + MAX_DRIFT_MS:
            return  # from the past (the common case), or too far ahead
        counter = int(stamp[13:], 16)
        if (wall, counter) > (self._wall, self._counter):
            self._set(wall, counter)

    def last(self) -> str:
        return f"{self._prefix}{self._counter:06x}"


def stamp_after(stamp: str) -> str | None:
    """The smallest stamp after ``stamp`` (None past the last one). A write to a memory
    whose newest write is further ahead than the clock follows (``MAX_DRIFT_MS``)
    takes it, so a write made after seeing another still sorts after it, without
    dragging the node's clock forward."""
    wall = int(stamp[:13])
    counter = int(stamp[13:], 16) + 1
    if counter > _COUNTER_MAX:
        wall += 1
        counter = 0
    if wall > 9_999_999_999_999:
        return None
    return f"{wall:013d}{counter:06x}"


_STAMP = re.compile(r"[0-9]{13}[0-9a-f]{6}\Z")


def valid_stamp(stamp: object) -> bool:
    # ASCII digits only: str.isdigit() would also accept other scripts' digits, which
    # int() reads but which do not sort like ASCII ones.
    return isinstance(stamp, str) and _STAMP.match(stamp) is not None


def stamp_wall_ms(stamp: str) -> int:
    return int(stamp[:13])


@lru_cache(maxsize=4096)
def _ms_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


_last_datetime: tuple[str, datetime] = ("", datetime.min)


def stamp_datetime(stamp: str) -> datetime:
    """The wall-clock time of a stamp (to the millisecond)."""
    global _last_datetime
    # Consecutive writes mostly fall in the same millisecond: compare the digits first.
    head = stamp[:13]
    last = _last_datetime
    if last[0] == head:
        return last[1]
    dt = _ms_datetime(int(head))
    _last_datetime = (head, dt)
    return dt
