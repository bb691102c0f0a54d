"""The cmce pipeline as a KFP v2 pipeline function: the query model trained and exported to ONNX; per
gallery model in parallel (train → fit transformation); then per gallery shard in parallel (every gallery
model on that slice, and its ensemble), and, when kd.enabled, the KD baseline students per gallery model;
merged into one gallery → index → evaluation.

Run parameters are the params file and a list of `KEY=VALUE` overrides, the `--set` syntax of the CLI,
validated by the first task; nothing else changes a setting. Nothing is read when this module is
imported: `make_pipeline` reads the default params file when it is called (at compile time).
"""

from dataclasses import dataclass
from pathlib import Path

from kfp import dsl, kubernetes

from components.steps import (
    CPU_IMAGE,
    CUDA_IMAGE,
    build_index,
    bundle_members,
    embed_gallery_shard,
    evaluate,
    export_query,
    fit_transform,
    gallery_model_names,
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


# the keys of the Kubernetes Secret `Placement.secret` that become environment variables of every pod: MLflow's
# client credentials and the S3 keys of boto3 (artifacts, MLflow's artifact store); each optional
SECRET_ENV = {k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                             "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                             "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}


@dataclass(frozen=True)
class Placement:
    """Where tasks run on a cluster: the tasks that run models request a GPU, run the CUDA image and are
    steered to GPU nodes (node selector `gpu_node_label`, toleration of the `gpu_taint` key) (each step then
    uses the GPU by itself, cmce.device); the others run the CPU image. gpu=False: everything on the CPU image
    without a GPU. `secret`: a Kubernetes Secret whose SECRET_ENV keys every pod gets as environment
    variables ("" = none; optional, so a cluster without it still runs). kfp.local ignores all of this."""

    cpu_image: str = CPU_IMAGE
    cuda_image: str = CUDA_IMAGE
    gpu: bool = True
    secret: str = "cmce-credentials"
    gpu_node_label: tuple[str, str] = ("nvidia.com/gpu.present", "true")  # the GPU operator's node label
    gpu_taint: str = "nvidia.com/gpu"

    def place(self, task: dsl.PipelineTask, cpu: str, memory: str, runs_models: bool = False,
              side_effects: bool = False, retry: bool = True) -> dsl.PipelineTask:
        """Resources and image; `side_effects`: the task changes state outside its outputs (opens or closes
        MLflow runs, registers models, moves aliases), so a cached result must never stand in for running it;
        `retry`: it may fail for a passing reason (a preempted node, the tracking server or S3 unreachable)."""
        task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
        if side_effects:
            task.set_caching_options(False)
        if retry:
            task.set_retry(num_retries=RETRIES, backoff_duration="30s", backoff_factor=2.0,
                           backoff_max_duration="600s")
        if self.secret:
            kubernetes.use_secret_as_env(task, self.secret, SECRET_ENV, optional=True)
        if runs_models and self.gpu:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
            kubernetes.add_node_selector(task, *self.gpu_node_label)
            kubernetes.add_toleration(task, key=self.gpu_taint, operator="Exists", effect="NoSchedule")
            return task.set_container_image(self.cuda_image)
        return task.set_container_image(self.cpu_image)


RETRIES = 2


def default_params(path: Path = PARAMS_FILE) -> str:
    """The params file as one line of JSON (valid YAML): the compiler echoes parameter defaults into comment
    lines, where a newline would break the file."""
    import json

    from cmce.config_yaml import read_config_text, read_yaml  # as cmce reads it: 0o10 is 8, 010 refused

    return json.dumps(read_yaml(read_config_text(path)))


def make_pipeline(params_yaml: str | None = None, parallelism: int = 0, placement: Placement | None = None):
    """Build the pipeline; `params_yaml` is the default of its params parameter (params.yaml when None);
    `parallelism` caps concurrent gallery-model branches and concurrent gallery shards (0 = no cap). kfp.local
    runs branches concurrently, so a one-machine run wants 1: parallel processes only fight over the cores."""
    params_default = params_yaml if params_yaml is not None else default_params()
    place = (placement or Placement()).place

    @dsl.pipeline(name="cmce", description="Asymmetric retrieval with cross-model compatible ensembles")
    def cmce_pipeline(
        params_yaml: str = params_default,
        overrides: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
        mlflow_uri: str = "",
        run_name: str = "cmce",
        embed_shards: int = 1,
        embed_workers: int = 0,
    ):
        """`overrides`: KEY=VALUE settings over params_yaml (e.g. "train.epochs=2", "gallery_models=[resnet]").
        `embed_shards` slices the gallery for the embedding fan-out; `embed_workers` image-decoding processes
        per shard task."""
        cfg = place(resolve_config(params_yaml=params_yaml, overrides=overrides), "1", "1Gi", retry=False)
        config = cfg.outputs["config"]
        names = place(gallery_model_names(config=config), "1", "1Gi", retry=False).output
        track = place(start_tracking(config=config, mlflow_uri=mlflow_uri, run_name=run_name), "1", "1Gi",
                      side_effects=True)
        track = track.outputs["tracking"]
        data = place(prepare_data(config=config, tracking=track), "1", "4Gi").outputs["dataset"]
        query = train_model(config=config, tracking=track, model_name=cfg.outputs["query_model"], dataset=data)
        place(query.set_display_name("train-query-model"), "4", "8Gi", runs_models=True, side_effects=True)
        edge = export_query(tracking=track, dataset=data, query_model=query.outputs["model"])
        # onnxruntime and torch on the CPU; it registers the export in MLflow
        place(edge.set_display_name("export-query-model"), "2", "4Gi", side_effects=True)

        with dsl.ParallelFor(names, name="gallery-models", parallelism=parallelism) as name:
            gallery = train_model(config=config, tracking=track, model_name=name, dataset=data)
            place(gallery.set_display_name("train-gallery-model"), "4", "16Gi", runs_models=True, side_effects=True)
            transform = fit_transform(config=config, tracking=track, dataset=data, query_model=query.outputs["model"],
                                      gallery_model=gallery.outputs["model"])
            place(transform, "2", "8Gi", runs_models=True, side_effects=True)

        bundle = place(bundle_members(config=config, gallery_models=dsl.Collected(gallery.outputs["model"]),
                                      transformations=dsl.Collected(transform.outputs["transformation"])), "1", "2Gi")
        shards = place(shard_list(num_shards=embed_shards), "1", "1Gi", retry=False)
        with dsl.ParallelFor(shards.output, name="gallery-shards", parallelism=parallelism) as shard:
            part = embed_gallery_shard(config=config, tracking=track, dataset=data, query_model=query.outputs["model"],
                                       bundle=bundle.outputs["bundle"], shard=shard, workers=embed_workers)
            place(part, "4", "8Gi", runs_models=True)
        ensemble = place(merge_shards(tracking=track, shards=dsl.Collected(part.outputs["gallery"])), "1", "8Gi")
        index = place(build_index(config=config, tracking=track, gallery=ensemble.outputs["gallery"]), "2", "16Gi")

        def evaluate_with(**kd_students) -> None:
            report = evaluate(config=config, tracking=track, dataset=data, query_model=query.outputs["model"],
                              gallery=ensemble.outputs["gallery"], members=bundle.outputs["bundle"],
                              index=index.outputs["index"], **kd_students)
            # it closes the parent run: the export's nested run and registration land under a running parent, and
            # a failed export fails the run first (nothing ordered them: on kfp.local it ran after, by hash seed)
            report.after(edge)
            place(report, "2", "16Gi", runs_models=True, side_effects=True)  # closes the run; reads aliases

        # The KD baseline only where the config enables it. KFP lets nothing outside a condition read a task
        # inside it, so each branch has its own evaluation, and the students their own loop, their teachers
        # read from the members bundle.
        with dsl.If(cfg.outputs["kd_enabled"] == True, name="kd-baseline"):  # noqa: E712 (a KFP condition)
            with dsl.ParallelFor(names, name="kd-students", parallelism=parallelism) as teacher:
                student = train_kd_student(config=config, tracking=track, dataset=data,
                                           members=bundle.outputs["bundle"], teacher_name=teacher)
                place(student, "4", "8Gi", runs_models=True)
            evaluate_with(kd_students=dsl.Collected(student.outputs["student"]))
        with dsl.Else(name="no-kd-baseline"):
            evaluate_with()

    return cmce_pipeline
