"""Reading a dataset file: checked opening, metadata, and the decoded images of one split, whole or
streamed in row batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from cmce import strict_json
from cmce.data.codec import decode_image
from cmce.data.schema import DATASET_SCHEMA, DOMAIN_FIELD, DataError
from cmce.output_checks import parquet_kind
from cmce.provenance import SPLITS
from cmce.tables import shown_id


def class_names(dataset: Path) -> list[str]:
    """The class name of each label: the dataset file's own list (its metadata), else its label and
    class_name columns (no image is read either way)."""
    classes = dataset_info(dataset).get("classes")
    if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        return classes
    table = pq.read_table(dataset, columns=["label", "class_name"], page_checksum_verification=True)
    names = dict(zip(table.column("label").to_pylist(), table.column("class_name").to_pylist(), strict=True))
    return [names.get(label, "") for label in range(max(names, default=-1) + 1)]


def open_dataset(path: str | Path) -> pq.ParquetFile:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset file not found")
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)  # a flipped bit in a page: an error, not a pixel
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:  # a footer name that is not UTF-8
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None
    names = set(pf.schema_arrow.names)
    twice = sorted({n for n in pf.schema_arrow.names if pf.schema_arrow.names.count(n) > 1})
    if twice:  # pyarrow then reports the column as missing
        raise DataError(f"{path}: column(s) {twice} appear more than once")
    for col in DATASET_SCHEMA:
        if col.name not in names:  # a gallery given for the dataset was only `missing column 'class_name'`
            kind = parquet_kind(path)
            given = f": it holds a cmce {kind} file, not a dataset (from prepare-data)" if kind not in (
                None, "dataset") else ""
            raise DataError(f"{path}: missing column '{col.name}'{given}")
    for col in [*DATASET_SCHEMA, *([DOMAIN_FIELD] if DOMAIN_FIELD.name in names else [])]:
        actual = pf.schema_arrow.field(col.name).type
        if not _compatible(actual, col.type):
            raise DataError(f"{path}: column '{col.name}' has type {actual}, expected {col.type}")
    check_class_names(pf, path)
    return pf


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    """The written type or one that reads as the same values: pandas writes large_string and int64."""
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if expected == pa.string():
        return actual in (pa.string(), pa.large_string())
    if expected == pa.binary():
        return actual in (pa.binary(), pa.large_binary())
    return actual == expected


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
    return metadata_of(open_dataset(path), path)


def metadata_of(pf: pq.ParquetFile, path: str | Path) -> dict:
    """A dataset's cmce metadata (its source, protocol, classes); {} for a dataset written without it."""
    meta = (pf.schema_arrow.metadata or {}).get(b"cmce")
    if not meta:
        return {}
    try:
        info = strict_json.loads(meta)
    except ValueError as err:  # a key twice (the last silently won) or no JSON at all
        raise DataError(f"{path}: its cmce metadata is not usable JSON: {err}") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: its cmce metadata is a JSON {type(info).__name__}, not an object")
    return info


def check_class_names(pf: pq.ParquetFile, path: str | Path) -> None:
    """One name per label: rows of a label under two names (an edited or merged file) were read without a word,
    and a server's class names then depended on which row it met first."""
    try:
        table = pf.read(columns=["label", "class_name"])
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not readable: {err}") from None
    counts = table.group_by("label").aggregate([("class_name", "count_distinct")])
    several = pc.filter(counts, pc.greater(counts.column("class_name_count_distinct"), 1))
    if several.num_rows:
        label = several.column("label")[0].as_py()
        names = pc.unique(pc.filter(table.column("class_name"), pc.equal(table.column("label"), label))).to_pylist()
        raise DataError(f"{path}: label {label} has several class names ({', '.join(map(repr, names[:3]))}): one "
                        "label, one class name")
    check_metadata_classes(pf, path, table)


