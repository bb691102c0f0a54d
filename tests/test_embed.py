import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from cmce.embed import combine_members, member_metadata, member_schema, member_table
from cmce.method import RunningEnsemble, normalize
from cmce.tables import TableError, embedding_array, embedding_column, read_metadata, with_metadata, write_table


def sha(text: str) -> str:
    """A stand-in sha256 of a checkpoint: any hex digest will do."""
    return hashlib.sha256(text.encode()).hexdigest()


def write_member(path, name, ids, raw, transformed, query_sha="e" * 64, labels=None):
    meta = member_metadata(name, "resnet", sha(name), sha("t" + name), query_sha, "test")
    schema = member_schema(raw.shape[1], transformed.shape[1], meta)
    labels = np.arange(len(ids)) % 3 if labels is None else labels
    pq.write_table(member_table(ids, labels, raw, transformed, schema), path, row_group_size=7)
    return path


def members(tmp_path, n_models=3, rows=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"x{i}" for i in range(rows)]
    paths, transformed = [], []
    for m in range(n_models):
        t = normalize(rng.normal(size=(rows, 6)))
        transformed.append(t)
        paths.append(write_member(tmp_path / f"m{m}.parquet", f"m{m}", ids, rng.normal(size=(rows, 4 + m)), t))
    return ids, paths, np.stack(transformed)


def test_combine_matches_direct_ensemble_and_keeps_raw(tmp_path):
    ids, paths, transformed = members(tmp_path)
    out = combine_members(paths, tmp_path / "gallery.parquet", batch_size=16)  # several batches
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ids
    ens = RunningEnsemble()
    for t in transformed:
        ens.add(t)
    np.testing.assert_allclose(embedding_column(table, "embedding", "g"), ens.embedding, atol=1e-6)
    np.testing.assert_allclose(table.column("uncertainty").to_numpy(), ens.uncertainty, atol=1e-5)
    np.testing.assert_allclose(embedding_column(table, "ensemble_sum", "g"), ens.sum, atol=1e-5)
    assert set(table.column("n_models").to_pylist()) == {3}
    assert embedding_column(table, "raw_m2", "g").shape == (40, 6)
    meta = read_metadata(out)
    assert meta["kind"] == "gallery" and [m["name"] for m in meta["members"]] == ["m0", "m1", "m2"]


def test_gallery_file_dictionary_encodes_ids_and_labels_but_not_embeddings(tmp_path):
    _, paths, _ = members(tmp_path)
    out = combine_members(paths, tmp_path / "gallery.parquet")
    chunks = pq.ParquetFile(out).metadata.row_group(0)
    dictionary = {chunks.column(i).path_in_schema.split(".")[0]
                  for i in range(chunks.num_columns) if "RLE_DICTIONARY" in chunks.column(i).encodings}
    assert {"id", "label", "n_models"} <= dictionary
    assert not dictionary & {"embedding", "ensemble_sum", "uncertainty", "raw_m0", "raw_m1", "raw_m2"}


def test_parquet_round_trip_with_schema_metadata(tmp_path):
    import pyarrow as pa

    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    table = with_metadata(pa.table({"id": list("abcde"), "e": embedding_array(x)}), {"model": {"sha256": "abc"}})
    path = write_table(table, tmp_path / "t.parquet")
    assert read_metadata(path) == {"model": {"sha256": "abc"}}
    back = pq.read_table(path)
    np.testing.assert_array_equal(embedding_column(back, "e", "t", dim=3), x)
    with pytest.raises(TableError, match="column 'e' has dimension 3, expected 4"):
        embedding_column(back, "e", "t", dim=4)
    with pytest.raises(TableError, match="missing column 'f'"):
        embedding_column(back, "f", "t")
    with pytest.raises(TableError, match="column 'id' has type string, expected fixed_size_list"):
        embedding_column(back, "id", "t")


