"""The stage layer: one typed function per pipeline stage, `(cfg, inputs, outputs) -> StepRecord`.

Every runner calls these and nothing else: the CLI subcommands parse arguments into the inputs and
outputs and call one stage; the KFP components resolve their artifacts into them and call one stage; the
DVC stages call the CLI; `run_all` chains them in one process. A stage reads local paths and writes its
outputs, and reports what a tracker should record as a StepRecord; nothing here knows KFP, DVC or MLflow.
Stages that need no setting beyond their inputs take (inputs, outputs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmce import device as devices
from cmce import distributed as ddp
from cmce.argument_paths import is_within, working_folder_under
from cmce.checkpoint import (
    EMBEDDING_FORMAT,
    TRANSFORM_FORMAT,
    EmbeddingModel,
    load_embedding_model,
    require_classes,
    require_role,
)
from cmce.config import Config, IndexConfig, ModelSpec
from cmce.data.loader import WHOLE, Shard, same_split, split_source
from cmce.data.prepare import prepare_dataset
from cmce.data.readers import dataset_info
from cmce.data.sources import fetch_source
from cmce.embed import combine_members, embed_augmented_views, embed_split, embed_with_model, merge_shards
from cmce.evaluate import (
    EVAL_FILES,
    EvalInputs,
    check_recall_k,
    evaluate,
    items_answered_from,
    smallest_own_domain,
)
from cmce.index import INDEX_FILES, build_index, check_index_fits
from cmce.layout import RunLayout, pair_transformations
from cmce.output_checks import check_output, existing_metadata, parquet_kind
from cmce.records import StepRecord, record_model, record_transformation, registry_name, served_versions
from cmce.resume import Resume, file_identity
from cmce.storage import is_remote, named_on_failure, origin, stands_for
from cmce.tables import embedding_array, read_metadata, require_whole, with_metadata, write_table
from cmce.train import no_flip, train_distilled_student, train_embedding_model
from cmce.transform import Transformation, fit_transformation, load_transformation, save_transformation

log = logging.getLogger(__name__)


def model_spec(cfg: Config, name: str) -> ModelSpec:
    specs = {m.name: m for m in cfg.all_models()}
    if name not in specs:
        raise KeyError(f"unknown model {name!r}; models in the config: {sorted(specs)}")
    return specs[name]


def use_device(cfg: Config) -> None:
    """Select the config's device (its CPU thread count when it sets one, deterministic kernels when it asks) for the
    stages that follow."""
    devices.select(cfg.device, "device")
    devices.use_deterministic(cfg.deterministic)
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)


# ---------------------------------------------------------------- data
@dataclass
class FetchOutputs:
    raw_dir: Path


def fetch_data(cfg: Config, out: FetchOutputs) -> StepRecord:
    fetch_source(cfg.data, out.raw_dir)
    return StepRecord("fetch-data", {"source": cfg.data.source})


@dataclass
class PrepareInputs:
    raw_dir: Path | None = None  # a fetch-data folder, or a local source's root; None: data.path
    # a pipeline evaluates on this test split after its training: a vacuous R@K is refused now, not at its end
    will_evaluate: bool = False


@dataclass
class DatasetOutputs:
    dataset: Path


def prepare_data(cfg: Config, inp: PrepareInputs, out: DatasetOutputs) -> StepRecord:
    """The dataset. A vacuous R@K (K ≥ the test split, the gallery of every runner) is refused before the dataset
    is written where a pipeline evaluates next (`will_evaluate`: the KFP and DVC pipelines refused it only at
    their evaluate step, after the training), else said in a warning."""
    def check(counts: dict[str, int]) -> None:
        try:
            check_recall_k(cfg.evaluate.recall_k, counts["test"], "the test split the data settings give",
                           own_image_left_out=True)
            # index settings that cannot index the query space: the pipelines refused them only at build-index,
            # after every model had trained (`cmce run` refuses them here)
            check_index_fits(cfg.index, cfg.query_model.embedding_dim, counts["test"])
        except ValueError as err:
            if inp.will_evaluate:
                raise
            log.warning("%s; evaluate will refuse it", err)  # a dataset made for other uses may serve

    prepare_dataset(cfg.data, out.dataset, cfg.seed, inp.raw_dir, check)
    info = dataset_info(out.dataset)
    return StepRecord("prepare-data", {"data": cfg.data.__dict__, "seed": cfg.seed},
                      {"classes": len(info.get("classes", []))}, inputs=[("dataset", out.dataset)])


# ---------------------------------------------------------------- models
@dataclass
class TrainInputs:
    dataset: Path
    model: str  # a model name of the config: the query model, a gallery model, or a lifecycle model


@dataclass
class ModelOutputs:
    checkpoint: Path


def train_model(cfg: Config, inp: TrainInputs, out: ModelOutputs) -> StepRecord | None:
    """Train one embedding model; the record on the main rank (None on the others under torchrun)."""
    use_device(cfg)
    new_query = cfg.lifecycle.new_query_model
    role = "query" if inp.model in (cfg.query_model.name, new_query and new_query.name) else "gallery"
    train_embedding_model(inp.dataset, model_spec(cfg, inp.model), cfg.data, cfg.train, out.checkpoint, role,
                          cfg.model_key(inp.model))
    if not ddp.is_main():
        return None
    return read_data(record_model(cfg, out.checkpoint, role), inp.dataset)


def read_data(record: StepRecord, dataset: Path, *others: tuple[str, Path]) -> StepRecord:
    """The record with the data sets its step read (the tracker logs them as inputs and versions the run)."""
    record.inputs = [("dataset", dataset), *others]
    return record


@dataclass
class StudentInputs:
    dataset: Path
    teacher: Path  # the gallery model distilled into a query-architecture student


def train_kd_student(cfg: Config, inp: StudentInputs, out: ModelOutputs) -> StepRecord | None:
    """The KD baseline student; nothing (None) when kd.enabled is false or on a non-main rank."""
    use_device(cfg)
    if not cfg.kd.enabled:
        # the config is the one switch for every runner: a DVC stage that always runs stays a no-op
        log.info("kd.enabled is false in the config: no KD student trained, nothing written to %s", out.checkpoint)
        return None
    train_cfg = cfg.train if cfg.kd.augment else type(cfg.train)(**{**cfg.train.__dict__, "augment": False})
    student = ModelSpec(**{**cfg.query_model.__dict__, "seed": cfg.query_model.seed + 1000})
    train_distilled_student(inp.dataset, inp.teacher, student, cfg.data, train_cfg, out.checkpoint, cfg.kd.epochs)
    return read_data(record_model(cfg, out.checkpoint, "kd"), inp.dataset) if ddp.is_main() else None


@dataclass
class FitInputs:
    dataset: Path
    query_model: Path
    gallery_model: Path


@dataclass
class FitOutputs:
    transformation: Path
    train_embeddings: Path | None = None  # the raw train embeddings, kept for a later query-model upgrade


def fit_transform(cfg: Config, inp: FitInputs, out: FitOutputs) -> StepRecord | None:
    """Embed the train split with both frozen models, fit T, save it (and the raw train embeddings).
    Under torchrun every rank embeds the whole split and fits its share of each batch; rank 0 writes."""
    use_device(cfg)
    q_model = require_role(load_embedding_model(inp.query_model), "query", f"--query-model {inp.query_model}")
    g_model = require_role(load_embedding_model(inp.gallery_model), "gallery",
                           f"--gallery-model {inp.gallery_model}")
    q = embed_split(q_model, inp.dataset, "train", cfg.batch_size)
    require_classes(q_model, q.labels, f"--query-model {inp.query_model}")
    g = embed_split(g_model, inp.dataset, "train", cfg.batch_size)
    if q.ids != g.ids:
        raise ValueError(f"{inp.dataset}: train split read in different orders")
    g_fit, q_fit, y_fit = g.embeddings, q.embeddings, q.labels
    if cfg.transform.augment_views:
        (q_aug, g_aug), y_aug = embed_augmented_views([q_model, g_model], inp.dataset, "train",
                                                      cfg.transform.augment_views, cfg.seed, cfg.batch_size,
                                                      cfg.data.hflip)
        g_fit, q_fit, y_fit = (np.concatenate(p) for p in ((g_fit, g_aug), (q_fit, q_aug), (y_fit, y_aug)))
    # the scale the fit uses in the fingerprint: states saved when the default was 16 (not None) still match
    fitted_cfg = dataclasses.replace(cfg.transform, scale=q_model.scale if cfg.transform.scale is None else
                                     cfg.transform.scale)
    resume = Resume.next_to(out.transformation, kind="transformation", transform=fitted_cfg, seed=cfg.seed,
                            batch_size=cfg.batch_size, dataset=file_identity(inp.dataset),
                            query_model=q_model.sha256, gallery_model=g_model.sha256,
                            **(no_flip(cfg.data) if cfg.transform.augment_views else {}))
    mlp, history = fit_transformation(g_fit, q_fit, y_fit, q_model.classifier, cfg.transform, cfg.seed,
                                      f"T[{g_model.name}]", resume, query_scale=q_model.scale)
    t = Transformation(mlp=mlp, gallery_model=g_model.name, gallery_model_sha256=g_model.sha256,
                       query_model_sha256=q_model.sha256, in_dim=g_model.embedding_dim, out_dim=q_model.embedding_dim,
                       hidden_dim=cfg.transform.hidden_dim, depth=cfg.transform.depth, history=history)
    if not ddp.is_main():
        ddp.barrier()  # rank 0 is writing; return when its files are in place
        return None
    save_transformation(t, out.transformation)
    if out.train_embeddings is not None:
        table = pa.table({"id": g.ids, "label": g.labels.astype(np.int32), "raw": embedding_array(g.embeddings),
                          "query": embedding_array(q.embeddings)})
        meta = {"kind": "train_embeddings", "gallery_model": {"name": g_model.name, "sha256": g_model.sha256},
                "query_model_sha256": q_model.sha256}
        write_table(with_metadata(table, meta), out.train_embeddings)
    resume.remove()
    ddp.barrier()
    return read_data(record_transformation(cfg, out.transformation), inp.dataset)


@dataclass
class ExportInputs:
    query_model: Path
    check_dataset: Path | None = None  # check onnxruntime against torch on this dataset's split before writing
    check_index: Path | None = None  # and search this index (the query model's) with both; else the split itself
    split: str = "test"


@dataclass
class ExportOutputs:
    onnx: Path


def export_query(inp: ExportInputs, out: ExportOutputs) -> StepRecord:
    """The query model as an ONNX graph for the edge (raw uint8 pixels in, raw embedding out), registered
    as a version of cmce-query-onnx tagged with the checkpoint's sha256 (the one index files record)."""
    from cmce.export import export_query_model

    result = export_query_model(inp.query_model, out.onnx, inp.check_dataset, inp.check_index, inp.split)
    meta = result.metadata
    metrics: dict[str, float] = {"size_bytes": float(result.size_bytes)}
    if result.parity is not None:
        metrics |= {"max_abs_diff": result.parity.max_abs_diff, "top_k_agreement": result.parity.top_k_agreement}
    params = {"query_model": {"name": meta["query_model_name"], "arch": meta["arch"],
                              "sha256": meta["query_model_sha256"]},
              "onnx_sha256": result.sha256, "parity": result.parity.to_dict() if result.parity else "not checked"}
    return StepRecord("export-query", params, metrics,
                      register=[(registry_name("query-onnx", meta["query_model_name"]), out.onnx,
                                 meta["query_model_sha256"])])