def check_metadata_classes(pf: pq.ParquetFile, path: str | Path, table: pa.Table) -> None:
    """Labels index the metadata's class list (over all splits: disjoint test classes are not in train), and
    each row's class_name is its label's entry: a label past the list or a reordered list trained and served
    without a word, the server naming hits after the wrong class."""
    classes = metadata_of(pf, path).get("classes")  # every reader of a dataset opens it through this check
    if not isinstance(classes, list) or table.column("label").null_count:
        return
    labels = table.column("label").to_numpy()
    if len(labels) and labels.min() < 0:  # split_rows' words, as without a classes list
        raise DataError(f"{path}: column 'label' has a negative value {int(labels.min())}")
    outside = np.flatnonzero(labels >= len(classes))
    if len(outside):
        row = int(outside[0])
        raise DataError(f"{path}: row {row} has label {int(labels[row])}; the metadata lists {len(classes)} classes, "
                        f"labels are 0..{len(classes) - 1}")
    expected = pa.array([str(c) for c in classes], pa.string()).take(pa.array(labels))
    differ = np.flatnonzero(pc.not_equal(table.column("class_name").cast(pa.string()), expected)
                            .fill_null(True).to_numpy(zero_copy_only=False))
    if len(differ):
        row = int(differ[0])
        raise DataError(f"{path}: row {row} (label {int(labels[row])}) has class_name "
                        f"{table.column('class_name')[row].as_py()!r}; the metadata's classes list says "
                        f"{str(classes[labels[row]])!r}")


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


MAX_CLASSES = 1 << 20  # classifier rows: the largest label + 1 (1M classes × 512 dims is 2 GB of float32)


def split_rows(path: str | Path, rows: pa.RecordBatch | pa.Table, split: str, seen: set[str]) -> np.ndarray:
    """Indices of `split`'s rows in a slice of a dataset file (id, label, split columns), checked: no
    nulls, labels in [0, MAX_CLASSES), no id already in `seen` (ids key every output row: a duplicate would
    silently alias two images). Adds the slice's ids to `seen`."""
    for col in ("id", "label", "split"):
        if rows.column(col).null_count:
            raise DataError(f"{path}: column '{col}' has {rows.column(col).null_count} null values")
    known = pc.is_in(rows.column("split"), pa.array(SPLITS)).to_numpy(zero_copy_only=False)
    if not known.all():  # rows of a split no step reads would silently vanish from every output
        other = rows.column("split")[int(np.flatnonzero(~known)[0])].as_py()
        raise DataError(f"{path}: column 'split' has the value {other!r}; a dataset's splits are {list(SPLITS)}")
    idx = np.flatnonzero(pc.equal(rows.column("split"), split).to_numpy(zero_copy_only=False))
    if not len(idx):
        return idx
    for i in rows.column("id").take(idx).to_pylist():
        if not i:
            raise DataError(f"{path}: split '{split}' has an empty id")
        if i in seen:
            raise DataError(f"{path}: split '{split}' has duplicate id {shown_id(i)}")
        seen.add(i)
    if "image" in rows.schema.names and rows.column("image").null_count:  # the image-less reads decode it later
        nulls = np.flatnonzero(rows.column("image").take(idx).is_null().to_numpy(zero_copy_only=False))
        if len(nulls):
            raise DataError(f"{path} (id {rows.column('id')[int(idx[nulls[0]])].as_py()}): no image (the image cell "
                            "is null)")
    labels = rows.column("label").take(idx).to_numpy()
    if labels.min() < 0:
        raise DataError(f"{path}: column 'label' has a negative value {int(labels.min())}")
    if labels.max() >= MAX_CLASSES:  # a classifier has one row per label up to the largest
        raise DataError(f"{path}: column 'label' has the value {int(labels.max())}; labels are class numbers "
                        f"0..{MAX_CLASSES - 1}")
    return idx


def load_split(path: str | Path, split: str, channels: int, size: int) -> SplitArrays:
    parts = list(iter_split_batches(path, split, 4096, channels, size))
    ids = [i for p in parts for i in p.ids]  # unique: iter_split_batches checks
    return SplitArrays(ids, np.concatenate([p.labels for p in parts]), torch.cat([p.images for p in parts]))
