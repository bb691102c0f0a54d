"""SDK errors (boto3, botocore, s3transfer) as one clear error naming the s3:// URI, what was being done and
what to check: the credentials, the endpoint, the bucket, a proxy. Never a credential: URLs are redacted."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

from cmce.errors import causes
from cmce.redaction import redact
from cmce.s3_client import CredentialProcessError, endpoint_shown

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

    retrieval, url = None, None
    for behind in causes(err):
        if isinstance(behind, CredentialRetrievalError | MetadataRetrievalError) and retrieval is None:
            retrieval = behind
        if isinstance(behind, EndpointConnectionError):
            url = str(behind.kwargs.get("endpoint_url", ""))
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

    return next((behind for behind in causes(err) if isinstance(behind, ClientError)), None)


def connection_error(err: BaseException) -> BaseException | None:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return next((behind for behind in causes(err) if isinstance(behind, BotoConnectionError | HTTPClientError)), None)


def _proxy_error(conn: BaseException, uri: str, action: str) -> OSError | None:
    """A proxy that cannot be reached, named with the variable that set it (botocore reads HTTP(S)_PROXY as
    urllib does): the endpoint behind it may well be up."""
    from botocore.exceptions import ProxyConnectionError

    if not isinstance(conn, ProxyConnectionError):
        return None
    scheme = "https" if endpoint_shown().startswith("https") else "http"
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
        return OSError(f"{uri}: the endpoint {endpoint_shown()} answers with redirects without end while {action} (an "
                       "S3 server names a region instead); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    if (credentials := _credentials_error(err, uri, action)) is not None:
        return credentials
    bucket = uri.removeprefix("s3://").partition("/")[0]  # as given: a key that parse() refuses keeps its own error
    ce = _client_error(err)
    if ce is not None:
        error = ce.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # an S3 server answers every failed GET/PUT/LIST with an XML error document naming its code; botocore
        # falls back to the bare HTTP status when there is none (only HEAD answers carry no body)
        if code.isdigit() and not str(getattr(ce, "operation_name", "")).startswith("Head"):
            return OSError(f"{uri}: the endpoint {endpoint_shown()} is not an S3 server (it answered HTTP {code} "
                           f"without an S3 error document while {action}); check AWS_ENDPOINT_URL_S3 / "
                           "AWS_ENDPOINT_URL")
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
        return OSError(f"{uri}: the endpoint {endpoint_shown()} is not an S3 server (its answer is not S3's XML while "
                       f"{action}); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    conn = connection_error(err)
    if conn is not None and (proxy := _proxy_error(conn, uri, action)) is not None:
        return proxy
    if conn is not None:
        return OSError(f"{uri}: cannot reach the S3 endpoint {endpoint_shown()} while {action} (gave up after retries: "
                       f"{type(conn).__name__})")
    if isinstance(err, BotoCoreError | Boto3Error):
        return OSError(f"{uri}: S3 error while {action}: {type(err).__name__}: {redact(str(err))}")
    return None


@contextlib.contextmanager
def translated(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        clear = translate(err, uri, action)
        if clear is None:
            raise
        raise clear from None  # the SDK's chain adds request details, nothing the message lacks
