"""S3 objects for the storage layer (cmce.storage): s3:// URIs, listing, downloads and uploads.

The client and the environment settings it is made from are cmce.s3_client's; SDK errors become one line naming
the URI in cmce.s3_errors. An object appears at its key only when its single PUT or its multipart upload
completes, so a failed upload never leaves a partial object there; a folder with a completion marker is replaced
through a staging prefix (upload_dir). A prefix holding a manifest (an index's meta.json naming its files) is
read as those files only.
"""

from __future__ import annotations

import contextlib
import errno
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

from cmce import s3_client, strict_json
from cmce.errors import (
    Terminated,
    causes,
    raise_if_terminated,
    stop_deferred,
    stopping_on,
    threads_left_running,
)
from cmce.redaction import redact
from cmce.s3_client import (
    MB,
    bounded,
    client_key,
    deadline_message,
    endpoint_shown,
    request_deadline,
    transfer_config,
)
from cmce.s3_errors import translated

log = logging.getLogger(__name__)
SCHEME = "s3://"
MAX_KEY_BYTES = 1024  # S3's limit on an object key (UTF-8)


def is_s3(uri: object) -> bool:
    return isinstance(uri, str) and uri.startswith(SCHEME)


URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/")  # two letters or more: not a Windows drive


def foreign_scheme(uri: object) -> str | None:
    """The scheme of a URI that is not `s3://` (`s3a://`, `S3://`, `gs://`, `s3:/`), else None. Such a text
    would otherwise be a relative local path (`./s3a:/b/k`), written where nobody looks for it."""
    m = URI_SCHEME.match(uri) if isinstance(uri, str) else None
    return m.group(1) if m and not is_s3(uri) else None


def scheme_error(uri: str, scheme: str, what: str) -> str:
    """Why `uri` (of `foreign_scheme`) is refused; `what` names the argument (a flag, or 'an input')."""
    return f"{what} {uri}: {scheme}: URIs are not supported; give a local path or s3://bucket/key (lower case)"



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
    if any(part in (".", "..") for part in key.split("/")):  # a server refused it as `400: Bad Request`, or kept the
        # name literally, and no prefix check can tell what it stands beside
        raise ValueError(f"{uri}: a `.` or `..` segment in the key (S3 keys are names, not paths); write the key "
                         "without it")
    return S3Uri(bucket, key)


def _diagnose(u: S3Uri, action: str) -> None:
    """HEAD responses carry no error code (a 403 may be a wrong key id, a wrong secret or a policy);
    a LIST answers with one. Raises the precise error, or returns when listing is allowed."""
    with translated(str(u), action):
        _listing(u, u.key, str(u), action)


def _listing(u: S3Uri, prefix: str, uri: str, action: str) -> dict:
    """The first key under `prefix` in the bucket of `u` (a LIST of one key), from an S3 server."""
    listed = bounded(lambda: s3_client.client().list_objects_v2(Bucket=u.bucket, Prefix=prefix, MaxKeys=1), uri, action)
    return _is_listing(listed, uri, action)


def _is_listing(listed: dict, uri: str, action: str) -> dict:
    """An S3 listing always names its bucket. A web server answering every request 200 with a page that parses as
    XML was read as an empty listing: its "objects" were called files (`is a file; an index is the folder`)."""
    if "Name" not in listed:
        raise OSError(f"{uri}: the endpoint {endpoint_shown()} is not an S3 server (its answer to a listing names no "
                      f"bucket, while {action}); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    return listed


def kind(uri: str) -> str:
    """'file' for an object, 'dir' for a prefix holding objects; FileNotFoundError otherwise."""
    from botocore.exceptions import ClientError

    u = parse(uri)
    if u.key and not u.key.endswith("/"):
        with translated(uri, "reading"):
            try:
                bounded(lambda: s3_client.client().head_object(Bucket=u.bucket, Key=u.key), uri, "reading")
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
    with translated(uri, "listing"):
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
    with translated(uri, "listing"):
        pages = iter(s3_client.client().get_paginator("list_objects_v2").paginate(Bucket=u.bucket,
                                                                        Prefix=u.dir_prefix + starting))
        while (page := bounded(lambda: next(pages, None), uri, "listing")) is not None:  # each page in time
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
    return next((behind for behind in causes(err) if isinstance(behind, OSError)
                 and behind.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)), None)


MANIFEST = "meta.json"  # a folder written with a manifest (an index) names its files in it: {"files": {name: ...}}


NO_CODING = ("", "identity", "aws-chunked")  # aws-chunked: how a streamed upload was signed, not how it is stored


def _fetch(u: S3Uri, key: str, target: Path, uri: str, cfg: Any) -> None:
    """Download one object to `target`, as the bytes its writer meant: one stored with `Content-Encoding: gzip`
    (`aws s3 cp --content-encoding gzip`, CDN sync tools) is decoded, as an HTTP client decodes it; any other
    coding is refused naming it (its bytes are not the file's)."""
    with translated(uri, "downloading"):
        head = bounded(lambda: s3_client.client().head_object(Bucket=u.bucket, Key=key), uri, "downloading")
        coding = str(head.get("ContentEncoding") or "")
        codings = [c.strip().lower() for c in coding.split(",") if c.strip().lower() not in NO_CODING]
        if codings not in ([], ["gzip"], ["x-gzip"]):
            raise ValueError(f"{uri}: stored with Content-Encoding {coding!r}; only gzip is decoded: store the object "
                             "without it (or gzip-encoded)")
        _download_known(u.bucket, key, target, cfg, head)
    if codings:
        _gunzip(target, uri)


