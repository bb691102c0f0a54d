import dataclasses
import math
import re
import types
import typing

import pytest
import yaml

from cmce.config import Config, ConfigError, load_config


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


GOOD = """
query_model: {name: q, arch: query_cnn}
gallery_models: [{name: g, arch: resnet}]
"""


def test_loads_defaults_and_coerces_numbers(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD + "transform: {lam: 1}\nevaluate: {far: [1e-3]}\n"))
    assert cfg.transform.lam == 1.0 and isinstance(cfg.transform.lam, float)
    assert cfg.evaluate.far == [1e-3]
    assert len(cfg.digest()) == 16


def test_unknown_key_is_rejected_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['epoch'\]; valid keys:"):
        load_config(_write(tmp_path, GOOD + "train: {epoch: 3}\n"))


def test_unknown_architecture_lists_valid_names(tmp_path):
    text = GOOD.replace("arch: resnet", "arch: resnet999")
    with pytest.raises(ConfigError, match=r"c.yaml.*unknown architecture 'resnet999'; valid names: \[.*'resnet'"):
        load_config(_write(tmp_path, text))


def test_wrong_type_and_literal(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs: expected int"):
        load_config(_write(tmp_path, GOOD + "train: {epochs: three}\n"))
    with pytest.raises(ConfigError, match=r"data.protocol: 'random' is not one of"):
        load_config(_write(tmp_path, GOOD + "data: {protocol: random}\n"))
    # refused at load, not once the gate has loaded its models (`split 'validation' is empty`)
    with pytest.raises(ConfigError, match=r"lifecycle.gate.split: 'validation' is not one of \['train', 'test'\]"):
        load_config(_write(tmp_path, GOOD + "lifecycle: {gate: {split: validation}}\n"))


def test_overrides_and_missing_file(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), {"train.epochs": 7, "output_dir": "x"})
    assert cfg.train.epochs == 7 and cfg.output_dir == "x"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_needs_gallery_models_and_unique_names(tmp_path):
    with pytest.raises(ConfigError, match="at least one"):
        load_config(_write(tmp_path, "query_model: {name: q}\n"))
    with pytest.raises(ConfigError, match="unique"):
        load_config(_write(tmp_path, "query_model: {name: g}\ngallery_models: [{name: g, arch: vgg}]\n"))


def test_override_through_a_non_mapping_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"gallery_models.0.epochs: no gallery model named '0'; valid names: \['g'\]"):
        load_config(_write(tmp_path, GOOD), {"gallery_models.0.epochs": 1})  # by name, not by position
    with pytest.raises(ConfigError, match=r"^--set train.epochs.x: train.epochs is a value, not a section with keys"):
        load_config(_write(tmp_path, GOOD), {"train.epochs.x": 1})
    cfg = load_config(_write(tmp_path, GOOD + "train:\n"), {"train.epochs": 2})  # empty section becomes a mapping
    assert cfg.train.epochs == 2


def test_nonsense_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs must be in \[1, 100000\], got 0"):
        load_config(_write(tmp_path, GOOD + "train: {epochs: 0}\n"))
    with pytest.raises(ConfigError, match="heldout_fraction must be in"):
        load_config(_write(tmp_path, GOOD + "data: {heldout_fraction: 5}\n"))
    with pytest.raises(ConfigError, match="data.channels: True is not one of"):
        load_config(_write(tmp_path, GOOD + "data: {channels: true}\n"))
    with pytest.raises(ConfigError, match=r"transform.augment_views must be in \[0, 64\], got -1"):
        load_config(_write(tmp_path, GOOD + "transform: {augment_views: -1}\n"))
    for share in (1.0, -0.1):
        with pytest.raises(ConfigError, match=f"transform.input_dropout must be in \\[0, 1\\), got {share}"):
            load_config(_write(tmp_path, GOOD + f"transform: {{input_dropout: {share}}}\n"))
    # the gated metrics are fractions: a tolerance of 1 made a gate no candidate could fail
    with pytest.raises(ConfigError, match=r"lifecycle.gate.tolerance must be in \[0, 1\), got 1.0"):
        load_config(_write(tmp_path, GOOD), {"lifecycle.gate.tolerance": 1.0})


@pytest.mark.parametrize(
    "section,message",
    [
        ("{far: [-0.1]}", r"evaluate.far must be in \(0, 1\), got -0.1"),
        ("{far: [3]}", r"evaluate.far must be in \(0, 1\), got 3.0"),
        ("{rejection_far: 0}", r"evaluate.rejection_far must be in \(0, 1\), got 0.0"),
        ("{recall_k: []}", r"evaluate.recall_k: must list at least one value"),
        ("{far: []}", r"evaluate.far: must list at least one value"),
        ("{rejection_rates: []}", r"evaluate.rejection_rates: must list at least one value"),
        ("{recall_k: [0, 1]}", r"evaluate.recall_k must be in \[1, 100000\], got 0"),
        ("{rejection_rates: [1.5, -0.2]}", r"evaluate.rejection_rates must be in \[0, 1\), got 1.5"),
        ("{random_repeats: 0}", r"evaluate.random_repeats must be in \[1, 1000\], got 0"),
    ],
)
def test_evaluate_values_are_checked_at_load_not_after_the_evaluation(tmp_path, section, message):
    with pytest.raises(ConfigError, match=r"c.yaml: " + message):
        load_config(_write(tmp_path, GOOD + f"evaluate: {section}\n"))


