"""Streaming, shardable reading of one dataset split for embedding.

The split is cut into chunks along the Parquet file's row groups: a chunk is at most CHUNK_ROWS of the
split's rows within one row group, in nearly equal pieces. A map-style torch Dataset decodes one chunk
per item, so a DataLoader with worker processes decodes chunks in parallel and still yields them in
file order; memory is bounded by (workers + prefetch) chunks and one row group per process, whatever
the gallery size. Shard i of K is a contiguous range of chunks: concatenating shards 0..K-1 gives
exactly the unsharded order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from cmce.data.codec import decode_image
from cmce.data.readers import SplitArrays, open_dataset, read_row_group, split_rows
from cmce.data.schema import DataError
from cmce.tables import IdsDigest, open_parquet


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard()  # the whole split: one shard of one
CHUNK_ROWS = 512  # decoding unit: small enough to balance shards and workers, large enough to amortise reads


def parse_shard(text: str) -> Shard:
    """'i/K' with 0 ≤ i < K → Shard(i, K)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise ValueError(f"--shard expects i/K with 0 <= i < K (e.g. 0/4), got {text!r}")
    return Shard(int(m[1]), int(m[2]))


def shard_range(n_chunks: int, shard: Shard) -> range:
    """Contiguous, balanced range of chunk indices for one shard (may be empty when K > n_chunks)."""
    return range(shard.index * n_chunks // shard.count, (shard.index + 1) * n_chunks // shard.count)


def split_source(path: str | Path, split: str) -> dict:
    """{"split_rows", "ids_sha256", "labels_sha256"} of one split, in file order: embedding files carry it so
    that merging shards can prove it put back exactly the split's rows, in order, all cut from one version of
    one dataset file (a relabelled copy has the same ids)."""
    return source_of(*split_ids_labels(path, split))


def source_of(ids: pa.Array, labels: np.ndarray) -> dict:
    """The `source` record (see split_source) of a split's ids and labels."""
    digest = IdsDigest()
    digest.update(ids.to_pylist(), labels)
    return {"split_rows": digest.rows, "ids_sha256": digest.hexdigest(), "labels_sha256": digest.labels_hexdigest()}


def split_ids_labels(path: str | Path, split: str) -> tuple[pa.Array, np.ndarray]:
    """One split's ids (an Arrow array, for vectorised lookups) and labels, in file order."""
    pf = open_dataset(path)
    ids, labels, seen = [], [np.zeros(0, np.int64)], set()
    for rg in range(pf.num_row_groups):
        rows = read_row_group(pf, path, rg, ["id", "label", "split"])
        idx = split_rows(path, rows, split, seen)
        ids.append(rows.column("id").take(idx).cast(pa.string()))
        labels.append(rows.column("label").take(idx).to_numpy(zero_copy_only=False).astype(np.int64))
    return pa.chunked_array(ids, pa.string()).combine_chunks(), np.concatenate(labels)


def same_split(a: dict | None, b: dict | None) -> bool:
    """Two `source` records name one split of one dataset version: equal on every field both record (files
    written before labels_sha256 was recorded lack it)."""
    if not a or not b:
        return a == b
    return all(a[k] == b[k] for k in a.keys() & b.keys()) and {"split_rows", "ids_sha256"} <= a.keys() & b.keys()


class SplitChunks(Dataset):
    """Item k = decoded images of chunk k of one split (within one shard)."""

    def __init__(self, path: str | Path, split: str, channels: int, size: int, shard: Shard = WHOLE,
                 chunk_rows: int = CHUNK_ROWS):
        self.path, self.channels, self.size = str(path), channels, size
        pf = open_dataset(path)
        chunks = []
        seen: set[str] = set()
        for rg in range(pf.num_row_groups):
            rows = split_rows(path, read_row_group(pf, path, rg, ["id", "label", "split"]), split, seen)
            if not len(rows):
                continue
            chunks += [(rg, part) for part in np.array_split(rows, -(-len(rows) // chunk_rows))]
        if not chunks:
            raise DataError(f"{path}: split '{split}' is empty")
        self.chunks = [chunks[k] for k in shard_range(len(chunks), shard)]
        self._file: pq.ParquetFile | None = None  # opened lazily in each worker process
        self._group: tuple[int, object] | None = None  # last row group read: consecutive chunks share it

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> SplitArrays:
        if self._file is None:
            self._file = open_parquet(self.path)
        rg, rows = self.chunks[k]
        if self._group is None or self._group[0] != rg:
            self._group = (rg, read_row_group(self._file, self.path, rg, ["id", "label", "image"]))
        table = self._group[1].take(rows)
        ids = table.column("id").to_pylist()
        blobs = table.column("image").to_pylist()
        images = np.stack([decode_image(b, self.channels, self.size, f"{self.path} (id {i})")
                           for b, i in zip(blobs, ids, strict=True)])
        return SplitArrays(ids, table.column("label").to_numpy().astype(np.int64), torch.from_numpy(images))


def _identity(item: SplitArrays) -> SplitArrays:
    return item


def iter_split_chunks(path: str | Path, split: str, channels: int, size: int, shard: Shard = WHOLE,
                      workers: int = 0) -> Iterator[SplitArrays]:
    """Decoded chunks in file order; `workers` > 0 decodes in that many background processes."""
    chunks = SplitChunks(path, split, channels, size, shard)
    if workers <= 0:
        yield from (chunks[k] for k in range(len(chunks)))
        return
    loader = DataLoader(chunks, batch_size=None, num_workers=workers, collate_fn=_identity, prefetch_factor=2,
                        persistent_workers=False)
    yield from loader


def rebatch(chunks: Iterator[SplitArrays], batch_size: int) -> Iterator[SplitArrays]:
    """Re-cut chunks into batches of exactly `batch_size` rows (the last may be smaller)."""
    buf: list[SplitArrays] = []
    held = 0
    for chunk in chunks:
        buf.append(chunk)
        held += len(chunk.ids)
        while held >= batch_size:
            merged = _concat(buf)
            yield _slice(merged, 0, batch_size)
            rest = _slice(merged, batch_size, held)
            buf, held = ([rest] if len(rest.ids) else []), held - batch_size
    if held:
        yield _concat(buf)


def _concat(parts: list[SplitArrays]) -> SplitArrays:
    if len(parts) == 1:
        return parts[0]
    return SplitArrays([i for p in parts for i in p.ids], np.concatenate([p.labels for p in parts]),
                       torch.cat([p.images for p in parts]))


def _slice(a: SplitArrays, start: int, stop: int) -> SplitArrays:
    return SplitArrays(a.ids[start:stop], a.labels[start:stop], a.images[start:stop])
