"""python -m pipeline compile | run --local [--pipeline NAME] | submit --host URL [--pipeline NAME]

Pipelines: cmce (the whole method), add-gallery-model and upgrade-query-model (live-gallery operations
on the artifacts of a previous run, see pipeline/lifecycle.py)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")
ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "pipeline" / "cmce_pipeline.yaml"
LIFECYCLE = ("add-gallery-model", "upgrade-query-model")
PACKAGES = {"cmce": COMPILED, **{name: ROOT / "pipeline" / f"{name.replace('-', '_')}.yaml" for name in LIFECYCLE}}
# the lifecycle pipelines' inputs: artifacts of a previous run, by URI
INPUT_URIS = ("dataset_uri", "query_model_uri", "gallery_uri", "train_embeddings_uri")
FOLDER_INPUTS = ("train_embeddings_uri",)  # one file per gallery model; the others are one file each
URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/")  # two letters or more: not a drive letter
LOCAL_NOOP_WARNINGS = (r"Task '.*': settings \[.*\] have no effect in the current local runner",
                       r"You may be attemping to run a task that uses custom or non-Python base image")
MLFLOW_SCHEMES = ("models", "runs", "mlflow-artifacts")  # MLflow's own URIs: no file of a task's, anywhere


def placement_from_env():
    """CMCE_CPU_IMAGE / CMCE_CUDA_IMAGE name the images, CMCE_GPU=0 (or false, no) compiles a CPU-only pipeline,
    CMCE_K8S_SECRET names the Kubernetes Secret of credentials every pod reads ("" = none); read when a
    pipeline is built, never at import."""
    from pipeline.cmce_pipeline import Placement

    secret = os.environ.get("CMCE_K8S_SECRET", Placement.secret)
    if secret and not K8S_NAME.fullmatch(secret):  # else compiled into every task, refused by the cluster at run time
        raise ValueError(f"environment variable CMCE_K8S_SECRET={secret!r}: not a Kubernetes Secret name (lower-case "
                         "letters, digits, '-' and '.', at most 253 characters, starting and ending alphanumeric)")
    return Placement(image_from_env("CMCE_CPU_IMAGE", Placement.cpu_image),
                     image_from_env("CMCE_CUDA_IMAGE", Placement.cuda_image), env_flag("CMCE_GPU", True), secret)


# An image reference as the OCI distribution grammar writes it: [host[:port]/]path[:tag][@sha256:digest], the path
# of lower-case alphanumeric components joined by '.', '_', '__' or dashes
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:]+\])"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(rf"(?:{_HOST}(?::[0-9]+)?/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
                             r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")


def image_from_env(name: str, default: str) -> str:
    """An image variable: unset, the default; set, an image reference, else refused by name. Set but blank is
    refused too (`CMCE_CUDA_IMAGE="$IMG"` with IMG unset compiled tasks without an image, exit 0): the default is
    a local placeholder no cluster can pull, so a value meant to replace it must not quietly fall back to it."""
    if name not in os.environ:
        return default
    value = os.environ[name]
    if not value.strip():
        raise ValueError(f"environment variable {name} is set but empty; unset it for the default {default!r}, "
                         "or name an image")
    if not IMAGE_REFERENCE.fullmatch(value):
        raise ValueError(f"environment variable {name}={value!r}: not an image reference ([host[:port]/]path[:tag]"
                         "[@sha256:digest]; the path lower-case letters, digits and '.', '_', '-' separators)")
    return value


K8S_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # DNS-1123
FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def env_flag(name: str, default: bool) -> bool:
    """A yes/no environment variable: 1/0, true/false, yes/no, on/off (any case); anything else is refused by
    name (`CMCE_GPU=false` compiled a GPU pipeline: only `0` counted)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in FLAGS:
        raise ValueError(f"environment variable {name}={os.environ[name]!r}: one of {', '.join(FLAGS)} expected")
    return FLAGS[value]