def test_nan_member_is_refused_and_nothing_written(tmp_path):
    ids, paths, _ = members(tmp_path, n_models=2)
    bad = normalize(np.random.default_rng(3).normal(size=(40, 6)))
    bad[17, 2] = np.nan
    write_member(paths[1], "m1", ids, np.zeros((40, 5)), bad)
    out = tmp_path / "gallery.parquet"
    with pytest.raises(TableError, match=r"m1.parquet: column 'transformed' has NaN/inf values in 1 rows"):
        combine_members(paths, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_members_must_agree(tmp_path):
    ids, paths, _ = members(tmp_path, n_models=2)
    write_member(paths[1], "m1", ids, np.zeros((40, 5)), normalize(np.ones((40, 7))))
    with pytest.raises(TableError, match="column 'transformed' has dimension 7, expected 6"):
        combine_members(paths, tmp_path / "g.parquet")
    write_member(paths[1], "m1", ids, np.zeros((40, 5)), normalize(np.ones((40, 6))), query_sha="f" * 64)
    with pytest.raises(TableError, match="different query models"):
        combine_members(paths, tmp_path / "g.parquet")
    write_member(paths[1], "m1", ids[::-1], np.zeros((40, 5)), normalize(np.ones((40, 6))))
    with pytest.raises(TableError, match="ids are not in the same order"):
        combine_members(paths, tmp_path / "g.parquet")


def test_augmented_views_pair_rows_across_models_and_repeat_with_the_seed(smoke_run):

    from cmce.checkpoint import load_embedding_model
    from cmce.data.augment import augment
    from cmce.data.readers import load_split
    from cmce.embed import embed_augmented_views, embed_batch, view_generator

    lay, _ = smoke_run
    q = load_embedding_model(lay.model("query"))
    g = load_embedding_model(lay.model(lay.gallery_names[0]))
    (eq, eg), labels = embed_augmented_views([q, g], lay.dataset, "train", views=2, seed=7, batch_size=64)
    split = load_split(lay.dataset, "train", q.in_channels, q.image_size)
    n = len(split.ids)
    assert eq.shape == (2 * n, q.embedding_dim) and eg.shape == (2 * n, g.embedding_dim)
    np.testing.assert_array_equal(labels, np.tile(split.labels, 2))
    # the same augmented copy went through both models: redo each view's first and second batch by hand
    for view in range(2):
        gen = view_generator(7, view)
        for start in (0, 64):
            copy = augment(split.images[start:start + 64], gen)
            rows = slice(view * n + start, view * n + start + 64)
            np.testing.assert_allclose(eq[rows], embed_batch(q, copy), atol=1e-5)
            np.testing.assert_allclose(eg[rows], embed_batch(g, copy), atol=1e-5)
    assert not np.allclose(eq[:64], embed_batch(q, split.images[:64]), atol=1e-3)  # augmented, not the plain images
    assert not np.allclose(eq[:64], eq[n:n + 64], atol=1e-3)  # the two views are different copies
    (again, _), _ = embed_augmented_views([q, g], lay.dataset, "train", views=2, seed=7, batch_size=64)
    np.testing.assert_array_equal(again, eq)
    (other, _), _ = embed_augmented_views([q, g], lay.dataset, "train", views=2, seed=8, batch_size=64)
    assert not np.array_equal(other, eq)
    # data.hflip false: the copies are shifted, never mirrored
    (unflipped, _), _ = embed_augmented_views([q, g], lay.dataset, "train", views=1, seed=7, batch_size=64,
                                              hflip=False)
    copy = augment(split.images[:64], view_generator(7, 0), hflip=False)
    np.testing.assert_allclose(unflipped[:64], embed_batch(q, copy), atol=1e-5)
    assert not np.allclose(unflipped[:64], eq[:64], atol=1e-3)


def test_mixed_precision_path_stays_close_to_float32(smoke_run):
    """The GPU fast path (bf16 autocast + channels_last), exercised on CPU: same embeddings to bf16 rounding."""
    import torch

    from cmce.checkpoint import load_embedding_model
    from cmce.data.readers import load_split
    from cmce.embed import embed_batch

    lay, _ = smoke_run
    for name in ["query", *lay.gallery_names]:
        model = load_embedding_model(lay.model(name))
        model.net.eval()
        images = load_split(lay.dataset, "test", model.in_channels, model.image_size).images[:128]
        full = embed_batch(model, images, mixed_precision=False)
        model.net.to(memory_format=torch.channels_last)
        fast = embed_batch(model, images, mixed_precision=True)
        assert fast.dtype == np.float32 and fast.shape == full.shape
        assert not np.array_equal(fast, full), name  # bf16 really ran
        cosine = (normalize(fast) * normalize(full)).sum(axis=1)
        assert cosine.min() > 0.99, (name, float(cosine.min()))
