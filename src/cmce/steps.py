"""One function per pipeline step, composing the concept modules. The CLI, `cmce run` and any
orchestrator call these; nothing here knows about KFP, DVC or MLflow."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from cmce import distributed as ddp
from cmce.checkpoint import load_embedding_model
from cmce.config import Config, ModelSpec
from cmce.data.loader import WHOLE, Shard
from cmce.data.prepare import prepare_dataset
from cmce.data.readers import dataset_info
from cmce.embed import combine_members, embed_augmented_views, embed_split, embed_with_model
from cmce.evaluate import EvalInputs, evaluate
from cmce.index import build_index
from cmce.resume import Resume, file_identity
from cmce.tables import embedding_array, with_metadata, write_table
from cmce.train import train_distilled_student, train_embedding_model
from cmce.transform import Transformation, fit_transformation, save_transformation

log = logging.getLogger(__name__)


@dataclass
class RunLayout:
    """Where `cmce run` puts each artifact under the output directory."""

    root: Path
    gallery_names: list[str] = field(default_factory=list)

    @property
    def dataset(self) -> Path:
        return self.root / "data" / "dataset.parquet"

    def model(self, name: str) -> Path:
        return self.root / "models" / f"{name}.pt"

    def kd_student(self, gallery_name: str) -> Path:
        return self.root / "models" / f"kd_{gallery_name}.pt"

    def transformation(self, name: str) -> Path:
        return self.root / "transforms" / f"{name}.pt"

    def train_embeddings(self, name: str) -> Path:
        return self.root / "embeddings" / "train" / f"{name}.parquet"

    def member(self, name: str) -> Path:
        return self.root / "embeddings" / "gallery" / f"{name}.parquet"

    @property
    def gallery(self) -> Path:
        return self.root / "gallery.parquet"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"


def model_spec(cfg: Config, name: str) -> ModelSpec:
    specs = {m.name: m for m in cfg.all_models()}
    if name not in specs:
        raise KeyError(f"unknown model {name!r}; models in the config: {sorted(specs)}")
    return specs[name]


def step_prepare_data(cfg: Config, out: Path, raw_dir: Path | None = None) -> Path:
    return prepare_dataset(cfg.data, out, cfg.seed, raw_dir)


def member_paths(cfg: Config, members_dir: Path) -> list[Path]:
    """Per-model embedding files named after the gallery models, in config (ensemble) order."""
    return [members_dir / f"{m.name}.parquet" for m in cfg.gallery_models]


def step_train(cfg: Config, dataset: Path, name: str, out: Path) -> Path:
    train_embedding_model(dataset, model_spec(cfg, name), cfg.data, cfg.train, out)
    return out


def step_train_kd(cfg: Config, dataset: Path, teacher: Path, out: Path) -> Path:
    train_cfg = cfg.train
    if not cfg.kd.augment:
        train_cfg = type(cfg.train)(**{**cfg.train.__dict__, "augment": False})
    student = ModelSpec(**{**cfg.query_model.__dict__, "seed": cfg.query_model.seed + 1000})
    train_distilled_student(dataset, teacher, student, cfg.data, train_cfg, out, cfg.kd.epochs)
    return out


def step_fit_transform(
    cfg: Config, dataset: Path, query_model: Path, gallery_model: Path, out: Path, train_embeddings_out: Path | None
) -> Path:
    """Embed the train split with both frozen models, fit T, save it (and the raw train embeddings).
    Under torchrun every rank embeds the whole split and fits its share of each batch; rank 0 writes."""
    q_model = load_embedding_model(query_model)
    g_model = load_embedding_model(gallery_model)
    q = embed_split(q_model, dataset, "train", cfg.batch_size)
    g = embed_split(g_model, dataset, "train", cfg.batch_size)
    if q.ids != g.ids:
        raise ValueError(f"{dataset}: train split read in different orders")
    g_fit, q_fit, y_fit = g.embeddings, q.embeddings, q.labels
    if cfg.transform.augment_views:
        (q_aug, g_aug), y_aug = embed_augmented_views([q_model, g_model], dataset, "train",
                                                      cfg.transform.augment_views, cfg.seed, cfg.batch_size)
        g_fit, q_fit, y_fit = (np.concatenate(p) for p in ((g_fit, g_aug), (q_fit, q_aug), (y_fit, y_aug)))
    resume = Resume.next_to(out, kind="transformation", transform=cfg.transform, seed=cfg.seed,
                            batch_size=cfg.batch_size, dataset=file_identity(dataset), query_model=q_model.sha256,
                            gallery_model=g_model.sha256)
    mlp, history = fit_transformation(
        g_fit, q_fit, y_fit, q_model.classifier, cfg.transform, cfg.seed, f"T[{g_model.name}]", resume
    )
    t = Transformation(
        mlp=mlp,
        gallery_model=g_model.name,
        gallery_model_sha256=g_model.sha256,
        query_model_sha256=q_model.sha256,
        in_dim=g_model.embedding_dim,
        out_dim=q_model.embedding_dim,
        hidden_dim=cfg.transform.hidden_dim,
        depth=cfg.transform.depth,
        history=history,
    )
    if not ddp.is_main():
        ddp.barrier()  # rank 0 is writing; return when its files are in place
        return out
    save_transformation(t, out)
    if train_embeddings_out is not None:
        table = pa.table(
            {
                "id": g.ids,
                "label": g.labels.astype(np.int32),
                "raw": embedding_array(g.embeddings),
                "query": embedding_array(q.embeddings),
            }
        )
        meta = {
            "kind": "train_embeddings",
            "gallery_model": {"name": g_model.name, "sha256": g_model.sha256},
            "query_model_sha256": q_model.sha256,
        }
        write_table(with_metadata(table, meta), train_embeddings_out)
    resume.remove()
    ddp.barrier()
    return out


def step_embed_member(dataset: Path, query_model: Path, gallery_model: Path, transform: Path, out: Path,
                      batch_size: int, shard: Shard = WHOLE, workers: int = 0) -> Path:
    q_sha = load_embedding_model(query_model).sha256
    return embed_with_model(dataset, gallery_model, transform, q_sha, out, "test", batch_size, shard, workers)


def pair_transformations(gallery_models: list[Path], transformations: list[Path]) -> list[Path]:
    """The transformation of each gallery model, in the models' order, matched by the model's sha256
    (orchestrators may hand both lists over in different orders)."""
    from cmce.storage import file_sha256
    from cmce.transform import load_transformation

    by_sha = {load_transformation(t).gallery_model_sha256: t for t in transformations}
    out = []
    for m in gallery_models:
        sha = file_sha256(m)
        if sha not in by_sha:
            raise ValueError(f"{m}: no transformation among {[str(t) for t in transformations]} was fitted for it")
        out.append(by_sha[sha])
    return out


def write_member_bundle(out: Path, names: list[str], models: list[Path], transformations: list[Path]) -> None:
    """Gallery models (in ensemble order, named `names`) and their transformations (any order) copied into one
    new folder as <i>_<name>.pt and <i>_<name>.transform.pt, for orchestrator tasks that need every member."""
    import shutil

    out.mkdir(parents=True)
    for i, (name, model, transform) in enumerate(zip(names, models, pair_transformations(models, transformations),
                                                     strict=True)):
        shutil.copyfile(model, out / f"{i}_{name}.pt")
        shutil.copyfile(transform, out / f"{i}_{name}.transform.pt")


def member_bundle(folder: Path) -> list[tuple[str, Path, Path]]:
    """The members of a `write_member_bundle` folder in ensemble order (by index, so 10 follows 9):
    (name, model, transformation)."""
    models = [p for p in folder.glob("*.pt") if not p.name.endswith(".transform.pt")]
    indexed = sorted((int(p.name.split("_", 1)[0]), p.name.split("_", 1)[1].removesuffix(".pt"), p) for p in models)
    return [(name, model, model.with_suffix(".transform.pt")) for _, name, model in indexed]


def step_combine(members: list[Path], out: Path) -> Path:
    return combine_members(list(members), out)


def step_build_index(cfg: Config, gallery: Path, out: Path) -> Path:
    return build_index(gallery, out, options=cfg.index)


def step_evaluate(cfg: Config, inputs: EvalInputs, out: Path) -> dict:
    return evaluate(inputs, cfg.evaluate, out, cfg.batch_size, cfg.seed)


def step_gallery_branch(cfg: Config, lay: RunLayout, query_model: Path, name: str) -> Path:
    """One gallery model's branch: train it, fit its transformation, embed the gallery with it."""
    step_train(cfg, lay.dataset, name, lay.model(name))
    step_fit_transform(cfg, lay.dataset, query_model, lay.model(name), lay.transformation(name),
                       lay.train_embeddings(name))
    return step_embed_member(lay.dataset, query_model, lay.model(name), lay.transformation(name), lay.member(name),
                             cfg.batch_size)


