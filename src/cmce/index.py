"""FAISS index over the gallery embeddings, saved as a directory with an id map and version metadata.

Layout: index.faiss (inner product over unit vectors = cosine), ids.parquet (id, label, uncertainty of
each indexed item, row = FAISS id), rejected.parquet (ids left out as too uncertain), meta.json
(query model, index parameters, counts, sha256 of the other files). Written to a temporary directory
and swapped in whole.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmce.ensemble import normalize
from cmce.storage import atomic_dir, file_sha256, restore_dir
from cmce.tables import (
    TableError,
    check_unique_ids,
    embedding_column,
    float_column,
    int_column,
    read_metadata,
    read_table,
    string_column,
)

log = logging.getLogger(__name__)
INDEX_FORMAT = "cmce-index/1"


class IndexLoadError(ValueError):
    """The index is missing, corrupt, or was built for another query model."""


def rejection_mask(uncertainty: np.ndarray, fraction: float) -> np.ndarray:
    """True for the ceil(fraction·n) most uncertain items (ties broken by position, stable)."""
    n = len(uncertainty)
    # never reject everything: an index needs at least one item
    n_reject = min(int(np.ceil(fraction * n - 1e-9)), max(n - 1, 0)) if fraction > 0 else 0
    mask = np.zeros(n, dtype=bool)
    if n_reject:
        mask[np.argsort(-np.asarray(uncertainty), kind="stable")[:n_reject]] = True
    return mask


def build_index(gallery_path: str | Path, out_dir: str | Path, reject_fraction: float = 0.0,
                index_type: str = "flat") -> Path:
    if index_type != "flat":
        raise ValueError(f"unknown index type {index_type!r}; valid types: ['flat']")
    gallery_path = Path(gallery_path)
    meta = read_metadata(gallery_path)
    if meta.get("kind") != "gallery":
        raise TableError(f"{gallery_path}: not a gallery file (kind={meta.get('kind')!r})")
    table = read_table(gallery_path, ["id", "label", "embedding", "uncertainty"])
    emb = normalize(embedding_column(table, "embedding", str(gallery_path)))
    ids = string_column(table, "id", str(gallery_path))
    check_unique_ids(ids, str(gallery_path))
    labels = int_column(table, "label", str(gallery_path))
    unc = float_column(table, "uncertainty", str(gallery_path))
    reject = rejection_mask(unc, reject_fraction)
    keep = ~reject
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb[keep]))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        kept = np.flatnonzero(keep)
        pq.write_table(
            pa.table({"id": [ids[i] for i in kept], "label": labels[keep].astype(np.int32), "uncertainty": unc[keep]}),
            tmp / "ids.parquet",
        )
        rej = np.flatnonzero(reject)
        pq.write_table(pa.table({"id": pa.array([ids[i] for i in rej], pa.string()),
                                 "uncertainty": pa.array(unc[reject], pa.float32())}), tmp / "rejected.parquet")
        info = {
            "format": INDEX_FORMAT,
            "index_type": index_type,
            "metric": "inner_product_on_unit_vectors",
            "dim": int(emb.shape[1]),
            "n_indexed": int(keep.sum()),
            "n_rejected": int(reject.sum()),
            "reject_fraction": reject_fraction,
            "query_model_sha256": meta["query_model_sha256"],
            "members": meta.get("members", []),
            "gallery_sha256": file_sha256(gallery_path),
            "files": {f: file_sha256(tmp / f) for f in ("index.faiss", "ids.parquet", "rejected.parquet")},
        }
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    log.info("built %s index at %s: %d indexed, %d rejected", index_type, out_dir, keep.sum(), reject.sum())
    return out_dir


@dataclass
class LoadedIndex:
    index: Any
    ids: list[str]
    labels: np.ndarray
    uncertainty: np.ndarray
    meta: dict[str, Any]


def load_index(index_dir: str | Path, query_sha256: str | None = None) -> LoadedIndex:
    """Load and verify an index; refuse it when it was built for another query model."""
    d = Path(index_dir)
    restore_dir(d)  # a rebuild killed mid-swap leaves the previous index as .<name>.old
    meta_path = d / "meta.json"
    if not meta_path.exists():
        raise IndexLoadError(f"{d}: not an index directory (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexLoadError(f"{meta_path}: not valid JSON: {err}") from None
    fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if fmt != INDEX_FORMAT:
        raise IndexLoadError(f"{meta_path}: unknown index format {fmt!r}")
    if query_sha256 is not None and meta["query_model_sha256"] != query_sha256:
        raise IndexLoadError(
            f"{d}: index was built for query model {meta['query_model_sha256'][:12]}, "
            f"but query model {query_sha256[:12]} was given; rebuild the index or use the matching query model"
        )
    for name, digest in meta["files"].items():
        if not (d / name).exists() or file_sha256(d / name) != digest:
            raise IndexLoadError(f"{d / name}: missing or does not match the checksum in meta.json")
    table = pq.read_table(d / "ids.parquet")
    index = faiss.read_index(str(d / "index.faiss"))
    return LoadedIndex(
        index=index,
        ids=table.column("id").to_pylist(),
        labels=table.column("label").to_numpy().astype(np.int64),
        uncertainty=table.column("uncertainty").to_numpy(),
        meta=meta,
    )


@dataclass
class SearchResult:
    ids: list[list[str]]
    scores: np.ndarray  # (queries, k)
    uncertainty: np.ndarray  # (queries, k)


def search(loaded: LoadedIndex, queries: np.ndarray, k: int) -> SearchResult:
    """Top-k cosine search for a batch of query embeddings (normalised here)."""
    q = normalize(np.asarray(queries, dtype=np.float32))
    if q.ndim != 2 or q.shape[1] != loaded.meta["dim"]:
        raise IndexLoadError(f"query embeddings have shape {q.shape}, the index expects dimension {loaded.meta['dim']}")
    if not np.isfinite(q).all():
        raise IndexLoadError("query embeddings contain NaN or inf values")
    k = min(k, len(loaded.ids))
    scores, idx = loaded.index.search(np.ascontiguousarray(q), k)
    ids = [[loaded.ids[j] for j in row if j >= 0] for row in idx]
    unc = np.where(idx >= 0, loaded.uncertainty[np.clip(idx, 0, None)], np.nan)
    return SearchResult(ids, scores, unc)
