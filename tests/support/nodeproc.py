"""Drive ``noderun.py`` processes from tests: start, send commands, wait for output lines
with a deadline (a reader thread collects lines; nothing sleeps as synchronisation)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

NODERUN = Path(__file__).resolve().parent / "noderun.py"


class NodeProc:
    """One node process. ``lines`` holds every JSON line it printed so far."""

    def __init__(self, proc: subprocess.Popen[str], name: str = "node") -> None:
        self.proc = proc
        self.name = name
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready = self.expect(lambda m: "ready" in m, 30, "ready")
        self.url: str = self.ready["ready"]
        self.node_id: str = self.ready["node_id"]

    @staticmethod
    def argv(*args: str) -> list[str]:
        return [sys.executable, str(NODERUN), *args]

    @classmethod
    def start(
        cls,
        *args: str,
        name: str = "node",
        env: dict[str, str] | None = None,
        stderr: Any = None,
    ) -> Self:
        """Start a node; ``stderr``: where its log goes (inherited by default)."""
        proc = subprocess.Popen(
            cls.argv(*args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        return cls(proc, name)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            if not raw.endswith("\n"):
                continue  # cut short by a kill: the node never finished printing it
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            with self._cond:
                self.lines.append(msg)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def expect(
        self,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float = 15.0,
        what: str = "",
        start: int = 0,
    ) -> dict[str, Any]:
        """The first line from index ``start`` on (printed so far or later) matching
        ``pred``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.lines[start:]:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{self.name}: no line for {what or pred} within {timeout}s; "
                        f"last lines: {self.lines[-5:]}"
                    )
                self._cond.wait(min(left, 0.5))

    def wait_until(self, pred: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
        """Re-evaluate ``pred`` (usually a ``state()`` round trip, which paces the loop)
        until it holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {what or pred} not true within {timeout}s")
            with self._cond:
                self._cond.wait(0.02)  # a short pause between polls; pred decides

    def count(self, pred: Callable[[dict[str, Any]], bool]) -> int:
        """How many lines printed so far match ``pred``."""
        with self._cond:
            return sum(1 for m in self.lines if pred(m))

    def drain(self, timeout: float = 10.0) -> None:
        """After the process ended: wait until every line it printed has been read (a line
        printed just before a kill may still be in the pipe)."""
        self.proc.wait(timeout)
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise AssertionError(f"{self.name}: its stdout did not end within {timeout}s")

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def ask(self, reply: str, timeout: float = 15.0, **cmd: Any) -> dict[str, Any]:
        """Send ``cmd`` and return the first later line that has the key ``reply``."""
        with self._cond:
            n = len(self.lines)
        self.send(**cmd)
        return self.expect(lambda m: reply in m, timeout, f"{reply} reply", start=n)

    def state(self, ns: str, timeout: float = 15.0) -> dict[str, Any]:
        with self._cond:
            n = len(self.lines)
        self.send(cmd="state", ns=ns)
        return self.expect(lambda m: "state" in m, timeout, "state reply", start=n)

    def kill(self) -> None:
        """SIGKILL the whole process group."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def stop(self) -> None:
        """Ask it to quit; kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def kill_groups(popens: Sequence[subprocess.Popen[str]]) -> None:
    """SIGKILL the process group of each (started with ``start_new_session``; a no-op
    for those that ended), reap it and close its stdout."""
    for proc in popens:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def stop_all(nodes: Sequence[NodeProc]) -> None:
    for n in nodes:
        try:
            n.stop()
        except Exception:
            pass
