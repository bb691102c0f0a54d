"""S3 objects for the storage layer (cmce.storage): the only module that imports boto3.

Endpoint, credentials and region come from the standard AWS chain (environment, shared config and
credentials files, profiles, instance roles); a non-AWS server is named by ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, which boto3 reads itself. Nothing here logs or formats a credential: errors name
the URI and what to check, and boto3/botocore logging is kept at WARNING whatever the root level.

Transient errors (throttling, 5xx, dropped connections) are retried by botocore with exponential
backoff (retry mode ``AWS_RETRY_MODE``, default "standard"; ``AWS_MAX_ATTEMPTS``, default 5). Files
above ``CMCE_S3_MULTIPART_THRESHOLD_MB`` (default 64) go up in parts of ``CMCE_S3_MULTIPART_CHUNK_MB``
(default 16), ``CMCE_S3_MAX_CONCURRENCY`` (default 8) at a time. An object appears at its key
only when its single PUT or its multipart upload completes, so a failed upload never leaves a partial
object there. A prefix holding a manifest (an index's meta.json naming its files) is read as those files only.
A profile's ``credential_process`` is given ``CMCE_S3_CREDENTIAL_PROCESS_TIMEOUT_S`` (default 60) to answer.
Every one of these variables (and ``AWS_REGION`` / ``AWS_DEFAULT_REGION``) is checked (check_env, ranges in
ENV_RANGES) by the first S3 call of a command, before any work: a value out of range would hang a step (a million
attempts at a dead endpoint) or fail it only at its upload.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cmce import strict_json
from cmce.deadline import within
from cmce.errors import (
    Terminated,
    raise_if_terminated,
    stop_deferred,
    stop_pending,
    stopping_on,
    threads_left_running,
)

log = logging.getLogger(__name__)
SCHEME = "s3://"
MAX_KEY_BYTES = 1024  # S3's limit on an object key (UTF-8)
MB = 1 << 20
# every variable that changes which client (endpoint, identity, retries) a call gets
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
               "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
               "CMCE_S3_READ_TIMEOUT_S", "AWS_METADATA_SERVICE_TIMEOUT", "AWS_METADATA_SERVICE_NUM_ATTEMPTS",
               "CMCE_S3_CREDENTIAL_PROCESS_TIMEOUT_S", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
               "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
               "AWS_EC2_METADATA_DISABLED", "AWS_EC2_METADATA_SERVICE_ENDPOINT",
               # the proxies a client is made with (a client made before HTTP_PROXY was set never used it)
               "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
               "no_proxy")
# a URL's user-info; not after models:// or runs://, where NAME@ALIAS is a registered model, not a user
# (to the last `@` before the host, as URL parsers read it: `bob:pa@ss@host` is user bob, password pa@ss)
_USERINFO = re.compile(r"(\b(?!(?:models|runs)://)[a-z][a-z0-9+.-]*://)[^/?#\s]*@", re.IGNORECASE)


def is_s3(uri: object) -> bool:
    return isinstance(uri, str) and uri.startswith(SCHEME)


_ANY_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/")  # two letters or more: not a Windows drive


def foreign_scheme(uri: object) -> str | None:
    """The scheme of a URI that is not `s3://` (`s3a://`, `S3://`, `gs://`, `s3:/`), else None. Such a text
    would otherwise be a relative local path (`./s3a:/b/k`), written where nobody looks for it."""
    m = _ANY_SCHEME.match(uri) if isinstance(uri, str) else None
    return m.group(1) if m and not is_s3(uri) else None


def scheme_error(uri: str, scheme: str, what: str) -> str:
    """Why `uri` (of `foreign_scheme`) is refused; `what` names the argument (a flag, or 'an input')."""
    return f"{what} {uri}: {scheme}: URIs are not supported; give a local path or s3://bucket/key (lower case)"


def redact(text: str) -> str:
    """Replace the user-info part of every URL in `text` (``scheme://user:secret@host`` → ``scheme://***@host``)."""
    return _USERINFO.sub(r"\1***@", text)


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def join(self, rel: str) -> S3Uri:
        return S3Uri(self.bucket, f"{self.key.rstrip('/')}/{rel}" if self.key else rel)

    @property
    def dir_prefix(self) -> str:
        return f"{self.key.rstrip('/')}/" if self.key else ""


def parse(uri: str) -> S3Uri:
    """`s3://bucket/key` → (bucket, key). Credentials inside the URI are refused (they would end up
    in logs, MLflow params and error messages); they belong in the environment or an AWS profile."""
    if not is_s3(uri):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len(SCHEME):].partition("/")
    if "@" in bucket or ":" in bucket:
        raise ValueError(f"{redact(uri)}: credentials inside an s3:// URI are refused; set them in the environment "
                         f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or an AWS profile")
    if not bucket:
        raise ValueError(f"{uri}: no bucket name")
    if "//" in key or key.startswith("/"):  # S3 keeps the empty segment, listings do not: names came back cut
        raise ValueError(f"{uri}: an empty path segment (//) in the key; write it with single slashes")
    return S3Uri(bucket, key)


# variable: (default, minimum, maximum). A dead endpoint fails within AWS_MAX_ATTEMPTS × (10 s connect +
# CMCE_S3_READ_TIMEOUT_S) plus botocore's backoff, and a request with its retries within CMCE_S3_DEADLINE_S: by
# default within 20 s (it was 5 × 20 s + back-off: minutes before a silent endpoint was named).
# AWS_METADATA_SERVICE_*: botocore's own, for credentials from an instance role; bounded for the same reason.
ENV_RANGES = {
    "AWS_MAX_ATTEMPTS": (3, 1, 10),
    "CMCE_S3_READ_TIMEOUT_S": (10, 1, 300),
    # one request with its retries (HEAD, LIST, DELETE, a ranged GET), or a download's wait for its next 64 KiB: a
    # server sending its answer a byte at a time never trips the read timeout (each read gets a byte)
    "CMCE_S3_DEADLINE_S": (20, 2, 3600),
    "CMCE_S3_MULTIPART_THRESHOLD_MB": (64, 1, 5120),
    "CMCE_S3_MULTIPART_CHUNK_MB": (16, 5, 5120),  # S3's parts: 5 MiB to 5 GiB
    "CMCE_S3_MAX_CONCURRENCY": (8, 1, 64),
    "AWS_METADATA_SERVICE_TIMEOUT": (1, 1, 30),
    "AWS_METADATA_SERVICE_NUM_ATTEMPTS": (1, 1, 10),
    # a profile's credential_process: botocore waits on it without a limit (a `sleep 100` held a step silent)
    "CMCE_S3_CREDENTIAL_PROCESS_TIMEOUT_S": (60, 1, 600),
}
RETRY_MODES = ("standard", "adaptive", "legacy")
CONNECT_TIMEOUT_S = 10
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")


def _valid_region(region: str) -> bool:
    """botocore's own check of a region name (the one its clients apply)."""
    from botocore.exceptions import InvalidRegionError
    from botocore.utils import validate_region_name

    try:
        validate_region_name(region)
    except InvalidRegionError:
        return False
    return True


def _env_int(name: str) -> int:
    from cmce.environment import env_int

    return env_int(name, *ENV_RANGES[name])


def _endpoint_url(name: str) -> None:
    from urllib.parse import urlsplit

    raw = os.environ.get(name)
    if not raw:
        return
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"environment variable {name}={redact(raw)!r}: an http:// or https:// URL expected")
    if parts.path.strip("/") or parts.query or parts.fragment:  # botocore puts a path before every bucket
        raise ValueError(f"environment variable {name}={redact(raw)!r}: the server's URL without a path expected "
                         f"({parts.scheme}://{parts.netloc}); buckets and keys go in the s3:// URI")


