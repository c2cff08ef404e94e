"""The sync core stays free of I/O: importing it loads no network, mDNS or SQLite code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import subcog_crdt


def test_core_imports_no_io_modules():
    code = (
        "import sys, subcog_crdt._core.document, subcog_crdt._core.events, "
        "subcog_crdt._core.memory, subcog_crdt._core.recall;"
        "bad = [m for m in ('aiohttp', 'zeroconf', 'sqlite3') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_core_modules_import_nothing_that_does_io():
    core = Path(subcog_crdt.__file__).parent / "_core"
    banned = {"asyncio", "socket", "aiohttp", "zeroconf", "sqlite3", "subprocess", "threading"}
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            assert not banned.intersection(names), f"{path.name} imports {names}"


def test_exported_members_are_the_public_api():
    assert set(subcog_crdt.__all__) == {
        "AuthError",
        "Captured",
        "ClosedError",
        "Conflict",
        "ConflictError",
        "ConversationsApi",
        "CorruptStorage",
        "Deleted",
        "Event",
        "FrameTooLarge",
        "InvalidArgument",
        "InvalidNamespace",
        "Lagged",
        "Listener",
        "Memory",
        "NotFound",
        "PeerInfo",
        "PeerUnreachable",
        "ProtocolError",
        "Retention",
        "Session",
        "SessionInfo",
        "StorageError",
        "StorageLocked",
        "SubcogError",
        "Subscription",
        "SyncBatch",
        "Updated",
        "Write",
        "__version__",
    }
    for name in subcog_crdt.__all__:
        assert hasattr(subcog_crdt, name)
    for name in ("ConflictError", "AuthError", "ProtocolError", "InvalidNamespace", "NotFound"):
        assert issubclass(getattr(subcog_crdt, name), subcog_crdt.SubcogError)
