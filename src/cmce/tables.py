"""Embedding tables in Parquet: fixed-size float32 list columns plus JSON version metadata.

Every embedding file carries schema metadata key ``cmce`` (JSON) naming the models that produced it.
Readers validate column presence, type, dimension and finiteness, and name the file and column.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cmce import strict_json
from cmce.errors import first_line
from cmce.output_checks import not_found
from cmce.provenance import check_metadata
from cmce.storage import atomic_path, open_regular


class TableError(ValueError):
    """An embedding table is missing, malformed or from other models; names the file and field."""


def embedding_array(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {x.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def with_metadata(table: pa.Table, meta: dict[str, Any]) -> pa.Table:
    return table.replace_schema_metadata({"cmce": json.dumps(meta, sort_keys=True)})


def writer_options(schema: pa.Schema) -> dict[str, Any]:
    """Parquet writer options for embedding tables: dictionary encoding only for scalar non-float columns
    (ids, labels). Float embeddings almost never repeat: trying a dictionary on them first made writing
    ~4x slower and, after the fallback, the file ~30 % larger."""
    keep = [f.name for f in schema
            if not (pa.types.is_floating(f.type) or pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type))]
    return {"use_dictionary": keep, **CHECKSUMS}


# each data page carries the CRC-32 of its bytes, checked by every cmce read (open_parquet): a flipped bit inside a
# page that still decoded changed an embedding silently (exit 0). Files written without them read as before.
CHECKSUMS = {"write_page_checksum": True}


def open_parquet(source: Any) -> pq.ParquetFile:
    """pq.ParquetFile of a path or open file, every page's checksum verified as it is read. A column name in the
    footer that is not UTF-8 raises ArrowInvalid, as other footer damage does (pyarrow let a UnicodeDecodeError
    through, and it reached the user without the file's name)."""
    try:
        return pq.ParquetFile(source, page_checksum_verification=True)
    except UnicodeDecodeError as err:
        raise pa.ArrowInvalid(f"a name in its footer is not UTF-8 ({err})") from None


def write_table(table: pa.Table, path: str | Path, row_group_size: int = 8192) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, **writer_options(table.schema))
    return path


def require_whole(meta: dict[str, Any], path: str | Path, step: str) -> None:
    """A shard of a gallery (embed-gallery --shard k/n, combined) holds part of its split: indexed or evaluated, it
    answered from half the gallery with exit 0 and no word."""
    if meta.get("shard"):
        raise TableError(f"{path}: shard {meta['shard']} of a gallery; {step} takes a whole gallery: merge the "
                         "shards first (cmce merge)")


def served_gallery(gallery: str | Path, query_sha256: str, query_model: str | Path, step: str) -> dict[str, Any]:
    """The metadata of `gallery`, refused unless it is a whole gallery transformed for the query model whose
    checkpoint (`query_model`) has `query_sha256`: evaluated or gated against another, its scores meant nothing."""
    meta = read_metadata(gallery)
    if meta.get("kind") != "gallery":
        raise TableError(f"{gallery}: not a gallery file (kind={meta.get('kind')!r})")
    require_whole(meta, gallery, step)
    if (made_for := str(meta.get("query_model_sha256"))) != query_sha256:
        raise TableError(f"{gallery}: gallery was transformed for query model {made_for[:12]}, not "
                         f"{query_sha256[:12]} ({query_model})")
    return meta


def holds_whole_split(meta: dict[str, Any]) -> bool:
    """The file says it holds every row of the split its `source` records (so its ids and labels can be checked
    against the recorded digests); a shard's rows are checked when the shards are merged."""
    return bool(meta.get("source")) and not meta.get("shard")


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: {not_found(path)}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:  # a footer name that is not UTF-8
        raise TableError(f"{path}: not a readable Parquet file: {err}") from None
    return _metadata(schema, path)


def _entries_of_key(schema: pa.Schema, key: str) -> int:
    """How many times `key` is in the schema's metadata: pyarrow hands it over as a dict (the first of repeated keys
    wins, while other readers may take the last); only its printed form lists every entry."""
    printed = schema.to_string(show_field_metadata=False, show_schema_metadata=True, truncate_metadata=False)
    section = printed.partition("-- schema metadata --\n")[2]
    return sum(line.startswith(f"{key}: ") for line in section.splitlines())


