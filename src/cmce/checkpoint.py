"""Checkpoints: plain dicts of tensors and primitives, saved atomically and loaded weights-only
(no pickle of arbitrary objects). The sha256 of the file is the version other artifacts record."""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmce.config import (
    ConfigError,
    DataConfig,
    ModelSpec,
    TransformConfig,
    check_model_name,
    in_interval,
    range_of,
    shown,
)
from cmce.errors import first_line, joined_lines
from cmce.models import MAX_PARAMETERS, EmbeddingNet, check_arch, embedding_net_parameters
from cmce.output_checks import HEAD_BYTES, format_of, not_found
from cmce.storage import NotWritten, atomic_path, file_sha256, open_regular

EMBEDDING_FORMAT = "cmce-embedding-model/1"
TRANSFORM_FORMAT = "cmce-transformation/1"
LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a"  # torch's old format: a pickled magic number, protocol 2


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or of the wrong kind; the message names the file."""


def save_checkpoint(obj: dict[str, Any], path: str | Path,
                    check: Callable[[Path], object] | None = None) -> str:
    """Write `obj` to `path`; `check` (the kind's loader) reads the written file back before it replaces `path`:
    a file its own loader refuses (a 67-character KD student name, an infinite loss in the history) replaced a good
    model and was refused only afterwards."""
    bad = sorted(k for k, v in obj.get("state_dict", {}).items()
                 if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all())
    if bad:  # a diverged run (a learning rate too high, a NaN teacher): refused, not saved as a model
        raise CheckpointError(f"{path}: not written: weights {bad[:3]} are NaN or infinite (training diverged; "
                              "check the learning rate and the inputs)")
    save_torch(obj, path, check)
    return file_sha256(path)


def save_torch(obj: dict[str, Any], path: str | Path, check: Callable[[Path], object] | None = None) -> None:
    """torch.save, written aside and renamed in once `check` accepts the file; a failed write names the file."""
    # through a file handle: torch.save(obj, PATH) stores the file's (random temp) name inside the
    # archive, which would give identical weights a different sha256 (= version) on every save
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as err:  # torch's zip writer reports a short write (a full disk) as "unexpected pos"
                raise NotWritten(f"{path}: not written: {first_line(err)} (is the disk full?)") from None
        if check is not None:
            try:
                check(tmp)
            except CheckpointError as err:
                raise CheckpointError(f"{path}: not written: {str(err).removeprefix(f'{tmp}: ')}") from None


def refuse_diverged(row: dict[str, float], desc: str) -> None:
    """An epoch whose mean loss is NaN or infinite ends the training there, naming it: its weights may still be
    finite (a loss scale of 1e37), and a model with such a history was written, replacing --out, then refused."""
    bad = [f"{key} {value}" for key, value in row.items() if not math.isfinite(value)]
    if bad:
        raise CheckpointError(f"{desc}: epoch {row.get('epoch', '?')}: {', '.join(bad)}: training diverged, nothing "
                              "written (check the learning rate, the loss scale and the inputs)")


# the largest checkpoint a model cmce builds can make: its float32 weights and its classifier (each at most
# MAX_PARAMETERS; a KD student's teacher classifier within the same bound), with room for the history
MAX_CHECKPOINT_BYTES = 2 * MAX_PARAMETERS * 4 + (256 << 20)


def load_checkpoint(path: str | Path, expected_format: str) -> dict[str, Any]:
    return read_checkpoint(path, expected_format)[0]


def read_checkpoint(path: str | Path, expected_format: str) -> tuple[dict[str, Any], str]:
    """A checkpoint and the sha256 of the very bytes it was loaded from: the file is read once. Read twice (torch,
    then the hash), a model replaced in between (an atomic rename) gave one file's weights the other's version:
    `search` answered with model B's weights against model A's index, exit 0."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {not_found(path, 'checkpoint')}")
    if path.is_dir():  # was "not a torch checkpoint file (an ONNX export, say, ...)"
        held = sorted(p.name for p in path.glob("*.pt"))
        raise CheckpointError(f"{path}: is a folder; give a checkpoint file" + (
            f" (it holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''})" if held else ""))
    try:
        with open_regular(path) as f:
            if (size := os.fstat(f.fileno()).st_size) > MAX_CHECKPOINT_BYTES:  # a 20 GB file was read whole first
                raise CheckpointError(f"{path}: a file of {size:,} bytes, more than a checkpoint of the largest model "
                                      f"cmce builds can be ({MAX_CHECKPOINT_BYTES:,}); refused unread")
            data = f.read()
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EISDIR):
            raise CheckpointError(f"{path}: cannot read the checkpoint: {err.strerror or err}") from None
        data = b""  # a folder, pipe or device: no checkpoint
    if format_of(data[:HEAD_BYTES]) != "checkpoint":  # torch saves a zip archive; not ONNX, not Parquet
        raise CheckpointError(f"{path}: not a loadable checkpoint: " + (
            "torch's legacy (pre-1.6) format, which cmce does not read; save it again with torch.save"
            if data[:4] == LEGACY_TORCH_HEAD
            else "not a torch checkpoint file (an ONNX export, say, is for onnxruntime, not for cmce's steps)"))
    _check_archive_end(path, data)
    if (damaged := archive_damage(data)) is not None:
        raise CheckpointError(f"{path}: {damaged}; copy it again from its source")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - garbage input makes the unpickler raise almost anything (KeyError, …)
        raise CheckpointError(f"{path}: {_load_failure(err)}") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a {expected_format} checkpoint, got {got!r}")
    return obj, hashlib.sha256(data).hexdigest()