def test_rejection_with_a_single_gallery_model_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: index.reject_fraction 0.1 rejects by uncertainty, which needs "
                                          r"at least 2 gallery models; got 1"):
        load_config(_write(tmp_path, GOOD + "index: {reject_fraction: 0.1}\n"))
    two = GOOD.replace("[{name: g, arch: resnet}]", "[{name: g, arch: resnet}, {name: h, arch: vgg}]")
    assert load_config(_write(tmp_path, two + "index: {reject_fraction: 0.1}\n")).index.reject_fraction == 0.1


def test_numeric_keys_and_non_utf8_files_fail_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: train: unknown key\(s\) \['1', 'foo'\]"):
        load_config(_write(tmp_path, GOOD + "train: {1: a, foo: b}\n"))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(GOOD.encode() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text"):
        load_config(bad)


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert any(p.name == "emoji.yaml" for p in configs)
    for path in configs:
        load_config(path)
    emoji = load_config(configs[[p.name for p in configs].index("emoji.yaml")])
    assert (emoji.data.protocol, emoji.data.disjoint_by, emoji.data.channels) == ("cross_vendor", "group", 3)


def test_index_section_types_and_values(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD + "index: {type: auto, auto_threshold: 5000, ivfpq: {nlist: null, "
                                              "nprobe: 8}, hnsw: {ef_search: 40}}\n"))
    assert (cfg.index.type, cfg.index.auto_threshold, cfg.index.ivfpq.nlist, cfg.index.ivfpq.nprobe,
            cfg.index.hnsw.ef_search, cfg.index.hnsw.m) == ("auto", 5000, None, 8, 40, 32)
    for bad, message in (("type: annoy", r"index.type: 'annoy' is not one of \['flat', 'ivfpq', 'hnsw', 'auto'\]"),
                         ("hnsw: {efSearch: 8}", r"index.hnsw: unknown key\(s\) \['efSearch'\]"),
                         ("ivfpq: {nprobe: 0}", r"index.ivfpq.nprobe must be in \[1, 16777216\], got 0"),
                         ("ivfpq: {nlist: 0}", r"index.ivfpq.nlist must be in \[1, 16777216\], got 0"),
                         ("ivfpq: {nbits: 20}", r"index.ivfpq.nbits must be in \[1, 16\], got 20")):
        with pytest.raises(ConfigError, match=message):
            load_config(_write(tmp_path, GOOD + f"index: {{{bad}}}\n"))


