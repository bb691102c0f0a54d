"""MLflow's model registry as cmce uses it: checkpoints registered by sha256 (alias `candidate`), and `models:/`
URIs resolved to a READY version's one checkpoint file, downloaded into the command's scratch folder. Beside
cmce.tracking (runs) and cmce.tracking_store (stores, the server's checks), the modules that import mlflow.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cmce.errors import first_line, from_client
from cmce.tracking import ALIAS, PRODUCTION
from cmce.tracking_store import (
    check_registry,
    check_store,
    http_defaults,
    mlflow_client,
    proxy_error,
    read_within,
    registry_of,
    schema_error,
)

log = logging.getLogger(__name__)


def register_version(client: Any, name: str, source: str, run_id: str, sha256: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    version = client.create_model_version(name, source=source, run_id=run_id, tags={"sha256": sha256})
    client.set_registered_model_alias(name, ALIAS, version.version)
    log.info("registered %s version %s as @%s", name, version.version, ALIAS)
    return str(version.version)


def version_by_sha(client: Any, name: str, sha256: str, verify_at: str | None = None) -> str | None:
    """The version of registered model `name` whose checkpoint has this sha256 (the newest such version
    when a file was registered twice); None when there is none. `verify_at` (the registry's URI): the version's
    file is downloaded and hashed, not its tag believed (a tag naming the gated query model over a KD student's
    file had @production moved to the student)."""
    from mlflow.exceptions import MlflowException


    try:
        versions = [v for v in client.search_model_versions(f"name='{name}'")
                    if v.tags.get("sha256") == sha256 and v.status == READY]  # a failed registration holds nothing
    except MlflowException:
        return None
    for v in sorted(versions, key=lambda v: -int(v.version)):
        if verify_at is None:
            return str(v.version)
        try:
            found = _version_file_sha256(name, str(v.version), verify_at)
        except (OSError, ValueError) as err:  # its file gone: an older version may still hold the right one
            log.warning("%s v%s: its file cannot be read (%s): not promoted to", name, v.version, err)
            continue
        if found == sha256:
            return str(v.version)
        log.warning("%s v%s: its sha256 tag says %s, but its file is %s: not promoted to", name, v.version,
                    sha256[:12], found[:12])
    return None


@functools.lru_cache(maxsize=256)
def _version_file_sha256(name: str, version: str, registry: str) -> str:
    """sha256 of a registered version's file, downloaded once per process: a gate hashes every served version before
    it publishes (unregistered) and again as it moves @production, and each download stayed in the scratch folder."""
    from cmce.storage import file_sha256

    return file_sha256(resolve_model_uri(f"models:/{name}/{version}", registry, verify=False))


def unregistered(uri: str, promote: Iterable[tuple[str, str]]) -> list[str]:
    """The models among (name, sha256) pairs with no registered version whose file has that sha256: @production
    cannot move to them (log_step then moves none). The files are hashed, as the move hashes them: a version whose
    tag alone named the sha256 let the gate say "promoted" while nothing moved."""
    client = mlflow_client(uri)
    return sorted(name for name, sha256 in promote if version_by_sha(client, name, sha256, uri) is None)


def production_elsewhere(uri: str, served: Iterable[tuple[str, str]]) -> list[str]:
    """The models among (name, sha256) pairs (what a gate's baseline was served with) whose @production names
    another version now: production moved since that baseline was made (a later upgrade), and a promotion measured
    against it would roll the move back. A model without @production yet is not among them."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    moved = []
    for name, sha256 in served:
        try:
            version = client.get_model_version_by_alias(name, PRODUCTION)
        except MlflowException:  # no such alias (or model) yet: nothing to roll back
            continue
        if version.tags.get("sha256") != sha256:
            moved.append(f"{name}@{PRODUCTION} (v{version.version})")
    return moved


def resolve_model_uri(uri: str, tracking: str | None = None, verify: bool = True) -> Path:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` → local path of the registered checkpoint file, in the
    command's scratch folder (removed when it ends). With `verify`, a checkpoint whose sha256 is not its version's
    sha256 tag is refused (a file changed in the artifact store was used, exit 0)."""
    require_registry(uri, tracking)
    http_defaults()
    import mlflow

    from cmce.storage import scratch_dir

    tracking = tracking or os.environ["MLFLOW_TRACKING_URI"]  # one of them is set (require_registry)
    mlflow.set_tracking_uri(tracking)  # the process-wide one may be an earlier command's, and wins over the variable
    # "No artifacts found to download": a version whose source is the file itself; cmce reads that file below
    logging.getLogger("mlflow.store.artifact.artifact_repo").setLevel(logging.ERROR)
    dst = Path(tempfile.mkdtemp(prefix="model-", dir=scratch_dir()))
    try:
        return _registered_checkpoint(uri, tracking, dst, verify)
    except BaseException:  # a refused version's download goes now (a server kept one per alias move until it stopped)
        shutil.rmtree(dst, ignore_errors=True)
        raise


def _registered_checkpoint(uri: str, tracking: str, dst: Path, verify: bool) -> Path:
    """resolve_model_uri's download into `dst`, and the one checkpoint file in it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from cmce.output_checks import file_format
    from cmce.storage import file_sha256, stands_for

    version = None
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking)
        version = read_within(lambda: ready_version(client, uri), uri, tracking)
        pinned = uri if version is None else f"models:/{version.name}/{version.version}"  # the alias may move
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(dst)))
        if version is not None and local.is_dir() and not any(local.iterdir()):
            # registered from the checkpoint file itself (runs:/RUN/path/query.pt, a file path): MLflow lists
            # the source as a folder and finds nothing in it; the source is read as the one file it is
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst)))
            if local.is_file() and file_format(local) not in ("checkpoint", "onnx"):  # what cmce registers
                raise ValueError(f"{uri}: the registered version's source {version.source} is a file but not a "
                                 "cmce checkpoint")
    except Exception as err:
        if isinstance(err, ValueError) and str(err).startswith(uri):  # cmce's own refusal, named already
            raise
        if isinstance(err, MlflowException) or from_client(err):
            raise ValueError(f"{uri}: {_registry_error(err, tracking)}") from None
        if isinstance(err, ValueError | TypeError | KeyError | OSError):  # MLflow's own, on a source it cannot read
            source = f" from its source {version.source}" if version is not None else ""
            raise ValueError(f"{uri}: the registered version could not be read{source} ({type(err).__name__}: "
                             f"{err})") from None  # an http:// source: "not enough values to unpack", naming nothing
        raise
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    if len(files) > 1:  # a model card or a README beside the checkpoint: the checkpoint is the one torch file
        files = [p for p in files if file_format(p) == "checkpoint"]
    if len(files) != 1:
        shown = ", ".join(p.relative_to(local).as_posix() for p in files[:3]) if local.is_dir() else ""
        raise ValueError(f"{uri}: expected one checkpoint file in the registered version, found {len(files)}"
                         + (f" ({shown})" if shown else ""))
    tagged = version.tags.get("sha256") if version is not None else None
    if verify and tagged and file_format(files[0]) == "checkpoint":  # an ONNX export is tagged with its model's
        if (found := file_sha256(files[0])) != tagged:
            raise ValueError(f"{uri}: the registered file's sha256 is {found[:12]}, but version {version.version} was "
                             f"registered as {tagged[:12]}: the file was changed since; register it again")
    stands_for(files[0], uri)  # errors about the file name the registered model, not its scratch copy
    return files[0]


READY = "READY"


def ready_version(client: Any, uri: str) -> Any:
    """The registered version a `models:/` URI names (its alias resolved), refused (ValueError) unless READY: a
    version whose registration failed or is pending holds no model (or not yet) and was used without a word.
    None for a URI that names no registered version (a logged model's `models:/m-…`)."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    resolved = get_model_name_and_version(client, uri)
    if len(resolved) != 2:
        return None
    version = client.get_model_version(*resolved)
    if not version.name or not version.version:  # a server answering 200 with other JSON: every field empty
        raise ValueError(f"{uri}: the registry answered without a model version (no name, no number): not an "
                         "MLflow server's answer; check MLFLOW_TRACKING_URI / --mlflow-uri")
    if version.status != READY:
        message = (version.status_message or "").strip()
        why = f" ({message.splitlines()[0][:200]})" if message else ""
        raise ValueError(f"{uri}: version {version.version} of {version.name} is {version.status}{why}, not READY: "
                         "its registration did not finish; point the alias at a READY version")
    return version


def _registry_error(err: BaseException, tracking: str) -> str:
    """A failed registry read, naming the registry (an HTTP server that is not MLflow answered a bare 404) and,
    when the artifacts' S3 endpoint cannot be reached, the variable that names it for MLflow."""
    from cmce.s3_errors import connection_error

    if proxied := proxy_error(err, registry_of(tracking)):
        return proxied
    if newer := schema_error(err):
        return f"registry {registry_of(tracking)}: {newer}"
    text = first_line(err)
    lines = [line.strip(" #") for line in str(err).splitlines() if line.strip(" #")]
    if text.endswith(":") and len(lines) > 1:  # MLflow's "failures occurred while downloading … from X:", then why
        text = f"{text} {'; '.join(lines[1:3])}"[:400]
    registry = registry_of(tracking)
    reason = text if registry in text else f"registry {registry}: {text}"
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if endpoint and connection_error(err) is not None:
        reason += f" (MLflow reaches S3 artifacts at MLFLOW_S3_ENDPOINT_URL={endpoint!r})"
    return reason


def require_registry(uri: str, tracking: str | None = None) -> None:
    """A `models:/` URI needs a registry to be named: MLflow's fallback is a new ./mlflow.db in whatever folder
    the command runs in, a write outside every output folder that then finds nothing."""
    registry = tracking or os.environ.get("MLFLOW_TRACKING_URI")
    if not registry:
        raise ValueError(f"{uri}: a registered model needs a registry: give --mlflow-uri or set MLFLOW_TRACKING_URI")
    check_store(registry)  # a read: a registry that is not there is not made (in the working folder) either
    check_registry(registry)


def alias_version(uri: str) -> str:
    """The version a `models:/NAME@ALIAS` URI names now (against $MLFLOW_TRACKING_URI); a server polls it to
    follow the alias the promotion gate moves."""
    require_registry(uri)
    from mlflow import MlflowClient

    http_defaults()
    tracking = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=tracking)  # not an earlier command's set_tracking_uri
    return str(read_within(lambda: ready_version(client, uri), uri, tracking).version)


def registered_checkpoints(cfg: Any, uri: str, alias: str = ALIAS) -> tuple[Path, list[Path]]:
    """The query model's and every transformation's checkpoint registered under `alias`, downloaded."""
    from cmce.records import registered_uris

    uris = registered_uris(cfg, alias)
    return (resolve_model_uri(uris["query_model"][0], uri),
            [resolve_model_uri(u, uri) for u in uris["transformations"]])


def model_versions(uri: str, names: Iterable[str], alias: str = ALIAS) -> dict[str, str]:
    """Current version behind `alias` of each registered model (for the evaluation record)."""
    client = mlflow_client(uri)
    out = {}
    for name in names:
        try:
            out[name] = str(client.get_model_version_by_alias(name, alias).version)
        except Exception:  # noqa: BLE001 - a model may simply not be registered
            continue
    return out