def check_env() -> None:
    """Refuse, naming it, any S3 setting of the environment out of its range (ENV_RANGES, RETRY_MODES, an
    http(s) endpoint URL, an existing AWS_CA_BUNDLE): called by every S3 call's client(), so the first one of a
    command (its output check, or its first download) refuses before any work."""
    for name in ENV_RANGES:
        _env_int(name)
    for name in CREDENTIAL_ENV:  # a Secret made from a file keeps its newline: signed requests then fail as
        value = os.environ.get(name, "")  # an unreachable endpoint (HTTPClientError); the value is never said
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError(f"environment variable {name}: holds whitespace or a control character (a newline "
                             "from the file it came from?); remove it")
    for name in REGION_ENV:  # else every call failed as an S3 error (InvalidRegionError) naming no variable
        region = os.environ.get(name)
        if region and not _valid_region(region):
            raise ValueError(f"environment variable {name}={region!r}: not a region name (letters, digits and "
                             "hyphens, such as us-east-1)")
    mode = os.environ.get("AWS_RETRY_MODE")
    if mode and mode not in RETRY_MODES:
        raise ValueError(f"environment variable AWS_RETRY_MODE={mode!r}: one of {', '.join(RETRY_MODES)} expected")
    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        value = os.environ.get(name)
        if value and value.strip().lower() not in ("when_supported", "when_required"):
            raise ValueError(f"environment variable {name}={value!r}: when_supported or when_required expected")
    for name in ENDPOINT_ENV:
        _endpoint_url(name)
    bundle = os.environ.get("AWS_CA_BUNDLE")
    if bundle and not os.path.exists(bundle):  # else every https request fails as an unreachable endpoint
        raise ValueError(f"environment variable AWS_CA_BUNDLE={bundle!r}: no such certificate file")


