"""sklearn's 8x8 digits (1,797 images): the tiny source of the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmce.data.codec import encode_png
from cmce.data.schema import DataError, RawImages
from cmce.storage import atomic_path


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
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
        x, y = digits_arrays()
    ids = [f"digits-{i:04d}" for i in range(len(x))]
    return RawImages(ids, y, [str(c) for c in range(10)], [encode_png(i) for i in x])


def fetch_digits(dest: str | Path) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    x, y = digits_arrays()
    with atomic_path(dest / "digits.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=x, labels=y)
    return dest