def _metadata(schema: pa.Schema, path: Path) -> dict[str, Any]:
    """The cmce metadata a Parquet schema carries, as a JSON object."""
    raw = (schema.metadata or {}).get(b"cmce")
    if raw is None:
        raise TableError(f"{path}: no cmce version metadata in the Parquet schema")
    if _entries_of_key(schema, "cmce") > 1:
        raise TableError(f"{path}: its Parquet schema holds the cmce metadata key more than once (which one is meant?)")
    try:
        meta = strict_json.loads(raw)
    except strict_json.DuplicateKeyError as err:
        raise TableError(f"{path}: its cmce metadata holds {err}") from None
    except ValueError:
        raise TableError(f"{path}: its cmce metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise TableError(f"{path}: its cmce metadata is a JSON {type(meta).__name__}, not an object")
    return check_metadata(meta, path)


def read_schema(path: str | Path, columns: list[str] | None = None) -> pa.Schema:
    """The file's schema, after checking that it is a Parquet file holding `columns`."""
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: {not_found(path)}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:  # a footer name that is not UTF-8
        raise TableError(f"{path}: not a readable Parquet file: {err}") from None
    for col in columns or []:
        if col not in schema.names:
            raise TableError(f"{path}: missing column '{col}' (has {schema.names})")
    return schema


def read_snapshot(path: str | Path, columns: list[str], kind: str, optional: list[str] | None = None
                  ) -> tuple[dict[str, Any], pa.Table, str]:
    """(cmce metadata, table, sha256) of one version of a cmce file of `kind`: all three come through one open
    handle, so a file replaced meanwhile (written aside and renamed over, as cmce writers do) cannot mix versions.
    `optional` columns are read when the file has them."""
    path = Path(path)
    try:
        f = open_regular(path)  # a pipe named like the file would block for ever
    except FileNotFoundError:
        raise TableError(f"{path}: {not_found(path)}") from None
    except OSError as err:
        raise TableError(f"{path}: {err.strerror}") from None
    with f, _native(f) as source:
        try:
            parquet = open_parquet(source)
            schema = parquet.schema_arrow
        except (pa.ArrowInvalid, OSError) as err:
            raise TableError(f"{path}: not a readable Parquet file: {err}") from None
        meta = _metadata(schema, path)
        if meta.get("kind") != kind:
            raise TableError(f"{path}: not a {kind} file (kind={meta.get('kind')!r})")
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise TableError(f"{path}: missing column '{missing[0]}'")
        columns = [*columns, *(c for c in optional or [] if c in schema.names)]
        try:
            table = parquet.read(columns=columns)
        except (pa.ArrowException, OSError) as err:  # a valid footer over damaged data pages
            raise unreadable(path, err) from None
        f.seek(0)
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return meta, table, digest


def _native(f: Any) -> Any:
    """An arrow file on the open file `f` (the same file, even once another is renamed over its name). Given `f`
    itself, arrow's I/O workers read it into buffers holding Python objects; one released after the interpreter
    began its exit aborted the process (`terminate called without an active exception`, exit 134 after a
    refusal, 7 times in 8 on a busy machine)."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return pa.OSFile(proc) if os.path.exists(proc) else contextlib.nullcontext(f)


def unreadable(path: str | Path, err: BaseException) -> TableError:
    """A damaged data page under a valid footer: arrow's message (often several lines) with the file named."""
    text = first_line(err)
    if "Expected all lists to be of size=" in text and (column := _fixed_list_with_nulls(path)):
        # Arrow writes a null into a fixed-size list column but cannot read it back: its message named the
        # file unreadable and a row that is not the null one
        return TableError(f"{path}: column '{column}' has null rows, which a fixed-size list column cannot hold "
                          "(Arrow writes them and cannot read them back); write every row's values")
    if "checksum verification failed" in text:  # a page's bytes changed since it was written (CHECKSUMS)
        return TableError(f"{path}: damaged: {text}; copy it again from its source")
    return TableError(f"{path}: not a readable Parquet file: {text}")


def _fixed_list_with_nulls(path: str | Path) -> str | None:
    """The fixed-size list column of `path` that cannot be read back, or None."""
    try:
        parquet = open_parquet(path)
        for field in parquet.schema_arrow:
            if pa.types.is_fixed_size_list(field.type):
                try:
                    parquet.read(columns=[field.name])
                except pa.ArrowInvalid:
                    return field.name
    except (pa.ArrowException, OSError):
        pass
    return None


def iter_batches(path: str | Path, batch_size: int) -> Iterator[pa.RecordBatch]:
    """The record batches of a Parquet file in order; a damaged page fails naming the file."""
    try:
        yield from open_parquet(path).iter_batches(batch_size=batch_size)
    except (pa.ArrowException, OSError) as err:
        raise unreadable(path, err) from None


def read_row_group(pf: pq.ParquetFile, path: str | Path, i: int) -> pa.Table:
    try:
        return pf.read_row_group(i)
    except (pa.ArrowException, OSError) as err:
        raise unreadable(path, err) from None


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    read_schema(path, columns)
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:  # a valid footer over damaged data pages
        raise unreadable(path, err) from None


def embedding_column(table: pa.Table, name: str, where: str, dim: int | None = None, first_row: int = 0
                     ) -> np.ndarray:
    """A fixed-size-list float32 column (or lists of floats of one length) → (rows, dim) float32 array, checked
    for type, dimension, finiteness (rows named counting from `first_row`: the table may be a batch of a file)."""
    if name not in table.column_names:
        raise TableError(f"{where}: missing column '{name}'")
    col = table.column(name)
    if not pa.types.is_fixed_size_list(col.type) or col.type.value_type != pa.float32():
        return _check_embeddings(_other_float_lists(col, name, where, dim), name, where, dim, first_row)
    width = col.type.list_size
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if arr.null_count:
        raise TableError(f"{where}: column '{name}' has {arr.null_count} null rows")
    values = arr.values.to_numpy(zero_copy_only=False)[arr.offset * width : (arr.offset + len(arr)) * width]
    return _check_embeddings(values.reshape(len(arr), width), name, where, dim, first_row)


def check_finite(table: pa.Table, where: str, first_row: int = 0) -> None:
    """Every float column of rows a step copies as they are (merge, add-member; `table` the batch of `where` from
    `first_row` on): a NaN or inf copied through was refused only by a later step reading the file it wrote (exit 0
    here, exit 2 there)."""
    for f in table.schema:
        inner = f.type.value_type if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type) else None
        if inner is not None and pa.types.is_floating(inner):
            embedding_column(table, f.name, where, first_row=first_row)
        elif pa.types.is_floating(f.type):
            float_column(table, f.name, where, first_row)


