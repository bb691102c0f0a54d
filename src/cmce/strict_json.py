"""JSON read strictly: a key given twice in one object is refused. Python's parser keeps the last value silently,
so a hand-edited `"dim": 32, "dim": 48` in an index's meta.json was read as 48 and blamed on the query model."""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """A JSON object holds `key` twice."""

    def __init__(self, key: str):
        super().__init__(f"key {key!r} given twice in one JSON object")
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise DuplicateKeyError(key)
        seen.add(key)
    return dict(pairs)


def loads(text: str | bytes) -> Any:
    """json.loads, refusing a key twice in one object (DuplicateKeyError, a ValueError), and a nesting too deep for
    the parser (a ValueError: its RecursionError came as a traceback)."""
    try:
        return json.loads(text, object_pairs_hook=_pairs)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
