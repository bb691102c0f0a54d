"""Change a live gallery without re-reading what need not be read.

- add_member: add one gallery model to the ensemble from its per-model file; the stored running sum S
  and count N give the new mean and uncertainty, the existing members are not recomputed.
- upgrade_query_model: refit every transformation from the stored raw gallery-model embeddings of the
  training images and the new query model's embeddings of those images, re-transform the stored raw
  gallery embeddings, and rebuild the ensemble. Gallery images are never opened.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmce.checkpoint import load_embedding_model, require_classes, require_role
from cmce.config import TransformConfig
from cmce.data.loader import same_split, split_source
from cmce.embed import embed_split, ensemble_columns, same_embeddings
from cmce.method import RunningEnsemble
from cmce.provenance import repeated_model
from cmce.storage import atomic_dir, atomic_path, inputs_unchanged, named_on_failure, regular_files
from cmce.tables import (
    IdsDigest,
    TableError,
    check_digest,
    check_finite,
    check_rows_are_split,
    embedding_column,
    holds_whole_split,
    int_column,
    iter_batches,
    read_metadata,
    read_table,
    stored_dim,
    stored_running_sum,
    string_column,
    writer_options,
)
from cmce.transform import Transformation, fit_transformation, save_transformation

log = logging.getLogger(__name__)


def aligned_batches(paths: list[Path], batch_size: int) -> Iterator[list[pa.Table]]:
    """Read several Parquet files in lockstep, yielding equal-length slices whatever their row groups."""
    readers = [iter_batches(p, batch_size) for p in paths]
    buffers = [pa.table({}) for _ in paths]
    done = [False] * len(paths)
    while True:
        for i, reader in enumerate(readers):
            while not done[i] and buffers[i].num_rows < batch_size:
                try:
                    batch = pa.Table.from_batches([next(reader)])
                    buffers[i] = batch if buffers[i].num_columns == 0 else pa.concat_tables([buffers[i], batch])
                except StopIteration:
                    done[i] = True
        n = min(b.num_rows for b in buffers)
        if n == 0:
            if any(b.num_rows for b in buffers):
                raise TableError(f"{[str(p) for p in paths]}: files have different row counts")
            return
        yield [b.slice(0, n) for b in buffers]
        buffers = [b.slice(n) for b in buffers]


def _gallery_schema(base: pa.Schema, extra: list[tuple[str, pa.DataType]], meta: dict) -> pa.Schema:
    fields = [base.field(i) for i in range(len(base))] + [pa.field(n, t) for n, t in extra]
    return pa.schema(fields).with_metadata({"cmce": json.dumps(meta, sort_keys=True)})




def add_member(gallery: str | Path, member: str | Path, out: str | Path, batch_size: int = 8192,
               before_commit: Callable[[Path], None] | None = None) -> Path:
    """New gallery file = `gallery` plus the model in `member` (a per-model file from embed-member).
    `before_commit(written)` runs on the new gallery, written aside, before it is renamed in (an index built
    from it and put in place first: a failure there leaves the old gallery)."""
    gallery, member = Path(gallery), Path(member)
    with inputs_unchanged([gallery, member]):  # every atomic write below checks them before its rename
        gmeta, mmeta = read_metadata(gallery), read_metadata(member)
        if gmeta.get("kind") != "gallery" or mmeta.get("kind") != "gallery_member":
            raise TableError(f"{gallery} must be a gallery file and {member} a per-model file")
        if mmeta["query_model_sha256"] != gmeta["query_model_sha256"]:
            raise TableError(f"{member}: transformed for query model {mmeta['query_model_sha256'][:12]}, the gallery "
                             f"for {gmeta['query_model_sha256'][:12]}")
        name = mmeta["gallery_model"]["name"]
        if not same_split(mmeta.get("source"), gmeta.get("source")):
            raise TableError(f"{member}: embeds another dataset file or split than {gallery} (their 'source' differs)")
        if name in {m["name"] for m in gmeta["members"]}:
            raise TableError(f"{gallery}: already has a member named {name!r}")
        if twice := repeated_model([*gmeta["members"], mmeta["gallery_model"]]):
            raise TableError(f"{member}: gallery model {twice} is already a member of {gallery}")
        added = {**mmeta["gallery_model"], "transformation_sha256": mmeta["transformation_sha256"]}
        new_meta = {**gmeta, "members": [*gmeta["members"], added]}
        g_schema = pq.read_schema(gallery)
        raw_type = pq.read_schema(member).field("raw").type
        schema = _gallery_schema(g_schema, [(f"raw_{name}", raw_type)], new_meta)
        dim = stored_dim(g_schema, "embedding", str(gallery))
        digest = IdsDigest()
        with atomic_path(out) as tmp:
            with pq.ParquetWriter(tmp, schema, **writer_options(schema)) as writer:
                _write_grown(gallery, member, gmeta, name, schema, dim, writer, digest, batch_size)
            if holds_whole_split(gmeta):
                check_digest(digest, gmeta["source"], str(gallery), f"the '{gmeta['split']}' split it records",
                             labels=True)
            if before_commit is not None:
                before_commit(tmp)
    log.info("added %s to %s → %s (%d members)", name, gallery, out, len(new_meta["members"]))
    return Path(out)


def _write_grown(gallery: Path, member: Path, gmeta: dict, name: str, schema: pa.Schema, dim: int,
                 writer: pq.ParquetWriter, digest: IdsDigest, batch_size: int) -> None:
    """The gallery's rows, one batch at a time, with the new member's embeddings added to the running sum."""
    first_row = 0
    for batch, (g, m) in enumerate(aligned_batches([gallery, member], batch_size)):
        if batch == 0:
            same_embeddings([*((f"{gallery} (member {n['name']})", g.column(f"raw_{n['name']}"))
                               for n in gmeta["members"] if f"raw_{n['name']}" in g.column_names),
                             (str(member), m.column("raw"))])
        ids = string_column(g, "id", str(gallery))
        check_finite(g, str(gallery), first_row)  # both copied into the new gallery as they are
        check_finite(m, str(member), first_row)
        first_row += len(g)
        if string_column(m, "id", str(member)) != ids:
            raise TableError(f"{member}: ids are not in the gallery's order")
        digest.update(ids, int_column(g, "label", str(gallery)))
        if not np.array_equal(int_column(m, "label", str(member)), int_column(g, "label", str(gallery))):
            raise TableError(f"{member}: labels differ from {gallery} for the same ids (another version of the "
                             "dataset)")
        members = len(gmeta["members"])
        ens = RunningEnsemble(stored_running_sum(g, members, str(gallery), dim), members)
        ens.add(embedding_column(m, "transformed", str(member), dim), f"{member}: column 'transformed'")
        cols = {c: g.column(c) for c in g.column_names}
        cols |= ensemble_columns(ens)
        cols[f"raw_{name}"] = m.column("raw")
        writer.write_table(pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema))


def train_embedding_files(paths: list[Path]) -> list[Path]:
    """Files as given; a folder gives the train-embeddings files in it, so that an add-gallery-model
    --work-dir (which also holds member files) can be passed whole."""
    out: list[Path] = []
    for p in paths:
        if not p.is_dir():
            out.append(p)
            continue
        found = [f for f in regular_files(sorted(p.glob("*.parquet")), str(p))
                 if read_metadata(f).get("kind") == "train_embeddings"]
        if not found:
            raise TableError(f"{p}: folder holds no train-embeddings files (*.parquet of kind 'train_embeddings')")
        out += found
    return out


def upgrade_query_model(
    gallery: str | Path,
    new_query_model: str | Path,
    dataset: str | Path,
    train_embeddings: list[str | Path],
    cfg: TransformConfig,
    transforms_dir: str | Path,
    out: str | Path,
    seed: int = 0,
    batch_size: int = 256,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Refit all transformations for a new query model and rebuild the gallery from stored embeddings.

    Reads only the train split of `dataset` (to embed the training images with the new query model)
    and the raw gallery-model embeddings stored in `gallery` and `train_embeddings`. `transforms_dir`
    is replaced as a whole once every transformation is fitted, then the gallery file is written.
    `before_commit(written)` runs on the new gallery, written aside, before either is put in place.
    """
    gallery = Path(gallery)
    gmeta = read_metadata(gallery)
    if gmeta.get("kind") != "gallery":
        raise TableError(f"{gallery}: not a gallery file")
    query = require_role(load_embedding_model(new_query_model), "query", f"--query-model {new_query_model}")
    stored = {}
    for path in train_embeddings:
        meta = read_metadata(path)
        if meta.get("kind") != "train_embeddings":
            raise TableError(f"{path}: not a train-embeddings file (kind={meta.get('kind')!r})")
        sha = meta["gallery_model"]["sha256"]
        if sha in stored and stored[sha] != Path(path):  # the last one won, without a word
            raise TableError(f"{path} and {stored[sha]}: two train-embeddings files of gallery model "
                             f"{meta['gallery_model'].get('name')!r}; give one")
        stored[sha] = Path(path)
    train = split_source(dataset, "train")
    for member in gmeta["members"]:  # before any fit: a missing one was found after every other was refitted
        if member["sha256"] not in stored:
            raise TableError(f"no stored train embeddings for gallery model {member['name']!r} "
                             f"({member['sha256'][:12]}) among {[str(p) for p in train_embeddings]}")
        # the whole train split, with its labels: 3 rows of 1,258 refitted every transformation, exit 0
        at = stored[member["sha256"]]
        rows = read_table(at, ["id", "label"])
        labels = int_column(rows, "label", str(at))
        check_rows_are_split(string_column(rows, "id", str(at)), train, str(at), f"the train split of {dataset}",
                             labels,
                             why="the stored embeddings and the dataset differ (cut, edited, or another version): "
                                 "give the dataset they were embedded from, or store them again (fit-transform "
                                 "--train-embeddings-out)")
    if gmeta["members"]:  # the frozen classifier the refits score against, as fit-transform checks it (labels past
        # its rows failed deep in torch after the embedding; all-zero rows were fitted against without a word)
        require_classes(query, labels, f"--query-model {new_query_model}")
    table = read_table(gallery)
    check_finite(table, str(gallery))  # its raw_* columns are read once every transformation is refitted
    if holds_whole_split(gmeta):
        check_rows_are_split(string_column(table, "id", str(gallery)), gmeta["source"], str(gallery),
                             f"the '{gmeta['split']}' split it records", int_column(table, "label", str(gallery)))
    q_train = embed_split(query, dataset, "train", batch_size)
    members, fitted = [], []
    for member in gmeta["members"]:
        stored_at = stored[member["sha256"]]
        tr = read_table(stored_at, ["id", "label", "raw"])
        # checked above to be the split's rows in its order; again here, in the read the pairs come from (a file
        # replaced meanwhile would pair other images' embeddings)
        if (string_column(tr, "id", str(stored_at)) != q_train.ids
                or not np.array_equal(int_column(tr, "label", str(stored_at)), q_train.labels)):
            raise TableError(f"{stored_at}: its rows are no longer those of the train split of {dataset} (a file "
                             "replaced while upgrade-query-model ran); run it again")
        raw_train = embedding_column(tr, "raw", str(stored_at))
        mlp, history = fit_transformation(raw_train, q_train.embeddings, q_train.labels,
                                          query.classifier, cfg, seed, f"T[{member['name']}]",
                                          query_scale=query.scale)
        fitted.append(Transformation(mlp, member["name"], member["sha256"], query.sha256, raw_train.shape[1],
                                     query.embedding_dim, cfg.hidden_dim, cfg.depth, history=history))
    # everything is fitted before anything is written: a failure above leaves the old state intact. The new
    # gallery is written (aside) before the transformations are swapped in, so that a failed write (a full
    # disk) leaves both as they were; the gallery is renamed in last (after an index built from it, if any).
    with atomic_path(out) as tmp_gallery:
        with atomic_dir(transforms_dir, ("*.pt",)) as tmp_dir:
            for t in fitted:
                save_transformation(t, tmp_dir / f"{t.gallery_model}.pt")
            ens = RunningEnsemble()
            for member, t in zip(gmeta["members"], fitted, strict=True):
                ens.add(t.apply(embedding_column(table, f"raw_{member['name']}", str(gallery))),
                        f"{gallery}: column 'raw_{member['name']}' after its new transformation")
                members.append({**{k: member[k] for k in member if k != "transformation_sha256"},
                                "transformation_sha256": t.sha256})
            cols = {c: table.column(c) for c in table.column_names}
            cols |= ensemble_columns(ens)
            meta = {**gmeta, "query_model_sha256": query.sha256, "members": members,
                    "upgraded_from_query_model_sha256": gmeta["query_model_sha256"]}
            new = pa.table(cols).replace_schema_metadata({"cmce": json.dumps(meta, sort_keys=True)})
            with named_on_failure(out):
                pq.write_table(new, tmp_gallery, row_group_size=8192, **writer_options(new.schema))
            if before_commit is not None:
                before_commit(tmp_gallery)
    log.info("upgraded %s to query model %s → %s", gallery, query.sha256[:12], out)
    return Path(out)
