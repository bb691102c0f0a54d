"""Embedding: stream a dataset split through a model in batches; write per-model embedding files and
combine them into the gallery file (ensemble embedding, uncertainty, running sum, raw embeddings).

Per-model file (one gallery model): id, label, raw (its own space), transformed (query space, unit).
Gallery file: id, label, embedding (unit, query space), uncertainty, ensemble_sum, n_models,
raw_<model> for every member (kept so transformations can be refitted without re-reading images).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from cmce import device as devices
from cmce.checkpoint import EmbeddingModel, load_embedding_model
from cmce.data.augment import augment
from cmce.data.codec import to_float
from cmce.data.loader import WHOLE, Shard, iter_split_chunks, rebatch, same_split, split_source
from cmce.data.readers import SplitArrays
from cmce.method import RunningEnsemble
from cmce.provenance import repeated_model
from cmce.storage import atomic_path, inputs_unchanged
from cmce.tables import (
    IdsDigest,
    TableError,
    check_digest,
    check_finite,
    check_unique_ids,
    embedding_array,
    embedding_column,
    holds_whole_split,
    int_column,
    iter_batches,
    open_parquet,
    read_metadata,
    read_row_group,
    read_schema,
    shown_id,
    string_column,
    writer_options,
)
from cmce.transform import load_transformation

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    ids: list[str]
    labels: np.ndarray
    embeddings: np.ndarray  # float32 (rows, dim), raw model output


def to_inference_device(model: EmbeddingModel) -> torch.device:
    """Put the model in eval mode on this process's device (cmce.device), channels_last on CUDA."""
    device = devices.current()
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.net.eval().to(device, memory_format=layout)
    return device


@torch.no_grad()
def embed_batch(model: EmbeddingModel, images_uint8: torch.Tensor, mixed_precision: bool | None = None) -> np.ndarray:
    """Raw float32 embeddings of a uint8 batch on the model's device. mixed_precision (default: on CUDA)
    runs bf16 autocast on channels_last input: the fast path of convolutions on tensor-core GPUs;
    embeddings are returned in float32 and normalised downstream, so bf16 rounding stays far below
    retrieval noise (tests/test_embed.py bounds it)."""
    device = next(model.net.parameters()).device
    x = to_float(images_uint8.to(device, non_blocking=True))
    if device.type == "cuda" if mixed_precision is None else mixed_precision:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model.net(x.contiguous(memory_format=torch.channels_last))
        return out.float().cpu().numpy()
    return model.net(x).cpu().numpy().astype(np.float32, copy=False)


def iter_embeddings(
    model: EmbeddingModel, dataset: str | Path, split: str, batch_size: int, shard: Shard = WHOLE,
    workers: int = 0,
) -> Iterator[tuple[SplitArrays, np.ndarray]]:
    """(batch, raw embeddings) in file order for one split (or one shard of it); `workers` decode
    processes feed the model while it runs."""
    to_inference_device(model)
    chunks = iter_split_chunks(dataset, split, model.in_channels, model.image_size, shard, workers)
    desc = f"embed {model.name} [{split}{'' if shard.count == 1 else f' shard {shard}'}]"
    for batch in tqdm(rebatch(chunks, batch_size), desc=desc, leave=False, mininterval=2, disable=None):
        yield batch, finite(embed_batch(model, batch.images), model, batch.ids, dataset)


def finite(emb: np.ndarray, model: EmbeddingModel, ids: list[str], dataset: str | Path) -> np.ndarray:
    """The batch's embeddings, refused naming the model file when one is not finite (finite weights that overflow):
    the step that read them named no model (`gallery embeddings contain NaN or inf values`)."""
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise ValueError(f"{model.shown}: its embedding of id {shown_id(ids[int(np.flatnonzero(bad)[0])])} in "
                         f"{dataset} is not finite (its weights overflow)")
    return emb


