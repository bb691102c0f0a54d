"""`cmce <step>`: the command line. Its parser, and what runs around every subcommand: the checks before any
work (paths, outputs among inputs, torchrun's ranks, tracking settings, the device), s3:// uploads on success, and
one line with exit 2 for bad input; each subcommand's own code is in cmce.commands.

Paths may be local or s3:// URIs (cmce.storage); model arguments also `models:/NAME@ALIAS`. Config settings
are changed with `--set KEY=VALUE` only; `--device` is `--set device=...` for the steps that read a config.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys

from cmce import commands
from cmce import device as devices
from cmce import distributed as ddp
from cmce.argument_paths import (
    check_output_buckets,
    climb_outputs,
    expand_home,
    is_registered,
    refuse_outputs_among_inputs,
    refuse_repeats,
)
from cmce.arguments import OneLineParser, int_in, not_blank
from cmce.data.readers import SPLITS
from cmce.errors import (
    Terminated,
    command_begun,
    command_finished,
    exit_process,
    first_line,
    forget_signals,
    from_client,
    received_signal,
    set_up_command,
    signal_name,
    terminate_by_exception,
)
from cmce.records import StepRecord
from cmce.storage import (
    clear_scratch,
    inputs_unchanged,
    restore_uris,
    run_after_uploads,
)

log = logging.getLogger("cmce")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
DATA_PARALLEL = ("train", "fit-transform")  # subcommands that may run under torchrun with several ranks


_positive_int = int_in(1)
_count = int_in(0)
_threads = int_in(1, 1024)  # the config's num_threads range
_workers = int_in(0, 64)  # decoding processes: more only waits on their start-up


def tracking_error(err: Exception) -> str:
    """The first line of a client's error (MLflow's run to a page), after the URI it was talking to."""
    from cmce.tracking_store import proxy_error

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    text = proxy_error(err, uri) or first_line(err, 400)
    return f"{uri}: {text}" if uri and uri not in text else text


def one_line(text: str) -> str:
    """An error as one log line: control characters escaped, so that a path holding a newline cannot forge
    a second record (or hide part of itself)."""
    from cmce.redaction import redact

    return redact(CONTROL.sub(lambda m: repr(m.group())[1:-1], text))  # and never a password inside a URL


def _host(text: str) -> str:
    if not text.strip():  # `--host "$HOST"` with HOST unset: not every interface, which an empty host binds
        raise argparse.ArgumentTypeError("empty; give an address to listen on (0.0.0.0: every interface)")
    return text


def _seconds(text: str) -> float:
    value = float(text)
    if not (value == 0 or 0.1 <= value <= 3600):  # 0: never; below 0.1 s the idle server spins re-reading meta.json
        raise argparse.ArgumentTypeError(f"must be 0 (never) or within [0.1, 3600] seconds, got {text}")
    return value


def _head_timeout(text: str) -> float:
    value = float(text)
    if not 0.1 <= value <= 600:  # nan fails too
        raise argparse.ArgumentTypeError(f"must be within [0.1, 600] seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="cmce", description="Asymmetric retrieval with cross-model compatible ensembles")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (1 to 1024)")
    p.add_argument("--device", choices=devices.CHOICES, default=None,
                   help="where the step computes: auto = CUDA when available, else CPU (default: the config's "
                        "`device`, else auto)")
    p.add_argument("--mlflow-parent", default=None, metavar="RUN_ID",
                   help="record this step as a nested MLflow run under RUN_ID (and register its models)")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI)")
    sub = p.add_subparsers(dest="command", required=True)
    checkpoint = "(a path, an s3:// URI or models:/NAME@ALIAS)"
    dataset_help = "dataset Parquet from prepare-data (a path or s3:// URI)"
    query_model_help = f"query model checkpoint {checkpoint}; an index refuses another"
    gallery_help = "gallery Parquet from embed-gallery, combine or merge"

    def add(name: str, fn, help_: str, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        if config:
            sp.add_argument("--config", required=True, help="YAML config (see configs/)")
            sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value, e.g. train.epochs=1 (repeatable)")
        return sp

    sp = add("fetch-data", commands.cmd_fetch_data, "unpack the configured packaged data source into a raw-data folder")
    sp.add_argument("--out", required=True, help="the raw-data folder to make (prepare-data --raw reads it)")

    sp = add("prepare-data", commands.cmd_prepare_data, "import the configured data source into a dataset Parquet file")
    sp.add_argument("--out", required=True, help="the dataset Parquet file to write")
    sp.add_argument("--raw", default=None, help="the folder read: one fetch-data wrote, or a local source's root "
                    "(an ImageFolder, a benchmark's folder) in place of data.path (default: data.path)")
    sp.add_argument("--will-evaluate", action="store_true",
                    help="its test split will be evaluated with this config: refuse now an evaluate.recall_k it cannot "
                         "meet (K at least its size), not after the training (else a warning)")

    sp = add("train", commands.cmd_train, "train one embedding model (or, with --kd-teacher, the KD baseline student)")
    sp.add_argument("--dataset", required=True, help=dataset_help)
    sp.add_argument("--model", default=None, help="model name from the config (query or a gallery model)")
    sp.add_argument("--kd-teacher", default=None, help="gallery model checkpoint to distil into a query-sized student")
    sp.add_argument("--out", required=True, help="the checkpoint to write (.pt)")

    sp = add("fit-transform", commands.cmd_fit_transform,
             "fit the transformation of one gallery model into the query space")
    sp.add_argument("--dataset", required=True, help=f"{dataset_help}; its train split is read")
    sp.add_argument("--query-model", required=True, help=f"the frozen query model {checkpoint}")
    sp.add_argument("--gallery-model", required=True, help=f"the frozen gallery model {checkpoint}")
    sp.add_argument("--out", required=True, help="the transformation checkpoint to write (.pt)")
    sp.add_argument("--train-embeddings-out", default=None, help="also keep the raw train embeddings (Parquet)")

    for name, fn, help_ in (
        ("embed-gallery", commands.cmd_embed_gallery,
         "embed the gallery with every gallery model and combine the ensemble"),
        ("embed-member", commands.cmd_embed_member, "embed the gallery with one gallery model and its transformation"),
    ):
        sp = add(name, fn, help_, config=False)
        sp.add_argument("--dataset", required=True, help=f"{dataset_help}; its test split is the gallery")
        sp.add_argument("--query-model", required=True,
                        help=f"query model checkpoint {checkpoint}: its sha256 must be the transformations' (not run)")
        multi = "append" if name == "embed-gallery" else "store"
        many = multi == "append"
        sp.add_argument("--gallery-model", required=True, action=multi,
                        help="gallery model checkpoint" + (" (repeatable, in ensemble order)" if many else ""))
        sp.add_argument("--transform", required=True, action=multi,
                        help="its transformation from fit-transform" + (" (one per --gallery-model)" if many else ""))
        sp.add_argument("--out", required=True, help="the gallery Parquet to write" if many else
                        "the per-model Parquet to write (combine or add-member reads it)")
        sp.add_argument("--batch-size", type=_positive_int, default=256, help="images a batch (>= 1)")
        sp.add_argument("--shard", default="0/1", metavar="I/K", help="embed only slice I of K (default: all)")
        sp.add_argument("--workers", type=_workers, default=0,
                            help="image-decoding worker processes, 0 to 64 (default 0: inline)")
        if name == "embed-gallery":
            sp.add_argument("--members-dir", default=None, help="where per-model files go (default: next to --out)")
        sp.add_argument("--config", default=None, help="YAML config whose device and num_threads the step uses (as "
                        "every step given a config does; a DVC stage passes params.yaml)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (with --config; only device and num_threads are read here)")

    sp = add("combine", commands.cmd_combine, "combine per-model embedding files into the gallery Parquet",
             config=False)
    sp.add_argument("--member", action="append", default=[], help="per-model file, in ensemble order (repeatable)")
    sp.add_argument("--members-dir", default=None, help="or: DIR/<gallery model>.parquet for each model in --config")
    sp.add_argument("--config", default=None, help="YAML config naming the gallery models (with --members-dir)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    sp.add_argument("--out", required=True, help="the gallery Parquet to write")

    sp = add("merge", commands.cmd_merge, "concatenate the shards of a gallery (or per-model) file, in shard order",
             config=False)
    sp.add_argument("shard_file", nargs="+", help="shard files from `embed-gallery --shard I/K` (any order)")
    sp.add_argument("--out", required=True, help="the merged Parquet to write")

    sp = add("build-index", commands.cmd_build_index, "build the FAISS index, optionally rejecting uncertain items",
             config=False)
    sp.add_argument("--gallery", required=True, help=gallery_help)
    sp.add_argument("--out", required=True, help="the index folder to write (replaced whole)")
    sp.add_argument("--config", default=None, help="YAML config, whole or its `index:` section alone: index type, "
                                                 "rejection and the type's parameters")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    sp.add_argument("--reject-fraction", type=float, default=None, help="default: the config's, else 0")
    sp.add_argument("--index-type", default=None, help="flat | ivfpq | hnsw | auto (default: the config's, else flat)")

    sp = add("evaluate", commands.cmd_evaluate, "evaluate every configuration; write metrics.json, results.md, plots")
    sp.add_argument("--dataset", required=True, help=f"{dataset_help}; its test split is queried")
    sp.add_argument("--query-model", required=True, help=query_model_help)
    sp.add_argument("--gallery", required=True, help=f"{gallery_help}, with its members' embeddings")
    sp.add_argument("--transform", action="append", default=[], help="one per gallery model (any order)")
    sp.add_argument("--transform-dir", default=None, help="or: every *.pt in this folder")
    sp.add_argument("--kd", action="append", default=[], metavar="STUDENT", help="KD student checkpoint (repeatable)")
    sp.add_argument("--kd-dir", default=None, help="or: every *.pt in this folder and its subfolders")
    sp.add_argument("--index", default=None, help="the gallery's built index (folder or s3:// prefix): also search it "
                    "as served and report its checks (metrics.json 'index')")
    sp.add_argument("--out", required=True, help="the report folder to write (metrics.json, results.md, plots)")

    sp = add("search", commands.cmd_search, "search the index with query images; prints JSON lines", config=False)
    sp.add_argument("--index", required=True, help="index folder from build-index (or an s3:// prefix)")
    sp.add_argument("--query-model", required=True, help=query_model_help)
    sp.add_argument("--images", nargs="*", default=[], help="image files")
    sp.add_argument("--dataset", default=None, help="or a dataset Parquet file (whose class names label the hits)")
    sp.add_argument("--split", default=None, choices=SPLITS, help="the --dataset split to search with (default test)")
    sp.add_argument("--limit", type=_count, default=None, help="at most this many --dataset queries (default 0: all)")
    sp.add_argument("--k", type=_positive_int, default=5, help="neighbours per query, >= 1 (default %(default)s)")
    sp.add_argument("--exclude-self", action="store_true",
                    help="drop each --dataset query's own item from its hits, leave-one-out as evaluate scores "
                         "(k+1 are searched, k others kept)")
    sp.add_argument("--gallery", default=None,
                    help="refuse the index unless it was built from this gallery file (as it is now)")

    sp = add("export-query", commands.cmd_export_query, "export the query model to ONNX for the edge (uint8 pixels in, "
             "raw embedding out), optionally checked against torch first", config=False)
    sp.add_argument("--query-model", required=True, help=f"query model checkpoint {checkpoint}")
    sp.add_argument("--out", required=True, help="the .onnx file (written only when the check passes)")
    sp.add_argument("--check-dataset", default=None,
                    help="compare onnxruntime with torch on this dataset's --split: max abs difference <= 1e-4 and "
                         "identical top-10 hits, else exit 2 and nothing written")
    sp.add_argument("--check-index", default=None,
                    help="search this built index for the top-10 comparison (default: the split's own embeddings)")
    sp.add_argument("--split", default="test", choices=SPLITS, help="the --check-dataset split (default %(default)s)")

    add("run", commands.cmd_run, "run every step in one process from a config")

    sp = add("serve", commands.cmd_serve, "HTTP search service over a built index (POST /search, /healthz, /readyz, "
             "/version, /metrics, /openapi.json); reloads the index when it is rebuilt", config=False)
    sp.add_argument("--index", required=True, help="index folder from build-index, or its s3:// prefix; watched "
                                                   "for rebuilds (an s3:// one by its meta.json)")
    sp.add_argument("--query-model", required=True, help=query_model_help)
    sp.add_argument("--dataset", default=None, help="dataset Parquet whose class names label the hits")
    sp.add_argument("--host", type=_host, default="127.0.0.1",
                    help="address to listen on, 0.0.0.0: every interface (default %(default)s)")
    sp.add_argument("--port", type=int_in(0, 65535), default=8000, help="0: any free port (default 8000)")
    sp.add_argument("--reload-interval", type=_seconds, default=2.0, metavar="SECONDS",
                    help="how often to look for a rebuilt index or a moved alias, 0 = never (default 2)")
    sp.add_argument("--max-queries", type=int_in(1, 4096), default=64, help="per request, 1 to 4096 (default 64)")
    sp.add_argument("--max-k", type=int_in(1, 10_000), default=100,
                    help="neighbours per query, 1 to 10,000 (default 100); with --max-queries at most 1,000,000 hits "
                         "a request")
    sp.add_argument("--max-body-bytes", type=int_in(1, 1 << 30), default=8 << 20,
                    help="request body size, at most 1 GiB (default 8 MiB)")
    sp.add_argument("--max-bodies-bytes", type=int_in(1, 1 << 32), default=None,
                    help="whole request bodies answered at once, all requests together (a parsed body takes several "
                         "times its size); a request without room waits 5 s, then is answered 503 (default 4 × "
                         "--max-body-bytes)")
    sp.add_argument("--max-image-pixels", type=int_in(1, 100_000_000), default=4_000_000,
                    help="per query image, from its header (default 4,000,000)")
    sp.add_argument("--max-request-pixels", type=int_in(1, 10_000_000_000), default=32_000_000,
                    help="all query images of one request together, from their headers (default 32,000,000)")
    sp.add_argument("--search-threads", type=_threads, default=1,
                    help="threads of one index search; requests already run in parallel (default 1)")
    sp.add_argument("--access-log", action="store_true", help="log every request")
    sp.add_argument("--max-connections", type=int_in(1, 1 << 20), default=None,
                    help="open connections at once; more are answered 503 and closed (default and most: what the "
                         "process's file limit allows)")
    sp.add_argument("--head-timeout", type=_head_timeout, default=10.0, metavar="SECONDS",
                    help="for a connection to send a whole request head (and to read an answer), else it is closed "
                         "(default 10)")

    sp = add("add-gallery-model", commands.cmd_add_gallery_model,
             "add a trained gallery model to a live ensemble (only that model embeds the gallery)")
    sp.add_argument("--dataset", required=True, help="dataset Parquet (train split to fit T, test split = gallery)")
    sp.add_argument("--gallery", required=True, help="current gallery Parquet")
    sp.add_argument("--query-model", required=True, help=f"the served query model {checkpoint}")
    sp.add_argument("--gallery-model", required=True, help="the new gallery model checkpoint")
    sp.add_argument("--out", required=True, help="new gallery Parquet (may equal --gallery: replaced atomically)")
    sp.add_argument("--index-out", default=None, help="also rebuild the index here")
    sp.add_argument("--work-dir", default=None, help="where the new transformation and embeddings go")

    sp = add("upgrade-query-model", commands.cmd_upgrade_query_model,
             "refit all transformations for a new query model from stored embeddings; gallery images unread")
    sp.add_argument("--dataset", required=True, help="dataset Parquet; only its train split is read")
    sp.add_argument("--gallery", required=True, help="current gallery Parquet (its images are not read again)")
    sp.add_argument("--query-model", required=True, help="the new query model checkpoint")
    sp.add_argument("--train-embeddings", nargs="+", required=True,
                    help="stored train embeddings, one file per member, or folders of them")
    sp.add_argument("--transforms-out", required=True, help="folder for the refitted transformations")
    sp.add_argument("--out", required=True, help="new gallery Parquet (may equal --gallery)")
    sp.add_argument("--index-out", default=None, help="also rebuild the index here")

    sp = add("add-member", commands.cmd_add_member, "add one per-model file (from embed-member) to a gallery",
             config=False)
    sp.add_argument("--gallery", required=True, help="current gallery Parquet")
    sp.add_argument("--member", required=True, help="per-model file of the new gallery model")
    sp.add_argument("--out", required=True, help="new gallery Parquet (may equal --gallery: replaced atomically)")

    sp = add("gate", commands.cmd_gate, "promotion gate: compare a candidate gallery with the served one on labelled "
             "queries; MLflow's `production` alias moves only when no gated metric regresses (record the gate "
             "with `cmce --mlflow-uri URI --mlflow-parent RUN_ID gate ...`)")
    sp.add_argument("--dataset", required=True, help="dataset Parquet with the labelled queries (lifecycle.gate.split)")
    sp.add_argument("--baseline-query-model", required=True, help="the query model now served")
    sp.add_argument("--baseline-gallery", required=True, help="the gallery now served")
    sp.add_argument("--query-model", required=True, help="the candidate's query model (may be the same)")
    sp.add_argument("--gallery", required=True, help="the candidate gallery")
    sp.add_argument("--out", required=True, help="decision JSON (baseline, candidate, delta, promoted)")
    sp.add_argument("--require-promotion", action="store_true",
                    help="exit 1 when the candidate regresses (2 is bad input)")

    sp = add("track-start", commands.cmd_track_start, "open the parent MLflow run of a pipeline run; prints its id")
    sp.add_argument("--run-dir", default="runs", help="where the default sqlite tracking store goes")
    sp.add_argument("--name", default="cmce", type=not_blank(what="a name"),
                    help="the parent run's name (default cmce)")
    sp.add_argument("--out", default=None, help="also write {uri, run_id} as JSON to this file")
    # SUPPRESS: a subcommand's default would replace the same flag given before the subcommand
    sp.add_argument("--mlflow-uri", default=argparse.SUPPRESS,
                    help="tracking URI (default: $MLFLOW_TRACKING_URI or a sqlite file)")
    sp.add_argument("--artifact-location", default=None, metavar="URI",
                    help="where a new experiment keeps its artifacts, e.g. s3://BUCKET/mlflow (MLflow reads "
                         "MLFLOW_S3_ENDPOINT_URL and the AWS credential chain)")

    sp = add("track-end", commands.cmd_track_end, "close the parent MLflow run", config=False)
    sp.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"],
                    help="the run's end status (default %(default)s)")
    sp.add_argument("--mlflow-parent", default=argparse.SUPPRESS, metavar="RUN_ID", help="the parent run to close")
    sp.add_argument("--mlflow-uri", default=argparse.SUPPRESS, help="tracking URI (default: $MLFLOW_TRACKING_URI)")
    return p


def _select_device(args: argparse.Namespace) -> None:
    """This step's device before any work (a torchrun group's backend depends on it): the --device flag,
    else the config's `device`, else auto. Stages that read a config select it again from there."""
    if args.device:
        devices.select(args.device, "--device")
    elif getattr(args, "config", None) and not (args.command == "build-index"
                                                and commands.index_section_only(args) is not None):
        devices.select(commands.config_of(args).device, f"{args.config}: device")
    else:
        devices.select("auto")


