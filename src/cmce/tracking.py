"""MLflow tracking: runs and what they log (the store and its checks: cmce.tracking_store; the registry's reads
and writes: cmce.registry).

One parent run per pipeline run, one nested run per step (params, per-epoch losses, metrics, artifacts).
Every run is tagged with the git commit of the code (``mlflow.source.git.commit``: ``CMCE_GIT_COMMIT`` in an
image, else ``git rev-parse HEAD`` beside the package) and the data version (``cmce.data.sha256``: the
sha256 of the dataset Parquet file; a step that reads no dataset inherits its parent run's). The data sets a
step reads are its run's inputs (``log_inputs``); the evaluation's headline numbers go on the parent run.
Files a step made (the gallery, the index) are its artifacts, or above ARTIFACT_MAX_MB a tag naming them.
Query models, gallery models and transformations become registered models; the versions a run
produced get the alias ``candidate``; each version is tagged with its checkpoint's sha256. The alias
``production`` moves only through the promotion gate (cmce.promotion): a lifecycle operation's
evaluation must not regress before the versions it served are promoted. Registered files are cmce
checkpoints, loaded weights-only; still, treat a registry as trusted input only (anyone who can write
to it chooses what you load).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import secrets
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmce.errors import first_line, from_client, stop_deferred
from cmce.records import registry_name
from cmce.redaction import redact
from cmce.tracking_store import (
    absolute_uri,
    check_artifact_location,
    check_server,
    check_store,
    local_store,
    mlflow_client,
    proxy_error,
    read_within,
    schema_error,
)

log = logging.getLogger(__name__)
ARTIFACT_MAX_MB = 512  # larger outputs are referenced by a tag (path and sha256), not copied into the store
GIT_COMMIT_TAG = "mlflow.source.git.commit"
DATA_TAG = "cmce.data.sha256"
EXPERIMENT = "cmce"
ALIAS = "candidate"
PRODUCTION = "production"


@dataclass(frozen=True)
class TrackingInfo:
    """Where a pipeline run is tracked: the tracking URI and its parent run ("" = tracking off)."""

    uri: str
    run_id: str

    @classmethod
    def read(cls, path: str | Path) -> TrackingInfo:
        """From the {"uri", "run_id"} JSON file `cmce track-start --out` writes."""
        info = json.loads(Path(path).read_text())
        return cls(info.get("uri", ""), info.get("run_id", ""))

    @property
    def on(self) -> bool:
        return bool(self.uri and self.run_id)


def publish(info: TrackingInfo | str | Path, record: Any) -> str | None:
    """Record a stage's StepRecord as a nested run of the parent run (nothing when tracking is off), with the
    device it computed on, and whether on deterministic kernels, among its params."""
    import torch

    from cmce import device as devices

    info = info if isinstance(info, TrackingInfo) else TrackingInfo.read(info)
    if record is None or not info.on:
        return None
    params = {**record.params, "device": devices.describe(devices.current()),
              "deterministic": torch.are_deterministic_algorithms_enabled()}
    try:
        return log_step(info.uri, info.run_id, record.step, params, record.metrics, record.history,
                        record.artifacts, record.register, record.versions_of, record.promote, record.promote_along,
                        record.inputs, record.headline)
    except Exception as err:
        if not (isinstance(err, ValueError | OSError) or from_client(err)):
            raise
        # the step has written its outputs by now: say so, rather than let a failed step look like no step
        reason = proxy_error(err, info.uri) or schema_error(err) or first_line(err)
        where = "" if info.uri in reason else f"{info.uri}: "
        if record.decision is not None and record.promote and record.metrics.get("promoted"):
            _decision_unpublished(record.decision, reason, getattr(err, "production_touched", False))
        raise ValueError(f"{where}{record.step}: its outputs are written but not tracked: {reason}") from err


def _decision_unpublished(decision: Path, reason: str, touched: bool) -> None:
    """A promoting gate whose record could not be published: @production moves last, so before the move its decision
    says not promoted (a deploy script read `"promoted": true` while nothing moved); after the move began, that
    the aliases may be partly moved. An s3:// decision, uploaded already, goes up again."""
    from cmce import s3
    from cmce.promotion import note_in_decision, withhold
    from cmce.storage import origin

    if touched:
        note_in_decision(decision, production_alias=f"may be partly moved: {reason}; check the registry")
    else:
        withhold(decision, f"the gate could not be tracked ({reason}); @production not moved")
    if (shown := origin(decision)) != str(decision):
        s3.put_whole(Path(decision), shown)