def same_embeddings(raws: list[tuple[str, pa.Array]]) -> None:
    """Refuse two members whose raw embeddings are equal: one model's weights saved again under a new name (so a
    new sha256) were taken as a third model, weighed twice in the ensemble and counted twice in its uncertainty."""
    for i, (a_name, a) in enumerate(raws):
        for b_name, b in raws[i + 1:]:
            if a.type == b.type and a.equals(b):
                raise TableError(f"{b_name}: its embeddings equal those of {a_name}: one gallery model under two "
                                 "names; give each model once")


def embed_split(model: EmbeddingModel, dataset: str | Path, split: str, batch_size: int = 256) -> Embedded:
    ids, labels, embs = [], [], []
    for batch, emb in iter_embeddings(model, dataset, split, batch_size):
        ids += batch.ids
        labels.append(batch.labels)
        embs.append(emb)
    return Embedded(ids, np.concatenate(labels), np.concatenate(embs))


def view_generator(seed: int, view: int) -> torch.Generator:
    """The random stream of one augmented view: its own, so a view's copies do not depend on how the
    views are interleaved."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, view]).generate_state(1)[0]))


def embed_augmented_views(
    models: list[EmbeddingModel], dataset: str | Path, split: str, views: int, seed: int, batch_size: int = 256,
    hflip: bool = True,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Every model's embeddings of `views` augmented copies of each image of the split (the same copy
    for every model, so the rows pair up), and their labels; view after view, each in file order. The
    split is decoded once: each batch is augmented once per view (mirrored at random only with `hflip`)."""
    first = models[0]
    for m in models[1:]:
        if (m.in_channels, m.image_size) != (first.in_channels, first.image_size):
            raise ValueError(f"models {first.name!r} and {m.name!r} read images of different shape; "
                             f"augmented views need one shape")
    no_rows = [np.zeros((0, m.embedding_dim), np.float32) for m in models], np.zeros(0, np.int64)
    if views == 0:
        return no_rows
    gens = [view_generator(seed, view) for view in range(views)]  # on the CPU: the views are the same on any device
    embs: list[list[list[np.ndarray]]] = [[[] for _ in models] for _ in range(views)]  # [view][model][batch]
    labels = []
    device = devices.current()
    for m in models:
        to_inference_device(m)
    chunks = iter_split_chunks(dataset, split, first.in_channels, first.image_size)
    for batch in tqdm(rebatch(chunks, batch_size), desc=f"{views} augmented views", leave=False, mininterval=2,
                      disable=None):
        labels.append(batch.labels)
        for gen, view_embs in zip(gens, embs, strict=True):
            images = augment(batch.images, gen, hflip=hflip).to(device, non_blocking=True)
            for out, m in zip(view_embs, models, strict=True):
                out.append(finite(embed_batch(m, images), m, batch.ids, dataset))
    if not labels:
        return no_rows
    per_model = [np.concatenate([b for view_embs in embs for b in view_embs[i]]) for i in range(len(models))]
    return per_model, np.tile(np.concatenate(labels), views)


def member_metadata(name: str, arch: str, sha256: str, transformation_sha256: str, query_sha256: str,
                    split: str, source: dict | None = None) -> dict:
    """`source`: the split's row count and ids digest (cmce.data.loader.split_source)."""
    return {
        "kind": "gallery_member",
        "split": split,
        **({"source": source} if source else {}),
        "gallery_model": {"name": name, "arch": arch, "sha256": sha256},
        "transformation_sha256": transformation_sha256,
        "query_model_sha256": query_sha256,
    }


def member_schema(raw_dim: int, query_dim: int, meta: dict) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("label", pa.int32()),
            ("raw", pa.list_(pa.float32(), raw_dim)),
            ("transformed", pa.list_(pa.float32(), query_dim)),
        ]
    ).with_metadata({"cmce": json.dumps(meta, sort_keys=True)})


def member_table(ids: list[str], labels: np.ndarray, raw: np.ndarray, transformed: np.ndarray,
                 schema: pa.Schema) -> pa.Table:
    cols = [pa.array(ids, pa.string()), pa.array(np.asarray(labels, np.int32)), embedding_array(raw),
            embedding_array(transformed)]
    return pa.Table.from_arrays(cols, schema=schema)


