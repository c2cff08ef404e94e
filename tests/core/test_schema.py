"""Schema helpers whose fast paths must agree with their plain definitions."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

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
        "tags": st.lists(st.text(max_size=5), max_size=3),
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
