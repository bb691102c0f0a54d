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
import errno
import fcntl
import fnmatch
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from cmce import s3
from cmce.errors import raise_if_terminated

_scratch: Path | None = None
_origins: dict[Path, str] = {}  # scratch folder or file → the URI it stands for
_after_upload: dict[Path, list[Callable[[], None]]] = {}  # a staged s3:// output → what waits for its upload
_uploaded_actions: list[Callable[[], None]] = []  # theirs, once uploaded: run when every output is
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


# what marks a temporary name as cmce's own (`.<name>.cmce-XXXXXXXX.tmp`): without it, a user's `.x.backup_1.tmp`
# (a folder too) beside output x matched, and the next write deleted it once it was an hour old
TEMP_MARK = "cmce-"


def temp_prefix(target: Path) -> str:
    """The prefix of a temporary file or folder written for `target` (mkstemp/mkdtemp add 8 characters)."""
    return f".{target.name}.{TEMP_MARK}"


def temp_pattern(target: Path) -> re.Pattern:
    """The names of the temporaries written for `target` (`.<name>.cmce-XXXXXXXX.tmp`), to match whole."""
    return re.compile(rf"{re.escape(temp_prefix(target))}[a-z0-9_]{{8}}\.tmp")


def clean_stale_temps(target: str | Path, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove temporary files and folders that a killed writer of `target` left behind: only names of
    our own pattern (`.<name>.cmce-XXXXXXXX.tmp`) for this target, untouched for `max_age_s` (younger ones
    may belong to a writer still running). Returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = temp_pattern(target)
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


def restore_dir(target: str | Path, own: tuple[str, ...]) -> bool:
    """Put `.<name>.old` back when `target` is missing: a run killed between atomic_dir's two renames
    leaves the previous complete folder there and nothing at `target`. Returns True if it did. A folder of that
    name holding anything but the step's own files (`own` globs) is someone else's: left where it is. `target`
    as the folder it is (`--index .` has no name of its own)."""
    target = Path(os.path.realpath(target))
    if not target.name:  # the root folder
        return False
    old = _old(target)
    if target.exists() or not _is_own_old(old, own):
        return False
    try:
        os.rename(old, target)
    except OSError:  # restored (or rebuilt) by someone else in the meantime
        return False
    log.warning("%s was missing after an interrupted swap; restored the previous version from %s", target, old.name)
    return True


def _is_own_old(old: Path, own: tuple[str, ...]) -> bool:
    """`.<name>.old` as atomic_dir leaves it: a folder (not a link) of the step's own files only. A user's backup
    of that name was deleted by the next swap, or put in place of a missing output."""
    if old.is_symlink() or not old.is_dir():
        return False
    return not _foreign(os.listdir(old), own, _folders_in(old))


def _folders_in(folder: Path) -> set[str]:
    """The names of the folders in `folder` (not links to one): a step writes files only, and a folder named like
    one of them (`index.faiss/`) was deleted whole with the output it was swapped out of."""
    return {entry.name for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False)}


def _foreign(names: list[str], own: tuple[str, ...], folders: set[str]) -> list[str]:
    """The names the step did not write, a folder's with a trailing /."""
    return sorted({f"{n}/" if n in folders else n for n in names
                   if n in folders or (n not in KEPT_ACROSS_SWAPS and not any(fnmatch.fnmatch(n, g) for g in own))})


def _check_old(target: Path, own: tuple[str, ...]) -> None:
    old = _old(target)
    if (old.exists() or old.is_symlink()) and not _is_own_old(old, own):
        what = "a folder of other files" if old.is_dir() and not old.is_symlink() else "a file or link"
        raise ForeignOutputError(f"{old}: {what}, where this step moves the previous {target.name} aside while it "
                                 "swaps in the new one; it is no earlier output of the step: move it away")