def _numeric_fields(cls: type = Config, prefix: str = ""):
    """(dotted key, field, element type, is a list) of every int or float key of the config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if typing.get_origin(tp) in (list, typing.Union, types.UnionType) else tp
        if dataclasses.is_dataclass(inner):
            if f.name != "gallery_models" and not f.name.endswith(("_gallery_model", "new_query_model")):
                yield from _numeric_fields(inner, f"{prefix}{f.name}.")
        elif inner in (int, float):
            yield f"{prefix}{f.name}", f, inner, typing.get_origin(tp) is list


NUMERIC = list(_numeric_fields())


def test_every_numeric_key_declares_its_range():
    assert len(NUMERIC) > 40
    assert [key for key, f, _, _ in NUMERIC if "range" not in f.metadata] == []


def _outside(interval: str, tp: type) -> list:
    from cmce.config import interval_bounds

    low, high, low_closed, high_closed = interval_bounds(interval)
    step = 1 if tp is int else 0.5
    out = [] if tp is int else [math.nan]
    if math.isfinite(low):
        out.append(tp(low - step) if low_closed else tp(low))
    if math.isfinite(high):
        out.append(tp(high + step) if high_closed else tp(high))
    return out


@pytest.mark.parametrize("key,field,tp,is_list", NUMERIC, ids=[k for k, *_ in NUMERIC])
def test_a_value_outside_a_keys_range_is_refused_naming_the_key(tmp_path, key, field, tp, is_list):
    path = _write(tmp_path, GOOD)
    bad_values = _outside(field.metadata["range"], tp)
    assert bad_values, key
    for bad in bad_values:
        value = [bad] if is_list else bad
        with pytest.raises(ConfigError, match=rf"--set {re.escape(key)} must be in "):
            load_config(path, {key: value})


def test_gallery_model_fields_are_checked_too(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: gallery_models.g.width must be in \[1, 4096\], got 0"):
        load_config(_write(tmp_path, GOOD.replace("arch: resnet}", "arch: resnet, width: 0}")))


def test_duplicate_yaml_keys_are_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: invalid YAML: .*duplicate key 'epochs'"):
        load_config(_write(tmp_path, GOOD + "train:\n  epochs: 1\n  epochs: 2\n"))
    with pytest.raises(ConfigError, match=r"c.yaml: invalid YAML: .*duplicate key 'train'"):
        load_config(_write(tmp_path, GOOD + "train: {epochs: 1}\ntrain: {epochs: 2}\n"))


def test_yaml_merge_keys_are_read_as_yaml_specifies(tmp_path):
    """`<<: *base` merges a mapping; keys given beside it override the merged ones; a key given twice is still
    refused."""
    text = GOOD + "train: &base {epochs: 3, batch_size: 64, lr: 0.005}\ntransform: {<<: *base, epochs: 1}\n"
    cfg = load_config(_write(tmp_path, text))
    assert (cfg.transform.epochs, cfg.transform.batch_size, cfg.transform.lr) == (1, 64, 0.005)
    assert cfg.train.epochs == 3
    with pytest.raises(ConfigError, match=r"c.yaml: invalid YAML: .*duplicate key 'epochs'"):
        load_config(_write(tmp_path, text.replace("epochs: 1}", "epochs: 1, epochs: 2}")))


def test_a_key_merged_from_a_list_of_mappings_is_the_first_ones(tmp_path):
    """YAML: earlier mappings of a merge list win. PyYAML tells merged keys apart by the identity of their text,
    so a long key (`heldout_fraction`, not interned) came from the last mapping, a short one from the first."""
    text = GOOD + ("data:\n  <<: [{heldout_fraction: 0.5, image_size: 8}, {heldout_fraction: 0.25, channels: 1}]\n"
                   "  source: digits\n")
    cfg = load_config(_write(tmp_path, text))
    assert (cfg.data.heldout_fraction, cfg.data.image_size, cfg.data.channels) == (0.5, 8, 1)


@pytest.mark.parametrize("key,value", [("data.channels", 3.0), ("data.channels", True), ("data.image_size", 28.0),
                                       ("transform.depth", 2.0), ("train.epochs", False), ("seed", 1.5)])
def test_an_integer_key_takes_only_an_integer(tmp_path, key, value):
    """3.0 == 3 in Python, but a float size reaches torch (`empty(): argument 'size' must be tuple of ints`)."""
    with pytest.raises(ConfigError, match=rf"--set {re.escape(key)}: "):
        load_config(_write(tmp_path, GOOD), {key: value})


@pytest.mark.parametrize("key", ["output_dir", "data.path", "query_model.arch"])
@pytest.mark.parametrize("value", ["", "  ", "\t"])
def test_a_text_key_may_not_be_blank(tmp_path, key, value):
    """An empty output_dir would write the whole run into the working folder."""
    with pytest.raises(ConfigError, match=rf"--set {re.escape(key)}: must not be empty"):
        load_config(_write(tmp_path, GOOD), {key: value})


@pytest.mark.parametrize("overrides,message", [
    ({"transform.hidden_dim": 65536, "transform.depth": 64},
     r"transform.hidden_dim 65536 and transform.depth 64 imply a transformation of [0-9,]+ parameters "
     r"\(gallery_models.g → query_model\); the limit is 268,435,456"),
    ({"query_model.width": 4096}, r"query_model.width 4096 and query_model.embedding_dim 64 \(arch 'query_cnn'\) "
                                  r"imply a network of [0-9,]+ parameters"),
    ({"gallery_models": [{"name": "g", "arch": "resnet", "embedding_dim": 65536, "width": 2048}]},
     r"gallery_models.g.width 2048 and gallery_models.g.embedding_dim 65536 \(arch 'resnet'\)"),
    ({"gallery_models": [{"name": "g", "arch": "mobilenet_v2", "embedding_dim": 65536}], "query_model.width": 1024},
     r"query_model.width 1024 and gallery_models.g.embedding_dim 65536 imply a KD student"),
])
def test_model_sizes_the_keys_imply_together_are_bounded(tmp_path, overrides, message):
    """Each key within its range, together terabytes: refused at load, naming the keys, nothing allocated."""
    with pytest.raises(ConfigError, match=rf"--set ([\w.]+: )?{message}"):
        load_config(_write(tmp_path, GOOD), overrides)


def test_the_largest_usual_models_pass_the_size_bound(tmp_path):
    load_config(_write(tmp_path, GOOD), {"transform.hidden_dim": 4096, "transform.depth": 8,
                                         "gallery_models": [{"name": "g", "arch": "resnet", "width": 256,
                                                             "embedding_dim": 2048}]})


@pytest.mark.parametrize("name", ["../../../escaped_query", "a/b", "", ".hidden", "q q", "x" * 65, "naïve"])
def test_a_model_name_must_be_an_identifier(tmp_path, name):
    with pytest.raises(ConfigError, match=r"--set query_model.name: (.* is not a model name|must not be empty)"):
        load_config(_write(tmp_path, GOOD), {"query_model.name": name})


@pytest.mark.parametrize("name", ["1e3", "12E1", "2e-5"])
def test_a_model_name_yaml_1_2_reads_as_a_number_is_refused(tmp_path, name):
    """`name: 1e3` is text to PyYAML and 1000.0 to DVC: the stage trained models/1e3.pt, then DVC looked for
    models/1000.0.pt (rc 255)."""
    with pytest.raises(ConfigError, match=rf"query_model.name: '{name}' reads as a number in YAML 1.2"):
        load_config(_write(tmp_path, f"query_model: {{name: {name}, arch: query_cnn}}\n"
                                     "gallery_models: [{name: g, arch: resnet}]\n"))
    assert load_config(_write(tmp_path, GOOD), {"query_model.name": "e3"}).query_model.name == "e3"


def test_no_model_may_be_named_like_the_kd_student_of_a_gallery_model(tmp_path):
    with pytest.raises(ConfigError, match=r"\['kd_g'\] would be overwritten by the KD student of a gallery model"):
        load_config(_write(tmp_path, GOOD), {"query_model.name": "kd_g"})


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    """Nine levels of nine aliases are 387 million strings once expanded: a message quoting the value whole
    ran to hundreds of megabytes."""
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(levels) + "\ntrain:\n  epochs: *a8\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert len(str(err.value)) < 400 and "\n" not in str(err.value)


def test_gallery_models_keyed_by_name_read_as_the_list(tmp_path):
    """The mapping form (DVC's foreach names stages by its keys) is the list form in its order."""
    head = "query_model: {name: q, arch: query_cnn}\n"
    listed = load_config(_write(tmp_path, head + "gallery_models: [{name: z, arch: resnet}, "
                                                 "{name: a, arch: vgg, width: 8}]"))
    keyed = load_config(_write(tmp_path, head + "gallery_models: {z: {arch: resnet}, a: {arch: vgg, width: 8}}\n"))
    assert keyed == listed and [m.name for m in keyed.gallery_models] == ["z", "a"]
    path = tmp_path / "c.yaml"
    assert [m.name for m in load_config(path, {"gallery_models": ["a"]}).gallery_models] == ["a"]
    assert load_config(path, {"gallery_models.a.width": 16}).gallery_models[1].width == 16
    path.write_text("query_model: {name: q, arch: query_cnn}\ngallery_models: {z: {name: y, arch: resnet}}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: gallery_models.z: its name key says 'y'"):
        load_config(path)
    path.write_text("query_model: {name: q, arch: query_cnn}\ngallery_models: {z: resnet}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: gallery_models.z: expected a mapping, got str"):
        load_config(path)


def test_params_files_name_their_gallery_models_as_keys():
    """params.yaml and every config (any may be copied as params.yaml) use the form dvc.yaml's foreach needs."""
    from tests.conftest import ROOT

    for path in [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        raw = yaml.safe_load(path.read_text())
        assert isinstance(raw["gallery_models"], dict), path
        assert [m.name for m in load_config(path).gallery_models] == list(raw["gallery_models"])


VALID_ARCHS = r"; valid names: \[.*'resnet'.*\]$"


@pytest.mark.parametrize("pair,message", [
    ("gallery_models.resnet.arch=resnett", r"--set gallery_models.resnet.arch: unknown architecture 'resnett'"
                                           + VALID_ARCHS),
    ("gallery_models.vgg.width=0", r"--set gallery_models.vgg.width must be in \[1, 4096\], got 0$"),
    ("gallery_models.vgg.width=x", r"--set gallery_models.vgg.width: expected int, got 'x'$"),
    ("gallery_models.mobilenet.name=query", r"--set gallery_models.mobilenet.name: gallery_models.mobilenet: its name "
                                            r"key says 'query'$"),
])
def test_a_gallery_models_fault_names_it_as_set_addresses_it(pair, message):
    """`--set gallery_models.resnet.arch=resnett` said `gallery_models[0].arch: unknown architecture`: the model by
    its position in the list the keyed form is read as, which the user never wrote. Named by its name now."""
    from cmce.overrides import parse_overrides
    from tests.conftest import ROOT

    with pytest.raises(ConfigError, match=rf"^{message}") as err:
        load_config(ROOT / "params.yaml", parse_overrides([pair]))
    assert "gallery_models[" not in str(err.value)


def test_a_params_files_gallery_model_fault_names_it_by_its_key(tmp_path):
    """params.yaml keys gallery models by name (`resnet: {arch: ...}`): its faults name them so, not by position."""
    from tests.conftest import ROOT

    text = (ROOT / "params.yaml").read_text()
    assert "resnet: {arch: resnet, " in text and "vgg: {arch: vgg, embedding_dim: 128, width: 24," in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("resnet: {arch: resnet, ", "resnet: {arch: resnett, "))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: gallery_models.resnet.arch: unknown "
                                          rf"architecture 'resnett'{VALID_ARCHS}"):
        load_config(path)
    path.write_text(text.replace("width: 24,", "width: 0,"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: gallery_models.vgg.width must be in "):
        load_config(path)
    path.write_text(text.replace("vgg: {arch: vgg, embedding_dim: 128, width: 24,",
                                 "vgg: {arch: vgg, embedding_dim: 65536, width: 4096,"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: gallery_models.vgg.width 4096 and "
                                          r"gallery_models.vgg.embedding_dim 65536 \(arch 'vgg'\) imply a network"):
        load_config(path)


@pytest.mark.parametrize("models,message", [
    # no name, or one that is not a model name: by position, the only way to point at the entry
    ("[{arch: resnet, width: 0}]", r"gallery_models\[0\].width must be in \[1, 4096\], got 0"),
    ("[{name: g, arch: resnet}, {width: 8}]", r"gallery_models\[1\]: lacks 'arch'"),
    ("[{name: 'a b', arch: resnet}]", r"gallery_models\[0\].name: 'a b' is not a model name"),
    ("[{name: 5, arch: resnet}]", r"gallery_models\[0\].name: expected str, got 5"),
    ("[{name: g, arch: resnet}, resnet]", r"gallery_models\[1\]: expected a mapping, got str"),
    # a name two models share names neither
    ("[{name: g, arch: resnet}, {name: g, arch: vgg}]",
     r"gallery_models\[1\].name: 'g' is already the name of gallery_models\[0\]; model names must be unique"),
    # a known name: by it
    ("[{name: h, arch: vgg}, {name: g, arch: resnet, widht: 8}]", r"gallery_models.g: unknown key\(s\) \['widht'\]"),
    ("[{name: h, arch: vgg}, {name: q, arch: resnet}]", r"gallery_models.q.name: 'q' is already the name of "
                                                        r"query_model"),
])
def test_a_gallery_model_is_named_by_position_only_where_its_name_is_unknown(tmp_path, models, message):
    path = _write(tmp_path, f"query_model: {{name: q, arch: query_cnn}}\ngallery_models: {models}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        load_config(path)


@pytest.mark.parametrize("value", [1.0, 5, "resnet"])
def test_gallery_models_of_another_type_is_refused_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match=r"--set gallery_models: expected a list"):
        load_config(_write(tmp_path, GOOD), {"gallery_models": value})


def test_a_mapping_given_to_a_section_is_merged_into_it(tmp_path):
    """`--set 'train={epochs: 1}'` replaced the whole section: the file's batch_size and lr fell back to the
    defaults without a word."""
    from cmce.overrides import parse_overrides

    path = _write(tmp_path, GOOD + "train: {epochs: 3, batch_size: 64, lr: 0.005}\n"
                                   "index: {type: ivfpq, ivfpq: {nlist: 32, nprobe: 4}}\n")
    cfg = load_config(path, parse_overrides(["train={epochs: 1}", "index={ivfpq: {nprobe: 8}}"]))
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (1, 64, 0.005)
    assert (cfg.index.type, cfg.index.ivfpq.nlist, cfg.index.ivfpq.nprobe) == ("ivfpq", 32, 8)
    keyed = _write(tmp_path, "query_model: {name: q, arch: query_cnn}\n"
                             "gallery_models: {z: {arch: resnet, width: 8}, a: {arch: vgg}}\n")
    models = load_config(keyed, parse_overrides(["gallery_models={a: {width: 4}}"])).gallery_models
    assert [(m.name, m.arch, m.width) for m in models] == [("z", "resnet", 8), ("a", "vgg", 4)]
    # a value that is not a mapping still replaces: a list of models, or a section's scalar key
    listed = load_config(keyed, parse_overrides(["gallery_models=[{name: y, arch: vgg}]"])).gallery_models
    assert [m.name for m in listed] == ["y"]


@pytest.mark.parametrize("pair,message", [
    ("nosuch.key=1", r"--set nosuch.key: unknown key\(s\) \['nosuch'\]; valid keys: \['batch_size'"),
    ("train.epoch=1", r"--set train.epoch: train: unknown key\(s\) \['epoch'\]; valid keys: \[.*'epochs'"),
    ("train={epoch: 1}", r"--set train: train: unknown key\(s\) \['epoch'\]"),
    ("index={ivfpq: {nprob: 4}}", r"--set index: index.ivfpq: unknown key\(s\) \['nprob'\]"),
    ("gallery_models.g.widht=8", r"--set gallery_models.g.widht: gallery_models.g: unknown key\(s\) \['widht'\]"),
    ("gallery_models=[{name: g, arch: vgg, widht: 8}]", r"--set gallery_models: gallery_models.g: unknown key"),
    ("lifecycle.add_gallery_model.x=1", r"--set lifecycle.add_gallery_model.x: lifecycle.add_gallery_model: unknown"),
    ("train.epochs.x=1", r"--set train.epochs.x: train.epochs is a value, not a section with keys"),
])
def test_an_unknown_key_from_an_override_is_named_as_the_override(tmp_path, pair, message):
    """`--set nosuch.key=1` was blamed on the config file (`c.yaml: : unknown key(s) ['nosuch']`), which has no
    such key; the same key in the file is still the file's."""
    from cmce.overrides import parse_overrides

    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=rf"^{message}") as err:
        load_config(path, parse_overrides([pair]))
    assert str(path) not in str(err.value)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: unknown key\(s\) \['nosuch'\]; valid"):
        load_config(_write(tmp_path, GOOD + "nosuch: {key: 1}\n"))


def test_a_number_past_pythons_digit_limit_is_named_at_its_key_or_line(tmp_path):
    """`epochs: 999…9` (5000 digits) was a bare "Exceeds the limit (4300 digits) for integer string conversion"
    naming no key, file or line, in the file and through --set alike."""
    from cmce.overrides import parse_overrides

    huge = "9" * 5000
    with pytest.raises(ConfigError, match=r"^--set train.epochs: value .* is not valid YAML: a number of 5000 digits"):
        load_config(_write(tmp_path, GOOD), parse_overrides([f"train.epochs={huge}"]))
    path = _write(tmp_path, GOOD + f"train:\n  epochs: {huge}\n")
    at_line = r"(?s:.)*line 5, column 11"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: invalid YAML: a number of 5000 digits{at_line}"):
        load_config(path)


@pytest.mark.parametrize("pairs, message", [
    (["train.epochs=abc"], "--set train.epochs: expected int, got 'abc'"),
    (["train.epochs=2", "train.lr=-1"], "--set train.lr must be in"),
    (["train={epochs: x}"], "--set train: train.epochs: expected int, got 'x'"),
    (["query_model.name=../x"], "--set query_model.name: '../x' is not a model name"),
])
def test_a_bad_value_from_an_override_is_named_as_the_override(tmp_path, pairs, message):
    """`--set train.epochs=abc` was blamed on the config file (`c.yaml: train.epochs: expected int`), which holds
    a good value; a fault the file itself holds is still the file's, overrides or not."""
    from cmce.overrides import parse_overrides

    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as err:
        load_config(path, parse_overrides(pairs))
    assert str(err.value).startswith(message) and str(path) not in str(err.value), err.value
    bad = _write(tmp_path, GOOD + "train: {epochs: abc}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: train.epochs: expected int"):
        load_config(bad, parse_overrides(["train.lr=0.1"]))
    with pytest.raises(ConfigError, match=r"^--index-type: index.type: 'annoy' is not one of"):  # a flag's value
        load_config(_write(tmp_path, GOOD), {"index.type": "annoy"}, {"index.type": "--index-type"})


def test_a_config_that_is_not_a_regular_file_is_refused_before_it_is_read(tmp_path):
    """load_config read a FIFO with read_text (it waited for a writer for ever) and /dev/zero until the memory ran
    out (MemoryError traceback); a folder was IsADirectoryError. Each is refused, naming the file, at once."""
    import os
    import threading

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    outcome = []

    def load(path):
        try:
            load_config(path)
        except ConfigError as err:
            outcome.append(str(err))

    for path in (fifo, tmp_path, *[p for p in ("/dev/zero",) if os.path.exists(p)]):
        reader = threading.Thread(target=load, args=(path,), daemon=True)
        reader.start()
        reader.join(timeout=20)
        assert not reader.is_alive(), f"load_config({path}) hangs"
        assert outcome.pop() == f"{path}: is not a regular file (a folder, device, pipe or socket); give a file"


def test_a_config_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    """A 6 GB sparse file given as --config was read whole: a MemoryError traceback under a memory limit."""
    from cmce.config_yaml import MAX_CONFIG_BYTES

    big = tmp_path / "sparse.yaml"
    with open(big, "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: takes no disk
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(big))}: a config file of {MAX_CONFIG_BYTES + 1:,} bytes; "
                       rf"a config is at most {MAX_CONFIG_BYTES:,} bytes$"):
        load_config(big)
    big.write_text(GOOD + "# " + "x" * (MAX_CONFIG_BYTES - len(GOOD) - 3) + "\n")  # the limit itself is read
    assert big.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(big).query_model.name == "q"


