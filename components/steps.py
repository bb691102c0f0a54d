"""One KFP v2 component per step. Each body is a single call into the cmce CLI (cmce.cli.run_step):
the method lives in the library; a component only maps typed artifacts to paths.

The resolved config and the MLflow parent run travel as small artifacts (YAML, JSON), not as string
parameters: kfp.local replaces upstream string outputs used inside a ParallelFor with the loop item.
Images: the CUDA image for the steps that run models (training, fitting T, embedding, evaluation: each
picks the GPU of its pod by itself, cmce.device), the CPU image for the rest; override with CMCE_CPU_IMAGE /
CMCE_CUDA_IMAGE at compile time. `install_kfp_package=False`: the images already carry kfp and cmce.
"""

import os

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

CPU_IMAGE = os.environ.get("CMCE_CPU_IMAGE", "localhost/cmce:cpu")
CUDA_IMAGE = os.environ.get("CMCE_CUDA_IMAGE", "localhost/cmce:cuda")


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def resolve_config(params_yaml: str, gallery_models: list, epochs: int, lam: float, reject_fraction: float,
                   index_type: str, protocol: str, dataset: str, config: Output[Artifact]) -> bool:
    """Merge the run parameters into the params file; fail early on an invalid config. Returns
    kd.enabled: the pipeline's KD-baseline branch runs only when it is true."""
    from cmce.config import load_config, resolve_config_text
    from cmce.storage import write_text

    write_text(config.path, resolve_config_text(params_yaml, gallery_models, epochs, lam, reject_fraction,
                                                index_type, protocol, dataset))
    return load_config(config.path).kd.enabled


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_tracking(config: Input[Artifact], mlflow_uri: str, run_name: str, tracking: Output[Artifact]):
    """Open the parent MLflow run (none when mlflow_uri is empty); write {uri, run_id}."""
    import json

    from cmce.cli import run_step
    from cmce.storage import write_text

    if mlflow_uri:
        run_step(["track-start", "--mlflow-uri", mlflow_uri, "--name", run_name, "--out", tracking.path], config.path)
    else:
        write_text(tracking.path, json.dumps({"uri": "", "run_id": ""}))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_data(config: Input[Artifact], tracking: Input[Artifact], dataset: Output[Dataset]):
    from cmce.cli import run_step

    run_step(["prepare-data", "--out", dataset.path], config.path, tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train_model(config: Input[Artifact], tracking: Input[Artifact], model_name: str, dataset: Input[Dataset],
                model: Output[Model]):
    from cmce.cli import run_step

    run_step(["train", "--dataset", dataset.path, "--model", model_name, "--out", model.path], config.path,
             tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train_kd_student(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
                     members: Input[Artifact], teacher_name: str, student: Output[Model]):
    """The KD baseline for one gallery model, its teacher taken from the members bundle (bundle_members)."""
    from pathlib import Path

    from cmce.cli import run_step
    from cmce.steps import member_bundle

    teachers = [model for name, model, _ in member_bundle(Path(members.path)) if name == teacher_name]
    if len(teachers) != 1:
        raise FileNotFoundError(f"{members.path}: no gallery model named {teacher_name!r} in the members bundle")
    run_step(["train", "--dataset", dataset.path, "--kd-teacher", str(teachers[0]), "--out", student.path],
             config.path, tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def fit_transform(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
                  query_model: Input[Model], gallery_model: Input[Model], transformation: Output[Model],
                  train_embeddings: Output[Dataset]):
    from cmce.cli import run_step

    run_step(["fit-transform", "--dataset", dataset.path, "--query-model", query_model.path, "--gallery-model",
              gallery_model.path, "--out", transformation.path, "--train-embeddings-out", train_embeddings.path],
             config.path, tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def embed_member(tracking: Input[Artifact], dataset: Input[Dataset], query_model: Input[Model],
                 gallery_model: Input[Model], transformation: Input[Model], member: Output[Dataset]):
    from cmce.cli import run_step

    run_step(["embed-member", "--dataset", dataset.path, "--query-model", query_model.path, "--gallery-model",
              gallery_model.path, "--transform", transformation.path, "--out", member.path],
             tracking_path=tracking.path)


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
    (cmce.steps.write_member_bundle; read back by cmce.steps.member_bundle). A ParallelFor cannot consume
    another loop's dsl.Collected outputs, so the shard loop, the KD students and evaluate read this one
    artifact instead."""
    from pathlib import Path

    from cmce.checkpoint import load_embedding_model
    from cmce.config import load_config
    from cmce.steps import write_member_bundle

    paths = {load_embedding_model(m.path).name: Path(m.path) for m in gallery_models}
    names = [spec.name for spec in load_config(config.path).gallery_models]
    write_member_bundle(Path(bundle.path), names, [paths[n] for n in names], [Path(t.path) for t in transformations])


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def embed_gallery_shard(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
                        query_model: Input[Model], bundle: Input[Artifact], shard: str, workers: int,
                        gallery: Output[Dataset]):
    """One slice of the gallery through every gallery model, and the ensemble of that slice."""
    from pathlib import Path

    from cmce.cli import run_step
    from cmce.config import load_config
    from cmce.steps import member_bundle

    argv = ["embed-gallery", "--dataset", dataset.path, "--query-model", query_model.path, "--out", gallery.path,
            "--shard", shard, "--workers", str(workers), "--batch-size", str(load_config(config.path).batch_size),
            "--members-dir", str(Path(gallery.path).with_name("members"))]
    for _, model, transform in member_bundle(Path(bundle.path)):
        argv += ["--gallery-model", str(model), "--transform", str(transform)]
    run_step(argv, tracking_path=tracking.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge_shards(tracking: Input[Artifact], shards: Input[list[Dataset]], gallery: Output[Dataset]):
    """Concatenate the gallery shards in shard order (read from their metadata, whatever the collected order)."""
    from cmce.cli import run_step

    run_step(["merge", *[s.path for s in shards], "--out", gallery.path], tracking_path=tracking.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def build_index(config: Input[Artifact], tracking: Input[Artifact], gallery: Input[Dataset],
                index: Output[Artifact]):
    from cmce.cli import run_step

    run_step(["build-index", "--config", config.path, "--gallery", gallery.path, "--out", index.path],
             tracking_path=tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def evaluate(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset], query_model: Input[Model],
             gallery: Input[Dataset], members: Input[Artifact], index: Input[Artifact], metrics: Output[Metrics],
             results: Output[Markdown], report: Output[Artifact], kd_students: Input[list[Model]] = None):
    """Evaluate every configuration (kd/* only when KD students are given); publish the metrics dict to
    KFP; close the MLflow parent run. The transformations come from the members bundle (bundle_members)."""
    import json
    import shutil
    from pathlib import Path

    from cmce.cli import run_step
    from cmce.config import load_config
    from cmce.steps import member_bundle, registered_uris

    info = json.loads(Path(tracking.path).read_text())
    # with tracking on, the query model and transformations are loaded back from the registry by alias
    # (the library refuses them if another run moved an alias: their hashes would not match the gallery)
    if info["run_id"]:
        uris = registered_uris(load_config(config.path))
        query, transforms = uris["query_model"][0], uris["transformations"]
    else:
        query, transforms = query_model.path, [str(t) for _, _, t in member_bundle(Path(members.path))]
    argv = ["evaluate", "--dataset", dataset.path, "--query-model", query, "--gallery", gallery.path,
            "--out", report.path]
    argv += [a for t in transforms for a in ("--transform", t)]
    argv += [a for s in kd_students or [] for a in ("--kd", s.path)]
    try:
        run_step(argv, config.path, tracking.path)
    finally:
        if info["run_id"]:
            ok = (Path(report.path) / "metrics.json").exists()
            run_step(["track-end", "--mlflow-uri", info["uri"], "--mlflow-parent", info["run_id"], "--status",
                      "FINISHED" if ok else "FAILED"])
    values = json.loads((Path(report.path) / "metrics.json").read_text())
    for name, value in values.items():
        for metric, number in value.items():
            metrics.log_metric(f"{name}/{metric}", number)
    shutil.copyfile(Path(report.path) / "results.md", results.path)


# --- live-gallery operations (pipeline/lifecycle.py) ---


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def add_member(tracking: Input[Artifact], gallery: Input[Dataset], member: Input[Dataset],
               new_gallery: Output[Dataset]):
    """New ensemble from the stored running sum plus one per-model file; existing members untouched."""
    from cmce.cli import run_step

    run_step(["add-member", "--gallery", gallery.path, "--member", member.path, "--out", new_gallery.path],
             tracking_path=tracking.path)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def upgrade_query_model(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
                        gallery: Input[Dataset], query_model: Input[Model], train_embeddings: Input[Dataset],
                        transformations: Output[Model], new_gallery: Output[Dataset]):
    """Refit every transformation for the new query model from stored embeddings (train split only)."""
    from cmce.cli import run_step

    run_step(["upgrade-query-model", "--dataset", dataset.path, "--gallery", gallery.path, "--query-model",
              query_model.path, "--train-embeddings", train_embeddings.path, "--transforms-out",
              transformations.path, "--out", new_gallery.path], config.path, tracking.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gate(config: Input[Artifact], tracking: Input[Artifact], dataset: Input[Dataset],
         baseline_query_model: Input[Model], baseline_gallery: Input[Dataset], query_model: Input[Model],
         gallery: Input[Dataset], index: Input[Artifact], metrics: Output[Metrics], decision: Output[Artifact]):
    """Promotion gate; publish its numbers to KFP; close the MLflow parent run. `index` is taken only
    so the gate runs after the candidate's index exists."""
    import json
    from pathlib import Path

    from cmce.cli import run_step

    info = json.loads(Path(tracking.path).read_text())
    argv = ["gate", "--dataset", dataset.path, "--baseline-query-model", baseline_query_model.path,
            "--baseline-gallery", baseline_gallery.path, "--query-model", query_model.path, "--gallery",
            gallery.path, "--out", decision.path]
    try:
        run_step(argv, config.path, tracking.path)
    finally:
        if info["run_id"]:
            status = "FINISHED" if Path(decision.path).exists() else "FAILED"
            run_step(["track-end", "--mlflow-uri", info["uri"], "--mlflow-parent", info["run_id"], "--status", status])
    result = json.loads(Path(decision.path).read_text())
    metrics.log_metric("promoted", float(result["promoted"]))
    for side in ("baseline", "candidate", "delta"):
        for name, value in result[side].items():
            metrics.log_metric(f"{side}/{name}", value)
