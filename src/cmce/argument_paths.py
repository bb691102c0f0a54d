"""A command line's path arguments, checked before any work: each a UTF-8 name of a supported scheme; no output
over an input, a tracking store or another output, nor holding the working folder or TMPDIR; `~` expanded; a file
given twice to one flag named (cmce.cli)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from cmce.resume import check_resume_file, check_resume_object, resume_name
from cmce.s3 import foreign_scheme, scheme_error
from cmce.storage import is_remote, sibling, stem

INPUT_ARGS = ("config", "raw", "dataset", "query_model", "gallery_model", "kd_teacher", "transform", "transform_dir",
              "kd", "kd_dir", "gallery", "member", "shard_file", "index", "images", "train_embeddings",
              "baseline_query_model", "baseline_gallery", "check_dataset", "check_index")
MODEL_ARGS = ("query_model", "gallery_model", "kd_teacher", "transform", "kd", "baseline_query_model")  # models:/ too
MODEL_URIS = "a checkpoint is a path, an s3:// object or models:/NAME@ALIAS (or /VERSION); no other URI"
# output folders a command makes beside --out when not given: {command: {argument: suffix of --out's stem}}
DEFAULT_FOLDERS = {"embed-gallery": {"members_dir": "_members"}, "add-gallery-model": {"work_dir": "_added"}}
OUTPUT_ARGS = ("out", "train_embeddings_out", "members_dir", "index_out", "work_dir", "transforms_out")
RESUMES = ("train", "fit-transform")  # they keep their state in `<out>.resume` while they train (cmce.resume)
RESUME_FILE = "resume_file"
# the lifecycle steps may replace the gallery they grow: the new one is written aside and renamed over it
REPLACES_GALLERY = ("add-member", "add-gallery-model", "upgrade-query-model")


def _clashes(out: str, inp: str) -> bool:
    """Whether writing `out` could write over `inp`: the same file or folder (through symlinks or hard links),
    or a folder holding it (an output folder is replaced whole, or has files written into it by name)."""
    if is_remote(out) and is_remote(inp):  # s3:// prefixes: a folder holds the keys under it, as on a disk
        return _under(inp, out)
    if is_remote(out) or is_remote(inp) or is_registered(inp):  # a URI beside a path, registry names: equal text
        return out.rstrip("/") == inp.rstrip("/")
    o, i = Path(out), Path(inp)
    if o.exists() and i.exists() and os.path.samefile(o, i):
        return True
    o, i = _resolved(o), _resolved(i)
    return o == i or o in i.parents


def is_registered(value: str) -> bool:
    """A registered model, `models:/NAME@ALIAS`: the one URI beside s3:// an input may be (foreign schemes are
    refused first). Any `:/` was taken for one: a local folder `col:` turned off every check of outputs over inputs."""
    return value.startswith("models:/")


def working_folder_under(out: str) -> Path | None:
    """Where the working folder lies under the local output `out` (`.` when it is the working folder itself),
    or None when it does not."""
    if is_remote(out):
        return None
    try:
        here = _resolved(Path.cwd())
    except OSError:  # a working folder since removed: no output can be it
        return None
    o = _resolved(Path(out))
    return here.relative_to(o) if o == here or o in here.parents else None


def _not_utf8(flag: str, value: str) -> str:
    """A path Python could not decode: bytes that are not UTF-8, or UTF-8 under a locale that is not (LANG=C with
    UTF-8 mode off: `índice` was called "not valid UTF-8", and renaming it was the wrong advice)."""
    if sys.getfilesystemencoding().lower().replace("-", "") != "utf8":
        try:
            os.fsencode(value).decode("utf-8")
            return (f"{flag} {ascii(value)}: a UTF-8 name this process reads as {sys.getfilesystemencoding()} (the "
                    "locale); run it with a UTF-8 locale (LC_ALL=C.UTF-8) or PYTHONUTF8=1")
        except UnicodeDecodeError:
            pass
    return f"{flag} {ascii(value)}: the name is not valid UTF-8, which Arrow and Parquet need; rename it"


def is_within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies under it (both local)."""
    p, f = _resolved(Path(path)), _resolved(Path(folder))
    return p == f or f in p.parents


def _under(uri: str, prefix: str) -> bool:
    """The s3:// `uri` is the object or folder `prefix`, or lies under it (`s3://b/idx/q.onnx` under `s3://b/idx`)."""
    uri, prefix = uri.rstrip("/"), prefix.rstrip("/")
    return uri == prefix or uri.startswith(f"{prefix}/")