# ---------------------------------------------------------------- the gallery
@dataclass
class MemberInputs:
    dataset: Path
    query_model: Path
    gallery_model: Path
    transformation: Path
    batch_size: int = 256
    shard: Shard = WHOLE
    workers: int = 0  # image-decoding worker processes


@dataclass
class GalleryOutputs:
    gallery: Path  # a gallery file, or for embed_member the per-model file


def embed_member(inp: MemberInputs, out: GalleryOutputs) -> StepRecord:
    """One gallery model (and its T) over the test split, or one shard of it → a per-model file."""
    q_sha = load_embedding_model(inp.query_model).sha256
    embed_with_model(inp.dataset, inp.gallery_model, inp.transformation, q_sha, out.gallery, "test", inp.batch_size,
                     inp.shard, inp.workers)
    meta = read_metadata(out.gallery)
    return StepRecord(f"embed-{meta['gallery_model']['name']}", {"member": meta},
                      {"rows": pq.ParquetFile(out.gallery).metadata.num_rows}, inputs=[("dataset", inp.dataset)])


@dataclass
class EnsembleInputs:
    dataset: Path
    query_model: Path
    gallery_models: list[Path]
    transformations: list[Path]  # any order: each is matched to its gallery model by content hash
    batch_size: int = 256
    shard: Shard = WHOLE
    workers: int = 0


