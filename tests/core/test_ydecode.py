"""The update reader agrees with pycrdt on what an update inserts, and rejects garbage."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from subcog_crdt._core.document import NamespaceDoc
from subcog_crdt._core.hlc import Hlc
from subcog_crdt._core.ydecode import UpdateDecodeError, decode_state_vector, read_map_inserts
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
    assert unknown2  # an overwrite carries no key: the caller must rescan
    sv = decode_state_vector(d.get_state())
    assert sv[d.client_id] == inserts[-1].clock + 2  # the overwrite took one more clock


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_garbage_is_rejected_or_harmless(data):
    try:
        read_map_inserts(data, "entries")
    except UpdateDecodeError:
        pass


@given(st.binary(min_size=1, max_size=300))
@settings(max_examples=200, deadline=None)
def test_hostile_updates_never_change_state_or_crash(data):
    doc = NamespaceDoc("d", node_id="00000000000000aa", hlc=Hlc(), next_cursor=lambda: 1)
    doc.capture("s", "a fact", {})
    before = doc.state_hash()
    try:
        events = doc.apply_update(data)
    except ProtocolError:
        events = []
    assert events == []
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