def inside_folder(out: str, inp: str) -> bool:
    if is_remote(out) and is_remote(inp):  # only equal text was compared: an s3:// output inside an input prefix
        return _under(out, inp) and out.rstrip("/") != inp.rstrip("/")  # was written there
    if is_remote(out) or is_remote(inp) or is_registered(inp) or not Path(inp).is_dir():
        return False
    return _resolved(Path(inp)) in _resolved(Path(out)).parents


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # RuntimeError: a symlink loop (Python 3.11)
        raise ValueError(f"{path}: is a loop of symbolic links") from None


def shown_flag(name: str) -> str:
    """An argument as the user typed it: `--gallery-models` for an option, `GALLERY` for a positional."""
    return name.upper() if name in POSITIONALS else f"--{name.replace('_', '-')}"


def refuse_outputs_among_inputs(args: argparse.Namespace) -> list[str]:
    """Before any work: no output of the command may be one of its inputs, nor a folder holding one; no two
    outputs may be one file, nor one inside the other (a folder is replaced whole). Returns the inputs."""
    def named(names: tuple[str, ...]) -> list[tuple[str, str]]:
        found = [(n, getattr(args, n, None)) for n in names]
        return [(n, str(v)) for n, value in found if value
                for v in (value if isinstance(value, list) else [value])]

    def flag(name: str) -> str:
        if name == RESUME_FILE:
            return "--out's resume file"
        if name.startswith("default_"):
            return f"the default {shown_flag(name.removeprefix('default_'))}"
        return shown_flag(name)

    inputs, outputs = INPUT_ARGS, OUTPUT_ARGS
    for name, value in named(inputs) + named(outputs):  # s3a://, S3://, gs://: else a relative local path
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # bytes the file system allowed: Arrow failed on them naming nothing
            raise ValueError(_not_utf8(flag(name), value)) from None
        if "\x00" in value:
            raise ValueError(f"{flag(name)} {ascii(value)}: holds a NUL character")
        if name in MODEL_ARGS and foreign_scheme(value) and not is_registered(value):
            raise ValueError(f"{flag(name)} {value}: {MODEL_URIS}")
        if name not in MODEL_ARGS and (scheme := foreign_scheme(value)):
            raise ValueError(scheme_error(value, scheme, flag(name)))
    scratch = tempfile.gettempdir()
    for name, value in named(INPUT_ARGS):  # a served index folder held serve's model download, and refused a rebuild
        if name == "config" and Path(value).is_dir():  # was "TMPDIR /tmp is inside the input folder --config /tmp"
            raise ValueError(f"--config {value}: is a folder; give the YAML config file")
        if not is_remote(value) and not is_registered(value) and Path(value).is_dir() and is_within(scratch, value):
            raise ValueError(f"TMPDIR {scratch} is inside the input folder {flag(name)} {value}: the "
                             "step's scratch files would be written among its inputs; set TMPDIR elsewhere")
    if args.command == "combine":  # there --members-dir is where the per-model files are read from
        inputs, outputs = (*INPUT_ARGS, "members_dir"), tuple(n for n in OUTPUT_ARGS if n != "members_dir")
    written = named(outputs)
    for name in DEFAULT_FOLDERS.get(args.command, {}):  # made beside --out unless given: checked too
        if not getattr(args, name, None) and getattr(args, "out", None):  # (a dataset in `<out>_added/` was replaced)
            written.append((f"default_{name}", default_folder(args, name)))
    if args.command in RESUMES and args.out and (is_remote(args.out) or Path(args.out).name):  # `<out>.resume`
        written.append((RESUME_FILE, resume_name(args.out)))
    for out_name, out in written:
        if out == "-":  # the usual name of standard output: a file called "-" was written in the working folder
            raise ValueError(f"{flag(out_name)} -: outputs are files or folders here, not standard output; give a name")
        if (held := working_folder_under(out)) is not None:  # `--out .`: the folder a step would replace or fill
            raise ValueError(f"{flag(out_name)} {out} {'is' if held == Path('.') else 'holds'} the working folder; "
                             "give the name of the file or folder to write")
        if not is_remote(out) and is_within(tempfile.gettempdir(), out):  # scratch downloads would land there
            raise ValueError(f"TMPDIR {tempfile.gettempdir()} is inside the output {flag(out_name)} {out}: the step's "
                             "scratch files would be written into it; set TMPDIR elsewhere")
        for in_name, inp in named(inputs):
            if args.command in REPLACES_GALLERY and (out_name, in_name) == ("out", "gallery"):
                continue
            if _clashes(out, inp):
                raise ValueError(f"{flag(out_name)} {out} would write over the input {flag(in_name)} {inp}")
            if inside_folder(out, inp):  # the next build of that folder refused the stranger it then held
                raise ValueError(f"{flag(out_name)} {out} is inside the input folder {flag(in_name)} {inp}; "
                                 "write it elsewhere")
        for store_name, store in _tracking_stores(args):
            if _clashes(out, store) or _clashes(store, out):
                raise ValueError(f"{flag(out_name)} {out} would write over the MLflow tracking store {store_name} "
                                 f"names ({store}): its runs and registered models")
    for k, (out_name, out) in enumerate(written):
        for other_name, other in written[k + 1:]:
            if _clashes(out, other) or _clashes(other, out):
                raise ValueError(f"{flag(out_name)} {out} and {flag(other_name)} {other} would write over each "
                                 "other; give outputs apart")
    for out_name, out in written:
        if out_name == RESUME_FILE:
            check_resume_object(out) if is_remote(out) else check_resume_file(Path(out))
    return [inp for _, inp in named(inputs)]


