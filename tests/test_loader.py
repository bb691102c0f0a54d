"""Streaming, multi-worker, sharded reading of a split; sharded embedding merged equals unsharded."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cmce.checkpoint import load_embedding_model
from cmce.data.loader import Shard, iter_split_chunks, parse_shard, rebatch, shard_range
from cmce.embed import combine_members, embed_with_model, merge_shards
from cmce.tables import TableError, embedding_column, read_metadata


@pytest.fixture(scope="module")
def small_groups(smoke_run, tmp_path_factory):
    """The smoke dataset rewritten with 64-row row groups, so a split has many chunks."""
    lay, _ = smoke_run
    out = tmp_path_factory.mktemp("loader") / "dataset.parquet"
    pq.write_table(pq.read_table(lay.dataset), out, row_group_size=64)
    return out


def test_parse_shard():
    assert parse_shard("2/5") == Shard(2, 5) and str(parse_shard(" 0 / 1 ")) == "0/1"
    for bad in ("5/5", "1", "-1/2", "a/b", "0/0", ""):
        with pytest.raises(ValueError, match="i/K"):
            parse_shard(bad)


def test_shards_partition_the_chunks():
    for n in (0, 1, 5, 17):
        for k in (1, 2, 3, 8):
            parts = [list(shard_range(n, Shard(i, k))) for i in range(k)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_worker_processes_keep_file_order(small_groups):
    serial = list(iter_split_chunks(small_groups, "test", 1, 8))
    parallel = list(iter_split_chunks(small_groups, "test", 1, 8, workers=2))
    assert len(serial) > 3
    assert [c.ids for c in parallel] == [c.ids for c in serial]
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_sharded_chunks_concatenate_to_the_whole_split(small_groups):
    whole = [i for c in iter_split_chunks(small_groups, "test", 1, 8) for i in c.ids]
    for k in (2, 3, 7):
        shards = [iter_split_chunks(small_groups, "test", 1, 8, Shard(s, k)) for s in range(k)]
        pieces = [i for chunks in shards for c in chunks for i in c.ids]
        assert pieces == whole


def test_rebatch_cuts_exact_batches(small_groups):
    chunks = list(iter_split_chunks(small_groups, "test", 1, 8))
    batches = list(rebatch(iter(chunks), 50))
    assert all(len(b.ids) == 50 for b in batches[:-1]) and 0 < len(batches[-1].ids) <= 50
    assert [i for b in batches for i in b.ids] == [i for c in chunks for i in c.ids]
    assert torch.equal(torch.cat([b.images for b in batches]), torch.cat([c.images for c in chunks]))


def test_sharded_gallery_merged_equals_unsharded(smoke_run, small_groups, tmp_path):
    lay, _ = smoke_run
    q_sha = load_embedding_model(lay.model("query")).sha256
    k = 3
    whole_members, shard_galleries = [], []
    for g in lay.gallery_names:
        args = (small_groups, lay.model(g), lay.transformation(g), q_sha)
        whole_members.append(embed_with_model(*args, tmp_path / f"whole_{g}.parquet", batch_size=40))
    for s in range(k):
        members = [embed_with_model(small_groups, lay.model(g), lay.transformation(g), q_sha,
                                    tmp_path / f"s{s}_{g}.parquet", batch_size=40, shard=Shard(s, k), workers=1)
                   for g in lay.gallery_names]
        shard_galleries.append(combine_members(members, tmp_path / f"gallery_s{s}.parquet"))
    whole = pq.read_table(combine_members(whole_members, tmp_path / "gallery.parquet"))
    # shards handed over in any order are merged in shard order
    merged_path = merge_shards(shard_galleries[::-1], tmp_path / "merged.parquet")
    merged = pq.read_table(merged_path)
    assert merged.column("id").to_pylist() == whole.column("id").to_pylist()
    for col in ("embedding", "ensemble_sum", *(f"raw_{g}" for g in lay.gallery_names)):
        np.testing.assert_allclose(embedding_column(merged, col, "m"), embedding_column(whole, col, "w"), atol=1e-6)
    np.testing.assert_allclose(merged.column("uncertainty").to_numpy(), whole.column("uncertainty").to_numpy(),
                               atol=1e-6)
    assert read_metadata(merged_path) == read_metadata(tmp_path / "gallery.parquet")


def test_merge_refuses_incomplete_or_mixed_shards(smoke_run, small_groups, tmp_path):
    lay, _ = smoke_run
    q_sha = load_embedding_model(lay.model("query")).sha256
    a, b = lay.gallery_names[:2]

    def member(g, s, k):
        return embed_with_model(small_groups, lay.model(g), lay.transformation(g), q_sha,
                                tmp_path / f"{g}_{s}_{k}.parquet", shard=Shard(s, k))

    with pytest.raises(TableError, match="need shards 0..K-1"):
        merge_shards([member(a, 0, 3), member(a, 2, 3)], tmp_path / "out.parquet")
    with pytest.raises(TableError, match="given twice"):
        merge_shards([member(a, 0, 2), member(a, 0, 2)], tmp_path / "out.parquet")
    with pytest.raises(TableError, match=rf"{a}_0_3.parquet: shard 0/3, beside shards of a 2-way split \(another"):
        merge_shards([member(a, 0, 2), member(a, 0, 3)], tmp_path / "out.parquet")  # was "shard 0/3 given twice"
    with pytest.raises(TableError, match="metadata differs"):
        merge_shards([member(a, 0, 2), member(b, 1, 2)], tmp_path / "out.parquet")
    with pytest.raises(TableError, match="a whole file, not a shard"):  # was "shard 0/1 given twice" beside 0/2
        merge_shards([lay.member(a), member(a, 1, 2)], tmp_path / "out.parquet")
    with pytest.raises(TableError, match="a whole file, not a shard"):
        merge_shards([member(a, 0, 2), lay.member(a)], tmp_path / "out.parquet")
    with pytest.raises(TableError, match="not a gallery or per-model"):
        merge_shards([lay.train_embeddings(a)], tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_merge_refuses_shards_cut_from_other_files_or_layouts(smoke_run, small_groups, tmp_path):
    """Shards of another dataset file, or of the same rows laid out in other row groups (so other chunk
    boundaries), would lose or repeat rows: the split's ids digest in their metadata proves the merge whole."""
    lay, _ = smoke_run
    q_sha = load_embedding_model(lay.model("query")).sha256
    g = lay.gallery_names[0]
    other_layout = tmp_path / "dataset_rg100.parquet"
    pq.write_table(pq.read_table(small_groups), other_layout, row_group_size=100)
    table = pq.read_table(small_groups)
    other_rows = tmp_path / "dataset_fewer.parquet"
    pq.write_table(table.slice(0, table.num_rows - 7), other_rows, row_group_size=64)

    def member(dataset, s):
        return embed_with_model(dataset, lay.model(g), lay.transformation(g), q_sha,
                                tmp_path / f"{dataset.stem}_{s}.parquet", shard=Shard(s, 3))

    whole = merge_shards([member(small_groups, s) for s in range(3)], tmp_path / "ok.parquet")
    assert pq.read_metadata(whole).num_rows == read_metadata(whole)["source"]["split_rows"]
    # same ids, other chunk boundaries: rows lost or repeated at the seams
    mixed = [member(small_groups, 0), member(other_layout, 1), member(small_groups, 2)]
    with pytest.raises(TableError, match="rows that are not the split they were cut from"):
        merge_shards(mixed, tmp_path / "out.parquet")
    relabelled = member(small_groups, 1)  # the same rows with one label edited: merged, indexed, served (exit 0)
    table = pq.read_table(relabelled)
    labels = table.column("label").to_numpy().copy()
    labels[0] += 1
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
                   .replace_schema_metadata(table.schema.metadata), relabelled)
    with pytest.raises(TableError, match="labels differ from those of the split they were cut from .the same ids.: "
                                         "shards of different"):
        merge_shards([member(small_groups, 0), relabelled, member(small_groups, 2)], tmp_path / "out.parquet")
    with pytest.raises(TableError, match="metadata differs"):
        merge_shards([member(small_groups, 0), member(other_rows, 1), member(small_groups, 2)],
                     tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
