import json
import re

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from cmce.config import ConfigError, HnswConfig, IndexConfig, IvfPqConfig, load_config
from cmce.embed import combine_members
from cmce.index import IndexLoadError, LoadedIndex, build_index, load_index, make_index, resolve_index_type, search
from cmce.method import normalize, rejection_mask
from cmce.storage import file_sha256
from cmce.tables import TableError, embedding_column
from tests.test_embed import members


def test_faiss_results_equal_brute_force(tmp_path):
    _, paths, _ = members(tmp_path, n_models=3, rows=200)
    gallery = combine_members(paths, tmp_path / "g.parquet")
    index_dir = build_index(gallery, tmp_path / "index")
    loaded = load_index(index_dir, query_sha256="e" * 64)
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
    assert meta["n_indexed"] == 80 and meta["n_rejected"] == 20 and meta["query_model_sha256"] == "e" * 64
    import pyarrow.parquet as pq

    unc = pq.read_table(gallery).column("uncertainty").to_numpy()
    assert loaded.uncertainty.max() <= np.sort(unc)[-21] + 1e-7
    assert rejection_mask(np.array([0.1, 0.5, 0.5, 0.2]), 0.5).tolist() == [False, True, True, False]
    for name in ("ids.parquet", "rejected.parquet"):  # written like the gallery files: no dictionary on floats
        chunks = pq.ParquetFile(index_dir / name).metadata.row_group(0)
        encodings = {chunks.column(i).path_in_schema: chunks.column(i).encodings for i in range(chunks.num_columns)}
        assert "RLE_DICTIONARY" not in encodings["uncertainty"] and "RLE_DICTIONARY" in encodings["id"], name


def test_index_refuses_other_query_model_and_tampering(tmp_path):
    _, paths, _ = members(tmp_path, n_models=2)
    index_dir = build_index(combine_members(paths, tmp_path / "g.parquet"), tmp_path / "index")
    with pytest.raises(IndexLoadError, match="built for query model eeeeeeeeeeee, but query model"):
        load_index(index_dir, query_sha256="a" * 64)
    loaded = load_index(index_dir)
    with pytest.raises(IndexLoadError, match="expects dimension 6"):
        search(loaded, np.zeros((1, 5), np.float32), 3)
    (index_dir / "ids.parquet").write_bytes(b"tampered")
    with pytest.raises(IndexLoadError, match="ids.parquet: missing, not a regular file, or does not match the"):
        load_index(index_dir)


def test_rebuild_replaces_index_atomically(tmp_path):
    _, paths, _ = members(tmp_path, n_models=2)
    gallery = combine_members(paths, tmp_path / "g.parquet")
    build_index(gallery, tmp_path / "index")
    build_index(gallery, tmp_path / "index", reject_fraction=0.5)
    assert load_index(tmp_path / "index").meta["n_rejected"] == 20
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- index types ---------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Tiny indexes: OpenMP threads only add synchronisation cost (large on shared cores)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered_gallery(tmp_path, n=3000, dim=16, seed=0, members=1):
    """A gallery file over clustered unit vectors (the benchmark's generator) and queries from the same clusters;
    with `members` > 1, each further member is the same vectors plus noise (so uncertainty varies)."""
    from benchmarks.index_types import clustered_unit_vectors
    from tests.test_embed import write_member

    emb, queries = clustered_unit_vectors(n, 64, dim, seed)
    ids = [f"x{i}" for i in range(n)]
    noise = np.random.default_rng(seed)
    paths = [write_member(tmp_path / f"m{k}.parquet", f"m{k}", ids, np.full((n, 2), k),  # each model its own
                          emb + (0.1 * k * noise.standard_normal(emb.shape)).astype(emb.dtype))
             for k in range(members)]
    return combine_members(paths, tmp_path / "g.parquet"), queries


def recall_at(found: list[list[str]], exact: list[list[str]], k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found, exact, strict=True)]))