def _discard_dir(path: Path) -> None:
    """Delete a folder, renaming it to a temporary name first, so that a kill during the deletion
    leaves a stale temporary folder (cleaned later), never a half-deleted `.old`."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=temp_prefix(path.with_name(path.name.removesuffix(".old")[1:])),
                                  suffix=".tmp", dir=path.parent))
    os.replace(path, trash)  # onto the empty folder just made
    shutil.rmtree(trash, ignore_errors=True)
    if trash.exists():  # a file in it that may not be deleted (immutable, a read-only mount): said, not left unsaid
        log.warning("%s: the replaced copy could not be removed whole; delete it by hand (the new one is in place)",
                    trash)


def keep_access(old: Path, new: Path) -> None:
    """`new`, about to replace `old`, gets its mode and (where this process may) its owner: a gallery kept 640 for
    one group, replaced in place, became 644 and root's (readable by all)."""
    try:
        st = old.stat()
    except OSError:  # nothing there to take after
        return
    if stat.S_ISDIR(st.st_mode) != new.is_dir():
        return
    # never without the owner's read and write (and a folder's search): a replaced mode-000 file made an output its
    # own user could not read
    own = stat.S_IRUSR | stat.S_IWUSR | (stat.S_IXUSR if new.is_dir() else 0)
    os.chmod(new, stat.S_IMODE(st.st_mode) | own)
    with contextlib.suppress(OSError):  # only root may give a file away
        if (st.st_uid, st.st_gid) != (new.stat().st_uid, new.stat().st_gid):
            os.chown(new, st.st_uid, st.st_gid)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to `target`; rename it onto `target` only on success."""
    target = Path(target)
    made = make_parents(target)
    clean_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with named_on_failure(target):
            yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600; give the artifact the usual permissions, or the replaced one's
            os.chmod(tmp_path, 0o666 & ~_umask())
            keep_access(target, tmp_path)
        _check_inputs_before_commit()
        os.replace(tmp_path, target)
        _wrote(target)
        made = []
    finally:
        tmp_path.unlink(missing_ok=True)
        remove_if_empty(made)


WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


class NotWritten(OSError):
    """An output that could not be written (a full disk), named."""


@contextlib.contextmanager
def named_on_failure(target: Path) -> Iterator[None]:
    """A write that fails for want of room or a working disk names the output (pyarrow and onnx do not)."""
    try:
        yield
    except NotWritten:  # named already, by the write nearest to it
        raise
    except OSError as err:
        if err.errno not in WRITE_FAILURES:
            raise
        raise NotWritten(f"{target}: not written: {os.strerror(err.errno)}") from None


def climbed_lexically(target: Path) -> Path:
    """`target` with each `..` after its first missing folder taken out with the folder before it: the kernel takes
    them only once mkdir has made the folders they climb out of, which were left behind, empty
    (`--out a/b/../../y.pt`). Folders that exist (a link among them) are left to the kernel."""
    parts = target.parts
    missing = next((i for i in range(1, len(parts) + 1) if not os.path.lexists(Path(*parts[:i]))), None)
    if missing is None or ".." not in parts[missing - 1:]:
        return target
    rest = os.path.normpath(os.path.join(*parts[missing - 1:]))
    return Path(*parts[:missing - 1], rest) if missing > 1 else Path(rest)


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
    _check_old(target, own)
    if not target.exists():
        return
    if not target.is_dir():
        raise ForeignOutputError(f"{target}: is a file, not an output folder")
    refuse_foreign(str(target), [p.name for p in target.iterdir()], own, _folders_in(target))


def refuse_foreign(target: str, names: list[str], own: tuple[str, ...], folders: set[str] = frozenset()) -> None:
    """check_replaceable for the top-level `names` of a folder or S3 prefix, `folders` those that are folders."""
    foreign = _foreign(names, own, folders)
    if foreign:
        raise ForeignOutputError(
            f"{target}: holds {', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}, which this step "
            f"does not write ({', '.join(own)}); it replaces its output folder whole, so give an empty or new folder"
        )


TURNSTILE_WAIT_S = 30.0  # the longest a reader waits behind a waiting swap (or a swap behind another) for its turn


@contextlib.contextmanager
def swap_lock(target: str | Path, exclusive: bool) -> Iterator[None]:
    """The swap of a folder by atomic_dir (exclusive) and its readers (shared) exclude each other, so a reader
    sees the old folder or the new one, whole, and never takes a live swap for an interrupted one. The lock is
    an flock on the parent folder itself (no lock file is left beside the outputs); the OS releases it when a
    process dies. Swaps of folders with one parent wait for each other: they are two renames long.
    A waiting swap goes before the readers of its folder that come after it: flock favours no one, and readers
    whose loads overlapped held a rebuild off for good. A swap holds the flock of the folder itself (the
    turnstile) while it waits; a reader passes through it, held only while it takes its shared lock. A turn is
    waited for TURNSTILE_WAIT_S at most (a suspended process holds its locks): then the lock goes on without it,
    as before. Readers of other folders with the same parent are not held back. Locks are taken on the real
    folders (symbolic links and `..` resolved), from a folder to its parent, never the other way, so folders
    nested in each other cannot deadlock."""
    real = Path(os.path.realpath(target))
    with contextlib.ExitStack() as held:
        parent = _open_folder(real.parent, held)  # None: a missing parent, there is nothing to swap or read
        turnstile = _open_folder(real, held) if real != real.parent else None  # no folder yet (a first build)
        if turnstile is not None and not _turn(turnstile, Path(target)):
            turnstile = None
        if parent is not None:
            _wait_for_lock(parent, exclusive, Path(target), real.parent)
        if turnstile is not None and not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)  # passed through: the next reader, or a swap, may take it
        yield


def _open_folder(folder: Path, held: contextlib.ExitStack) -> int | None:
    """An fd of `folder` to flock, closed with `held`; None where it is no folder that can be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    held.callback(os.close, fd)
    return fd