def pipeline_function(name: str, parallelism: int = 0):
    if name == "cmce":
        from pipeline.cmce_pipeline import make_pipeline

        return make_pipeline(parallelism=parallelism, placement=placement_from_env())
    from pipeline.lifecycle import PIPELINES

    return PIPELINES[name](placement=placement_from_env())


def compile_pipeline(out: Path = COMPILED, name: str = "cmce") -> Path:
    from kfp import compiler

    # a unique temporary name (kfp wants it to end in .yaml): a fixed one was opened through a link planted there
    # (a file outside --out-dir written over) and raced by a second compile into the same folder
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.yaml", dir=out.parent)
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline_function(name), tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600: the compiled spec is read by others (CI, a cluster's uploader)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _lifecycle_inputs(args: argparse.Namespace) -> dict:
    """URIs of the previous run's artifacts: from --inputs-from (a `cmce run` output folder, or a local KFP run of
    the cmce pipeline) or flags. A KFP run's train embeddings are a list of files, gathered into one folder when the
    run starts (run_local)."""
    out: dict = {}
    if args.inputs_from:
        from cmce.layout import RunLayout
        from pipeline.run_folder import is_kfp_run, lifecycle_inputs

        folder = Path(args.inputs_from).resolve()
        if is_kfp_run(folder):  # `make run`'s runs/kfp/cmce-<timestamp>: was `…/data/dataset.parquet not found`
            if args.command != "run":
                raise ValueError(f"--inputs-from {args.inputs_from}: a local KFP run's folder, which a cluster's tasks "
                                 "cannot read; give its files' s3:// URIs with --dataset-uri, --query-model-uri, "
                                 "--gallery-uri (and --train-embeddings-uri)")
            try:
                out = lifecycle_inputs(folder)
            except ValueError as err:
                raise ValueError(f"--inputs-from {err}") from None
        else:
            lay = RunLayout(folder)
            out = {"dataset_uri": str(lay.dataset), "query_model_uri": str(lay.model("query")),
                   "gallery_uri": str(lay.gallery), "train_embeddings_uri": str(lay.train_embeddings("x").parent)}
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
    for key, uri in uris.items():  # a bad local input failed in a task, with a traceback, after 3 tries
        if URI_SCHEME.match(uri):
            continue
        path = Path(uri)
        if not path.exists():
            raise ValueError(f"{sources[key]}: {uri} not found (a run folder `cmce run` finished?)")
        folder = key in FOLDER_INPUTS
        if path.is_dir() != folder:
            raise ValueError(f"{sources[key]}: {uri} is {'not a folder' if folder else 'a folder, not a file'}"
                             f"{' (one file per gallery model expected)' if folder else ''}")
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


def _arguments(args: argparse.Namespace) -> dict:
    """The run's pipeline arguments: the params file, the --set overrides (checked here, so a typo fails
    before anything runs), and the runner's own knobs."""
    from cmce.config import load_config, parse_overrides, read_config_text, read_yaml
    from pipeline.cmce_pipeline import PARAMS_FILE

    overrides = parse_overrides(args.set)
    if args.pipeline == "cmce" and (given := [f"--{key.replace('_', '-')}" for key in ("inputs_from", *INPUT_URIS)
                                             if getattr(args, key, None)]):  # the whole pipeline ran, exit 0
        raise ValueError(f"{', '.join(given)}: the lifecycle pipelines' inputs (--pipeline add-gallery-model or "
                         "upgrade-query-model); the cmce pipeline makes its own")
    out: dict = _lifecycle_inputs(args) if args.pipeline != "cmce" else {}
    # the whole config checked here, not in the first task: the params given, else the ones compiled in
    cfg = load_config(args.params or PARAMS_FILE, overrides)
    if args.params:  # read as cmce reads it (0o10 is 8 there, the text '0o10' to yaml.safe_load)
        out["params_yaml"] = json.dumps(read_yaml(read_config_text(args.params)))
    if args.set:
        out["overrides"] = list(args.set)
    if args.command == "run" and cfg.data.path and not os.path.isabs(cfg.data.path):
        # a local run's tasks read a relative data.path from the working folder: started elsewhere than the
        # project, it fetched 30 MB of data there; it is the params file's folder's, as DVC reads its params
        where = (Path(args.params).resolve().parent if args.params else PARAMS_FILE.parent) / cfg.data.path
        out["overrides"] = [*out.get("overrides", []), f"data.path={where}"]
    if args.run_name:
        out["run_name"] = args.run_name
    for key in ("embed_shards", "embed_workers"):
        if getattr(args, key) is None:
            continue
        if args.pipeline != "cmce":  # the lifecycle pipelines embed one model, unsharded: it was dropped unsaid
            raise ValueError(f"--{key.replace('_', '-')} applies to the cmce pipeline only, not {args.pipeline}")
        out[key] = getattr(args, key)
    return out


def tracking_store(root: Path) -> str:
    """The tracking URI of a local run (MLFLOW_TRACKING_URI, else a store under --root), checked as cmce's steps
    check it before anything runs: its start-tracking task failed with a traceback, and was retried three times.
    A relative sqlite path (MLflow's docs write `sqlite:///mlflow.db`) names a file in the working folder: it is
    made absolute here, so that every task reads that one store (MLFLOW_REGISTRY_URI likewise)."""
    from cmce.tracking import (
        REGISTRY_ENV,
        absolute_uri,
        check_registry,
        check_server,
        check_store,
        check_uri_settings,
        credentials_to_env,
    )

    check_uri_settings(None)
    if registry := os.environ.get(REGISTRY_ENV):
        os.environ[REGISTRY_ENV] = absolute_uri(registry)
    uri = absolute_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}")
    check_store(uri, create=True)
    check_registry(uri, create=True)
    check_server(uri)
    return credentials_to_env(uri)  # the tasks get the password from the environment, not among their inputs


