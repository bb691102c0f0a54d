"""Fashion-MNIST from Debian's dataset-fashion-mnist package (gzipped IDX files; nothing from a hub)."""

from __future__ import annotations

import gzip
import logging
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from cmce.data.codec import encode_png
from cmce.data.schema import DataError, RawImages

log = logging.getLogger(__name__)
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
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


def find_fashion_dir(path: Path) -> Path:
    for candidate in (path, path / "usr/share/datasets/fashion-mnist"):
        if (candidate / "train-images-idx3-ubyte.gz").exists():
            return candidate
    raise DataError(f"{path}: no Fashion-MNIST IDX files (train-images-idx3-ubyte.gz) found")


def import_fashion_mnist(path: str | Path) -> RawImages:
    root = find_fashion_dir(Path(path))
    ids, labels, images, split = [], [], [], []
    for part, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        y = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        if len(x) != len(y):
            raise DataError(f"{root}: {prefix} has {len(x)} images but {len(y)} labels")
        ids += [f"fmnist-{prefix}-{i:05d}" for i in range(len(x))]
        labels.append(y.astype(np.int64))
        images += [encode_png(img) for img in x]
        split += [part] * len(x)
    return RawImages(ids, np.concatenate(labels), list(FASHION_CLASSES), images, split)


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
        if subprocess.run(cmd, cwd=tmp, capture_output=True).returncode != 0:
            # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if res.returncode != 0:
                raise DataError(f"apt-get download dataset-fashion-mnist failed: {res.stderr.strip()}")
        deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
        unpacked = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        src = find_fashion_dir(unpacked)
        staging = Path(tempfile.mkdtemp(prefix=".fmnist.", dir=dest.parent if dest.parent.exists() else None))
        for f in src.iterdir():
            shutil.copy2(f, staging / f.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        shutil.move(str(staging), dest)
    log.info("Fashion-MNIST unpacked into %s", dest)
    return dest
