"""The deep-metric-learning benchmarks from a local copy in their standard layouts (data.path is the
folder named below, or its parent):

CUB-200-2011 (`CUB_200_2011/`): images.txt (`<image_id> <path>`), image_class_labels.txt
    (`<image_id> <class_id>`), classes.txt (`<class_id> <name>`), images/<path>; optional
    train_test_split.txt (`<image_id> <is_training_image>`), the official split of the same classes.
Cars196 (`cars196/`: `cars_annos.mat` next to `car_ims/`): the MATLAB file of the Stanford Cars release,
    struct array `annotations` (relative_im_path, class 1..196, test 0/1, bounding boxes) and cell array
    `class_names`, read with scipy.io (MATLAB v5, as distributed); `test` is the official split of the
    same classes (heldout protocol).
Stanford Online Products (`Stanford_Online_Products/`): Ebay_train.txt and Ebay_test.txt, a header line
    then `<image_id> <class_id> <super_class_id> <path>`, images at <path>.

Class-disjoint split as in the literature (Oh Song et al. 2016 and after), the source's official class
split (data.disjoint_by=official, what `auto` picks): CUB and Cars the first half of the classes by class id
train (100 / 98), the second half test; SOP the classes of Ebay_train.txt (1..11,318) train and those of
Ebay_test.txt test. Images are used whole (bounding boxes ignored, as in that protocol). JPEG files are kept
byte for byte when RGB or grey; anything else is re-encoded as PNG.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cmce.data.codec import open_image, read_image_file, to_png
from cmce.data.schema import DataError, RawImages
from cmce.importers import inside_root
from cmce.storage import TooLarge, open_regular, read_regular


def _root(path: str | Path, marker: str, folder: str) -> Path:
    """`path` itself or `path/folder`, whichever holds `marker`."""
    path = Path(path)
    for candidate in (path, path / folder):
        if (candidate / marker).is_file():
            return candidate
    raise DataError(f"{path}: no {marker} here or in {path / folder}; expected the standard {folder} layout")


MAX_INDEX_BYTES = 64 << 20  # an index file (images.txt, Ebay_*.txt) lists paths: SOP's largest is 5 MB


def _rows(path: Path, fields: list[str], header: bool = False) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a whitespace-separated index file; blank lines skipped."""
    try:  # a regular file of bounded size: a pipe named like an index file blocked the import for ever
        text = read_regular(path, MAX_INDEX_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, TooLarge) as err:
        raise DataError(f"{path}: not readable: {err}") from None
    lines = text.splitlines()
    if header:
        if not lines or lines[0].split() != fields:
            raise DataError(f"{path}:1: expected the header line {' '.join(fields)!r}")
    for number, line in enumerate(lines, start=1):
        if (header and number == 1) or not line.strip():
            continue
        parts = line.split()
        if len(parts) != len(fields):
            raise DataError(f"{path}:{number}: expected {len(fields)} fields ({' '.join(fields)}), got {line!r}")
        yield number, parts


def _int(value: str, path: Path, number: int, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}:{number}: {name} {value!r} is not an integer") from None


def _image(root: Path, real_root: Path, rel: str, where: str, seen: dict[tuple[int, int], str]) -> bytes:
    """The image `rel` lists (`where`); `seen`: (device, inode) → where each file read so far was listed, so that one
    file listed twice (`cls/./x.jpg`, a link) is refused, not read as two images of two classes or splits."""
    f = root / rel
    if not f.is_file():
        raise DataError(f"{f}: image listed at {where} not found")
    inside_root(f, real_root, "data root")
    st = f.stat()
    if (first := seen.setdefault((st.st_dev, st.st_ino), where)) != where:
        raise DataError(f"{f}: listed at {where} is the file listed at {first} (the same path, a link or a hard "
                        "link): one image read twice, under two classes or splits; list it once")
    data = read_image_file(f)
    img = open_image(data, f)  # decodes fully: a truncated file fails here, naming it
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        return data  # re-encoding photos as PNG would only make them several times larger
    return to_png(data, f)


