"""What a finished local KFP run holds, among the task folders kfp.local named
(`prepare-data/dataset`, `train-model/model`, `for-loop-1-iteration-0/fit-transform/train_embeddings`, ...): found
by task and output name, and a model by the sha256 that a gallery or an index records."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("pipeline")

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


def kfp_run_inputs(run_dir: Path, given: dict, later: tuple[Path, ...] = ()) -> dict:
    """The lifecycle pipelines' inputs from a finished KFP run of the cmce pipeline (`make run`'s
    runs/kfp/cmce-<timestamp>/): its dataset, its merged gallery, the query model that gallery was transformed for
    and its per-model train embeddings (a list of files: `gather` puts them into one folder); or from a lifecycle
    run, to chain a second operation. What `given` (the flags) holds is not looked for. `later`: the lifecycle runs
    that started from this one, in the chain followed so far."""
    if any((run_dir / task).is_dir() for task in LIFECYCLE_TASKS):
        return _after_lifecycle_run(run_dir, dict(given), later)
    out = dict(given)
    for key, task_output in (("dataset_uri", "prepare-data*/dataset"), ("gallery_uri", "merge-shards*/gallery")):
        if key in out:
            continue
        if (found := find(run_dir, task_output)) is None:
            raise ValueError(f"{run_dir}: no {task_output.replace('*', '')} (a KFP run of the cmce pipeline that "
                             "finished?)")
        out[key] = str(found)
    if "query_model_uri" not in out:
        out["query_model_uri"] = query_model_of(run_dir, out["gallery_uri"], sorted(run_dir.rglob("model")))
    out.setdefault("train_embeddings_uri", [str(p) for p in sorted(
        run_dir.glob("for-loop-*/fit-transform*/train_embeddings"))])
    return out


def query_model_of(run_dir: Path, gallery: str, candidates: list[Path]) -> str:
    """The model among `candidates` that `gallery` was transformed for."""
    from cmce.tables import read_metadata

    made_for = read_metadata(gallery).get("query_model_sha256")
    query = model_with_sha256(made_for, candidates) if isinstance(made_for, str) else None
    if query is None:
        looked = ", ".join(str(p) for p in candidates[:3]) + (", ..." if len(candidates) > 3 else "")
        raise ValueError(f"{run_dir}: no model of the run is the query model its gallery {gallery} was transformed "
                         f"for (sha256 {str(made_for)[:12]}; looked at {looked or 'no model'}): a model replaced since "
                         "(a run written again into its folder) is not it; give it with --query-model-uri")
    return str(query)


GIVE_FILES = "give the files with --dataset-uri, --query-model-uri (and --train-embeddings-uri)"


def _after_lifecycle_run(run_dir: Path, out: dict, later: tuple[Path, ...]) -> dict:
    """A lifecycle run holds only what it changed: the gallery (and an upgrade's query model, an addition's train
    embeddings). The rest comes from the run it started from, the one whose gallery its gate measured as the
    baseline (a KFP run, again a lifecycle one, or a `cmce run` folder)."""
    import json

    from cmce.layout import RunLayout

    added = (run_dir / "add-member").is_dir()
    gallery = find(run_dir, f"{'add-member' if added else 'upgrade-query-model'}*/new_gallery")
    decision = find(run_dir, "gate*/decision")
    if gallery is None or decision is None:
        raise ValueError(f"{run_dir}: no {'new gallery' if gallery is None else 'gate decision'} (a lifecycle run "
                         "that finished?)")
    try:
        said = json.loads(decision.read_text())
        baseline = Path(said["baseline_gallery"])  # <run>/<task>/gallery (a KFP run) or <run>/gallery.parquet
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{decision}: not a readable gate decision ({type(err).__name__}: {err})") from None
    wrong = next((f"{key}: {what} expected, not {json.dumps(said[key])[:40]}" for key, kind, what in
                  (("promoted", bool, "true or false"), ("regressed", list, "a list"))
                  if key in said and not isinstance(said[key], kind)), None)
    if wrong:  # as the gate writes it; `"regressed": true` ended in a TypeError traceback
        raise ValueError(f"{decision}: not a readable gate decision ({wrong})")
    if not said.get("promoted"):
        log.warning("%s: its gate did not promote the gallery it made (regressed on %s); it is taken all the same",
                    run_dir, ", ".join(map(str, said.get("regressed", []))) or "nothing")
    before = (baseline.parent.parent if is_kfp_run(baseline.parent.parent) else baseline.parent).resolve()
    if before in (run_dir, *later):  # decisions edited by hand
        raise ValueError(f"{run_dir}: the runs it started from lead back to {before}; {GIVE_FILES}")
    if is_kfp_run(before):
        previous = kfp_run_inputs(before, {}, (run_dir, *later))
    elif (lay := RunLayout(before)).dataset.is_file():
        stored = lay.train_embeddings("x").parent
        previous = {"dataset_uri": str(lay.dataset), "query_model_uri": str(lay.model("query")),
                    "train_embeddings_uri": [str(p) for p in sorted(stored.glob("*.parquet"))]}
    else:
        raise ValueError(f"{run_dir}: the run it started from ({baseline}) is not a run folder; {GIVE_FILES}")
    out.setdefault("dataset_uri", previous["dataset_uri"])
    out.setdefault("gallery_uri", str(gallery))
    if "query_model_uri" not in out:  # an upgrade's own, else the one it started from
        candidates = [Path(previous["query_model_uri"]), *sorted(run_dir.rglob("model"))]
        out["query_model_uri"] = query_model_of(run_dir, out["gallery_uri"], candidates)
    own = sorted(run_dir.glob("fit-transform*/train_embeddings")) if added else []  # the added member's
    out.setdefault("train_embeddings_uri", [*previous["train_embeddings_uri"], *map(str, own)])
    return out


def gather(files: list[str], folder: Path) -> Path:
    """`files` in one new folder, as the upgrade pipeline reads its train embeddings (one *.parquet per gallery
    model; the task matches them by the sha256 they record, not by name): each a symbolic link to its file, so that
    what the run records as read (MLflow's dataset inputs resolve links) is that file, not the temporary folder
    (a hard link's path was recorded, gone once the run ended); copied where links cannot be made."""
    folder.mkdir()
    for i, path in enumerate(files):
        target = folder / f"{i}.parquet"
        try:
            os.symlink(os.path.realpath(path), target)  # absolute: a relative link in a task folder left it dangling
        except OSError:  # a file system without links
            shutil.copyfile(path, target)
    return folder
