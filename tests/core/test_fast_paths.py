"""Hot-path shortcuts must agree with the plain definitions they replace."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from subcog_crdt._core.events import Captured, new_captured
from subcog_crdt._core.recall import _SEPARATORS, tokenize
from subcog_crdt._core.schema import (
    _CAPTURE_HEAD,
    SCHEMA_VERSION,
    _decode_json,
    decode_write,
    encode_write,
    normalise,
)

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


_KEY = "0123456789abcdef0123/1795649794389000196/sess/ab"


def _slow(value: str) -> object:
    mid, at, by, node = _KEY.split("/")
    return _decode_json(_KEY, mid, at, by, node, value)


@given(st.sampled_from(["capture", "update"]), _changes)
def test_decode_write_reads_what_encode_write_wrote(op: str, changes: dict[str, Any]) -> None:
    value = encode_write(op, "", changes)
    assert decode_write(_KEY, value) == _slow(value)


# Values that start like the plain form but are not it (or are invalid) must be decided
# exactly as the general parser decides them.
_MIDDLES = [
    '"a"',
    '""',
    '" "',
    '"a\\u0000"',
    '"a"},"op":"delete","x":{"y":"b',
    "1",
    "null",
    '"a","tags":["x"]',
    '"a","status":"s"',
]
_tricky = st.builds(
    lambda middle, tail: _CAPTURE_HEAD + middle + tail,
    st.sampled_from(_MIDDLES) | st.text(max_size=12),
    st.sampled_from(["}}", ',"tags":[]}}', "}", ',"tags":[]}', "}},", ""]),
)


@given(_tricky)
def test_decode_write_fast_path_agrees_with_the_general_parser(value: str) -> None:
    assert decode_write(_KEY, value) == _slow(value)


def test_decode_write_never_raises_on_deep_nesting() -> None:
    # found in review: the plain-capture shortcut let RecursionError through
    assert decode_write(_KEY, _CAPTURE_HEAD + "[" * 5000 + "}}") is None
    assert decode_write(_KEY, _CAPTURE_HEAD + '"a"' + "}" * 5000) is None


def test_memory_built_fast_is_the_same_frozen_dataclass() -> None:
    import dataclasses

    from subcog_crdt._core.memory import Memory, _new_memory

    at = datetime(2026, 1, 2, tzinfo=UTC)
    values: tuple[Any, ...] = (
        "m", "ns", "c", ("t",), {}, "s", ("s",), at, at, "s", 1, False,
        "d", None, None, None, "1795649794389000196",
    )  # fmt: skip
    fast, plain = _new_memory(*values), Memory(*values)
    assert fast == plain and repr(fast) == repr(plain)
    assert dataclasses.is_dataclass(fast)
    assert dataclasses.replace(fast, content="x").content == "x"
    assert fast != values  # type: ignore[comparison-overlap]  # not a tuple
    assert "clock=" not in repr(fast)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.content = "y"  # type: ignore[misc]


_words = st.text(
    alphabet=st.sampled_from(list("aZ_9 \t\n\x0b\x1c.,-'\"!@#$%^&*()[]{}\\/|~`<>?;:+=É ßİ\u2003")),
    max_size=60,
)


@given(_words)
def test_tokenize_is_casefold_punctuation_split(text: str) -> None:
    plain = text.casefold().translate(_SEPARATORS).split()
    assert tokenize(text) == plain
    ascii_only = text.encode("ascii", "ignore").decode()
    assert tokenize(ascii_only) == ascii_only.casefold().translate(_SEPARATORS).split()