def _download_known(bucket: str, key: str, target: Path, cfg: Any, head: dict) -> None:
    """The client's download_file, given the object's HEAD answer (size and ETag): s3transfer would ask for it again."""
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
    s3_client.TRANSFER_STEP bytes within the request deadline fails (a server trickling a byte a second held it for
    good); an upload or a copy is not watched so: its progress is counted when bytes enter the socket, or when a
    whole part is copied, and a slow link or a long final request (minutes, for a large multipart upload) would read
    as a stall; botocore's read timeout bounds them. On a stop signal no request is retried; a download is
    `abandon`ed: leaving the manager as its context manager
    does waited for its worker threads, which read a slow or silent server to the end of their read (100 s after
    a SIGTERM); they are left to it while the step cleans up and stops now. An upload is not: bytes already sent
    reach the server whatever this process does, and an object appeared 10 s after the step had removed what it
    staged. Its request under way is let end (within the read timeout; the body's further reads are refused),
    so that what it wrote can be removed."""
    from boto3.exceptions import RetriesExceededError
    from boto3.s3.transfer import create_transfer_manager
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceeded

    manager = create_transfer_manager(s3_client.client(), cfg)
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
                raise TimeoutError(deadline_message(uri, action, deadline))
            if self.size is not None and self.received > self.size:  # a GET declaring 50 TiB over a 249 KB object,
                # streamed fast: neither deadline nor read timeout ended it
                raise TimeoutError(f"{uri}: the S3 endpoint {endpoint_shown()} sent more than the object's "
                                   f"{self.size:,} bytes (its HEAD) while {action}; refused")


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
    checked = (client_key(), u.bucket)
    if checked in _checked_buckets:
        return
    try:
        with translated(uri, "checking the bucket"):
            try:
                bounded(lambda: s3_client.client().head_bucket(Bucket=u.bucket), uri, "checking the bucket")
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
    with translated(uri, "uploading"):
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
    with translated(uri, "deleting"):
        bounded(lambda: s3_client.client().delete_object(Bucket=u.bucket, Key=u.key), uri, "deleting")


def upload_dir(local: Path, uri: str, last: str | tuple[str, ...] | None = None) -> None:
    """Upload every file under `local` to the prefix `uri/`. With `last` (a completion marker such as an
    index's meta.json) the folder is replaced as nearly whole as S3 allows: the files go up under a staging
    prefix inside it first (a failure or stop there leaves the old folder untouched, the staged objects
    removed); then the old marker is deleted, the staged files are copied into place on the server and the new
    marker is written after them. A stop signal waits for that short commit, so a reader finds the old folder,
    the new one, or no marker (which readers refuse), never a marker next to half-replaced files. Several
    markers (a run's folder: its index's meta.json, then eval/metrics.json) hold that for each folder they
    complete: all are deleted first and written last, in the order given (the innermost first)."""
    u = parse(uri)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    rels = [p.relative_to(local).as_posix() for p in files]
    if last is None:
        for rel in rels:
            upload_file(local / rel, str(u.join(rel)))
        return
    markers = (last,) if isinstance(last, str) else last
    if missing := next((m for m in markers if m not in rels), None):
        raise FileNotFoundError(f"{uri}: the step wrote no {missing}")
    rels = [rel for rel in rels if rel not in markers]

    def commit(staging: S3Uri) -> None:
        _commit(local, u, staging, rels, markers)
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
STAGING_ID = re.compile(r"\.staging-[0-9a-f]{12}/")  # the prefix and 12 hex digits of a uuid4: cmce's own


def is_staged(rel: str) -> bool:
    """`rel` (a key inside an output folder) lies under a staging prefix cmce made. Any `.staging-` name was taken
    for one: a user's `.staging-v2/g.parquet` was deleted, even as the step's own input."""
    return STAGING_ID.match(rel) is not None


def _commit(local: Path, u: S3Uri, staging: S3Uri, rels: list[str], markers: tuple[str, ...]) -> None:
    deleted = False
    try:
        for marker in reversed(markers):  # the outermost first: no reader of the whole finds a part without its marker
            delete(str(u.join(marker)))
            deleted = True
        for rel in rels:
            copy(str(staging.join(rel)), str(u.join(rel)))
        for marker in markers:
            upload_file(local / marker, str(u.join(marker)))
    except BaseException:  # S3 has no rename: the old folder is gone, the new one partly there (no marker:
        if deleted:  # readers refuse it); said by the command's last line. Nothing deleted: the old folder is whole
            partial_uploads.append(str(u))
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
        if is_staged(rel) and (name is None or rel.partition("/")[2] == name) and \
                not str(u.join(rel)).startswith(f"{ours}/"):
            with contextlib.suppress(OSError, ValueError):
                delete(str(u.join(rel)))


def copy(src: str, dst: str) -> None:
    """A server-side copy (no bytes through this machine); in parts above the multipart threshold."""
    s, d = parse(src), parse(dst)
    with translated(src, "copying"):
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
    with translated(uri, action):
        try:
            return bounded(lambda: s3_client.client().head_object(Bucket=u.bucket, Key=u.key), uri, action)
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
    with translated(uri, "reading"):
        return bounded(lambda: s3_client.client().get_object(Bucket=u.bucket, Key=u.key, Range=f"bytes={start}-{end}",
                                                    **match)["Body"].read(), uri, "reading")


def is_prefix(uri: str) -> bool:
    """True when objects exist under `uri/` (a "folder" on S3)."""
    u = parse(uri)
    with translated(uri, "listing"):
        return bool(_listing(u, u.dir_prefix, uri, "listing").get("KeyCount", 0))