def archive_damage(data: bytes) -> str | None:
    """What is wrong with the entries of a torch zip archive (its bytes), or None. torch's reader does not check the
    CRC-32 its writer stores with each entry: a flipped bit in a tensor loaded as a changed weight (exit 0; an ONNX
    export "passed" its parity check against the same damaged weights). Structural damage is left to torch.load."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            # torch.save stores every entry as it is: a deflated one is no torch writer's, and 625 KB of it
            # expanded to 1 GB in memory (a decompression bomb); refused before anything is decompressed
            if packed := next((i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED), None):
                return (f"{packed!r} in the checkpoint's archive is stored compressed, which torch.save never does "
                        "(a re-packed file, or a decompression bomb)")
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return None
    if bad is not None:
        return f"damaged: the checksum of {bad!r} in the checkpoint's archive does not match its bytes"
    for info in infos:  # the sha256 every record names covers these bytes too: a flip there was blamed on the index
        local = data[info.header_offset:info.header_offset + 30]  # ("built for another query model") or exported
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return f"damaged: the local header of {info.filename!r} in the checkpoint's archive is not one"
        if not _local_header_agrees(local, info):
            return (f"damaged: the local header of {info.filename!r} disagrees with the checkpoint's archive "
                    "directory")
    return None


def _local_header_agrees(local: bytes, info: Any) -> bool:
    """A local header's modification time and date, CRC-32 and sizes are the directory's; with sizes after the
    data (flag bit 3, as torch writes), its CRC-32 and sizes are 0."""
    y, mo, d, h, mi, sec = info.date_time
    fields = [(local[10:12], (h << 11) | (mi << 5) | (sec // 2)), (local[12:14], ((y - 1980) << 9) | (mo << 5) | d),
              (local[14:18], info.CRC), (local[18:22], info.compress_size), (local[22:26], info.file_size)]
    deferred = bool(info.flag_bits & 0x08)
    return all(int.from_bytes(raw, "little") in ((0, value) if deferred and i >= 2 else (value,))
               for i, (raw, value) in enumerate(fields))


ZIP_END = b"PK\x05\x06"  # the end-of-central-directory record: 22 bytes and the archive comment, then nothing


def _check_archive_end(path: Path, data: bytes) -> None:
    """torch reads a zip archive with bytes appended (a broken copy, a concatenation) as if they were not there,
    so the file's sha256 no longer matched its index and the refusal blamed the index ("built for another query
    model"), or an export went out stamped with a sha256 no artifact has."""
    size = len(data)
    at = data.rfind(ZIP_END, max(0, size - 22 - 65535))
    if at < 0 or at + 22 > size:  # every zip archive ends with one: torch.load said "negative seek value -1405"
        raise CheckpointError(f"{path}: the checkpoint's archive has no end record: truncated (a copy cut short?); "
                              "copy it again from its source")
    end = at + 22 + int.from_bytes(data[at + 20:at + 22], "little")
    if end > size:
        raise CheckpointError(f"{path}: the checkpoint's archive ends {end - size} byte(s) past the file: truncated; "
                              "copy it again from its source")
    if end < size:
        raise CheckpointError(f"{path}: {size - end} byte(s) follow the end of the checkpoint's archive: damaged, or "
                              "something was appended to it; copy it again from its source")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_WEIGHTS_ONLY_REASON = re.compile(r"WeightsUnpickler error:\s*(.+)")