def check_output_buckets(args: argparse.Namespace) -> None:
    """The bucket of every s3:// output, checked before any input is downloaded: a missing one was said only after
    the whole input (a gallery of many GB) had come down."""
    from cmce import s3

    for name in OUTPUT_ARGS:
        value = getattr(args, name, None)
        for uri in value if isinstance(value, list) else [value]:
            if s3.is_s3(uri):
                s3.check_writable(str(uri))  # once a bucket: the outputs' own checks then find it checked


def default_folder(args: argparse.Namespace, name: str) -> str:
    """The folder `name` a command makes beside its --out when the flag is not given (DEFAULT_FOLDERS)."""
    return sibling(args.out, f"{stem(args.out)}{DEFAULT_FOLDERS[args.command][name]}")


def _tracking_stores(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The local tracking store this command may write runs into, as (what names it, path): an output written
    over it replaced the runs and registry with a JSON file, exit 0."""
    from cmce.tracking_store import default_store_uri, local_store

    if args.mlflow_uri:
        named = "--mlflow-uri", args.mlflow_uri
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        named = "MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"]
    elif args.command == "track-start":
        named = "--run-dir", default_store_uri(args.run_dir)
    else:
        return []
    store = local_store(named[1])
    return [] if store is None else [(named[0], str(store))]


POSITIONALS = ("shard_file",)  # named as in the usage line, not as a flag


REPEATABLE_INPUTS = ("member", "shard_file", "transform", "kd", "train_embeddings")  # one file each, once


def refuse_repeats(args: argparse.Namespace) -> None:
    """A file given twice to a repeatable input flag is named at once: `upgrade-query-model --train-embeddings A A`
    fitted a transformation for 12 s, then said another member's embeddings were missing, naming neither."""
    for name in REPEATABLE_INPUTS:
        seen: dict[str, str] = {}
        values = getattr(args, name, None)  # a list where the flag repeats (`--transform` is one file elsewhere)
        for value in values if isinstance(values, list) else []:
            key = value if is_remote(value) or is_registered(value) else os.path.realpath(value)
            if key in seen:
                same = "" if seen[key] == value else f" (as {seen[key]})"
                raise ValueError(f"{shown_flag(name)} {value}: given twice{same}; give each file once")
            seen[key] = value


def expand_home(args: argparse.Namespace) -> None:
    """A path argument starting with `~` (quoted past the shell) means the home folder, as it does to pyarrow,
    which expands it when it opens a file: checked and read paths must be the same file. An empty one (an unset
    shell variable, `--gallery "$G"`) is refused: it was read as the working folder and named as `.`."""
    for name, value in vars(args).items():
        if isinstance(value, str):
            setattr(args, name, _home(value, name))
        elif isinstance(value, list):
            setattr(args, name, [_home(v, name) if isinstance(v, str) else v for v in value])


def climb_outputs(args: argparse.Namespace) -> None:
    """Each local output's `..` after a missing folder taken lexically (storage.climbed_lexically), once, before any
    check: `--out missing/../y.pt` made `missing/` for the kernel to climb out of (left behind, empty), and its check
    of what the output would replace found no file through the missing folder (a Parquet y.pt was replaced)."""
    from cmce.storage import climbed_lexically

    for name in OUTPUT_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and "://" not in value:
            climbed = str(climbed_lexically(Path(value)))
            if climbed != str(Path(value)):
                setattr(args, name, climbed + ("/" if value.endswith("/") else ""))


def _home(path: str, name: str) -> str:
    if not path.strip():
        raise ValueError(f"{shown_flag(name)} {path!r}: empty; give a value")
    if not path.startswith("~"):
        return path
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):  # ~nosuchuser: it would be a folder of that name in the working folder
        raise ValueError(f"{shown_flag(name)} {path}: no such user's home folder")
    return expanded
