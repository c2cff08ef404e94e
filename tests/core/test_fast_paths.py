"""Hot-path shortcuts must agree with the plain definitions they replace."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from subcog_crdt._core.events import Captured, new_captured
from subcog_crdt._core.schema import SCHEMA_VERSION, encode_write, normalise

# Text that hits both paths: ASCII with every kind of whitespace, and some non-ASCII.
_text = st.text(
    alphabet=st.sampled_from(list("aB z.\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x00É ß\u2003")),
    max_size=40,
)


@given(_text)
def test_normalise_is_whitespace_collapsed_and_casefolded(text: str) -> None:
    assert normalise(text) == " ".join(text.split()).casefold()


def test_normalise_fast_path_cases() -> None:
    assert normalise("We chose SQLite WAL") == "we chose sqlite wal"
    assert normalise(" We  chose\tSQLite\nWAL ") == "we chose sqlite wal"
    assert normalise("STRASSE") == normalise("Straße".upper()) == "strasse"
    assert normalise("") == ""


_changes = st.fixed_dictionaries(
    {"content": st.text(max_size=30)},
    optional={
        "tags": st.lists(st.text(max_size=5), max_size=3) | st.just([]),
        "metadata": st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5)),
        "status": st.none() | st.text(max_size=5),
    },
)


@given(
    st.sampled_from(["capture", "update", "delete"]),
    st.sampled_from(["", "1795649794389000196"]),
    _changes,
)
def test_encode_write_is_compact_json(op: str, base: str, changes: dict[str, Any]) -> None:
    expected: dict[str, Any] = {"v": SCHEMA_VERSION, "op": op, "set": changes}
    if base:
        expected["base"] = base
    assert encode_write(op, base, changes) == json.dumps(
        expected, ensure_ascii=False, separators=(",", ":")
    )


def test_new_captured_builds_the_same_frozen_event() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    fast = new_captured("ns", 7, at, "sess", "n1", "w", "m", None)  # type: ignore[arg-type]
    plain = Captured(
        namespace="ns",
        cursor=7,
        at=at,
        source_session="sess",
        node_id="n1",
        write_id="w",
        memory_id="m",
        memory=None,  # type: ignore[arg-type]
    )
    assert fast == plain
    assert repr(fast) == repr(plain)
    assert fast.kind == "captured"
    with pytest.raises(AttributeError):
        fast.cursor = 8  # type: ignore[misc]
