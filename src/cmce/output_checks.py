"""What a path holds, and whether a step may write there: checked before any work (cmce.storage writes).

A file's kind is told by its first bytes (a Parquet file, a torch checkpoint, JSON, ONNX) and, for cmce's own files,
by the kind recorded inside; an output of a format cmce writes is replaced only by a file of its own format and kind
(a checkpoint never replaces a dataset), one that cannot be read not at all, a folder only when it holds nothing but
the step's own files, and an s3:// output is checked the same way by HEAD, LIST and ranged GETs, never a download of
what it replaces. A file of no format cmce writes (a note, a CSV) named as an output is replaced: the name was given.
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from cmce import s3
from cmce.storage import check_replaceable, is_remote, open_regular, refuse_foreign, scratch_dir

# bytes of an output's own name: its temporary (`.<name>.cmce-XXXXXXXX.tmp`) must fit the usual 255-byte limit too
MAX_NAME_BYTES = 200


# the formats an output file may already hold, told apart by their first bytes (a torch checkpoint is a zip)
MAGIC = {"parquet": b"PAR1", "checkpoint": b"PK\x03\x04"}


HEAD_BYTES = 64  # enough to see past the whitespace before a JSON document


def file_format(path: Path) -> str | None:
    """The format of a file by its first bytes (format_of); None for anything else."""
    try:
        with open_regular(path) as f:  # a pipe named like an output would block the check for ever
            head = f.read(HEAD_BYTES)
    except OSError:
        return None
    return format_of(head)


def format_of(head: bytes) -> str | None:
    """What cmce writes, told by a file's first bytes: "parquet", "checkpoint" (torch's zip archive), "json" (an
    index's meta.json, a gate decision), "onnx" (protobuf's first field, the IR version); None for anything else."""
    found = next((name for name, magic in MAGIC.items() if head[:4] == magic), None)
    if found:
        return found
    if head.lstrip(b" \t\r\n")[:1] in (b"{", b"["):
        return "json"
    return "onnx" if head[:1] == b"\x08" else None


def checkpoint_kind(path: Path) -> str | None:
    """A cmce checkpoint's `format` (an embedding model or a transformation); None for any other torch file."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - garbage makes the unpickler raise almost anything; it is then no cmce file
        return None
    return obj.get("format") if isinstance(obj, dict) and isinstance(obj.get("format"), str) else None


def onnx_kind(path: Path) -> str | None:
    """A cmce ONNX export's `format` metadata (its weights, if stored beside it, not read); None for any other
    ONNX model (or onnx not installed: no cmce export could have been made here either)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a damaged protobuf raises the decoder's own errors; it is then no cmce file
        return None
    return next((p.value for p in model.metadata_props if p.key == "format"), None)


KIND_READERS: dict[str, Callable[[Path], str | None]] = {"checkpoint": checkpoint_kind, "onnx": onnx_kind}


def parquet_kind(path: Path | object) -> str | None:
    """What a cmce Parquet file (a path, or a pyarrow buffer holding at least its footer) holds, from its footer:
    the `kind` its writer recorded (gallery, gallery_member, train_embeddings, query), "dataset" for a dataset
    file, None for any other Parquet file."""
    meta = cmce_metadata(path)
    if meta is None:
        return None
    return meta.get("kind") if isinstance(meta.get("kind"), str) else "dataset" if "protocol" in meta else None


def cmce_metadata(path: Path | object) -> dict | None:
    """The metadata cmce recorded in a Parquet file's footer (a path, or a pyarrow buffer holding at least the
    footer); None for a file that is no Parquet or holds none."""
    import pyarrow.parquet as pq

    try:
        meta = json.loads((pq.read_schema(path).metadata or {}).get(b"cmce", b"null"))
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError; so is bad JSON
        return None
    return meta if isinstance(meta, dict) else None


def not_found(path: str | Path, what: str = "file") -> str:
    """Why a path names nothing: `<what> not found`, or a symbolic link to nothing (its target gone, or links in a
    loop), which `exists()` also calls missing."""
    if os.path.islink(path):
        return f"a symbolic link to nothing (its target is missing, or the links loop); {what} not found"
    return f"{what} not found"


def _mounted_on(path: Path) -> bool:
    """Whether something is mounted on `path` (a file bind-mounted onto another, which os.path.ismount does not
    see: same device), from the kernel's table; False where there is none."""
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return False
    here = os.path.realpath(path)
    # field 5 is the mount point, with space, tab, newline and backslash written as octal escapes
    points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
              for line in table.splitlines() if len(line.split()) > 4}
    return here in points


