"""Searching a built index with query images: the query model embeds them, the index answers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cmce.checkpoint import EmbeddingModel, load_embedding_model
from cmce.data.codec import decode_image_as_found, query_image_notes, read_image_file
from cmce.data.loader import same_split, source_of, split_ids_labels
from cmce.data.readers import class_names, iter_split_batches
from cmce.embed import embed_batch, to_inference_device
from cmce.index import LoadedIndex, SearchResult, check_index_rows, load_index, search
from cmce.storage import file_sha256
from cmce.tables import TableError, shown_id

log = logging.getLogger(__name__)


def check_index_follows_gallery(index: LoadedIndex, gallery: Path, index_dir: Path) -> None:
    """The index holds the gallery file's rows (check_index_rows), read from the file."""
    from cmce.tables import embedding_column, int_column, read_table, string_column

    table = read_table(gallery, ["id", "label", "embedding"])
    check_index_rows(index, string_column(table, "id", str(gallery)), int_column(table, "label", str(gallery)),
                     embedding_column(table, "embedding", str(gallery)), gallery, index_dir)


class DatasetSplits:
    """A dataset file's splits, each as first read (its ids and labels, and their digests, from one read), kept:
    the server reads the class names once, so a dataset file replaced later must not vouch for a reloaded index."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = functools.cache(lambda split: split_ids_labels(path, split))
        self.source = functools.cache(lambda split: source_of(*self.rows(split)))  # hashed once, not every reload


class OtherDataset(ValueError):
    """The dataset file reads well but is not (or may not be) the one the index's gallery was embedded from."""


def check_dataset_of_index(dataset: DatasetSplits, index: LoadedIndex) -> None:
    """The class names must come from the dataset the gallery was embedded from: its split's digests, which
    build-index records from the gallery (an index built before it was recorded is not checked), and each indexed
    item's label, which must be its label in that split: ids.parquet's labels edited (its checksum rewritten to
    match) answered each hit with another class's name. That is a TableError; OtherDataset says only that the
    dataset is another one (or, for an index that records no labels digest, may be another version of it); a
    dataset file that cannot be read raises as it does anywhere else."""
    meta = index.meta
    source, split = meta.get("source"), meta.get("split")
    if not source or not split:
        log.warning("the index records no dataset digest (built before it did); class names from %s are not "
                    "checked", dataset.path)
        return
    if not same_split(dataset.source(split), source):
        raise OtherDataset(f"--dataset {dataset.path}: its '{split}' split is not the one the index's gallery was "
                         "embedded from (another dataset or version); class names would be wrong")
    ids, labels = dataset.rows(split)
    # an index built before labels_sha256 was recorded: a relabelled version of the dataset passes the ids digest
    edited = TableError if "labels_sha256" in source else OtherDataset
    at = pc.index_in(pa.array(index.ids, pa.string()), value_set=ids).to_numpy(zero_copy_only=False)
    if np.isnan(at).any():  # (index_in gives null, a NaN here, for an id the split lacks)
        row = int(np.flatnonzero(np.isnan(at))[0])
        raise edited(f"the index's item {shown_id(index.ids[row])} is not in the '{split}' split of --dataset "
                     f"{dataset.path}: ids.parquet was edited or is of another build; build the index again")
    backwards = np.flatnonzero(np.diff(at) <= 0)  # build-index keeps the split's order: rows swapped with their
    if backwards.size:  # labels pass the checks above
        row = int(backwards[0]) + 1
        raise edited(f"the index's item {shown_id(index.ids[row])} (row {row} of ids.parquet) is out of the order of "
                     f"the '{split}' split of --dataset {dataset.path}: ids.parquet was edited or is of another build; "
                     "build the index again")
    differ = np.flatnonzero(labels[at.astype(np.int64)] != index.labels)
    if differ.size:
        row = int(differ[0])
        raise edited(f"the index's item {shown_id(index.ids[row])} has label {index.labels[row]}, its label in "
                     f"--dataset {dataset.path} is {labels[int(at[row])]} ({differ.size} such item(s)): "
                     "ids.parquet was edited or is of another build; build the index again")