@dataclass
class EnsembleOutputs:
    gallery: Path
    members_dir: Path  # the per-model files


def check_serves(gallery_meta: dict, gallery: Path, query_model: Path) -> EmbeddingModel:
    """Before any work: the gallery was transformed for `query_model` (a new member must be too), which is returned.
    Another query model was refused only once T was fitted and the whole gallery embedded, naming a working file."""
    q_model = require_role(load_embedding_model(query_model), "query", f"--query-model {origin(query_model)}")
    served = gallery_meta.get("query_model_sha256")
    if served is not None and served != q_model.sha256:
        raise ValueError(f"--query-model {origin(query_model)}: query model {q_model.sha256[:12]}, but the gallery "
                         f"{origin(gallery)} was transformed for query model {served[:12]}: give the query model it "
                         "serves (upgrade-query-model moves a gallery to another)")
    return q_model


def check_new_members(query_model: Path, gallery_models: list[Path], taken: dict[str, str] | None = None
                      ) -> list[str]:
    """Before any work: each gallery model is not the query model, and its name is not taken (by another of them,
    or in `taken`: name → where). A clash found after the embedding would leave files of a failed step behind.
    Returns their names."""
    from cmce.storage import file_sha256

    query_sha = file_sha256(query_model)
    seen = dict(taken or {})
    for path in gallery_models:
        model = require_role(load_embedding_model(path), "gallery", f"--gallery-model {origin(path)}")
        if model.sha256 == query_sha:
            raise ValueError(f"--gallery-model {origin(path)}: is the query model itself, not a gallery model")
        if model.name in seen:
            raise ValueError(f"{path}: a gallery model named {model.name!r} is already in {seen[model.name]}")
        seen[model.name] = str(path)
    return [name for name in seen if name not in (taken or {})]


def _slice(shard: str) -> str:
    return "the whole split" if shard == str(WHOLE) else f"shard {shard}"


