"""`cmce <step>`: parse the arguments into a stage's inputs and outputs (cmce.stages) and call it.

Paths may be local or s3:// URIs (cmce.storage); model arguments also `models:/NAME@ALIAS`. Config settings
are changed with `--set KEY=VALUE` only; `--device` is `--set device=...` for the steps that read a config.
A step that fails on bad input exits 2 with one line naming the file or key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from cmce import device as devices
from cmce import distributed as ddp
from cmce import stages
from cmce.argument_paths import (
    MODEL_URIS,
    check_output_buckets,
    default_folder,
    expand_home,
    inside_folder,
    is_within,
    refuse_outputs_among_inputs,
    refuse_repeats,
    working_folder_under,
)
from cmce.arguments import OneLineParser, int_in, not_blank
from cmce.checkpoint import EMBEDDING_FORMAT, TRANSFORM_FORMAT
from cmce.config import Config, index_section_alone, parse_overrides, shown_key
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
from cmce.layout import RunLayout
from cmce.records import StepRecord
from cmce.storage import (
    check_output,
    clear_scratch,
    inputs_unchanged,
    is_remote,
    local_input,
    local_output,
    regular_files,
    restore_uris,
    run_after_uploads,
    scratch_dir,
    stands_for,
)

log = logging.getLogger("cmce")
MAX_HITS = 1_000_000  # hits one search answer may hold (cmce serve)
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


def _in(uri: str) -> Path:
    """An input file or folder: the local path, or a download of the s3:// object or prefix."""
    return local_input(uri)


def _folder_in(uri: str, flag: str) -> Path:
    """An input folder: one missing, or a file, read as "no files" (evaluate's --kd-dir gave a report without
    its KD rows, exit 0)."""
    path = _in(uri)
    if not path.exists():
        raise ValueError(f"{flag} {uri}: no such folder")
    if not path.is_dir():
        raise ValueError(f"{flag} {uri}: is a file, not a folder" + (" (give it with --kd)" if flag == "--kd-dir"
                                                                     else " (give it with --transform)"))
    return path


def _index_in(uri: str) -> Path:
    """An index folder, local (an s3:// prefix downloaded by its meta.json alone; cmce.index.index_folder)."""
    from cmce.index import index_folder

    return index_folder(uri, probe_object=True)


def _out(args: argparse.Namespace, uri: str, is_dir: bool = False, last: str | None = None,
         own: tuple[str, ...] | None = None, writes: str | None = None, kinds: tuple[str, ...] = ()) -> Path:
    """The local path a step writes the output `uri` to, checked before any work (cmce.storage.check_output;
    `own`: the files of a folder replaced whole). An s3:// output is uploaded when the command succeeds
    (main closes args.outputs before tracking); a failed command uploads nothing."""
    check_output(uri, is_dir, own, writes, kinds)
    if is_remote(uri) and not ddp.is_main():  # rank 0 writes and uploads; this copy stands for it (the resume state)
        stands_for(path := scratch_dir() / f"rank{ddp.current().rank}" / Path(uri).name, uri)
        return path
    return args.outputs.enter_context(local_output(uri, is_dir, last))


GALLERY = ("gallery",)
MERGED = ("gallery", "gallery_member")  # the kinds merge writes: that of its shards


def _parquet_out(args: argparse.Namespace, uri: str, kinds: tuple[str, ...]) -> Path:
    """A Parquet output: an existing file there is replaced only by one of the same kind (a gallery by a gallery)."""
    return _out(args, uri, writes="parquet", kinds=kinds)


def _checkpoint_out(args: argparse.Namespace, kind: str) -> Path:
    """--out of a checkpoint: an existing file there is replaced only by one of the same kind (a model by a model)."""
    return _out(args, args.out, writes="checkpoint", kinds=(kind,))


def _index_out(args: argparse.Namespace, uri: str) -> Path:
    from cmce.index import INDEX_FILES

    return _out(args, uri, is_dir=True, last="meta.json", own=INDEX_FILES)


