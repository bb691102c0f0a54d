"""What a finished local KFP run of the cmce pipeline holds, among the task folders kfp.local named
(`prepare-data/dataset`, `train-model/model`, `for-loop-1-iteration-0/fit-transform/train_embeddings`, ...): found
by task and output name, and a model by the sha256 that a gallery or an index records."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

LIFECYCLE_TASKS = ("add-member", "upgrade-query-model")  # a lifecycle run's own tasks


def find(run_dir: Path, pattern: str) -> Path | None:
    return next(iter(sorted(run_dir.rglob(pattern))), None)


def is_kfp_run(folder: Path) -> bool:
    """A kfp.local run's folder (of any pipeline), not a `cmce run` output folder."""
    return any((folder / task).is_dir() for task in ("resolve-config", "prepare-data", *LIFECYCLE_TASKS))


def model_with_sha256(wanted: str, candidates: list[Path]) -> Path | None:
    """The checkpoint among `candidates` whose sha256 is `wanted` (a checkpoint's version, as galleries and indexes
    record it)."""
    from cmce.storage import file_sha256

    return next((p for p in candidates if p.is_file() and file_sha256(p) == wanted), None)


def kfp_run_inputs(run_dir: Path, given: dict) -> dict:
    """The lifecycle pipelines' inputs from a finished KFP run of the cmce pipeline (`make run`'s
    runs/kfp/cmce-<timestamp>/): its dataset, its merged gallery, the query model that gallery was transformed for
    and its per-model train embeddings (a list of files: `gather` puts them into one folder). What `given` (the
    flags) holds is not looked for."""
    from cmce.tables import read_metadata

    if any((run_dir / task).is_dir() for task in LIFECYCLE_TASKS):  # its query model, train embeddings: elsewhere
        raise ValueError(f"{run_dir}: a lifecycle pipeline's run, which holds only what it changed; give its files "
                         "with --dataset-uri, --query-model-uri, --gallery-uri (and --train-embeddings-uri)")
    out = dict(given)
    for key, task_output in (("dataset_uri", "prepare-data*/dataset"), ("gallery_uri", "merge-shards*/gallery")):
        if key in out:
            continue
        if (found := find(run_dir, task_output)) is None:
            raise ValueError(f"{run_dir}: no {task_output.replace('*', '')} (a KFP run of the cmce pipeline that "
                             "finished?)")
        out[key] = str(found)
    if "query_model_uri" not in out:
        made_for = read_metadata(out["gallery_uri"]).get("query_model_sha256")
        query = model_with_sha256(made_for, sorted(run_dir.rglob("model"))) if isinstance(made_for, str) else None
        if query is None:
            raise ValueError(f"{run_dir}: no model of the run is the query model its gallery {out['gallery_uri']} "
                             f"was transformed for (sha256 {str(made_for)[:12]})")
        out["query_model_uri"] = str(query)
    out.setdefault("train_embeddings_uri", [str(p) for p in sorted(
        run_dir.glob("for-loop-*/fit-transform*/train_embeddings"))])
    return out


def gather(files: list[str], folder: Path) -> Path:
    """`files` in one new folder, as the upgrade pipeline reads its train embeddings (one *.parquet per gallery
    model; the task matches them by the sha256 they record, not by name): linked where the file system allows,
    else copied."""
    folder.mkdir()
    for i, path in enumerate(files):
        target = folder / f"{i}.parquet"
        try:
            os.link(os.path.realpath(path), target)  # (a link to a link left dangling where the first was relative)
        except OSError:  # another file system, or one without links
            shutil.copyfile(path, target)
    return folder