def test_a_config_nested_past_the_depth_limit_is_named_with_its_file_and_line(tmp_path):
    """`rejection_rates: [[[[…]]]]` 20,000 deep was a RecursionError traceback from PyYAML's composer, in a file
    and through --set alike; a block mapping nested as deep is the same fault."""
    from cmce.config_yaml import MAX_YAML_DEPTH, read_yaml
    from cmce.overrides import parse_overrides

    deep = "[" * 20_000 + "]" * 20_000
    path = _write(tmp_path, GOOD + f"evaluate:\n  rejection_rates: {deep}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: invalid YAML: nested deeper than "
                       rf"{MAX_YAML_DEPTH} levels(?s:.)*line 5, column"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set evaluate.rejection_rates: value .* is not valid YAML: nested"):
        parse_overrides([f"evaluate.rejection_rates={deep}"])
    block = "".join(f"{' ' * i}k{i}:\n" for i in range(5000)) + " " * 5000 + "v\n"
    with pytest.raises(yaml.YAMLError, match="nested deeper than"):
        read_yaml(block)
    nested = "[" * (MAX_YAML_DEPTH - 1) + "1" + "]" * (MAX_YAML_DEPTH - 1)
    value = read_yaml(nested)
    for _ in range(MAX_YAML_DEPTH - 1):
        value = value[0]
    assert value == 1


@pytest.mark.parametrize("text, means", [("010", 8), ("-07", -7), ("+010", 8), ("0_10", 8), ("00", 0), ("1:30", 90)])
def test_an_integer_yaml_1_1_and_1_2_read_differently_is_refused_naming_its_line(tmp_path, text, means):
    """`train: {epochs: 010}` trained 8 epochs without a word: YAML 1.1 (PyYAML) reads a leading zero as octal,
    YAML 1.2 (DVC's reader of params.yaml) as decimal; `1:30` is 90 in 1.1 (base 60), text in 1.2."""
    from cmce.overrides import parse_overrides

    path = _write(tmp_path, GOOD + f"train:\n  epochs: {text}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: invalid YAML: {re.escape(text)} is ambiguous: "
                       rf"YAML 1.1 reads it as {means} (?s:.)*line 5, column 11"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"^--set train.epochs: value .* is not valid YAML: {re.escape(text)} is "
                       "ambiguous"):
        parse_overrides([f"train.epochs={text}"])


@pytest.mark.parametrize("text, value", [("0", 0), ("0o10", 8), ("-0o10", -8), ("0x1f", 31), ("1_000", 1000),
                                         ("10", 10), ("'010'", "010"), ("08", "08"), ("010.5", 10.5)])
def test_integers_yaml_reads_alike_keep_their_value(tmp_path, text, value):
    """`0o10` is YAML 1.2's octal, the spelling an ambiguous `010` is told to use (PyYAML read it as text)."""
    from cmce.config_yaml import read_yaml

    assert read_yaml(f"k: {text}") == {"k": value}
    if isinstance(value, int) and value > 0:
        assert load_config(_write(tmp_path, GOOD + f"train:\n  epochs: {text}\n")).train.epochs == value


@pytest.mark.parametrize("override", [f"{'a' * 10_000}=1", f"train.{'a' * 10_000}=1", f"seed.{'a' * 10_000}=1",
                                      f"{'a' * 10_000}=[", f"{'a' * 10_000}=1 {'a' * 10_000}=2"])
def test_a_set_key_of_thousands_of_letters_is_cut_in_its_error(tmp_path, override):
    """`--set <10,000 letters>=1`: one 10,332-byte error line, the key cut in the list of unknown keys but printed
    whole before it."""
    from cmce.overrides import parse_overrides

    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, GOOD), parse_overrides(override.split(" ")))
    assert str(err.value).startswith("--set ") and len(str(err.value)) < 600, str(err.value)[:700]