def _settings(args: argparse.Namespace, extra: dict[str, Any] | None = None, flags: dict[str, str] | None = None
              ) -> dict[str, Any]:
    """The config overrides a command line asks for: --set pairs, --device, --threads, then a subcommand's own
    flags (`extra`; `flags` names the flag behind a key). A key both --set and a flag give is refused: the flag won
    without a word, as a key given twice to --set once did."""
    out = parse_overrides(args.set)
    flagged = [("device", "--device", args.device), ("num_threads", "--threads", args.threads),
               *((key, flag, key in (extra or {})) for key, flag in (flags or {}).items())]
    given = {key: flag for key, flag, value in flagged if value}  # the keys a flag gave
    for key, flag in given.items():
        if clash := next((k for k in _dotted_keys(out) if k == key or key.startswith(f"{k}.")
                          or k.startswith(f"{key}.")), None):
            raise ValueError(f"--set {shown_key(clash)} and {flag} both set {key}; give it once")
    if args.device:
        out["device"] = args.device
    if args.threads:
        out["num_threads"] = args.threads
    return {**out, **(extra or {})}


def _dotted_keys(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys `overrides` sets, a mapping value's own keys included (`index={type: hnsw}` sets index.type)."""
    keys = []
    for key, value in overrides.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


# what shapes a dataset when it is made: a step that reads a prepared --dataset takes it as it is
DATASET_KEYS = ("source", "path", "protocol", "disjoint_by", "heldout_fraction", "max_train_per_class",
                "max_test_per_class", "max_image_pixels")
MAKES_DATASETS = ("fetch-data", "prepare-data", "run")


def _config(args: argparse.Namespace, extra: dict[str, Any] | None = None, flags: dict[str, str] | None = None
            ) -> Config:
    """The config with the command line's overrides; `flags` names the flag behind an `extra` key, for messages."""
    from cmce.config import load_config

    overrides = _settings(args, extra, flags)
    if args.command not in MAKES_DATASETS and not getattr(args, "dataset_keys_said", False):
        args.dataset_keys_said = True  # the config is read more than once (the device, then the step)
        _warn_of_dataset_keys(args.command, parse_overrides(args.set))
    return load_config(_in(args.config), overrides, flags)


def _warn_of_dataset_keys(command: str, overrides: dict[str, Any]) -> None:
    """`cmce train --set data.max_train_per_class=1` trained on the whole train split without a word."""
    keys = [f"data.{k}" for k in overrides.get("data", {}) if k in DATASET_KEYS] if isinstance(
        overrides.get("data"), dict) else []
    keys += [k for k in overrides if k.startswith("data.") and k.removeprefix("data.") in DATASET_KEYS]
    if keys:
        log.warning("cmce %s: --set %s: not read by this step (a dataset is read as it was made); it applies "
                    "when a dataset is made: %s", command, ", ".join(keys), ", ".join(MAKES_DATASETS))


def _model(path: str) -> Path:
    """A checkpoint argument: a local path, an s3:// object, or a registered model `models:/NAME@ALIAS`."""
    if path.startswith("models:/"):
        from cmce.registry import resolve_model_uri

        return resolve_model_uri(path)
    if re.match(r"[a-z][a-z0-9+.-]*:/", path) and not is_remote(path):  # runs:/, mlflow-artifacts:/, http://, …
        raise ValueError(f"{path}: {MODEL_URIS}")
    return _in(path)


def _shard(args: argparse.Namespace):
    from cmce.data.loader import parse_shard

    return parse_shard(args.shard)


def cmd_fetch_data(args: argparse.Namespace) -> StepRecord:
    return stages.fetch_data(_config(args), stages.FetchOutputs(_out(args, args.out, is_dir=True)))


def cmd_prepare_data(args: argparse.Namespace) -> StepRecord:
    cfg = _config(args)
    # the next import read it as one of its files (--raw, an input folder, is checked with every input)
    if not args.raw and cfg.data.path and inside_folder(str(args.out), str(cfg.data.path)):
        raise ValueError(f"--out {args.out} is inside the data folder data.path {cfg.data.path}; write it elsewhere")
    return stages.prepare_data(cfg, stages.PrepareInputs(_in(args.raw) if args.raw else None, args.will_evaluate),
                               stages.DatasetOutputs(_parquet_out(args, args.out, ("dataset",))))


def cmd_train(args: argparse.Namespace) -> StepRecord | None:
    cfg = _config(args)
    if args.kd_teacher:
        if not cfg.kd.enabled:  # the stage writes nothing then: no input to fetch, no output to prepare or upload
            return stages.train_kd_student(cfg, stages.StudentInputs(Path(args.dataset), Path(args.kd_teacher)),
                                           stages.ModelOutputs(Path(args.out)))
        return stages.train_kd_student(cfg, stages.StudentInputs(_in(args.dataset), _model(args.kd_teacher)),
                                       stages.ModelOutputs(_checkpoint_out(args, EMBEDDING_FORMAT)))
    return stages.train_model(cfg, stages.TrainInputs(_in(args.dataset), args.model),
                              stages.ModelOutputs(_checkpoint_out(args, EMBEDDING_FORMAT)))


def cmd_fit_transform(args: argparse.Namespace) -> StepRecord | None:
    cfg = _config(args)
    inputs = stages.FitInputs(_in(args.dataset), _model(args.query_model), _model(args.gallery_model))
    embeddings = args.train_embeddings_out
    outputs = stages.FitOutputs(_checkpoint_out(args, TRANSFORM_FORMAT),
                                _parquet_out(args, embeddings, ("train_embeddings",)) if embeddings else None)
    return stages.fit_transform(cfg, inputs, outputs)


def cmd_embed_member(args: argparse.Namespace) -> StepRecord:
    inputs = stages.MemberInputs(_in(args.dataset), _model(args.query_model), _model(args.gallery_model),
                                 _model(args.transform), args.batch_size, _shard(args), args.workers)
    return stages.embed_member(inputs, stages.GalleryOutputs(_parquet_out(args, args.out, ("gallery_member",))))


def cmd_embed_gallery(args: argparse.Namespace) -> StepRecord:
    inputs = stages.EnsembleInputs(_in(args.dataset), _model(args.query_model), [_model(g) for g in args.gallery_model],
                                   [_model(t) for t in args.transform], args.batch_size, _shard(args), args.workers)
    members_dir = args.members_dir or default_folder(args, "members_dir")
    outputs = stages.EnsembleOutputs(_parquet_out(args, args.out, GALLERY), _out(args, members_dir, is_dir=True))
    return stages.embed_gallery(inputs, outputs)


def cmd_merge(args: argparse.Namespace) -> StepRecord:
    from cmce.tables import read_metadata

    shards = [_in(p) for p in args.shard_file]
    kind = read_metadata(shards[0]).get("kind") if shards else None  # merge writes the kind of its shards
    return stages.merge(stages.FilesInputs(shards),
                        stages.GalleryOutputs(_parquet_out(args, args.out, (kind,) if kind in MERGED else MERGED)))


def cmd_combine(args: argparse.Namespace) -> StepRecord:
    from cmce.layout import member_paths

    members = [_in(m) for m in args.member or []]
    if args.members_dir:
        if not args.config:
            raise ValueError("--members-dir needs --config (the gallery models, in ensemble order)")
        members += regular_files(member_paths(_config(args), _in(args.members_dir)), "--members-dir")
    if not members:
        raise ValueError("give --member files or --members-dir with --config")
    return stages.combine(stages.FilesInputs(members), stages.GalleryOutputs(_parquet_out(args, args.out, GALLERY)))


def _index_section_alone(args: argparse.Namespace) -> dict[str, Any] | None:
    """build-index's --config where it holds the `index:` section alone, else None; the file is read once (the
    device is selected before the step)."""
    if not hasattr(args, "index_section_alone"):
        args.index_section_alone = index_section_alone(_in(args.config))
    return args.index_section_alone


def cmd_build_index(args: argparse.Namespace) -> StepRecord:
    from cmce.config import index_config, load_index_section

    flags = {k: v for k, v in (("index.reject_fraction", args.reject_fraction), ("index.type", args.index_type))
             if v is not None}  # shorthands for --set: checked by the config like any other value
    named = {k: flag for k, flag in (("index.reject_fraction", "--reject-fraction"), ("index.type", "--index-type"))
             if k in flags}  # a value --set gave is blamed on --set
    if args.config and (raw := _index_section_alone(args)) is not None:
        overrides = _settings(args, flags, named)
        for key, flag in (("device", args.device), ("num_threads", args.threads)):
            if flag:  # global flags, not index settings
                del overrides[key]
        options = load_index_section(raw, _in(args.config), overrides, named)
    elif args.config:
        options = _config(args, flags, named).index
    else:
        if args.set:
            raise ValueError("--set needs --config")
        options = index_config(flags, "build-index", flags=named)
    return stages.build_gallery_index(options, stages.IndexInputs(_in(args.gallery)),
                                      stages.IndexOutputs(_index_out(args, args.out)))


def cmd_evaluate(args: argparse.Namespace) -> StepRecord:
    from cmce.evaluate import EVAL_FILES, EvalInputs
    from cmce.report import markdown_table

    transforms = [_model(t) for t in args.transform] + regular_files(sorted(_folder_in(
        args.transform_dir, "--transform-dir").glob("*.pt") if args.transform_dir else []), "--transform-dir")
    students = [_model(s) for s in args.kd] + regular_files(sorted(_folder_in(args.kd_dir, "--kd-dir").rglob("*.pt")
                                                                   if args.kd_dir else []), "--kd-dir")
    inputs = EvalInputs(_in(args.dataset), _model(args.query_model), _in(args.gallery), transforms, students,
                        args.index)
    out = _out(args, args.out, is_dir=True, last="metrics.json", own=EVAL_FILES)
    record = stages.evaluate_all(_config(args), inputs, stages.EvalOutputs(out))
    _say(markdown_table(json.loads((out / "metrics.json").read_text())))
    return record


def cmd_search(args: argparse.Namespace) -> None:
    from cmce.search import search_images

    if args.exclude_self and args.images:  # an image file has no id in the index: it would drop nothing
        raise ValueError("--exclude-self applies to --dataset, not --images")
    images = [(p, _in(p)) for p in args.images]
    for given, local in images:  # checked before the model and index load; read, they failed with a bare OSError
        if not local.exists():
            raise ValueError(f"--images {given}: no such file")
        if local.is_dir():
            raise ValueError(f"--images {given}: is a folder; give its image files (e.g. {given.rstrip('/')}/*.png)")
    split, limit = "test" if args.split is None else args.split, args.limit or 0  # None: not given (see main)
    for hit in search_images(_index_in(args.index), _model(args.query_model), images,
                             _in(args.dataset) if args.dataset else None, split, limit, args.k,
                             _in(args.gallery) if args.gallery else None, args.exclude_self):
        _say(json.dumps(hit) + "\n")


def cmd_serve(args: argparse.Namespace) -> None:
    from cmce.serving.queries import Limits
    from cmce.serving.server import ServeOptions, serve

    if args.max_queries * args.max_k > MAX_HITS:  # one answer's memory and size: ~100 bytes a hit
        raise ValueError(f"--max-queries {args.max_queries} × --max-k {args.max_k} allows more than {MAX_HITS:,} "
                         "hits in one answer; lower one of them")
    bodies = 4 * args.max_body_bytes if args.max_bodies_bytes is None else args.max_bodies_bytes
    if bodies < args.max_body_bytes:  # the largest body allowed would never be served
        raise ValueError(f"--max-bodies-bytes {bodies} is less than --max-body-bytes {args.max_body_bytes}")
    limits = Limits(max_queries=args.max_queries, max_k=args.max_k, max_body_bytes=args.max_body_bytes,
                    max_bodies_bytes=bodies, max_image_pixels=args.max_image_pixels)
    opts = ServeOptions(_index_in(args.index), args.query_model, _in(args.dataset) if args.dataset else None, args.host,
                        args.port, args.reload_interval, limits, args.access_log, args.search_threads,
                        args.max_connections, args.head_timeout)
    serve(opts, _model, lambda line: _say(line, or_log=True))


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


def cmd_export_query(args: argparse.Namespace) -> StepRecord:
    inputs = stages.ExportInputs(_model(args.query_model), _in(args.check_dataset) if args.check_dataset else None,
                                 _index_in(args.check_index) if args.check_index else None, args.split)
    if inputs.check_index and not inputs.check_dataset:
        raise ValueError("--check-index needs --check-dataset (the images to search it with)")
    record = stages.export_query(inputs, stages.ExportOutputs(_out(args, args.out, writes="onnx")))
    _say(json.dumps({"out": args.out, **record.params, **record.metrics}) + "\n")
    return record


def cmd_run(args: argparse.Namespace) -> None:
    from cmce.report import markdown_table

    cfg = _config(args)
    remote = is_remote(cfg.output_dir)
    if (held := working_folder_under(cfg.output_dir)) is not None:  # as `--out .` is for every other step
        raise ValueError(f"output_dir: {cfg.output_dir} {'is' if held == Path('.') else 'holds'} the working folder; "
                         "give a folder for the run's outputs")
    if cfg.data.path and not remote and is_within(cfg.output_dir, cfg.data.path):
        # the run's folders landed among the class folders; the next run read them as classes
        raise ValueError(f"output_dir: {cfg.output_dir} is inside data.path {cfg.data.path}, the data it reads; give "
                         "a folder outside it")
    lay = RunLayout(Path(cfg.output_dir))
    written = lay.written_folders()
    if cfg.data.path and not remote and any(is_within(cfg.data.path, str(f)) for f in written):
        # `data.path=<output_dir>/data`: the run wrote its dataset among the ImageFolder's class folders
        raise ValueError(f"data.path: {cfg.data.path} is inside a folder the run writes in output_dir "
                         f"{cfg.output_dir}; keep the data outside it")
    if remote:  # the whole run in scratch, uploaded when it succeeds
        cfg = _config(args, {"output_dir": str(_out(args, cfg.output_dir, is_dir=True, last="eval/metrics.json"))})
    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        metrics = stages.run_all(cfg)
    else:  # tracked as the pipeline runners track: a parent run (or --mlflow-parent's), a nested run per stage
        from cmce.tracking import TrackingInfo, closing_parent, publish, start_parent_run

        own = not args.mlflow_parent
        info = TrackingInfo(uri, args.mlflow_parent or start_parent_run(uri, "cmce-run", _config(args).to_dict()))
        with closing_parent(info) if own else contextlib.nullcontext():
            metrics = stages.run_all(cfg, publish=lambda record: publish(info, record))
    log.info("outputs under %s", restore_uris(cfg.output_dir))
    from cmce.next_steps import next_steps
    from cmce.storage import after_upload

    run = RunLayout(Path(cfg.output_dir))  # an s3:// run's scratch copy: said once uploaded, by the URIs
    said = next_steps(*(restore_uris(str(p)) for p in (run.model(cfg.query_model.name), run.index, run.dataset)))
    after_upload(run.root, lambda: sys.stderr.write(said))
    _say(markdown_table(metrics))


def cmd_add_gallery_model(args: argparse.Namespace) -> StepRecord:
    inputs = stages.AddModelInputs(_in(args.dataset), _in(args.gallery), _model(args.query_model),
                                   _model(args.gallery_model))
    outputs = stages.AddModelOutputs(
        _parquet_out(args, args.out, GALLERY),
        _out(args, args.work_dir or default_folder(args, "work_dir"), is_dir=True),
        _index_out(args, args.index_out) if args.index_out else None)
    return stages.add_gallery_model(_config(args), inputs, outputs)


def cmd_upgrade_query_model(args: argparse.Namespace) -> StepRecord:
    from cmce.lifecycle import train_embedding_files
    from cmce.transform import check_transform_folder

    inputs = stages.UpgradeInputs(_in(args.dataset), _in(args.gallery), _model(args.query_model),
                                  train_embedding_files([_in(p) for p in args.train_embeddings]))

    index = _index_out(args, args.index_out) if args.index_out else None
    if not is_remote(args.transforms_out):
        check_transform_folder(args.transforms_out)
    outputs = stages.UpgradeOutputs(_parquet_out(args, args.out, GALLERY),
                                    _out(args, args.transforms_out, is_dir=True, own=("*.pt",)), index)
    return stages.upgrade_query_model(_config(args), inputs, outputs)


def cmd_add_member(args: argparse.Namespace) -> StepRecord:
    return stages.add_member(stages.MemberFileInputs(_in(args.gallery), _in(args.member)),
                             stages.GalleryOutputs(_parquet_out(args, args.out, GALLERY)))


def cmd_gate(args: argparse.Namespace) -> StepRecord:
    inputs = stages.GateInputs(_in(args.dataset), _model(args.baseline_query_model), _in(args.baseline_gallery),
                               _model(args.query_model), _in(args.gallery))
    decision = _out(args, args.out, writes="json")
    record = stages.gate(_config(args), inputs, stages.GateOutputs(decision))
    from cmce.promotion import note_unmoved, withhold_unregistered

    why = f"candidate regressed on {record.params['regressed']}"
    if args.mlflow_parent:
        why = withhold_unregistered(record, decision, os.environ["MLFLOW_TRACKING_URI"]) or why
    elif note_unmoved(record, decision, "the gate is not tracked (no --mlflow-parent)"):  # aliases move on publishing
        log.warning("cmce gate: promoted, but no alias moved: give --mlflow-parent (and --mlflow-uri) to record the "
                    "gate and move 'production'")
    if args.require_promotion and not record.metrics["promoted"]:  # a verdict, not bad input: exit 1, like diff
        log.error("cmce gate: %s: not promoted: %s (see %s)", args.gallery, why, args.out)
        args.exit_status = 1
    return record


def cmd_track_start(args: argparse.Namespace) -> None:
    from cmce.storage import write_text
    from cmce.tracking import start_parent_run
    from cmce.tracking_store import absolute_uri, tracking_uri

    cfg = _config(args)
    # the store as a file path from any working folder: later steps read the URI from this file
    uri = absolute_uri(args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(args.run_dir))
    out = _out(args, args.out, writes="json") if args.out else None  # checked before a run is opened
    info = {"uri": uri, "run_id": start_parent_run(uri, args.name, cfg.to_dict(), args.artifact_location)}
    if out is not None:
        write_text(out, json.dumps(info))
    _say(json.dumps(info) + "\n")


def cmd_track_end(args: argparse.Namespace) -> None:
    from cmce.tracking import end_run

    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not (uri and args.mlflow_parent):
        raise ValueError("track-end needs --mlflow-parent RUN_ID and --mlflow-uri (or MLFLOW_TRACKING_URI)")
    end_run(uri, args.mlflow_parent, args.status)


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

    sp = add("fetch-data", cmd_fetch_data, "unpack the configured packaged data source into a raw-data folder")
    sp.add_argument("--out", required=True, help="the raw-data folder to make (prepare-data --raw reads it)")

    sp = add("prepare-data", cmd_prepare_data, "import the configured data source into a dataset Parquet file")
    sp.add_argument("--out", required=True, help="the dataset Parquet file to write")
    sp.add_argument("--raw", default=None, help="the folder read: one fetch-data wrote, or a local source's root "
                    "(an ImageFolder, a benchmark's folder) in place of data.path (default: data.path)")
    sp.add_argument("--will-evaluate", action="store_true",
                    help="its test split will be evaluated with this config: refuse now an evaluate.recall_k it cannot "
                         "meet (K at least its size), not after the training (else a warning)")

    sp = add("train", cmd_train, "train one embedding model (or, with --kd-teacher, the KD baseline student)")
    sp.add_argument("--dataset", required=True, help=dataset_help)
    sp.add_argument("--model", default=None, help="model name from the config (query or a gallery model)")
    sp.add_argument("--kd-teacher", default=None, help="gallery model checkpoint to distil into a query-sized student")
    sp.add_argument("--out", required=True, help="the checkpoint to write (.pt)")

    sp = add("fit-transform", cmd_fit_transform, "fit the transformation of one gallery model into the query space")
    sp.add_argument("--dataset", required=True, help=f"{dataset_help}; its train split is read")
    sp.add_argument("--query-model", required=True, help=f"the frozen query model {checkpoint}")
    sp.add_argument("--gallery-model", required=True, help=f"the frozen gallery model {checkpoint}")
    sp.add_argument("--out", required=True, help="the transformation checkpoint to write (.pt)")
    sp.add_argument("--train-embeddings-out", default=None, help="also keep the raw train embeddings (Parquet)")

    for name, fn, help_ in (
        ("embed-gallery", cmd_embed_gallery, "embed the gallery with every gallery model and combine the ensemble"),
        ("embed-member", cmd_embed_member, "embed the gallery with one gallery model and its transformation"),
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

    sp = add("combine", cmd_combine, "combine per-model embedding files into the gallery Parquet", config=False)
    sp.add_argument("--member", action="append", default=[], help="per-model file, in ensemble order (repeatable)")
    sp.add_argument("--members-dir", default=None, help="or: DIR/<gallery model>.parquet for each model in --config")
    sp.add_argument("--config", default=None, help="YAML config naming the gallery models (with --members-dir)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    sp.add_argument("--out", required=True, help="the gallery Parquet to write")

    sp = add("merge", cmd_merge, "concatenate the shards of a gallery (or per-model) file, in shard order",
             config=False)
    sp.add_argument("shard_file", nargs="+", help="shard files from `embed-gallery --shard I/K` (any order)")
    sp.add_argument("--out", required=True, help="the merged Parquet to write")

    sp = add("build-index", cmd_build_index, "build the FAISS index, optionally rejecting uncertain items",
             config=False)
    sp.add_argument("--gallery", required=True, help=gallery_help)
    sp.add_argument("--out", required=True, help="the index folder to write (replaced whole)")
    sp.add_argument("--config", default=None, help="YAML config, whole or its `index:` section alone: index type, "
                                                 "rejection and the type's parameters")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    sp.add_argument("--reject-fraction", type=float, default=None, help="default: the config's, else 0")
    sp.add_argument("--index-type", default=None, help="flat | ivfpq | hnsw | auto (default: the config's, else flat)")

    sp = add("evaluate", cmd_evaluate, "evaluate every configuration; write metrics.json, results.md, plots")
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

    sp = add("search", cmd_search, "search the index with query images; prints JSON lines", config=False)
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

    sp = add("export-query", cmd_export_query, "export the query model to ONNX for the edge (uint8 pixels in, "
             "raw embedding out), optionally checked against torch first", config=False)
    sp.add_argument("--query-model", required=True, help=f"query model checkpoint {checkpoint}")
    sp.add_argument("--out", required=True, help="the .onnx file (written only when the check passes)")
    sp.add_argument("--check-dataset", default=None,
                    help="compare onnxruntime with torch on this dataset's --split: max abs difference <= 1e-4 and "
                         "identical top-10 hits, else exit 2 and nothing written")
    sp.add_argument("--check-index", default=None,
                    help="search this built index for the top-10 comparison (default: the split's own embeddings)")
    sp.add_argument("--split", default="test", choices=SPLITS, help="the --check-dataset split (default %(default)s)")

    add("run", cmd_run, "run every step in one process from a config")

    sp = add("serve", cmd_serve, "HTTP search service over a built index (POST /search, /healthz, /readyz, "
             "/version, /metrics); reloads the index when it is rebuilt", config=False)
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
    sp.add_argument("--search-threads", type=_threads, default=1,
                    help="threads of one index search; requests already run in parallel (default 1)")
    sp.add_argument("--access-log", action="store_true", help="log every request")
    sp.add_argument("--max-connections", type=int_in(1, 1 << 20), default=None,
                    help="open connections at once; more are answered 503 and closed (default and most: what the "
                         "process's file limit allows)")
    sp.add_argument("--head-timeout", type=_head_timeout, default=10.0, metavar="SECONDS",
                    help="for a connection to send a whole request head (and to read an answer), else it is closed "
                         "(default 10)")

    sp = add("add-gallery-model", cmd_add_gallery_model,
             "add a trained gallery model to a live ensemble (only that model embeds the gallery)")
    sp.add_argument("--dataset", required=True, help="dataset Parquet (train split to fit T, test split = gallery)")
    sp.add_argument("--gallery", required=True, help="current gallery Parquet")
    sp.add_argument("--query-model", required=True, help=f"the served query model {checkpoint}")
    sp.add_argument("--gallery-model", required=True, help="the new gallery model checkpoint")
    sp.add_argument("--out", required=True, help="new gallery Parquet (may equal --gallery: replaced atomically)")
    sp.add_argument("--index-out", default=None, help="also rebuild the index here")
    sp.add_argument("--work-dir", default=None, help="where the new transformation and embeddings go")

    sp = add("upgrade-query-model", cmd_upgrade_query_model,
             "refit all transformations for a new query model from stored embeddings; gallery images unread")
    sp.add_argument("--dataset", required=True, help="dataset Parquet; only its train split is read")
    sp.add_argument("--gallery", required=True, help="current gallery Parquet (its images are not read again)")
    sp.add_argument("--query-model", required=True, help="the new query model checkpoint")
    sp.add_argument("--train-embeddings", nargs="+", required=True,
                    help="stored train embeddings, one file per member, or folders of them")
    sp.add_argument("--transforms-out", required=True, help="folder for the refitted transformations")
    sp.add_argument("--out", required=True, help="new gallery Parquet (may equal --gallery)")
    sp.add_argument("--index-out", default=None, help="also rebuild the index here")

    sp = add("add-member", cmd_add_member, "add one per-model file (from embed-member) to a gallery", config=False)
    sp.add_argument("--gallery", required=True, help="current gallery Parquet")
    sp.add_argument("--member", required=True, help="per-model file of the new gallery model")
    sp.add_argument("--out", required=True, help="new gallery Parquet (may equal --gallery: replaced atomically)")

    sp = add("gate", cmd_gate, "promotion gate: compare a candidate gallery with the served one on labelled "
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

    sp = add("track-start", cmd_track_start, "open the parent MLflow run of a pipeline run; prints its id")
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

    sp = add("track-end", cmd_track_end, "close the parent MLflow run", config=False)
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
                                                and _index_section_alone(args) is not None):
        devices.select(_config(args).device, f"{args.config}: device")
    else:
        devices.select("auto")


def _say(text: str, or_log: bool = False) -> None:
    """A command's output on standard output; a failed write names it (a full disk behind `> file`). Standard
    output closed (`>&-`), gone (`| true`) or failing: refused, or with `or_log` (a line only to inform) logged
    instead."""
    if sys.stdout is None:
        if not or_log:
            raise OSError("standard output: closed (started with >&-?); nothing written")
        log.info("%s", text.rstrip("\n"))
        return
    try:
        try:
            sys.stdout.write(text)
        except UnicodeEncodeError:  # PYTHONIOENCODING=ascii, LANG=C: a path's é is escaped, not a failed step
            encoding = sys.stdout.encoding or "ascii"
            sys.stdout.write(text.encode(encoding, "backslashreplace").decode(encoding))
        sys.stdout.flush()
    except OSError as err:
        if or_log:  # a server announcing its URL to a reader that has gone (`| true`) serves on
            if isinstance(err, BrokenPipeError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the exit's flush must not fail on the pipe
            log.info("%s", text.rstrip("\n"))
            return
        if isinstance(err, BrokenPipeError):
            raise  # the reader went away (`| head`): main ends quietly
        raise OSError(f"standard output: not written: {os.strerror(err.errno) if err.errno else err}") from None


TRACKING_COMMANDS = ("run", "track-start", "track-end")  # they read --mlflow-uri without --mlflow-parent
REGISTRY_SCHEMES = ("models:/",)


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
            isinstance(v, str) and v.startswith(REGISTRY_SCHEMES) for v in _string_arguments(args)):
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