def _index_built(cfg: Config, index: Path | None, gallery: Path) -> Callable[[Path], None] | None:
    """What a lifecycle step runs on its new gallery, written aside: the --index-out index built from it and put
    in place before the gallery is renamed in. Built after the gallery was in place, a failed index (a full disk)
    left the new gallery beside the old index, and a rerun refused the model as already a member."""
    if index is None:
        return None

    def build(written: Path) -> None:
        stands_for(written, origin(gallery))  # messages name the gallery's own path, not its temporary name
        with named_on_failure(index):  # its failures outside its own writes (its folder made, renamed) are its own:
            build_index(written, index, options=cfg.index)  # the gallery's (around this) would take them

    return build


def _check_index_out(cfg: Config, query_dim: int, gallery: Path) -> None:
    """Before a lifecycle step replaces `gallery` (and transformations): its --index-out settings can index the
    gallery's rows in the query space (they were found wrong once the inputs were replaced). The metadata is read
    first: it names the file when it is no Parquet."""
    read_metadata(gallery)
    check_index_fits(cfg.index, query_dim, pq.ParquetFile(gallery).metadata.num_rows)


def embed_gallery(inp: EnsembleInputs, out: EnsembleOutputs) -> StepRecord:
    """Every gallery model over the gallery (or one shard of it), then the ensemble of that slice."""
    if len(inp.gallery_models) != len(inp.transformations):
        raise ValueError("give one transformation per gallery model")
    names = check_new_members(inp.query_model, inp.gallery_models)
    q_sha = load_embedding_model(inp.query_model).sha256
    paired = pair_transformations(inp.gallery_models, inp.transformations)
    for transform in paired:  # every transformation checked before the first model embeds anything
        load_transformation(transform, query_sha256=q_sha)
    # one file per model, named by the model (two checkpoints both called model.pt wrote one file); a file of
    # another kind there (stored train embeddings, say) is refused before anything is embedded
    files = [out.members_dir / f"{name}.parquet" for name in names]
    for member in files:
        where = origin(member)  # an s3:// folder's file is a scratch file here: its object is what gets replaced
        check_output(where, writes="parquet", kinds=("gallery_member",))
        # named by model alone: shards embedded into one folder replaced each other's files without a word
        meta = existing_metadata(where)
        if meta is not None and (held := meta.get("shard", str(WHOLE))) != str(inp.shard):
            raise ValueError(f"{where}: holds {_slice(held)} of its model's embeddings, this run writes "
                             f"{_slice(str(inp.shard))}; give each shard its own --members-dir")
    members = []
    for model, transform, member in zip(inp.gallery_models, paired, files, strict=True):
        embed_member(MemberInputs(inp.dataset, inp.query_model, model, transform, inp.batch_size, inp.shard,
                                  inp.workers), GalleryOutputs(member))
        members.append(member)
    combine_members(members, out.gallery)
    return StepRecord("embed-gallery", {"members": len(members), "shard": str(inp.shard)},
                      {"rows": pq.ParquetFile(out.gallery).metadata.num_rows}, inputs=[("dataset", inp.dataset)])


@dataclass
class FilesInputs:
    files: list[Path]  # combine: per-model files in ensemble order; merge: shard files in any order


def combine(inp: FilesInputs, out: GalleryOutputs) -> StepRecord:
    combine_members(inp.files, out.gallery)
    return StepRecord("combine", {"members": len(inp.files)}, artifacts=[out.gallery])


def merge(inp: FilesInputs, out: GalleryOutputs) -> StepRecord:
    merge_shards(inp.files, out.gallery)
    return StepRecord("merge", {"shards": len(inp.files)}, {"rows": pq.ParquetFile(out.gallery).metadata.num_rows},
                      artifacts=[out.gallery])


@dataclass
class IndexInputs:
    gallery: Path


@dataclass
class IndexOutputs:
    index: Path


def build_gallery_index(cfg: IndexConfig, inp: IndexInputs, out: IndexOutputs) -> StepRecord:
    """The FAISS index of a gallery (type, rejection and the type's parameters from the index section)."""
    build_index(inp.gallery, out.index, options=cfg)
    meta = json.loads((out.index / "meta.json").read_text())
    params = {k: meta[k] for k in ("index_type", "reject_fraction", "index_params", "search_params")}
    return StepRecord("build-index", params, {"n_indexed": meta["n_indexed"], "n_rejected": meta["n_rejected"]}, [],
                      [out.index], inputs=[("gallery", inp.gallery)])


@dataclass
class EvalOutputs:
    report: Path  # folder: metrics.json, results.md, versions.json, query.parquet, plots


def evaluate_all(cfg: Config, inp: EvalInputs, out: EvalOutputs) -> StepRecord:
    """Every configuration; the record carries the metrics flattened to `configuration/metric`."""
    use_device(cfg)
    return evaluation_record(inp, out, evaluate(inp, cfg.evaluate, out.report, cfg.batch_size, cfg.seed))