def embed_with_model(
    dataset: str | Path,
    model_path: str | Path,
    transform_path: str | Path,
    query_sha256: str,
    out: str | Path,
    split: str = "test",
    batch_size: int = 256,
    shard: Shard = WHOLE,
    workers: int = 0,
) -> Path:
    """Embed one split (or one shard of it) with one gallery model and its transformation; stream
    batches to Parquet."""
    with inputs_unchanged([dataset]):  # every atomic write below checks them before its rename
        model = load_embedding_model(model_path)
        t = load_transformation(transform_path, query_sha256=query_sha256, gallery_sha256=model.sha256)
        meta = member_metadata(model.name, model.arch, model.sha256, t.sha256, query_sha256, split,
                               split_source(dataset, split))
        if shard.count > 1:
            meta["shard"] = str(shard)
        schema = member_schema(model.embedding_dim, t.out_dim, meta)
        out = Path(out)
        with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema, **writer_options(schema)) as writer:
            for batch, raw in iter_embeddings(model, dataset, split, batch_size, shard, workers):
                writer.write_table(member_table(batch.ids, batch.labels, raw, t.apply(raw), schema))
    log.info("wrote %s (%s, %s split)", out, model.name, split)
    return out


def ensemble_columns(ens: RunningEnsemble) -> dict[str, pa.Array]:
    """The gallery file's ensemble columns, derived from the running sum and count."""
    return {
        "embedding": embedding_array(ens.embedding),
        "uncertainty": pa.array(ens.uncertainty),
        "ensemble_sum": embedding_array(ens.sum.astype(np.float32)),
        "n_models": pa.array(np.full(len(ens.sum), ens.n_models, np.int32)),
    }