def _load_failure(err: Exception) -> str:
    """torch.load's error as one plain line. Its weights-only refusal runs to a page, with terminal colour codes
    and the advice to load unsafely (which cmce never does): only the reason is kept."""
    text = _ANSI.sub("", str(err))
    refused = _REFUSED_GLOBAL.search(text)
    if refused:  # a whole pickled module (torch.save(net)) or any other object: not a dict of tensors
        return (f"not a cmce checkpoint: it holds pickled objects that a weights-only load refuses "
                f"({refused[1]})")
    reason = _WEIGHTS_ONLY_REASON.search(text)
    line = reason[1].strip()[:200] if reason else first_line(ValueError(text), 200)
    return f"not a loadable checkpoint: {type(err).__name__}: {line}"


SHA256 = re.compile(r"[0-9a-f]{64}")
FieldCheck = tuple[Callable[[Any], bool], str]  # (accepts the value, what it must be)


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _is_history(value: Any) -> bool:
    """Per-epoch rows: {metric name: number}."""
    return isinstance(value, list) and all(
        isinstance(row, dict) and all(isinstance(k, str) and _is_number(v) for k, v in row.items()) for row in value)


TEXT: FieldCheck = (lambda v: isinstance(v, str) and v.strip() != "", "non-empty text")
SHA: FieldCheck = (lambda v: isinstance(v, str) and SHA256.fullmatch(v) is not None,
                   "a sha256 (64 lowercase hex digits)")
