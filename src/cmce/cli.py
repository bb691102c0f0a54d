"""`cmce <step>`: parse arguments, call one library function per step."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("cmce")


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _config(args: argparse.Namespace):
    from cmce.config import load_config

    return load_config(args.config, _overrides(args.set))


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from cmce.steps import step_prepare_data

    step_prepare_data(_config(args), Path(args.out))


def cmd_train(args: argparse.Namespace) -> None:
    from cmce.steps import step_train, step_train_kd

    cfg = _config(args)
    if args.kd_teacher:
        step_train_kd(cfg, Path(args.dataset), Path(args.kd_teacher), Path(args.out))
    else:
        step_train(cfg, Path(args.dataset), args.model, Path(args.out))


def cmd_fit_transform(args: argparse.Namespace) -> None:
    from cmce.steps import step_fit_transform

    step_fit_transform(
        _config(args), Path(args.dataset), Path(args.query_model), Path(args.gallery_model), Path(args.out),
        Path(args.train_embeddings_out) if args.train_embeddings_out else None,
    )


def cmd_embed_member(args: argparse.Namespace) -> None:
    from cmce.steps import step_embed_member

    step_embed_member(Path(args.dataset), Path(args.query_model), Path(args.gallery_model), Path(args.transform),
                      Path(args.out), args.batch_size)


def cmd_embed_gallery(args: argparse.Namespace) -> None:
    from cmce.steps import step_combine, step_embed_member

    if len(args.gallery_model) != len(args.transform):
        raise ValueError("give one --transform per --gallery-model, in the same order")
    out = Path(args.out)
    members_dir = Path(args.members_dir) if args.members_dir else out.with_name(f"{out.stem}_members")
    members = []
    for g, t in zip(args.gallery_model, args.transform, strict=True):
        member = members_dir / f"{Path(g).stem}.parquet"
        step_embed_member(Path(args.dataset), Path(args.query_model), Path(g), Path(t), member, args.batch_size)
        members.append(member)
    step_combine(members, out)


def cmd_combine(args: argparse.Namespace) -> None:
    from cmce.steps import step_combine

    step_combine([Path(m) for m in args.member], Path(args.out))


def cmd_build_index(args: argparse.Namespace) -> None:
    from cmce.index import build_index

    build_index(Path(args.gallery), Path(args.out), args.reject_fraction, args.index_type)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from cmce.evaluate import EvalInputs
    from cmce.report import markdown_table
    from cmce.steps import step_evaluate

    inputs = EvalInputs(Path(args.dataset), Path(args.query_model), Path(args.gallery),
                        [Path(t) for t in args.transform], [Path(s) for s in args.kd])
    metrics = step_evaluate(_config(args), inputs, Path(args.out))
    sys.stdout.write(markdown_table(metrics))


def cmd_search(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from cmce.checkpoint import load_embedding_model
    from cmce.data import decode_image, iter_split_batches
    from cmce.embed import embed_batch
    from cmce.index import load_index, search

    model = load_embedding_model(args.query_model)
    loaded = load_index(args.index, query_sha256=model.sha256)
    names: list[str] = []
    embs = []
    if args.images:
        for p in args.images:
            arr = decode_image(Path(p).read_bytes(), model.in_channels, model.image_size, p)
            names.append(p)
            embs.append(embed_batch(model, torch.from_numpy(arr[None])))
    else:
        for batch in iter_split_batches(args.dataset, args.split, 256, model.in_channels, model.image_size):
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
    from cmce.steps import run_all

    cfg = _config(args)
    metrics = run_all(cfg)
    log.info("outputs under %s", cfg.output_dir)
    sys.stdout.write(markdown_table(metrics))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmce", description="Asymmetric retrieval with cross-model compatible ensembles")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        if config:
            sp.add_argument("--config", required=True, help="YAML config (see configs/)")
            sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value, e.g. train.epochs=1 (repeatable)")
        return sp

    sp = add("prepare-data", cmd_prepare_data, "import the configured data source into a dataset Parquet file")
    sp.add_argument("--out", required=True)

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
        if name == "embed-gallery":
            sp.add_argument("--members-dir", default=None, help="where per-model files go (default: next to --out)")

    sp = add("combine", cmd_combine, "combine per-model embedding files into the gallery Parquet", config=False)
    sp.add_argument("--member", action="append", required=True)
    sp.add_argument("--out", required=True)

    sp = add("build-index", cmd_build_index, "build the FAISS index, optionally rejecting uncertain items",
             config=False)
    sp.add_argument("--gallery", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--reject-fraction", type=float, default=0.0)
    sp.add_argument("--index-type", default="flat")

    sp = add("evaluate", cmd_evaluate, "evaluate every configuration; write metrics.json, results.md, plots")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--query-model", required=True)
    sp.add_argument("--gallery", required=True)
    sp.add_argument("--transform", action="append", required=True, help="one per gallery model (any order)")
    sp.add_argument("--kd", action="append", default=[], metavar="STUDENT", help="KD student checkpoint (repeatable)")
    sp.add_argument("--out", required=True)

    sp = add("search", cmd_search, "search the index with query images; prints JSON lines", config=False)
    sp.add_argument("--index", required=True)
    sp.add_argument("--query-model", required=True)
    sp.add_argument("--images", nargs="*", default=[], help="image files")
    sp.add_argument("--dataset", default=None, help="or a dataset Parquet file")
    sp.add_argument("--split", default="test")
    sp.add_argument("--limit", type=int, default=0)
    sp.add_argument("--k", type=int, default=5)

    add("run", cmd_run, "run every step in one process from a config")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "train" and not (args.model or args.kd_teacher):
        log.error("cmce train: give --model NAME or --kd-teacher CHECKPOINT")
        return 2
    try:
        args.func(args)
    except (ValueError, KeyError, OSError) as err:
        if args.debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        log.error("cmce %s: %s", args.command, msg)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
