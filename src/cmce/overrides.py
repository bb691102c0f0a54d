"""--set overrides of a config: `KEY=VALUE` pairs parsed (each key once), checked against the config's keys and
merged into its raw mapping before it is built (cmce.config), so a bad key is blamed on the override, not the file."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

import yaml

from cmce.config import (
    Config,
    ModelSpec,
    check_model_name,
    model_key,
    model_keys,
    models_as_list,
    shown,
    shown_key,
)
from cmce.config_yaml import ConfigError, read_yaml


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (the --set syntax every runner uses) → {dotted key: value read as YAML}."""
    out: dict[str, Any] = {}
    set_by: dict[str, str] = {}  # each key set, a mapping value's own keys included → the override setting it
    for pair in pairs:
        if not isinstance(pair, str) or "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {shown(pair)}")
        key, value = pair.split("=", 1)
        if key.strip() in out:  # the last silently won, as a YAML key given twice did
            raise ConfigError(f"--set {shown_key(key.strip())}: given twice; give it once")
        try:
            out[key.strip()] = read_yaml(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {shown_key(key)}: value {shown(value)} is not valid YAML: {err}") from None
        for leaf in leaf_keys({key.strip(): out[key.strip()]}):  # `train.epochs=1` and `train={epochs: 2}`
            if leaf in set_by:  # the last silently won
                raise ConfigError(f"--set {shown_key(leaf)}: given twice (by --set {shown_key(set_by[leaf])} and "
                                  f"--set {shown_key(key.strip())}); give it once")
            set_by[leaf] = key.strip()
    return out


def leaf_keys(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys whose values `overrides` sets (`train={epochs: 1}` sets train.epochs, not all of train)."""
    keys = []
    for key, value in overrides.items():
        # an empty mapping sets its key itself (`index.type={}`, refused later as no type): a leaf
        keys += leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + str(key)]
    return keys


def clashing_key(overrides: dict[str, Any], key: str) -> str | None:
    """The key of `overrides` (--set pairs, parsed) that sets `key` too: the key itself, a section holding it, or a
    key inside it; None when none does."""
    return next((k for k in leaf_keys(overrides) if k == key or key.startswith(f"{k}.") or k.startswith(f"{key}.")),
                None)


OVERRIDE_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``train.epochs``) in a raw config mapping; returns the same mapping.

    A mapping value is merged into the mapping already there (`train={epochs: 1}` changes only train.epochs);
    any other value replaces it. `gallery_models` given as a list of names selects and orders the gallery models
    of the mapping by name (an unknown name is an error listing the valid ones); given as a list of mappings it
    replaces them. `gallery_models.<name>.<key>` sets one model's key, in the mapping form or the list form.
    A key the config does not have is refused as the override's (`--set KEY`), not the file's."""
    for dotted, value in overrides.items():
        if dotted == "gallery_models" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            models_as_list(raw)
            specs = {m.get("name"): m for m in raw.get("gallery_models") or [] if isinstance(m, dict)}
            unknown = [n for n in value if n not in specs]
            if unknown:
                raise ConfigError(f"gallery_models: unknown gallery model(s) {unknown}; valid names: {sorted(specs)}")
            raw["gallery_models"] = [specs[n] for n in value]
            continue
        if not OVERRIDE_KEY.fullmatch(dotted):
            raise ConfigError(f"--set {shown(dotted)}: not a key; keys are dotted names such as train.epochs "
                              "(one gallery model's: gallery_models.<name>.<key>)")
        check_override_key(dotted, value)
        node = raw
        *parents, leaf = dotted.split(".")
        if parents[:1] == ["gallery_models"] and isinstance(raw.get("gallery_models"), list):
            # the list form (a file's, or a selection's): the model named by the key's next part
            if len(parents) == 1:  # the whole model: its mapping merged into the model's
                model = _listed_model(raw["gallery_models"], leaf, dotted)
                if not isinstance(value, dict):  # was a TypeError traceback (the mapping form said this)
                    raise ConfigError(f"--set {shown_key(dotted)}: expected a mapping, got {type(value).__name__}")
                if value.get("name", leaf) != leaf:  # the mapping form refuses a rename so
                    raise ConfigError(f"--set {shown_key(dotted)}: its name key says {shown(value['name'])}")
                model.update(_merged(model, value))
                continue
            node, parents = _listed_model(raw["gallery_models"], parents[1], dotted), parents[2:]
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"--set {shown_key(dotted)}: '{p}' is not a mapping")
            node = node[p]
        node[leaf] = _merged(node.get(leaf), value)
    return raw


def _listed_model(models: list, name: str, dotted: str) -> dict:
    """The mapping of the gallery model `name` in the list form of gallery_models, for `--set gallery_models.<name>.
    <key>` (was: "'gallery_models' is not a mapping", or after a selection of models, in one order of the two)."""
    found = next((m for m in models if isinstance(m, dict) and m.get("name") == name), None)
    if found is None:
        names = [m.get("name") for m in models if isinstance(m, dict)]
        raise ConfigError(f"--set {shown_key(dotted)}: no gallery model named {shown(name)}; valid names: {names}")
    return found


def _merged(old: Any, new: Any) -> Any:
    """`new` deep-merged into `old` when both are mappings (a new mapping; neither is changed), else `new`."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}


def check_override_key(dotted: str, value: Any) -> None:
    """An override's dotted key, and the keys of a mapping (or list of model mappings) it sets, are keys of the
    config: else a ConfigError naming `--set KEY` (the params file has no such key; the override brought it)."""
    tp: Any = Config
    done: list[str] = []
    for part in dotted.split("."):
        fields = _config_fields(tp)
        if tp == list[ModelSpec]:  # the mapping form: any model name (a new model must then give its arch)
            check_model_name(part, f"--set {shown(dotted)}")  # a 100,000-letter name was echoed twice, never named
            tp = ModelSpec
        elif fields is None:
            raise ConfigError(f"--set {shown_key(dotted)}: {'.'.join(done)} is a value, not a section with keys")
        elif part not in fields:  # worded as the file's own unknown keys are (_build), after the override
            _unknown_keys(dotted, ".".join(done), [part], fields)
        else:
            tp = fields[part]
        done.append(part)
    _check_value_keys(dotted, dotted, tp, value)


def _config_fields(tp: Any) -> dict[str, Any] | None:
    """The field types of a config class (through `X | None`), or None for a plain value's type."""
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(inner) == 1:
        tp = inner[0]
    return typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else None


def _check_value_keys(dotted: str, at: str, tp: Any, value: Any) -> None:
    """The keys of a mapping value set at `at`, a section of type `tp` (recursively), and of gallery models'."""
    if tp == list[ModelSpec]:
        specs = ([(model_key(at, name), spec) for name, spec in value.items()] if isinstance(value, dict) else
                 list(zip(model_keys(at, value), value, strict=True)) if isinstance(value, list) else [])
        for where, spec in specs:
            _check_value_keys(dotted, where, ModelSpec, spec)
        return
    fields = _config_fields(tp)
    if fields is None or not isinstance(value, dict):
        return  # a value of the wrong type: _coerce names it
    unknown = sorted(map(str, set(value) - set(fields)))
    if unknown:
        _unknown_keys(dotted, at, unknown, fields)
    for k, v in value.items():
        _check_value_keys(dotted, f"{at}.{k}", fields[k], v)


def _unknown_keys(dotted: str, at: str, unknown: list[str], fields: dict[str, Any]) -> typing.NoReturn:
    at = f"{at}: " if at else ""
    raise ConfigError(f"--set {shown_key(dotted)}: {at}unknown key(s) {shown(unknown)}; valid keys: {sorted(fields)}")
