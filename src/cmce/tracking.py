"""MLflow tracking: runs, stores and the server's checks (the registry's reads and writes: cmce.registry).

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

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else a sqlite file under the run directory.
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
import sqlite3
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cmce.errors import first_line, from_client
from cmce.records import registry_name
from cmce.s3 import redact

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
    device it computed on among its params."""
    from cmce import device as devices

    info = info if isinstance(info, TrackingInfo) else TrackingInfo.read(info)
    if record is None or not info.on:
        return None
    params = {**record.params, "device": devices.describe(devices.current())}
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
        raise ValueError(f"{where}{record.step}: its outputs are written but not tracked: {reason}") from err


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


def check_uri_settings(flag: str | None) -> None:
    """A blank --mlflow-uri or MLFLOW_TRACKING_URI is refused by name: MLflow reads "  " as a folder
    and answers about a filesystem store in maintenance mode. (An empty variable counts as unset.) Where MLflow
    is used, its HTTP settings are range-checked (check_http_settings); a relative sqlite path is read as MLflow
    reads it, in the working folder, and the absolute store it names is logged."""
    if flag is not None and not flag.strip():
        raise ValueError(f"--mlflow-uri {flag!r} is blank: give a tracking URI")
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and not env.strip():
        raise ValueError(f"MLFLOW_TRACKING_URI {env!r} is blank: set a tracking URI or unset it")
    # a space at either end becomes part of a file name or host, and is all but invisible in the error
    for name, value in (("--mlflow-uri", flag), ("MLFLOW_TRACKING_URI", env)):
        if value and value != value.strip():
            raise ValueError(f"{name} {value!r} has spaces at its start or end: remove them")
    if flag or env or os.environ.get(REGISTRY_ENV):
        check_http_settings()
        registry_deadline()
    given = (("--mlflow-uri", flag), ("MLFLOW_TRACKING_URI", env), (REGISTRY_ENV, os.environ.get(REGISTRY_ENV)))
    for name, value in given:
        if value and (why := query_in_server_uri(value)):
            raise ValueError(f"{name} {why}")
        if value and (why := unsupported_store(value)):
            raise ValueError(f"{name} {redact(value)}: {why}")
        if value and value.lower().startswith(("http://", "https://")):
            try:  # `http://[::1:80` failed in MLflow as `Invalid IPv6 URL`, naming neither variable nor value
                urlparse(value).port  # noqa: B018 - parsing the port checks the whole authority
            except ValueError as err:
                raise ValueError(f"{name} {redact(value)}: not a valid URL ({err})") from None
        if value and _in_memory(value):  # `sqlite://` was taken: the runs ended with the process, artifacts in ./mlruns
            raise ValueError(f"{name} {value}: an in-memory store, gone when this command ends (its runs and models "
                             "with it); give a file: sqlite:////path/mlflow.db")
    said = set()  # cmce sets MLFLOW_TRACKING_URI from --mlflow-uri for the command: one line for both
    for name, value in given:
        if value and absolute_uri(value) != value and value not in said:
            said.add(value)
            log.info("%s %s: a path in the working folder: the store is %s", name, redact(value),
                     redact(absolute_uri(value)))


def query_in_server_uri(uri: str) -> str | None:
    """Why an http(s) tracking or registry URI with a query string or fragment is refused, shown without them (a
    token there was printed in every error); else None. MLflow appends its API paths to the whole URI, after the
    query, so no request of it ever reached the API."""
    if not uri.lower().startswith(("http://", "https://")) or not ("?" in uri or "#" in uri):
        return None
    scheme, _, rest = uri.partition("://")
    host, slash, path = rest.partition("/")
    if "@" in host:  # a password holding '#' or '?' (which requests would misread too) is not shown in part
        host = "***@" + host.rsplit("@", 1)[1]
    shown = f"{scheme}://{re.split('[?#]', host + slash + path)[0]}{'?…' if '?' in uri else '#…'}"
    return (f"{shown}: an MLflow server URI takes no query string or fragment (MLflow appends its API paths after "
            "it; its value is not shown): give a token in MLFLOW_TRACKING_TOKEN, or user:password@ in the URL")