def run_local(args: argparse.Namespace) -> Path:
    """Run the whole DAG on this machine with kfp.local's subprocess runner (the embedded default)."""
    from kfp import local

    root = Path(args.root).resolve()
    inputs = Path(args.inputs_from).resolve() if getattr(args, "inputs_from", None) else None
    if inputs is not None and (root == inputs or inputs in root.parents):  # the run's files went among its inputs
        raise ValueError(f"--root {args.root} is inside --inputs-from {args.inputs_from}: the run would write into "
                         "the run folder it reads; give a root elsewhere")
    found = next(p for p in (root, *root.parents) if p.exists())
    if not found.is_dir():  # was `[Errno 17] File exists`, naming no flag
        raise ValueError(f"--root {args.root}: {'is a file' if found == root else f'{found} is a file'}, not a folder")
    run = pipeline_function(args.pipeline, args.parallelism)
    arguments = _arguments(args)
    uri = tracking_store(root) if not args.no_mlflow else ""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way (`--root a-file/sub`), no permission
        raise ValueError(f"--root {args.root}: cannot make the folder ({err.strerror or err})") from None
    try:  # a folder nothing can be made in (`/proc/self`, read-only): two task tracebacks, then exit 1 naming a task
        os.rmdir(tempfile.mkdtemp(prefix=".cmce-probe-", dir=root))
    except OSError as err:
        raise ValueError(f"--root {args.root}: cannot write there ({err.strerror or err})") from None
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    # the workspace made here, not by local.init, so that a stop signal finds it to remove it; the tasks' temporary
    # folders inside it (each task's shell left a `mktemp -d` folder in the temp folder, run or stopped)
    remove_orphaned_workspaces()
    workspace = tempfile.mkdtemp(prefix=WORKSPACE_PREFIX)
    held = _hold(workspace)  # released by the OS however this process ends: a later run then removes the folder
    stopping.workspace = workspace
    stopping.root, stopping.before = root, set(root.iterdir())
    os.mkdir(os.path.join(workspace, "tmp"))
    try:
        if isinstance(files := arguments.get("train_embeddings_uri"), list):  # a KFP run's, in its per-model folders
            from pipeline.run_folder import gather

            arguments["train_embeddings_uri"] = str(gather(files, Path(workspace) / "train_embeddings"))
        with _tasks_environment(workspace), cluster_settings_said_once():
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                       workspace_root=workspace)
            started = time.time()
            run(**arguments, mlflow_uri="" if args.no_mlflow else uri)
    except RuntimeError as err:  # kfp.local: "Pipeline 'cmce' finished with status FAILURE. Inner task failed: …"
        if "finished with status" not in str(err):
            raise
        closed = close_parent_run(root, stopping.before, "FAILED")
        raise PipelineFailed(f"{ANSI.sub('', str(err))} (its output is above){closed}") from None
    finally:
        stopping.workspace = stopping.root = None
        shutil.rmtree(workspace, ignore_errors=True)
        os.close(held)
    prefix = "cmce-" if args.pipeline == "cmce" else f"cmce-{args.pipeline}-"
    runs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)
                   and (args.pipeline != "cmce" or not p.name.startswith(tuple(f"cmce-{n}-" for n in LIFECYCLE)))),
                  key=lambda p: p.stat().st_mtime)
    run_dir = runs[-1]
    log.info("pipeline finished in %.0f s; artifacts under %s", time.time() - started, run_dir)
    from pipeline.next_steps import lifecycle_commands, next_steps

    listing = sorted(p for task in run_dir.rglob("executor_output.json") for p in task.parent.iterdir()
                     if p.name != "executor_output.json")
    sys.stderr.write("artifacts:\n" + "".join(f"  {p}\n" for p in listing))
    with contextlib.suppress(OSError, ValueError):  # a hint: an unreadable file there must not fail the run
        said = next_steps(run_dir, arguments)
        sys.stderr.write(said + (lifecycle_commands(run_dir, LIFECYCLE, args.params)
                                 if said and args.pipeline == "cmce" else ""))
    if not args.no_mlflow:
        from cmce.redaction import conceal

        sys.stderr.write(conceal(f"MLflow: {uri} (mlflow ui --backend-store-uri {uri})\n"))
    results = next(run_dir.glob("evaluate*/results"), None)
    if results is not None:
        sys.stdout.write(results.read_text())
    decision = next(run_dir.glob("gate*/decision"), None)
    if decision is not None:
        sys.stdout.write(decision.read_text())
    return run_dir


