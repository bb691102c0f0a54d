"""Dataset importers (Fashion-MNIST, sklearn digits, ImageFolder) → one dataset Parquet file,
and the readers that decode it in memory (training) or in streamed row batches (embedding).

Dataset Parquet columns: id (string), label (int32), class_name (string), split ("train"/"test"),
image (PNG bytes). Schema metadata key ``cmce`` holds JSON: source, protocol, classes.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from cmce.config import DataConfig
from cmce.storage import atomic_path

log = logging.getLogger(__name__)

DATASET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("split", pa.string()),
        ("image", pa.binary()),
    ]
)
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B", "I;16L"}


class DataError(ValueError):
    """Bad input data; the message names the file and the offending field or item."""


@dataclass
class RawImages:
    """What an importer returns: encoded images with labels, and the official split if any."""

    ids: list[str]
    labels: np.ndarray  # int
    classes: list[str]  # class_name of label i
    images: list[bytes]  # PNG bytes
    official_split: list[str] | None = None


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxW (grey) or HxWxC array → PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------- importers
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read IDX file: {err}") from None
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, got {body.size}")
    return body.reshape(dims)


def _find_fashion_dir(path: Path) -> Path:
    for candidate in (path, path / "usr/share/datasets/fashion-mnist"):
        if (candidate / "train-images-idx3-ubyte.gz").exists():
            return candidate
    raise DataError(f"{path}: no Fashion-MNIST IDX files (train-images-idx3-ubyte.gz) found")


def import_fashion_mnist(path: str | Path) -> RawImages:
    root = _find_fashion_dir(Path(path))
    ids, labels, images, split = [], [], [], []
    for part, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        y = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        if len(x) != len(y):
            raise DataError(f"{root}: {prefix} has {len(x)} images but {len(y)} labels")
        ids += [f"fmnist-{prefix}-{i:05d}" for i in range(len(x))]
        labels.append(y.astype(np.int64))
        images += [encode_png(img) for img in x]
        split += [part] * len(x)
    return RawImages(ids, np.concatenate(labels), list(FASHION_CLASSES), images, split)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8), d.target.astype(np.int64)


def import_digits(raw_dir: str | Path | None = None) -> RawImages:
    """sklearn's 8x8 digits, from `raw_dir/digits.npz` when given (a fetched copy), else from sklearn."""
    if raw_dir is not None:
        path = Path(raw_dir) / "digits.npz"
        try:
            with np.load(path, allow_pickle=False) as f:
                x, y = f["images"], f["labels"]
        except (OSError, KeyError, ValueError) as err:
            raise DataError(f"{path}: cannot read the digits arrays: {err}") from None
    else:
        x, y = _digits_arrays()
    ids = [f"digits-{i:04d}" for i in range(len(x))]
    return RawImages(ids, y, [str(c) for c in range(10)], [encode_png(i) for i in x])


