"""One typed configuration, loaded once from YAML; unknown keys are rejected with their path."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and the field."""


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
    heldout_fraction: float = 0.25  # test share per class when the source has no official split
    max_train_per_class: int | None = None
    max_test_per_class: int | None = None
    image_size: int = 28
    channels: Literal[1, 3] = 1


@dataclass
class ModelSpec:
    name: str = "query"
    arch: str = "query_cnn"
    embedding_dim: int = 64
    width: int = 32
    seed: int = 0
    data_fraction: float = 1.0  # train on a random subset of the train split (ensemble diversity)
    epochs: int | None = None  # overrides train.epochs for this model
    # learning rate of the backbone relative to train.lr (the embedding and classifier heads keep train.lr):
    # below 1 for an ImageNet-pretrained backbone, so fine-tuning does not wash out its features
    backbone_lr_scale: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128  # global batch: split evenly over data-parallel ranks (cmce.distributed)
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1
    scale: float = 16.0  # cosine-softmax temperature
    label_smoothing: float = 0.1
    augment: bool = True
    # on CUDA: bf16 autocast and channels_last for the embedding models and KD students (ignored on the CPU)
    mixed_precision: bool = True
    # on CUDA: the decoded train split (uint8) is kept on the GPU when it takes at most this many GB, else its
    # batches are prefetched from pinned host memory (cmce.feed)
    device_data_gb: float = 4.0


@dataclass
class TransformConfig:
    hidden_dim: int = 512
    depth: int = 2  # number of linear layers
    lam: float = 0.03  # weight of the CE term through the frozen query classifier (tuned: see README)
    scale: float = 16.0
    epochs: int = 30
    batch_size: int = 256  # global batch, like train.batch_size
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # extra randomly shifted/flipped copies of each train image embedded by both frozen models (the same
    # copy for both), so T is fitted on more pairs than the images the backbones were trained on
    augment_views: int = 0
    # share of each gallery embedding's coordinates dropped (the rest scaled up) at every fitting step, a
    # regulariser for T, which fits the train classes almost exactly (on emoji cos 0.98 on train, 0.9 on unseen
    # classes); measured there it lowered the ensemble (README, "Regularising T")
    input_dropout: float = 0.0


@dataclass
class KDConfig:
    enabled: bool = True
    epochs: int | None = None  # default: train.epochs
    augment: bool = True


@dataclass
class IvfPqConfig:
    """IVF-PQ with exact re-ranking (faiss "IVF{nlist},PQ{m}x{nbits},Refine(Flat)"); tuned in BENCHMARKS.md."""

    nlist: int | None = None  # None: 4·sqrt(n) rounded to a power of two (4096 at 1M)
    m: int | None = None  # PQ sub-quantisers, must divide the dimension; None: about dim/4 (4 dims each)
    nbits: int = 8
    nprobe: int = 16  # inverted lists visited per query
    k_factor: int = 8  # PQ candidates re-ranked exactly = k_factor·k
    train_size: int | None = None  # training sample; None: max(65536, 39·nlist), faiss's minimum per list
    seed: int = 0  # training sample and k-means


@dataclass
class HnswConfig:
    """HNSW graph over the full vectors (faiss "HNSW{m},Flat")."""

    m: int = 32  # links per node
    ef_construction: int = 40
    ef_search: int = 256  # 128 gave recall@10 0.955 on 1M clustered items: too close to 0.95 (BENCHMARKS.md)


@dataclass
class IndexConfig:
    type: Literal["flat", "ivfpq", "hnsw", "auto"] = "flat"
    reject_fraction: float = 0.0
    auto_threshold: int = 100_000  # auto: flat below this many indexed items, ivfpq from it on
    ivfpq: IvfPqConfig = field(default_factory=IvfPqConfig)
    hnsw: HnswConfig = field(default_factory=HnswConfig)


@dataclass
class EvaluateConfig:
    recall_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    far: list[float] = field(default_factory=lambda: [1e-2, 1e-3, 1e-4])
    rejection_rates: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3])
    rejection_far: float = 1e-3
    random_repeats: int = 5
    # scores are computed for blocks of queries against the whole gallery, never as one query × gallery
    # matrix: a block holds at most this many MB of float32 scores (cmce.metrics)
    block_mb: float = 64.0


