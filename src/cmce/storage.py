"""Where artifacts live: local paths or `s3://bucket/key` URIs.

Local writes are atomic: every artifact is written under a temporary name and renamed into place, so a
crash leaves either the previous complete output or none. Every step reaches S3 through
`local_input` (download an object, or every object under a prefix, to a scratch folder) and
`local_output` (a scratch path that is uploaded when the step succeeds; see cmce.s3). Scratch files live
until `clear_scratch` (the CLI calls it when a command ends) or the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from cmce import s3

_scratch: Path | None = None
_origins: dict[Path, str] = {}  # scratch folder or file → the URI it stands for
_downloaded: dict[str, Path] = {}

log = logging.getLogger(__name__)
# a temporary file or folder untouched this long belongs to a killed run, not to a live writer
STALE_TEMP_AGE_S = 3600.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _newest_mtime(path: Path) -> float:
    """A folder's own mtime does not change while a file in it is written: look one level down too."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.iterdir()]
    return max(times)


def clean_stale_temps(target: str | Path, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove temporary files and folders that a killed writer of `target` left behind: only names of
    our own pattern (`.<name>.XXXXXXXX.tmp`) for this target, untouched for `max_age_s` (younger ones
    may belong to a writer still running). Returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    now, removed = time.time(), []
    for p in target.parent.iterdir():
        if not pattern.fullmatch(p.name):
            continue
        try:
            if now - _newest_mtime(p) < max_age_s:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:  # its writer finished or another cleaner got there first
            continue
        removed.append(p)
    if removed:
        log.info("removed %d stale temporary file(s) of %s left by an interrupted run", len(removed), target)
    return removed


def restore_dir(target: str | Path) -> bool:
    """Put `.<name>.old` back when `target` is missing: a run killed between atomic_dir's two renames
    leaves the previous complete folder there and nothing at `target`. Returns True if it did."""
    target = Path(target)
    old = _old(target)
    if target.exists() or not old.is_dir():
        return False
    try:
        os.rename(old, target)
    except OSError:  # restored (or rebuilt) by someone else in the meantime
        return False
    log.warning("%s was missing after an interrupted swap; restored the previous version from %s", target, old.name)
    return True


def _discard_dir(path: Path) -> None:
    """Delete a folder, renaming it to a temporary name first, so that a kill during the deletion
    leaves a stale temporary folder (cleaned later), never a half-deleted `.old`."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=path.name.removesuffix(".old") + ".", suffix=".tmp", dir=path.parent))
    os.replace(path, trash)  # onto the empty folder just made
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to `target`; rename it onto `target` only on success."""
    target = Path(target)
    made = make_parents(target)
    clean_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600; give the artifact the usual permissions
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
        made = []
    finally:
        tmp_path.unlink(missing_ok=True)
        remove_if_empty(made)


def make_parents(target: Path) -> list[Path]:
    """Create the missing folders above `target`; return them, deepest first, for remove_if_empty."""
    missing = [p for p in target.parents if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Take back the folders a failed write created (deepest first): a refused step leaves nothing behind.
    A folder that another writer has meanwhile put something in stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


# carried into the new folder when an output folder is swapped: DVC writes a .gitignore naming a stage's outputs
KEPT_ACROSS_SWAPS = (".gitignore",)


class ForeignOutputError(ValueError):
    """An output folder holds files that the step writing it did not write."""


def check_replaceable(target: str | Path, own: tuple[str, ...]) -> None:
    """Refuse to replace `target` unless it is missing, empty, or holds only names matching `own` (globs).

    A step's output folder is swapped in whole, so pointing `--out` at a folder of other files (a run
    root, the input's own folder) would delete them; this check turns that into an error naming them.
    """
    target = Path(target)
    if target.is_symlink():  # swapping it would replace the link, not the folder it names
        raise ForeignOutputError(f"{target}: is a symbolic link; give the folder it points to")
    if not target.exists():
        return
    if not target.is_dir():
        raise ForeignOutputError(f"{target}: is a file, not an output folder")
    foreign = sorted(p.name for p in target.iterdir()
                     if p.name not in KEPT_ACROSS_SWAPS and not any(fnmatch.fnmatch(p.name, g) for g in own))
    if foreign:
        raise ForeignOutputError(
            f"{target}: holds {', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}, which this step "
            f"does not write ({', '.join(own)}); it replaces its output folder whole, so give an empty or new folder"
        )


# bytes of an output's own name: its temporary (`.<name>.XXXXXXXX.tmp`) must fit the usual 255-byte limit too
MAX_NAME_BYTES = 200


# the formats an output file may already hold, told apart by their first bytes (a torch checkpoint is a zip)
MAGIC = {"parquet": b"PAR1", "checkpoint": b"PK\x03\x04"}


def file_format(path: Path) -> str | None:
    """"parquet" or "checkpoint" (torch's zip archive) by the file's first bytes; None for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    return next((name for name, magic in MAGIC.items() if head == magic), None)


def parquet_kind(path: Path) -> str | None:
    """What a cmce Parquet file holds, from its footer: the `kind` its writer recorded (gallery, gallery_member,
    train_embeddings, query), "dataset" for a dataset file, None for any other Parquet file."""
    import pyarrow.parquet as pq

    try:
        meta = json.loads((pq.read_schema(path).metadata or {}).get(b"cmce", b"null"))
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError; so is bad JSON
        return None
    if not isinstance(meta, dict):
        return None
    return meta.get("kind") if isinstance(meta.get("kind"), str) else "dataset" if "protocol" in meta else None


def check_output(uri: str | Path, is_dir: bool = False, own: tuple[str, ...] | None = None,
                 writes: str | None = None, kinds: tuple[str, ...] = ()) -> None:
    """Before any work: refuse an output path the step could not write whole at the end, naming it. A folder
    output replaced whole (`own`: the globs it writes) must be one of its own (check_replaceable); an existing
    file is replaced only by a file of its own format (`writes`) and, for Parquet, of its own `kinds`
    (parquet_kind): a checkpoint never replaces a dataset, nor a gallery a dataset."""
    text = str(uri)
    if not text.strip():
        raise ValueError("an output path is empty")
    if is_remote(text):
        return
    target = Path(text)
    if target.exists() and not (target.is_file() or target.is_dir()):  # renaming over it would replace a device
        raise ValueError(f"{text}: is a device, pipe or socket, not a file or folder to write")
    if not is_dir and (text.endswith("/") or target.is_dir()):
        raise ValueError(f"{text}: is a folder; this output is a file, give its path")
    found = file_format(target) if writes and target.is_file() else None
    if found and found != writes:
        raise ValueError(f"{text}: holds a {found} file; this step writes a {writes} file, so give another path")
    if found == "parquet" and kinds and (kind := parquet_kind(target)) not in kinds:
        raise ValueError(f"{text}: holds a {kind or 'non-cmce'} Parquet file; this step writes a {kinds[0]} file, "
                         "so give another path")
    if len(os.fsencode(target.name)) > MAX_NAME_BYTES:
        raise ValueError(f"{text}: the file name is longer than {MAX_NAME_BYTES} bytes")
    if is_dir and own is not None:
        check_replaceable(target, own)
    elif is_dir and target.exists() and not target.is_dir():
        raise ValueError(f"{text}: is a file, not an output folder")
    existing = target.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{text}: cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{text}: cannot be written: no write permission in {existing}")
    if is_dir and own is not None and target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"{text}: is read-only; it is replaced whole, so make it writable or give another folder")


@contextlib.contextmanager
def swap_lock(target: str | Path, exclusive: bool) -> Iterator[None]:
    """The swap of a folder by atomic_dir (exclusive) and its readers (shared) exclude each other, so a reader
    sees the old folder or the new one, whole, and never takes a live swap for an interrupted one. The lock is
    an flock on the parent folder itself (no lock file is left beside the outputs); the OS releases it when a
    process dies. Swaps of folders with one parent wait for each other: they are two renames long."""
    target = Path(target)
    fd = None
    with contextlib.suppress(OSError):  # a missing parent: there is nothing to swap or read
        fd = os.open(target.parent, os.O_RDONLY)
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: str | Path, own: tuple[str, ...]) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; swap it in for `target` only on success.

    `target` must be missing, empty, or hold only names matching the globs `own` (check_replaceable):
    an earlier output of the same step is replaced, anything else is refused before any work. A `.gitignore`
    in it (DVC's, naming the outputs) is carried into the new folder.
    A directory cannot be renamed over a non-empty one, so the old one is moved aside to
    `.<name>.old` first; the window in which neither exists is two renames long, and readers that take
    swap_lock never see it. A run killed in that window leaves only `.<name>.old`, which restore_dir
    (called here and by readers such as cmce.index.load_index) puts back.
    """
    target = Path(target)
    made = make_parents(target)
    try:
        with swap_lock(target, exclusive=True):
            restore_dir(target)
        check_replaceable(target, own)
    except BaseException:
        remove_if_empty(made)
        raise
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for name in KEPT_ACROSS_SWAPS:
            if (target / name).is_file() and not (tmp / name).exists():
                shutil.copy2(target / name, tmp / name)
        os.chmod(tmp, 0o777 & ~_umask())
        old = _old(target)
        with swap_lock(target, exclusive=True):  # waits for readers of the old folder to finish
            _discard_dir(old)  # a complete older version, left by a run killed before it could delete it
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
        _discard_dir(old)
        made = []
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(made)


def _identity(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Unchanged:
    """The identity (inode, size, mtime) of local input files, taken before a step first opens them: `check()`,
    called inside the atomic write before the rename, fails if one was replaced or modified meanwhile. A step
    that opens a file more than once (metadata, then rows; one chunk at a time) would otherwise mix versions."""

    def __init__(self, paths: list[str | Path] | tuple[str | Path, ...]):
        self.paths = [Path(p) for p in paths if not is_remote(p)]
        self.before = [_identity(p) for p in self.paths]

    def check(self) -> None:
        for p, was in zip(self.paths, self.before, strict=True):
            if _identity(p) != was:
                raise ValueError(f"{p}: was replaced or changed while this step read it; nothing written, run it "
                                 "again")


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    write_bytes(target, text.encode())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_remote(uri: str | Path) -> bool:
    return s3.is_s3(uri)


def scratch_dir() -> Path:
    """This process's scratch folder for downloads and staged outputs (created on first use)."""
    global _scratch
    if _scratch is None or not _scratch.exists():
        _scratch = Path(tempfile.mkdtemp(prefix="cmce-scratch-"))
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def clear_scratch() -> None:
    """Remove every downloaded and staged file (after their uploads and any tracking that reads them)."""
    global _scratch
    if _scratch is not None:
        shutil.rmtree(_scratch, ignore_errors=True)
    _scratch = None
    _origins.clear()
    _downloaded.clear()


def local_input(uri: str | Path, marker: str | None = None) -> Path:
    """A local path holding `uri`: the path itself, or for s3:// a download of the object (or of every
    object under the prefix, as a folder) into scratch, keeping the key's file name. Downloaded once
    per process until `clear_scratch`. `marker` (s3:// only): the prefix's completion marker, see
    cmce.s3.download; a local folder's marker is the caller's to check."""
    if not s3.is_s3(uri):
        path = Path(uri)
        if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO would hang, /dev/zero never ends
            raise ValueError(f"{uri}: is not a regular file or folder (a device, pipe or socket); give a file")
        return path
    uri = str(uri)
    cached = _downloaded.get(uri)
    if cached is not None and cached.exists():
        return cached
    u = s3.parse(uri)
    dest = scratch_dir() / "in" / uuid.uuid4().hex[:12] / (PurePosixPath(u.key.rstrip("/")).name or u.bucket)
    path = s3.download(uri, dest, marker)
    _origins[path] = uri.rstrip("/")
    _downloaded[uri] = path
    return path


@contextlib.contextmanager
def local_output(uri: str | Path, is_dir: bool = False, last: str | None = None) -> Iterator[Path]:
    """Yield the local path a step writes `uri` to. Local: the path itself (steps write atomically).
    s3://: a scratch path with the key's file name, uploaded only if the block succeeds; the bucket and
    credentials are checked first, before any work. A folder goes up file by file, `last` (its completion
    marker, e.g. an index's meta.json) after all others; see cmce.s3.upload_dir."""
    if not s3.is_s3(uri):
        yield Path(uri)
        return
    uri = str(uri).rstrip("/")
    u = s3.parse(uri)
    if not u.key:
        raise ValueError(f"{uri}: names a bucket; give the object key or prefix to write")
    s3.check_writable(uri)
    staged = scratch_dir() / "out" / uuid.uuid4().hex[:12] / (PurePosixPath(u.key).name or u.bucket)
    staged.parent.mkdir(parents=True)
    _origins[staged] = uri
    yield staged
    if not staged.exists():
        raise FileNotFoundError(f"{uri}: the step wrote nothing to upload")
    if is_dir:
        s3.upload_dir(staged, uri, last)
    else:
        s3.upload_file(staged, uri)


def stands_for(path: Path, uri: str) -> None:
    """Record that the scratch file `path` is a copy of `uri` (e.g. a registered model's download), for origin."""
    _origins[path] = uri


def origin(path: str | Path) -> str:
    """The URI a scratch path stands for (`s3://b/idx/meta.json` for a file of a downloaded prefix), else
    the path itself: for records and messages that should name where an artifact really is."""
    p = Path(path)
    for root, uri in _origins.items():
        if p == root or p.is_relative_to(root):
            rel = p.relative_to(root).as_posix()
            return uri if rel == "." else f"{uri}/{rel}"
    return str(path)


def restore_uris(text: str) -> str:
    """`text` with every scratch path replaced by the URI it stands for."""
    for root in sorted(_origins, key=lambda r: len(str(r)), reverse=True):
        text = text.replace(str(root), _origins[root])
    return text


def sibling(uri: str | Path, name: str) -> str:
    """The path or URI named `name` in the same folder or prefix as `uri`."""
    if s3.is_s3(uri):
        head = str(uri).rstrip("/").rsplit("/", 1)[0]
        return f"{head}/{name}"
    return str(Path(uri).with_name(name))


def stem(uri: str | Path) -> str:
    return PurePosixPath(str(uri).rstrip("/")).stem