@contextlib.contextmanager
def closing_parent(info: TrackingInfo | str | Path) -> Iterator[None]:
    """Close the parent run when the block ends: FINISHED when it succeeds, FAILED when it raises."""
    info = info if isinstance(info, TrackingInfo) else TrackingInfo.read(info)
    ok = False
    try:
        yield
        ok = True
    finally:
        if info.on:
            try:
                end_run(info.uri, info.run_id, "FINISHED" if ok else "FAILED")
            except Exception as err:
                if ok:
                    raise
                # the block's own error is the one to report; the store's (e.g. locked) would replace it
                log.warning("parent run %s not closed: %s", info.run_id, redact(first_line(err)))


MAX_EXPERIMENT_NAME = 500  # MLflow's limit on an experiment's name


def experiment_name() -> str:
    """The experiment parent runs go to: MLFLOW_EXPERIMENT_NAME as MLflow reads it, else `cmce`. An experiment
    id is not taken (MLFLOW_EXPERIMENT_ID): said, rather than ignored without a word."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
    if len(name) > MAX_EXPERIMENT_NAME:  # the store's error blamed the store (`sqlite:///…: 'name' exceeds …`)
        raise ValueError(f"environment variable MLFLOW_EXPERIMENT_NAME: {len(name)} characters, more than MLflow's "
                         f"{MAX_EXPERIMENT_NAME}")
    if os.environ.get("MLFLOW_EXPERIMENT_ID") and not name:
        log.warning("MLFLOW_EXPERIMENT_ID is not read: runs go to experiment %r (name one in MLFLOW_EXPERIMENT_NAME)",
                    EXPERIMENT)
    return name or EXPERIMENT


def _experiment_id(client: Any, uri: str, artifact_location: str | None = None) -> str:
    name = experiment_name()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if artifact_location and exp.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
            log.warning("experiment %r keeps its artifacts at %s, not %s (set when it was created)", name,
                        redact(exp.artifact_location), redact(artifact_location))
        try:
            check_artifact_location(exp.artifact_location)
        except (OSError, ValueError) as err:
            raise type(err)(f"experiment {name!r} keeps its artifacts at {exp.artifact_location} (set when "
                            f"it was created): {err}") from None
        return exp.experiment_id
    if artifact_location:
        try:
            check_artifact_location(artifact_location)
        except (OSError, ValueError) as err:
            raise type(err)(f"artifact location {err}") from None
    location = artifact_location
    if location is None and uri.startswith("sqlite:///"):
        # keep artifacts beside the sqlite file instead of ./mlruns of whatever the working directory is
        # (absolute: a relative store path has no file URI, and is where the store is now)
        location = Path(absolute_uri(uri).removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_parent_run(uri: str, run_name: str, params: dict[str, Any], artifact_location: str | None = None) -> str:
    """Open the parent run. `artifact_location` (e.g. s3://bucket/mlflow) applies when the experiment is new."""
    store = local_store(absolute_uri(uri)) if uri.startswith("sqlite:") else None
    if store is not None and not store.exists():
        check_store(uri, create=True)  # the folder, before a store is made beside it
        _make_store_whole(store)
    client = check_server(uri, named="") or mlflow_client(uri, create=True)
    experiment = _experiment_id(client, uri, artifact_location)
    if not experiment:  # a server answering `200 {}` to everything: then `Invalid value "" for parameter 'run_id'`
        raise ValueError(f"{redact(uri)}: answered without an experiment id: not an MLflow tracking server")
    run = client.create_run(experiment, run_name=run_name, tags=code_tags())
    if not run.info.run_id:
        raise ValueError(f"{redact(uri)}: answered without a run id: not an MLflow tracking server")
    try:
        for key, value in flatten(params).items():
            client.log_param(run.info.run_id, key, value)
        client.log_dict(run.info.run_id, params, "config.json")  # the whole config in one file, beside its params
    except BaseException:
        with contextlib.suppress(Exception):  # an orphan RUNNING run would look like a pipeline still going
            client.set_terminated(run.info.run_id, "FAILED")
        raise
    log.info("MLflow parent run %s at %s", run.info.run_id, redact(absolute_uri(uri)))  # the --out file keeps it
    return run.info.run_id


STORE_MAKING_S = 600.0  # far longer than MLflow's migrations take: an older store made aside was left by a kill


def _make_store_whole(store: Path) -> None:
    """A new sqlite store made aside (MLflow's migrations take seconds) and linked into place once whole: a SIGTERM
    while they ran left a half-migrated store, exit 143. Another process that made it first keeps its store."""
    from cmce.storage import clean_stale_temps, temp_prefix

    clean_stale_temps(store, max_age_s=STORE_MAKING_S)  # a killed maker's (SIGKILL runs no cleanup)
    tmp = store.with_name(f"{temp_prefix(store)}{secrets.token_hex(4)}.tmp")
    try:
        mlflow_client(f"sqlite:///{tmp}", create=True).search_experiments(max_results=1)  # the tables, all migrations
        _close_engines(f"sqlite:///{tmp}")  # no connection of this process may hold the file as another name
        with contextlib.suppress(FileExistsError):
            os.link(tmp, store)
    finally:
        for path in (tmp, *(tmp.with_name(tmp.name + end) for end in ("-journal", "-wal", "-shm"))):
            with contextlib.suppress(OSError):
                path.unlink()


def _close_engines(db_uri: str) -> None:
    """Close the engines MLflow keeps for `db_uri` in this process (its tracking and registry stores' maps)."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for kind in (TrackingStore, RegistryStore):
        engine = getattr(kind, "_engine_map", {}).pop(db_uri, None)
        if engine is not None:
            engine.dispose()


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    mlflow_client(uri).set_terminated(run_id, status)


def end_if_running(info: TrackingInfo, status: str) -> bool:
    """End the run as `status` if it is still RUNNING (a pipeline stopped, or failed before the task that closes
    it); True when it was ended here."""
    if not info.on:
        return False
    client = mlflow_client(info.uri)
    if client.get_run(info.run_id).info.status != "RUNNING":
        return False
    client.set_terminated(info.run_id, status)
    return True


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, f"{key}.")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                out |= flatten(item, f"{key}.{item.get('name', i)}.")
        else:
            out[key] = str(v)[:500]
    return out


def safe_metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and space: R@1 → R_at_1, FAR=0.001 → FAR_0.001."""
    name = name.replace("@", "_at_").replace("=", "_")
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def log_step(
    uri: str,
    parent_run_id: str,
    step: str,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    history: Iterable[dict[str, float]] = (),
    artifacts: Iterable[Path] = (),
    register: Iterable[tuple[str, Path, str]] = (),
    versions_of: Iterable[str] = (),
    promote: Iterable[tuple[str, str]] = (),
    promote_along: Iterable[tuple[str, str]] = (),
    inputs: Iterable[tuple[str, Path]] = (),
    headline: dict[str, float] | None = None,
) -> str:
    """Record one step as a nested run; register the given (model name, checkpoint, sha256) triples;
    record the current `candidate` version of the models named in `versions_of` as params; move the
    `production` alias to the versions named by (model name, sha256) in `promote`, and then to those in
    `promote_along` that are registered; log the (role, file) data sets in `inputs` as the run's inputs;
    log `headline` metrics on the parent run too."""
    from cmce.registry import model_versions, register_version, version_by_sha

    client = mlflow_client(uri)
    parent = client.get_run(parent_run_id)
    inputs = [(role, Path(path)) for role, path in inputs]
    data_sha = next((file_digest(p) for role, p in inputs if role == "dataset" and p.is_file()),
                    parent.data.tags.get(DATA_TAG))
    tags = {"mlflow.parentRunId": parent_run_id, **code_tags(), **({DATA_TAG: data_sha} if data_sha else {})}
    run = client.create_run(parent.info.experiment_id, run_name=step, tags=tags)
    rid = run.info.run_id
    moving = moved = False
    try:
        if data_sha and DATA_TAG not in parent.data.tags:  # the first step that reads the dataset versions the run
            client.set_tag(parent_run_id, DATA_TAG, data_sha)
        log_datasets(client, rid, inputs)
        for key, value in (headline or {}).items():
            if isinstance(value, int | float) and math.isfinite(value):
                client.log_metric(parent_run_id, safe_metric_name(key), float(value))
        for key, value in flatten(params or {}).items():
            client.log_param(rid, key, value)
        for key, value in (metrics or {}).items():
            if isinstance(value, int | float) and math.isfinite(value):
                client.log_metric(rid, safe_metric_name(key), float(value))
        for row in history:
            epoch = int(row.get("epoch", 0))
            for key, value in row.items():
                if key != "epoch":
                    client.log_metric(rid, safe_metric_name(key), float(value), step=epoch)
        for path in artifacts:
            log_artifact_or_reference(client, rid, Path(path))
        for name, path, sha256 in register:
            client.log_artifact(rid, str(path), artifact_path=f"registered/{name}")
            register_version(client, name, f"{run.info.artifact_uri}/registered/{name}", rid, sha256)
            if name == QUERY_MODEL:
                log_query_pyfunc(client, rid, Path(path), sha256)
        for name, version in model_versions(uri, versions_of).items():
            client.log_param(rid, f"registry.{name}", f"{name}@{ALIAS}=v{version}")
        promote = list(promote)
        if promote:
            # all or nothing: a half-moved alias would serve a query model with another model's transformations
            versions = {name: version_by_sha(client, name, sha256, uri) for name, sha256 in promote}
            missing = sorted(name for name, version in versions.items() if version is None)
            if missing:
                # e.g. the served models came from a run tracked elsewhere: the decision stands, nothing moves
                log.warning("not moving @%s: %s have no registered version whose file has the served sha256 (register "
                            "them with tracking on first)", PRODUCTION, missing)
                client.set_tag(rid, "promotion", f"skipped: unregistered {missing}")
            else:
                moving = True  # from here a failure may leave aliases moved: the decision is not withheld (publish)
                with stop_deferred():  # a stop between two aliases served the new query model with the old ONNX
                    _move_production(client, rid, versions, promote_along)  # export and transformations
                moved = True
                try:  # moved: a failure now must not fail the step whose promotion is done
                    client.set_tag(rid, "promotion", "done")
                except Exception as err:
                    log.warning("moved @%s, but could not tag the gate's run: %s", PRODUCTION, first_line(err))
                log.info("moved @%s to %s", PRODUCTION, ", ".join(f"{n} v{v}" for n, v in versions.items()))
    except BaseException as err:
        if moving:
            with contextlib.suppress(AttributeError):
                err.production_touched = True
        with contextlib.suppress(Exception):  # left RUNNING, it would look like a step still going
            client.set_terminated(rid, "FAILED")
        raise
    try:
        client.set_terminated(rid)
    except Exception as err:
        if not moved:
            raise
        log.warning("moved @%s, but could not close the gate's run: %s", PRODUCTION, first_line(err))
    return rid


def _move_production(client: Any, rid: str, versions: dict[str, str], promote_along: Iterable[tuple[str, str]]
                     ) -> None:
    """Move @production to `versions` (name → version), then each export in `promote_along` (name, its source's
    sha256) that has a version of it; `versions` gains those moved."""
    from cmce.registry import version_by_sha

    for name, version in versions.items():
        client.set_registered_model_alias(name, PRODUCTION, version)
        client.log_param(rid, f"promoted.{name}", f"{name}@{PRODUCTION}=v{version}")
    for name, sha256 in promote_along:
        version = version_by_sha(client, name, sha256)  # an export: tagged with its source's sha256
        if version is None:  # the edge would keep a model the promoted index refuses
            log.warning("%s has no version of the promoted query model (sha256 %s): its @%s stays; register one "
                        "(cmce export-query --mlflow-parent …) and move it", name, sha256[:12], PRODUCTION)
            continue
        client.set_registered_model_alias(name, PRODUCTION, version)
        client.log_param(rid, f"promoted.{name}", f"{name}@{PRODUCTION}=v{version}")
        versions[name] = version


def code_tags() -> dict[str, str]:
    """The git commit of the running code, as MLflow's own tag (nothing when it cannot be known)."""
    commit = _commit_from_env(os.environ.get("CMCE_GIT_COMMIT", "")) or _git_head()
    return {GIT_COMMIT_TAG: commit} if commit else {}


COMMIT_ID = re.compile(r"[0-9a-fA-F]{7,64}")  # an abbreviated or full SHA-1 / SHA-256 commit id


@functools.cache
def _commit_from_env(value: str) -> str | None:
    """CMCE_GIT_COMMIT when it is a commit id; otherwise a warning (once) and None: the tag is the code's version,
    not free text (a 9,000-character value went into every run)."""
    if not value or COMMIT_ID.fullmatch(value):
        return value or None
    log.warning("CMCE_GIT_COMMIT %r%s is not a commit id (7 to 64 hex digits): ignored", value[:20],
                "..." if len(value) > 20 else "")
    return None


@functools.cache
def _git_head() -> str | None:
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # GIT_DIR named another checkout
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                             env=env)
    except (OSError, subprocess.SubprocessError):  # no git in the image
        return None
    return res.stdout.strip() if res.returncode == 0 else None


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    from cmce.storage import file_sha256

    return file_sha256(path)


