"""`make demo` runs the in-process demo; it must converge and show both capturers."""

from __future__ import annotations

import subprocess
import sys


def test_demo_converges():
    out = subprocess.run(
        [sys.executable, "-m", "subcog_crdt.demo"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "converged: yes" in out.stdout
    # Both capturers, in the order the two concurrent captures were stamped.
    assert any(
        f"captured_by={pair}" in out.stdout
        for pair in (["claude-code-1", "cursor-2"], ["cursor-2", "claude-code-1"])
    ), out.stdout
    assert out.stdout.count("updated") == 2  # the tag update reached both other sessions