@pytest.mark.parametrize(("index_type", "factory", "search_params"), [
    ("flat", "Flat", {}),
    ("ivfpq", "IVF76,PQ4x8np,Refine(Flat)", {"nprobe": 12, "k_factor": 6}),
    ("hnsw", "HNSW16,Flat", {"ef_search": 48}),
])
def test_each_type_builds_loads_searches_and_records_parameters(tmp_path, index_type, factory, search_params):
    gallery, queries = clustered_gallery(tmp_path)
    options = IndexConfig(ivfpq=IvfPqConfig(nprobe=12, k_factor=6), hnsw=HnswConfig(m=16, ef_search=48))
    index_dir = build_index(gallery, tmp_path / "index", index_type=index_type, options=options)
    meta = json.loads((index_dir / "meta.json").read_text())
    assert meta["index_type"] == index_type and meta["index_params"]["factory"] == factory
    assert meta["search_params"] == search_params
    loaded = load_index(index_dir)
    res = search(loaded, queries, k=10)
    assert len(res.ids) == len(queries) and all(len(row) == 10 for row in res.ids)
    assert res.scores.shape == (len(queries), 10) and (np.diff(res.scores, axis=1) <= 1e-5).all()
    cosine = normalize(queries) @ embedding_column(pq.read_table(gallery), "embedding", "g").T
    rows = np.array([[int(i[1:]) for i in row] for row in res.ids])
    np.testing.assert_allclose(res.scores, np.take_along_axis(cosine, rows, 1), atol=1e-5)  # exact, re-ranked scores


def test_loaded_index_searches_with_the_parameters_in_meta(tmp_path):
    """Search parameters come from meta.json on load, not from whatever the faiss file carries."""
    gallery, _ = clustered_gallery(tmp_path)
    for index_type, params, read in (
        ("ivfpq", {"nprobe": 5, "k_factor": 3},
         lambda ix: {"nprobe": faiss.extract_index_ivf(ix).nprobe, "k_factor": round(ix.k_factor)}),
        ("hnsw", {"ef_search": 23}, lambda ix: {"ef_search": ix.hnsw.efSearch}),
    ):
        index_dir = build_index(gallery, tmp_path / index_type, index_type=index_type)
        meta = json.loads((index_dir / "meta.json").read_text())
        assert read(load_index(index_dir).index) == meta["search_params"] != params
        meta["search_params"] = params
        (index_dir / "meta.json").write_text(json.dumps(meta))
        assert read(load_index(index_dir).index) == params


def test_search_parameters_outside_their_config_ranges_are_refused_at_load(tmp_path):
    """An edited meta.json's k_factor 0 (or 0.5, or nprobe 0) loaded, then failed a faiss assertion at the first
    search with a traceback; ef_search 0 or 1.5 was used as given. Each is refused at load, naming the key."""
    gallery, queries = clustered_gallery(tmp_path)
    for index_type, key, bad in (("ivfpq", "k_factor", 0), ("ivfpq", "k_factor", 0.5), ("ivfpq", "nprobe", 0),
                                 ("ivfpq", "k_factor", 1e30), ("hnsw", "ef_search", 0), ("hnsw", "ef_search", 1.5)):
        index_dir = tmp_path / index_type
        if not index_dir.exists():
            build_index(gallery, index_dir, index_type=index_type)
        meta = json.loads((index_dir / "meta.json").read_text())
        edited = {**meta, "search_params": {**meta["search_params"], key: bad}}
        (index_dir / "meta.json").write_text(json.dumps(edited))
        with pytest.raises(IndexLoadError, match=rf"meta.json: search_params.{key} is {re.escape(json.dumps(bad))}, "
                                                 r"expected an integer in \[1, \d+\]$"):
            load_index(index_dir)
        (index_dir / "meta.json").write_text(json.dumps(meta))
        assert search(load_index(index_dir), queries[:2], k=3).scores.shape == (2, 3)


@pytest.mark.parametrize("options", [IvfPqConfig(nbits=10), IvfPqConfig(m=16)], ids=["nbits10", "m16"])
def test_ivfpq_indexes_with_large_codebooks_load_under_the_read_bound(tmp_path, options):
    """The bound on what faiss may allocate when reading index.faiss (the file's size) once refused IVF-PQ indexes
    built here: faiss computed a distance table of nlist·m·2^nbits floats on reading, larger than the file."""
    gallery, queries = clustered_gallery(tmp_path)
    index_dir = build_index(gallery, tmp_path / "index", index_type="ivfpq", options=IndexConfig(ivfpq=options))
    assert json.loads((index_dir / "meta.json").read_text())["index_type"] == "ivfpq"
    built, loaded = faiss.read_index(str(index_dir / "index.faiss")), load_index(index_dir).index
    for ix in (built, loaded):
        faiss.extract_index_ivf(ix).nprobe = 4
    np.testing.assert_array_equal(loaded.search(queries[:20], 5)[1], built.search(queries[:20], 5)[1])


