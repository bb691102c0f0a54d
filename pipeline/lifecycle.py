"""The live-gallery operations as small KFP pipelines reusing the main pipeline's components.

Both start from artifacts a previous run produced (imported by URI: a path locally, s3://… or gs://…
on a cluster) and end in the promotion gate, which compares the candidate with the served gallery and
moves MLflow's `production` alias only when no gated metric regresses.

- add-gallery-model: train the new model (lifecycle.add_gallery_model) → fit its transformation →
  embed the gallery with it alone → add it to the running sum → index → gate.
- upgrade-query-model: train the new query model (lifecycle.new_query_model) → refit every
  transformation from the stored train embeddings → rebuild the gallery from its stored raw
  embeddings (no gallery image is read) → index → gate.
"""

from kfp import dsl
from kfp.dsl import Dataset, Model

from components.steps import (
    add_member,
    build_index,
    embed_member,
    fit_transform,
    gate,
    resolve_config,
    start_tracking,
    train_model,
    upgrade_query_model,
)
from pipeline.cmce_pipeline import _PARAMS, DEFAULT_PARAMS, GPU, _resources

_LIFECYCLE = _PARAMS.get("lifecycle") or {}
DEFAULT_ADD_MODEL = (_LIFECYCLE.get("add_gallery_model") or {}).get("name", "")
DEFAULT_NEW_QUERY = (_LIFECYCLE.get("new_query_model") or {}).get("name", "")


def _config_and_tracking(params_yaml: str, mlflow_uri: str, run_name: str):
    cfg = resolve_config(params_yaml=params_yaml, gallery_models=[], epochs=0, lam=-1.0, reject_fraction=-1.0,
                         index_type="", protocol="", dataset="")
    config = cfg.outputs["config"]
    return config, start_tracking(config=config, mlflow_uri=mlflow_uri, run_name=run_name).outputs["tracking"]


def _import(uri: str, cls):
    return dsl.importer(artifact_uri=uri, artifact_class=cls, reimport=False).output


@dsl.pipeline(name="cmce-add-gallery-model",
              description="Add a gallery model to a live ensemble; only the new model embeds the gallery")
def add_gallery_model_pipeline(
    dataset_uri: str,
    query_model_uri: str,
    gallery_uri: str,
    params_yaml: str = DEFAULT_PARAMS,
    model_name: str = DEFAULT_ADD_MODEL,
    mlflow_uri: str = "",
    run_name: str = "cmce-add-gallery-model",
):
    config, track = _config_and_tracking(params_yaml, mlflow_uri, run_name)
    data, query, served = _import(dataset_uri, Dataset), _import(query_model_uri, Model), _import(gallery_uri, Dataset)
    new = train_model(config=config, tracking=track, model_name=model_name, dataset=data)
    _resources(new.set_display_name("train-gallery-model"), "4", "16Gi", gpu=GPU)
    transform = _resources(fit_transform(config=config, tracking=track, dataset=data, query_model=query,
                                         gallery_model=new.outputs["model"]), "2", "8Gi", gpu=GPU)
    member = _resources(embed_member(tracking=track, dataset=data, query_model=query,
                                     gallery_model=new.outputs["model"],
                                     transformation=transform.outputs["transformation"]), "4", "8Gi", gpu=GPU)
    grown = _resources(add_member(tracking=track, gallery=served, member=member.outputs["member"]), "1", "8Gi")
    index = _resources(build_index(config=config, tracking=track, gallery=grown.outputs["new_gallery"]), "2", "16Gi")
    _resources(gate(config=config, tracking=track, dataset=data, baseline_query_model=query, baseline_gallery=served,
                    query_model=query, gallery=grown.outputs["new_gallery"], index=index.outputs["index"]), "2", "16Gi")


@dsl.pipeline(name="cmce-upgrade-query-model",
              description="Refit every transformation for a new query model; gallery images are never read")
def upgrade_query_model_pipeline(
    dataset_uri: str,
    query_model_uri: str,
    gallery_uri: str,
    train_embeddings_uri: str,
    params_yaml: str = DEFAULT_PARAMS,
    model_name: str = DEFAULT_NEW_QUERY,
    mlflow_uri: str = "",
    run_name: str = "cmce-upgrade-query-model",
):
    """`train_embeddings_uri`: a folder with the stored train embeddings, one file per gallery model."""
    config, track = _config_and_tracking(params_yaml, mlflow_uri, run_name)
    data, old_query = _import(dataset_uri, Dataset), _import(query_model_uri, Model)
    served, stored = _import(gallery_uri, Dataset), _import(train_embeddings_uri, Dataset)
    new_query = train_model(config=config, tracking=track, model_name=model_name, dataset=data)
    _resources(new_query.set_display_name("train-query-model"), "4", "8Gi", gpu=GPU)
    upgraded = _resources(upgrade_query_model(config=config, tracking=track, dataset=data, gallery=served,
                                              query_model=new_query.outputs["model"], train_embeddings=stored),
                          "2", "16Gi", gpu=GPU)
    index = _resources(build_index(config=config, tracking=track, gallery=upgraded.outputs["new_gallery"]),
                       "2", "16Gi")
    _resources(gate(config=config, tracking=track, dataset=data, baseline_query_model=old_query,
                    baseline_gallery=served, query_model=new_query.outputs["model"],
                    gallery=upgraded.outputs["new_gallery"], index=index.outputs["index"]), "2", "16Gi")


PIPELINES = {"add-gallery-model": add_gallery_model_pipeline, "upgrade-query-model": upgrade_query_model_pipeline}