def _turn(fd: int, target: Path) -> bool:
    """The turnstile's flock, waited for TURNSTILE_WAIT_S at most; False where it was not had (or cannot be:
    a file system without flock)."""
    deadline, said = time.monotonic() + TURNSTILE_WAIT_S, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                log.info("%s: waited %g s for its turn behind a swap; going on beside it", target, TURNSTILE_WAIT_S)
                return False
            if not said:
                _say_waiting(target, target)
                said = True
            time.sleep(0.05)
        except OSError:
            return False


def _wait_for_lock(fd: int, exclusive: bool, target: Path, locked: Path) -> None:
    """flock on `locked`, saying first what it waits for when another process holds the lock (a search suspended
    with Ctrl-Z keeps its shared one: the silent wait looked like a hang)."""
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        _say_waiting(target, locked)
        fcntl.flock(fd, mode)


def _say_waiting(target: Path, locked: Path) -> None:
    """Said before a wait on a lock another process holds (a search suspended with Ctrl-Z keeps its own): a silent
    wait looked like a hang."""
    log.info("%s: waiting for another process that is reading or swapping it (it holds a lock on %s)", target, locked)


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
            restore_dir(target, own)
        check_replaceable(target, own)
    except BaseException:
        remove_if_empty(made)
        raise
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        with named_on_failure(target):
            yield tmp
        for name in KEPT_ACROSS_SWAPS:
            if (target / name).is_file() and not (tmp / name).exists():
                shutil.copy2(target / name, tmp / name)
        os.chmod(tmp, 0o777 & ~_umask())
        keep_access(target, tmp)
        for new in tmp.iterdir():
            keep_access(target / new.name, new)
        _check_inputs_before_commit()
        old = _old(target)
        with swap_lock(target, exclusive=True):  # waits for readers of the old folder to finish
            _discard_dir(old)  # a complete older version, left by a run killed before it could delete it
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
        _discard_dir(old)
        made = []
    except NotWritten as err:  # a file of the folder, named by the output it is part of, not by the temporary
        raise NotWritten(str(err).replace(str(tmp), str(target))) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(made)


def stat_identity(path: Path, ctime: bool = False) -> tuple[int, ...] | None:
    """What changes when a file is replaced or rewritten (None: it is missing). `ctime` also sees a copy that
    restored the old mtime (`cp -p` onto the file), and a chmod or a new hard link, which an input watch of a
    running step must not take for a change."""
    try:
        st = path.stat()
    except OSError:  # missing, or no longer reachable (a parent replaced by a file, permissions)
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) + ((st.st_ctime_ns,) if ctime else ())


_watched: list[Unchanged] = []  # the inputs of the running command: checked before each output is put in place