STORE_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https")  # `+driver` allowed
DATABRICKS_SCHEMES = ("databricks", "databricks-uc", "uc")
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def unsupported_store(uri: str) -> str | None:
    """Why MLflow cannot keep runs at `uri`, or None. `ftp://…` passed the checks and failed in the first task that
    opened a run (`KeyError: 'ftp'`), retried for minutes; `databricks` without credentials failed with MLflow's
    warning and a page-long error naming no setting."""
    found = SCHEME.match(uri)
    bare = uri.strip().lower() in DATABRICKS_SCHEMES  # `databricks` alone names the default workspace
    if not bare and (found is None or len(found.group(1)) == 1):  # a path (a drive letter is no scheme): a file store
        return None
    scheme = uri.strip().lower() if bare else found.group(1).lower()
    if scheme in DATABRICKS_SCHEMES:
        if os.environ.get("DATABRICKS_HOST") or Path("~/.databrickscfg").expanduser().is_file():
            return None
        return "no Databricks workspace configured (DATABRICKS_HOST and DATABRICKS_TOKEN, or ~/.databrickscfg)"
    if scheme.partition("+")[0] in STORE_SCHEMES:
        return None
    return (f"MLflow keeps no runs at a {scheme}: URI; give a sqlite:////path/mlflow.db file, an http(s):// "
            "server, a folder, or a postgresql/mysql/mssql database")


def _in_memory(uri: str) -> bool:
    path = uri.removeprefix("sqlite://").partition("?")[0] if uri.startswith("sqlite://") else None
    return path is not None and path in ("", "/", "/:memory:")


def absolute_uri(uri: str) -> str:
    """`sqlite:///rel.db` (a path SQLAlchemy reads relative to the working folder, as MLflow's own docs write
    `sqlite:///mlflow.db`) as the absolute `sqlite:////<working folder>/rel.db`, the file it names now; any
    other URI as it is. A process that passes the URI on (a pipeline's tasks) passes this one."""
    if not uri.startswith("sqlite:///"):
        return uri
    path, sep, query = uri.removeprefix("sqlite:///").partition("?")
    if not path or path.startswith("/") or path == ":memory:":
        return uri
    if path.startswith("~"):  # as cmce's path flags read it (a folder named `~` was made in the working folder)
        home = os.path.expanduser(path.partition("/")[0])
        if home.startswith("~"):
            raise ValueError(f"{uri}: {path.partition('/')[0]}: no such user's home folder")
        path = home + path[len(path.partition("/")[0]):]
    return f"sqlite:///{os.path.abspath(path)}{sep}{query}"


def local_store(uri: str) -> Path | None:
    """The file (sqlite) or folder (a file store: `file:` or a bare path) a tracking URI keeps its runs and registry
    in on this machine; None for a server, or a store in memory."""
    from urllib.parse import unquote, urlsplit

    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///").partition("?")[0]
        return None if not path or path == ":memory:" else Path(os.path.expanduser(path))
    if uri.startswith("file:"):
        return Path(unquote(urlsplit(uri).path)) if urlsplit(uri).path else None
    return Path(uri) if uri and "://" not in uri and ":" not in uri.partition("/")[0] else None


# MLflow's HTTP settings, as MLflow's rest_utils and requests enforce them (checked where a request is first made,
# and reported there as an error of the registry or server): (type, lowest, highest or the variable holding it)
HTTP_RANGES: dict[str, tuple[type, float, float | tuple[str, int] | None]] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": (int, 0, ("_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT", 10)),
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": (int, 0, ("_MLFLOW_HTTP_REQUEST_MAX_BACKOFF_FACTOR_LIMIT", 120)),
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": (float, 0, None),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": (int, 1, None),  # requests refuses a timeout of 0 or less
}


def check_http_settings() -> None:
    """Refuse, naming it, an MLflow HTTP setting of the environment out of the range MLflow allows: MLflow
    checks them only at its first request, and its error (`The configured max_retries value (1000000) is in
    excess of the maximum allowable retries (10)`) was reported as the registry's or server's."""
    for name, (kind, low, high) in HTTP_RANGES.items():
        raw = os.environ.get(name)
        if raw is None:
            continue
        if isinstance(high, tuple):
            limit_raw = os.environ.get(high[0], "").strip()
            high = int(limit_raw) if limit_raw.lstrip("-").isdigit() else high[1]
        try:
            value = kind(raw.strip())
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (high is not None and value > high):
            what = "an integer" if kind is int else "a number"
            span = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
            raise ValueError(f"environment variable {name}={raw!r}: {what} {span} expected (MLflow's range)")