def evaluation_record(inp: EvalInputs, out: EvalOutputs, metrics: dict[str, dict[str, float]]) -> StepRecord:
    versions = json.loads((out.report / "versions.json").read_text())
    files = [out.report / f for f in ("metrics.json", "summary.json", "results.md", "versions.json", "recall.png",
                                      "recall.csv", "rejection.png", "rejection.csv")]
    names = [registry_name("query", versions["query_model"]["name"])]
    names += [registry_name(role, m["name"]) for m in versions["members"] for role in ("gallery", "transform")]
    headline = json.loads((out.report / "summary.json").read_text())
    return StepRecord("evaluate", {"evaluated": versions}, flat_metrics(metrics), [], files, versions_of=names,
                      inputs=[("dataset", inp.dataset), ("gallery", inp.gallery)], headline=headline)


def flat_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """{configuration: {metric: value}} → {"configuration/metric": value}, as trackers and KFP want them."""
    return {f"{cfg}/{name}": value for cfg, values in metrics.items() for name, value in values.items()}


# ---------------------------------------------------------------- a live gallery
@dataclass
class AddModelInputs:
    dataset: Path  # its train split fits T, its test split is the gallery
    gallery: Path
    query_model: Path
    gallery_model: Path  # the new member, trained


@dataclass
class AddModelOutputs:
    gallery: Path
    work_dir: Path  # the new transformation and its embeddings
    index: Path | None = None


def add_gallery_model(cfg: Config, inp: AddModelInputs, out: AddModelOutputs) -> StepRecord:
    """Fit T for the new model, embed the gallery with it alone, update the ensemble from the running sum."""
    use_device(cfg)
    from cmce.lifecycle import add_member as grow

    gallery_meta = read_metadata(inp.gallery)
    if gallery_meta.get("kind") != "gallery":  # (a dataset or a member file was refused only once T was fitted and
        # the split embedded, the work files left behind)
        raise ValueError(f"--gallery {origin(inp.gallery)}: a {parquet_kind(inp.gallery) or 'Parquet'} file, not a "
                         "gallery")
    require_whole(gallery_meta, inp.gallery, "add-gallery-model")  # its new member embeds the whole split
    split = gallery_meta.get("split", "test")
    if gallery_meta.get("source") and not same_split(split_source(inp.dataset, split), gallery_meta["source"]):
        # (found only by add_member, once T was fitted and the split embedded over the work files of a former run)
        raise ValueError(f"--dataset {origin(inp.dataset)}: its {split!r} split is not the one {origin(inp.gallery)} "
                         "embeds (other ids or labels): give the dataset the gallery was made from")
    query = check_serves(gallery_meta, inp.gallery, inp.query_model)
    if out.index is not None:
        _check_index_out(cfg, query.embedding_dim, inp.gallery)
    if (transform := _added_before(gallery_meta, inp, out)) is not None:
        return _finish_addition(cfg, inp, out, transform)
    [stem] = check_new_members(inp.query_model, [inp.gallery_model],
                               {m["name"]: str(inp.gallery) for m in gallery_meta.get("members", [])})
    # work files named by the model (a checked identifier), not by its file: two models both saved as model.pt
    # overwrote each other's transformation, train embeddings and member file in one --work-dir; a file of another
    # kind at one of those names (a model, a dataset) is refused before any work, not replaced
    transform, train, member = (out.work_dir / f"{what}_{stem}.{ext}" for what, ext in
                                (("transform", "pt"), ("train", "parquet"), ("member", "parquet")))
    check_output(transform, writes="checkpoint", kinds=(TRANSFORM_FORMAT,))
    check_output(train, writes="parquet", kinds=("train_embeddings",))
    check_output(member, writes="parquet", kinds=("gallery_member",))
    record = fit_transform(cfg, FitInputs(inp.dataset, inp.query_model, inp.gallery_model),
                           FitOutputs(transform, train))
    embed_member(MemberInputs(inp.dataset, inp.query_model, inp.gallery_model, transform, cfg.batch_size),
                 GalleryOutputs(member))
    grow(inp.gallery, member, out.gallery, before_commit=_index_built(cfg, out.index, out.gallery))
    return record


def _added_before(gallery_meta: dict, inp: AddModelInputs, out: AddModelOutputs) -> Path | None:
    """The transformation of an earlier in-place run of this addition that put the new gallery in place but
    stopped before its record was published (killed, or the tracking server down): the gallery holds this model
    with the transformation its work folder still has. A rerun was refused as "already a member", and the
    transformation was never registered, so the served gallery could not be promoted. None otherwise."""
    from cmce.config import MODEL_NAME
    from cmce.storage import file_sha256

    if out.gallery.resolve() != inp.gallery.resolve():  # another gallery asked for: the member is refused
        return None
    # the member by the model file's sha256 (what a member records): the model is loaded once, by check_new_members
    sha = file_sha256(inp.gallery_model)
    member = next((m for m in gallery_meta.get("members", []) if m.get("sha256") == sha), {})
    name = member.get("name")
    if not (isinstance(name, str) and MODEL_NAME.fullmatch(name)):  # names a work file: an identifier only
        return None
    transform = out.work_dir / f"transform_{name}.pt"
    if not transform.is_file():
        return None
    return transform if file_sha256(transform) == member.get("transformation_sha256") else None


