"""The key outputs of a finished local run among the task folders kfp.local named (`train-model/model`,
`for-loop-1-iteration-0/train-model-2/model`): a new user had to guess which `model` was the query model, and a
wrong guess was refused only after loading (`index was built for query model …`)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from cmce import next_steps as steps
from pipeline.run_folder import find, model_with_sha256


def recorded_by(index: Path, key: str, candidates: list[Path]) -> Path | None:
    """The file among `candidates` whose sha256 the index's meta.json records under `key` (`query_model_sha256`:
    the checkpoint it was built for; `gallery_sha256`: the gallery it was built from)."""
    try:
        wanted = json.loads((index / "meta.json").read_text())[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return model_with_sha256(wanted, candidates) if isinstance(wanted, str) else None


def next_steps(run_dir: Path, arguments: dict) -> str:
    """cmce.next_steps for a local run's folder, whose query model and dataset may be the run's own or (a lifecycle
    pipeline's) among its input `arguments`; "" when it holds no index of a query model found there."""
    index = find(run_dir, "build-index*/index")
    given = {key: Path(arguments[key]) for key in ("query_model_uri", "dataset_uri") if arguments.get(key)}
    models = [*sorted(run_dir.rglob("model")), *([given["query_model_uri"]] if "query_model_uri" in given else [])]
    query = recorded_by(index, "query_model_sha256", models) if index is not None else None
    if index is None or query is None:
        return ""
    dataset = find(run_dir, "prepare-data*/dataset") or given.get("dataset_uri")
    # newest first: the gallery an index was built from is written after the shards or members it was made of
    galleries = sorted((p for p in run_dir.rglob("*gallery*") if p.is_file()), key=lambda p: -p.stat().st_mtime)
    gallery = recorded_by(index, "gallery_sha256", galleries)
    return steps.next_steps(query, index, dataset, find(run_dir, "export-query*/edge_model"), gallery)


def lifecycle_commands(run_dir: Path, pipelines: tuple[str, ...], same: list[str]) -> str:
    """The live-gallery operations on a finished run (of any pipeline: they chain), with the run's own settings
    (`same`: its --params, --set, --root and --no-mlflow, as given; the params' lifecycle section names the models
    to train)."""
    python = steps.shown(Path(sys.executable))
    flags = "".join(f" {shlex.quote(flag)}" for flag in same)
    return "".join(f"  {python} -m pipeline run --local --pipeline {name} --inputs-from {steps.shown(run_dir)}{flags}\n"
                   for name in pipelines)