def test_a_new_gallery_model_named_by_set_must_have_a_model_name(tmp_path):
    """`--set gallery_models.<100,000 letters>.width=1` gave one 200,177-byte line, the name echoed twice in full,
    saying it lacked `arch`: the fault (not a model name) was never stated."""
    from cmce.overrides import parse_overrides

    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, GOOD), parse_overrides([f"gallery_models.{'y' * 100_000}.width=1"]))
    assert "is not a model name" in str(err.value) and len(str(err.value)) < 400
    with pytest.raises(ConfigError, match=r"gallery_models.new_one: lacks 'arch'"):  # a good name: the usual fault
        load_config(_write(tmp_path, "query_model: {name: q, arch: query_cnn}\ngallery_models: {g: {arch: resnet}}\n"),
                    parse_overrides(["gallery_models.new_one.width=1"]))


def test_a_key_set_twice_on_the_command_line_is_refused():
    """`--set train.epochs=1 --set train.epochs=2` trained 2 epochs without a word (a YAML key twice is refused)."""
    from cmce.config import ConfigError
    from cmce.overrides import parse_overrides

    with pytest.raises(ConfigError, match=r"^--set train.epochs: given twice; give it once$"):
        parse_overrides(["train.epochs=1", " train.epochs =2"])
    assert parse_overrides(["train.epochs=1", "train.lr=0.1"]) == {"train.epochs": 1, "train.lr": 0.1}