def quiet_sdk_logging() -> None:
    """boto3/botocore/s3transfer/urllib3 log request details (headers, signing steps) at DEBUG; keep them
    at WARNING so that a DEBUG root logger never records them."""
    for name in ("boto3", "botocore", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


_ENDPOINT: contextvars.ContextVar[str | None] = contextvars.ContextVar("s3_endpoint", default=None)


@contextlib.contextmanager
def endpoint_from(name: str) -> Iterator[None]:
    """S3 calls inside use the endpoint the environment variable `name` gives, when it is set (MLflow's artifact
    store reads MLFLOW_S3_ENDPOINT_URL, not the AWS variables); the environment itself is left as it is."""
    url = os.environ.get(name) or None
    _endpoint_url(name)
    token = _ENDPOINT.set(url)
    try:
        yield
    finally:
        _ENDPOINT.reset(token)


def _client_key() -> tuple[str, str | None]:
    """What the S3 client depends on: the environment's settings (hashed, so that no credential is kept as a cache
    key) and the endpoint this command set."""
    check_env()
    h = hashlib.sha256()
    for name in _CLIENT_ENV:
        h.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return h.hexdigest(), _ENDPOINT.get()


def client() -> Any:
    """The S3 client for the current environment (cached per endpoint/identity/retry settings)."""
    return _client_for(*_client_key())


def _no_retry_when_stopping(response: Any = None, caught_exception: BaseException | None = None, **_: Any) -> None:
    """botocore's needs-retry hook, first of all: a request that failed after a stop signal is not retried (one
    that succeeded, such as the removal of a staged upload, goes through)."""
    failed = caught_exception is not None or (response is not None and response[0].status_code >= 400)
    if failed and stop_pending():
        raise OSError(errno.ECANCELED, "the step is stopping: no retry")


@functools.lru_cache(maxsize=4)
def _client_for(_env_digest: str, endpoint: str | None = None) -> Any:
    import boto3
    from botocore.config import Config

    quiet_sdk_logging()
    retries = {"mode": os.environ.get("AWS_RETRY_MODE") or "standard",
               "total_max_attempts": _env_int("AWS_MAX_ATTEMPTS")}  # total, as AWS_MAX_ATTEMPTS means
    # an endpoint that accepts and never answers costs attempts × read_timeout before the step fails: 3 × 10 s
    # (it was 5 × 120 s, ten minutes of silence); a part of a multipart upload is answered well within 10 s
    config = Config(retries=retries, connect_timeout=CONNECT_TIMEOUT_S, read_timeout=_env_int("CMCE_S3_READ_TIMEOUT_S"))
    session = boto3.session.Session()
    _bound_credential_process(session)
    _resolve_credentials(session)
    s3 = session.client("s3", config=config, endpoint_url=endpoint)
    s3.meta.events.register_first("needs-retry.s3", _no_retry_when_stopping)
    return s3


class CredentialProcessError(ValueError):
    """A profile's credential_process gave no usable credentials (or none in time)."""


def _credential_process(session: Any) -> str | None:
    try:
        return session._session.get_scoped_config().get("credential_process")
    except Exception:  # noqa: BLE001 - a missing profile is reported by the call that needs it
        return None


def _bound_credential_process(session: Any) -> None:
    """botocore runs a profile's credential_process and waits on it without a limit (its ProcessProvider takes
    the Popen it runs it with): it is given one whose wait ends after CMCE_S3_CREDENTIAL_PROCESS_TIMEOUT_S,
    killing the process."""
    import subprocess

    limit = _env_int("CMCE_S3_CREDENTIAL_PROCESS_TIMEOUT_S")
    profile = session.profile_name

    class BoundedPopen(subprocess.Popen):
        def communicate(self, input=None, timeout=None):  # noqa: A002 - Popen's own argument names
            try:
                return super().communicate(input, timeout=min(timeout or limit, limit))
            except subprocess.TimeoutExpired:
                self.kill()
                super().communicate()
                raise CredentialProcessError(
                    f"AWS profile {profile!r}: its credential_process gave no credentials within {limit} s "
                    "(CMCE_S3_CREDENTIAL_PROCESS_TIMEOUT_S); check the command, or raise the limit") from None

    resolver = session._session.get_component("credential_provider")
    provider = resolver.get_provider("custom-process") if resolver is not None else None
    if provider is not None and hasattr(provider, "_popen"):
        provider._popen = BoundedPopen


def _resolve_credentials(session: Any) -> None:
    """Credentials are resolved as the client is made: a credential_process that prints no JSON raised the bare
    `Expecting value: line 1 column 1 (char 0)`, naming no profile; the profile and its process are named."""

    from botocore.exceptions import CredentialRetrievalError

    try:
        session.get_credentials()
    except ValueError as err:  # botocore's container provider: "Unsupported host 'x'. Can only retrieve metadata…"
        if "Unsupported host" not in str(err) or not os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            raise _credential_process_error(session, err) from None
        raise ValueError(f"environment variable AWS_CONTAINER_CREDENTIALS_FULL_URI="
                         f"{redact(os.environ['AWS_CONTAINER_CREDENTIALS_FULL_URI'])!r}: {str(err).strip()}") from None
    except CredentialRetrievalError as err:
        raise _credential_process_error(session, err) from None


def _credential_process_error(session: Any, err: BaseException) -> BaseException:
    """A profile's credential_process that printed no JSON, or failed, named with its profile; else `err`."""
    import json

    from botocore.exceptions import CredentialRetrievalError

    if isinstance(err, json.JSONDecodeError | UnicodeDecodeError | CredentialRetrievalError):
        process = _credential_process(session)
        if process is None:
            return err
        if isinstance(err, CredentialRetrievalError):
            what = f"failed ({redact(str(err).strip().splitlines()[0])})"
        else:
            what = "printed no JSON credentials"
        return CredentialProcessError(f"AWS profile {session.profile_name!r}: its credential_process {what}; run it "
                                      "by hand to see why")
    return err


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=_env_int("CMCE_S3_MULTIPART_THRESHOLD_MB") * MB,
        multipart_chunksize=_env_int("CMCE_S3_MULTIPART_CHUNK_MB") * MB,
        max_concurrency=_env_int("CMCE_S3_MAX_CONCURRENCY"),
        preferred_transfer_client="classic",
        io_chunksize=TRANSFER_STEP,  # a download reports progress a chunk at a time (see _transfer)
    )


TRANSFER_STEP = 64 * 1024


def _bounded(request: Any, uri: str, action: str) -> Any:
    """`request()` (one S3 request, botocore's retries included) within the request deadline: a server that
    trickled its answer a byte a second never tripped the read timeout and held a step until it was killed."""
    deadline = request_deadline()
    return within(deadline, request, lambda: TimeoutError(_deadline_message(uri, action, deadline)))


def request_deadline() -> int:
    """CMCE_S3_DEADLINE_S, but never less than one attempt's read timeout (and 5 s): a read timeout raised for a slow
    server is not cut short by the deadline."""
    return max(_env_int("CMCE_S3_DEADLINE_S"), _env_int("CMCE_S3_READ_TIMEOUT_S") + 5)


def _deadline_message(uri: str, action: str, deadline: int) -> str:
    return (f"{uri}: no whole answer from the S3 endpoint {_endpoint()} within {deadline} s while {action} "
            "(CMCE_S3_DEADLINE_S): unreachable, silent or trickling")


def _endpoint() -> str:
    """The S3 endpoint's URL, for an error message: the client's, else (no client can be made) the one the
    environment names, else "AWS's default"."""
    try:
        return redact(str(client().meta.endpoint_url))
    except Exception:  # noqa: BLE001 - only used to word an error message
        configured = _ENDPOINT.get() or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return redact(configured) if configured else "(AWS's default)"


CONTAINER_HOST = "http://169.254.170.2"  # ECS/EKS: where AWS_CONTAINER_CREDENTIALS_RELATIVE_URI points
IMDS_DEFAULT = "http://169.254.169.254"  # EC2's instance metadata service


def _credentials_endpoint(url: str) -> str | None:
    """The variable (or service) that sent botocore's credential chain to `url`; None for any other URL."""
    full = os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if full and url.rstrip("/") == full.rstrip("/"):
        return "AWS_CONTAINER_CREDENTIALS_FULL_URI"
    relative = os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if relative and url.rstrip("/") == f"{CONTAINER_HOST}{relative}".rstrip("/"):
        return "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
    imds = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    if imds and url.startswith(imds.rstrip("/")):
        return "AWS_EC2_METADATA_SERVICE_ENDPOINT"
    if url.startswith((IMDS_DEFAULT, "http://[fd00:ec2::254]")):
        return "the instance metadata service (AWS_EC2_METADATA_DISABLED=true turns it off)"
    return None


