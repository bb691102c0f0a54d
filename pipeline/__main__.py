"""python -m pipeline compile | run --local [--pipeline NAME] | submit --host URL [--pipeline NAME]

Pipelines: cmce (the whole method), add-gallery-model and upgrade-query-model (live-gallery operations
on the artifacts of a previous run, see pipeline/lifecycle.py)."""

from __future__ import annotations

import argparse
import contextlib
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmce.s3 import URI_SCHEME
from pipeline.cleanup import (
    WORKSPACE_PREFIX,
    close_parent_run,
    ending_signals,
    hold,
    hold_root,
    remove_orphaned_workspaces,
    stop,
    stopping,
    tasks_environment,
)
from pipeline.inputs import INPUT_URIS, lifecycle_inputs
from pipeline.relay import ANSI, cluster_settings_said_once, silenced_on_stop, tidied_stdout

if TYPE_CHECKING:
    from cmce.config import Config

log = logging.getLogger("pipeline")
ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "pipeline" / "cmce_pipeline.yaml"
LIFECYCLE = ("add-gallery-model", "upgrade-query-model")
PACKAGES = {"cmce": COMPILED, **{name: ROOT / "pipeline" / f"{name.replace('-', '_')}.yaml" for name in LIFECYCLE}}


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


def _check_lifecycle_model(pipeline: str, inputs: dict, cfg: Config) -> None:
    """The model a lifecycle pipeline trains is named in the params, and one to add is not in the gallery yet: else
    its train task failed with a KeyError three times, or the run trained and embedded for minutes before add-member
    refused it (`already has a member named …`), three times, having registered a model version on the way."""
    key = "add_gallery_model" if pipeline == "add-gallery-model" else "new_query_model"
    spec = getattr(cfg.lifecycle, key)
    if spec is None:
        raise ValueError(f"lifecycle.{key}: not set in the params; the {pipeline} pipeline trains that model (see "
                         "params.yaml's lifecycle section)")
    gallery = inputs.get("gallery_uri")
    if key != "add_gallery_model" or not isinstance(gallery, str) or URI_SCHEME.match(gallery):
        return
    from cmce.tables import read_metadata

    try:
        members = [m.get("name") for m in read_metadata(gallery).get("members", [])]
    except (OSError, ValueError):  # not a gallery: its check says so
        return
    if spec.name in members:
        raise ValueError(f"lifecycle.add_gallery_model.name: {spec.name!r} is already a member of the gallery "
                         f"{gallery}; give the model to add another name (--set lifecycle.add_gallery_model.name=...)")


def _check_settings_fit_the_run(args: argparse.Namespace, inputs: dict, cfg: Config) -> None:
    """A lifecycle run grows the run its inputs come from with the params given (params.yaml's by default): a
    `make smoke` run's 8-px digits, grown with params.yaml's, trained a 28-px model on enlarged images, nothing said.
    Said before any task (a warning: an upgrade may well take another image size), where the inputs are local."""
    query, dataset = inputs.get("query_model_uri"), inputs.get("dataset_uri")
    if not all(isinstance(uri, str) and not URI_SCHEME.match(uri) for uri in (query, dataset)):
        return  # a cluster's files: read by its tasks only
    from cmce.checkpoint import EMBEDDING_FORMAT, load_checkpoint
    from cmce.data.readers import dataset_info
    from cmce.data.sources import SOURCES
    from pipeline.cmce_pipeline import PARAMS_FILE

    try:
        made = load_checkpoint(query, EMBEDDING_FORMAT)
        source = dataset_info(dataset).get("source")
    except (OSError, ValueError):  # not a model: its task says so (the dataset is checked with the inputs)
        return
    differ = [f"data.source={source}"] if source in SOURCES and source != cfg.data.source else []
    if (made.get("image_size"), made.get("in_channels")) != (cfg.data.image_size, cfg.data.channels):
        differ.append(f"data.image_size={made.get('image_size')}, data.channels={made.get('in_channels')}")
    if differ:
        given = f"--params {args.params}" if args.params else PARAMS_FILE.name
        log.warning("the run's dataset and query model were made with %s; %s (with its --set) says data.source=%s, "
                    "data.image_size=%d, data.channels=%d: the params that run was made with go with --params",
                    "; ".join(differ), given, cfg.data.source, cfg.data.image_size, cfg.data.channels)