SQLITE_HEADER = b"SQLite format 3\x00"
MLFLOW_TABLES = {"alembic_version", "experiments"}  # in every MLflow sqlite store, from its first migration
LOCK_WAIT_S = 5.0  # sqlite's own default busy timeout: a writer holds its lock for milliseconds


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///path` (relative) or `sqlite:////path` (absolute) tracking URI; None otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def check_store(uri: str, create: bool = False) -> None:
    """Before MLflow opens a sqlite store. MLflow creates a missing file (and its folders), migrates its ~70
    tables into any sqlite file it is given (another application's database included), and retries a file it
    cannot open for minutes, logging tracebacks. So: the file must be an MLflow store already, or, where
    `create` (a new parent run), a new (missing or empty) file; a read (a run, a registered model) never creates."""
    if not uri.strip():
        raise ValueError(f"tracking URI {uri!r} is blank")
    if why := query_in_server_uri(uri):
        raise ValueError(why)
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    folder = scheme in ("", "file") and uri.split(":", 1)[0] not in ("databricks", "databricks-uc", "uc")
    if folder and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        raise ValueError(f"{uri}: a folder is no tracking store this MLflow accepts: give sqlite:///FILE.db or "
                         "http(s)://SERVER")
    if scheme in ("postgresql", "mysql", "mssql"):
        _check_driver(uri)
    path = sqlite_path(uri)
    if path is None:
        return
    if "?" in uri:  # SQLAlchemy's sqlite driver drops them with a warning: ?mode=ro still wrote
        raise ValueError(f"{uri}: query arguments ({uri.split('?', 1)[1]}) are not applied to a sqlite store "
                         "(its driver ignores them; mode=ro would not keep it unwritten): remove them")
    if not path.exists():
        if create:
            _check_creatable(uri, path)
            return
        raise ValueError(f"{uri}: no tracking database there (a read never creates one)")
    if not path.is_file():
        raise ValueError(f"{uri}: {path} is a folder or special file, not an MLflow sqlite store")
    if path.stat().st_size == 0:
        if create:
            return
        raise ValueError(f"{uri}: {path} is empty, not an MLflow tracking store")
    with path.open("rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise ValueError(f"{uri}: {path} is not a sqlite database")
    # read-only: this look must not write either. A journal left by a writer that crashed is rolled back by the
    # first writer (MLflow), but a read-only connection refuses it ("attempt to write a readonly database"): the
    # table names are then read from the file as it is.
    journal = path.with_name(path.name + "-journal").exists()
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?{'immutable=1' if journal else 'mode=ro'}", uri=True,
                              timeout=LOCK_WAIT_S)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            rows = con.execute("SELECT version_num FROM alembic_version").fetchall() if MLFLOW_TABLES <= tables else []
            revision = rows[0][0] if rows else None
        finally:
            con.close()
    except sqlite3.Error as err:
        if "locked" in str(err):
            raise ValueError(f"{uri}: the store is locked by another process (waited {LOCK_WAIT_S:g} s)") from None
        raise ValueError(f"{uri}: {path} cannot be read as a sqlite database: {first_line(err)}") from None
    if not MLFLOW_TABLES <= tables:
        raise ValueError(f"{uri}: {path} is a sqlite database of another application (no MLflow tables), "
                         "not an MLflow tracking store; it is left as it is")
    _check_schema(uri, revision)


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every schema revision this MLflow knows: its migration scripts name them all."""
    from alembic.script import ScriptDirectory
    from mlflow.store import db_migrations

    return frozenset(s.revision for s in ScriptDirectory(os.path.dirname(db_migrations.__file__)).walk_revisions())


def _check_schema(uri: str, revision: str | None) -> None:
    """A store whose schema revision this MLflow does not know was made (or upgraded) by a newer MLflow: MLflow's
    own answer, "out-of-date database schema … run 'mlflow db upgrade'", cannot apply. A known older revision is
    left to MLflow, whose upgrade advice then holds."""
    if revision is not None and (newer := _newer_schema(revision)):
        raise ValueError(f"{uri}: {newer}; the store is left unchanged")


def schema_error(err: BaseException) -> str | None:
    """MLflow's out-of-date-schema error for a store of any database, reworded when the revision it found is
    unknown here (a newer MLflow's): its 'mlflow db upgrade' advice cannot apply; else None."""
    found = re.search(r"out-of-date database schema \(found version (\w+)", str(err))
    return None if found is None else _newer_schema(found.group(1))


def _newer_schema(revision: str) -> str | None:
    """What a store of schema `revision` is, when this MLflow's migration scripts do not know it; else None."""
    if revision in known_revisions():
        return None
    import mlflow

    return (f"the store's schema (revision {revision}) was made by a newer MLflow than this one "
            f"({mlflow.__version__}); read it with that MLflow version")


REGISTRY_ENV = "MLFLOW_REGISTRY_URI"


def check_registry(tracking: str, create: bool = False) -> None:
    """MLflow reads and writes registered models at MLFLOW_REGISTRY_URI when it is set, whatever the tracking
    URI: the same checks as the tracking store's (check_store), naming the variable. A relative sqlite path
    there made a new, empty registry in the working folder, and the registry of --mlflow-uri was never read."""
    registry = os.environ.get(REGISTRY_ENV)
    if not registry or registry == tracking:
        return
    if registry != registry.strip():
        raise ValueError(f"{REGISTRY_ENV} {registry!r} has spaces at its start or end: remove them")
    try:
        check_store(registry, create)
    except ValueError as err:
        raise ValueError(f"{REGISTRY_ENV}={err}") from None


def registry_of(tracking: str) -> str:
    """The registry a client of `tracking` reads registered models from."""
    return os.environ.get(REGISTRY_ENV) or tracking


def _check_creatable(uri: str, path: Path) -> None:
    """A new sqlite store can be made at `path` (MLflow makes its folders): else MLflow retried for two minutes."""
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ValueError(f"{uri}: cannot be created: {parent} is not a folder")
    try:  # the one test that holds for every user and file system: make a file there (and remove it)
        fd, probe = tempfile.mkstemp(prefix=".cmce-probe-", dir=parent)
    except OSError as err:
        raise ValueError(f"{uri}: cannot be created in {parent}: {err.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def _check_driver(uri: str) -> None:
    """A database URI whose driver is not installed raised ImportError from deep in MLflow (a traceback)."""
    import sqlalchemy

    try:
        sqlalchemy.create_engine(uri).dispose()  # loads the driver; connects only on first use
    except ImportError as err:
        raise ValueError(f"{uri}: its database driver is not installed: {first_line(err)}") from None
    except sqlalchemy.exc.ArgumentError as err:
        raise ValueError(f"{uri}: {first_line(err)}") from None


def tracking_uri(run_dir: str | Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():  # was `[Errno 17] File exists`, naming no flag
        raise ValueError(f"--run-dir {run_dir}: is a file, not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    return default_store_uri(run_dir)


def default_store_uri(run_dir: str | Path) -> str:
    """The sqlite store a run folder holds when no tracking URI is given (nothing is made here)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


# a tracking server that accepts and never answers: MLflow's defaults (120 s a request, 7 retries with backoff)
# kept a step silent for many minutes; the user's own settings win
# MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT: MLflow writes "View run … at: URL" to stdout as a run ends on an HTTP store;
# no output of the command, and a failing stdout (`> /dev/full`, an ascii encoding) failed the tracking
# MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR: a `models:/` read drew tqdm's "Downloading artifacts" bars on stderr, between
# the log lines
# MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER: a server answering 429 with `Retry-After: 3600` held a step for an hour
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
# a registry read (an alias, a version) with its retries; a server trickling its answer, or its headers, a line at
# a time never trips the request timeout: `cmce serve` hung at its start
DEADLINE_ENV, DEADLINE_RANGE = "CMCE_MLFLOW_DEADLINE_S", (20, 2, 3600)


def registry_deadline() -> int:
    from cmce.environment import env_int

    return env_int(DEADLINE_ENV, *DEADLINE_RANGE)


def read_within(call: Any, uri: str, tracking: str) -> Any:
    """An MLflow read (an alias, a version, a run) within registry_deadline(); past it, a ValueError naming `uri`
    and the server."""
    from cmce.deadline import within

    seconds = registry_deadline()
    return within(seconds, call, lambda: ValueError(
        f"{uri}: no whole answer from MLflow at {redact(registry_of(tracking))} within {seconds} s "
        f"({DEADLINE_ENV}): unreachable, silent or trickling"))


def http_defaults() -> None:
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings: the one error line says it


def proxy_error(err: BaseException, uri: str) -> str | None:
    """A tracking server reached through a proxy that cannot be reached: the proxy named with the variable that
    set it (requests reads them as urllib does), as the server behind it may well be up; else None."""
    if "ProxyError" not in str(err) or not uri.startswith(("http://", "https://")):
        return None
    scheme = uri.split(":", 1)[0]
    names = (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY")
    variable = next((name for name in names if os.environ.get(name)), None)
    if variable is None:
        return None
    return (f"{uri}: cannot reach the proxy {redact(os.environ[variable])} ({variable}); fix or unset it, or name "
            "the tracking server's host in NO_PROXY")


def mlflow_client(uri: str, create: bool = False):
    """A client of the store at `uri`, checked first (check_store); `create`: a new sqlite store may be made."""
    check_store(uri, create)
    check_registry(uri, create)
    http_defaults()
    import mlflow
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # its traceback of a database error (and of each engine retry) comes before the error it raises: one line says it
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def check_server(uri: str, named: str = "MLFLOW_TRACKING_URI=") -> Any | None:
    """Before a pipeline starts its tasks, or a parent run is opened: an http(s) tracking server answers (one cheap
    request within registry_deadline()). Unchecked, the first task failed with tracebacks and was retried for
    minutes; a server sending half a status line held `track-start` for MLflow's retries (60 s). `named`: how
    the URI was given, before it in the message. Returns the client it checked with (None for other stores)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        client = mlflow_client(uri)
        read_within(lambda: client.search_experiments(max_results=1), "the tracking server", uri)
        return client
    except Exception as err:  # noqa: BLE001 - MLflow's and requests' errors alike: the server cannot be used
        raise ValueError(f"{named}{redact(uri)}: the tracking server cannot be used "
                         f"({redact(proxy_error(err, uri) or first_line(err, 300))})") from None


def credentials_to_env(uri: str) -> str:
    """`http://user:pw@host` → `http://host`, with MLFLOW_TRACKING_USERNAME / _PASSWORD set from it (read by
    MLflow's HTTP client): a password in the URI was printed by the pipeline runner among each task's inputs."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return urlunsplit(parts._replace(netloc=host))


def check_artifact_location(location: str) -> None:
    """An s3:// artifact location's bucket exists: checked through MLflow's S3 endpoint (MLFLOW_S3_ENDPOINT_URL,
    else the AWS chain's), before an experiment is pinned to it or a run opened (a typo in the bucket made every
    later run of the experiment fail)."""
    from cmce import s3

    if not s3.is_s3(location):
        return
    with s3.endpoint_from("MLFLOW_S3_ENDPOINT_URL"):
        s3.check_writable(location)


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
    from cmce.storage import clean_stale_temps

    clean_stale_temps(store, max_age_s=STORE_MAKING_S)  # a killed maker's (SIGKILL runs no cleanup)
    tmp = store.with_name(f".{store.name}.{secrets.token_hex(4)}.tmp")
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
                log.warning("not moving @%s: %s have no registered version with the served sha256 (register them "
                            "with tracking on first)", PRODUCTION, missing)
                client.set_tag(rid, "promotion", f"skipped: unregistered {missing}")
            else:
                for name, version in versions.items():
                    client.set_registered_model_alias(name, PRODUCTION, version)
                    client.log_param(rid, f"promoted.{name}", f"{name}@{PRODUCTION}=v{version}")
                for name, sha256 in promote_along:
                    version = version_by_sha(client, name, sha256)  # an export: tagged with its source's sha256
                    if version is None:  # the edge would keep a model the promoted index refuses
                        log.warning("%s has no version of the promoted query model (sha256 %s): its @%s stays; "
                                    "register one (cmce export-query --mlflow-parent …) and move it", name,
                                    sha256[:12], PRODUCTION)
                        continue
                    client.set_registered_model_alias(name, PRODUCTION, version)
                    client.log_param(rid, f"promoted.{name}", f"{name}@{PRODUCTION}=v{version}")
                    versions[name] = version
                client.set_tag(rid, "promotion", "done")
                log.info("moved @%s to %s", PRODUCTION, ", ".join(f"{n} v{v}" for n, v in versions.items()))
    except BaseException:
        with contextlib.suppress(Exception):  # left RUNNING, it would look like a step still going
            client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid)
    return rid


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
                                       pip_requirements=["cmce", "torch", "numpy"], registered_model_name=PYFUNC)
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
