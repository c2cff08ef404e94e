"""The ``relay`` fixture: the standard Node relay ``@y/websocket-server`` 0.1.1 on a free
loopback port, in its own process group (killed with it at the end, even on failure)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "benchmarks" / "node" / "node_modules" / "@y" / "websocket-server" / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NodeRelay:
    def __init__(self, node_js: str, port: int) -> None:
        self.port = port
        self.url = f"ws://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [node_js, str(SERVER / "server.js")],
            env={**os.environ, "HOST": "127.0.0.1", "PORT": str(port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the server's first line; bounded by pytest-timeout
        assert "running at" in line, line

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def relay(node_js: str) -> Iterator[NodeRelay]:
    r = NodeRelay(node_js, _free_port())
    try:
        yield r
    finally:
        r.stop()