@contextlib.contextmanager
def inputs_unchanged(paths: list[str | Path]) -> Iterator[None]:
    """While the block runs, every atomic write checks, before it renames its output in, that none of `paths`
    was replaced or changed since the block began (a file replaced between two reads of it mixes versions)."""
    watch = Unchanged(paths)
    _watched.append(watch)
    try:
        yield
    finally:
        _watched.remove(watch)


def _check_inputs_before_commit() -> None:
    raise_if_terminated()
    for watch in _watched:
        watch.check()


def _wrote(target: Path) -> None:
    """An output renamed over an input of the same command (an in-place add): its new identity is the step's own."""
    for watch in _watched:
        watch.refresh(target)


class Unchanged:
    """The identity (inode, size, mtime) of local input files, taken before a step first opens them: `check()`,
    called inside the atomic write before the rename, fails if one was replaced or modified meanwhile. A step
    that opens a file more than once (metadata, then rows; one chunk at a time) would otherwise mix versions."""

    def __init__(self, paths: list[str | Path] | tuple[str | Path, ...]):
        self.paths = [Path(p) for p in paths if not is_remote(p)]
        self.before = [stat_identity(p) for p in self.paths]

    def check(self) -> None:
        for p, was in zip(self.paths, self.before, strict=True):
            if stat_identity(p) != was:
                # not "nothing written": `cmce run` has put its earlier stages' outputs in place by then
                raise ValueError(f"{p}: was replaced or changed while this step read it; the output it was writing "
                                 "was not put in place; run it again")

    def refresh(self, path: Path) -> None:
        for k, p in enumerate(self.paths):
            if p == path or p.resolve() == path.resolve():
                self.before[k] = stat_identity(p)


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    write_bytes(target, text.encode())


def open_regular(path: str | Path) -> io.BufferedReader:
    """A file opened for reading, refused unless it is a regular file: open() of a FIFO (a pipe named like
    meta.json or a model) waits for a writer for ever; the server's reload thread hung there without a word."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO opens at once, to be refused below
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):  # an s3:// prefix given for a file comes here as its downloaded folder
            raise IsADirectoryError(errno.EISDIR, "is a folder (or an S3 prefix), not a file", str(path))
        raise OSError(errno.EINVAL, "not a regular file (a pipe, device or socket)", str(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def regular_files(paths: list[Path], where: str) -> list[Path]:
    """`paths` found in a folder (`where`: the flag that named it), each checked to be a regular file where it
    exists: a named pipe among them hung the step inside the Parquet reader's open, deaf to SIGTERM."""
    for path in paths:
        if path.exists() and not path.is_file():
            raise ValueError(f"{path}: in {where}, is not a regular file (a folder, pipe, device or socket)")
    return paths


class TooLarge(ValueError):
    """A file over the size its kind ever has."""


def read_regular(path: str | Path, limit: int | None = None) -> bytes:
    """A regular file's bytes; past `limit` bytes TooLarge, before more is read (a 20 GB sparse meta.json was read
    whole: 6.6 GB of memory, or MemoryError naming nothing)."""
    too_large = TooLarge(f"more than {limit:,} bytes, more than such a file holds") if limit is not None else None
    with open_regular(path) as f:
        if too_large and os.fstat(f.fileno()).st_size > limit:  # refused unread: serve checks it at every poll
            raise too_large
        data = f.read() if limit is None else f.read(limit + 1)  # bounded too: /proc files state no size
    if too_large and len(data) > limit:
        raise too_large
    return data


def file_sha256(path: str | Path) -> str:
    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    _after_upload.clear()
    _uploaded_actions.clear()
    s3.forget_checked_buckets()


def forget_download(uri: str) -> None:
    """Drop this process's download of `uri` (read again by the next local_input): it changed while read."""
    path = _downloaded.pop(uri.rstrip("/"), None)
    if path is not None:
        _origins.pop(path, None)
        shutil.rmtree(path.parent, ignore_errors=True)  # the download's own folder (scratch/in/<id>/), made for it