def run_all(cfg: Config, prepare: bool = True, keep: Collection[str] = ()) -> dict:
    """Every step in one process, in dependency order, under cfg.output_dir. prepare=False uses the
    dataset file already at the layout's dataset path (e.g. one made by cmce.data.prepare.carve_validation).
    `keep` names models whose outputs are already in place under cfg.output_dir, made by this very config
    (the caller vouches for that): the model and, for a gallery model, its transformation, embeddings and
    KD student are used as they are, not made again."""
    lay = RunLayout(Path(cfg.output_dir), [m.name for m in cfg.gallery_models])
    if prepare:
        step_prepare_data(cfg, lay.dataset)
    per_class = ("classes", "class_groups")  # one entry per class: too long for a log line
    log.info("dataset: %s", json.dumps({k: v for k, v in dataset_info(lay.dataset).items() if k not in per_class}))
    q_path = lay.model(cfg.query_model.name)
    if cfg.query_model.name not in keep:
        step_train(cfg, lay.dataset, cfg.query_model.name, q_path)
    for g in cfg.gallery_models:
        if g.name in keep:
            log.info("%s: kept as it is under %s", g.name, lay.root)
            continue
        step_gallery_branch(cfg, lay, q_path, g.name)
        if cfg.kd.enabled:
            step_train_kd(cfg, lay.dataset, lay.model(g.name), lay.kd_student(g.name))
    step_combine([lay.member(g.name) for g in cfg.gallery_models], lay.gallery)
    step_build_index(cfg, lay.gallery, lay.index)
    inputs = EvalInputs(
        dataset=lay.dataset,
        query_model=q_path,
        gallery=lay.gallery,
        transformations=[lay.transformation(g.name) for g in cfg.gallery_models],
        kd_students=[lay.kd_student(g.name) for g in cfg.gallery_models] if cfg.kd.enabled else [],
    )
    return step_evaluate(cfg, inputs, lay.eval_dir)