def _credentials_error(err: BaseException, uri: str, action: str) -> OSError | None:
    """Credentials that botocore's chain was sent to fetch from an endpoint (a container's or the instance's
    metadata) and could not: that endpoint and the variable that named it, not the S3 endpoint (which may be
    up, and was blamed); else None."""
    from botocore.exceptions import CredentialRetrievalError, EndpointConnectionError, MetadataRetrievalError

    from cmce.errors import first_line

    seen, retrieval, url = 0, None, None
    while err is not None and seen < 8:
        if isinstance(err, CredentialRetrievalError | MetadataRetrievalError) and retrieval is None:
            retrieval = err
        if isinstance(err, EndpointConnectionError):
            url = str(err.kwargs.get("endpoint_url", ""))
        err = err.__cause__ or err.__context__
        seen += 1
    if retrieval is None:
        return None
    if url is None:  # the chain holds only the text: "Could not connect to the endpoint URL: "…""
        found = re.search(r'endpoint URL: "([^"]+)"', str(retrieval))
        url = found.group(1) if found else ""
    variable = _credentials_endpoint(url) if url else None
    if variable is None:
        provider = str(getattr(retrieval, "kwargs", {}).get("provider", "")) or "the AWS credential chain"
        return OSError(f"{uri}: no credentials from {provider} while {action}: {redact(first_line(retrieval))}")
    how = "could not be reached" if url and "connect" in str(retrieval).lower() else "gave no credentials"
    return OSError(f"{uri}: the credentials endpoint {redact(url)} ({variable}) {how} while {action}; fix or unset "
                   "it, or give AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


def _credential_sources() -> str:
    """What the user pointed botocore at for credentials and it found nothing in: a credentials or config file
    that is no readable file, an instance-metadata endpoint (botocore says only "Unable to locate credentials")."""
    said = []
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        value = os.environ.get(name)
        if value and not os.path.isfile(os.path.expanduser(value)):
            what = "a folder" if os.path.isdir(os.path.expanduser(value)) else "no file"
            said.append(f"{name}={redact(value)!r} names {what}")
    endpoint = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    if endpoint and os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        said.append(f"the instance metadata endpoint AWS_EC2_METADATA_SERVICE_ENDPOINT={redact(endpoint)!r} gave none")
    return f" ({'; '.join(said)})" if said else ""


def _client_error(err: BaseException) -> Any:
    """The botocore ClientError behind `err` (boto3 wraps upload errors in S3UploadFailedError)."""
    from botocore.exceptions import ClientError

    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, ClientError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _connection_error(err: BaseException) -> BaseException | None:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, BotoConnectionError | HTTPClientError):
            return err
        last = getattr(err, "last_exception", None)  # s3transfer's RetriesExceededError
        err = last or err.__cause__ or err.__context__
        seen += 1
    return None


def _proxy_error(conn: BaseException, uri: str, action: str) -> OSError | None:
    """A proxy that cannot be reached, named with the variable that set it (botocore reads HTTP(S)_PROXY as
    urllib does): the endpoint behind it may well be up."""
    from botocore.exceptions import ProxyConnectionError

    if not isinstance(conn, ProxyConnectionError):
        return None
    scheme = "https" if _endpoint().startswith("https") else "http"
    names = [f"{scheme.upper()}_PROXY", f"{scheme}_proxy", "ALL_PROXY", "all_proxy"]
    variable = next((n for n in names if os.environ.get(n)), "the proxy settings")
    return OSError(f"{uri}: cannot reach the proxy {redact(str(conn.kwargs.get('proxy_url', '')))} ({variable}) "
                   f"while {action} (gave up after retries); fix or unset it, or name the S3 endpoint's host in "
                   "NO_PROXY")