def test_an_ivfpq_file_edited_inside_its_checksum_is_refused_at_load(tmp_path):
    """index.faiss rewritten with meta.json's checksum to match: marked untrained (a faiss assertion at the first
    search), list ids out of range (the re-ranking's assertion) or all 0 (one item answered k times, exit 0)."""
    from cmce.storage import file_sha256

    gallery, queries = clustered_gallery(tmp_path)
    index_dir = build_index(gallery, tmp_path / "ivfpq", index_type="ivfpq")
    meta = json.loads((index_dir / "meta.json").read_text())
    pristine = faiss.read_index(str(index_dir / "index.faiss"))

    def lists_ids(index):
        lists = faiss.extract_index_ivf(index).invlists
        return [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)) for i in range(lists.nlist)]

    def untrained(index):
        index.is_trained = False

    def out_of_range(index):
        next(ids for ids in lists_ids(index) if len(ids))[0] = index.ntotal

    def all_zero(index):
        for ids in lists_ids(index):
            ids[:] = 0

    def faiss_bytes(index):
        return faiss.serialize_index(index).tobytes()

    # a header claiming 2e7 inverted lists: faiss allocated 3.5 GB for them (about 160 bytes a list) before finding
    # the lists missing; refused now within the file's size
    data = bytearray(faiss_bytes(pristine))
    at = data.index(b"ilar") + 4
    assert int.from_bytes(data[at:at + 8], "little") == faiss.extract_index_ivf(pristine).nlist
    data[at:at + 8] = (20_000_000).to_bytes(8, "little")
    (index_dir / "index.faiss").write_bytes(data)
    sealed = {**meta, "files": {**meta["files"], "index.faiss": file_sha256(index_dir / "index.faiss")},
              "sizes": {**meta["sizes"], "index.faiss": len(data)}}
    (index_dir / "meta.json").write_text(json.dumps(sealed))
    with pytest.raises(IndexLoadError, match="index.faiss: not a readable faiss index: it declares more than the "
                                             "file can hold"):
        load_index(index_dir)
    for edit, message in ((untrained, "an IVF-PQ index marked untrained"),
                          (out_of_range, "not each of its 3000 items once"),
                          (all_zero, "not each of its 3000 items once")):
        index = faiss.clone_index(pristine)
        edit(index)
        faiss.write_index(index, str(index_dir / "index.faiss"))
        sealed = {**meta, "files": {**meta["files"], "index.faiss": file_sha256(index_dir / "index.faiss")},
                  "sizes": {**meta["sizes"], "index.faiss": (index_dir / "index.faiss").stat().st_size}}
        (index_dir / "meta.json").write_text(json.dumps(sealed))
        with pytest.raises(IndexLoadError, match=f"index.faiss: .*{message}; build the index again"):
            load_index(index_dir)
    faiss.write_index(pristine, str(index_dir / "index.faiss"))
    (index_dir / "meta.json").write_text(json.dumps(meta))
    assert search(load_index(index_dir), queries[:2], k=3).scores.shape == (2, 3)


@pytest.mark.parametrize("index_type", ["ivfpq", "hnsw"])
def test_approximate_types_reach_high_recall_against_flat(tmp_path, index_type):
    gallery, queries = clustered_gallery(tmp_path)
    exact = search(load_index(build_index(gallery, tmp_path / "flat")), queries, k=10)
    approx = search(load_index(build_index(gallery, tmp_path / index_type, index_type=index_type)), queries, k=10)
    assert recall_at(approx.ids, exact.ids, 10) >= 0.95