WORKSPACE_PREFIX = "kfp-workspace-"
WORKSPACE_LOCK = ".cmce-run.lock"  # marks a workspace as a cmce run's; flock-held while the run lives


@contextlib.contextmanager
def cluster_settings_said_once() -> Iterator[None]:
    """kfp.local runs each task in this Python environment, as designed: the images, resource requests and GPUs
    the tasks name are a cluster's. It warned of them twice a task (`localhost/cmce:cuda` on a CPU-only run read
    as a fault); one line says it for the run instead."""
    log.info("kfp.local runs every task in this Python environment; images, resource and GPU requests apply on a "
             "cluster")
    with warnings.catch_warnings():
        for noop in LOCAL_NOOP_WARNINGS:
            warnings.filterwarnings("ignore", message=noop)
        yield


def _hold(workspace: str) -> int:
    """The workspace's lock, taken before its file gets its name: another run never finds it free."""
    fd, unnamed = tempfile.mkstemp(dir=workspace)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(unnamed, os.path.join(workspace, WORKSPACE_LOCK))
    return fd


def remove_orphaned_workspaces() -> None:
    """The workspaces (with the tasks' temporary folders) of runs killed outright (SIGKILL, the OOM killer, a power
    cut) stayed in the temp folder for good. A run's workspace holds a lock while it lives: one whose lock can be
    taken belongs to no run, and is removed. Workspaces without the lock file (other KFP users') are left."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORKSPACE_PREFIX}*"):
        try:
            fd = os.open(folder / WORKSPACE_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live run's
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, the workspace of a run that was killed", folder)


@contextlib.contextmanager
def _tasks_environment(workspace: str) -> Iterator[None]:
    """What the task processes inherit for the block: their temporary folder inside the workspace (this process's
    is fixed), and, where this process stops its tasks on Ctrl-C (stop), that they leave Ctrl-C to it
    (cmce.TASK_IGNORES_CTRL_C)."""
    from cmce import TASK_IGNORES_CTRL_C

    settings = {"TMPDIR": os.path.join(workspace, "tmp")}
    if signal.SIGINT in stopping.signals:
        settings[TASK_IGNORES_CTRL_C] = "1"
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Stopping:
    """What an ending signal must clean up: the workspace of the run under way, the parent MLflow run it opened
    (its folder is the one under root not in before); the signals taken."""
    workspace: str | None = None
    root: Path | None = None
    before: set[Path] = set()
    signals: tuple[int, ...] = ()


class PipelineFailed(Exception):
    """A task of a local run failed (its own output says why); exit status 1."""


ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours its lines


def close_parent_run(root: Path, before: set[Path], status: str,
                     warn: Callable[..., None] = log.warning) -> str:
    """End the parent MLflow run of the local run whose folder appeared under `root` (absent from `before`) as
    `status`, if it is still RUNNING: a run stopped or failed before its last task stayed RUNNING for good.
    Returns "; MLflow run ID marked STATUS" for the last line, or "" (none open, or the store cannot be reached:
    said in a warning)."""
    from cmce.tracking import TrackingInfo, end_if_running

    said = []
    for track in sorted(root.glob("*/start-tracking/tracking")):
        if track.parent.parent in before:
            continue
        try:
            info = TrackingInfo.read(track)
            if end_if_running(info, status):
                said.append(f"; MLflow run {info.run_id} marked {status}")
        except Exception as err:  # noqa: BLE001 - the run's own failure or stop is what to report
            from cmce.errors import first_line
            from cmce.s3 import redact

            warn("the MLflow run of %s stays open: %s", track.parent.parent.name, redact(first_line(err)))
    return "".join(said)


stopping = _Stopping()
STOP_WAIT_S = 10  # the tasks' own cleanups (a step's scratch files) before they are killed


def ending_signals() -> list[int]:
    """The signals the cmce commands stop on with their cleanups (SIGINT, SIGTERM, SIGHUP, SIGUSR1/2, and those
    ending the process where nobody else handles them)."""
    from cmce.errors import unclaimed_ending_signals

    return [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, *unclaimed_ending_signals()]


def stop(signum: int, _frame: object) -> None:
    """An ending signal during a local run: its task processes are stopped (each cleans up after itself), the
    workspace removed, one line logged, exit 128+signal. Here, not by unwinding: kfp.local's worker threads retry
    a stopped task after their back-off, and its pool waits for them (killed, the workspace stayed behind)."""
    from cmce.errors import LOG_FORMAT, OneLineFormatter, signal_name

    for sig in stopping.signals:  # a second signal must not cut this cleanup short
        signal.signal(sig, signal.SIG_IGN)
    # kfp.local's worker threads relay what the stopping tasks print and log their failure ("Retrying in 30.0s",
    # a task's traceback): a signal to the whole process group (Ctrl-C, twice) showed them above this one line.
    # Logging is off and stdout gone from here on; this function's own lines go straight to stderr.
    logging.disable(logging.CRITICAL)
    with contextlib.suppress(Exception):  # what the run printed before the signal still reaches its reader
        sys.stdout.flush()
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process, which ends below
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))

    def say(level: int, msg: str, *args: object) -> None:
        handler.handle(log.makeRecord(log.name, level, __file__, 0, msg, args, None))

    stopped = _stop_tasks()
    if stopping.workspace:
        shutil.rmtree(stopping.workspace, ignore_errors=True)
    closed = close_parent_run(stopping.root, stopping.before, "KILLED",
                              lambda *args: say(logging.WARNING, *args)) if stopping.root else ""
    say(logging.ERROR, "python -m pipeline run: interrupted (%s); %d task process(es) stopped, its temporary files "
        "removed%s", signal_name(signum), stopped, closed)
    os._exit(128 + signum)


class _StdoutWrapper:
    """A wrapper of standard output that changes what `write` does; everything else is the stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> object:  # flush, fileno, encoding, isatty, …
        return getattr(self._stream, name)


