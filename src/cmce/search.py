"""Searching a built index with query images: the query model embeds them, the index answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cmce.checkpoint import load_embedding_model
from cmce.data.codec import decode_image
from cmce.data.readers import iter_split_batches
from cmce.embed import embed_batch, to_inference_device
from cmce.index import load_index, search
from cmce.storage import file_sha256


def search_images(index_dir: Path, query_model: Path, images: list[tuple[str, Path]] = (),  # type: ignore[assignment]
                  dataset: Path | None = None, split: str = "test", limit: int = 0, k: int = 5,
                  gallery: Path | None = None) -> Iterator[dict]:
    """One {"query", "hits": [{"id", "score", "uncertainty"}]} per query: the `images` (name, local file),
    else the first `limit` images (0: all) of a dataset split. The index refuses another query model, and
    when `gallery` is given, an index built from another version of that gallery file."""
    model = load_embedding_model(query_model)
    to_inference_device(model)
    loaded = load_index(index_dir, query_sha256=model.sha256, query_dim=model.embedding_dim,
                        gallery_sha256=file_sha256(gallery) if gallery is not None else None)
    names: list[str] = []
    embs = []
    for name, path in images:
        arr = decode_image(path.read_bytes(), model.in_channels, model.image_size, name)
        names.append(name)
        embs.append(embed_batch(model, torch.from_numpy(arr[None])))
    if not images and dataset is not None:
        for batch in iter_split_batches(dataset, split, 256, model.in_channels, model.image_size):
            names += batch.ids
            embs.append(embed_batch(model, batch.images))
            if limit and len(names) >= limit:
                break
    if not embs:
        raise ValueError("no query images given: pass --images or --dataset")
    queries = np.concatenate(embs)[: limit or None]
    result = search(loaded, queries, k)
    for q, ids, scores, unc in zip(names, result.ids, result.scores, result.uncertainty, strict=False):
        yield {"query": q, "hits": [{"id": i, "score": round(float(s), 6), "uncertainty": round(float(u), 6)}
                                    for i, s, u in zip(ids, scores, unc, strict=False)]}
