"""Schema helpers whose fast paths must agree with their plain definitions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from subcog_crdt._core.schema import normalise

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
