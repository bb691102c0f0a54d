"""Reading a config file: a regular file of at most MAX_CONFIG_BYTES, UTF-8, YAML nested at most MAX_YAML_DEPTH
levels, duplicate keys refused (merge keys `<<` work as YAML specifies), and an integer YAML 1.1 and 1.2 read
differently refused: `010` (1.1: octal 8; 1.2, as DVC reads params.yaml: 10) and `1:30` (1.1: 90); `0o10` is octal
8 in both. What the values mean is cmce.config's."""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and the field."""


MAX_CONFIG_BYTES = 256 * 1024
MAX_YAML_DEPTH = 100  # a config nests a few levels; 20,000 brackets overflowed PyYAML's recursive composer
_AMBIGUOUS_INT = re.compile(r"[-+]?(0[0-9_]+|[0-9][0-9_]*(:[0-5]?[0-9])+)")  # YAML 1.1 octal, sexagesimal


def _ambiguous(text: str, yaml11: int) -> str:
    if ":" in text:
        return (f"{text} is ambiguous: YAML 1.1 reads it as {yaml11} (base 60), YAML 1.2 as text; write {yaml11} "
                f"or '{text}'")
    sign, digits = ("-" if text.startswith("-") else ""), text.lstrip("+-")
    return (f"{text} is ambiguous: YAML 1.1 reads it as {yaml11} (octal), YAML 1.2 as {int(text)}; write "
            f"{int(text)} or {sign}0o{digits.lstrip('0_') or '0'}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a config with both is refused instead."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Nesting past MAX_YAML_DEPTH is a YAML error at its line (it was a RecursionError traceback)."""
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            # a merge key (`<<: *base`): the base class merges it, keys given here overriding merged ones
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """A number past Python's 4300 digits raised a bare ValueError (no key, no line): a YAML error at its line.
        So is an integer YAML 1.1 (PyYAML) and YAML 1.2 read differently: `010` was 8 without a word."""
        text = str(node.value)
        if _AMBIGUOUS_INT.fullmatch(text):
            raise yaml.constructor.ConstructorError(None, None, _ambiguous(text, super().construct_yaml_int(node)),
                                                    node.start_mark)
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            digits = sum(c.isdigit() for c in text)
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {digits} digits (Python reads at most {sys.get_int_max_str_digits()})",
                node.start_mark) from None

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """As PyYAML, but a key merged from two sources is the first source's, as YAML specifies: PyYAML tells
        keys apart by the identity of their text, so a long key (not interned) was taken from the last source."""
        own = sum(key.tag != "tag:yaml.org,2002:merge" for key, _ in node.value)
        super().flatten_mapping(node)
        merged, seen = [], set()
        for key, value in node.value[:len(node.value) - own]:
            name = (key.tag, key.value) if isinstance(key, yaml.ScalarNode) else id(key)
            if name not in seen:
                seen.add(name)
                merged.append((key, value))
        node.value = merged + node.value[len(node.value) - own:]


    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        """A base-60 float (`1:30.0`, YAML 1.1's 90.0) is text to YAML 1.2 (DVC's reader): refused as the base-60
        integers are, where `1:30` was refused and `1:30.0` read as 90.0 without a word."""
        value = super().construct_yaml_float(node)
        if ":" in str(node.value):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value} is ambiguous: YAML 1.1 reads it as {value:g} (base 60), YAML 1.2 as "
                f"text; write {value:g} or '{node.value}'", node.start_mark)
        return value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_yaml_float)
# YAML 1.2's octal `0o10` (PyYAML read it as text), the spelling an ambiguous `010` is told to use
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?0o[0-7_]+$"), list("-+0"))


def read_config_text(path: str | Path) -> str:
    """The text of config file `path`, refused unless a regular file (a FIFO hung, /dev/zero filled the memory) of
    at most MAX_CONFIG_BYTES, checked before it is read."""
    from cmce.storage import open_regular

    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: a config file of {size:,} bytes; a config is at most "
                                  f"{MAX_CONFIG_BYTES:,} bytes")
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EISDIR):
            raise ConfigError(f"{path}: is not a regular file (a folder, device, pipe or socket); give a file"
                              ) from None
        raise ConfigError(f"{path}: cannot read the config: {err.strerror or err}") from None
    if len(data) > MAX_CONFIG_BYTES:  # grew while read
        raise ConfigError(f"{path}: a config file over {MAX_CONFIG_BYTES:,} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None


def read_yaml(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys (merge keys `<<` work as YAML specifies), nesting past
    MAX_YAML_DEPTH and integers YAML 1.1 and 1.2 read differently."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
