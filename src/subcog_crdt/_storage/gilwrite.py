"""Append bytes to a file descriptor without releasing the GIL.

Why: ``os.write`` releases the GIL around the syscall. The event loop appends one log
frame per commit, so whenever the storage thread is waiting for the GIL (it drains frames
into SQLite in the background) every commit hands the GIL over, and the loop then waits
for the thread's next release: about one context switch per commit. Holding the GIL
through the write made a durable capture ~1.3x faster here (docs/benchmarks.md). A
page-cache append of a few hundred bytes is as short as the Python code around it, so
keeping the GIL through it costs nothing; large writes still release it.

libc ``write`` is called through ``ctypes.PyDLL``, which does not release the GIL. Where
that is not available (no libc ``write`` symbol) this falls back to ``os.write``. Only for
regular files: a write that blocks until another thread of this process reads (a pipe)
would never finish.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from typing import Final

__all__ = ["HOLDS_GIL", "KEEP_GIL_UP_TO", "write_all"]

KEEP_GIL_UP_TO: Final = 1 << 20
"""Larger writes release the GIL (``os.write``): they take long enough for the storage
thread to get useful work done meanwhile. (At 64 KiB, a batch of 256 captures, ~110 KB
with its journal, handed the GIL over at every commit: ~10 % of a durable bulk load.)"""


def _libc_write() -> Callable[[int, bytes, int], int] | None:
    try:
        fn = ctypes.PyDLL(None, use_errno=True).write
    except (OSError, AttributeError, TypeError):  # no libc symbols in this process
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    fn.restype = ctypes.c_ssize_t
    return fn


_WRITE: Final = _libc_write()
HOLDS_GIL: Final = _WRITE is not None
"""Whether ``write_all`` keeps the GIL (False: it falls back to ``os.write``)."""


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (``bytes``) to the regular file ``fd``, retrying short writes
    and EINTR; up to ``KEEP_GIL_UP_TO`` bytes without releasing the GIL.

    Raises ``OSError`` like ``os.write``; on error some prefix of ``data`` may have been
    written."""
    write = _WRITE
    if write is None or len(data) > KEEP_GIL_UP_TO:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return
    n = write(fd, data, len(data))
    if n == len(data):
        return
    done = 0
    while True:
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                n = 0
            else:
                raise OSError(err, os.strerror(err))
        elif n == 0 and data:  # never for a regular file; do not spin holding the GIL
            raise OSError(errno.EIO, "write() wrote nothing")
        done += n
        if done >= len(data):
            return
        rest = data[done:]
        n = write(fd, rest, len(rest))