def _finish_addition(cfg: Config, inp: AddModelInputs, out: AddModelOutputs, transform: Path) -> StepRecord:
    """What an interrupted addition may have left to do: its record, and its --index-out index (built again: it
    may name another folder than the first, and the same gallery gives the same index)."""
    log.info("%s already holds %s with the transformation in %s (an earlier run of this step): not fitted again; "
             "its record is made again", origin(inp.gallery), transform.stem.removeprefix("transform_"),
             origin(out.work_dir))
    if out.index is not None:
        build_index(inp.gallery, out.index, options=cfg.index)
    return read_data(record_transformation(cfg, transform), inp.dataset)


@dataclass
class MemberFileInputs:
    gallery: Path
    member: Path  # a per-model file (embed_member) of the new gallery model


def add_member(inp: MemberFileInputs, out: GalleryOutputs) -> StepRecord:
    """The gallery plus one model, from the stored running sum; the existing members are not recomputed."""
    from cmce.lifecycle import add_member as grow

    grow(inp.gallery, inp.member, out.gallery)
    return StepRecord("add-member", {"gallery": origin(inp.gallery), "member": origin(inp.member)},
                      {"n_models": float(len(read_metadata(out.gallery)["members"]))}, artifacts=[out.gallery],
                      inputs=[("gallery", inp.gallery)])


@dataclass
class UpgradeInputs:
    dataset: Path  # only its train split is read
    gallery: Path
    query_model: Path  # the new query model
    train_embeddings: list[Path]  # the stored raw train embeddings, one file per member, or folders holding them


@dataclass
class UpgradeOutputs:
    gallery: Path
    transformations: Path  # folder of the refitted transformations
    index: Path | None = None


def upgrade_query_model(cfg: Config, inp: UpgradeInputs, out: UpgradeOutputs) -> StepRecord:
    """Refit every transformation for a new query model from stored embeddings; gallery images unread."""
    use_device(cfg)
    from cmce.lifecycle import train_embedding_files
    from cmce.lifecycle import upgrade_query_model as upgrade

    stored = train_embedding_files(inp.train_embeddings)  # the files of kind train_embeddings in a folder

    fitted_cfg = cfg.transform
    if fitted_cfg.augment_views:  # the gallery models' views of augmented images were never stored
        log.warning("transform.augment_views=%d is not applied by upgrade-query-model: it refits from the stored "
                    "embeddings of the unaugmented train split (no gallery model is run)", fitted_cfg.augment_views)
        fitted_cfg = dataclasses.replace(fitted_cfg, augment_views=0)
    if out.index is not None:  # the gallery and the transformations are replaced before the index is built
        _check_index_out(cfg, load_embedding_model(inp.query_model).embedding_dim, inp.gallery)
    upgrade(inp.gallery, inp.query_model, inp.dataset, stored, fitted_cfg, out.transformations,
            out.gallery, cfg.seed, cfg.batch_size, before_commit=_index_built(cfg, out.index, out.gallery))
    refitted = [record_transformation(cfg, t) for t in sorted(out.transformations.glob("*.pt"))]
    return StepRecord("upgrade-query-model", {"gallery": origin(inp.gallery), "transform": fitted_cfg.__dict__},
                      {f"{r.step}/{k}": v for r in refitted for k, v in r.metrics.items()},
                      register=[reg for r in refitted for reg in r.register],
                      inputs=[("dataset", inp.dataset), ("gallery", inp.gallery),
                              *(("train_embeddings", f) for f in stored)])


@dataclass
class GateInputs:
    dataset: Path  # labelled queries: its lifecycle.gate.split
    baseline_query_model: Path
    baseline_gallery: Path
    query_model: Path
    gallery: Path


@dataclass
class GateOutputs:
    decision: Path  # JSON: baseline, candidate, delta, promoted


