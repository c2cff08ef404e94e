"""The update reader agrees with pycrdt on what an update inserts, and rejects garbage."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.hlc import Hlc
from subcog_crdt._core.schema import encode_write, first_memory_id, normalise, write_key
from subcog_crdt._core.ydecode import (
    UpdateDecodeError,
    decode_state_vector,
    read_map_inserts,
    read_update,
)
from subcog_crdt._errors import ProtocolError


def test_reads_root_map_inserts_and_flags_overwrites():
    d = Doc()
    m = d.get("entries", type=Map)
    t = d.get("other", type=Text)
    updates: list[bytes] = []
    d.observe(lambda e: updates.append(e.update))
    with d.transaction():
        t += "héllo 🙂 wide"
        m["a"] = json.dumps({"x": 1})
        m["b"] = {"y": [1, 2.5, "z", None, True]}
    m["a"] = "again"
    inserts, unknown = read_map_inserts(updates[0], "entries")
    assert [(i.key, i.value) for i in inserts] == [
        ("a", '{"x": 1}'),
        ("b", {"y": [1.0, 2.5, "z", None, True]}),
    ]
    assert not unknown
    assert inserts[0].client == d.client_id
    _, unknown2 = read_map_inserts(updates[1], "entries")
    assert unknown2  # an overwrite carries no key: the caller must watch the map
    sv = decode_state_vector(d.get_state())
    assert sv[d.client_id] == inserts[-1].clock + 2  # the overwrite took one more clock


_SCALAR = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20)
)  # fmt: skip
_JSON = st.recursive(
    _SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)


@st.composite
def _updates(draw: st.DrawFn) -> bytes:
    """Random bytes, or a real pycrdt update of the entries map: intact, truncated, or
    with one byte replaced (what a buggy or hostile peer can send)."""
    kind = draw(st.sampled_from(["garbage", "valid", "truncated", "flipped"]))
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    d = Doc(client_id=draw(st.integers(1, 2**32)))  # fixed id: hypothesis replays exactly
    m = d.get("entries", type=Map)
    items = st.lists(st.tuples(st.text(min_size=1, max_size=8), _JSON), min_size=1, max_size=4)
    for key, value in draw(items):
        m[key] = value
    u = d.get_update()
    i = draw(st.integers(0, len(u) - 1))
    if kind == "truncated":
        return u[:i]
    if kind == "flipped":
        return u[:i] + bytes([draw(st.integers(0, 255))]) + u[i + 1 :]
    return u


@given(_updates())
@settings(max_examples=400, deadline=None)
def test_a_decoded_update_is_what_pycrdt_integrates(data: bytes) -> None:
    """Whatever the bytes, a decode that succeeds promises what the node's fast path
    relies on (NamespaceDoc.apply_update): every insert lies in its client's block; a
    ``simple`` update has no overwrites or deletes; and a simple update that continues
    from clock 0 is integrated by pycrdt whole: its state vector is the blocks' ends and
    its map holds exactly the decoded inserts."""
    try:
        d = read_update(data, "entries")
    except UpdateDecodeError:
        return  # refused: the node raises ProtocolError and applies nothing
    for _, start, end in d.blocks:
        assert 0 <= start <= end
    for ins in d.inserts:
        assert ins.root == "entries"
        assert any(c == ins.client and s <= ins.clock < e for c, s, e in d.blocks), ins
    if not d.simple:
        return
    assert not d.unknown and not d.deletes
    if any(start for _, start, _ in d.blocks):
        return  # depends on earlier clocks: a fresh document would hold it back
    doc = Doc()
    doc.apply_update(data)  # a simple update from clock 0 must be one pycrdt accepts
    assert decode_state_vector(doc.get_state()) == {c: e for c, s, e in d.blocks if e > s}
    keys = [ins.key for ins in d.inserts]
    if len(set(keys)) == len(keys):  # (one key set twice: Yjs picks by client order)
        got = doc.get("entries", type=Map).to_py() or {}
        # (a NaN can come in, as any float: it is not equal to itself)
        assert _same(got, {ins.key: ins.value for ins in d.inserts})


def _same(a: Any, b: Any) -> bool:
    """Equal, counting NaN equal to NaN, at any depth (dict order aside)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


@given(st.binary(min_size=1, max_size=300))
@settings(max_examples=200, deadline=None)
def test_hostile_updates_never_change_state_or_crash(data):
    doc = NamespaceDoc("d", node_id="00000000000000aa", hlc=Hlc(), next_cursor=lambda: 1)
    doc.capture("s", "a fact", {})
    before = doc.state_hash()
    entries = dict(doc.entries.items())
    try:
        events = doc.apply_update(data)
    except ProtocolError:
        events = []
    assert events == []
    if dict(doc.entries.items()) == entries:  # (random bytes can add a junk entry)
        assert doc.state_hash() == before
    assert doc.get(next(iter(doc.memory_ids()))).content == "a fact"


