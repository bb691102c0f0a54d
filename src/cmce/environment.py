"""Integer settings read from environment variables, each with a documented default and range.

A value out of range is refused naming the variable: it would otherwise hang a step (a million attempts at a
dead endpoint) or fail it late, naming nothing."""

from __future__ import annotations

import os


def env_int(name: str, default: int, low: int, high: int) -> int:
    """`name`'s value as an integer in [low, high]; `default` when unset or blank."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ValueError(f"environment variable {name}={raw!r}: an integer from {low} to {high} expected")
    return value
