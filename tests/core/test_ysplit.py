"""A large update cut into pieces (UpdateScan) holds exactly what it held whole.

The pieces are applied to a fresh pycrdt document one by one, in order, and compared with
the update applied whole: same state vector, same map, text and array content. The
documents are made by several pycrdt clients that exchange updates now and then, so items
point at other clients' items (origins), values are overwritten and deleted (a delete set),
and text holds characters outside the BMP (Yjs counts clocks in UTF-16 units)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from subcog_crdt._core.ydecode import UpdateDecodeError, read_update
from subcog_crdt._core.ysplit import UpdateScan

_OPS = st.lists(
    st.tuples(
        st.sampled_from(["set", "overwrite", "del", "text", "untext", "push", "sync"]),
        st.integers(0, 3),  # which client
        st.integers(0, 50),
        st.text(alphabet="ab é🙂", max_size=6),
    ),
    min_size=1,
    max_size=60,
)


def _roots(d: Doc[Any]) -> tuple[Map[Any], Text, Array[Any]]:
    return d.get("entries", type=Map), d.get("text", type=Text), d.get("list", type=Array)


def _content(d: Doc[Any]) -> tuple[Any, str, Any]:
    m, t, a = _roots(d)
    return m.to_py(), str(t), a.to_py()


def _build(ops: list[tuple[str, int, int, str]], clients: int) -> list[Doc[Any]]:
    docs = [Doc(client_id=1000 + i) for i in range(clients)]
    for op, who, n, s in ops:
        d = docs[who % clients]
        m, t, a = _roots(d)
        if op == "set":
            m[f"k{n}"] = s
        elif op == "overwrite" and len(m):
            m[sorted(m.keys())[n % len(m)]] = {"v": [n, s, None, True]}
        elif op == "del" and len(m):
            del m[sorted(m.keys())[n % len(m)]]
        elif op == "text":
            # (pycrdt's text length counts bytes: never an index inside a character)
            t.insert(min(n, len(t)) if str(t).isascii() else len(t), s or "x")
        elif op == "untext" and len(t) and str(t).isascii():
            # (pycrdt's text length counts bytes, not characters)
            i = n % len(t)
            del t[i : min(len(t), i + 1 + n % 3)]  # (pycrdt panics past the end)
        elif op == "push":
            a.append(Map({"n": n}) if n % 2 else s)
        elif op == "sync":
            other = docs[(who + 1 + n) % clients]
            other.apply_update(d.get_update(other.get_state()))
    return docs


def _run(scan: UpdateScan) -> None:
    while not scan.step(7):
        pass


def _scan(update: bytes, structs: int, size: int) -> UpdateScan:
    scan = UpdateScan(update, piece_structs=structs, piece_bytes=size)
    while not scan.step(3):
        pass
    return scan


@given(
    _OPS,
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(1, 300),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_pieces_applied_in_order_hold_what_the_update_held(
    ops: list[tuple[str, int, int, str]], clients: int, structs: int, size: int, partial: bool
) -> None:
    docs = _build(ops, clients)
    full = Doc()
    for d in docs:
        full.apply_update(d.get_update())
    base = Doc()
    if partial:  # a diff against what the receiver has: clocks that do not start at 0
        base.apply_update(docs[0].get_update())
    update = full.get_update(base.get_state())
    whole, cut = Doc(), Doc()
    for target in (whole, cut):
        target.apply_update(base.get_update())
    whole.apply_update(update)
    scan = _scan(update, structs, size)
    pieces = list(scan.pieces())
    for piece in pieces:
        cut.apply_update(piece)
    assert cut.get_state() == whole.get_state()
    assert _content(cut) == _content(whole) == _content(full)
    assert scan.blocks == read_update(update, "entries").blocks
    event("cut" if len(pieces) > 1 else "whole")
    if len(pieces) == 1:
        assert pieces[0] == update


def test_an_update_of_many_writes_is_cut_by_count_and_by_size() -> None:
    d = Doc()
    m = d.get("entries", type=Map)
    with d.transaction():
        for i in range(1000):
            m[f"key-{i:04d}"] = "v" * (2000 if i == 500 else 20)
    update = d.get_update()
    pieces = list(_scan(update, 100, 10_000).pieces())
    # 100 writes per piece, except that the 2 KB one starts a piece of its own size
    assert len(pieces) in (10, 11)
    assert all(len(p) < 10_000 + 2100 for p in pieces)
    cut = Doc()
    for p in pieces:
        cut.apply_update(p)
    assert cut.get("entries", type=Map).to_py() == m.to_py()
    # one struct larger than the byte bound is still a piece (never an empty one)
    assert len(list(_scan(update, 1000, 1).pieces())) == 1000


def test_each_step_scans_at_most_its_budget() -> None:
    d = Doc()
    m = d.get("entries", type=Map)
    with d.transaction():
        for i in range(50):
            m[f"k{i}"] = i
    scan = UpdateScan(d.get_update(), piece_structs=8, piece_bytes=1 << 20)
    steps = 0
    while not scan.step(10):
        steps += 1
    assert steps == 5  # 50 structs, 10 per step; the sixth call reads the delete set
    with pytest.raises(RuntimeError):
        UpdateScan(b"\x00\x00", piece_structs=1, piece_bytes=1).pieces()


def test_a_truncated_update_is_refused_by_the_scan_before_any_piece_exists() -> None:
    d = Doc()
    m = d.get("entries", type=Map)
    with d.transaction():
        for i in range(40):
            m[f"k{i}"] = f"value {i} 🙂"
    del m["k3"]
    update = d.get_update()
    for cut_at in range(len(update)):
        scan = UpdateScan(update[:cut_at], piece_structs=4, piece_bytes=1 << 20)
        with pytest.raises(UpdateDecodeError):
            _run(scan)
        with pytest.raises(RuntimeError):
            scan.pieces()