def stored_dim(schema: pa.Schema, name: str, where: str) -> int:
    """The dimension of an embedding column a step copies as it is (cmce's own layout, fixed_size_list<float32>):
    tables that are only read take other float lists too (embedding_column)."""
    kind = schema.field(name).type if name in schema.names else None
    if kind is None or not pa.types.is_fixed_size_list(kind) or kind.value_type != pa.float32():
        raise TableError(f"{where}: column '{name}' has type {kind}; this step extends a file cmce wrote "
                         "(fixed_size_list<float32>), not one rewritten by another tool")
    return kind.list_size


LIST_TYPES = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list, pa.types.is_list_view,
              pa.types.is_large_list_view)


def _other_float_lists(col: pa.ChunkedArray, name: str, where: str, dim: int | None) -> np.ndarray:
    """Embeddings written by other tools: lists of any float type and list layout (pandas and Polars write
    list<double>, Arrow 16+ may write list views), all of one length."""
    kind = col.type
    if not any(is_type(kind) for is_type in LIST_TYPES) or not pa.types.is_floating(kind.value_type):
        raise TableError(f"{where}: column '{name}' has type {kind}, expected fixed_size_list<float32> (or lists of "
                         "floats of one length)")
    arr = col.combine_chunks()
    if arr.null_count:
        raise TableError(f"{where}: column '{name}' has {arr.null_count} null rows")
    widths = np.unique(pc.list_value_length(arr).to_numpy(zero_copy_only=False))
    if len(widths) > 1:
        raise TableError(f"{where}: column '{name}' holds lists of {len(widths)} lengths ({widths[0]} to "
                         f"{widths[-1]}): embeddings of one dimension expected")
    width = int(widths[0]) if len(widths) else (dim or 0)
    with np.errstate(over="ignore"):  # beyond float32: inf, refused below
        values = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.float32)  # a null value: NaN
    return values.reshape(len(arr), width)


def _check_embeddings(out: np.ndarray, name: str, where: str, dim: int | None, first_row: int = 0) -> np.ndarray:
    if dim is not None and out.shape[1] != dim:
        raise TableError(f"{where}: column '{name}' has dimension {out.shape[1]}, expected {dim}")
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise TableError(
            f"{where}: column '{name}' has NaN/inf values in {int(bad.sum())} rows (first: row "
            f"{first_row + int(np.argmax(bad))})"
        )
    return out


