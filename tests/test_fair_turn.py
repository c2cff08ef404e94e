"""``_turn_due``: a writer that never suspends still gives the loop turns; one that gives
the loop turns anyway (awaiting something else between writes) never waits for one."""

from __future__ import annotations

import asyncio

import pytest

from subcog_crdt import ConversationsApi


async def test_a_writer_that_never_suspends_still_lets_the_loop_run() -> None:
    async with ConversationsApi(user_id="u", listen=False, discovery=()) as a:
        s = await a.register_session("s", subscribe=["d"])
        loop = asyncio.get_running_loop()
        ticks = 0

        def tick() -> None:
            nonlocal ticks
            ticks += 1
            loop.call_soon(tick)

        loop.call_soon(tick)
        deadline = loop.time() + 20.0
        writes = 0
        # Captures in memory never suspend by themselves: only the fair turn lets tick run.
        while ticks < 3 and loop.time() < deadline:
            await s.capture("d", f"tight loop {writes}")
            writes += 1
        assert ticks >= 3, (ticks, writes)


async def test_a_write_after_the_loop_had_its_turn_does_not_yield() -> None:
    """Run by hand: the capture completes in its first step, however long ago the last
    fair turn was, because the loop ran since (its mark is gone)."""
    async with ConversationsApi(user_id="u", listen=False, discovery=()) as a:
        s = await a.register_session("s", subscribe=["d"])
        await s.capture("d", "first")
        assert a._turn_mark is not None  # the loop has not run since
        await asyncio.sleep(0)  # one loop turn: the mark runs
        assert a._turn_mark is None
        a._turn_at = 0.0  # long ago
        coro = s.capture("d", "second")
        with pytest.raises(StopIteration) as done:  # finished in its first step
            coro.send(None)
        assert done.value.value.content == "second"
        assert a._turn_mark is not None
        # Still no turn since, and past _TURN_EVERY: the next one yields.
        a._turn_at = 0.0
        coro = s.capture("d", "third")
        assert coro.send(None) is None  # suspended in asyncio.sleep(0)
        assert a._turn_mark is None
        coro.close()
        assert sorted(m.content for m in a.memories("d")) == ["first", "second"]
