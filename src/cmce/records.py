"""What a stage reports to a tracker (kept free of any tracking library), and the names its models are
registered under."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the readers below load torch; the names alone (tracking's use) need none of it
    from cmce.config import Config


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
    # (registered name, sha256) whose `production` alias follows a promotion where such a version is registered:
    # the promoted query model's ONNX export and pyfunc, which a served gallery does not need
    promote_along: list[tuple[str, str]] = field(default_factory=list)
    # (registered name, sha256) the gate's baseline was served with: `production` moves only from those
    promote_from: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[tuple[str, Path]] = field(default_factory=list)  # (role, file): the data sets the step read
    headline: dict = field(default_factory=dict)  # metrics that also go on the pipeline run (the parent)
    decision: Path | None = None  # a gate's decision file: said not promoted when the record cannot be published


def registry_name(role: str, name: str) -> str:
    """Registered-model name: cmce-query for any query model (an upgraded query model is a new version
    of the same registered model), cmce-query-onnx for its ONNX exports and cmce-query-pyfunc for it as an MLflow
    pyfunc, cmce-<role>-<name> otherwise."""
    return f"cmce-{role}" if role in QUERY_ROLES else f"cmce-{role}-{name}"


QUERY_ROLES = ("query", "query-onnx", "query-pyfunc")  # one registered model each, whatever the query model's name


def registered_uris(cfg: Config, alias: str = "candidate") -> dict[str, list[str]]:
    """`models:/NAME@ALIAS` URIs of the query model and of every transformation in the config."""
    return {
        "query_model": [f"models:/{registry_name('query', cfg.query_model.name)}@{alias}"],
        "transformations": [f"models:/{registry_name('transform', m.name)}@{alias}" for m in cfg.gallery_models],
    }


def record_model(cfg: Config, path: Path, role: str) -> StepRecord:
    from cmce.checkpoint import load_embedding_model

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