def _without_data_path(overrides: list[str]) -> list[str]:
    """The --set overrides less the data.path they set (`data.path=x`, or `path` in `data={...}`)."""
    from cmce.overrides import parse_overrides

    kept = []
    for pair in overrides:
        key, value = next(iter(parse_overrides([pair]).items()))
        if key == "data" and isinstance(value, dict) and "path" in value:
            rest = {k: v for k, v in value.items() if k != "path"}
            kept += [f"data={json.dumps(rest)}"] if rest else []
        elif key != "data.path":
            kept.append(pair)
    return kept


def _arguments(args: argparse.Namespace) -> dict:
    """The run's pipeline arguments: the params file, the --set overrides (checked here, so a typo fails
    before anything runs), and the runner's own knobs."""
    from cmce.config import load_config, named_config
    from cmce.config_yaml import read_config_text, read_yaml
    from cmce.overrides import leaf_keys, parse_overrides
    from pipeline.cmce_pipeline import PARAMS_FILE

    overrides = parse_overrides(args.set)
    if args.pipeline == "cmce" and (given := [f"--{key.replace('_', '-')}" for key in ("inputs_from", *INPUT_URIS)
                                             if getattr(args, key, None)]):  # the whole pipeline ran, exit 0
        raise ValueError(f"{', '.join(given)}: the lifecycle pipelines' inputs (--pipeline add-gallery-model or "
                         "upgrade-query-model); the cmce pipeline makes its own")
    out: dict = lifecycle_inputs(args) if args.pipeline != "cmce" else {}
    # the whole config checked here, not in the first task: the params given, else the ones the run gets (a
    # submitted run, its package's compiled-in params: params.yaml's were checked while the package's ran)
    package = submitted_package(args) if args.command == "submit" else None
    compiled = compiled_params(package, args.pipeline) if package is not None else None
    if args.params or compiled is None:
        cfg = load_config(args.params or PARAMS_FILE, overrides)
    else:
        cfg = named_config(compiled, overrides, f"--package {package} (its compiled-in params)")
    if args.command == "run":  # the tasks compute here: a GPU this machine lacks failed each task three times
        from cmce.device import resolve

        resolve(cfg.device, "device")
    if args.pipeline != "cmce":
        _check_lifecycle_model(args.pipeline, out, cfg)
        _check_settings_fit_the_run(args, out, cfg)
    if args.params:  # read as cmce reads it (0o10 is 8 there, the text '0o10' to yaml.safe_load)
        out["params_yaml"] = json.dumps(read_yaml(read_config_text(args.params)))
    if args.set:
        out["overrides"] = list(args.set)
    if args.command == "run" and cfg.data.path and not os.path.isabs(cfg.data.path):
        # a local run's tasks read a relative data.path from the working folder: started elsewhere than the
        # project, it fetched 30 MB of data there. From the params file it is that file's folder's, as DVC reads
        # its params; from --set, the working folder's, as any path on a command line (the override is replaced:
        # both went to the tasks, which refused data.path as given twice)
        by_set = "data.path" in leaf_keys(overrides)
        base = Path.cwd() if by_set else Path(args.params).resolve().parent if args.params else PARAMS_FILE.parent
        out["overrides"] = [*_without_data_path(out.get("overrides", [])), f"data.path={base / cfg.data.path}"]
    if args.run_name:
        out["run_name"] = args.run_name
    for key in ("embed_shards", "embed_workers"):
        if getattr(args, key) is None:
            continue
        if args.pipeline != "cmce":  # the lifecycle pipelines embed one model, unsharded: it was dropped unsaid
            raise ValueError(f"--{key.replace('_', '-')} applies to the cmce pipeline only, not {args.pipeline}")
        out[key] = getattr(args, key)
    return out


class PipelineFailed(Exception):
    """A task of a local run failed (its own output says why); exit status 1."""


