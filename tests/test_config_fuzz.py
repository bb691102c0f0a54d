"""Generated configs: every key of the config set to values of every type and range. Loading either gives a
config whose every numeric key lies in its declared range, or refuses with a ConfigError that names the key;
never another exception."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmce.config import Config, ConfigError, in_interval, load_config
from cmce.models import MAX_PARAMETERS, embedding_net_parameters, mlp_parameters

GOOD = "query_model: {name: q, arch: query_cnn}\ngallery_models: [{name: g, arch: resnet}, {name: h, arch: vgg}]\n"


def _keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key an override can set: sections and their leaves."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], f"{key}.")
    return out


KEYS = _keys()


def _hint(key: str):
    tp = Config
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
        tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)  # ModelSpec | None
    return tp


def _near_misses(tp) -> st.SearchStrategy:
    """Values a careless edit gives a key of type `tp`: the right number of the wrong type (3.0 for 3, True for
    1), an empty list, blank text, and large sizes that are each in range."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(_near_misses(a) for a in args if a is not type(None)))
    if origin is typing.Literal:
        return st.sampled_from([float(a) if type(a) is int else a for a in args] + [True, False])
    if origin is list:
        return st.just([]) | st.lists(_near_misses(args[0]), min_size=1, max_size=2)
    if tp is int:
        return st.sampled_from([1.0, 2.0, 3.0, 8.0, 64.0, True, False]) | st.integers(1, 65536)
    if tp is str:
        return st.sampled_from(["", " ", "\t"])
    return SCALARS
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 3, 64, 4096, 65536, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, 3.0, 64.0, 1e-300, 1e300]),
    st.text(max_size=12),
    st.sampled_from(["auto", "cpu", "cuda", "flat", "resnet", "../x", "1e-3", ".nan", "", " "]),
)
# lists: empty ones too (every list key needs an element)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=2)),
                      max_leaves=4)


def _ranged_values(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _ranged_values(value, f"{prefix}{f.name}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for item in value:
                yield from _ranged_values(item, f"{prefix}{f.name}[].")
        elif "range" in f.metadata and value is not None:
            for item in value if isinstance(value, list) else [value]:
                yield f"{prefix}{f.name}", item, f.metadata["range"]


# derandomized, but not fixed: hypothesis mixes in constants it collects from the imported cmce modules, so the
# cases change with the modules imported and with cmce's strings; a case found failing is pinned by a plain test
@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
def test_a_generated_config_loads_in_range_or_is_refused_naming_a_key(tmp_path, data, keys):
    overrides = {key: data.draw(VALUES | _near_misses(_hint(key)), label=key) for key in keys}
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    try:
        cfg = load_config(path, dict(overrides))
    except ConfigError as err:
        message = str(err)
        # a key the config lacks is named as the override's (`--set KEY: …`), anything else after the file
        assert message.startswith((f"{path}: ", "--set ")) and "\n" not in message, message
        top = {key.split(".")[0] for key in overrides}
        assert any(name in message for name in top | set(overrides)), (overrides, message)
        return
    for key, value, interval in _ranged_values(cfg):
        assert in_interval(value, interval), (key, value, interval)
        assert not (isinstance(value, float) and math.isnan(value))
    for key, value, tp in _typed_values(cfg):
        assert _has_type(value, tp), (key, value, tp)
    for m in cfg.all_models():  # the networks the keys imply together stay buildable
        assert embedding_net_parameters(m.arch, cfg.data.channels, m.embedding_dim, m.width) <= MAX_PARAMETERS
    queries = [m for m in (cfg.query_model, cfg.lifecycle.new_query_model) if m is not None]
    for g in [*cfg.gallery_models, *([cfg.lifecycle.add_gallery_model] if cfg.lifecycle.add_gallery_model else [])]:
        for q in queries:
            assert mlp_parameters(g.embedding_dim, q.embedding_dim, cfg.transform.hidden_dim,
                                  cfg.transform.depth) <= MAX_PARAMETERS


def _typed_values(obj, prefix=""):
    """(key, value, annotated type) of every leaf of a loaded config."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _typed_values(value, f"{key}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from _typed_values(item, f"{key}[{i}].")
        else:
            yield key, value, hints[f.name]


def _has_type(value, tp) -> bool:
    """Exactly the annotated type: an int key holds an int (not a float or a bool), a Literal one of its values
    of the same type, a list at least one element, a text key some non-blank text."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin is list:
        return isinstance(value, list) and len(value) > 0 and all(_has_type(v, args[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is str:
        return type(value) is str and value.strip() != ""
    return type(value) is tp