def check_output(uri: str | Path, is_dir: bool = False, own: tuple[str, ...] | None = None,
                 writes: str | None = None, kinds: tuple[str, ...] = ()) -> None:
    """Before any work: refuse an output path the step could not write whole at the end, naming it. A folder
    output replaced whole (`own`: the globs it writes) must be one of its own (check_replaceable); an existing
    file is replaced only by a file of its own format (`writes`) and, for Parquet, of its own `kinds`
    (parquet_kind): a checkpoint never replaces a dataset, nor a gallery a dataset."""
    text = str(uri)
    if not text.strip():
        raise ValueError("an output path is empty")
    if scheme := s3.foreign_scheme(text):
        raise ValueError(s3.scheme_error(text, scheme, "the output"))
    named = SUFFIX_FORMATS.get(PurePosixPath(text).suffix.lower())
    # export-query --out q.pt wrote ONNX under a .pt name; local or s3://, new or already there
    if writes and not is_dir and named and named != writes:
        raise ValueError(f"{text}: its name says {a_format(named)} file; this step writes {a_format(writes)} file, so "
                         f"give a name ending in {WRITTEN_SUFFIX[writes]}")
    if is_remote(text):
        _check_remote_output(text, is_dir, own, writes, kinds)
        return
    target = Path(text)
    for folder in target.parents:  # making the folders failed after the work: "[Errno 17] File exists: 'o/dang'"
        if os.path.islink(folder) and not folder.exists():
            raise ValueError(f"{text}: its folder {folder} is a symbolic link to nothing (its target is missing, or "
                             "the links loop)")
    if target.exists() and not (target.is_file() or target.is_dir()):  # renaming over it would replace a device
        raise ValueError(f"{text}: is a device, pipe or socket, not a file or folder to write")
    if target.is_symlink():  # outputs are renamed in: that replaces the link (/dev/stdout, say), not what it names
        raise ValueError(f"{text}: is a symbolic link; give the path it points to")
    if target.exists() and (os.path.ismount(target) or _mounted_on(target)):  # outputs are renamed in: EBUSY
        inside = "a folder inside it" if target.is_dir() else "another path"
        raise ValueError(f"{text}: is a mount point, which cannot be replaced; give {inside}")
    if not is_dir and (text.endswith("/") or target.is_dir()):
        raise ValueError(f"{text}: is a folder; this output is a file, give its path")
    if writes and target.is_file() and not os.access(target, os.R_OK):  # replaced unchecked, then read back: exit 2
        raise ValueError(f"{text}: cannot be read, so what it holds cannot be checked; this step replaces only a file "
                         "of its own kind: make it readable, or give another path")
    found = file_format(target) if writes and target.is_file() else None
    _refuse_other_format(text, found, writes, kinds,
                         lambda: parquet_kind(target) if found == "parquet" else KIND_READERS[found](target))
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
    if not is_dir and target.is_file() and (why := _unreplaceable(target)):
        raise ValueError(f"{text}: cannot be replaced: {why}")