def gate(cfg: Config, inp: GateInputs, out: GateOutputs) -> StepRecord:
    """Measure the served gallery and the candidate the same way; promote only without regression (the
    record then names the versions whose `production` alias moves)."""
    use_device(cfg)
    from cmce.promotion import decide, gate_measures, served_metrics
    from cmce.storage import write_text

    g = cfg.lifecycle.gate
    ks, fars = gate_measures(cfg)

    def measured(query: Path, gallery: Path) -> dict[str, float]:  # as served: without what its index rejects
        return served_metrics(inp.dataset, query, gallery, g.split, ks, fars, cfg.batch_size, cfg.evaluate.block_mb,
                              cfg.index.reject_fraction)

    # measured first: each gallery must be its whole split before its size means anything
    baseline = measured(inp.baseline_query_model, inp.baseline_gallery)
    candidate = measured(inp.query_model, inp.gallery)
    splits = {p: read_metadata(p)["split"] for p in (inp.baseline_gallery, inp.gallery)}
    rejected = {inp.baseline_gallery: int(baseline["rejected"]), inp.gallery: int(candidate["rejected"])}
    smallest = min(items_answered_from(pq.ParquetFile(p).metadata.num_rows - rejected[p],
                                       own_image_left_out=split == g.split,
                                       own_domain_items=smallest_own_domain(inp.dataset, split))
                   for p, split in splits.items())
    vacuous = [m for m in g.metrics if m.startswith("R@") and int(m[2:]) >= smallest]
    if vacuous:  # every query finds a match within K items of a gallery no bigger than K: any candidate passes
        less = ", and the items its index rejects" if any(rejected.values()) else ""
        raise ValueError(f"lifecycle.gate.metrics: {vacuous} cannot regress where a query is answered from "
                         f"{smallest} gallery items (its own image left out where the queries are the gallery's"
                         f"{less}); gate on a smaller K")
    decision = decide(baseline, candidate, g.metrics, g.tolerance)
    report = {**decision.to_dict(), "baseline_gallery": origin(inp.baseline_gallery),
              "candidate_gallery": origin(inp.gallery), "reject_fraction": cfg.index.reject_fraction,
              "rejected": {"baseline": rejected[inp.baseline_gallery], "candidate": rejected[inp.gallery]}}
    write_text(out.decision, json.dumps(report, indent=2, sort_keys=True) + "\n")
    # promoted: the served versions move to `production`, and the query model's ONNX export and pyfunc with them
    served = served_versions(inp.gallery) if decision.promoted else []
    # the measured verdict only: whether an alias moves is decided on publishing (a line saying "promoted" preceded
    # "not moving @production" and a decision file saying promoted: false)
    verdict = "no regression" if decision.promoted else f"NOT promoted (regressed: {decision.regressed})"
    log.info("gate: %s; %s", verdict, ", ".join(f"{m} {decision.baseline[m]:.4f} → {decision.candidate[m]:.4f}"
                                                 for m in decision.metrics))
    return StepRecord("gate", {"gate": g.__dict__, "reject_fraction": cfg.index.reject_fraction,
                               "baseline_gallery": report["baseline_gallery"],
                               "candidate_gallery": report["candidate_gallery"], "regressed": decision.regressed},
                      decision.flat(), [], [out.decision], promote=served,
                      promote_from=served_versions(inp.baseline_gallery) if served else [],
                      promote_along=[(registry_name(role, ""), sha) for name, sha in served
                                     if name == registry_name("query", "") for role in ("query-onnx", "query-pyfunc")],
                      inputs=[("dataset", inp.dataset), ("gallery", inp.gallery)], decision=out.decision)


# ---------------------------------------------------------------- the whole run in one process
def check_run_folder(cfg: Config) -> None:
    """output_dir is a folder the run can write into, as `--out` of every other step is checked: not the working
    folder nor one holding it, not inside data.path, nor data.path inside a folder the run writes; a file there
    or above it is named (the first write under it failed with a bare `Not a directory` about a path the user
    never gave). In run_all, not the CLI alone: the benchmarks call it directly."""
    out = cfg.output_dir
    if (held := working_folder_under(out)) is not None:
        raise ValueError(f"output_dir: {out} {'is' if held == Path('.') else 'holds'} the working folder; give a "
                         "folder for the run's outputs")
    if is_remote(out):
        return
    if cfg.data.path and is_within(out, cfg.data.path):
        # the run's folders landed among the class folders; the next run read them as classes
        raise ValueError(f"output_dir: {out} is inside data.path {cfg.data.path}, the data it reads; give a folder "
                         "outside it")
    if cfg.data.path and any(is_within(cfg.data.path, str(f)) for f in RunLayout(Path(out)).written_folders()):
        # `data.path=<output_dir>/data`: the run wrote its dataset among the ImageFolder's class folders
        raise ValueError(f"data.path: {cfg.data.path} is inside a folder the run writes in output_dir {out}; keep "
                         "the data outside it")
    existing = Path(out).absolute()
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == Path(out).absolute() else f"cannot be created: {existing} is a file"
        raise ValueError(f"output_dir: {out} {where}; give a folder for the run's outputs")


def _refuse_other_members(lay: RunLayout, cfg: Config) -> None:
    """A transformation or member file of a gallery model the config no longer has would be read by the
    documented follow-ups (`--transform-dir`, `--members-dir`) as part of this run: refused before any work."""
    names = {g.name for g in cfg.gallery_models}
    for folder, suffix in ((lay.transforms_dir, ".pt"), (lay.members_dir, ".parquet")):
        stale = sorted(p.name for p in folder.glob(f"*{suffix}") if p.stem not in names) if folder.is_dir() else []
        if stale:
            raise ValueError(f"{folder}: holds {', '.join(stale)}, of gallery models this config does not have "
                             f"({sorted(names)}); remove them, or give another output_dir")


