"""One KFP v2 component per stage. Each body resolves its artifacts into the stage's inputs and outputs,
calls the stage (cmce.stages) and publishes the record (cmce.runner.run_stage); the method lives in the
library.

The resolved config and the MLflow parent run travel as small artifacts (YAML, JSON), not as string
parameters: kfp.local replaces upstream string outputs used inside a ParallelFor with the loop item.
Images: the pipeline sets each task's image (pipeline.cmce_pipeline); the base images here are the
defaults. `install_kfp_package=False`: the images already carry kfp and cmce.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

CPU_IMAGE = "localhost/cmce:cpu"
CUDA_IMAGE = "localhost/cmce:cuda"


# the return type is spelled inline: KFP runs the function's own source, where only typing's names exist
@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def resolve_config(params_yaml: str, overrides: list, config: Output[Artifact]) -> NamedTuple(  # noqa: UP014
        "Resolved", [("kd_enabled", bool), ("query_model", str), ("add_gallery_model", str), ("new_query_model", str)]):
    """The params file with the run's KEY=VALUE overrides, validated (a bad value fails the run here); whether
    the KD baseline runs, and the names of the models the pipelines train outside their loops."""
    from typing import NamedTuple

    from cmce.config import load_config, resolve_config_text
    from cmce.storage import write_text

    write_text(config.path, resolve_config_text(params_yaml, overrides))
    cfg = load_config(config.path)
    life = cfg.lifecycle
    out = NamedTuple("Resolved", [("kd_enabled", bool), ("query_model", str),  # noqa: UP014
                                  ("add_gallery_model", str), ("new_query_model", str)])
    return out(cfg.kd.enabled, cfg.query_model.name,
               life.add_gallery_model.name if life.add_gallery_model else "",
               life.new_query_model.name if life.new_query_model else "")


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gallery_model_names(config: Input[Artifact]) -> list:
    """The gallery models of the resolved config, in ensemble order: the items of the per-model loops (kfp.local
    loops over a component's single output, not over one of several)."""
    from cmce.config import load_config

    return [m.name for m in load_config(config.path).gallery_models]


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_tracking(config: Input[Artifact], mlflow_uri: str, run_name: str, tracking: Output[Artifact]):
    """Open the parent MLflow run (none when mlflow_uri is empty); write {uri, run_id}."""
    import json

    from cmce.config import load_config
    from cmce.storage import write_text

    info = {"uri": "", "run_id": ""}
    if mlflow_uri:
        from cmce.tracking import start_parent_run

        info = {"uri": mlflow_uri, "run_id": start_parent_run(mlflow_uri, run_name, load_config(config.path).to_dict())}
    write_text(tracking.path, json.dumps(info))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_data(config: Input[Artifact], tracking: Input[Artifact], dataset: Output[Dataset]):
    from pathlib import Path

    from cmce import stages
    from cmce.config import load_config
    from cmce.runner import run_stage

    run_stage(stages.prepare_data, load_config(config.path), stages.PrepareInputs(will_evaluate=True),
              stages.DatasetOutputs(Path(dataset.path)), tracking=tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train_model(config: Input[Artifact], tracking: Input[Artifact], model_name: str, dataset: Input[Dataset],
                model: Output[Model]):
    from pathlib import Path

    from cmce import stages
    from cmce.config import load_config
    from cmce.runner import run_stage

    run_stage(stages.train_model, load_config(config.path), stages.TrainInputs(Path(dataset.path), model_name),
              stages.ModelOutputs(Path(model.path)), tracking=tracking.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export_query(tracking: Input[Artifact], dataset: Input[Dataset], query_model: Input[Model],
                 edge_model: Output[Model]):
    """The query model as ONNX for the edge, written only when onnxruntime embeds the test split like torch."""
    from pathlib import Path

    from cmce import stages
    from cmce.runner import run_stage

    run_stage(stages.export_query, stages.ExportInputs(Path(query_model.path), Path(dataset.path)),
              stages.ExportOutputs(Path(edge_model.path)), tracking=tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train_kd_student(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
                     members: Input[Artifact], teacher_name: str, student: Output[Model]):
    """The KD baseline for one gallery model, its teacher taken from the members bundle (bundle_members)."""
    from pathlib import Path

    from cmce import stages
    from cmce.config import load_config
    from cmce.layout import bundled_model
    from cmce.runner import run_stage

    teacher = bundled_model(Path(members.path), teacher_name)
    run_stage(stages.train_kd_student, load_config(config.path), stages.StudentInputs(Path(dataset.path), teacher),
              stages.ModelOutputs(Path(student.path)), tracking=tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def fit_transform(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
                  query_model: Input[Model], gallery_model: Input[Model], transformation: Output[Model],
                  train_embeddings: Output[Dataset]):
    from pathlib import Path

    from cmce import stages
    from cmce.config import load_config
    from cmce.runner import run_stage

    run_stage(stages.fit_transform, load_config(config.path),
              stages.FitInputs(Path(dataset.path), Path(query_model.path), Path(gallery_model.path)),
              stages.FitOutputs(Path(transformation.path), Path(train_embeddings.path)), tracking=tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def embed_member(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
                 query_model: Input[Model], gallery_model: Input[Model], transformation: Input[Model],
                 member: Output[Dataset]):
    from pathlib import Path

    from cmce import stages
    from cmce.config import load_config
    from cmce.runner import run_stage

    cfg = load_config(config.path)
    stages.use_device(cfg)
    run_stage(stages.embed_member, stages.MemberInputs(Path(dataset.path), Path(query_model.path),
                                                       Path(gallery_model.path), Path(transformation.path),
                                                       cfg.batch_size),
              stages.GalleryOutputs(Path(member.path)), tracking=tracking.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def shard_list(num_shards: int) -> list:
    """["0/K", ..., "K-1/K"]: the loop items of the embedding fan-out."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    return [f"{i}/{num_shards}" for i in range(num_shards)]


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def bundle_members(config: Input[Artifact], gallery_models: Input[list[Model]], transformations: Input[list[Model]],
                   bundle: Output[Artifact]):
    """Gallery models and their transformations in one folder, in config (ensemble) order
    (cmce.layout.write_member_bundle). A ParallelFor cannot consume another loop's dsl.Collected outputs, so
    the shard loop, the KD students and evaluate read this one artifact instead."""
    from pathlib import Path

    from cmce.config import load_config
    from cmce.layout import bundle_in_config_order

    bundle_in_config_order(load_config(config.path), Path(bundle.path), [Path(m.path) for m in gallery_models],
                           [Path(t.path) for t in transformations])


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def embed_gallery_shard(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
                        query_model: Input[Model], bundle: Input[Artifact], shard: str, workers: int,
                        gallery: Output[Dataset]):
    """One slice of the gallery through every gallery model, and the ensemble of that slice. The per-model files
    are working files: kept beside the artifact, they were left in the pipeline root, outside the task's output."""
    import tempfile
    from pathlib import Path

    from cmce import stages
    from cmce.config import load_config
    from cmce.data.loader import parse_shard
    from cmce.layout import member_bundle
    from cmce.runner import run_stage

    cfg = load_config(config.path)
    stages.use_device(cfg)
    members = member_bundle(Path(bundle.path))
    inputs = stages.EnsembleInputs(Path(dataset.path), Path(query_model.path), [m for _, m, _ in members],
                                   [t for _, _, t in members], cfg.batch_size, parse_shard(shard), workers)
    with tempfile.TemporaryDirectory(prefix="cmce-members-") as members_dir:
        run_stage(stages.embed_gallery, inputs, stages.EnsembleOutputs(Path(gallery.path), Path(members_dir)),
                  tracking=tracking.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge_shards(tracking: Input[Artifact], shards: Input[list[Dataset]], gallery: Output[Dataset]):
    """Concatenate the gallery shards in shard order (read from their metadata, whatever the collected order)."""
    from pathlib import Path

    from cmce import stages
    from cmce.runner import run_stage

    run_stage(stages.merge, stages.FilesInputs([Path(s.path) for s in shards]),
              stages.GalleryOutputs(Path(gallery.path)), tracking=tracking.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def build_index(config: Input[Artifact], tracking: Input[Artifact], gallery: Input[Dataset],
                index: Output[Artifact]):
    from pathlib import Path

    from cmce import stages
    from cmce.config import load_config
    from cmce.runner import run_stage

    run_stage(stages.build_gallery_index, load_config(config.path).index, stages.IndexInputs(Path(gallery.path)),
              stages.IndexOutputs(Path(index.path)), tracking=tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def evaluate(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset], query_model: Input[Model],
             gallery: Input[Dataset], members: Input[Artifact], index: Input[Artifact], metrics: Output[Metrics],
             results: Output[Markdown], report: Output[Artifact], kd_students: Input[list[Model]] = None):
    """Evaluate every configuration (kd/* only when KD students are given); publish the metrics to KFP; close
    the MLflow parent run. With tracking on, the query model and transformations are read back from the
    registry by alias: the library refuses them if another run moved an alias (their hashes would not
    match the gallery's)."""
    import shutil
    from pathlib import Path

    from cmce import stages
    from cmce.config import load_config
    from cmce.evaluate import EvalInputs
    from cmce.layout import member_bundle
    from cmce.registry import registered_checkpoints
    from cmce.runner import run_stage
    from cmce.tracking import TrackingInfo, closing_parent

    cfg, info = load_config(config.path), TrackingInfo.read(tracking.path)
    with closing_parent(info):  # closed FAILED whatever fails, the registry included
        if info.on:
            query, transforms = registered_checkpoints(cfg, info.uri)
        else:
            query, transforms = Path(query_model.path), [t for _, _, t in member_bundle(Path(members.path))]
        inputs = EvalInputs(Path(dataset.path), query, Path(gallery.path), transforms,
                            [Path(s.path) for s in kd_students or []], Path(index.path))
        record = run_stage(stages.evaluate_all, cfg, inputs, stages.EvalOutputs(Path(report.path)), tracking=info)
    for name, value in record.metrics.items():
        metrics.log_metric(name, value)
    shutil.copyfile(Path(report.path) / "results.md", results.path)


# --- live-gallery operations (pipeline/lifecycle.py) ---


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def add_member(tracking: Input[Artifact], gallery: Input[Dataset], member: Input[Dataset],
               new_gallery: Output[Dataset]):
    """New ensemble from the stored running sum plus one per-model file; existing members untouched."""
    from pathlib import Path

    from cmce import stages
    from cmce.runner import run_stage

    run_stage(stages.add_member, stages.MemberFileInputs(Path(gallery.path), Path(member.path)),
              stages.GalleryOutputs(Path(new_gallery.path)), tracking=tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def upgrade_query_model(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
                        gallery: Input[Dataset], query_model: Input[Model], train_embeddings: Input[Dataset],
                        transformations: Output[Model], new_gallery: Output[Dataset]):
    """Refit every transformation for the new query model from stored embeddings (train split only)."""
    from pathlib import Path

    from cmce import stages
    from cmce.config import load_config
    from cmce.runner import run_stage

    run_stage(stages.upgrade_query_model, load_config(config.path),
              stages.UpgradeInputs(Path(dataset.path), Path(gallery.path), Path(query_model.path),
                                   [Path(train_embeddings.path)]),
              stages.UpgradeOutputs(Path(new_gallery.path), Path(transformations.path)), tracking=tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def gate(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
         baseline_query_model: Input[Model], baseline_gallery: Input[Dataset], query_model: Input[Model],
         gallery: Input[Dataset], index: Input[Artifact], metrics: Output[Metrics], decision: Output[Artifact]):
    """Promotion gate; publish its numbers to KFP; close the MLflow parent run. `index` is taken only so the
    gate runs after the candidate's index exists."""
    from pathlib import Path

    from cmce import stages
    from cmce.config import load_config
    from cmce.runner import run_stage
    from cmce.tracking import TrackingInfo, closing_parent

    info = TrackingInfo.read(tracking.path)
    inputs = stages.GateInputs(Path(dataset.path), Path(baseline_query_model.path), Path(baseline_gallery.path),
                               Path(query_model.path), Path(gallery.path))

    def gate(cfg, inputs, outputs):  # noqa: ANN001, ANN202 - the stage, its verdict withheld where no alias can move
        from cmce.promotion import note_unmoved, withhold_unmovable

        record = stages.gate(cfg, inputs, outputs)
        if info.on:
            withhold_unmovable(record, outputs.decision, info.uri)
        else:
            note_unmoved(record, outputs.decision, "the run is not tracked (--no-mlflow)")
        return record

    with closing_parent(info):
        record = run_stage(gate, load_config(config.path), inputs, stages.GateOutputs(Path(decision.path)),
                           tracking=info)
    for name, value in record.metrics.items():
        metrics.log_metric(name, value)
