"""The lifecycle pipelines' inputs, artifacts of a previous run: from --inputs-from (a `cmce run` output folder, or
a local KFP run, of the cmce pipeline or a lifecycle one) or one flag each, checked before any task runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmce.s3 import URI_SCHEME

INPUT_URIS = ("dataset_uri", "query_model_uri", "gallery_uri", "train_embeddings_uri")
FOLDER_INPUTS = ("train_embeddings_uri",)  # one file per gallery model; the others are one file each
MLFLOW_SCHEMES = ("models", "runs", "mlflow-artifacts")  # MLflow's own URIs: no file of a task's, anywhere


def lifecycle_inputs(args: argparse.Namespace) -> dict:
    """URIs of the previous run's artifacts: from --inputs-from (a `cmce run` output folder, or a local KFP run) or
    flags. A KFP run's train embeddings are a list of files, gathered into one folder when the
    run starts (run_local)."""
    out: dict = {}
    if args.inputs_from:
        from cmce.layout import RunLayout
        from pipeline.run_folder import is_kfp_run, kfp_run_inputs

        folder = Path(args.inputs_from).resolve()
        if is_kfp_run(folder):  # `make run`'s runs/kfp/cmce-<timestamp>: was `…/data/dataset.parquet not found`
            if args.command != "run":
                raise ValueError(f"--inputs-from {args.inputs_from}: a local KFP run's folder, which a cluster's tasks "
                                 "cannot read; give its files' s3:// URIs with --dataset-uri, --query-model-uri, "
                                 "--gallery-uri (and --train-embeddings-uri)")
            flags = {key: getattr(args, key) for key in INPUT_URIS if getattr(args, key, None)}
            try:
                out = kfp_run_inputs(folder, flags)
            except ValueError as err:
                raise ValueError(f"--inputs-from {err}") from None
        else:
            lay = RunLayout(folder)
            out = {"dataset_uri": str(lay.dataset), "query_model_uri": str(lay.model("query")),
                   "gallery_uri": str(lay.gallery), "train_embeddings_uri": str(lay.train_embeddings("x").parent)}
            if lay.gallery.is_file() and not getattr(args, "query_model_uri", None):  # a query model named `q`:
                from pipeline.run_folder import query_model_of  # models/query.pt was looked for, not found

                models = sorted(lay.model("x").parent.glob("*.pt"))
                out["query_model_uri"] = query_model_of(folder, str(lay.gallery), models)
    for key in INPUT_URIS:
        if getattr(args, key, None):
            out[key] = getattr(args, key)
    required = INPUT_URIS if args.pipeline == "upgrade-query-model" else INPUT_URIS[:3]  # add: no train embeddings
    out = {k: v for k, v in out.items() if k in required}
    needed = [k for k in required if k not in out]
    if needed:
        raise ValueError(f"pipeline {args.pipeline} needs --inputs-from RUN_DIR or --{needed[0].replace('_', '-')}")
    sources = {key: f"--inputs-from {args.inputs_from}" if args.inputs_from and not getattr(args, key, None)
               else f"--{key.replace('_', '-')}" for key in out}
    uris = {key: uri for key, uri in out.items() if isinstance(uri, str)}  # (a KFP run's files: found there)
    for key, uri in uris.items():  # URIs first: what no runner reads is said before a path that is missing
        scheme = URI_SCHEME.match(uri)
        if scheme and scheme.group(1).lower() in MLFLOW_SCHEMES:  # was `models:/…: not found (a run folder …?)`
            raise ValueError(f"{sources[key]} {uri}: the pipeline's inputs are files (the local runner's, local "
                             "paths), not registered models or run artifacts: download it first (`mlflow artifacts "
                             f"download -u {uri} -d DIR`, with MLFLOW_TRACKING_URI set) and give the file")
        if scheme and args.command == "run":  # kfp.local maps s3://b/k to the path /s3/b/k, which nothing mounts
            raise ValueError(f"{sources[key]} {uri}: the local runner reads local paths only; copy it here, or "
                             "submit the run to a cluster, whose tasks read it")
    local = [key for key, uri in uris.items() if not URI_SCHEME.match(uri)]
    here = [key for key in uris if key in local or uris[key].lower().startswith("file:")]  # file:// is this machine's
    if here and args.command != "run":  # a `cmce run` folder, or `--dataset-uri d.parquet` beside s3:// files
        raise ValueError(f"{sources[here[0]]}: {uris[here[0]]} is a path on this machine, which a cluster's tasks "
                         f"cannot read; give its s3:// URI with --{here[0].replace('_', '-')}")
    for key in local:  # a bad local input failed in a task, with a traceback, after 3 tries
        uri = uris[key]
        path = Path(uri)
        if not path.exists():
            raise ValueError(f"{sources[key]}: {uri} not found (a run folder `cmce run` finished?)")
        folder = key in FOLDER_INPUTS
        if path.is_dir() != folder:
            raise ValueError(f"{sources[key]}: {uri} is {'not a folder' if folder else 'a folder, not a file'}"
                             f"{' (one file per gallery model expected)' if folder else ''}")
        if key == "dataset_uri":  # `--dataset-uri params.yaml` was taken, for its tasks to refuse
            from cmce.data.readers import open_dataset

            try:
                open_dataset(path)
            except ValueError as err:  # it names the file; the flag it came from is said first
                raise ValueError(f"{sources[key]}: {err}") from None
    if not any(URI_SCHEME.match(uri) for uri in uris.values()):
        _check_inputs_agree(args.pipeline, out, sources)
    return out


def _train_embedding_files(uri: str | list[str]) -> list[Path]:
    """As the upgrade task reads its folder: every *.parquet in it (a KFP run's files: as found there)."""
    return [Path(p) for p in uri] if isinstance(uri, list) else sorted(Path(uri).glob("*.parquet"))


def _check_inputs_agree(pipeline: str, uris: dict, sources: dict) -> None:
    """The inputs belong together, as far as their metadata says (the sha256 of the query model, the cmce metadata
    of the Parquet files): a KD student given as the query model of a gallery made for another query model ran
    three tasks for 42 s, then failed in add-member (`transformed for query model …`), retried twice."""
    from cmce.storage import file_sha256
    from cmce.tables import read_metadata

    def metadata(key: str, path: str | Path) -> dict:
        try:
            return read_metadata(path)
        except ValueError as err:  # it names the file; the flag it came from is said first
            raise ValueError(f"{sources[key]}: {err}") from None

    gallery, query = uris["gallery_uri"], uris["query_model_uri"]
    gmeta = metadata("gallery_uri", gallery)
    if gmeta.get("kind") != "gallery":
        raise ValueError(f"{sources['gallery_uri']}: {gallery} is not a gallery file (kind {gmeta.get('kind')!r})")
    made_for, sha256 = gmeta["query_model_sha256"], file_sha256(query)
    if sha256 != made_for:
        raise ValueError(f"{sources['query_model_uri']}: {query} (sha256 {sha256[:12]}) is not the query model the "
                         f"gallery {gallery} was transformed for ({made_for[:12]}); give that query model")
    if pipeline != "upgrade-query-model":
        return
    given = uris["train_embeddings_uri"]
    stored = {meta["gallery_model"]["sha256"] for meta in (metadata("train_embeddings_uri", f)
                                                          for f in _train_embedding_files(given))
              if meta.get("kind") == "train_embeddings"}
    missing = [m["name"] for m in gmeta["members"] if m["sha256"] not in stored]
    if missing:
        where = f"{given} holds" if isinstance(given, str) else "its fit-transform/train_embeddings files hold"
        raise ValueError(f"{sources['train_embeddings_uri']}: {where} no train embeddings of the gallery's "
                         f"model{'s' if missing[1:] else ''} {', '.join(missing)} (no file of their sha256)")