def hit_lists(result: SearchResult, labels: np.ndarray, classes: list[str] | None) -> list[list[dict]]:
    """Each query's hits as `cmce search` prints them and the server answers them: id, score, uncertainty, the
    item's label (the index's) and class name (None without `classes`, or for a label they do not name)."""
    out = []
    for ids, scores, unc, rows in zip(result.ids, result.scores, result.uncertainty, result.rows, strict=True):
        hits = []
        for id_, score, u, row in zip(ids, scores, unc, rows, strict=False):  # ids: only the hits found
            label = int(labels[row])
            name = classes[label] if classes is not None and 0 <= label < len(classes) else None
            hits.append({"id": id_, "score": float(score), "uncertainty": float(u), "label": label,
                         "class_name": name})
        out.append(hits)
    return out


def read_query_image(model: EmbeddingModel, name: str, path: Path) -> np.ndarray:
    """A query image file as the model reads it; one of another size or mode is converted, and said so once."""
    # refused unread past what an image within the pixel limit can be: an 8 GB file was read whole into memory
    arr, found = decode_image_as_found(read_image_file(path), model.in_channels, model.image_size, name)
    for note in query_image_notes(found, model.in_channels, model.image_size):
        log.warning("%s: %s", name, note)
    return arr


def embed_queries(model: EmbeddingModel, images: list[tuple[str, Path]], dataset: Path | None, split: str,
                  limit: int) -> tuple[list[str], np.ndarray]:
    """The query names and embeddings: the `images` (name, local file), else the first `limit` images (0: all)
    of a dataset split."""
    names: list[str] = []
    embs = []
    for name, path in images:
        names.append(name)
        embs.append(embed_batch(model, torch.from_numpy(read_query_image(model, name, path)[None])))
    if not images and dataset is not None:
        for batch in iter_split_batches(dataset, split, 256, model.in_channels, model.image_size):
            names += batch.ids
            embs.append(embed_batch(model, batch.images))
            if limit and len(names) >= limit:
                break
    if not embs:
        raise ValueError("no query images given: pass --images or --dataset")
    return names[: limit or None], np.concatenate(embs)[: limit or None]


def search_images(index_dir: Path, query_model: Path, images: list[tuple[str, Path]] = (),  # type: ignore[assignment]
                  dataset: Path | None = None, split: str = "test", limit: int = 0, k: int = 5,
                  gallery: Path | None = None, exclude_self: bool = False) -> Iterator[dict]:
    """One {"query", "hits"} per query (see embed_queries, hit_lists; the dataset's class names label the hits).
    The index refuses another query model, and when `gallery` is given, an index built from another version of
    that gallery file. `exclude_self`: a hit with the query's own id is dropped (leave-one-out, as evaluate
    scores a split against itself)."""
    model = load_embedding_model(query_model)
    to_inference_device(model)
    loaded = load_index(index_dir, query_sha256=model.sha256, query_dim=model.embedding_dim,
                        gallery_sha256=file_sha256(gallery) if gallery is not None else None)
    if gallery is not None:
        check_index_follows_gallery(loaded, gallery, index_dir)
    named = dataset is not None
    if named:  # before the queries are embedded: an edited index is refused at once
        try:  # queries from another dataset may be searched, but its class names are not the hits' (serve refuses)
            check_dataset_of_index(DatasetSplits(dataset), loaded)
        except OtherDataset as err:  # a file that cannot be read, or an edited index, is an error as ever
            log.warning("%s; the hits' class_name is left null", err)
            named = False
    names, queries = embed_queries(model, images, dataset, split, limit)
    classes = class_names(dataset) if named else None
    result = search(loaded, queries, k + exclude_self)  # one more, in case the query itself is among them
    for q, hits in zip(names, hit_lists(result, loaded.labels, classes), strict=True):
        yield {"query": q, "hits": [h for h in hits if h["id"] != q][:k] if exclude_self else hits}