def fetch_source(cfg: DataConfig, dest: str | Path) -> Path:
    """Materialise the configured packaged source as raw files under `dest` (a DVC-trackable folder)."""
    dest = Path(dest)
    if cfg.source == "fashion_mnist":
        return fetch_fashion_mnist(dest)
    if cfg.source == "digits":
        dest.mkdir(parents=True, exist_ok=True)
        x, y = _digits_arrays()
        with atomic_path(dest / "digits.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=x, labels=y)
        return dest
    raise DataError(f"data.source={cfg.source!r}: an ImageFolder is read from data.path; there is nothing to fetch")


def _inside(path: Path, real_root: Path) -> None:
    """Refuse a file or class folder that resolves outside the data root (a symlink pointing elsewhere):
    the dataset must be exactly what lies under data.path."""
    real = path.resolve()
    if not real.is_relative_to(real_root):
        raise DataError(f"{path}: resolves to {real}, outside the ImageFolder root {real_root}")


def import_imagefolder(path: str | Path) -> RawImages:
    """root/<class>/<image>; or root/train/<class>/… + root/test/<class>/… for an official split."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder root is not a directory")
    real_root = root.resolve()
    parts = [("train", root / "train"), ("test", root / "test")]
    has_split = all(p.is_dir() for _, p in parts)
    if not has_split:
        parts = [("", root)]
    for _, base in parts:
        _inside(base, real_root)
    classes = sorted({c.name for _, p in parts for c in p.iterdir() if c.is_dir()})
    if not classes:
        raise DataError(f"{root}: no class folders found")
    index = {c: i for i, c in enumerate(classes)}
    ids, labels, images, split = [], [], [], []
    for part, base in parts:
        for cls in classes:
            folder = base / cls
            if not folder.is_dir():
                continue
            _inside(folder, real_root)
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                    continue
                _inside(f, real_root)
                images.append(_to_png(f.read_bytes(), f))
                rel = f.relative_to(root).as_posix()
                ids.append(rel)
                labels.append(index[cls])
                split.append(part)
    if not ids:
        raise DataError(f"{root}: no images found under the class folders")
    counts = np.bincount(np.asarray(labels), minlength=len(classes))
    for cls in (c for c, n in zip(classes, counts, strict=True) if n == 1):
        # kept: the heldout protocol puts it in train; as a test image it is a lone query (see metrics.py)
        log.warning("%s: class %r has a single image; it cannot be both query and gallery", root, cls)
    return RawImages(ids, np.asarray(labels), classes, images, split if has_split else None)


# modes PNG cannot store but that have a defined 8-bit colour conversion
_TO_RGB_MODES = {"CMYK", "YCbCr", "LAB", "HSV"}


def _to_png(data: bytes, origin: Path | str) -> bytes:
    """Re-encode an imported image as PNG, keeping 16-bit grey; modes without a defined intensity
    scale (32-bit float, 32-bit integers beyond 16 bits) are refused rather than guessed."""
    img = open_image(data, origin)
    if img.mode in _TO_RGB_MODES:
        img = img.convert("RGB")
    elif img.mode == "I":  # 32-bit integer, e.g. a 16-bit TIFF or PNG some readers widen
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"{origin}: 32-bit integer image with values outside 0..65535; convert it to 8 or 16 bit")
        img = Image.fromarray(arr.astype(np.uint16))
    elif img.mode not in _PNG_MODES:
        raise DataError(f"{origin}: unsupported image mode {img.mode!r}; convert it to 8- or 16-bit grey or RGB(A)")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def fetch_fashion_mnist(dest: str | Path) -> Path:
    """Unpack Debian's dataset-fashion-mnist package into `dest` (nothing is downloaded from a hub).

    Returns the folder holding the IDX files; does nothing when they are already there.
    """
    dest = Path(dest)
    try:
        return _find_fashion_dir(dest)
    except DataError:
        pass
    if dest.exists() and any(dest.iterdir()):
        # never delete or mix into a folder we did not create
        raise DataError(f"{dest}: exists and is not empty, but holds no Fashion-MNIST IDX files; "
                        "point data.path at an empty or missing folder")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DataError(f"fetching Fashion-MNIST needs {tool} (Debian); or set data.path to the IDX files")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["apt-get", "download", "dataset-fashion-mnist"]
        if subprocess.run(cmd, cwd=tmp, capture_output=True).returncode != 0:
            # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if res.returncode != 0:
                raise DataError(f"apt-get download dataset-fashion-mnist failed: {res.stderr.strip()}")
        deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
        unpacked = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        src = _find_fashion_dir(unpacked)
        staging = Path(tempfile.mkdtemp(prefix=".fmnist.", dir=dest.parent if dest.parent.exists() else None))
        for f in src.iterdir():
            shutil.copy2(f, staging / f.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        shutil.move(str(staging), dest)
    log.info("Fashion-MNIST unpacked into %s", dest)
    return dest


# ---------------------------------------------------------------- protocols
def assign_splits(raw: RawImages, cfg: DataConfig, seed: int) -> np.ndarray:
    """Return the split of every image ("train", "test" or "" for dropped) under the protocol."""
    rng = np.random.default_rng(seed)
    labels = raw.labels
    n_classes = len(raw.classes)
    split = np.full(len(labels), "", dtype=object)
    if cfg.protocol == "disjoint":
        # first half of the classes train, the rest test (the deep-metric-learning standard)
        cut = n_classes // 2
        if cut == 0:
            raise DataError("disjoint protocol needs at least 2 classes")
        split[labels < cut] = "train"
        split[labels >= cut] = "test"
    elif raw.official_split is not None:
        split[:] = raw.official_split
    else:
        for c in range(n_classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            n_test = int(round(len(idx) * cfg.heldout_fraction)) if len(idx) > 1 else 0
            split[idx[:n_test]] = "test"
            split[idx[n_test:]] = "train"
    for part, cap in (("train", cfg.max_train_per_class), ("test", cfg.max_test_per_class)):
        if cap is None:
            continue
        for c in range(n_classes):
            idx = np.flatnonzero((labels == c) & (split == part))
            if len(idx) > cap:
                split[rng.choice(idx, len(idx) - cap, replace=False)] = ""
    return split


def prepare_dataset(cfg: DataConfig, out: str | Path, seed: int = 0, raw_dir: str | Path | None = None) -> Path:
    """Import the configured source (from `raw_dir` when given, see fetch_source), apply the protocol
    and write the dataset Parquet atomically."""
    if cfg.source == "digits":
        raw = import_digits(raw_dir)
    elif cfg.source == "fashion_mnist":
        if raw_dir is not None:
            raw = import_fashion_mnist(raw_dir)
        elif not cfg.path:
            raise DataError("data.path: Fashion-MNIST needs a folder for its IDX files")
        else:
            raw = import_fashion_mnist(fetch_fashion_mnist(cfg.path))
    else:
        if not cfg.path:
            raise DataError("data.path: imagefolder needs a root folder")
        raw = import_imagefolder(cfg.path)
    split = assign_splits(raw, cfg, seed)
    keep = np.flatnonzero(split != "")
    for part in ("train", "test"):
        if not np.any(split[keep] == part):
            where = cfg.path if cfg.source == "imagefolder" else f"data.source={cfg.source}"
            cap = f", data.max_{part}_per_class={getattr(cfg, f'max_{part}_per_class')}"
            raise DataError(f"{where}: the {cfg.protocol} protocol{cap} leaves the '{part}' split empty")
    labels = raw.labels[keep].astype(np.int32)
    table = pa.table(
        {
            "id": [raw.ids[i] for i in keep],
            "label": labels,
            "class_name": [raw.classes[label] for label in labels],
            "split": list(split[keep]),
            "image": [raw.images[i] for i in keep],
        },
        schema=DATASET_SCHEMA,
    )
    meta = {"source": cfg.source, "protocol": cfg.protocol, "classes": raw.classes, "seed": seed}
    table = table.replace_schema_metadata({"cmce": json.dumps(meta)})
    check_unique_ids(table.column("id").to_pylist(), str(out))
    out = Path(out)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, row_group_size=4096)
    counts = {p: int(np.sum(split[keep] == p)) for p in ("train", "test")}
    log.info("wrote %s: %s images (%s)", out, len(keep), counts)
    return out


def check_unique_ids(ids: list[str], where: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise DataError(f"{where}: duplicate id {i!r}")
        seen.add(i)


# ---------------------------------------------------------------- readers
def open_image(data: bytes, origin: Path | str) -> Image.Image:
    if not data:
        raise DataError(f"{origin}: empty (zero-byte) image")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError as err:
        raise DataError(f"{origin}: refused, too many pixels: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{origin}: corrupt or unreadable image: {err}") from None
    return img


def decode_image(data: bytes, channels: int, size: int, origin: str) -> np.ndarray:
    """PNG/JPEG bytes → uint8 CxHxW; converts any mode (grey, RGBA on white, 16-bit) and resizes."""
    img = open_image(data, origin)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: a fixed scale, so a dark image is not brightened relative to a bright one
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def open_dataset(path: str | Path) -> pq.ParquetFile:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset file not found")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None
    names = set(pf.schema_arrow.names)
    for col in DATASET_SCHEMA:
        if col.name not in names:
            raise DataError(f"{path}: missing column '{col.name}'")
    for col in DATASET_SCHEMA:
        actual = pf.schema_arrow.field(col.name).type
        if actual != col.type and not (col.type == pa.binary() and actual == pa.large_binary()):
            raise DataError(f"{path}: column '{col.name}' has type {actual}, expected {col.type}")
    return pf


def dataset_info(path: str | Path) -> dict:
    pf = open_dataset(path)
    meta = (pf.schema_arrow.metadata or {}).get(b"cmce")
    return json.loads(meta) if meta else {}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NxCxHxW → float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


@dataclass
class SplitArrays:
    ids: list[str]
    labels: np.ndarray
    images: torch.Tensor  # uint8 NxCxHxW


def iter_split_batches(
    path: str | Path, split: str, batch_size: int, channels: int, size: int
) -> Iterator[SplitArrays]:
    """Stream one split in row batches; memory is bounded by the batch, not the file."""
    pf = open_dataset(path)
    n = 0
    seen: set[str] = set()  # ids key every output row: a duplicate would silently alias two images
    for batch in pf.iter_batches(batch_size=batch_size, columns=["id", "label", "split", "image"]):
        for col in ("id", "label", "split"):
            if batch.column(col).null_count:
                raise DataError(f"{path}: column '{col}' has {batch.column(col).null_count} null values")
        mask = np.asarray(batch.column("split").to_numpy(zero_copy_only=False) == split)
        if not mask.any():
            continue
        ids = [i for i, m in zip(batch.column("id").to_pylist(), mask, strict=True) if m]
        for i in ids:
            if i in seen:
                raise DataError(f"{path}: split '{split}' has duplicate id {i!r}")
            seen.add(i)
        labels = batch.column("label").to_numpy()[mask]
        if labels.size and labels.min() < 0:
            raise DataError(f"{path}: column 'label' has a negative value {int(labels.min())}")
        blobs = [b for b, m in zip(batch.column("image").to_pylist(), mask, strict=True) if m]
        imgs = np.stack([decode_image(b, channels, size, f"{path} (id {i})") for b, i in zip(blobs, ids, strict=True)])
        n += len(ids)
        yield SplitArrays(ids, labels.astype(np.int64), torch.from_numpy(imgs))
    if n == 0:
        raise DataError(f"{path}: split '{split}' is empty")


def load_split(path: str | Path, split: str, channels: int, size: int) -> SplitArrays:
    parts = list(iter_split_batches(path, split, 4096, channels, size))
    ids = [i for p in parts for i in p.ids]  # unique: iter_split_batches checks
    return SplitArrays(ids, np.concatenate([p.labels for p in parts]), torch.cat([p.images for p in parts]))
