"""The live-gallery operations as small KFP pipelines reusing the main pipeline's components.

Both start from artifacts a previous run produced (imported by URI: a path locally, s3://… or gs://…
on a cluster) and end in the promotion gate, which compares the candidate with the served gallery and
moves MLflow's `production` alias only when no gated metric regresses.

- add-gallery-model: train the new model (lifecycle.add_gallery_model) → fit its transformation →
  embed the gallery with it alone → add it to the running sum → index → gate.
- upgrade-query-model: train the new query model (lifecycle.new_query_model) and export it to ONNX for the
  edge → refit every transformation from the stored train embeddings → rebuild the gallery from its stored
  raw embeddings (no gallery image is read) → index → gate (a promotion moves the query model's, its ONNX
  export's and its pyfunc's `production` together).

Settings come from the params file and KEY=VALUE overrides, as in the main pipeline.
"""

from kfp import dsl
from kfp.dsl import Dataset, Model

from components.steps import (
    add_member,
    build_index,
    embed_member,
    export_query,
    fit_transform,
    gate,
    resolve_config,
    start_tracking,
    train_model,
    upgrade_query_model,
)
from pipeline.cmce_pipeline import Placement, default_params


def _import(uri: str, cls):
    return dsl.importer(artifact_uri=uri, artifact_class=cls, reimport=False).output


def _config_and_tracking(place, params_yaml, overrides, mlflow_uri, run_name):
    """The resolved-config task, its config artifact, and the tracking artifact."""
    cfg = place(resolve_config(params_yaml=params_yaml, overrides=overrides), "1", "1Gi", retry=False)
    config = cfg.outputs["config"]
    track = place(start_tracking(config=config, mlflow_uri=mlflow_uri, run_name=run_name), "1", "1Gi",
                  side_effects=True)
    return cfg, config, track.outputs["tracking"]


def make_add_gallery_model_pipeline(params_yaml: str | None = None, placement: Placement | None = None):
    params_default = params_yaml if params_yaml is not None else default_params()
    place = (placement or Placement()).place

    @dsl.pipeline(name="cmce-add-gallery-model",
                  description="Add a gallery model to a live ensemble; only the new model embeds the gallery")
    def add_gallery_model_pipeline(
        dataset_uri: str,
        query_model_uri: str,
        gallery_uri: str,
        params_yaml: str = params_default,
        overrides: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
        mlflow_uri: str = "",
        run_name: str = "cmce-add-gallery-model",
    ):
        cfg, config, track = _config_and_tracking(place, params_yaml, overrides, mlflow_uri, run_name)
        data, query = _import(dataset_uri, Dataset), _import(query_model_uri, Model)
        served = _import(gallery_uri, Dataset)
        new = train_model(config=config, tracking=track, model_name=cfg.outputs["add_gallery_model"], dataset=data)
        place(new.set_display_name("train-gallery-model"), "4", "16Gi", runs_models=True, side_effects=True)
        transform = place(fit_transform(config=config, tracking=track, dataset=data, query_model=query,
                                        gallery_model=new.outputs["model"]), "2", "8Gi", runs_models=True,
                          side_effects=True)
        member = place(embed_member(config=config, tracking=track, dataset=data, query_model=query,
                                    gallery_model=new.outputs["model"],
                                    transformation=transform.outputs["transformation"]), "4", "8Gi", runs_models=True)
        grown = place(add_member(tracking=track, gallery=served, member=member.outputs["member"]), "1", "8Gi")
        index = place(build_index(config=config, tracking=track, gallery=grown.outputs["new_gallery"]), "2", "16Gi")
        place(gate(config=config, tracking=track, dataset=data, baseline_query_model=query, baseline_gallery=served,
                   query_model=query, gallery=grown.outputs["new_gallery"], index=index.outputs["index"]), "2", "16Gi",
              runs_models=True, side_effects=True)

    return add_gallery_model_pipeline


def make_upgrade_query_model_pipeline(params_yaml: str | None = None, placement: Placement | None = None):
    params_default = params_yaml if params_yaml is not None else default_params()
    place = (placement or Placement()).place

    @dsl.pipeline(name="cmce-upgrade-query-model",
                  description="Refit every transformation for a new query model; gallery images are never read")
    def upgrade_query_model_pipeline(
        dataset_uri: str,
        query_model_uri: str,
        gallery_uri: str,
        train_embeddings_uri: str,
        params_yaml: str = params_default,
        overrides: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
        mlflow_uri: str = "",
        run_name: str = "cmce-upgrade-query-model",
    ):
        """`train_embeddings_uri`: a folder with the stored train embeddings, one file per gallery model."""
        cfg, config, track = _config_and_tracking(place, params_yaml, overrides, mlflow_uri, run_name)
        data, old_query = _import(dataset_uri, Dataset), _import(query_model_uri, Model)
        served, stored = _import(gallery_uri, Dataset), _import(train_embeddings_uri, Dataset)
        new_query = train_model(config=config, tracking=track, model_name=cfg.outputs["new_query_model"],
                                dataset=data)
        place(new_query.set_display_name("train-query-model"), "4", "8Gi", runs_models=True, side_effects=True)
        # the edge's model: registered before the gate, whose promotion moves its `production` with the query model's
        edge = export_query(tracking=track, dataset=data, query_model=new_query.outputs["model"])
        place(edge.set_display_name("export-query-model"), "2", "4Gi", side_effects=True)
        upgraded = place(upgrade_query_model(config=config, tracking=track, dataset=data, gallery=served,
                                             query_model=new_query.outputs["model"], train_embeddings=stored),
                         "2", "16Gi", runs_models=True, side_effects=True)
        index = place(build_index(config=config, tracking=track, gallery=upgraded.outputs["new_gallery"]),
                      "2", "16Gi")
        place(gate(config=config, tracking=track, dataset=data, baseline_query_model=old_query,
                   baseline_gallery=served, query_model=new_query.outputs["model"],
                   gallery=upgraded.outputs["new_gallery"], index=index.outputs["index"]).after(edge), "2", "16Gi",
              runs_models=True, side_effects=True)

    return upgrade_query_model_pipeline


PIPELINES = {"add-gallery-model": make_add_gallery_model_pipeline,
             "upgrade-query-model": make_upgrade_query_model_pipeline}