POSITIVE: FieldCheck = (lambda v: _is_number(v) and v > 0, "a positive finite number")
HISTORY: FieldCheck = (_is_history, "a list of {name: number} rows")
CHANNELS: FieldCheck = (lambda v: v in (1, 3), "1 or 3 (grey or RGB, what the image decoder gives)")
MAPPING: FieldCheck = (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a mapping")
# fields of the embedding models' `meta` a step reads (records, evaluate's KD students); others are kept as given
META_FIELDS = {"history": HISTORY, "teacher_sha256": SHA, "role": TEXT}


def check_fields(obj: dict[str, Any], checks: dict[str, FieldCheck], path: str | Path, where: str = "field") -> None:
    """Each field of `checks` that `obj` holds is of its type: a crafted or foreign file fails here naming the
    field, not deep inside a step (`unhashable type: 'list'`, `'int' object is not subscriptable`)."""
    for key, (accepts, what) in checks.items():
        if key in obj and not accepts(obj[key]):
            raise CheckpointError(f"{path}: {where} {key!r} must be {what}, got {shown(obj[key])}")


@dataclass
class EmbeddingModel:
    """A loaded embedding model with what is needed to feed it and to name its version."""

    name: str
    arch: str
    net: EmbeddingNet
    classifier: torch.Tensor  # (num_classes, dim), for the cosine head
    scale: float
    in_channels: int
    image_size: int
    embedding_dim: int
    sha256: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""  # the file it was loaded from, to name it in errors

    @property
    def shown(self) -> str:
        return self.path or f"model {self.name!r}"


def save_embedding_model(m: EmbeddingModel, path: str | Path, width: int) -> str:
    obj = {
        "format": EMBEDDING_FORMAT,
        "name": m.name,
        "arch": m.arch,
        "width": width,
        "in_channels": m.in_channels,
        "image_size": m.image_size,
        "embedding_dim": m.embedding_dim,
        "scale": m.scale,
        "classifier": m.classifier.detach().cpu().clone(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in m.net.state_dict().items()},
        "meta": m.meta,
    }
    return save_checkpoint(obj, path, load_embedding_model)


# roles a step taking one accepts: a KD student is a query-architecture copy of a gallery model, made to answer
# queries against its teacher's gallery; as a gallery model (or a teacher) it fitted and trained without a word
ROLES = {"query": ("query", "kd_student"), "gallery": ("gallery",)}


def require_role(model: EmbeddingModel, wanted: str, where: str) -> EmbeddingModel:
    """A model trained as the other kind is refused: a gallery model exported for the edge, or given as the query
    model of a transformation, ran without a word. Checkpoints written before roles ("embedding") pass."""
    role = model.meta.get("role")
    if role in ("query", "gallery", "kd_student") and role not in ROLES[wanted]:
        shown = "KD student" if role == "kd_student" else f"{role} model"
        raise CheckpointError(f"{where}: a {shown} {model.name!r} (its checkpoint records the role it "
                              f"was trained for); a {wanted} model is expected")
    return model


def require_classes(model: EmbeddingModel, labels: np.ndarray, where: str) -> None:
    """The frozen classifier the transformation's CE term scores against must hold a usable row for every train
    label: too few rows failed deep in torch (`Target 9 is out of bounds`), all-zero rows made the CE term a constant
    (ln C) that trained nothing, exit 0."""
    rows = model.classifier.shape[0]
    if len(labels) and int(labels.max()) >= rows:
        raise CheckpointError(f"{where}: its classifier has {rows} classes, but the train split has labels up to "
                              f"{int(labels.max())}: a query model of another dataset")
    used = np.unique(labels)
    zero = used[(model.classifier.detach().float()[torch.as_tensor(used)].norm(dim=1) == 0).numpy()]
    if len(zero):
        raise CheckpointError(f"{where}: field 'classifier' has all-zero rows for {len(zero)} train class(es) "
                              f"(first: label {int(zero[0])}); they cannot be scored")


def require_keys(obj: dict[str, Any], keys: list[str], path: str | Path) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks field(s) {missing}")


def check_sizes(obj: dict[str, Any], intervals: dict[str, str], path: str | Path) -> None:
    """Integer fields a network is built from, inside the ranges a config may give them: a crafted checkpoint
    must not make the loader allocate without bound."""
    for key, interval in intervals.items():
        value = obj[key]
        if type(value) is not int or not in_interval(value, interval):
            raise CheckpointError(f"{path}: field {key!r} must be an integer in {interval}, got {shown(value)}")


BATCHNORM_STATS = ("running_var", "num_batches_tracked")  # last part of a BatchNorm layer's state_dict keys


def check_weights(obj: dict[str, Any], path: str | Path, extra: tuple[str, ...] = ()) -> None:
    """The state_dict (and the `extra` tensor fields): dense float tensors, finite. A crafted or diverged file
    otherwise fails deep inside torch (a many-line message naming no file) or searches with NaN vectors."""
    state = obj["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: field 'state_dict' is a {type(state).__name__}, not a mapping")
    fields = [*((f"state_dict[{k!r}]", k, v) for k, v in state.items()), *((f, f, obj[f]) for f in extra)]
    for key, name, value in fields:
        if not torch.is_tensor(value) or value.layout != torch.strided:
            what = type(value).__name__ if not torch.is_tensor(value) else f"{value.layout} tensor"
            raise CheckpointError(f"{path}: {key} is a {what}, not a dense tensor")
        if value.is_meta:  # a shape without data (saved from a model built on the meta device)
            raise CheckpointError(f"{path}: {key} is a meta tensor: a shape with no values")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: {key} holds NaN or infinite values")
        if str(name).rsplit(".", 1)[-1] in BATCHNORM_STATS and bool((value < 0).any()):
            # a variance below 0 makes BatchNorm take the root of a negative number: every embedding NaN, found
            # only after the work (export's parity pass, an evaluation) and naming neither file nor tensor
            raise CheckpointError(f"{path}: {key} holds negative values (min {float(value.min()):.4g}): BatchNorm "
                                  "statistics (a variance, a batch count) are never negative")


EMBEDDING_SIZES = {"width": range_of(ModelSpec, "width"), "embedding_dim": range_of(ModelSpec, "embedding_dim"),
                   "image_size": range_of(DataConfig, "image_size"), "in_channels": "[1, 3]"}
TRANSFORM_SIZES = {"in_dim": range_of(ModelSpec, "embedding_dim"), "out_dim": range_of(ModelSpec, "embedding_dim"),
                   "hidden_dim": range_of(TransformConfig, "hidden_dim"), "depth": range_of(TransformConfig, "depth")}


def load_embedding_model(path: str | Path) -> EmbeddingModel:
    obj, sha256 = read_checkpoint(path, EMBEDDING_FORMAT)
    require_keys(obj, ["name", "arch", "width", "in_channels", "image_size", "embedding_dim", "scale", "classifier",
                       "state_dict"], path)
    check_sizes(obj, EMBEDDING_SIZES, path)
    check_fields(obj, {"arch": TEXT, "scale": POSITIVE, "meta": MAPPING, "in_channels": CHANNELS}, path)
    check_fields(obj.get("meta", {}), META_FIELDS, path, "field 'meta'")
    try:
        check_model_name(obj["name"], "field 'name'")
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    try:
        check_arch(obj["arch"])
    except KeyError as err:  # an architecture this version does not know
        raise CheckpointError(f"{path}: field 'arch': {err.args[0]}") from None
    size = embedding_net_parameters(obj["arch"], obj["in_channels"], obj["embedding_dim"], obj["width"])
    if size > MAX_PARAMETERS:  # each size in its range, together more than any model cmce builds
        raise CheckpointError(f"{path}: fields 'width' {obj['width']} and 'embedding_dim' {obj['embedding_dim']} "
                              f"(arch {obj['arch']!r}) imply a network of {size:,} parameters; the limit is "
                              f"{MAX_PARAMETERS:,}")
    check_weights(obj, path, ("classifier",))
    classifier = obj["classifier"]
    if not classifier.is_floating_point():
        raise CheckpointError(f"{path}: field 'classifier' is a {classifier.dtype} tensor, not a floating-point one")
    # the checkpoint's weights replace any pretrained initialisation: skip reading it
    net = EmbeddingNet(obj["arch"], obj["in_channels"], obj["embedding_dim"], obj["width"], load_pretrained=False)
    if classifier.ndim != 2 or classifier.shape[0] < 1 or classifier.shape[1] != obj["embedding_dim"]:
        raise CheckpointError(f"{path}: field 'classifier' has shape {tuple(classifier.shape)}, expected "
                              f"(classes >= 1, embedding_dim {obj['embedding_dim']})")
    try:
        net.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match architecture {obj['arch']!r}: {joined_lines(err)}"
                              ) from None
    net.eval()
    return EmbeddingModel(
        name=obj["name"],
        arch=obj["arch"],
        net=net,
        classifier=obj["classifier"],
        scale=float(obj["scale"]),
        in_channels=obj["in_channels"],
        image_size=obj["image_size"],
        embedding_dim=obj["embedding_dim"],
        sha256=sha256,
        meta=obj.get("meta", {}),
        path=str(path),
    )