def test_auto_picks_by_indexed_size(tmp_path):
    gallery, _ = clustered_gallery(tmp_path, n=1000, members=2)  # rejection needs two members
    picked = {}
    for threshold, reject in ((800, 0.0), (1001, 0.0), (800, 0.5)):  # the rejected items do not count
        out = build_index(gallery, tmp_path / f"i{threshold}_{reject}", reject, "auto",
                          IndexConfig(auto_threshold=threshold))
        meta = json.loads((out / "meta.json").read_text())
        assert meta["index_params"]["requested_type"] == "auto"
        assert meta["index_params"]["auto_threshold"] == threshold
        picked[threshold, reject] = meta["index_type"]
    assert picked == {(800, 0.0): "ivfpq", (1001, 0.0): "flat", (800, 0.5): "flat"}
    assert resolve_index_type("auto", 100_000, IndexConfig().auto_threshold) == "ivfpq"
    assert resolve_index_type("auto", 99_999, IndexConfig().auto_threshold) == "flat"


def test_small_gallery_clamps_nlist_or_falls_back_to_flat(tmp_path, caplog, capfd):
    """A gallery too small for faiss's advice is said once, in cmce's notes: faiss printed `WARNING clustering 485
    points to 256 centroids` eight times (once per PQ sub-quantizer) to stderr."""
    gallery, _ = clustered_gallery(tmp_path, n=1000, members=2)
    out = build_index(gallery, tmp_path / "clamped", index_type="ivfpq", options=IndexConfig(ivfpq=IvfPqConfig(
        nlist=64, nprobe=40)))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["index_params"]["nlist"] == 1000 // 39 and meta["index_params"]["nlist_requested"] == 64
    assert meta["search_params"]["nprobe"] == 1000 // 39  # never more lists than exist
    assert "nlist clamped from 64 to 25" in meta["notes"][0] and "nlist clamped" in caplog.text
    assert meta["notes"][1] == ("ivfpq PQ codebooks of 256 centroids trained on 1000 points, faiss advises at least "
                                "9984: candidates may be missed (scores stay exact)")
    assert "WARNING" not in capfd.readouterr().err
    out = build_index(gallery, tmp_path / "flat", reject_fraction=0.8, index_type="ivfpq")  # 200 items left
    meta = json.loads((out / "meta.json").read_text())
    assert meta["index_type"] == "flat" and meta["index_params"]["requested_type"] == "ivfpq"
    assert meta["notes"][0] == ("ivfpq needs at least 256 training points for 8-bit PQ codebooks, the gallery has "
                                "200: built an exact flat index instead")
    out = build_index(gallery, tmp_path / "few", index_type="ivfpq", options=IndexConfig(ivfpq=IvfPqConfig(
        train_size=100)))  # the setting, not the gallery, was at fault: it was named "the gallery has 1000"
    assert json.loads((out / "meta.json").read_text())["notes"][0] == (
        "ivfpq needs at least 256 training points for 8-bit PQ codebooks, index.ivfpq.train_size=100 gives 100: "
        "built an exact flat index instead")


def test_unknown_type_and_bad_pq_split_are_errors(tmp_path):
    gallery, _ = clustered_gallery(tmp_path, n=300)
    valid = r"valid types: \['flat', 'ivfpq', 'hnsw', 'auto'\]"
    with pytest.raises(ValueError, match=r"unknown index type 'annoy'; " + valid):
        build_index(gallery, tmp_path / "index", index_type="annoy")
    assert not (tmp_path / "index").exists()
    with pytest.raises(ValueError, match="index.ivfpq.m=5 must divide the embedding dimension 16"):
        build_index(gallery, tmp_path / "index", index_type="ivfpq", options=IndexConfig(ivfpq=IvfPqConfig(m=5)))


def test_index_parameters_from_a_config_file(tmp_path):
    gallery, _ = clustered_gallery(tmp_path, members=2)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("query_model: {name: q}\ngallery_models: [{name: g, arch: resnet}, {name: h, arch: vgg}]\n"
                        "index: {type: ivfpq, reject_fraction: 0.1, ivfpq: {nlist: 32, m: 8, nprobe: 4}}\n")
    out = build_index(gallery, tmp_path / "index", options=load_config(cfg_path).index)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["index_params"]["factory"] == "IVF32,PQ8x8np,Refine(Flat)" and meta["n_rejected"] == 300
    assert meta["search_params"] == {"nprobe": 4, "k_factor": IvfPqConfig().k_factor}
    cfg_path.write_text(cfg_path.read_text().replace("nprobe: 4", "nprob: 4"))
    with pytest.raises(ConfigError, match=r"index.ivfpq: unknown key\(s\) \['nprob'\]; valid keys: \[.*'nprobe'"):
        load_config(cfg_path)