@pytest.mark.parametrize("path, said", [
    ("/tmp/" + "/".join(["d" * 200] * 22), "(4,426 bytes, a name of 200;"),
    ("/tmp/" + "x" * 300, "(305 bytes, a name of 300;"),
])
def test_a_path_too_long_for_the_file_system_is_named_by_its_key(tmp_path, path, said):
    """`cmce run --set output_dir=<4,461 characters>` failed on `[Errno 36] File name too long`, a 4.5 KB line that
    named neither output_dir nor --set."""
    from tests.conftest import SMOKE

    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, {"output_dir": path})
    assert str(err.value).startswith("--set output_dir: '/tmp/") and said in str(err.value)
    assert len(str(err.value)) < 300
    with pytest.raises(ConfigError, match=r"data.path: '/tmp/xxx.*too long for the file system"):
        load_config(SMOKE, {"data.path": "/tmp/" + "x" * 300})


@pytest.mark.parametrize("overrides, said", [
    ({"gallery_models": {"a\n": None}}, r"--set gallery_models: gallery_models\['a\\n'\]: expected a mapping"),
    ({"gallery_models": {"\n": {"": None}}}, r"--set gallery_models: gallery_models\['\\n'\]: unknown key"),
    ({"output_dir": "~\n"}, r"--set output_dir: '~\\n': no such user's home folder"),
])
def test_a_line_break_in_a_model_name_or_path_stays_inside_the_one_line_message(overrides, said):
    """The fuzz test's rare draws: the name or path went into the message as it was, its line break with it."""
    from tests.conftest import SMOKE

    with pytest.raises(ConfigError, match=said) as err:
        load_config(SMOKE, overrides)
    assert "\n" not in str(err.value)


