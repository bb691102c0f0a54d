"""The cmce pipeline as a KFP v2 pipeline function: per gallery model in parallel (train → fit
transformation); then per gallery shard in parallel (every gallery model on that slice, and its ensemble),
and, when kd.enabled, the KD baseline students per gallery model; merged into one gallery → index →
evaluation."""


import json
import os
from pathlib import Path

import yaml
from kfp import dsl

from components.steps import (
    build_index,
    bundle_members,
    embed_gallery_shard,
    evaluate,
    fit_transform,
    merge_shards,
    prepare_data,
    resolve_config,
    shard_list,
    start_tracking,
    train_kd_student,
    train_model,
)

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "params.yaml"
_PARAMS = yaml.safe_load(PARAMS_FILE.read_text())
# one line of JSON (valid YAML): the compiler echoes defaults into comment lines, where a newline breaks the file
DEFAULT_PARAMS = json.dumps(_PARAMS)
DEFAULT_GALLERY = [m["name"] for m in _PARAMS["gallery_models"]]
DEFAULT_QUERY = _PARAMS["query_model"]["name"]
# the tasks that run models (training, KD students, fitting T, embedding the gallery, evaluation) request one GPU
# and run the CUDA image, where each step uses it by itself (cmce.device); compile with CMCE_GPU=0 for a
# CPU-only cluster
GPU = os.environ.get("CMCE_GPU", "1") != "0"


def _resources(task: dsl.PipelineTask, cpu: str, memory: str, gpu: bool = False) -> dsl.PipelineTask:
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    if gpu:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    return task


def make_pipeline(parallelism: int = 0):
    """Build the pipeline; `parallelism` caps concurrent gallery-model branches and concurrent gallery
    shards (0 = no cap). kfp.local runs branches concurrently, so a one-machine run wants 1: parallel
    processes only fight over the same cores."""

    @dsl.pipeline(name="cmce", description="Asymmetric retrieval with cross-model compatible ensembles")
    def cmce_pipeline(
        params_yaml: str = DEFAULT_PARAMS,
        query_model: str = DEFAULT_QUERY,
        gallery_models: list = DEFAULT_GALLERY,
        epochs: int = 0,
        lam: float = -1.0,
        reject_fraction: float = -1.0,
        index_type: str = "",
        protocol: str = "",
        dataset: str = "",
        mlflow_uri: str = "",
        run_name: str = "cmce",
        embed_shards: int = 1,
        embed_workers: int = 0,
    ):
        """Parameters left at 0 / -1 / "" keep the value in params_yaml (the same params.yaml DVC reads).
        `embed_shards` slices the gallery for the embedding fan-out; `embed_workers` image-decoding
        processes per shard task."""
        cfg = resolve_config(params_yaml=params_yaml, gallery_models=gallery_models, epochs=epochs, lam=lam,
                             reject_fraction=reject_fraction, index_type=index_type, protocol=protocol, dataset=dataset)
        config = cfg.outputs["config"]
        track = start_tracking(config=config, mlflow_uri=mlflow_uri, run_name=run_name).outputs["tracking"]
        data = _resources(prepare_data(config=config, tracking=track), "1", "4Gi").outputs["dataset"]
        query = train_model(config=config, tracking=track, model_name=query_model, dataset=data)
        _resources(query.set_display_name("train-query-model"), "4", "8Gi", gpu=GPU)

        with dsl.ParallelFor(gallery_models, name="gallery-models", parallelism=parallelism) as name:
            gallery = train_model(config=config, tracking=track, model_name=name, dataset=data)
            _resources(gallery.set_display_name("train-gallery-model"), "4", "16Gi", gpu=GPU)
            transform = fit_transform(config=config, tracking=track, dataset=data, query_model=query.outputs["model"],
                                      gallery_model=gallery.outputs["model"])
            _resources(transform, "2", "8Gi", gpu=GPU)

        bundle = _resources(bundle_members(config=config, gallery_models=dsl.Collected(gallery.outputs["model"]),
                                           transformations=dsl.Collected(transform.outputs["transformation"])),
                            "1", "2Gi")
        shards = _resources(shard_list(num_shards=embed_shards), "1", "1Gi")
        with dsl.ParallelFor(shards.output, name="gallery-shards", parallelism=parallelism) as shard:
            part = embed_gallery_shard(config=config, tracking=track, dataset=data, query_model=query.outputs["model"],
                                       bundle=bundle.outputs["bundle"], shard=shard, workers=embed_workers)
            _resources(part, "4", "8Gi", gpu=GPU)
        ensemble = _resources(merge_shards(tracking=track, shards=dsl.Collected(part.outputs["gallery"])), "1", "8Gi")
        index = _resources(build_index(config=config, tracking=track, gallery=ensemble.outputs["gallery"]), "2", "16Gi")

        def evaluate_with(**kd_students) -> None:
            report = evaluate(config=config, tracking=track, dataset=data, query_model=query.outputs["model"],
                              gallery=ensemble.outputs["gallery"], members=bundle.outputs["bundle"],
                              index=index.outputs["index"], **kd_students)
            _resources(report, "2", "16Gi", gpu=GPU)

        # The KD baseline only where the config enables it. KFP lets nothing outside a condition read a task
        # inside it, so each branch has its own evaluation, and the students their own loop, their teachers
        # read from the members bundle.
        with dsl.If(cfg.outputs["Output"] == True, name="kd-baseline"):  # noqa: E712 (a KFP condition, not a test)
            with dsl.ParallelFor(gallery_models, name="kd-students", parallelism=parallelism) as teacher:
                student = train_kd_student(config=config, tracking=track, dataset=data,
                                           members=bundle.outputs["bundle"], teacher_name=teacher)
                _resources(student, "4", "8Gi", gpu=GPU)
            evaluate_with(kd_students=dsl.Collected(student.outputs["student"]))
        with dsl.Else(name="no-kd-baseline"):
            evaluate_with()

    return cmce_pipeline


cmce_pipeline = make_pipeline()