def combine_members(member_paths: list[str | Path], out: str | Path, batch_size: int = 8192) -> Path:
    """Combine per-model embedding files into the gallery file, batch by batch (bounded memory)."""
    if not member_paths:
        raise ValueError("combine needs at least one per-model embedding file")
    with inputs_unchanged(member_paths):  # every atomic write below checks them before its rename
        metas = [read_metadata(p) for p in member_paths]
        for p, m in zip(member_paths, metas, strict=True):
            if m.get("kind") != "gallery_member":
                raise TableError(f"{p}: not a per-model gallery embedding file (kind={m.get('kind')!r})")
        query_sha = {m["query_model_sha256"] for m in metas}
        if len(query_sha) != 1:
            raise TableError(f"{member_paths}: members were transformed for different query models {sorted(query_sha)}")
        names = [m["gallery_model"]["name"] for m in metas]
        if len(set(names)) != len(names):
            shown = "; ".join(f"{p}: {n}" for p, n in zip(member_paths, names, strict=True))
            raise TableError(f"a gallery model is named twice among the members ({shown})")
        if twice := repeated_model([m["gallery_model"] for m in metas]):
            raise TableError(f"{member_paths}: gallery model {twice} given twice; give each model once")
        for p in member_paths:
            read_schema(p, ["id", "label", "raw", "transformed"])
        shards = [m.get("shard") for m in metas]
        if len(set(shards)) != 1:  # before the row counts, which a shard beside a whole file also differs in
            shown = "; ".join(f"{p}: {f'shard {k}' if k else 'the whole split'}" for p, k in zip(member_paths, shards,
                                                                                               strict=True))
            raise TableError(f"members cover different parts of the split ({shown}); combine members of one shard, "
                             "or merge each member's shards first (cmce merge)")
        files = [open_parquet(p) for p in member_paths]
        rows = [f.metadata.num_rows for f in files]
        if len(set(rows)) != 1:
            shown = "; ".join(f"{p}: {n} rows" for p, n in zip(member_paths, rows, strict=True))
            raise TableError(f"members have different row counts ({shown})")
        t_type = files[0].schema_arrow.field("transformed").type
        if not pa.types.is_fixed_size_list(t_type):
            raise TableError(
                f"{member_paths[0]}: column 'transformed' has type {t_type}, expected fixed_size_list<float32>"
            )
        q_dim = t_type.list_size
        fields = [
            ("id", pa.string()),
            ("label", pa.int32()),
            ("embedding", pa.list_(pa.float32(), q_dim)),
            ("uncertainty", pa.float32()),
            ("ensemble_sum", pa.list_(pa.float32(), q_dim)),
            ("n_models", pa.int32()),
        ] + [(f"raw_{n}", f.schema_arrow.field("raw").type) for n, f in zip(names, files, strict=True)]
        if not all(same_split(m.get("source"), metas[0].get("source")) for m in metas):
            raise TableError(f"{member_paths}: members embed different dataset files or splits (their 'source' "
                             "differs)")
        meta = {
            "kind": "gallery",
            "split": metas[0]["split"],
            **({"shard": metas[0]["shard"]} if metas[0].get("shard") else {}),
            **({"source": metas[0]["source"]} if metas[0].get("source") else {}),
            "query_model_sha256": query_sha.pop(),
            "members": [{**m["gallery_model"], "transformation_sha256": m["transformation_sha256"]} for m in metas],
        }
        schema = pa.schema(fields).with_metadata({"cmce": json.dumps(meta, sort_keys=True)})
        out = Path(out)
        iters = [iter_batches(p, batch_size) for p in member_paths]
        seen: set[str] = set()
        digest = IdsDigest()
        with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema, **writer_options(schema)) as writer:
            for batch, parts in enumerate(zip(*iters, strict=True)):
                tables = [pa.Table.from_batches([b]) for b in parts]
                ids = string_column(tables[0], "id", str(member_paths[0]))
                labels = int_column(tables[0], "label", str(member_paths[0]))
                check_unique_ids(ids, str(member_paths[0]), seen)
                digest.update(ids, labels)
                ens = RunningEnsemble()
                raws = []
                for p, t in zip(member_paths, tables, strict=True):
                    if string_column(t, "id", str(p)) != ids:
                        raise TableError(f"{p}: ids are not in the same order as {member_paths[0]}")
                    if not np.array_equal(int_column(t, "label", str(p)), labels):
                        raise TableError(f"{p}: labels differ from {member_paths[0]} for the same ids (another version "
                                         "of the dataset)")
                    ens.add(embedding_column(t, "transformed", str(p), q_dim), f"{p}: column 'transformed'")
                    embedding_column(t, "raw", str(p))  # checked here so no NaN reaches the gallery file
                    raws.append(t.column("raw").combine_chunks())
                if batch == 0:  # its rows tell one model's embeddings under two names (and two sha256s) apart
                    same_embeddings([(str(p), r) for p, r in zip(member_paths, raws, strict=True)])
                cols = [
                    pa.array(ids),
                    pa.array(labels.astype(np.int32)),
                    *ensemble_columns(ens).values(),
                    *raws,
                ]
                writer.write_table(pa.Table.from_arrays(cols, schema=schema))
            if holds_whole_split(meta):
                check_digest(digest, meta["source"], ", ".join(map(str, member_paths)), "the split they record",
                             labels=True)
    log.info("wrote %s (%d members: %s)", out, len(names), names)
    return out


def schema_difference(got: pa.Schema, wanted: pa.Schema) -> str:
    """The first column two schemas disagree on, said (`label: int64, not int32`)."""
    for field in wanted:
        if field.name not in got.names:
            return f"no column {field.name!r}"
        theirs = got.field(field.name)
        if theirs.type != field.type:
            return f"{field.name}: {theirs.type}, not {field.type}"
        if theirs.nullable != field.nullable:
            return f"{field.name}: {'nullable' if theirs.nullable else 'not null'} here, not there"
        if theirs != field:
            return f"{field.name}: other field metadata"
    extra = [name for name in got.names if name not in wanted.names]
    return f"column {extra[0]!r} besides" if extra else "the same columns in another order"