class SilencedOnStop(_StdoutWrapper):
    """This process's standard output during a local run, where kfp.local's threads relay each task's output and
    log its status: nothing is written once an ending signal has reached the process. A terminal's Ctrl-C reaches
    the tasks too, and a stopping task's traceback (or kfp.local's `Retrying in 30.0s`) was printed above stop()'s
    line whenever it came before the main thread ran its handler. The signal's C-level handler writes it to the
    wakeup pipe as the signal is taken, before any thread of this process runs Python again: it is read here."""

    def __init__(self, stream: object, wakeup: int, signums: tuple[int, ...]) -> None:
        super().__init__(stream)
        self._wakeup, self._signums, self._stopped = wakeup, set(signums), False

    def _stopping(self) -> bool:
        if not self._stopped:
            with contextlib.suppress(BlockingIOError, OSError):
                self._stopped = any(signum in self._signums for signum in os.read(self._wakeup, 512))
        return self._stopped

    def write(self, text: str) -> int:
        return len(text) if self._stopping() else self._stream.write(text)


class TidiedRelay(_StdoutWrapper):
    """This process's standard output during a local run, where kfp.local relays each task's output indented by 4
    spaces: each task's executor dumped its whole input as JSON (two thirds of `make run`'s 2,400 lines), and
    kfp.local's colour codes reached files and pipes. The dump is dropped (its lines only: any other line ends
    it) and colours kept for a terminal alone. Whole lines are written; a partial one waits for its end. Each
    thread has its own line and dump (kfp.local relays parallel branches from parallel threads)."""

    DUMP_START = "]: Got executor_input:"
    DUMP_LINE = re.compile(r"    [ {}]")  # the dump's own lines: indented JSON, or its braces

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._lock = threading.Lock()
        self._threads: dict[int, list] = {}  # a thread's [partial line, in a dump]
        try:
            self._colour = stream.isatty()
        except (AttributeError, ValueError):
            self._colour = False

    def write(self, text: str) -> int:
        state = self._threads.setdefault(threading.get_ident(), ["", False])
        *lines, state[0] = (state[0] + text).split("\n")
        for line in lines:
            self._line(state, line + "\n")
        return len(text)

    def _line(self, state: list, line: str) -> None:
        if state[1] and self.DUMP_LINE.match(line):
            return
        state[1] = line.rstrip().endswith(self.DUMP_START)
        if not state[1]:
            with self._lock:
                self._stream.write(line if self._colour else ANSI.sub("", line))

    def flush(self) -> None:
        """This thread's line so far is written (not its indentation alone: its line follows). A logging
        handler flushes after each record: another thread's half line must wait for its end."""
        self._end(self._threads.get(threading.get_ident()))
        self._stream.flush()

    def flush_all(self) -> None:
        """As the relay ends: every thread's last line without its end."""
        for state in list(self._threads.values()):
            self._end(state)
        self._stream.flush()

    def _end(self, state: list | None) -> None:
        if state is not None and state[0].strip():
            self._line(state, state[0])
            state[0] = ""


