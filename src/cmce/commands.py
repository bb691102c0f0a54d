"""Each `cmce` subcommand: its parsed arguments → a stage's inputs and outputs (cmce.stages), the stage called.

Inputs are local paths or downloads of s3:// URIs (models also `models:/NAME@ALIAS`), outputs scratch paths that
are uploaded when the command succeeds (cmce.storage); the parser and the error handling around a command are
cmce.cli's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from cmce import distributed as ddp
from cmce import s3, stages
from cmce.argument_paths import MODEL_URIS, default_folder, inside_folder, is_registered
from cmce.checkpoint import EMBEDDING_FORMAT, TRANSFORM_FORMAT
from cmce.config import Config, index_section_alone, shown_key
from cmce.layout import RunLayout
from cmce.output_checks import check_output
from cmce.overrides import clashing_key, parse_overrides
from cmce.records import StepRecord
from cmce.storage import is_remote, local_input, local_output, regular_files, restore_uris, scratch_dir, stands_for

log = logging.getLogger("cmce")
MAX_HITS = 1_000_000  # hits one search answer may hold (cmce serve)


def _in(uri: str) -> Path:
    """An input file or folder: the local path, or a download of the s3:// object or prefix."""
    return local_input(uri)


def _folder_in(uri: str, flag: str) -> Path:
    """An input folder: one missing, or a file, read as "no files" (evaluate's --kd-dir gave a report without
    its KD rows, exit 0). A folder of checkpoints that an upgrade-query-model killed mid-swap left as `.<name>.old`
    is put back first, as an index's reader puts back its folder."""
    from cmce.storage import restore_dir, swap_lock

    path = _in(uri)
    with swap_lock(path, exclusive=False):
        restore_dir(path, ("*.pt",))
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


def _out(args: argparse.Namespace, uri: str, is_dir: bool = False, last: str | tuple[str, ...] | None = None,
         own: tuple[str, ...] | None = None, writes: str | None = None, kinds: tuple[str, ...] = ()) -> Path:
    """The local path a step writes the output `uri` to, checked before any work (cmce.output_checks.check_output;
    `own`: the files of a folder replaced whole). An s3:// output is uploaded when the command succeeds
    (cmce.cli.main closes args.outputs, the ExitStack it gives each command, before tracking); a failed command
    uploads nothing."""
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
        if clash := clashing_key(out, key):
            raise ValueError(f"--set {shown_key(clash)} and {flag} both set {key}; give it once")
    if args.device:
        out["device"] = args.device
    if args.threads:
        out["num_threads"] = args.threads
    return {**out, **(extra or {})}


# what shapes a dataset when it is made: a step that reads a prepared --dataset takes it as it is
DATASET_KEYS = ("source", "path", "protocol", "disjoint_by", "heldout_fraction", "max_train_per_class",
                "max_test_per_class", "max_image_pixels")
MAKES_DATASETS = ("fetch-data", "prepare-data", "run")


