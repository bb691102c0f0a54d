"""sklearn's 8x8 digits (1,797 images): the tiny source of the tests."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from cmce.data.codec import check_image_count, check_pixel_count, encode_png
from cmce.data.schema import DataError, RawImages
from cmce.storage import atomic_path, open_regular, temp_pattern

DIGIT_CLASSES = [str(c) for c in range(10)]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8), d.target.astype(np.int64)


def read_digits_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of a fetched digits.npz, checked: a damaged or edited copy fails here, naming the file,
    not later as a PIL error or a silently dropped image."""
    try:
        with open_regular(path) as raw:  # a device or pipe never reaches np.load
            f = np.load(raw, allow_pickle=False)
            if not isinstance(f, np.lib.npyio.NpzFile):  # a .npy file: one bare array
                raise DataError(f"{path}: not a .npz archive of 'images' and 'labels' arrays")
            with f:
                _check_images_header(f, path)  # before f["images"] decompresses the array whole
                x, y = f["images"], f["labels"]
    except DataError:
        raise
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise DataError(f"{path}: cannot read the digits arrays: {reason}") from None
    if x.ndim != 3 or y.ndim != 1:
        raise DataError(f"{path}: 'images' has shape {x.shape} and 'labels' {y.shape}; expected N×H×W and N")
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    if not (np.issubdtype(x.dtype, np.integer) and (x.size == 0 or 0 <= x.min() <= x.max() <= 255)):
        shown = f", values {x.min()}..{x.max()}" if x.size and np.issubdtype(x.dtype, np.number) else ""
        raise DataError(f"{path}: 'images' has dtype {x.dtype}{shown}; expected uint8 pixels 0..255")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'labels' has dtype {y.dtype}; expected integer class numbers")
    outside = np.flatnonzero((y < 0) | (y >= len(DIGIT_CLASSES)))
    if len(outside):  # the split would skip the image without a word
        row = int(outside[0])
        raise DataError(f"{path}: labels[{row}] is {int(y[row])}; digits labels are 0..{len(DIGIT_CLASSES) - 1}")
    return x.astype(np.uint8), y.astype(np.int64)


MAX_VALUES = 1 << 30  # pixels a digits.npz may hold: sklearn's holds 115,008


def _check_images_header(f: np.lib.npyio.NpzFile, path: Path) -> None:
    """The shape of 'images' from its .npy header, refused past the pixel limit or MAX_VALUES before it is read: a
    389 kB archive of 10,000 × 10,000 zeros was decompressed whole (1.2 GB) and imported past data.max_image_pixels."""
    with f.zip.open("images.npy") as member:  # KeyError when absent: named by the caller
        version = np.lib.format.read_magic(member)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = reader(member)
    if len(shape) == 3:  # another rank is refused, shape named, once read
        if not (shape[1] and shape[2]):
            raise DataError(f"{path}: 'images' of {shape[1]} × {shape[2]} pixels")
        check_pixel_count(shape[2], shape[1], path)
        check_image_count(shape[0], path)
    if math.prod(shape) > MAX_VALUES:
        raise DataError(f"{path}: 'images' has shape {shape}: {math.prod(shape):,} values, over {MAX_VALUES:,}")


def import_digits(raw_dir: str | Path | None = None) -> RawImages:
    """sklearn's 8x8 digits, from `raw_dir/digits.npz` when given (a fetched copy), else from sklearn."""
    x, y = read_digits_npz(Path(raw_dir) / "digits.npz") if raw_dir is not None else digits_arrays()
    ids = [f"digits-{i:04d}" for i in range(len(x))]
    return RawImages(ids, y, list(DIGIT_CLASSES), [encode_png(i) for i in x])


def fetch_digits(dest: str | Path) -> Path:
    """sklearn's digits as `dest/digits.npz` (the folder made by the write, and taken back if it fails); a folder
    holding anything else is refused, as the other sources refuse one: its own digits.npz was replaced unasked."""
    dest = Path(dest)
    # digits.npz, and the temporary of a killed fetch (cleaned by the next write); a look-alike is the user's
    temporary = temp_pattern(dest / "digits.npz")
    if dest.is_dir() and (other := sorted(p.name for p in dest.iterdir()
                                          if p.name != "digits.npz" and not temporary.fullmatch(p.name))):
        raise DataError(f"{dest}: exists and holds other files ({', '.join(other[:5])}); give an empty or missing "
                        "folder (data.path, or fetch-data's --out)")
    if (dest / "digits.npz").exists():  # a file of ours is replaced; anything else named so is refused
        try:
            read_digits_npz(dest / "digits.npz")
        except DataError as err:
            raise DataError(f"{err}; it is not a digits.npz that fetch-data wrote: move it away, or give another "
                            "folder") from None
    x, y = digits_arrays()
    with atomic_path(dest / "digits.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=x, labels=y)
    return dest