@contextlib.contextmanager
def tidied_stdout() -> Iterator[None]:
    """sys.stdout is a TidiedRelay for the block."""
    stream = sys.stdout
    sys.stdout = relay = TidiedRelay(stream)
    try:
        yield
    finally:
        sys.stdout = stream
        with contextlib.suppress(Exception):  # its reader gone
            relay.flush_all()


@contextlib.contextmanager
def silenced_on_stop(signums: tuple[int, ...]) -> Iterator[None]:
    """sys.stdout is a SilencedOnStop for the block (main thread only: the wakeup pipe is the main thread's)."""
    if not signums or threading.current_thread() is not threading.main_thread():
        yield
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous_fd, stream = signal.set_wakeup_fd(write, warn_on_full_buffer=False), sys.stdout
    sys.stdout = SilencedOnStop(stream, read, signums)
    try:
        yield
    finally:
        sys.stdout = stream
        signal.set_wakeup_fd(previous_fd)
        os.close(read)
        os.close(write)


def _stop_tasks() -> int:
    """SIGTERM to every task process, then SIGKILL to those still running after STOP_WAIT_S; watched until none
    runs, as a worker thread may start a branch's next task meanwhile. Returns how many there were."""
    import psutil

    def running(task: psutil.Process) -> bool:
        try:
            return task.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    me, seen = psutil.Process(), {}
    deadline = time.monotonic() + STOP_WAIT_S
    while True:
        try:
            new = [task for task in me.children(recursive=True) if task.pid not in seen]
        except psutil.Error:
            new = []
        for task in new:  # a shell's Python child is watched too: the shell may end first and orphan it
            seen[task.pid] = task
            with contextlib.suppress(psutil.Error):
                task.send_signal(signal.SIGTERM)
        alive = [task for task in seen.values() if running(task)]
        if not alive and not new:
            return len(seen)
        if time.monotonic() >= deadline:
            for task in alive:
                with contextlib.suppress(psutil.Error):
                    task.kill()
            psutil.wait_procs(alive, timeout=1)  # reaps those that are this process's children
            return len(seen)
        psutil.wait_procs(alive, timeout=0.2)


