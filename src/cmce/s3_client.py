"""The S3 client (boto3's, the only place one is made) and the environment that shapes it.

Endpoint, credentials and region come from the standard AWS chain (environment, shared config and
credentials files, profiles, instance roles); a non-AWS server is named by ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, which boto3 reads itself. Nothing here logs or formats a credential, and
boto3/botocore logging is kept at WARNING whatever the root level.

Transient errors (throttling, 5xx, dropped connections) are retried by botocore with exponential
backoff (retry mode ``AWS_RETRY_MODE``, default "standard"; ``AWS_MAX_ATTEMPTS``, default 3). Files
above ``CMCE_S3_MULTIPART_THRESHOLD_MB`` (default 64) go up in parts of ``CMCE_S3_MULTIPART_CHUNK_MB``
(default 16), ``CMCE_S3_MAX_CONCURRENCY`` (default 8) at a time. A profile's ``credential_process`` is given
``CMCE_S3_CREDENTIAL_PROCESS_TIMEOUT_S`` (default 60) to answer. Every one of these variables (and
``AWS_REGION`` / ``AWS_DEFAULT_REGION``) is checked (check_env, ranges in ENV_RANGES) by the first S3 call of a
command, before any work: a value out of range would hang a step (a million attempts at a dead endpoint) or fail
it only at its upload.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from cmce.deadline import within
from cmce.errors import stop_pending
from cmce.redaction import redact

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


def client_key() -> tuple[str, str | None]:
    """What the S3 client depends on: the environment's settings (hashed, so that no credential is kept as a cache
    key) and the endpoint this command set."""
    check_env()
    h = hashlib.sha256()
    for name in _CLIENT_ENV:
        h.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return h.hexdigest(), _ENDPOINT.get()


def client() -> Any:
    """The S3 client for the current environment (cached per endpoint/identity/retry settings)."""
    return _client_for(*client_key())


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
        io_chunksize=TRANSFER_STEP,  # a download reports progress a chunk at a time (see cmce.s3._transfer)
    )


TRANSFER_STEP = 64 * 1024


def bounded(request: Any, uri: str, action: str) -> Any:
    """`request()` (one S3 request, botocore's retries included) within the request deadline: a server that
    trickled its answer a byte a second never tripped the read timeout and held a step until it was killed."""
    deadline = request_deadline()
    return within(deadline, request, lambda: TimeoutError(deadline_message(uri, action, deadline)))


def request_deadline() -> int:
    """CMCE_S3_DEADLINE_S, but never less than one attempt's read timeout (and 5 s): a read timeout raised for a slow
    server is not cut short by the deadline."""
    return max(_env_int("CMCE_S3_DEADLINE_S"), _env_int("CMCE_S3_READ_TIMEOUT_S") + 5)


def deadline_message(uri: str, action: str, deadline: int) -> str:
    return (f"{uri}: no whole answer from the S3 endpoint {endpoint_shown()} within {deadline} s while {action} "
            "(CMCE_S3_DEADLINE_S): unreachable, silent or trickling")


def endpoint_shown() -> str:
    """The S3 endpoint's URL, for an error message: the client's, else (no client can be made) the one the
    environment names, else "AWS's default"."""
    try:
        return redact(str(client().meta.endpoint_url))
    except Exception:  # noqa: BLE001 - only used to word an error message
        configured = _ENDPOINT.get() or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return redact(configured) if configured else "(AWS's default)"