def float_column(table: pa.Table, name: str, where: str, first_row: int = 0) -> np.ndarray:
    """A scalar floating-point column → float32 array, checked for type, nulls and finiteness."""
    if name not in table.column_names:
        raise TableError(f"{where}: missing column '{name}'")
    col = table.column(name)
    if not pa.types.is_floating(col.type):
        raise TableError(f"{where}: column '{name}' has type {col.type}, expected a float")
    if col.null_count:
        raise TableError(f"{where}: column '{name}' has {col.null_count} null rows")
    out = col.to_numpy().astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        raise TableError(
            f"{where}: column '{name}' has NaN/inf values in {int(bad.sum())} rows (first: row "
            f"{first_row + int(np.argmax(bad))})"
        )
    return out


class IdsDigest:
    """sha256 of a sequence of ids in order (each length-prefixed, so no two sequences share a digest), and of
    their labels (as little-endian int64): the fingerprints a split's `source` records, which prove that merged
    shards, a gallery or an index hold exactly the rows of the split they were cut from, with its labels."""

    def __init__(self) -> None:
        self._h, self._labels = hashlib.sha256(), hashlib.sha256()
        self.rows = 0

    def update(self, ids: list[str], labels: np.ndarray | None = None) -> None:
        for i in ids:
            b = i.encode()
            self._h.update(len(b).to_bytes(8, "little"))
            self._h.update(b)
        self.rows += len(ids)
        if labels is not None:
            self._labels.update(np.asarray(labels).astype("<i8").tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def labels_hexdigest(self) -> str:
        return self._labels.hexdigest()


def check_digest(digest: IdsDigest, source: dict[str, Any], where: str, what: str, labels: bool = False,
                 why: str | None = None) -> None:
    """The rows `digest` saw are exactly those of the split `source` records, in order; with `labels`, their labels
    too (files written before labels_sha256 was recorded are checked by ids alone). `why`: the likely causes and
    the remedy, when the caller knows better than a file written again."""
    if (digest.rows, digest.hexdigest()) != (source.get("split_rows"), source.get("ids_sha256")):
        raise TableError(f"{where}: holds {digest.rows} rows that are not {what} ({source.get('split_rows')} rows, "
                         "in order): " + (why or "its rows were reordered (sorted or shuffled), dropped, added or "
                                                 "edited, or it was embedded from another dataset; write it again "
                                                 "with cmce"))
    if labels and "labels_sha256" in source and digest.labels_hexdigest() != source["labels_sha256"]:
        # searched, served or gated, every hit of an edited row named another class, exit 0
        raise TableError(f"{where}: labels differ from those of {what} (the same ids): " + (
            why or "a label was edited, or it was embedded from a relabelled copy of the dataset; write it again with "
                   "cmce"))


def check_rows_are_split(ids: list[str], source: dict[str, Any], where: str, what: str,
                         labels: np.ndarray | None = None, why: str | None = None) -> None:
    """`ids` (and `labels`, when given) are exactly the rows of a split, in order (`source`: its row count and
    digests): a gallery truncated, edited or embedded from another dataset gives metrics (or an index) of something
    else. `why`: as for check_digest."""
    digest = IdsDigest()
    digest.update(ids, labels)
    check_digest(digest, source, where, what, labels is not None, why)


def shown_id(value: str, limit: int = 80) -> str:
    """An id as a message shows it: quoted, and cut past `limit` characters (a 5 MB id was one 5 MB log line)."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}… ({len(value):,} characters)"


def check_unique_ids(ids: list[str], where: str, seen: set[str] | None = None) -> None:
    """Ids key every row (index id map, evaluation self-exclusion): a duplicate is an error.
    Pass the same `seen` set across batches of one file."""
    seen = set() if seen is None else seen
    for i in ids:
        if i in seen:
            raise TableError(f"{where}: column 'id' has duplicate id {shown_id(i)}")
        seen.add(i)


def id_rows(ids: list[str], wanted: list[str]) -> np.ndarray:
    """The row of each wanted id in `ids`, -1 where `ids` lacks it (ids are unique, see check_unique_ids)."""
    row = {i: n for n, i in enumerate(ids)}
    return np.array([row.get(i, -1) for i in wanted], dtype=np.int64)


def rows_of(ids: list[str], wanted: list[str], where: str) -> np.ndarray:
    """The row of each wanted id in `ids` (the rows of `where`); a TableError naming `where` when any is absent."""
    rows = id_rows(ids, wanted)
    missing = np.flatnonzero(rows < 0)
    if missing.size:
        raise TableError(f"{where}: lacks {missing.size} of the {len(wanted)} ids asked for "
                         f"(first {shown_id(wanted[missing[0]])})")
    return rows


def string_column(table: pa.Table, name: str, where: str) -> list[str]:
    if name not in table.column_names:
        raise TableError(f"{where}: missing column '{name}'")
    if not pa.types.is_string(table.column(name).type) and not pa.types.is_large_string(table.column(name).type):
        raise TableError(f"{where}: column '{name}' has type {table.column(name).type}, expected string")
    if table.column(name).null_count:
        raise TableError(f"{where}: column '{name}' has {table.column(name).null_count} null rows")
    return table.column(name).to_pylist()


def int_column(table: pa.Table, name: str, where: str) -> np.ndarray:
    if name not in table.column_names:
        raise TableError(f"{where}: missing column '{name}'")
    if not pa.types.is_integer(table.column(name).type):
        raise TableError(f"{where}: column '{name}' has type {table.column(name).type}, expected an integer")
    if table.column(name).null_count:
        raise TableError(f"{where}: column '{name}' has {table.column(name).null_count} null rows")
    values = table.column(name).to_numpy().astype(np.int64)
    outside = (values < INT32.min) | (values > INT32.max)
    if outside.any():  # written as int32 (labels, counts): 2**32 + 1 was stored as 1, exit 0
        raise TableError(f"{where}: column '{name}' has {int(values[outside][0])}, beyond the 32-bit integers cmce's "
                         "files store")
    return values


INT32 = np.iinfo(np.int32)


def stored_running_sum(table: pa.Table, n_members: int, where: str, dim: int | None = None) -> np.ndarray:
    """A gallery's stored `ensemble_sum`, checked against its `n_models`, `embedding` and `uncertainty`: a count
    that is not the number of members, or a sum that n unit vectors cannot make or that disagrees with the stored
    embedding or uncertainty, would reject the wrong items (build-index) or corrupt every later member (add-member)."""
    from cmce.method import STORED_TOLERANCE, uncertainty_from_sum

    counts = set(int_column(table, "n_models", where).tolist())
    if counts - {n_members}:
        raise TableError(f"{where}: column 'n_models' holds {sorted(counts)[:5]}, but the metadata names "
                         f"{n_members} member(s)")
    emb = embedding_column(table, "embedding", where, dim).astype(np.float64)
    s = embedding_column(table, "ensemble_sum", where, emb.shape[1]).astype(np.float64)
    norms = np.linalg.norm(s, axis=1)
    cos = np.einsum("ij,ij->i", s, emb) / np.maximum(norms * np.linalg.norm(emb, axis=1), 1e-30)
    bad = (norms > n_members * (1 + STORED_TOLERANCE)) | (cos < 1 - STORED_TOLERANCE)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TableError(f"{where}: column 'ensemble_sum' of id {shown_id(string_column(table, 'id', where)[row])} "
                         f"is not the sum of {n_members} unit vectors behind its 'embedding'")
    unc = float_column(table, "uncertainty", where)
    bad = np.abs(unc - uncertainty_from_sum(s, n_members)) > STORED_TOLERANCE * max(n_members, 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TableError(f"{where}: column 'uncertainty' of id {shown_id(string_column(table, 'id', where)[row])} "
                         f"is not the spread its 'ensemble_sum' of {n_members} member(s) implies")
    return s


def checked_uncertainty(table: pa.Table, n_members: int, where: str) -> np.ndarray:
    """A gallery's `uncertainty`, which the rejection reads (build-index, the gate): never negative, and the spread
    its stored running sum implies where the gallery holds one (galleries written before it do not)."""
    unc = float_column(table, "uncertainty", where)
    if (unc < 0).any():  # a mean squared distance: never negative
        raise TableError(f"{where}: column 'uncertainty' has negative values (first: row "
                         f"{int(np.flatnonzero(unc < 0)[0])})")
    running = [c for c in ("ensemble_sum", "n_models") if c in table.column_names]
    if len(running) == 1:  # one dropped: `uncertainty` went unchecked, and the rejection read an edited one
        missing = "n_models" if running == ["ensemble_sum"] else "ensemble_sum"
        raise TableError(f"{where}: has column {running[0]!r} but not {missing!r} (a gallery holds both, or, "
                         "written before they were, neither)")
    if running:
        stored_running_sum(table, n_members, where)
    return unc