def merge_shards(shard_paths: list[str | Path], out: str | Path) -> Path:
    """Concatenate the shards of one file (gallery or per-model) into one, row group by row group.

    Shards go in shard order (read from their metadata, whatever the argument order); all K shards
    must be present once and otherwise identical metadata. A file without shard metadata is the one
    shard of K = 1. Memory: one row group at a time, plus
    the id set used to prove the shards are disjoint.
    """
    if not shard_paths:
        raise ValueError("merge needs at least one shard file")
    with inputs_unchanged(shard_paths):  # every atomic write below checks them before its rename
        metas = {Path(p): read_metadata(p) for p in shard_paths}
        kinds = {str(m.get("kind")) for m in metas.values()}
        if len(kinds) > 1:
            raise TableError(f"{[str(p) for p in shard_paths]}: files of different kinds {sorted(kinds)}; merge the "
                             "shards of one gallery or of one per-model file")
        by_index: dict[int, Path] = {}
        counts = set()
        for p in map(Path, shard_paths):
            m = metas[p]
            if m.get("kind") not in ("gallery", "gallery_member"):
                raise TableError(f"{p}: not a gallery or per-model embedding file (kind={m.get('kind')!r})")
            i, k = (int(x) for x in m.get("shard", "0/1").split("/"))
            if "shard" not in m and len(shard_paths) > 1:  # "shard 0/1 given twice" beside a shard 0/K
                raise TableError(f"{p}: a whole file, not a shard (embed-member --shard writes shards); merge only "
                                 "the shards of one file")
            if counts and k not in counts:  # before "given twice": shard 0/3 beside 0/2 is no repeat
                other = next(iter(counts))
                raise TableError(f"{p}: shard {i}/{k}, beside shards of a {other}-way split (another embed run); "
                                 "merge the shards of one run")
            if i in by_index:
                raise TableError(f"{p}: shard {i}/{k} given twice (also {by_index[i]})")
            by_index[i] = p
            counts.add(k)
        k = counts.pop()  # one count: another was refused above
        if sorted(by_index) != list(range(k)):
            raise TableError(f"{[str(p) for p in shard_paths]}: need shards 0..K-1 of one K, got "
                             f"{sorted(m.get('shard', '0/1') for m in metas.values())}")
        ordered = [by_index[i] for i in sorted(by_index)]
        base = {k: v for k, v in metas[ordered[0]].items() if k != "shard"}
        for p in ordered[1:]:
            if {k: v for k, v in metas[p].items() if k != "shard"} != base:
                raise TableError(f"{p}: metadata differs from {ordered[0]} (another model, query model, split or "
                                 "dataset version)")
        schema = pq.read_schema(ordered[0]).with_metadata({"cmce": json.dumps(base, sort_keys=True)})
        earlier: set[str] = set()  # the ids of the shards before
        digest = IdsDigest()
        out = Path(out)
        with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema, **writer_options(schema)) as writer:
            for p in ordered:
                pf, first_row, mine = open_parquet(p), 0, set()
                if pf.schema_arrow.remove_metadata() != schema.remove_metadata():
                    raise TableError(f"{p}: columns differ from {ordered[0]} "
                                     f"({schema_difference(pf.schema_arrow, schema)})")
                for rg in range(pf.num_row_groups):
                    table = read_row_group(pf, p, rg)
                    ids = string_column(table, "id", str(p))  # a null id was a traceback
                    if earlier.intersection(ids):
                        first = sorted(earlier.intersection(ids))[0]
                        raise TableError(f"{p}: ids also in an earlier shard (e.g. {shown_id(first)})")
                    check_unique_ids(ids, str(p), mine)  # a shard's own repeat was merged, refused at build-index
                    digest.update(ids, int_column(table, "label", str(p)))
                    check_finite(table, str(p), first_row)
                    first_row += table.num_rows
                    writer.write_table(table.replace_schema_metadata(schema.metadata))
                earlier |= mine
            source = base.get("source")  # absent in files written before it was recorded
            if source:
                check_digest(digest, source, ", ".join(map(str, ordered)), "the split they were cut from", labels=True,
                             why="shards of different dataset files, or of another version of one, or edited; embed "
                                 "them again from one")
    log.info("merged %d shards into %s (%d rows)", len(ordered), out, len(earlier))
    return out
