"""A peer's live capture reaches this node's subscribers before pycrdt integrates it
(``NamespaceDoc.apply_update(defer=True)``); the node then catches pycrdt up in the next
loop turn by itself. Real nodes over loopback sockets, a real log on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import converged, node, wait_for
from subcog_crdt import Captured
from subcog_crdt._core.document import NamespaceDoc


async def test_subscribers_get_a_peers_capture_before_pycrdt_and_the_node_catches_up(
    tmp_path: Path,
) -> None:
    async with node() as a, node(data_dir=tmp_path / "b") as b:
        sa = await a.register_session("a1", subscribe=["d"])
        sb = await b.register_session("b1", subscribe=["d"])
        stream = sb.events()
        await b.connect(a.url)
        await wait_for(lambda: len(a.peers()) == 1 and len(b.peers()) == 1, what="linked")
        behind_at_event = []
        ids = []
        for i in range(6):
            m = await sa.capture("d", f"fact number {i}")
            ev = await anext(stream)
            assert isinstance(ev, Captured) and ev.memory.id == m.id
            behind_at_event.append(b._docs["d"].unapplied)
            if i % 2:
                # A read in the subscriber sees the memory (its entry read gives pycrdt
                # the update first).
                assert b.get(m.id).content == f"fact number {i}"
                assert b._docs["d"].unapplied == 0
            else:
                # Nobody reads: the node catches up by itself.
                await wait_for(lambda: b._docs["d"].unapplied == 0, what="caught up")
            ids.append(m.id)
        # Live captures after the first were deferred at the moment their event arrived.
        assert behind_at_event[1:] == [1] * 5, behind_at_event
        await wait_for(lambda: converged([a, b], "d"), what="converged")
        # Stored as received: a restart has every one of them.
        await b.aclose()
    async with node(data_dir=tmp_path / "b") as b2:
        assert sorted(m.id for m in b2.memories("d")) == sorted(ids)


async def test_a_write_goes_ahead_of_pycrdt_only_when_someone_gets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alone, a node does not encode its writes ahead for nobody; linked, each single
    write reaches the peer's link before this node's pycrdt holds it."""
    held_when_pushed: list[bool] = []
    ahead = NamespaceDoc._send_ahead

    def watched(self: NamespaceDoc, key: str, value: str) -> None:
        held_when_pushed.append(key in self._entries)
        ahead(self, key, value)

    monkeypatch.setattr(NamespaceDoc, "_send_ahead", watched)
    async with node() as a, node() as b:
        sa = await a.register_session("a1", subscribe=["d"])
        await sa.capture("d", "alone")
        assert held_when_pushed == []
        sb = await b.register_session("b1", subscribe=["d"])
        stream = sb.events()
        await b.connect(a.url)
        await wait_for(lambda: len(a.peers()) == 1 and len(b.peers()) == 1, what="linked")
        assert isinstance(first := await anext(stream), Captured)  # the catch-up
        assert first.memory.content == "alone"
        m = await sa.capture("d", "linked")
        ev = await anext(stream)
        assert isinstance(ev, Captured) and ev.memory.id == m.id
        assert held_when_pushed == [False]