@dataclass
class GateConfig:
    """When a changed gallery (grown ensemble, upgraded query model) may replace the served one."""

    metrics: list[str] = field(default_factory=lambda: ["R@1", "MAP@R"])
    tolerance: float = 0.0  # a metric may drop by at most this much (0 = must not drop at all)
    split: str = "test"  # labelled queries the decision is measured on


@dataclass
class LifecycleConfig:
    """Models for the live-gallery operations (lifecycle pipelines and DVC stages)."""

    add_gallery_model: ModelSpec | None = None  # trained as usual, then added to the running ensemble
    new_query_model: ModelSpec | None = None  # trained as usual, then every transformation refitted for it
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/default"
    # where every step computes: auto = CUDA when torch sees a GPU, else the CPU (cmce.device); the CLI's
    # --device flag overrides it
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 256  # inference batch size
    num_threads: int | None = None  # torch CPU threads of every step; None: torch's default (one per core)
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
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - names))  # str: YAML keys may be numbers
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def _validate(cfg: Config, where: str) -> None:
    if not cfg.gallery_models:
        raise ConfigError(f"{where}: gallery_models must list at least one model")
    names = [m.name for m in cfg.all_models()]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: model names must be unique, got {names}")
    for m in cfg.gallery_models:
        if not 0.0 < m.data_fraction <= 1.0:
            raise ConfigError(f"{where}: gallery_models[{m.name}].data_fraction must be in (0, 1]")
    for m in cfg.all_models():
        if not m.backbone_lr_scale > 0.0:
            raise ConfigError(f"{where}: model {m.name!r}: backbone_lr_scale must be > 0, got {m.backbone_lr_scale}")
    for name, epochs in (("train.epochs", cfg.train.epochs), ("transform.epochs", cfg.transform.epochs),
                         ("kd.epochs", cfg.kd.epochs or 1), *((f"{m.name}.epochs", m.epochs or 1)
                                                              for m in cfg.all_models())):
        if epochs < 1:
            raise ConfigError(f"{where}: {name} must be at least 1, got {epochs}")
    if not cfg.train.device_data_gb >= 0:
        raise ConfigError(f"{where}: train.device_data_gb must be >= 0, got {cfg.train.device_data_gb}")
    if cfg.transform.augment_views < 0:
        raise ConfigError(f"{where}: transform.augment_views must be >= 0, got {cfg.transform.augment_views}")
    if not 0.0 <= cfg.transform.input_dropout < 1.0:
        raise ConfigError(f"{where}: transform.input_dropout must be in [0, 1), got {cfg.transform.input_dropout}")
    if not 0.0 < cfg.data.heldout_fraction < 1.0:
        raise ConfigError(f"{where}: data.heldout_fraction must be in (0, 1)")
    if cfg.index.reject_fraction > 0 and len(cfg.gallery_models) < 2:  # one member's uncertainty is 0 everywhere
        raise ConfigError(f"{where}: index.reject_fraction {cfg.index.reject_fraction} rejects by uncertainty, which "
                          f"needs at least 2 gallery models; got {len(cfg.gallery_models)}")
    _validate_index(cfg.index, where)
    _validate_evaluate(cfg.evaluate, where)
    from cmce.metrics import check_metric_name
    from cmce.models import check_arch  # late import: models imports torch

    for name in cfg.lifecycle.gate.metrics:
        try:
            check_metric_name(name)
        except KeyError as err:
            raise ConfigError(f"{where}: lifecycle.gate.metrics: {err.args[0]}") from None
    if cfg.lifecycle.gate.tolerance < 0:
        raise ConfigError(f"{where}: lifecycle.gate.tolerance must be >= 0")
    for m in cfg.all_models():
        try:
            check_arch(m.arch)
        except KeyError as err:
            raise ConfigError(f"{where}: model {m.name!r}: {err.args[0]}") from None


