"""write_all: the log append that keeps the GIL."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path

import pytest

from subcog_crdt._storage import gilwrite


def test_holds_the_gil_on_linux() -> None:
    if sys.platform.startswith("linux"):
        assert gilwrite.HOLDS_GIL
        # A PyDLL function (keeps the GIL), not a CDLL one (releases it).
        assert gilwrite._WRITE is not None
        assert gilwrite._WRITE._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]


def test_writes_every_byte_at_the_end_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        gilwrite.write_all(fd, b"first|\x00nul|")
        gilwrite.write_all(fd, bytes(range(256)) * 200)  # several pages, keeping the GIL
        over = bytes(range(256)) * (gilwrite.KEEP_GIL_UP_TO // 256 + 1)
        gilwrite.write_all(fd, over)  # over KEEP_GIL_UP_TO: os.write
        gilwrite.write_all(fd, b"")
    finally:
        os.close(fd)
    assert path.read_bytes() == (b"first|\x00nul|" + bytes(range(256)) * 200 + over)


def test_an_error_is_an_oserror_with_its_errno(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="Bad file descriptor") as info:
            gilwrite.write_all(fd, b"x")
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_short_writes_and_eintr_are_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short writes and EINTR cannot be provoked on demand here, so a stand-in for libc
    write (real writes, at most 7 bytes each, every third call interrupted) drives the
    retry loop."""
    calls = 0

    def choppy(fd: int, data: bytes, n: int) -> int:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            ctypes.set_errno(errno.EINTR)
            return -1
        return os.write(fd, data[: min(n, 7)])

    monkeypatch.setattr(gilwrite, "_WRITE", choppy)
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        gilwrite.write_all(fd, b"0123456789" * 10)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123456789" * 10
    assert calls > 15


def test_a_write_that_writes_nothing_is_an_error_not_a_spin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in for libc write returning 0 (never seen for a regular file)."""
    monkeypatch.setattr(gilwrite, "_WRITE", lambda fd, data, n: 0)
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="wrote nothing"):
            gilwrite.write_all(fd, b"x")
    finally:
        os.close(fd)
