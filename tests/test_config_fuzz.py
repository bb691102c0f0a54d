"""Generated configs: every key of the config set to values of every type and range. Loading either gives a
config whose every numeric key lies in its declared range, or refuses with a ConfigError that names the key;
never another exception."""

from __future__ import annotations

import dataclasses
import math
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmce.config import Config, ConfigError, in_interval, load_config

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
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, 1e-300, 1e300]),
    st.text(max_size=12), st.sampled_from(["auto", "cpu", "cuda", "flat", "resnet", "../x", "1e-3", ".nan"]),
)
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


# derandomized: the same cases every run, so a failure is reproducible (a longer random run is a local option)
@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=3))
def test_a_generated_config_loads_in_range_or_is_refused_naming_a_key(tmp_path, overrides):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    try:
        cfg = load_config(path, dict(overrides))
    except ConfigError as err:
        message = str(err)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        top = {key.split(".")[0] for key in overrides}
        assert any(name in message for name in top | set(overrides)), (overrides, message)
        return
    for key, value, interval in _ranged_values(cfg):
        assert in_interval(value, interval), (key, value, interval)
        assert not (isinstance(value, float) and math.isnan(value))