def test_benchmark_runs_tiny_and_appends_its_section(tmp_path):
    from benchmarks.index_types import main

    bench = tmp_path / "BENCHMARKS.md"
    before = "# Benchmarks\n\n## Another benchmark\n\n| a |\n|---|\n| 1 |\n"
    bench.write_text(before)
    assert main(["--n", "3000", "--dim", "16", "--queries", "40", "--batch1-queries", "5", "--repeats", "1",
                 "--threads", "1", "--markdown", str(bench)]) == 0
    text = bench.read_text()
    assert text.startswith(before + "\n## Index types — ")  # appended, the rest untouched
    assert "3,000 synthetic clustered unit vectors of dimension 16" in text
    assert main(["--n", "2000", "--dim", "16", "--queries", "40", "--batch1-queries", "5", "--repeats", "1",
                 "--threads", "1", "--markdown", str(bench)]) == 0
    text = bench.read_text()  # another size replaces the section: one current section per benchmark
    assert text.count("## Index types") == 1 and "2,000 synthetic" in text and "3,000 synthetic" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert [r.split()[1] for r in rows] == ["flat", "ivfpq", "hnsw"]
    assert rows[0].endswith("| 1.0 | 1.0 | 1.0000 |")  # the baseline against itself
    assert all(float(r.rstrip(" |").rsplit("|", 1)[1]) >= 0.9 for r in rows)  # recall@10
    assert "Target (IVF-PQ+refine" in text


def test_an_index_describes_the_one_version_of_a_gallery_it_read(tmp_path, monkeypatch):
    """A gallery replaced while build-index reads it (a writer renames a new version over it) must not give an
    index whose metadata describes one version and whose vectors come from the other."""
    import os

    from cmce.storage import file_sha256
    from cmce.tables import read_metadata

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, first, _ = members(tmp_path / "a", n_models=3, rows=60, seed=1)
    _, second, _ = members(tmp_path / "b", n_models=2, rows=50, seed=2)
    gallery = combine_members(first, tmp_path / "g.parquet")
    newer = combine_members(second, tmp_path / "newer.parquet")
    sha, members_before = file_sha256(gallery), read_metadata(gallery)["members"]
    real_read = pq.ParquetFile.read

    def read_then_replace(self, *args, **kwargs):
        table = real_read(self, *args, **kwargs)
        if newer.exists():
            os.replace(newer, gallery)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read", read_then_replace)
    meta = json.loads((build_index(gallery, tmp_path / "index") / "meta.json").read_text())
    assert not newer.exists() and file_sha256(gallery) != sha  # the gallery was replaced during the build
    assert (meta["gallery_sha256"], meta["members"], meta["n_indexed"]) == (sha, members_before, 60)


REBUILD_LOOP = """
import sys
from cmce.index import build_index
galleries, out, builds = sys.argv[1:3], sys.argv[3], int(sys.argv[4])
for n in range(builds):
    build_index(galleries[n % 2], out)
"""
REBUILDS = 40