def _first_half(n: int) -> list[str]:
    return ["train" if c < n // 2 else "test" for c in range(n)]


def _labels_by_class_id(class_ids: list[int]) -> dict[int, int]:
    return {cid: i for i, cid in enumerate(sorted(set(class_ids)))}


# ---------------------------------------------------------------- CUB-200-2011
def import_cub200(path: str | Path) -> RawImages:
    root = _root(path, "images.txt", "CUB_200_2011")
    real_root = root.resolve()
    names: dict[int, str] = {}
    f = root / "classes.txt"
    for number, (cid, name) in _rows(f, ["class_id", "class_name"]):
        cid_ = _int(cid, f, number, "class_id")
        if cid_ in names:
            raise DataError(f"{f}:{number}: class_id {cid_} listed twice")
        names[cid_] = name
    f = root / "image_class_labels.txt"
    class_of: dict[int, int] = {}
    for number, (iid, cid) in _rows(f, ["image_id", "class_id"]):
        cid_ = _int(cid, f, number, "class_id")
        if cid_ not in names:
            raise DataError(f"{f}:{number}: class_id {cid_} is not in classes.txt")
        iid_ = _int(iid, f, number, "image_id")
        if iid_ in class_of:  # the last line silently won: an image moved to another class
            raise DataError(f"{f}:{number}: image_id {iid_} listed twice")
        class_of[iid_] = cid_
    official: dict[int, str] = {}
    f = root / "train_test_split.txt"
    if f.exists():
        for number, (iid, is_train) in _rows(f, ["image_id", "is_training_image"]):
            if is_train not in ("0", "1"):
                raise DataError(f"{f}:{number}: is_training_image must be 0 or 1, got {is_train!r}")
            iid_ = _int(iid, f, number, "image_id")
            if iid_ in official:
                raise DataError(f"{f}:{number}: image_id {iid_} listed twice")
            official[iid_] = "train" if is_train == "1" else "test"
    label_of = _labels_by_class_id(list(names))
    ids, labels, images, split, seen, listed = [], [], [], [], {}, set()
    f = root / "images.txt"
    for number, (iid, rel) in _rows(f, ["image_id", "path"]):
        iid_ = _int(iid, f, number, "image_id")
        if iid_ in listed:
            raise DataError(f"{f}:{number}: image_id {iid_} listed twice")
        listed.add(iid_)
        if iid_ not in class_of:
            raise DataError(f"{f}:{number}: image_id {iid_} has no class in image_class_labels.txt")
        if official and iid_ not in official:
            raise DataError(f"{f}:{number}: image_id {iid_} is not in train_test_split.txt")
        images.append(_image(root / "images", real_root, rel, f"{f}:{number}", seen))
        ids.append(rel)
        labels.append(label_of[class_of[iid_]])
        split.append(official.get(iid_, ""))
    if not ids:
        raise DataError(f"{root / 'images.txt'}: lists no images")
    classes = [names[c] for c in sorted(names)]
    return RawImages(ids, np.asarray(labels, dtype=np.int64), classes, images,
                     official_split=split if official else None, class_split=_first_half(len(classes)))


# ---------------------------------------------------------------- Cars196
def _mat_list(value: object) -> list:
    """A loadmat(simplify_cells=True) struct or cell array as a list (a single element comes back bare)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value if isinstance(value, list) else [value]


def import_cars196(path: str | Path) -> RawImages:
    root = _root(path, "cars_annos.mat", "cars196")
    real_root = root.resolve()
    f = root / "cars_annos.mat"
    import scipy.io  # late: only this source needs it

    try:  # the two variables read, from a regular file: every other one was decompressed too (a .mat bomb)
        with open_regular(f) as handle:
            mat = scipy.io.loadmat(handle, simplify_cells=True, variable_names=["annotations", "class_names"])
    except Exception as err:  # scipy's parser raises anything from IndexError to MatReadError
        # NotImplementedError: a v7.3 (HDF5) file, not the v5 file of the release
        raise DataError(f"{f}: not a readable MATLAB v5 file: {type(err).__name__}: {err}") from None
    for key in ("annotations", "class_names"):
        if key not in mat:
            raise DataError(f"{f}: no variable '{key}'")
    class_names = [str(c) for c in _mat_list(mat["class_names"])]
    ids, labels, images, split, seen = [], [], [], [], {}
    for n, ann in enumerate(_mat_list(mat["annotations"])):
        where = f"{f}: annotations[{n}]"
        if not isinstance(ann, dict):
            raise DataError(f"{where}: not a struct")
        rel, cls, test = ann.get("relative_im_path"), ann.get("class"), ann.get("test")
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{where}: field 'relative_im_path' missing or not text: {rel!r}")
        if not isinstance(cls, int | np.integer) or not 1 <= int(cls) <= len(class_names):
            raise DataError(f"{where}: field 'class' must be an integer in 1..{len(class_names)}, got {cls!r}")
        if test not in (0, 1):
            raise DataError(f"{where}: field 'test' must be 0 or 1, got {test!r}")
        images.append(_image(root, real_root, rel, where, seen))
        ids.append(rel)
        labels.append(int(cls) - 1)
        split.append("test" if test == 1 else "train")
    if not ids:
        raise DataError(f"{f}: annotations list no images")
    return RawImages(ids, np.asarray(labels, dtype=np.int64), class_names, images,
                     official_split=split, class_split=_first_half(len(class_names)))


# ---------------------------------------------------------------- Stanford Online Products
SOP_FIELDS = ["image_id", "class_id", "super_class_id", "path"]


def import_sop(path: str | Path) -> RawImages:
    root = _root(path, "Ebay_train.txt", "Stanford_Online_Products")
    real_root = root.resolve()
    rows = []  # (class_id, path, super-class folder, part, file:line)
    part_of: dict[int, str] = {}
    for part in ("train", "test"):
        f = root / f"Ebay_{part}.txt"
        for number, (_, cid, scid, rel) in _rows(f, SOP_FIELDS, header=True):
            cid_ = _int(cid, f, number, "class_id")
            _int(scid, f, number, "super_class_id")
            if part_of.setdefault(cid_, part) != part:
                raise DataError(f"{f}:{number}: class_id {cid_} is also in Ebay_{part_of[cid_]}.txt; "
                                "the official split is class-disjoint")
            rows.append((cid_, rel, rel.split("/", 1)[0], part, f"{f}:{number}"))
    if not rows:
        raise DataError(f"{root}: Ebay_train.txt and Ebay_test.txt list no images")
    label_of = _labels_by_class_id([r[0] for r in rows])
    folder_of = {}
    for cid, _, folder, _, _ in rows:
        folder_of.setdefault(cid, folder)
    class_ids = sorted(label_of)
    seen: dict[tuple[int, int], str] = {}
    images = [_image(root, real_root, rel, where, seen) for _, rel, _, _, where in rows]
    return RawImages(
        ids=[r[1] for r in rows],
        labels=np.asarray([label_of[r[0]] for r in rows], dtype=np.int64),
        classes=[f"{folder_of[c]}/{c}" for c in class_ids],
        images=images,
        class_split=[part_of[c] for c in class_ids],
        groups=[folder_of[c] for c in class_ids],  # the 12 super-classes (bicycle_final, chair_final, ...)
    )