def test_a_key_set_twice_in_two_spellings_is_refused():
    """`--set train.epochs=1 --set 'train={epochs: 2}'` trained 2 epochs (the other order 1), without a word."""
    from cmce.overrides import parse_overrides

    for pairs in (["train.epochs=1", "train={epochs: 2}"], ["train={epochs: 2, lr: 0.1}", "train.epochs=1"]):
        with pytest.raises(ConfigError, match=r"^--set train.epochs: given twice \(by --set train(.epochs)? and "
                                              r"--set train(.epochs)?\); give it once$"):
            parse_overrides(pairs)
    assert parse_overrides(["train={epochs: 2}", "train.lr=0.1"]) == {"train": {"epochs": 2}, "train.lr": 0.1}


def test_an_added_gallery_model_needs_an_arch_and_no_model_is_another_under_a_new_name(tmp_path):
    """lifecycle.add_gallery_model without arch was the query model's architecture with its defaults: the model
    `add-gallery-model` trained was the query model itself, tensor for tensor, exit 0. Two models a run trains of the
    same spec (all but the name) train the same weights: refused naming both."""
    from cmce.overrides import parse_overrides

    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"lifecycle.add_gallery_model: lacks 'arch' \(a gallery model needs one\)"):
        load_config(path, parse_overrides(["lifecycle.add_gallery_model.name=g3"]))
    with pytest.raises(ConfigError, match=r"gallery_models.g: the same model as query_model \(architecture, "
                                          r"sizes, seed and data\): it would train the same weights again"):
        load_config(path, parse_overrides(["gallery_models=[{name: g, arch: query_cnn}]"]))
    with pytest.raises(ConfigError, match=r"gallery_models.h: the same model as gallery_models.g "):
        (twins := tmp_path / "twins.yaml").write_text(GOOD.replace("[{name: g, arch: resnet}]",
                                                                 "[{name: g, arch: resnet}, {name: h, arch: resnet}]"))
        load_config(twins)
    cfg = load_config(path, parse_overrides(["lifecycle.new_query_model={name: q2, arch: query_cnn, seed: 1}",
                                             "lifecycle.add_gallery_model={name: g3, arch: vgg}"]))
    assert (cfg.lifecycle.new_query_model.seed, cfg.lifecycle.add_gallery_model.arch) == (1, "vgg")