def _check_run_outputs(lay: RunLayout, cfg: Config, prepare: bool, keep: Collection[str]) -> None:
    """Each file the run writes, checked as the step writing it alone checks its --out: a dataset at a member's
    path was replaced by the member file, and a folder at a model's path failed once the query model had trained.
    An s3:// run (its scratch copy here) is checked where it is uploaded: the copy is empty."""
    model, parquet = {"writes": "checkpoint", "kinds": (EMBEDDING_FORMAT,)}, "parquet"
    planned: list[tuple[Path, dict]] = [(lay.dataset, {"writes": parquet, "kinds": ("dataset",)})] if prepare else []
    if cfg.query_model.name not in keep:
        planned.append((lay.model(cfg.query_model.name), model))
    for g in (g.name for g in cfg.gallery_models if g.name not in keep):
        planned += [(lay.model(g), model),
                    (lay.transformation(g), {"writes": "checkpoint", "kinds": (TRANSFORM_FORMAT,)}),
                    (lay.train_embeddings(g), {"writes": parquet, "kinds": ("train_embeddings",)}),
                    (lay.member(g), {"writes": parquet, "kinds": ("gallery_member",)}),
                    *([(lay.kd_student(g), model)] if cfg.kd.enabled else [])]
    planned.append((lay.gallery, {"writes": parquet, "kinds": ("gallery",)}))
    for path, kind in planned:
        check_output(origin(path), **kind)


def run_all(cfg: Config, prepare: bool = True, keep: Collection[str] = (),
            publish: Callable[[StepRecord | None], object] | None = None) -> dict:
    """Every stage in one process, in dependency order, under cfg.output_dir; returns the metrics.
    prepare=False uses the dataset file already at the layout's dataset path (e.g. one made by
    cmce.data.prepare.carve_validation). `keep` names models whose outputs are already in place under
    cfg.output_dir, made by this very config (the caller vouches for that): the model and, for a gallery
    model, its transformation, embeddings and KD student are used as they are, not made again.
    `publish` is handed each stage's record as the stage ends (the CLI passes the tracker's)."""
    check_run_folder(cfg)
    use_device(cfg)
    done = publish or (lambda record: None)
    lay = RunLayout(Path(cfg.output_dir), [m.name for m in cfg.gallery_models])
    # the folders replaced whole at the end are checked first: a refusal after the training would leave new
    # models beside the old index and evaluation
    check_output(origin(lay.index), is_dir=True, own=INDEX_FILES)
    check_output(origin(lay.eval_dir), is_dir=True, own=EVAL_FILES)
    _check_run_outputs(lay, cfg, prepare, keep)
    _refuse_other_members(lay, cfg)
    if prepare:
        done(prepare_data(cfg, PrepareInputs(will_evaluate=True), DatasetOutputs(lay.dataset)))
    per_class = ("classes", "class_groups")  # one entry per class: too long for a log line
    log.info("dataset: %s", json.dumps({k: v for k, v in dataset_info(lay.dataset).items() if k not in per_class}))
    # the gallery is the test split: a vacuous R@K is refused now, not after the training
    gallery_items = split_source(lay.dataset, "test")["split_rows"]
    check_recall_k(cfg.evaluate.recall_k, gallery_items, f"the test split of {lay.dataset}", own_image_left_out=True,
                   own_domain_items=smallest_own_domain(lay.dataset, "test"))
    check_index_fits(cfg.index, cfg.query_model.embedding_dim, gallery_items)  # (the gallery lives in query space)
    q_path = lay.model(cfg.query_model.name)
    if cfg.query_model.name not in keep:
        done(train_model(cfg, TrainInputs(lay.dataset, cfg.query_model.name), ModelOutputs(q_path)))
    for g in cfg.gallery_models:
        if g.name in keep:
            log.info("%s: kept as it is under %s", g.name, lay.root)
            continue
        done(train_model(cfg, TrainInputs(lay.dataset, g.name), ModelOutputs(lay.model(g.name))))
        done(fit_transform(cfg, FitInputs(lay.dataset, q_path, lay.model(g.name)),
                           FitOutputs(lay.transformation(g.name), lay.train_embeddings(g.name))))
        done(embed_member(MemberInputs(lay.dataset, q_path, lay.model(g.name), lay.transformation(g.name),
                                       cfg.batch_size), GalleryOutputs(lay.member(g.name))))
        if cfg.kd.enabled:
            done(train_kd_student(cfg, StudentInputs(lay.dataset, lay.model(g.name)),
                                  ModelOutputs(lay.kd_student(g.name))))
    done(combine(FilesInputs([lay.member(g.name) for g in cfg.gallery_models]), GalleryOutputs(lay.gallery)))
    done(build_gallery_index(cfg.index, IndexInputs(lay.gallery), IndexOutputs(lay.index)))
    inputs = EvalInputs(
        dataset=lay.dataset,
        query_model=q_path,
        gallery=lay.gallery,
        transformations=[lay.transformation(g.name) for g in cfg.gallery_models],
        kd_students=[lay.kd_student(g.name) for g in cfg.gallery_models] if cfg.kd.enabled else [],
        index=lay.index,
    )
    metrics = evaluate(inputs, cfg.evaluate, lay.eval_dir, cfg.batch_size, cfg.seed)
    if publish is not None:
        publish(evaluation_record(inputs, EvalOutputs(lay.eval_dir), metrics))
    return metrics