def local_input(uri: str | Path, marker: str | None = None) -> Path:
    """A local path holding `uri`: the path itself, or for s3:// a download of the object (or of every
    object under the prefix, as a folder; of a prefix holding a manifest such as an index's meta.json, only the
    files it names: cmce.s3.download) into scratch, keeping the key's file name. Downloaded once
    per process until `clear_scratch`. `marker` (s3:// only): the prefix's completion marker, see
    cmce.s3.download; a local folder's marker is the caller's to check."""
    if scheme := s3.foreign_scheme(str(uri)):
        raise ValueError(s3.scheme_error(str(uri), scheme, "the input"))
    if not s3.is_s3(uri):
        path = Path(uri)
        if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO would hang, /dev/zero never ends
            raise ValueError(f"{uri}: is not a regular file or folder (a device, pipe or socket); give a file")
        return path
    uri = str(uri)
    cached = _downloaded.get(uri.rstrip("/"))  # `s3://b/idx/` is `s3://b/idx`: downloaded once
    if cached is not None and cached.exists():
        return cached
    u = s3.parse(uri)
    dest = scratch_dir() / "in" / uuid.uuid4().hex[:12] / (PurePosixPath(u.key.rstrip("/")).name or u.bucket)
    try:
        path = s3.download(uri, dest, marker)
    except BaseException:  # what a failed download wrote: a server retrying it for days filled its scratch
        shutil.rmtree(dest.parent, ignore_errors=True)
        raise
    _origins[path] = uri.rstrip("/")
    _downloaded[uri.rstrip("/")] = path
    return path


@contextlib.contextmanager
def local_output(uri: str | Path, is_dir: bool = False, last: str | tuple[str, ...] | None = None) -> Iterator[Path]:
    """Yield the local path a step writes `uri` to. Local: the path itself (steps write atomically).
    s3://: a scratch path with the key's file name, uploaded only if the block succeeds; the bucket and
    credentials are checked first, before any work. A folder goes up file by file, `last` (its completion
    marker, e.g. an index's meta.json) after all others; see cmce.s3.upload_dir."""
    if scheme := s3.foreign_scheme(str(uri)):
        raise ValueError(s3.scheme_error(str(uri), scheme, "the output"))
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
    _origins[staged], _after_upload[staged] = uri, []
    with _stdout_held():  # the step's success record is printed only once its output is uploaded
        yield staged
        if not staged.exists():
            raise FileNotFoundError(f"{uri}: the step wrote nothing to upload")
        if is_dir:
            s3.upload_dir(staged, uri, last)
        else:
            s3.put_whole(staged, uri)
        _uploaded_actions.extend(_after_upload.pop(staged))


@contextlib.contextmanager
def _stdout_held() -> Iterator[None]:
    """Keep what is printed inside the block, and print it when the block ends, only if it succeeds.
    Nested blocks (several s3:// outputs) pass it outwards, so it appears after the last upload."""
    real, held = sys.stdout, io.StringIO()
    sys.stdout = held
    try:
        yield
    finally:
        sys.stdout = real
    real.write(held.getvalue())


def after_upload(path: Path, action: Callable[[], None]) -> None:
    """Run `action` once the command's s3:// outputs are uploaded (run_after_uploads) when the scratch `path` belongs
    to one (the output itself, a file of its folder, or one beside it); at once for any other path. A failed upload
    runs nothing."""
    staged = next((root for root in _after_upload if path.parent == root.parent or path.is_relative_to(root)), None)
    if staged is None:
        action()
    else:
        _after_upload[staged].append(action)


def run_after_uploads() -> None:
    """What waited for the uploads (after_upload), once every output of the command is up."""
    while _uploaded_actions:
        _uploaded_actions.pop(0)()


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
    """`text` with every scratch path replaced by the URI it stands for (a copy of the map: log records of other
    threads are formatted with it while this one adds to it)."""
    origins = dict(_origins)
    for root in sorted(origins, key=lambda r: len(str(r)), reverse=True):
        text = text.replace(str(root), origins[root])
    return text


def sibling(uri: str | Path, name: str) -> str:
    """The path or URI named `name` in the same folder or prefix as `uri`."""
    if s3.is_s3(uri):
        head = str(uri).rstrip("/").rsplit("/", 1)[0]
        return f"{head}/{name}"
    return str(Path(uri).with_name(name))


def stem(uri: str | Path) -> str:
    return PurePosixPath(str(uri).rstrip("/")).stem