@pytest.mark.parametrize("pair, said", [
    ("train.lr=1" + "0" * 400, r"^--set train.lr: 1000.*000 is too large for a float$"),
    ("evaluate.far=[1" + "0" * 400 + "]",
     r"^--set evaluate.far: evaluate.far\[0\]: 1000.*000 is too large for a float$"),
    ("evaluate.block_mb=1e303", r"^--set evaluate.block_mb must be in \(0, 1048576\], got 1e\+303$"),
    ("train.scale=1:30.0", r"1:30.0 is ambiguous: YAML 1.1 reads it as 90 \(base 60\), YAML 1.2 as text"),
])
def test_numbers_a_float_cannot_hold_or_that_yaml_versions_read_apart_are_refused(tmp_path, pair, said):
    """An integer of 401 digits where a float goes was an OverflowError traceback; evaluate.block_mb 1e303 passed,
    then evaluate failed with `cannot convert float NaN to integer`; `1:30.0` was 90.0 (YAML 1.1's base 60), text to
    YAML 1.2 (DVC's), where `1:30` was refused."""
    from cmce.overrides import parse_overrides

    with pytest.raises(ConfigError, match=said):
        load_config(_write(tmp_path, GOOD), parse_overrides([pair]))


def test_gate_metrics_are_spelled_as_they_are_measured(tmp_path):
    """`TAR@FAR=1e-3` or `R@01` passed, then the gate measured both galleries and failed: not measured (the measured
    names are `TAR@FAR=0.001` and `R@1`). Two spellings of one metric are one metric given twice."""
    from cmce.overrides import parse_overrides

    cfg = load_config(_write(tmp_path, GOOD), parse_overrides(['lifecycle.gate.metrics=["TAR@FAR=1e-3", R@01, MAP@R]']))
    assert cfg.lifecycle.gate.metrics == ["TAR@FAR=0.001", "R@1", "MAP@R"]
    with pytest.raises(ConfigError, match=r"lifecycle.gate.metrics: R@1 given twice"):
        load_config(_write(tmp_path, GOOD), parse_overrides(["lifecycle.gate.metrics=[R@1, R@001]"]))


def test_one_gallery_model_of_the_list_form_is_set_by_name(tmp_path):
    """`--set gallery_models=[b, a] --set gallery_models.b.width=5` failed with "'gallery_models' is not a mapping"
    (the other order passed); so did any `gallery_models.<name>.<key>` over a file's list form."""
    from cmce.overrides import parse_overrides

    two = "query_model: {name: q, arch: query_cnn}\ngallery_models: [{name: a, arch: resnet}, {name: b, arch: vgg}]\n"
    for pairs in (["gallery_models=[b, a]", "gallery_models.b.width=5"], ["gallery_models.b.width=5"],
                  ["gallery_models.b={width: 5}"]):
        cfg = load_config(_write(tmp_path, two), parse_overrides(pairs))
        assert {m.name: m.width for m in cfg.gallery_models}["b"] == 5
    with pytest.raises(ConfigError, match=r"^--set gallery_models.c.width: no gallery model named 'c'; valid names: "
                                          r"\['a', 'b'\]$"):
        load_config(_write(tmp_path, two), parse_overrides(["gallery_models.c.width=5"]))
    with pytest.raises(ConfigError, match=r"^--set gallery_models.b: expected a mapping, got NoneType$"):
        load_config(_write(tmp_path, two), parse_overrides(["gallery_models.b=null"]))  # a TypeError traceback
    with pytest.raises(ConfigError, match=r"^--set gallery_models.b: its name key says 'c'$"):  # renamed it
        load_config(_write(tmp_path, two), parse_overrides(["gallery_models.b={name: c}"]))