def file_digest(path: Path) -> str:
    """sha256 of a file, computed once per version of it in this process (several steps may read one dataset)."""
    st = path.stat()
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def log_datasets(client: Any, run_id: str, inputs: list[tuple[str, Path]]) -> None:
    """The data sets a step read, as MLflow dataset inputs: source = the file (or its s3:// origin), digest =
    the start of its sha256, context = its role (dataset, gallery, ...)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from cmce.storage import origin

    entries = []
    for role, path in inputs:
        if not path.is_file():
            continue
        source = str(origin(path))
        with warnings.catch_warnings():  # a file URI matches two registered local source types: either will do
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(source if "://" in source else path.resolve().as_uri())
        data = MetaDataset(source, name=path.stem, digest=file_digest(path)[:16])
        entries.append(DatasetInput(data._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, role)]))
    if entries:
        client.log_inputs(run_id, entries)


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def log_artifact_or_reference(client: Any, run_id: str, path: Path) -> None:
    """A file or folder the step made, copied into the run's artifacts; above ARTIFACT_MAX_MB only a tag
    `artifact.<name>` naming where it is (and, for a file, its sha256), so the store does not hold a second copy."""
    from cmce.storage import origin

    if not path.exists():
        return
    if _size_mb(path) > ARTIFACT_MAX_MB:
        where = str(origin(path)) + (f" sha256={file_digest(path)}" if path.is_file() else "")
        client.set_tag(run_id, f"artifact.{path.name}", where)
    elif path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path=path.name)
    else:
        client.log_artifact(run_id, str(path))


QUERY_MODEL = registry_name("query", "")
PYFUNC = registry_name("query-pyfunc", "")  # for mlflow.pyfunc.load_model; cmce-query stays the bare checkpoint


def pyfunc_requirements() -> list[str]:
    """What an environment MLflow makes for the pyfunc installs: cmce's own dependencies, pinned as its package pins
    them, and this MLflow. cmce itself travels inside the model (code_paths): no package index holds it, and a bare
    `cmce` requirement installed whatever a public index calls so (`mlflow models serve` restores the environment)."""
    import importlib.metadata

    import mlflow

    try:
        own = [r for r in importlib.metadata.requires("cmce") or [] if "extra ==" not in r]
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed: the two it imports first
        log.warning("cmce is not installed as a package: the pyfunc's requirements name torch and numpy unpinned")
        own = ["torch", "numpy"]
    return [*own, f"mlflow=={mlflow.__version__}"]


def log_query_pyfunc(client: Any, run_id: str, checkpoint: Path, sha256: str) -> str:
    """Log the query checkpoint as an MLflow pyfunc model of its run (models from code: cmce.pyfunc_model, with a
    signature), registered as `cmce-query-pyfunc` with the checkpoint's sha256 tag and alias `candidate`."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from cmce import pyfunc_model
    from cmce.checkpoint import load_embedding_model

    model = load_embedding_model(checkpoint)
    signature = ModelSignature(
        # unnamed tensors: predict receives the pixel array itself (named ones arrive as a dict)
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, model.in_channels, model.image_size, model.image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.embedding_dim))]))
    with mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.pyfunc.log_model(name="pyfunc", python_model=pyfunc_model.__file__,
                                       artifacts={"checkpoint": str(checkpoint)}, signature=signature,
                                       code_paths=[str(Path(pyfunc_model.__file__).parent)],
                                       pip_requirements=pyfunc_requirements(), registered_model_name=PYFUNC)
    version = str(info.registered_model_version)
    client.set_model_version_tag(PYFUNC, version, "sha256", sha256)
    client.set_registered_model_alias(PYFUNC, ALIAS, version)
    log.info("registered %s version %s as @%s", PYFUNC, version, ALIAS)
    return version


def check_parent_run(uri: str, run_id: str) -> None:
    """Before any work: the parent run a step will record under exists and is still running (a step whose
    tracking fails at the end would otherwise have written its outputs and then failed)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)  # a sqlite file that is no MLflow store (or none) is refused here, not created
    try:  # a silent server took MLflow's retries, 37 s
        run = read_within(lambda: client.get_run(run_id), f"--mlflow-parent {run_id}", uri).info
    except MlflowException as err:
        reason = "not found at" if err.error_code == "RESOURCE_DOES_NOT_EXIST" else "cannot be read from"
        raise ValueError(f"--mlflow-parent {run_id}: {reason} {uri}: {first_line(err)}") from None
    status = run.status
    if run.lifecycle_stage == "deleted":  # deleting a run leaves its status as it was, RUNNING included
        raise ValueError(f"--mlflow-parent {run_id}: the run is deleted; nested runs go under a running parent")
    if status != "RUNNING":
        raise ValueError(f"--mlflow-parent {run_id}: the run is {status}; nested runs go under a running parent")
