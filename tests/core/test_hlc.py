"""The hybrid logical clock: strictly increasing stamps that move past what they saw."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from subcog_crdt._core.hlc import MAX_DRIFT_MS, Hlc, valid_stamp


def test_stamps_increase_within_one_millisecond_and_across_counter_overflow() -> None:
    hlc = Hlc(clock=lambda: 1_000)
    stamps = [hlc.now() for _ in range(1000)]
    assert stamps[0] == "0000000001000000000"
    assert stamps[-1] == "00000000010000003e7"
    hlc.observe("0000000001000fffffe")  # the counter nearly full
    stamps += [hlc.now() for _ in range(3)]
    assert stamps[-3:] == ["0000000001000ffffff", "0000000001001000000", "0000000001001000001"]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert all(valid_stamp(s) for s in stamps)


def test_the_clock_never_goes_backwards() -> None:
    wall = [5_000]
    hlc = Hlc(clock=lambda: wall[0])
    first = hlc.now()
    wall[0] = 4_000  # the wall clock jumps back
    assert hlc.now() > first


@given(st.integers(0, 10**12), st.integers(0, 0xFFFFFF), st.integers(-(10**6), 2 * MAX_DRIFT_MS))
def test_observe_moves_ahead_of_what_it_saw_unless_too_far_ahead(
    now_ms: int, counter: int, ahead: int
) -> None:
    hlc = Hlc(clock=lambda: now_ms)
    hlc.now()
    seen_wall = max(0, now_ms + ahead)
    seen = f"{seen_wall:013d}{counter:06x}"
    before = hlc.last()
    hlc.observe(seen)
    after = hlc.now()
    if seen_wall <= now_ms + MAX_DRIFT_MS:
        assert after > seen  # a write after seeing it sorts after it
    else:
        assert hlc.last() == after and before < after < seen  # not dragged into the future
    assert after > before


def test_observe_ignores_junk_stamps() -> None:
    # found in review: the counter was parsed before the drift guard
    arabic = "".join(chr(0x660 + int(d)) for d in "1795000000000") + "000001"
    hlc = Hlc(clock=lambda: 1_795_000_000_000)
    for junk in ["9999999999999zzzzzz", "1795000000000-00001", arabic, "x", ""]:
        hlc.observe(junk)
        assert hlc.last() == "0000000000000000000"
    assert not valid_stamp(arabic)  # other scripts' digits: int() reads them, sorting not
