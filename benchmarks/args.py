"""argparse `type=` helpers shared by the benchmark command lines.

A value a benchmark cannot use is refused when the command line is parsed, before any work starts: argparse
exits with code 2 and one line naming the flag (`error: argument --n: expected an integer >= 10, got '0'`),
instead of a traceback from deep inside numpy, torch or faiss, or a silently empty table.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from typing import TypeVar

from cmce.config import SEED, in_interval, interval_bounds

T = TypeVar("T")


def _number(value: float) -> str:
    return f"{value:g}" if not float(value).is_integer() else str(int(value))


def _describe(what: str, interval: str) -> str:
    low, high, low_closed, _ = interval_bounds(interval)
    if math.isinf(high) and math.isinf(low):
        return what
    if math.isinf(high):
        return f"{what} {'>=' if low_closed else '>'} {_number(low)}"
    return f"{what} in {interval}"


def int_in(interval: str) -> Callable[[str], int]:
    """A type: an integer in `interval` (`[1, inf)`, `[8, 2048]`, as cmce.config's `within` writes them)."""
    interval_bounds(interval)  # a typo fails at import

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not in_interval(value, interval):
            raise argparse.ArgumentTypeError(f"expected {_describe('an integer', interval)}, got {text!r}")
        return value

    parse.__name__ = f"integer in {interval}"
    return parse


def float_in(interval: str) -> Callable[[str], float]:
    """A type: a finite number in `interval` (nan and inf are refused: an infinite duration never ends)."""
    interval_bounds(interval)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not in_interval(value, interval):
            raise argparse.ArgumentTypeError(f"expected {_describe('a number', interval)}, got {text!r}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


positive_int = int_in("[1, inf)")  # counts of items, repeats, sizes, batch sizes
non_negative_int = int_in("[0, inf)")  # worker counts (0: in the main process), "0 = the default" flags
positive_float = float_in("(0, inf)")  # durations
fraction = float_in("(0, 1)")  # a share of something that must leave some on both sides
random_seed = int_in(SEED)  # what numpy and torch both accept


def one_of(names: Iterable[str]) -> Callable[[str], str]:
    """A type: one of `names` (for items of a comma list; a single flag uses argparse's `choices`)."""
    valid = list(names)

    def parse(text: str) -> str:
        if text not in valid:
            raise argparse.ArgumentTypeError(f"unknown name {text!r}; valid: {', '.join(valid)}")
        return text

    parse.__name__ = "name"
    return parse


def comma_list(item: Callable[[str], T], *, unique: bool = True, allow_empty: bool = False) -> Callable[[str], list[T]]:
    """A type: comma-separated items, each read by `item` (surrounding spaces ignored); an empty item (`a,,b`) is
    refused, and so is an item given twice where `unique`. An empty string is the empty list where `allow_empty`
    ("none"), else refused."""

    def parse(text: str) -> list[T]:
        if not text.strip():
            if allow_empty:
                return []
            raise argparse.ArgumentTypeError("expected a comma-separated list, got an empty one")
        parts = [part.strip() for part in text.split(",")]
        if "" in parts:
            raise argparse.ArgumentTypeError(f"an empty item in {text!r} (items are comma-separated)")
        values = []
        for part in parts:
            try:
                values.append(item(part))
            except (argparse.ArgumentTypeError, ValueError) as err:
                raise argparse.ArgumentTypeError(f"{err} (in {text!r})" if len(parts) > 1 else str(err)) from None
        if unique:
            twice = sorted({parts[i] for i, v in enumerate(values) if v in values[:i]})
            if twice:
                raise argparse.ArgumentTypeError(f"{', '.join(map(repr, twice))} given twice in {text!r}")
        return values

    parse.__name__ = "comma-separated list"
    return parse


def thread_counts(text: str) -> list[int]:
    """`ALL,1` → [torch's default thread count, 1]; each count at least 1 (ALL and a number may coincide)."""
    import torch

    counts = []
    for part in text.split(","):
        part = part.strip()
        if part.upper() == "ALL":
            counts.append(torch.get_num_threads())
        elif part.isdigit() and int(part) >= 1:
            counts.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"expected thread counts >= 1 or ALL, comma-separated; got {part!r}")
    return counts


def one_line(err: BaseException) -> str:
    """An error's message on one line (a YAML error spans several)."""
    return " ".join(str(err).split())


def config_override(text: str) -> str:
    """A type for --set: KEY=VALUE with a YAML value (cmce.overrides.parse_overrides); the text itself is kept."""
    from cmce.overrides import parse_overrides

    try:
        parse_overrides([text])
    except ValueError as err:
        raise argparse.ArgumentTypeError(one_line(err).removeprefix("--set ")) from None
    return text


def config_or_error(parser: argparse.ArgumentParser, path: str, overrides: dict | None = None,
                    sets: Iterable[str] = (), flags: dict[str, str] | None = None):
    """cmce.config.load_config(path, --set options + `overrides`), or the parser's one-line error (exit 2) naming
    what is wrong: a missing file, an unknown key, a value out of range, a key given twice. `flags` names the
    benchmark's flag an override came from (`{"output_dir": "--out"}`), which a bad value is blamed on."""
    from cmce.config import load_config
    from cmce.overrides import clashing_key, parse_overrides

    try:
        given = parse_overrides(list(sets))
        for own in overrides or {}:  # the benchmark's own setting won without a word (`--set kd.enabled=false`)
            if key := clashing_key(given, own):
                by = f"its flag {flags[own]}" if flags and own in flags else f"{own}={overrides[own]}"
                parser.error(f"--set {key}: this benchmark sets {own} itself ({by})")
        return load_config(path, {**given, **(overrides or {})}, flags)
    except ValueError as err:  # ConfigError is a ValueError
        parser.error(one_line(err))


def device_or_error(parser: argparse.ArgumentParser, name: str, flag: str = "--device"):
    """cmce.device.select(name), or the parser's one-line error (exit 2): `--device cuda` on a machine without
    CUDA was a DeviceError traceback."""
    from cmce import device as devices

    try:
        return devices.select(name, flag)
    except ValueError as err:  # DeviceError is a ValueError
        parser.error(one_line(err))