HEALTHZ_TIMEOUT_S = 10


def check_host(host: str) -> None:
    """One request to the KFP API's healthz before the client is made: the client retried a dead host or a server
    that is not KFP for half a minute, then failed with tracebacks that never named --host. An answer that asks
    for credentials (401, 403, a redirect to a login page) is left to the client."""
    import requests

    url = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        answer = requests.get(url, timeout=HEALTHZ_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as err:
        reason = type(err).__name__ if isinstance(err, requests.ConnectionError | requests.Timeout) else err
        raise ValueError(f"--host {host}: cannot reach the KFP API ({reason} on {url})") from None
    if answer.status_code in (401, 403) or answer.is_redirect:
        return
    try:
        healthy = answer.status_code == 200 and isinstance(answer.json(), dict)
    except ValueError:  # not JSON
        healthy = False
    if not healthy:
        raise ValueError(f"--host {host}: not a KFP API endpoint ({url} answered HTTP {answer.status_code}"
                         f"{'' if answer.status_code != 200 else ' without the JSON of KFP'})")


def submit(args: argparse.Namespace) -> None:
    """Submit the compiled YAML to a KFP endpoint (cannot be exercised without a cluster)."""
    check_host(args.host)
    import kfp

    client = kfp.Client(host=args.host, namespace=args.namespace)
    package = args.package or PACKAGES[args.pipeline]
    run = client.create_run_from_pipeline_package(str(package), arguments=_arguments(args),
                                                  run_name=args.run_name or args.pipeline,
                                                  experiment_name=args.experiment)
    sys.stdout.write(json.dumps({"run_id": run.run_id}) + "\n")


MAX_SHARDS = 1024  # each slice is a task (a pod on a cluster)
MAX_WORKERS = 64  # as `cmce embed-gallery --workers`: more only waits on their start-up
MAX_PARALLELISM = 1024


def local_folder(text: str) -> Path:
    """compile writes its YAML files here: a local folder (`s3://b/p` was shown as `s3:/b/p: no such folder`)."""
    if "://" in text:
        raise argparse.ArgumentTypeError(f"{text}: compile writes to a local folder; copy the files from there")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    from cmce.arguments import OneLineParser, int_in, not_blank

    p = OneLineParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile every pipeline to YAML (pipeline/*.yaml)")
    c.add_argument("--out-dir", type=not_blank(local_folder), default=COMPILED.parent,
                   help="an existing folder for the YAML files (default: pipeline/)")
    for name, help_ in (("run", "run the pipeline"), ("submit", "submit the compiled pipeline to KFP")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--pipeline", default="cmce", choices=sorted(PACKAGES), help="which pipeline (default cmce)")
        sp.add_argument("--inputs-from", type=not_blank(), default=None, metavar="RUN_DIR",
                        help="lifecycle pipelines: take the dataset, query model, gallery and train embeddings "
                             "from this `cmce run` output folder, or this local KFP run of the cmce pipeline "
                             "(runs/kfp/cmce-<timestamp>)")
        for key in INPUT_URIS:
            sp.add_argument(f"--{key.replace('_', '-')}", type=not_blank(), default=None,
                            help="lifecycle pipelines: input artifact URI")
        sp.add_argument("--params", type=not_blank(), default=None,
                        help="params file (default: the one compiled in, params.yaml)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the params, e.g. train.epochs=2 or gallery_models=[resnet] "
                             "(repeatable; the same syntax as `cmce --set`)")
        sp.add_argument("--run-name", default=None,
                        help="the name of the MLflow parent run (and of the KFP run when submitted; default: the "
                             "pipeline's name)")
        sp.add_argument("--embed-shards", type=int_in(1, MAX_SHARDS), default=None,
                        help=f"cmce pipeline: gallery slices in parallel (1 to {MAX_SHARDS})")
        sp.add_argument("--embed-workers", type=int_in(0, MAX_WORKERS), default=None,
                        help=f"cmce pipeline: decoding processes per slice (0 to {MAX_WORKERS}; 0 = in the task)")
    r = sub.choices["run"]
    r.add_argument("--local", action="store_true", required=True, help="run on this machine with kfp.local")
    r.add_argument("--root", type=not_blank(), default="runs/kfp", help="pipeline root for local artifacts")
    r.add_argument("--no-mlflow", action="store_true", help="track nothing: no MLflow runs, no registered models")
    r.add_argument("--parallelism", type=int_in(0, MAX_PARALLELISM), default=1,
                   help=f"gallery-model branches run at once (0 to {MAX_PARALLELISM}, 0 = no cap; default 1: they "
                        "share this machine's cores)")
    s = sub.choices["submit"]
    s.add_argument("--host", type=not_blank(), required=True, help="KFP API endpoint, e.g. https://kfp.example.com/pipeline")
    s.add_argument("--namespace", default=None, help="the Kubeflow namespace (default: the client's own)")
    s.add_argument("--experiment", default="cmce", help="the KFP experiment the run goes under (default cmce)")
    s.add_argument("--package", type=not_blank(Path), default=None, help="compiled YAML (default: the --pipeline's)")
    return p


def main(argv: list[str] | None = None) -> int:
    from cmce.errors import not_ignored, set_up_command

    set_up_command()
    args = build_parser().parse_args(argv)
    handlers = {}
    if args.command == "run" and threading.current_thread() is threading.main_thread():
        handlers = {signum: signal.signal(signum, stop) for signum in not_ignored(ending_signals())}
        stopping.signals = tuple(handlers)
    try:
        for flag in ("root", "params"):  # `--root s3://b/r` wrote 6.9 MB into a local folder `./s3:/b/r`, exit 0
            value = getattr(args, flag, None)
            if isinstance(value, str) and URI_SCHEME.match(value):
                raise ValueError(f"--{flag} {value}: a local {'folder' if flag == 'root' else 'file'} is read "
                                 "here, not a URI; the local runner keeps its artifacts on this machine")
        if args.command == "compile":
            if not args.out_dir.is_dir():
                raise ValueError(f"--out-dir {args.out_dir}: no such folder")
            for name, package in PACKAGES.items():
                log.info("wrote %s", compile_pipeline(args.out_dir / package.name, name))
        elif args.command == "run":
            with tidied_stdout(), silenced_on_stop(stopping.signals):
                run_local(args)
        else:
            submit(args)
    except (ValueError, OSError) as err:  # a bad params file, override or folder: one line, as cmce's steps
        from cmce.s3 import redact

        log.error("python -m pipeline %s: %s", args.command, redact(str(err)))  # `--host https://user:pw@…`
        return 2
    except PipelineFailed as err:
        log.error("python -m pipeline %s: %s", args.command, err)
        return 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