@dataclass
class StepRecord:
    """What a step reports to a tracker: kept free of any tracking library."""

    step: str
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    artifacts: list[Path] = field(default_factory=list)
    register: list[tuple[str, Path, str]] = field(default_factory=list)  # (registered name, checkpoint, sha256)
    versions_of: list[str] = field(default_factory=list)  # registered models whose current version to record
    promote: list[tuple[str, str]] = field(default_factory=list)  # (registered name, sha256) to move `production` to


def registry_name(role: str, name: str) -> str:
    """Registered-model name: cmce-query for any query model (an upgraded query model is a new version
    of the same registered model), cmce-<role>-<name> otherwise."""
    return "cmce-query" if role == "query" else f"cmce-{role}-{name}"


def registered_uris(cfg: Config, alias: str = "candidate") -> dict[str, list[str]]:
    """`models:/NAME@ALIAS` URIs of the query model and of every transformation in the config."""
    return {
        "query_model": [f"models:/{registry_name('query', cfg.query_model.name)}@{alias}"],
        "transformations": [f"models:/{registry_name('transform', m.name)}@{alias}" for m in cfg.gallery_models],
    }


def record_model(cfg: Config, path: Path, role: str) -> StepRecord:
    m = load_embedding_model(path)
    spec = {"arch": m.arch, "embedding_dim": m.embedding_dim, "sha256": m.sha256}
    params = {"model": spec, "train": cfg.train.__dict__}
    register = [] if role == "kd" else [(registry_name(role, m.name), path, m.sha256)]
    return StepRecord(f"train-{m.name}", params, {"final_" + k: v for k, v in m.meta["history"][-1].items()},
                      m.meta["history"], [], register)


def record_transformation(cfg: Config, path: Path) -> StepRecord:
    from cmce.transform import load_transformation

    t = load_transformation(path)
    final = {f"final_{k}": v for k, v in t.history[-1].items() if k != "epoch"}
    return StepRecord(f"fit-transform-{t.gallery_model}", {"transform": cfg.transform.__dict__, "sha256": t.sha256},
                      final, t.history, [], [(registry_name("transform", t.gallery_model), path, t.sha256)])


def served_versions(gallery: Path) -> list[tuple[str, str]]:
    """(registered name, sha256) of every model a gallery file is served with: the query model, each
    gallery model and its transformation."""
    from cmce.tables import read_metadata

    meta = read_metadata(gallery)
    out = [(registry_name("query", ""), meta["query_model_sha256"])]
    for m in meta["members"]:
        out += [(registry_name("gallery", m["name"]), m["sha256"]),
                (registry_name("transform", m["name"]), m["transformation_sha256"])]
    return out
