"""Building frozen slotted dataclasses on hot paths without going through ``__init__``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

__all__ = ["slot_setters"]


def slot_setters(cls: type, expected: int) -> dict[str, Callable[[Any, Any], None]]:
    """Each field's slot setter, by field name.

    A frozen dataclass's ``__init__`` sets every field through ``object.__setattr__``;
    calling the slot's own setter costs about a third of that. ``expected`` is the number
    of fields the caller's constructor fills: a field added to ``cls`` then fails at
    import instead of being left unset."""
    setters = {f.name: getattr(cls, f.name).__set__ for f in fields(cls)}
    if len(setters) != expected:  # pragma: no cover
        raise ImportError(
            f"{cls.__name__} has {len(setters)} fields, not {expected}: update its constructor"
        )
    return setters