def config_of(args: argparse.Namespace, extra: dict[str, Any] | None = None, flags: dict[str, str] | None = None
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
    if is_registered(path):
        from cmce.registry import resolve_model_uri

        return resolve_model_uri(path)
    if re.match(r"[a-z][a-z0-9+.-]*:/", path) and not is_remote(path):  # runs:/, mlflow-artifacts:/, http://, …
        raise ValueError(f"{path}: {MODEL_URIS}")
    return _in(path)


def _shard(args: argparse.Namespace):
    from cmce.data.loader import parse_shard

    return parse_shard(args.shard)


def cmd_fetch_data(args: argparse.Namespace) -> StepRecord:
    # an importer checks the folder it fills, which for s3:// is an empty scratch copy: a prefix holding anything
    # is refused (its digits.npz, whatever it held, was written over)
    if is_remote(args.out) and (held := s3.list_keys(args.out.rstrip("/"))):
        raise ValueError(f"{args.out}: holds {', '.join(held[:5])}{' …' if len(held) > 5 else ''}; fetch-data fills "
                         "only an empty s3:// prefix (what is there, even an earlier fetch, is not checked): delete "
                         "it, or give another prefix")
    return stages.fetch_data(config_of(args), stages.FetchOutputs(_out(args, args.out, is_dir=True)))


def cmd_prepare_data(args: argparse.Namespace) -> StepRecord:
    cfg = config_of(args)
    # the next import read it as one of its files (--raw, an input folder, is checked with every input)
    if not args.raw and cfg.data.path and inside_folder(str(args.out), str(cfg.data.path)):
        raise ValueError(f"--out {args.out} is inside the data folder data.path {cfg.data.path}; write it elsewhere")
    return stages.prepare_data(cfg, stages.PrepareInputs(_in(args.raw) if args.raw else None, args.will_evaluate),
                               stages.DatasetOutputs(_parquet_out(args, args.out, ("dataset",))))


def cmd_train(args: argparse.Namespace) -> StepRecord | None:
    cfg = config_of(args)
    if args.kd_teacher:
        if not cfg.kd.enabled:  # the stage writes nothing then: no input to fetch, no output to prepare or upload
            return stages.train_kd_student(cfg, stages.StudentInputs(Path(args.dataset), Path(args.kd_teacher)),
                                           stages.ModelOutputs(Path(args.out)))
        return stages.train_kd_student(cfg, stages.StudentInputs(_in(args.dataset), _model(args.kd_teacher)),
                                       stages.ModelOutputs(_checkpoint_out(args, EMBEDDING_FORMAT)))
    return stages.train_model(cfg, stages.TrainInputs(_in(args.dataset), args.model),
                              stages.ModelOutputs(_checkpoint_out(args, EMBEDDING_FORMAT)))


def cmd_fit_transform(args: argparse.Namespace) -> StepRecord | None:
    cfg = config_of(args)
    inputs = stages.FitInputs(_in(args.dataset), _model(args.query_model), _model(args.gallery_model))
    embeddings = args.train_embeddings_out
    outputs = stages.FitOutputs(_checkpoint_out(args, TRANSFORM_FORMAT),
                                _parquet_out(args, embeddings, ("train_embeddings",)) if embeddings else None)
    return stages.fit_transform(cfg, inputs, outputs)


def _config_device(args: argparse.Namespace) -> None:
    """An embedding step given --config computes where the config says, with its thread count (as a pipeline's
    embedding task does); without one, where --device and --threads say."""
    _no_set_without_config(args)
    if args.config:
        stages.use_device(config_of(args))


def _no_set_without_config(args: argparse.Namespace) -> None:
    """--set overrides a config: without --config it would change nothing, silently."""
    if args.set and not args.config:
        raise ValueError("--set needs --config")


def cmd_embed_member(args: argparse.Namespace) -> StepRecord:
    _config_device(args)
    inputs = stages.MemberInputs(_in(args.dataset), _model(args.query_model), _model(args.gallery_model),
                                 _model(args.transform), args.batch_size, _shard(args), args.workers)
    return stages.embed_member(inputs, stages.GalleryOutputs(_parquet_out(args, args.out, ("gallery_member",))))


def cmd_embed_gallery(args: argparse.Namespace) -> StepRecord:
    _config_device(args)
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
        members += regular_files(member_paths(config_of(args), _in(args.members_dir)), "--members-dir")
    if not members:
        raise ValueError("give --member files or --members-dir with --config")
    return stages.combine(stages.FilesInputs(members), stages.GalleryOutputs(_parquet_out(args, args.out, GALLERY)))


def index_section_only(args: argparse.Namespace) -> dict[str, Any] | None:
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
    if args.config and (raw := index_section_only(args)) is not None:
        overrides = _settings(args, flags, named)
        for key, flag in (("device", args.device), ("num_threads", args.threads)):
            if flag:  # global flags, not index settings
                del overrides[key]
        options = load_index_section(raw, _in(args.config), overrides, named)
    elif args.config:
        options = config_of(args, flags, named).index
    else:
        _no_set_without_config(args)
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
    record = stages.evaluate_all(config_of(args), inputs, stages.EvalOutputs(out))
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
    if args.max_request_pixels < args.max_image_pixels:  # the largest image allowed would be refused as a request
        raise ValueError(f"--max-request-pixels {args.max_request_pixels} is less than --max-image-pixels "
                         f"{args.max_image_pixels}")
    limits = Limits(max_queries=args.max_queries, max_k=args.max_k, max_body_bytes=args.max_body_bytes,
                    max_bodies_bytes=bodies, max_image_pixels=args.max_image_pixels,
                    max_request_pixels=args.max_request_pixels)
    opts = ServeOptions(_index_in(args.index), args.query_model, _in(args.dataset) if args.dataset else None, args.host,
                        args.port, args.reload_interval, limits, args.access_log, args.search_threads,
                        args.max_connections, args.head_timeout)
    serve(opts, _model, lambda line: _say(line, or_log=True))


def cmd_export_query(args: argparse.Namespace) -> StepRecord:
    from cmce.export import ONNX_FORMAT

    inputs = stages.ExportInputs(_model(args.query_model), _in(args.check_dataset) if args.check_dataset else None,
                                 _index_in(args.check_index) if args.check_index else None, args.split)
    if inputs.check_index and not inputs.check_dataset:
        raise ValueError("--check-index needs --check-dataset (the images to search it with)")
    # an ONNX file there is replaced only by a cmce export (a detector model was replaced, exit 0)
    out = _out(args, args.out, writes="onnx", kinds=(ONNX_FORMAT,))
    record = stages.export_query(inputs, stages.ExportOutputs(out))
    _say(json.dumps({"out": args.out, **record.params, **record.metrics}) + "\n")
    return record


def cmd_run(args: argparse.Namespace) -> None:
    from cmce.report import markdown_table

    cfg = config_of(args)
    remote = is_remote(cfg.output_dir)
    stages.check_run_folder(cfg)  # before a tracking run is opened (run_all checks again: benchmarks call it alone)
    if remote:  # the whole run in scratch, uploaded when it succeeds
        cfg = config_of(args, {"output_dir": str(_out(args, cfg.output_dir, is_dir=True,
                                                          last=RunLayout.COMPLETION_MARKERS))})
    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        metrics = stages.run_all(cfg)
    else:  # tracked as the pipeline runners track: a parent run (or --mlflow-parent's), a nested run per stage
        from cmce.tracking import TrackingInfo, closing_parent, publish, start_parent_run

        own = not args.mlflow_parent
        info = TrackingInfo(uri, args.mlflow_parent or start_parent_run(uri, "cmce-run", config_of(args).to_dict()))
        with closing_parent(info) if own else contextlib.nullcontext():
            metrics = stages.run_all(cfg, publish=lambda record: publish(info, record))
    log.info("outputs under %s", restore_uris(cfg.output_dir))
    from cmce.next_steps import next_steps
    from cmce.storage import after_upload

    run = RunLayout(Path(cfg.output_dir))  # an s3:// run's scratch copy: said once uploaded, by the URIs
    query, index, dataset, gallery = (restore_uris(str(p)) for p in (run.model(cfg.query_model.name), run.index,
                                                                     run.dataset, run.gallery))
    said = next_steps(query, index, dataset, gallery=gallery)
    after_upload(run.root, lambda: sys.stderr.write(said))
    _say(markdown_table(metrics))


def cmd_add_gallery_model(args: argparse.Namespace) -> StepRecord:
    inputs = stages.AddModelInputs(_in(args.dataset), _in(args.gallery), _model(args.query_model),
                                   _model(args.gallery_model))
    outputs = stages.AddModelOutputs(
        _parquet_out(args, args.out, GALLERY),
        _out(args, args.work_dir or default_folder(args, "work_dir"), is_dir=True),
        _index_out(args, args.index_out) if args.index_out else None)
    return stages.add_gallery_model(config_of(args), inputs, outputs)


def cmd_upgrade_query_model(args: argparse.Namespace) -> StepRecord:
    from cmce.transform import check_transform_folder

    inputs = stages.UpgradeInputs(_in(args.dataset), _in(args.gallery), _model(args.query_model),
                                  [_in(p) for p in args.train_embeddings])

    index = _index_out(args, args.index_out) if args.index_out else None
    if is_remote(args.transforms_out):  # the checkpoints there were written over, exit 0
        _check_remote_transform_folder(args.transforms_out)
    else:
        check_transform_folder(args.transforms_out)
    outputs = stages.UpgradeOutputs(_parquet_out(args, args.out, GALLERY),
                                    _out(args, args.transforms_out, is_dir=True, own=("*.pt",)), index)
    return stages.upgrade_query_model(config_of(args), inputs, outputs)


def _check_remote_transform_folder(uri: str) -> None:
    """check_transform_folder of an s3:// prefix, on copies of its *.pt objects (none larger than a checkpoint
    whose kind is read before a step: MAX_REMOTE_CHECKPOINT)."""
    from cmce.output_checks import MAX_REMOTE_CHECKPOINT
    from cmce.transform import check_transform_folder

    uri = uri.rstrip("/")
    with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
        for name in (k for k in s3.list_keys(uri) if "/" not in k and k.endswith(".pt")):
            if (s3.object_size(f"{uri}/{name}") or 0) > MAX_REMOTE_CHECKPOINT:
                raise ValueError(f"{uri}: holds {name}, larger than a transformation is; this step replaces the "
                                 "folder whole, so give an empty or new folder")
            s3.download(f"{uri}/{name}", Path(tmp) / name)
        check_transform_folder(tmp, shown=uri)


def cmd_add_member(args: argparse.Namespace) -> StepRecord:
    return stages.add_member(stages.MemberFileInputs(_in(args.gallery), _in(args.member)),
                             stages.GalleryOutputs(_parquet_out(args, args.out, GALLERY)))


def cmd_gate(args: argparse.Namespace) -> StepRecord:
    inputs = stages.GateInputs(_in(args.dataset), _model(args.baseline_query_model), _in(args.baseline_gallery),
                               _model(args.query_model), _in(args.gallery))
    decision = _out(args, args.out, writes="json")
    record = stages.gate(config_of(args), inputs, stages.GateOutputs(decision))
    from cmce.promotion import note_unmoved, withhold_unmovable

    why = f"candidate regressed on {record.params['regressed']}"
    if args.mlflow_parent:
        why = withhold_unmovable(record, decision, os.environ["MLFLOW_TRACKING_URI"]) or why
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

    cfg = config_of(args)
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