TRACKING_COMMANDS = ("run", "track-start", "track-end")  # they read --mlflow-uri without --mlflow-parent


def _string_arguments(args: argparse.Namespace) -> list[str]:
    values = [v for v in vars(args).values() if isinstance(v, str)]
    return values + [v for lst in vars(args).values() if isinstance(lst, list) for v in lst if isinstance(v, str)]


def main(argv: list[str] | None = None) -> int:
    command_begun()
    args = build_parser().parse_args(argv)
    set_up_command()
    early = received_signal()  # while the libraries loaded, its exception swallowed by an import (every command
    forget_signals()  # gives back what it took as it ends: nothing else is left here)
    if early is not None:
        log.error("cmce %s: interrupted (%s) while starting; nothing was done", args.command, signal_name(early))
        return 128 + early
    try:
        expand_home(args)
        climb_outputs(args)
        refuse_repeats(args)
    except ValueError as err:
        log.error("cmce %s: %s", args.command, err)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "train" and bool(args.model) == bool(args.kd_teacher):
        log.error("cmce train: give --model NAME or --kd-teacher CHECKPOINT (one of them)")
        return 2
    if args.command == "search" and bool(args.images) == bool(args.dataset):
        log.error("cmce search: give --images FILE... or --dataset FILE (one of them)")
        return 2
    given = [f"--{f}" for f in ("split", "limit") if args.command == "search" and getattr(args, f) is not None]
    if given and args.images:  # they pick --dataset queries: --split was ignored, --limit cut the image list
        log.error("cmce search: %s appl%s to --dataset, not --images", ", ".join(given), "y" if given[1:] else "ies")
        return 2
    try:
        missing = ddp.partly_launched()
    except ValueError as err:
        log.error("cmce %s: %s", args.command, err)
        return 2
    if missing:
        log.error("cmce %s: WORLD_SIZE=%s asks for several ranks, but %s %s not set (torchrun sets them all)",
                  args.command, os.environ["WORLD_SIZE"], ", ".join(missing), "is" if len(missing) == 1 else "are")
        return 2
    try:
        world_size = ddp.env_world_size() if ddp.launched() else 1
    except ValueError as err:
        log.error("cmce %s: %s", args.command, err)
        return 2
    if world_size > 1 and args.command not in DATA_PARALLEL:
        log.error("cmce %s does not run data-parallel; launch it without torchrun (data-parallel: %s)",
                  args.command, ", ".join(DATA_PARALLEL))
        return 2
    if args.mlflow_parent and not (args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        log.error("cmce %s: --mlflow-parent needs --mlflow-uri or MLFLOW_TRACKING_URI", args.command)
        return 2  # before any work: a step that cannot be tracked does not write its outputs either
    if args.mlflow_uri and not args.mlflow_parent and args.command not in TRACKING_COMMANDS and not any(
            isinstance(v, str) and is_registered(v) for v in _string_arguments(args)):
        log.warning("cmce %s: --mlflow-uri is read by a step only with --mlflow-parent RUN_ID or for models:/ "
                    "arguments: this one records nothing in MLflow (`cmce run` tracks itself)", args.command)
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if args.mlflow_uri:  # registry URIs given as model arguments resolve against the same server (this command)
        os.environ["MLFLOW_TRACKING_URI"] = args.mlflow_uri
    owns_group = ok = False
    handlers = terminate_by_exception()
    try:
        from cmce.tracking_store import check_uri_settings

        check_uri_settings(args.mlflow_uri)
        inputs = refuse_outputs_among_inputs(args)
        check_output_buckets(args)
        if args.mlflow_parent:
            from cmce.tracking import check_parent_run

            check_parent_run(args.mlflow_uri or os.environ["MLFLOW_TRACKING_URI"], args.mlflow_parent)
        _select_device(args)
        # under torchrun: join the group here unless a caller already did (then the group is theirs to close)
        owns_group = ddp.launched() and not ddp.current().enabled
        if owns_group:
            ddp.init_from_env()
        if not ddp.is_main():
            logging.getLogger().setLevel(logging.WARNING)
        # s3:// outputs upload as the stack closes, only on success; a local input replaced while the step
        # reads it (a step may open a file more than once) fails every write that would follow
        with contextlib.ExitStack() as args.outputs, inputs_unchanged([p for p in inputs if os.path.isfile(p)]):
            record = args.func(args)
        run_after_uploads()  # every s3:// output is up
        if args.mlflow_parent and isinstance(record, StepRecord):
            from cmce.tracking import TrackingInfo, publish

            uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                raise ValueError("--mlflow-parent needs --mlflow-uri or MLFLOW_TRACKING_URI")
            publish(TrackingInfo(uri, args.mlflow_parent), record)
        ok = True
    except BrokenPipeError:  # `cmce search ... | head`: the reader has what it wanted; no error to report
        if (signum := received_signal()) is not None and not args.debug:
            return _interrupted(args, signum)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush fails otherwise
        return 128 + signal.SIGPIPE
    except (ValueError, KeyError, OSError) as err:
        if args.debug:
            raise
        if (signum := received_signal()) is not None:  # the signal's exception was lost on the way: it is the cause
            return _interrupted(args, signum)
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        log.error("cmce %s: %s%s", args.command, one_line(restore_uris(str(msg))),  # s3:// URIs, not scratch copies
                  _cut_uploads())
        return 2
    except MemoryError:  # a setting or file that asks for more than this machine has: one line, not a traceback
        if args.debug:
            raise
        return _out_of_memory(args, " (MemoryError)")
    except Exception as err:  # noqa: BLE001 - only the tracking/storage clients' own errors, re-raised otherwise
        if not args.debug and (signum := received_signal()) is not None:
            return _interrupted(args, signum)
        if not args.debug and isinstance(err, RuntimeError) and "can't allocate memory" in str(err):  # torch's
            return _out_of_memory(args, f": {one_line(str(err))}")
        if not args.debug and (lost := ddp.lost_peer(err)):  # a rank killed: one line, not gloo's traceback
            log.error("cmce %s: %s", args.command, lost)
            return 1
        if args.debug or not from_client(err):
            raise
        log.error("cmce %s: %s", args.command, one_line(tracking_error(err)))
        return 2
    except (KeyboardInterrupt, Terminated) as err:  # outputs are written aside and renamed in: none is left half
        if args.debug:
            raise
        return _interrupted(args, err.signum if isinstance(err, Terminated) else signal.SIGINT)
    finally:
        command_finished()  # a stop after the signals are given back comes too late to stop anything
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        late = received_signal()
        forget_signals()  # the process goes on (a caller running several commands): its next commits are not stopped
        if late is None:  # else the late signal's line below names them
            from cmce.s3 import partial_uploads

            partial_uploads.clear()
        clear_scratch()
        if owns_group:
            ddp.shutdown(clean=ok)
        if args.mlflow_uri:  # a caller running several commands in one process must not inherit this one's
            if previous_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_uri
    if late is not None:  # swallowed by a library, after the last output was renamed in
        return _interrupted(args, late)
    return getattr(args, "exit_status", 0)


def _out_of_memory(args: argparse.Namespace, detail: str) -> int:
    log.error("cmce %s: out of memory%s; a smaller batch, image size or input, or a larger machine", args.command,
              detail)
    return 1


def _cut_uploads() -> str:
    """"; s3://b/idx incomplete (its upload was cut)" for each s3:// folder whose replacement a failure or stop cut
    short (S3 has no rename: the old one is gone); "" when there is none."""
    from cmce.s3 import partial_uploads

    cut = ", ".join(partial_uploads)
    partial_uploads.clear()
    return f"; {cut} incomplete (its upload was cut)" if cut else ""


def _interrupted(args: argparse.Namespace, signum: int) -> int:
    if cut := _cut_uploads():  # "whole or not written" would be untrue of an s3:// folder whose replacement was cut
        log.error("cmce %s: interrupted (%s)%s, every other output whole or not written", args.command,
                  signal_name(signum), cut)
        return 128 + signum
    log.error("cmce %s: interrupted (%s); each output is whole or not written", args.command,
              signal_name(signum))
    return 128 + signum


if __name__ == "__main__":  # python -m cmce.cli
    exit_process(main(), at_once=ddp.threads_left_waiting())