def translate(err: BaseException, uri: str, action: str) -> OSError | ValueError | None:
    """A clear error naming `uri` (never a credential) for an SDK error, or None for other errors."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError, ProfileNotFound
    from botocore.parsers import ResponseParserError

    if isinstance(err, CredentialProcessError):
        return CredentialProcessError(f"{uri}: {err} (while {action})")
    if isinstance(err, RecursionError):  # botocore follows a 301 by asking for the bucket's region, which redirects
        return OSError(f"{uri}: the endpoint {_endpoint()} answers with redirects without end while {action} (an "
                       "S3 server names a region instead); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    if (credentials := _credentials_error(err, uri, action)) is not None:
        return credentials
    bucket = parse(uri).bucket
    ce = _client_error(err)
    if ce is not None:
        error = ce.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # an S3 server answers every failed GET/PUT/LIST with an XML error document naming its code; botocore
        # falls back to the bare HTTP status when there is none (only HEAD answers carry no body)
        if code.isdigit() and not str(getattr(ce, "operation_name", "")).startswith("Head"):
            return OSError(f"{uri}: the endpoint {_endpoint()} is not an S3 server (it answered HTTP {code} without "
                           f"an S3 error document while {action}); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and action == "checking the bucket"):
            return FileNotFoundError(f"{uri}: bucket {bucket!r} does not exist (cmce never creates buckets)")
        if code == "PreconditionFailed":  # If-Match: the object was replaced between its HEAD and this GET
            return OSError(f"{uri}: replaced while {action} (its ETag changed since it was looked at)")
        if code in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"{uri}: no such object")
        if code in ("InvalidToken", "ExpiredToken", "TokenRefreshRequired"):
            return PermissionError(f"{uri}: the S3 server refused the session token ({code}) while {action}; "
                                   f"check AWS_SESSION_TOKEN or the AWS profile")
        if code == "InvalidAccessKeyId":
            # a server that knows no session tokens looks the pair up with the token and answers this code
            token = "; AWS_SESSION_TOKEN is set: a stale one, or one for other keys, is refused this way" \
                if os.environ.get("AWS_SESSION_TOKEN") else ""
            return PermissionError(f"{uri}: the S3 server does not know the access key id while {action}; "
                                   f"check AWS_ACCESS_KEY_ID or the AWS profile{token}")
        if code == "SignatureDoesNotMatch":
            return PermissionError(f"{uri}: the S3 server rejected the request signature while {action}: wrong "
                                   f"secret access key; check AWS_SECRET_ACCESS_KEY or the AWS profile")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
            return PermissionError(f"{uri}: access denied while {action}; check the credentials and the bucket policy")
        if code == "InvalidBucketName":
            return ValueError(f"{uri}: invalid bucket name {bucket!r}")
        return OSError(f"{uri}: S3 error while {action}: {code or status}: {redact(str(error.get('Message', '')))}")
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return PermissionError(f"{uri}: no complete AWS credentials found while {action}{_credential_sources()}; "
                               "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(err, ProfileNotFound):
        profile = err.kwargs.get("profile")
        return ValueError(f"{uri}: AWS_PROFILE (or AWS_DEFAULT_PROFILE) names the profile {profile!r}, which no AWS "
                          f"config or credentials file defines")
    if isinstance(err, ResponseParserError):
        return OSError(f"{uri}: the endpoint {_endpoint()} is not an S3 server (its answer is not S3's XML while "
                       f"{action}); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    conn = _connection_error(err)
    if conn is not None and (proxy := _proxy_error(conn, uri, action)) is not None:
        return proxy
    if conn is not None:
        return OSError(f"{uri}: cannot reach the S3 endpoint {_endpoint()} while {action} (gave up after retries: "
                       f"{type(conn).__name__})")
    if isinstance(err, BotoCoreError | Boto3Error):
        return OSError(f"{uri}: S3 error while {action}: {type(err).__name__}: {redact(str(err))}")
    return None


@contextlib.contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        clear = translate(err, uri, action)
        if clear is None:
            raise
        raise clear from None  # the SDK's chain adds request details, nothing the message lacks


def _diagnose(u: S3Uri, action: str) -> None:
    """HEAD responses carry no error code (a 403 may be a wrong key id, a wrong secret or a policy);
    a LIST answers with one. Raises the precise error, or returns when listing is allowed."""
    with _errors(str(u), action):
        _listing(u, u.key, str(u), action)


def _listing(u: S3Uri, prefix: str, uri: str, action: str) -> dict:
    """The first key under `prefix` in the bucket of `u` (a LIST of one key), from an S3 server."""
    return _is_listing(_bounded(lambda: client().list_objects_v2(Bucket=u.bucket, Prefix=prefix, MaxKeys=1), uri,
                                action), uri, action)


def _is_listing(listed: dict, uri: str, action: str) -> dict:
    """An S3 listing always names its bucket. A web server answering every request 200 with a page that parses as
    XML was read as an empty listing: its "objects" were called files (`is a file; an index is the folder`)."""
    if "Name" not in listed:
        raise OSError(f"{uri}: the endpoint {_endpoint()} is not an S3 server (its answer to a listing names no "
                      f"bucket, while {action}); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    return listed


def kind(uri: str) -> str:
    """'file' for an object, 'dir' for a prefix holding objects; FileNotFoundError otherwise."""
    from botocore.exceptions import ClientError

    u = parse(uri)
    if u.key and not u.key.endswith("/"):
        with _errors(uri, "reading"):
            try:
                _bounded(lambda: client().head_object(Bucket=u.bucket, Key=u.key), uri, "reading")
                found = True
            except ClientError as err:
                if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") not in (403, 404):
                    raise
                found = False
            if not found:
                _diagnose(u, "reading")  # raises for a missing bucket or refused credentials
        if found and not is_prefix(uri):
            return "file"
        if found:  # objects under `key/` too: reading the object alone ignored a whole folder (an index)
            raise ValueError(f"{uri}: both an object and a prefix {uri}/ holding objects exist; give {uri}/ for "
                             "the folder, or remove one")
    with _errors(uri, "listing"):
        listed = _listing(u, u.dir_prefix, uri, "listing")
    if listed.get("KeyCount", 0):
        return "dir"
    raise FileNotFoundError(f"{uri}: no such object or prefix")


MAX_LISTED_KEYS = 100_000  # a cmce folder (an index, shards, models) holds far fewer objects


def list_keys(uri: str, starting: str = "") -> list[str]:
    """Keys under the prefix `uri/` (that start with `starting` there), relative to it, sorted; refused past
    MAX_LISTED_KEYS (a server whose listing never ended, each page in time, held `search` until it was killed, its
    memory growing)."""
    u = parse(uri)
    out: list[str] = []
    with _errors(uri, "listing"):
        pages = iter(client().get_paginator("list_objects_v2").paginate(Bucket=u.bucket,
                                                                        Prefix=u.dir_prefix + starting))
        while (page := _bounded(lambda: next(pages, None), uri, "listing")) is not None:  # each page in time
            _is_listing(page, uri, "listing")
            out += [o["Key"][len(u.dir_prefix):] for o in page.get("Contents", [])]
            if len(out) > MAX_LISTED_KEYS:
                raise ValueError(f"{redact(uri)}: its listing goes past {MAX_LISTED_KEYS:,} objects; a cmce folder "
                                 "holds far fewer (a prefix too broad, or a server whose listing never ends)")
    return sorted(k for k in out if k and not k.endswith("/"))  # "folder/" placeholder objects hold nothing


def _inside(dest: Path, rel: str, uri: str) -> Path:
    """dest/rel, refusing keys that would land outside dest (`..`, absolute parts)."""
    parts = PurePosixPath(rel).parts
    if not parts or any(p in ("..", "") for p in parts) or PurePosixPath(rel).is_absolute():
        raise ValueError(f"{uri}/{rel}: object key leaves its prefix; refused")
    return dest.joinpath(*parts)


class MarkerMissing(FileNotFoundError):
    """A prefix lacks its completion marker: an unfinished upload, or not what the reader expects."""


def download(uri: str, dest: Path, marker: str | None = None) -> Path:
    """Download the object (or every object under the prefix) at `uri` to `dest`; returns `dest`.
    With `marker` (a completion marker such as an index's meta.json, see upload_dir) `uri` is a prefix: it is
    listed once, and refused with MarkerMissing before any download when the marker is not among its keys."""
    try:
        return _download(uri, dest, marker)
    except OSError as err:
        full = _no_room(err)
        if full is None:
            raise
        tmp = Path(tempfile.gettempdir())
        where = f"the scratch folder {tmp} (TMPDIR)" if tmp == dest or tmp in dest.parents else str(dest.parent)
        raise OSError(full.errno, f"{uri}: no space left in {where} while downloading ({full.strerror}); free "
                                  "space there or set TMPDIR to a folder with room") from None


def _no_room(err: BaseException | None) -> OSError | None:
    """The full-disk error (no space, quota, file size limit) behind `err`, if any."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


MANIFEST = "meta.json"  # a folder written with a manifest (an index) names its files in it: {"files": {name: ...}}


NO_CODING = ("", "identity", "aws-chunked")  # aws-chunked: how a streamed upload was signed, not how it is stored


def _fetch(u: S3Uri, key: str, target: Path, uri: str, cfg: Any) -> None:
    """Download one object to `target`, as the bytes its writer meant: one stored with `Content-Encoding: gzip`
    (`aws s3 cp --content-encoding gzip`, CDN sync tools) is decoded, as an HTTP client decodes it; any other
    coding is refused naming it (its bytes are not the file's)."""
    with _errors(uri, "downloading"):
        head = _bounded(lambda: client().head_object(Bucket=u.bucket, Key=key), uri, "downloading")
        coding = str(head.get("ContentEncoding") or "")
        codings = [c.strip().lower() for c in coding.split(",") if c.strip().lower() not in NO_CODING]
        if codings not in ([], ["gzip"], ["x-gzip"]):
            raise ValueError(f"{uri}: stored with Content-Encoding {coding!r}; only gzip is decoded: store the object "
                             "without it (or gzip-encoded)")
        _download_known(u.bucket, key, target, cfg, head)
    if codings:
        _gunzip(target, uri)


def _download_known(bucket: str, key: str, target: Path, cfg: Any, head: dict) -> None:
    """client().download_file, given the object's HEAD answer (size and ETag): s3transfer would ask for it again."""
    from s3transfer.subscribers import BaseSubscriber

    class Known(BaseSubscriber):
        def on_queued(self, future: Any, **_: Any) -> None:
            future.meta.provide_transfer_size(int(head["ContentLength"]))
            future.meta.provide_object_etag(head.get("ETag"))

    _transfer(cfg, lambda manager, subscribers: manager.download(bucket, key, str(target),
                                                                 subscribers=[Known(), *subscribers]),
              f"{SCHEME}{bucket}/{key}", "downloading", abandon=True, size=int(head["ContentLength"]))


def _transfer(cfg: Any, start: Any, uri: str, action: str, abandon: bool = False, size: int | None = None) -> None:
    """Run the s3transfer transfer `start(manager, subscribers)` begins, to its end. A download that receives no
    TRANSFER_STEP bytes within the request deadline fails (a server trickling a byte a second held it for good);
    an upload or a copy is not watched so: its progress is counted when bytes enter the socket, or when a whole
    part is copied, and a slow link or a long final request (minutes, for a large multipart upload) would read as
    a stall; botocore's read timeout bounds them. On a stop signal no request is retried; a download is
    `abandon`ed: leaving the manager as its context manager
    does waited for its worker threads, which read a slow or silent server to the end of their read (100 s after
    a SIGTERM); they are left to it while the step cleans up and stops now. An upload is not: bytes already sent
    reach the server whatever this process does, and an object appeared 10 s after the step had removed what it
    staged. Its request under way is let end (within the read timeout; the body's further reads are refused),
    so that what it wrote can be removed."""
    from boto3.exceptions import RetriesExceededError
    from boto3.s3.transfer import create_transfer_manager
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceeded

    manager = create_transfer_manager(client(), cfg)
    watch = _Progress(size)  # a download: no more bytes than the object's HEAD announced
    future = start(manager, [watch])
    try:
        if abandon:
            watch.wait(request_deadline(), uri, action)
        future.result()
    except TransferRetriesExceeded as err:  # as download_file raises it
        manager.shutdown()
        raise RetriesExceededError(err.last_exception) from err
    except (KeyboardInterrupt, Terminated) as err:
        future.cancel()
        stopping_on(err)  # the workers left running (or the request under way) must not retry
        if abandon:
            threads_left_running()
        else:
            manager.shutdown(cancel=True)
        raise
    except TimeoutError:  # stalled: its workers wait on their reads; nothing waits for them
        future.cancel()
        threads_left_running()
        raise
    except BaseException:
        manager.shutdown(cancel=True)
        raise
    else:
        manager.shutdown()


class _Progress:
    """An s3transfer subscriber: when the transfer last moved bytes, how many, and whether it has ended."""

    def __init__(self, size: int | None = None) -> None:
        self.moved = time.monotonic()
        self.done = threading.Event()
        self.size, self.received = size, 0

    def on_progress(self, bytes_transferred: int = 0, **_: Any) -> None:
        self.moved = time.monotonic()
        self.received += bytes_transferred

    def on_done(self, **_: Any) -> None:
        self.done.set()

    def on_queued(self, **_: Any) -> None:
        pass

    def wait(self, deadline: int, uri: str, action: str) -> None:
        """Until the transfer ends; TimeoutError once it has moved nothing for `deadline` seconds."""
        while not self.done.wait(min(1.0, deadline)):
            if time.monotonic() - self.moved > deadline:
                raise TimeoutError(_deadline_message(uri, action, deadline))
            if self.size is not None and self.received > self.size:  # a GET declaring 50 TiB over a 249 KB object,
                # streamed fast: neither deadline nor read timeout ended it
                raise TimeoutError(f"{uri}: the S3 endpoint {_endpoint()} sent more than the object's {self.size:,} "
                                   f"bytes (its HEAD) while {action}; refused")


GZIP_RATIO = 1000


def _gunzip(path: Path, uri: str) -> None:
    import gzip
    import zlib

    plain = path.with_name(f".{path.name}.decoding")
    # a 3 MB object decoding to 3 GB (a gzip bomb) filled scratch and memory without a word; files compress
    # 2-20×, so a ratio past GZIP_RATIO (and past 64 MiB) is refused
    cap = max(GZIP_RATIO * path.stat().st_size, 64 * MB)
    try:
        with gzip.open(path, "rb") as src, plain.open("wb") as dst:
            while chunk := src.read(MB):
                if dst.tell() + len(chunk) > cap:
                    raise ValueError(f"{uri}: stored with Content-Encoding gzip, it decodes to more than {cap:,} "
                                     f"bytes ({GZIP_RATIO}× its size): refused as a decompression bomb")
                dst.write(chunk)
    except BaseException as err:
        plain.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # the encoded bytes are not the file: nothing stays under its name
        if isinstance(err, OSError | EOFError | zlib.error) and _no_room(err) is None:
            raise ValueError(f"{uri}: stored with Content-Encoding gzip, but its bytes are not gzip data ({err})"
                             ) from None
        raise
    os.replace(plain, path)


def _download(uri: str, dest: Path, marker: str | None) -> Path:
    u = parse(uri)
    cfg = transfer_config()
    if marker is None and kind(uri) == "file":
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fetch(u, u.key, dest, uri, cfg)
        log.info("downloaded %s", uri)
        return dest
    listed = _manifest_files(uri, dest) if marker in (None, MANIFEST) else None
    if listed is not None:
        keys = listed  # what the manifest names, not whatever else shares the prefix (a 30 MB backup, a bucket)
    else:
        keys = list_keys(uri)
        if marker is not None and marker not in keys:
            raise MarkerMissing(f"{uri.rstrip('/')}: no {marker}")
    dest.mkdir(parents=True, exist_ok=True)
    for rel in keys:
        target = _inside(dest, rel, uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _fetch(u, u.join(rel).key, target, f"{uri.rstrip('/')}/{rel}", cfg)
        except FileNotFoundError:
            if listed is None:  # listed a moment ago: gone since
                raise
            continue  # a file the manifest names but the prefix lacks: its reader names it
    log.info("downloaded %s (%d objects)", uri, len(keys) + (listed is not None))
    return dest


def _manifest_files(uri: str, dest: Path) -> list[str] | None:
    """The files of the prefix `uri/` its MANIFEST names (downloaded first, to dest/MANIFEST, and only once); None
    when the prefix holds no manifest, or one that names no files (then the whole prefix is read). Names must be
    plain file names: the manifest never sends a read outside the prefix."""

    u = parse(uri)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(u, u.join(MANIFEST).key, dest / MANIFEST, str(u.join(MANIFEST)), transfer_config())
    except FileNotFoundError:
        return None
    try:
        files = strict_json.loads((dest / MANIFEST).read_bytes()).get("files")
    except (ValueError, AttributeError):  # not JSON, or not an object: the reader says what is wrong with it
        return []
    if not isinstance(files, dict | list) or not files:
        return None
    names = [str(name) for name in files]
    for name in names:
        if "/" in name or "\\" in name or name in (".", "..", MANIFEST) or not name:
            raise ValueError(f"{uri.rstrip('/')}/{MANIFEST}: names {name!r} among its files; plain file names expected")
    return names


_checked_buckets: set[tuple[tuple[str, str | None], str]] = set()  # (client settings, bucket): checked once


def forget_checked_buckets() -> None:
    _checked_buckets.clear()


def check_writable(uri: str) -> None:
    """Fail before any work when the bucket is missing or the credentials are refused. A plain policy
    denial of the check itself is let through (writers may lack s3:ListBucket); the upload decides. Once per
    bucket and client in a command (its outputs were checked up to three times each, a denial warned as often)."""
    from botocore.exceptions import ClientError

    u = parse(uri)
    checked = (_client_key(), u.bucket)
    if checked in _checked_buckets:
        return
    try:
        with _errors(uri, "checking the bucket"):
            try:
                _bounded(lambda: client().head_bucket(Bucket=u.bucket), uri, "checking the bucket")
            except ClientError as err:  # a HEAD answer has no body: LIST tells what the 403 or 404 means
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status not in (403, 404):
                    raise
                _diagnose(u, "checking the bucket")  # raises for a missing bucket, or an endpoint that is not S3
                if status == 404:
                    raise
    except PermissionError as err:
        if "access denied" not in str(err):
            raise
        log.warning("%s: cannot check the bucket (access denied); trying the upload anyway", uri)
    _checked_buckets.add(checked)


def upload_file(path: Path, uri: str) -> None:
    u = parse(uri)
    with _errors(uri, "uploading"):
        _transfer(transfer_config(), lambda manager, subscribers: manager.upload(
            str(path), u.bucket, u.key, subscribers=subscribers), uri, "uploading")
    log.info("uploaded %s (%d bytes)", uri, path.stat().st_size)


def put_whole(path: Path, uri: str) -> None:
    """Upload the file `path` to `uri` as a step's output: staged beside it first (see `_replace_staged`), then
    copied into place on the server. Uploaded straight to its key, a fresh output stopped mid-upload appeared
    whole after the step had said nothing was written (its bytes were on the way)."""
    u = parse(uri)
    parent, _, name = u.key.rpartition("/")
    folder = S3Uri(u.bucket, parent)

    def commit(staging: S3Uri) -> None:
        copy(str(staging.join(name)), uri)
        _remove_left_staging(folder, staging, name)

    _replace_staged(folder, {name: path}, commit)


def delete(uri: str) -> None:
    u = parse(uri)
    with _errors(uri, "deleting"):
        _bounded(lambda: client().delete_object(Bucket=u.bucket, Key=u.key), uri, "deleting")


def upload_dir(local: Path, uri: str, last: str | None = None) -> None:
    """Upload every file under `local` to the prefix `uri/`. With `last` (a completion marker such as an
    index's meta.json) the folder is replaced as nearly whole as S3 allows: the files go up under a staging
    prefix inside it first (a failure or stop there leaves the old folder untouched, the staged objects
    removed); then the old marker is deleted, the staged files are copied into place on the server and the new
    marker is written after them. A stop signal waits for that short commit, so a reader finds the old folder,
    the new one, or no marker (which readers refuse), never a marker next to half-replaced files."""
    u = parse(uri)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    rels = [p.relative_to(local).as_posix() for p in files]
    if last is None:
        for rel in rels:
            upload_file(local / rel, str(u.join(rel)))
        return
    if last not in rels:
        raise FileNotFoundError(f"{uri}: the step wrote no {last}")
    rels.remove(last)

    def commit(staging: S3Uri) -> None:
        _commit(local / last, u, staging, rels, last)
        _remove_left_staging(u, staging)

    _replace_staged(u, {rel: local / rel for rel in rels}, commit)


def _replace_staged(folder: S3Uri, files: dict[str, Path], commit: Callable[[S3Uri], None]) -> None:
    """Upload `files` (name inside `folder` → local path) under a fresh staging prefix inside `folder`, then
    `commit(staging)` with a stop signal waiting for it. A failure or stop during the uploads leaves what was at
    the outputs untouched; the staged objects are removed whatever happened."""
    staging = folder.join(f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
    try:
        for rel, path in files.items():
            with _shown_as(str(staging.join(rel)), str(folder.join(rel))):
                upload_file(path, str(staging.join(rel)))
        raise_if_terminated()  # a stop swallowed by the transfer's threads commits nothing
        with stop_deferred():
            commit(staging)
    except BaseException as err:
        if (left := _remove_staged(staging, list(files))) is not None:
            raise _with_note(err, left) from None  # one line: the server that failed the step refused it too
        raise
    if (left := _remove_staged(staging, list(files))) is not None:
        log.warning("%s", left)


def _with_note(err: BaseException, note: str) -> BaseException:
    """`err` with `note` added to its message (an OSError or ValueError cmce raised); any other (a stop) as it is,
    the note logged."""
    with contextlib.suppress(TypeError):  # (an exception whose constructor wants more than a message)
        if isinstance(err, OSError) and err.errno is not None:  # its errno and file name kept (a full disk, say)
            return type(err)(err.errno, f"{err.strerror}; {note}", *([err.filename] if err.filename else []))
        if isinstance(err, OSError | ValueError):
            return type(err)(f"{err}; {note}")
    log.warning("%s", note)
    return err


@contextlib.contextmanager
def _shown_as(staged: str, shown: str) -> Iterator[None]:
    """An error of an upload to a staging key names the output it is for (`s3://b/idx/index.faiss`)."""
    try:
        yield
    except (OSError, ValueError) as err:
        if staged not in str(err):
            raise
        raise type(err)(str(err).replace(staged, shown)) from None


STAGING_PREFIX = ".staging-"  # inside the folder: a reader of the folder's marker never lists it


def _commit(marker: Path, u: S3Uri, staging: S3Uri, rels: list[str], last: str) -> None:
    delete(str(u.join(last)))
    try:
        for rel in rels:
            copy(str(staging.join(rel)), str(u.join(rel)))
        upload_file(marker, str(u.join(last)))
    except BaseException:  # S3 has no rename: the old folder is gone, the new one partly there (no marker:
        partial_uploads.append(str(u))  # readers refuse it); said by the command's last line
        raise


def _remove_staged(staging: S3Uri, rels: list[str]) -> str | None:
    """Delete the staged objects; what is left behind, said, or None."""
    for rel in rels:
        try:
            delete(str(staging.join(rel)))
        except (OSError, ValueError) as err:  # the step's own error (or stop) is the one to report
            # the server that refused one refuses the others: no retries of each
            return (f"{staging}: staged objects left behind ({err}); a later replacement of the output removes them, "
                    "else delete them")
    return None


def _remove_left_staging(u: S3Uri, ours: S3Uri, name: str | None = None) -> None:
    """After a commit: the staging prefixes an earlier replacement of the folder (of its file `name` only, when
    given: other files there may be written beside it) could not remove (a killed process, a server gone). A second
    writer of the same output at the same time loses its staged files: two concurrent replacements of one s3://
    output cannot both win, and the other one then fails naming it."""
    try:
        left = list_keys(str(u), STAGING_PREFIX)  # only the staging prefixes: a bucket root may hold millions
    except (OSError, ValueError):  # a writer without s3:ListBucket: nothing to look at, the output is whole
        return
    for rel in left:
        if (name is None or rel.partition("/")[2] == name) and not str(u.join(rel)).startswith(f"{ours}/"):
            with contextlib.suppress(OSError, ValueError):
                delete(str(u.join(rel)))


def copy(src: str, dst: str) -> None:
    """A server-side copy (no bytes through this machine); in parts above the multipart threshold."""
    s, d = parse(src), parse(dst)
    with _errors(src, "copying"):
        _transfer(transfer_config(), lambda manager, subscribers: manager.copy(
            {"Bucket": s.bucket, "Key": s.key}, d.bucket, d.key, subscribers=subscribers), src, "copying")


partial_uploads: list[str] = []  # s3:// folders whose replacement a failure or stop cut short (this process)


def object_size(uri: str) -> int | None:
    """The size of the object at `uri`; None when there is none (or when HEAD is refused: without
    s3:ListBucket a missing key answers 403, and the upload decides)."""
    head = object_head(uri, "checking the output")
    return None if head is None else int(head["ContentLength"])


def object_head(uri: str, action: str = "reading", diagnose: bool = False) -> dict | None:
    """The HEAD answer for the object at `uri` (ContentLength, ETag, LastModified); None when there is none (or
    when HEAD is refused: without s3:ListBucket a missing key answers 403). `diagnose`: a refused HEAD is looked
    into with a LIST first, which names wrong credentials or a missing bucket (a HEAD's answer carries no code)."""
    from botocore.exceptions import ClientError

    u = parse(uri)
    with _errors(uri, action):
        try:
            return _bounded(lambda: client().head_object(Bucket=u.bucket, Key=u.key), uri, action)
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") not in (403, 404):
                raise
    if diagnose:
        _diagnose(u, action)
    return None


def read_range(uri: str, start: int, end: int, if_match: str | None = None) -> bytes:
    """Bytes `start` to `end` (inclusive) of the object at `uri`: a ranged GET, not a download. `if_match`: only
    the object with this ETag (a HEAD's); one replaced since is refused (OSError), not read in its place."""
    u = parse(uri)
    match = {"IfMatch": if_match} if if_match else {}
    with _errors(uri, "reading"):
        return _bounded(lambda: client().get_object(Bucket=u.bucket, Key=u.key, Range=f"bytes={start}-{end}",
                                                    **match)["Body"].read(), uri, "reading")


def is_prefix(uri: str) -> bool:
    """True when objects exist under `uri/` (a "folder" on S3)."""
    u = parse(uri)
    with _errors(uri, "listing"):
        return bool(_listing(u, u.dir_prefix, uri, "listing").get("KeyCount", 0))
