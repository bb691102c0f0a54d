import json

import numpy as np
import pytest

from cmce.embed import combine_members
from cmce.ensemble import normalize
from cmce.index import IndexLoadError, build_index, load_index, rejection_mask, search
from tests.test_embed import members


def test_faiss_results_equal_brute_force(tmp_path):
    _, paths, _ = members(tmp_path, n_models=3, rows=200)
    gallery = combine_members(paths, tmp_path / "g.parquet")
    index_dir = build_index(gallery, tmp_path / "index")
    loaded = load_index(index_dir, query_sha256="q" * 64)
    queries = np.random.default_rng(5).normal(size=(30, 6)).astype(np.float32)
    res = search(loaded, queries, k=10)
    import pyarrow.parquet as pq

    from cmce.tables import embedding_column

    emb = embedding_column(pq.read_table(gallery), "embedding", "g")
    brute = normalize(queries) @ normalize(emb).T
    order = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    assert res.ids == [[f"x{j}" for j in row] for row in order]
    np.testing.assert_allclose(res.scores, np.take_along_axis(brute, order, 1), atol=1e-5)


def test_rejection_removes_most_uncertain(tmp_path):
    _, paths, _ = members(tmp_path, n_models=2, rows=100)
    gallery = combine_members(paths, tmp_path / "g.parquet")
    index_dir = build_index(gallery, tmp_path / "index", reject_fraction=0.2)
    loaded = load_index(index_dir)
    meta = json.loads((index_dir / "meta.json").read_text())
    assert meta["n_indexed"] == 80 and meta["n_rejected"] == 20 and meta["query_model_sha256"] == "q" * 64
    import pyarrow.parquet as pq

    unc = pq.read_table(gallery).column("uncertainty").to_numpy()
    assert loaded.uncertainty.max() <= np.sort(unc)[-21] + 1e-7
    assert rejection_mask(np.array([0.1, 0.5, 0.5, 0.2]), 0.5).tolist() == [False, True, True, False]


def test_index_refuses_other_query_model_and_tampering(tmp_path):
    _, paths, _ = members(tmp_path, n_models=2)
    index_dir = build_index(combine_members(paths, tmp_path / "g.parquet"), tmp_path / "index")
    with pytest.raises(IndexLoadError, match="built for query model qqqqqqqqqqqq, but query model"):
        load_index(index_dir, query_sha256="a" * 64)
    loaded = load_index(index_dir)
    with pytest.raises(IndexLoadError, match="expects dimension 6"):
        search(loaded, np.zeros((1, 5), np.float32), 3)
    (index_dir / "ids.parquet").write_bytes(b"tampered")
    with pytest.raises(IndexLoadError, match="ids.parquet: missing or does not match the checksum"):
        load_index(index_dir)


def test_rebuild_replaces_index_atomically(tmp_path):
    _, paths, _ = members(tmp_path, n_models=2)
    gallery = combine_members(paths, tmp_path / "g.parquet")
    build_index(gallery, tmp_path / "index")
    build_index(gallery, tmp_path / "index", reject_fraction=0.5)
    assert load_index(tmp_path / "index").meta["n_rejected"] == 20
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
