"""Forbid python-zeroconf in the host's network namespace during tests.

zeroconf's default (``InterfaceChoice.All``) joins 224.0.0.251 and sends on every
interface of the namespace it runs in, ``eth0`` included. Tests must run it inside a
:class:`~support.netns.NetnsLan` host instead (a subprocess via ``Host.popen``).

:func:`install_zeroconf_guard` patches ``zeroconf.Zeroconf.__init__`` (``AsyncZeroconf``
builds a ``Zeroconf``, so it is covered too). Construction is allowed only when the calling
thread's network namespace is provably not the host's:

* ``/proc/1/ns/net`` is readable and differs from ``/proc/thread-self/ns/net``; or
* the current namespace is one a ``NetnsLan`` created (its inode matches a
  ``/run/netns/sc????br|hN`` entry). This covers machines where ``/proc/1`` is unreadable.

``SUBCOG_TEST_NETNS=1`` (set by ``Host.popen`` for its children) is never enough by itself:
a process that carries it but sits in the host namespace is refused as well.

Usage in a conftest (the fixture is autouse wherever it is imported)::

    from support.zeroconf_guard import zeroconf_guard  # noqa: F401
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .netns import NETNS_ENV, NETNS_NAME_RE

__all__ = [
    "FORBIDDEN_MESSAGE",
    "install_zeroconf_guard",
    "zeroconf_allowed",
    "zeroconf_guard",
]

FORBIDDEN_MESSAGE = "zeroconf in the host network namespace is forbidden in tests"
_RUN_NETNS = "/run/netns"


def _current_netns() -> str:
    # Per thread: setns() moves one thread, and zeroconf opens its sockets in the caller.
    try:
        return os.readlink("/proc/thread-self/ns/net")
    except OSError:
        return os.readlink("/proc/self/ns/net")


def _host_netns() -> str | None:
    try:
        return os.readlink("/proc/1/ns/net")
    except OSError:  # e.g. EACCES for init in some VMs/containers
        return None


def _lan_netns_inodes() -> dict[int, str]:
    """Inode -> name of every namespace under /run/netns named like a NetnsLan's."""
    found: dict[int, str] = {}
    try:
        names = os.listdir(_RUN_NETNS)
    except OSError:
        return found
    for name in names:
        if NETNS_NAME_RE.match(name):
            try:
                found[os.stat(os.path.join(_RUN_NETNS, name)).st_ino] = name
            except OSError:
                continue
    return found


def zeroconf_allowed() -> tuple[bool, str]:
    """Whether zeroconf may run in the calling thread, and why (or why not)."""
    current = _current_netns()
    host = _host_netns()
    if host is not None and current != host:
        return True, f"{current} differs from the host's {host}"
    inode = int(current.removeprefix("net:[").removesuffix("]") or 0)
    name = _lan_netns_inodes().get(inode)
    if name is not None:
        return True, f"{current} is test namespace {name}"
    where = f"current {current}, host {host or 'unreadable (/proc/1)'}"
    if os.environ.get(NETNS_ENV) == "1":
        where += f"; {NETNS_ENV}=1 is set, yet this is not a test namespace"
    return False, where


class _GuardState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.original: Callable[..., None] | None = None


_STATE = _GuardState()


def _guarded_init(self: Any, *args: Any, **kwargs: Any) -> None:
    allowed, why = zeroconf_allowed()
    if not allowed:
        raise RuntimeError(
            f"{FORBIDDEN_MESSAGE} ({why}); run it in a NetnsLan host "
            "(tests/support/netns.py: Host.popen)"
        )
    original = _STATE.original
    if original is None:  # uninstalled concurrently: fall back to the real thing
        import zeroconf

        original = zeroconf.Zeroconf.__init__
    original(self, *args, **kwargs)


def install_zeroconf_guard() -> Callable[[], None]:
    """Patch ``zeroconf.Zeroconf.__init__``; return a function that undoes it.

    Nested installs are counted; the patch is removed when the last one is undone.
    """
    import zeroconf

    with _STATE.lock:
        if _STATE.depth == 0:
            _STATE.original = zeroconf.Zeroconf.__init__
            wrapper = functools.wraps(_STATE.original)(_guarded_init)
            zeroconf.Zeroconf.__init__ = wrapper  # type: ignore[method-assign]
        _STATE.depth += 1

    done = False

    def uninstall() -> None:
        nonlocal done
        with _STATE.lock:
            if done:
                return
            done = True
            _STATE.depth -= 1
            if _STATE.depth == 0 and _STATE.original is not None:
                zeroconf.Zeroconf.__init__ = _STATE.original  # type: ignore[method-assign]
                _STATE.original = None

    return uninstall


@pytest.fixture(autouse=True)
def zeroconf_guard() -> Iterator[None]:
    """Autouse wherever imported: constructing a Zeroconf in the host namespace raises."""
    uninstall = install_zeroconf_guard()
    try:
        yield
    finally:
        uninstall()