def _validate_evaluate(ev: EvaluateConfig, where: str) -> None:
    """Checked here, so a bad value fails at load time and not after a whole evaluation has run."""
    if not ev.recall_k or any(k < 1 for k in ev.recall_k):
        raise ConfigError(f"{where}: evaluate.recall_k must list ranks >= 1, got {ev.recall_k}")
    if any(not 0.0 < f < 1.0 for f in ev.far):
        raise ConfigError(f"{where}: evaluate.far must be in (0, 1), got {ev.far}")
    if not 0.0 < ev.rejection_far < 1.0:
        raise ConfigError(f"{where}: evaluate.rejection_far must be in (0, 1), got {ev.rejection_far}")
    if any(not 0.0 <= r < 1.0 for r in ev.rejection_rates):
        raise ConfigError(f"{where}: evaluate.rejection_rates must each be in [0, 1), got {ev.rejection_rates}")
    if ev.random_repeats < 1:
        raise ConfigError(f"{where}: evaluate.random_repeats must be at least 1, got {ev.random_repeats}")
    if not ev.block_mb > 0:
        raise ConfigError(f"{where}: evaluate.block_mb must be > 0, got {ev.block_mb}")


def _validate_index(ix: IndexConfig, where: str) -> None:
    if not 0.0 <= ix.reject_fraction < 1.0:
        raise ConfigError(f"{where}: index.reject_fraction must be in [0, 1), got {ix.reject_fraction}")
    positive = {"index.auto_threshold": ix.auto_threshold, "index.ivfpq.nlist": ix.ivfpq.nlist,
                "index.ivfpq.m": ix.ivfpq.m, "index.ivfpq.nprobe": ix.ivfpq.nprobe,
                "index.ivfpq.k_factor": ix.ivfpq.k_factor, "index.ivfpq.train_size": ix.ivfpq.train_size,
                "index.hnsw.m": ix.hnsw.m, "index.hnsw.ef_construction": ix.hnsw.ef_construction,
                "index.hnsw.ef_search": ix.hnsw.ef_search}
    for name, value in positive.items():
        if value is not None and value < 1:  # None: derived from the gallery size at build time
            raise ConfigError(f"{where}: {name} must be at least 1, got {value}")
    if not 1 <= ix.ivfpq.nbits <= 16:
        raise ConfigError(f"{where}: index.ivfpq.nbits must be in [1, 16], got {ix.ivfpq.nbits}")


def config_from_dict(raw: dict[str, Any], where: str = "<config>") -> Config:
    cfg = _build(Config, raw or {}, "")
    _validate(cfg, where)
    return cfg


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (the --set syntax every runner uses) → {dotted key: value read as YAML}."""
    out = {}
    for pair in pairs:
        if not isinstance(pair, str) or "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {value!r} is not valid YAML: {err}") from None
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``train.epochs``) in a raw config mapping; returns the same mapping.

    `gallery_models` given as a list of names selects and orders the gallery models of the mapping by name
    (an unknown name is an error listing the valid ones); given as a list of mappings it replaces them."""
    for dotted, value in overrides.items():
        if dotted == "gallery_models" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            specs = {m.get("name"): m for m in raw.get("gallery_models") or [] if isinstance(m, dict)}
            unknown = [n for n in value if n not in specs]
            if unknown:
                raise ConfigError(f"gallery_models: unknown gallery model(s) {unknown}; valid names: {sorted(specs)}")
            raw["gallery_models"] = [specs[n] for n in value]
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {dotted}: '{p}' is not a mapping")
            node = node[p]
        node[leaf] = value
    return raw


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config; `overrides` maps dotted keys (``train.epochs``) to values."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    apply_overrides(raw, overrides or {})
    try:
        return config_from_dict(raw, str(path))
    except ConfigError as err:
        msg = str(err)  # validation messages already start with the path; structural ones do not
        raise ConfigError(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from None


def resolve_config_text(params_yaml: str, overrides: list[str] = ()) -> str:  # type: ignore[assignment]
    """An orchestrator's run: the params file with its `KEY=VALUE` overrides, validated, as YAML."""
    try:
        raw = yaml.safe_load(params_yaml) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"params: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError("params: top level must be a mapping")
    return to_yaml(config_from_dict(apply_overrides(raw, parse_overrides(list(overrides))), "params"))


def index_config(overrides: dict[str, Any], where: str) -> IndexConfig:
    """The `index` section alone, from defaults and `index.*` overrides, checked as in a config file."""
    raw = apply_overrides({}, overrides).get("index") or {}
    unknown = sorted(k for k in overrides if not k.startswith("index."))
    if unknown:
        raise ConfigError(f"{where}: only index.* settings apply here, got {unknown}")
    ix = _coerce(raw, IndexConfig, "index")
    _validate_index(ix, where)
    return ix