def _unreplaceable(path: Path) -> str | None:
    """Why a file cannot be renamed over (an immutable or append-only file: `chattr +i`), or None. Found by opening
    it to write, which changes nothing; only EPERM says so (EACCES, a file this user may not write, can still be
    replaced by a rename). Unchecked, a step trained for 17 s, then failed on the rename, naming its scratch file."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW))
    except OSError as err:
        if err.errno == errno.EPERM:
            return f"{err.strerror} (an immutable or append-only file: chattr -i)"
    return None


def _refuse_other_format(text: str, found: str | None, writes: str | None, kinds: tuple[str, ...],
                         kind_of: Callable[[], str | None]) -> None:
    """An existing output file of `found` format is replaced only by a file of its own format and kind."""
    if found and found != writes:
        raise ValueError(f"{text}: holds {a_format(found)} file; this step writes {a_format(writes)} file, so give "
                         "another path")
    if found and kinds and (kind := kind_of()) not in kinds:
        raise ValueError(f"{text}: holds a {kind or 'non-cmce'} {FORMAT_NAMES.get(found, found)} file; this step "
                         f"writes a {kinds[0]} file, so give another path")


FORMAT_NAMES = {"parquet": "Parquet", "onnx": "ONNX", "json": "JSON"}
# the formats a file's name says it holds (the loaders read by content, so any other name is left alone)
SUFFIX_FORMATS = {".pt": "checkpoint", ".pth": "checkpoint", ".parquet": "parquet", ".onnx": "onnx", ".json": "json"}
WRITTEN_SUFFIX = {"checkpoint": ".pt", "parquet": ".parquet", "onnx": ".onnx", "json": ".json"}


def a_format(fmt: str | None) -> str:
    """A file format with its article: "a Parquet", "an ONNX" (was "a onnx")."""
    name = FORMAT_NAMES.get(fmt or "", fmt or "unknown")
    return f"{'an' if name[0] in 'AEIOUaeiou' else 'a'} {name}"


# a Parquet footer larger than this is not read to check an S3 output's kind (its format is still checked)
MAX_REMOTE_FOOTER = 8 << 20
MAX_REMOTE_CHECKPOINT = 256 << 20  # nor a checkpoint or ONNX file larger than this downloaded


def _remote_footer(uri: str, size: int) -> tuple[bool, object | None]:
    """(read, footer) of an S3 object from two ranged GETs of its end, not a download: a pyarrow reader of the
    footer, None where there is no Parquet footer; read is False when the footer is too large to be worth reading."""
    import pyarrow as pa

    tail = s3.read_range(uri, size - 8, size - 1) if size >= 12 else b""
    footer = int.from_bytes(tail[:4], "little")
    if tail[4:] != MAGIC["parquet"] or footer > size - 12:
        return True, None
    if footer > MAX_REMOTE_FOOTER:
        return False, None
    end = s3.read_range(uri, size - 8 - footer, size - 1)
    footer_copy = pa.BufferOutputStream()  # arrow's own memory: a buffer over Python bytes, released by an arrow
    footer_copy.write(MAGIC["parquet"] + end)  # worker once the interpreter exits, aborted it (tables._native)
    return True, pa.BufferReader(footer_copy.getvalue())  # a footer needs only the magic before it


def _remote_parquet_kind(uri: str, size: int) -> tuple[bool, str | None]:
    """(read, parquet_kind) of an S3 object from its footer (a broken footer is no cmce kind: None)."""
    read, footer = _remote_footer(uri, size)
    return read, parquet_kind(footer) if footer is not None else None


def existing_metadata(uri: str | Path) -> dict | None:
    """The cmce metadata of the Parquet file already at an output's place, local or s3:// (read from the footer by
    ranged GETs, never a download); None where there is none, or it is no cmce Parquet file."""
    if not is_remote(str(uri)):
        return cmce_metadata(Path(uri)) if Path(uri).is_file() else None
    size = s3.object_size(str(uri))
    footer = _remote_footer(str(uri), size)[1] if size is not None else None
    return cmce_metadata(footer) if footer is not None else None


def _check_remote_output(text: str, is_dir: bool, own: tuple[str, ...] | None, writes: str | None,
                         kinds: tuple[str, ...]) -> None:
    """check_output for an s3:// URI, with the same rules: the bucket and credentials, then what is at the key
    (an object is a file, a non-empty prefix a folder), read by HEAD, LIST and ranged GETs, never a download."""
    uri = text.rstrip("/")
    u = s3.parse(uri)
    if not u.key:
        raise ValueError(f"{uri}: names a bucket; give the object key or prefix to write")
    if not is_dir and text.endswith("/"):
        raise ValueError(f"{text}: is a folder; this output is a file, give its key")
    # S3 refuses a longer key (KeyTooLongError) only at the upload, after the work; a folder's files add their names
    longest = len(u.key.encode()) + (1 + max((len(n.encode()) for n in own or ()), default=64) if is_dir else 0)
    if longest > s3.MAX_KEY_BYTES:
        raise ValueError(f"{uri}: the key is {len(u.key.encode())} bytes; S3 keys are at most {s3.MAX_KEY_BYTES}"
                         + (" with the names of the folder's files" if is_dir else ""))
    s3.check_writable(uri)
    parts = u.key.split("/")
    for depth in range(1, len(parts)):  # an object `a/q.pt` below which `a/q.pt/idx` is written: then both an
        above = f"{s3.SCHEME}{u.bucket}/{'/'.join(parts[:depth])}"  # object and a prefix, which no reader takes
        if s3.object_head(above, "checking the output") is not None:
            s3.is_prefix(above)  # a web server answering 200 to every HEAD is named as no S3 server by its listing
            raise ValueError(f"{uri}: cannot be created: {above} is an object (a file)")
    size = s3.object_size(uri)
    if is_dir:
        if size is not None:
            s3.is_prefix(uri)  # a web server answering 200 to every HEAD is named as no S3 server by its listing
            raise ValueError(f"{uri}: is an object (a file), not an output folder; give another prefix")
        if own is not None:
            keys = [k for k in s3.list_keys(uri) if not s3.is_staged(k)]  # an upload's leftovers: its own
            refuse_foreign(uri, [k.split("/", 1)[0] for k in keys], own, {k.split("/", 1)[0] for k in keys if "/" in k})
        return
    if s3.is_prefix(uri):
        raise ValueError(f"{uri}: is a folder (a prefix holding objects); this output is a file, give its key")
    if size is None or not writes:
        return
    found = format_of(s3.read_range(uri, 0, HEAD_BYTES - 1)) if size else None
    if found in KIND_READERS and kinds and size <= MAX_REMOTE_CHECKPOINT:  # its kind is inside the file
        local = scratch_dir() / "kind" / uuid.uuid4().hex[:12]
        s3.download(uri, local)
        read, kind = True, KIND_READERS[found](local)
        local.unlink()
    else:
        read, kind = _remote_parquet_kind(uri, size) if found == "parquet" and kinds else (False, None)
    _refuse_other_format(uri, found, writes, kinds if read else (), lambda: kind)