def test_nonconforming_entries_are_ignored_by_every_node():
    src = Doc()
    m = src.get("entries", type=Map)
    arr = src.get("entries-list", type=Array)
    updates: list[bytes] = []
    src.observe(lambda e: updates.append(e.update))
    m["not-a-key"] = "x"
    m["0123456789abcdef0123/1795643242165000000/s/ab"] = "{not json"
    m["0123456789abcdef0123/1795643242165000000/s/ab2"] = json.dumps({"op": "update", "set": {}})
    arr.append("noise")
    doc = NamespaceDoc("d", node_id="00000000000000aa", hlc=Hlc(), next_cursor=lambda: 1)
    for u in updates:
        assert doc.apply_update(u) == []
    assert list(doc.memory_ids(include_deleted=True)) == []


def test_truncated_update_raises_protocol_error():
    doc = NamespaceDoc("d", node_id="00000000000000aa", hlc=Hlc(), next_cursor=lambda: 1)
    doc.capture("s", "x", {})
    full = doc.diff()
    other = NamespaceDoc("d", node_id="00000000000000bb", hlc=Hlc(), next_cursor=lambda: 1)
    with pytest.raises(ProtocolError):
        other.apply_update(full[: len(full) // 2])
    assert other.state_hash() == "0" * 64


def _varuint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _vstr(s: str) -> bytes:
    raw = s.encode()
    return _varuint(len(raw)) + raw


@pytest.mark.parametrize("shape", ["string item", "two values"])
def test_a_value_in_an_unusual_shape_is_read_alike_running_and_restarted(shape):
    """A hand-built update can set an entry as a string item (Yjs content type 4) or as
    two values at once; pycrdt reads either as a value. The running node must then see
    what a node loading the same document from disk sees."""
    value = encode_write("capture", "", {"content": "sneaky but valid"})
    key = write_key(first_memory_id("d", normalise("sneaky but valid")), "1795649794389000196",
                    "evil", "ff")  # fmt: skip
    head = _varuint(1) + _varuint(1) + _varuint(777) + _varuint(0)  # 1 client, 1 struct
    parent = _varuint(1) + _vstr("entries") + _vstr(key)
    if shape == "string item":
        item = bytes([0x24]) + parent + _vstr(value)
    else:  # content "any" with two values: an earlier junk one, then the write
        item = bytes([0x28]) + parent + _varuint(2) + b"w" + _vstr("junk") + b"w" + _vstr(value)
    update = head + item + _varuint(0)  # empty delete set
    running = NamespaceDoc("d", node_id="00000000000000aa", hlc=Hlc(), next_cursor=lambda: 1)
    running.capture("s", "a fact", {})
    events = running.apply_update(update)
    restarted = NamespaceDoc("d", node_id="00000000000000bb", hlc=Hlc(), next_cursor=lambda: 1)
    restarted.load([running.diff()])
    ids = sorted(running.memory_ids())
    assert sorted(restarted.memory_ids()) == ids and len(ids) == 2
    assert [m.content for m in map(restarted.get, ids)] == [
        m.content for m in map(running.get, ids)
    ]
    assert [type(e).__name__ for e in events] == ["Captured"]


@st.composite
def _one_entry_updates(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A one-entry update (one string set under a new key, as the node writes them), from
    a document at a random clock, then possibly damaged: truncated, one byte replaced,
    one inserted, bytes appended. (The update; whether it is intact and of "entries".)"""
    d = Doc(client_id=draw(st.integers(0, 2**53 - 1)))
    root = draw(st.sampled_from(["entries", "entries", "other"]))
    m = d.get(root, type=Map)
    for i in range(draw(st.integers(0, 200))):
        m[f"before {i}"] = "x"
    updates: list[bytes] = []
    d.observe(lambda e: updates.append(e.update))
    m[draw(st.text(max_size=140))] = draw(st.text(max_size=400))
    u = updates[-1]
    kind = draw(st.sampled_from(["intact", "truncated", "flipped", "inserted", "appended"]))
    i = draw(st.integers(0, len(u) - 1))
    b = draw(st.integers(0, 255))
    damaged = {
        "intact": u,
        "truncated": u[:i],
        "flipped": u[:i] + bytes([b]) + u[i + 1 :],
        "inserted": u[:i] + bytes([b]) + u[i:],
        "appended": u + bytes([b]),
    }[kind]
    return damaged, kind == "intact" and root == "entries"


@given(_one_entry_updates())
@settings(max_examples=600, deadline=None)
def test_the_one_entry_reader_agrees_with_the_general_one(case: tuple[bytes, bool]) -> None:
    """``read_update``'s one-pass reader for the common update returns exactly what the
    general reader returns, or leaves the update to it (None): then the general reader's
    answer, or its error, is what callers get."""
    data, intact = case
    from subcog_crdt._core import ydecode

    try:
        general: Any = ydecode._read_any(data, "entries")
    except UpdateDecodeError as exc:
        general = exc
    one = ydecode._read_one_entry(data, "entries")
    if one is not None:
        assert one.canonical  # the one form a node may hand pycrdt later (defer=True)
        assert one._replace(canonical=False) == general
    if intact:
        assert one is not None  # the common case does take the one-pass reader
    try:
        got: Any = read_update(data, "entries")
    except UpdateDecodeError as exc:
        got = exc
    if isinstance(general, Exception):
        assert str(got) == str(general)
    else:
        assert got._replace(canonical=False) == general