def tracking_store(root: Path) -> str:
    """The tracking URI of a local run (MLFLOW_TRACKING_URI, else a store under --root), checked as cmce's steps
    check it before anything runs: its start-tracking task failed with a traceback, and was retried three times.
    A relative sqlite path (MLflow's docs write `sqlite:///mlflow.db`) names a file in the working folder: it is
    made absolute here, so that every task reads that one store (MLFLOW_REGISTRY_URI likewise)."""
    from cmce.tracking_store import (
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
    root = Path(args.root).resolve()
    for key in ("inputs_from", *INPUT_URIS):  # the run's files went among its inputs
        given = getattr(args, key, None)
        inputs = Path(given).resolve() if given and not URI_SCHEME.match(given) else None
        if inputs is not None and (root == inputs or inputs in root.parents):
            what = "the run folder" if key == "inputs_from" else "an input"
            raise ValueError(f"--root {args.root} is inside --{key.replace('_', '-')} {given}: the run would write "
                             f"into {what} it reads; give a root elsewhere")
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
    root_held = hold_root(root, args.root)
    try:
        return _run_in(root, args, run, arguments, uri)
    finally:
        os.close(root_held)


def _run_in(root: Path, args: argparse.Namespace, run: Any, arguments: dict, uri: str) -> Path:
    """run_local's run, once its --root is held."""
    from kfp import local

    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    # the workspace made here, not by local.init, so that a stop signal finds it to remove it; the tasks' temporary
    # folders inside it (each task's shell left a `mktemp -d` folder in the temp folder, run or stopped)
    remove_orphaned_workspaces()
    workspace = tempfile.mkdtemp(prefix=WORKSPACE_PREFIX)
    held = hold(workspace)  # released by the OS however this process ends: a later run then removes the folder
    stopping.workspace = workspace
    stopping.root, stopping.before = root, set(root.iterdir())
    os.mkdir(os.path.join(workspace, "tmp"))
    try:
        if isinstance(files := arguments.get("train_embeddings_uri"), list):  # a KFP run's, in its per-model folders
            from pipeline.run_folder import gather

            arguments["train_embeddings_uri"] = str(gather(files, Path(workspace) / "train_embeddings"))
        with tasks_environment(workspace), cluster_settings_said_once():
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
        same = [*(["--params", args.params] if args.params else []), *(x for kv in args.set for x in ("--set", kv)),
                "--root", args.root, *(["--no-mlflow"] if args.no_mlflow else [])]
        sys.stderr.write(said + (lifecycle_commands(run_dir, LIFECYCLE, same) if said else ""))
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
    except ValueError as err:  # urllib3's LocationParseError (`http://a..b`), past requests' own URL checks
        raise ValueError(f"--host {host}: not a usable URL ({err})") from None
    if answer.status_code in (401, 403) or answer.is_redirect:
        return
    try:
        healthy = answer.status_code == 200 and isinstance(answer.json(), dict)
    except ValueError:  # not JSON
        healthy = False
    if not healthy:
        raise ValueError(f"--host {host}: not a KFP API endpoint ({url} answered HTTP {answer.status_code}"
                         f"{'' if answer.status_code != 200 else ' without the JSON of KFP'})")


def submit_arguments(args: argparse.Namespace) -> dict:
    """A submitted run's pipeline arguments: the run's (see _arguments) and the tracking server its tasks log to
    (--mlflow-uri, else MLFLOW_TRACKING_URI): a run submitted without one was tracked nowhere, unsaid."""
    from urllib.parse import urlsplit

    out = _arguments(args)
    uri = args.mlflow_uri if args.mlflow_uri is not None else os.environ.get("MLFLOW_TRACKING_URI", "")
    named = "--mlflow-uri" if args.mlflow_uri is not None else "MLFLOW_TRACKING_URI"
    if not uri:
        log.warning("no --mlflow-uri (nor MLFLOW_TRACKING_URI): the run is tracked nowhere and registers no model")
        return out
    parts = urlsplit(uri)
    if uri == "databricks" or parts.scheme == "databricks":  # was `a store on this machine`
        raise ValueError(f"{named} {uri}: a Databricks workspace, whose credentials the cluster's tasks do not get "
                         "(their Secret gives MLflow's and S3's, not DATABRICKS_HOST/DATABRICKS_TOKEN); give the "
                         "tracking server's http(s):// URI")
    if parts.scheme in ("", "file", "sqlite"):
        raise ValueError(f"{named} {uri}: a store on this machine, which the cluster's tasks cannot reach; give the "
                         "tracking server's http(s):// URI")
    if parts.scheme not in ("http", "https"):  # ftp:// (MLflow keeps no runs there), mlflow-artifacts:, a database
        raise ValueError(f"{named} {uri}: not a tracking server's URI ({parts.scheme}:); give the tracking server's "
                         "http(s):// URI, which the cluster's tasks reach")
    if parts.username or parts.password:  # run arguments are shown in the KFP UI and kept with the run
        raise ValueError(f"{named}: credentials in the URI would be shown with the run; the tasks read "
                         "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from the cluster's Secret")
    try:
        port = parts.port  # `:99999`, `:x`: a ValueError
    except ValueError:
        port = 0
    if not parts.hostname or port == 0:
        raise ValueError(f"{named} {uri}: {'no host' if not parts.hostname else 'not a port 1 to 65535'}; give the "
                         "tracking server's http(s)://host[:port] URI")
    out["mlflow_uri"] = uri
    return out


def submitted_package(args: argparse.Namespace) -> Path:
    return args.package or PACKAGES[args.pipeline]


def pipeline_name(pipeline: str) -> str:
    """The name a --pipeline's package is compiled under (its @dsl.pipeline's)."""
    return pipeline if pipeline == "cmce" else f"cmce-{pipeline}"


def compiled_params(package: Path, pipeline: str) -> dict:
    """The params a compiled `pipeline` runs with when none are given: its params_yaml parameter's default."""
    import yaml

    from cmce.config_yaml import read_yaml

    try:
        spec = next(yaml.safe_load_all(package.read_text()), None)  # a compile for a cluster adds a platform spec
        name = spec["pipelineInfo"]["name"]
        params = read_yaml(spec["root"]["inputDefinitions"]["parameters"]["params_yaml"]["defaultValue"])
    except UnicodeDecodeError:
        raise ValueError(f"--package {package}: not text, not a compiled pipeline") from None
    except yaml.YAMLError as err:
        raise ValueError(f"--package {package}: not YAML ({str(err).splitlines()[0]})") from None
    except (TypeError, KeyError, AttributeError):
        raise ValueError(f"--package {package}: not a compiled cmce pipeline (`python -m pipeline compile` writes "
                         "them)") from None
    if name != pipeline_name(pipeline):  # another pipeline's arguments: refused by KFP only once submitted
        raise ValueError(f"--package {package}: compiled pipeline {name!r}, not --pipeline {pipeline}'s "
                         f"{pipeline_name(pipeline)!r}")
    if not isinstance(params, dict):
        raise ValueError(f"--package {package}: its compiled-in params are not a mapping")
    return params


def submit(args: argparse.Namespace) -> None:
    """Submit the compiled YAML to a KFP endpoint (cannot be exercised without a cluster)."""
    arguments = submit_arguments(args)  # before the endpoint is called: a bad setting is said at once
    check_host(args.host)
    import kfp

    client = kfp.Client(host=args.host, namespace=args.namespace)
    package = submitted_package(args)
    run = client.create_run_from_pipeline_package(str(package), arguments=arguments,
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
                             "from this `cmce run` output folder, or this local KFP run (runs/kfp/cmce-<timestamp>; a "
                             "lifecycle pipeline's run to chain another)")
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
    s.add_argument("--mlflow-uri", type=not_blank(), default=None, metavar="URI",
                   help="the tracking server the run's tasks log to and register models in, an http(s):// URI they "
                        "reach (default: MLFLOW_TRACKING_URI; neither: nothing is tracked)")
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
                why = "not a folder" if args.out_dir.exists() else "no such folder"
                raise ValueError(f"--out-dir {args.out_dir}: {why}")
            for name, package in PACKAGES.items():
                log.info("wrote %s", compile_pipeline(args.out_dir / package.name, name))
        elif args.command == "run":
            with tidied_stdout(), silenced_on_stop(stopping.signals):
                run_local(args)
        else:
            submit(args)
    except (ValueError, OSError) as err:  # a bad params file, override or folder: one line, as cmce's steps
        from cmce.redaction import redact

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
