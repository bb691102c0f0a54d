"""Fashion-MNIST from Debian's dataset-fashion-mnist package (gzipped IDX files; nothing from a hub)."""

from __future__ import annotations

import gzip
import logging
import math
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np

from cmce.data.codec import check_image_count, check_pixel_count, encode_png
from cmce.data.schema import DataError, RawImages
from cmce.storage import make_parents, open_regular, remove_if_empty

log = logging.getLogger(__name__)
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


MAX_IDX_VALUES = 1 << 30  # values one IDX file may hold: Fashion-MNIST's largest holds 47 million
IDX_FILES = [f"{prefix}-{kind}" for prefix in ("train", "t10k")
             for kind in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz")]


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array of `ndim` dimensions (3: images, 1: labels), its header checked before its body is
    read: a 389 kB gzip declaring 20,000 × 20,000 images was decompressed whole (1.2 GB) and imported past
    data.max_image_pixels, a header of another rank failed in numpy or PIL (tracebacks), a pipe blocked for ever."""
    try:
        with open_regular(path) as raw, (gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw) as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: truncated IDX header")
            zero, dtype_code, rank = struct.unpack(">HBB", head)
            if zero != 0 or dtype_code != 0x08:
                raise DataError(f"{path}: not an unsigned-byte IDX file")
            if rank != ndim:
                raise DataError(f"{path}: an IDX array of {rank} dimension(s); expected {ndim} "
                                f"({'images: count × height × width' if ndim == 3 else 'labels: count'})")
            packed = f.read(4 * rank)
            if len(packed) < 4 * rank:
                raise DataError(f"{path}: truncated IDX header")
            dims = struct.unpack(f">{rank}I", packed)
            if ndim == 3:
                if not (dims[1] and dims[2]):
                    raise DataError(f"{path}: images of {dims[1]} × {dims[2]} pixels")
                check_pixel_count(dims[2], dims[1], path)
                check_image_count(dims[0], path)
                if not dims[0]:  # its split came out empty, blamed on data.heldout_fraction, which it never reads
                    raise DataError(f"{path}: holds 0 images")
            total = math.prod(dims)  # Python ints: numpy's product wrapped (65536⁴·16 "expected 0 values")
            if total > MAX_IDX_VALUES:
                raise DataError(f"{path}: shape {dims} holds {total:,} values, over {MAX_IDX_VALUES:,}")
            body = f.read(total + 1)  # one more: a longer body is refused, not cut
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; a damaged stream zlib's
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise DataError(f"{path}: cannot read IDX file: {reason}") from None
    if len(body) != total:
        got = "more" if len(body) > total else len(body)
        raise DataError(f"{path}: expected {total} values for shape {dims}, got {got}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def find_fashion_dir(path: Path) -> Path:
    for candidate in (path, path / "usr/share/datasets/fashion-mnist"):
        if (candidate / "train-images-idx3-ubyte.gz").exists():
            return candidate
    raise DataError(f"{path}: no Fashion-MNIST IDX files (train-images-idx3-ubyte.gz) found")


def import_fashion_mnist(path: str | Path) -> RawImages:
    root = find_fashion_dir(Path(path))
    ids, labels, images, split = [], [], [], []
    for part, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 3)
        y = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 1)
        if len(x) != len(y):
            raise DataError(f"{root}: {prefix} has {len(x)} images but {len(y)} labels")
        ids += [f"fmnist-{prefix}-{i:05d}" for i in range(len(x))]
        labels.append(y.astype(np.int64))
        images += [encode_png(img) for img in x]
        split += [part] * len(x)
    return RawImages(ids, np.concatenate(labels), list(FASHION_CLASSES), images, split)


APT_TIMEOUT_S = 900  # a mirror that stops answering held fetch-data for ever


def _apt(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(f"`{' '.join(cmd)}` did not finish within {APT_TIMEOUT_S} s; is the package mirror "
                        "reachable? Or set data.path to the IDX files") from None


def fetch_fashion_mnist(dest: str | Path) -> Path:
    """Unpack Debian's dataset-fashion-mnist package into `dest` (nothing is downloaded from a hub).

    Returns the folder holding the IDX files; does nothing when they are already there.
    """
    dest = Path(dest)
    try:
        return find_fashion_dir(dest)
    except DataError:
        pass
    if dest.exists() and any(dest.iterdir()):
        # never delete or mix into a folder we did not create
        raise DataError(f"{dest}: exists and is not empty, but holds no Fashion-MNIST IDX files; "
                        "give an empty or missing folder (data.path, or fetch-data's --out)")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DataError(f"fetching Fashion-MNIST needs {tool} (Debian); or set data.path to the IDX files")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["apt-get", "download", "dataset-fashion-mnist"]
        if _apt(cmd, tmp).returncode != 0:
            # a fresh machine has no package lists yet: the machine's lists are refreshed, said so
            log.warning("apt-get download dataset-fashion-mnist failed; refreshing the package lists (apt-get update)")
            _apt(["apt-get", "update", "-qq"], tmp)
            res = _apt(cmd, tmp)
            if res.returncode != 0:
                raise DataError(f"apt-get download dataset-fashion-mnist failed: {res.stderr.strip()}")
        deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"), None)
        if deb is None:
            raise DataError("apt-get download dataset-fashion-mnist wrote no dataset-fashion-mnist_*.deb")
        unpacked = Path(tmp) / "x"
        res = subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], capture_output=True, text=True)
        if res.returncode != 0:  # a damaged package, a full disk: was a CalledProcessError traceback
            said = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
            raise DataError(f"dpkg-deb could not unpack {deb.name}: {said}")
        src = find_fashion_dir(unpacked)
        # staged beside dest and renamed in, removed whatever fails or stops the copy (a half-copied .fmnist.* was
        # left there); only the four IDX files, as regular files, go over
        made = make_parents(dest)
        staging = Path(tempfile.mkdtemp(prefix=".fmnist.", dir=dest.parent))
        try:
            for name in IDX_FILES:
                if not (src / name).is_file() or (src / name).is_symlink():
                    raise DataError(f"{deb.name}: holds no regular file {name}")
                shutil.copyfile(src / name, staging / name)
            if dest.exists():
                dest.rmdir()  # empty (checked above)
            staging.rename(dest)
            made = []
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            remove_if_empty(made)
    log.info("Fashion-MNIST unpacked into %s", dest)
    return dest
