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


def check_ids_follow_gallery(ids: list[str], gallery: Path, index_dir: Path) -> None:
    """The index's ids are the gallery's, in the gallery's order, less the rejected: build-index writes them so.
    ids.parquet's rows shuffled (its checksum rewritten to match) answered every query with another item's id."""
    from cmce.tables import read_table, string_column

    indexed = set(ids)
    expected = [i for i in string_column(read_table(gallery, ["id"]), "id", str(gallery)) if i in indexed]
    if expected != ids:
        row = next((k for k, (a, b) in enumerate(zip(expected, ids, strict=False)) if a != b), len(expected))
        found = ids[row] if row < len(ids) else "nothing"
        raise ValueError(f"{index_dir}/ids.parquet: row {row} holds {found!r} where the gallery {gallery} puts "
                         f"{expected[row] if row < len(expected) else 'no item'!r}: its ids are not the gallery's "
                         "(edited or of another build); build the index again")


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
    if gallery is not None:
        check_ids_follow_gallery(loaded.ids, gallery, index_dir)
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