def test_a_reader_sees_one_whole_index_while_it_is_rebuilt(tmp_path):
    """Rebuilds (in another process) alternate between two galleries; every load meanwhile is one whole
    version: it succeeds, and its metadata, ids and vectors agree. A fixed number of rebuilds, not a time: a
    reader loading without pause held the swaps off (5 rebuilds in 5 s on 2 loaded cores, where 20 were asked)."""
    import subprocess
    import sys

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, first, _ = members(tmp_path / "a", n_models=3, rows=60, seed=1)
    _, second, _ = members(tmp_path / "b", n_models=2, rows=50, seed=2)
    galleries = [combine_members(first, tmp_path / "a.parquet"), combine_members(second, tmp_path / "b.parquet")]
    out = build_index(galleries[0], tmp_path / "index")
    writer = subprocess.Popen([sys.executable, "-c", REBUILD_LOOP, *map(str, galleries), str(out), str(REBUILDS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, loads = set(), 0
    while writer.poll() is None:
        loaded = load_index(out)
        n = loaded.meta["n_indexed"]
        assert len(loaded.ids) == n == loaded.index.ntotal and len(loaded.meta["members"]) == {60: 3, 50: 2}[n]
        seen.add(n)
        loads += 1
    _, stderr = writer.communicate()
    assert writer.returncode == 0, stderr
    assert seen == {60, 50} and loads > 1  # both versions were read


def test_a_waiting_swap_goes_before_the_readers_that_come_after_it(tmp_path):
    """Two readers whose shared locks overlap, so that one is always held: flock favours no one, and the swap of
    a rebuild waited for good. It now waits only for the readers already in."""
    import threading
    import time

    from cmce.storage import swap_lock

    _, parts, _ = members(tmp_path, n_models=2, rows=20, seed=1)
    out = build_index(combine_members(parts, tmp_path / "gallery.parquet"), tmp_path / "index")
    stop, swapped = threading.Event(), threading.Event()

    def read(offset: float) -> None:
        time.sleep(offset)
        while not stop.is_set():
            with swap_lock(out, exclusive=False):
                time.sleep(0.2)

    readers = [threading.Thread(target=read, args=(offset,)) for offset in (0, 0.1)]
    for reader in readers:
        reader.start()
    time.sleep(0.5)  # both reading, in turns that overlap

    def swap() -> None:
        with swap_lock(out, exclusive=True):
            swapped.set()

    writer = threading.Thread(target=swap, daemon=True)
    writer.start()
    try:
        assert swapped.wait(30), "the swap waited behind readers that kept coming"
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    writer.join(30)


def test_a_folder_named_through_dot_or_dotdot_is_locked_as_the_folder_it_is(tmp_path, monkeypatch):
    """`cd index && cmce search --index .`: the folder and its "parent" were one folder, locked twice by one
    reader (a hang); `a/x/..` against `a`, or a reader of `.` against a writer of the full path, locked other
    folders than each other (no exclusion, or two processes each waiting for the other)."""
    import threading

    from cmce.storage import swap_lock

    _, parts, _ = members(tmp_path, n_models=2, rows=20, seed=1)
    out = build_index(combine_members(parts, tmp_path / "gallery.parquet"), tmp_path / "index")
    (out / "x").mkdir()
    monkeypatch.chdir(out)
    assert load_index(".").meta["n_indexed"] == 20
    with swap_lock("/", exclusive=False):  # a folder that is its own parent
        pass
    entered = []
    for name in (".", "x/.."):
        with swap_lock(out, exclusive=True):  # a swap of the full path under way
            reader = threading.Thread(target=lambda n=name: entered.append(_enter_and_leave(swap_lock(n, False))))
            reader.start()
            reader.join(0.5)
            assert reader.is_alive()  # it waits for the swap
        reader.join(30)
        assert not reader.is_alive()
    assert entered == [True, True]


def _enter_and_leave(lock: object) -> bool:
    with lock:
        return True


def test_a_turn_behind_a_suspended_swap_is_waited_for_a_while_then_taken_beside_it(tmp_path, monkeypatch, caplog):
    """A swap waiting behind a reader suspended with Ctrl-Z held its folder's turnstile: every later reader of the
    index waited with it, for good. After TURNSTILE_WAIT_S a reader goes on beside it, as before."""
    import fcntl
    import logging
    import os

    from cmce import storage

    _, parts, _ = members(tmp_path, n_models=2, rows=20, seed=1)
    out = build_index(combine_members(parts, tmp_path / "gallery.parquet"), tmp_path / "index")
    monkeypatch.setattr(storage, "TURNSTILE_WAIT_S", 0.5)
    caplog.set_level(logging.INFO)
    waiting_swap = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(waiting_swap, fcntl.LOCK_EX)  # the turnstile, as a swap holds it while it waits
        assert load_index(out).meta["n_indexed"] == 20
    finally:
        os.close(waiting_swap)
    assert any("waited 0.5 s for its turn behind a swap" in r.getMessage() for r in caplog.records)


def test_an_hnsw_index_answers_k_neighbours_beyond_its_ef_search(tmp_path):
    """HNSW finds at most efSearch neighbours: a k above it came back short (426 of 485) without a word."""
    from cmce.config import HnswConfig, IndexConfig

    rng = np.random.default_rng(0)
    emb = normalize(rng.standard_normal((300, 16)).astype(np.float32))
    built = make_index(emb, "hnsw", IndexConfig(hnsw=HnswConfig(ef_search=8)))
    loaded = LoadedIndex(built.index, [f"g{i}" for i in range(300)], np.zeros(300, np.int64),
                         np.zeros(300, np.float32), {"dim": 16})
    result = search(loaded, emb[:4], 250)
    assert all(len(ids) == 250 for ids in result.ids)


def test_meta_json_that_names_another_index_type_or_metric_is_refused(tmp_path):
    """meta.json cannot carry its own checksum: an index type edited in it was believed, and search parameters
    or a faiss file over L2 distances were applied to an index of another kind."""
    from cmce.storage import file_sha256

    _, paths, _ = members(tmp_path, n_models=2)
    index_dir = build_index(combine_members(paths, tmp_path / "g.parquet"), tmp_path / "index")
    meta = json.loads((index_dir / "meta.json").read_text())
    (index_dir / "meta.json").write_text(json.dumps({**meta, "index_type": "hnsw", "search_params": {}}))
    with pytest.raises(IndexLoadError, match=r"index.faiss is a flat index .* records index_type 'hnsw'"):
        load_index(index_dir)
    flat = faiss.read_index(str(index_dir / "index.faiss"))
    l2 = faiss.IndexFlatL2(flat.d)
    l2.add(flat.reconstruct_n(0, flat.ntotal))
    faiss.write_index(l2, str(index_dir / "index.faiss"))
    files = {**meta["files"], "index.faiss": file_sha256(index_dir / "index.faiss")}
    (index_dir / "meta.json").write_text(json.dumps({**meta, "files": files}))
    with pytest.raises(IndexLoadError, match="over L2"):
        load_index(index_dir)


def test_a_sha256_recorded_in_upper_case_is_the_same_model(tmp_path):
    """meta.json's query_model_sha256 in upper case: "built for query model 92195E9E8B60, but query model
    92195e9e8b60 was given", the same value twice."""
    _, paths, _ = members(tmp_path, n_models=2)
    index_dir = build_index(combine_members(paths, tmp_path / "g.parquet"), tmp_path / "index")
    meta = json.loads((index_dir / "meta.json").read_text())
    (index_dir / "meta.json").write_text(json.dumps({**meta, "query_model_sha256": "E" * 64}))
    assert load_index(index_dir, query_sha256="e" * 64).meta["query_model_sha256"] == "E" * 64


def _rewrite(index_dir, name, write):
    """Replace one file of a built index and its checksum and size in meta.json (a consistent forgery)."""
    write(index_dir / name)
    meta = json.loads((index_dir / "meta.json").read_text())
    meta["files"][name] = file_sha256(index_dir / name)
    meta["sizes"][name] = (index_dir / name).stat().st_size
    (index_dir / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_an_index_holding_vectors_that_are_not_unit_vectors_is_refused_naming_the_row(tmp_path, index_type):
    gallery, _ = clustered_gallery(tmp_path, n=1200, members=2)
    index_dir = build_index(gallery, tmp_path / "index", index_type=index_type,
                            options=IndexConfig(ivfpq=IvfPqConfig(nbits=4)))
    ids = pq.read_table(index_dir / "ids.parquet")["id"].to_pylist()
    load_index(index_dir)  # as built: unit vectors, within rounding

    def scale_row_7(path):
        index = faiss.read_index(str(path))
        top = faiss.downcast_index(index)
        flat = top if index_type == "flat" else faiss.downcast_index(top.storage if index_type == "hnsw"
                                                                     else top.refine_index)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d)
        vectors[7 * flat.d:8 * flat.d] *= 1.01  # a 1% longer vector: scores off by 1%
        faiss.write_index(index, str(path))

    _rewrite(index_dir, "index.faiss", scale_row_7)
    with pytest.raises(IndexLoadError, match=rf"index.faiss: row 7 \(id '{ids[7]}'\) holds a vector of norm 1.01"):
        load_index(index_dir)


def test_rejected_ids_are_checked_against_the_indexed_ids_and_meta_json(tmp_path):
    import pyarrow as pa

    gallery, _ = clustered_gallery(tmp_path, n=200, members=2)
    index_dir = build_index(gallery, tmp_path / "index", reject_fraction=0.1)
    ids = pq.read_table(index_dir / "ids.parquet")["id"].to_pylist()
    rejected = pq.read_table(index_dir / "rejected.parquet")
    load_index(index_dir)

    def write(id_list, unc):
        return lambda path: pq.write_table(pa.table({"id": pa.array(id_list, pa.string()),
                                                     "uncertainty": pa.array(unc, pa.float32())}), path)

    rej_ids, rej_unc = rejected["id"].to_pylist(), rejected["uncertainty"].to_pylist()
    _rewrite(index_dir, "rejected.parquet", write([*rej_ids, ids[1]], [*rej_unc, max(rej_unc)]))
    with pytest.raises(IndexLoadError, match=f"rejected.parquet: id '{ids[1]}' is both rejected and indexed"):
        load_index(index_dir)
    _rewrite(index_dir, "rejected.parquet", write(rej_ids[:-1], rej_unc[:-1]))
    with pytest.raises(IndexLoadError, match=f"{len(rej_ids) - 1} rows, meta.json records n_rejected {len(rej_ids)}"):
        load_index(index_dir)
    _rewrite(index_dir, "rejected.parquet", write(rej_ids, [*rej_unc[:-1], 0.0]))
    with pytest.raises(IndexLoadError, match=f"id '{rej_ids[-1]}' has uncertainty 0, below indexed items'"):
        load_index(index_dir)
    _rewrite(index_dir, "rejected.parquet", write([*rej_ids[:-1], rej_ids[0]], rej_unc))
    with pytest.raises(TableError, match=f"duplicate id '{rej_ids[0]}'"):
        load_index(index_dir)


def test_index_settings_are_checked_against_what_rejection_leaves_of_the_gallery():
    """An `auto` index over fewer items than auto_threshold is flat, whatever ivfpq.m says: 105 rows of which 11 are
    rejected (ceil(10 %)) leave 94, under a threshold of 100, and were refused for ivfpq.m=7 at 32 dimensions."""
    from cmce.config import IndexConfig, IvfPqConfig
    from cmce.index import check_index_fits

    auto = IndexConfig(type="auto", auto_threshold=100, reject_fraction=0.1, ivfpq=IvfPqConfig(m=7))
    check_index_fits(auto, 32, 105)
    with pytest.raises(ValueError, match="index.ivfpq.m=7 must divide the embedding dimension 32"):
        check_index_fits(auto, 32, 112)  # 112 − 12 = 100 indexed: ivfpq
    with pytest.raises(ValueError, match="index.ivfpq.m=7 must divide"):
        check_index_fits(IndexConfig(type="ivfpq", ivfpq=IvfPqConfig(m=7)), 32)
    check_index_fits(IndexConfig(type="ivfpq", ivfpq=IvfPqConfig(m=8)), 32)
    check_index_fits(IndexConfig(type="hnsw", ivfpq=IvfPqConfig(m=7)), 32, 10**6)


@pytest.mark.parametrize("index_type, part", [("hnsw", "storage"), ("ivfpq", "refine_index"),
                                              ("ivfpq", "base_index.quantizer")])
def test_an_index_whose_inner_index_scores_by_l2_is_refused(tmp_path, index_type, part):
    """An HNSW file whose flat storage was set to L2, its own metric left inner product (checksums rewritten):
    search answered other neighbours with other scores, exit 0. Each inner index is checked too."""
    gallery, _ = clustered_gallery(tmp_path, n=1200, members=2)
    index_dir = build_index(gallery, tmp_path / "index", index_type=index_type,
                            options=IndexConfig(ivfpq=IvfPqConfig(nbits=4)))
    load_index(index_dir)

    def to_l2(path):
        index = faiss.read_index(str(path))
        inner = faiss.downcast_index(index)
        for name in part.split("."):
            inner = faiss.downcast_index(getattr(inner, name))
        inner.metric_type = faiss.METRIC_L2
        faiss.write_index(index, str(path))

    _rewrite(index_dir, "index.faiss", to_l2)
    with pytest.raises(IndexLoadError, match=rf"index.faiss: its {part} holds \d+ vectors scored by L2, the index "
                                             r"\d+ by inner products: an edited file; build the index again$"):
        load_index(index_dir)
