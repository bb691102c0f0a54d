"""Where MLflow keeps runs and models: the tracking and registry URIs, checked before any use (their settings,
the store behind them, its schema, the server's answer within a deadline), and the client made from them.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else a sqlite file under the run directory (tracking_uri).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sqlite3
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cmce.errors import first_line
from cmce.redaction import redact

log = logging.getLogger(__name__)


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
        if value and value.startswith("sqlite:") and re.search("%[0-9A-Fa-f]{2}", value.partition("?")[0]):
            # SQLAlchemy decodes `%20` in the path, cmce's checks of the store read it as written: another
            # application's `app db.sqlite` was migrated into, a half-made store left beside it
            raise ValueError(f"{name} {value}: holds a % escape, which SQLAlchemy decodes into another file name; "
                             "write the path as it is (a space as a space)")
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
    from cmce.s3_client import endpoint_from

    if not s3.is_s3(location):
        return
    with endpoint_from("MLFLOW_S3_ENDPOINT_URL"):
        s3.check_writable(location)
