"""Growing the ensemble and upgrading the query model from stored embeddings."""

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cmce.config import ModelSpec, TrainConfig, TransformConfig
from cmce.embed import combine_members
from cmce.index import IndexLoadError, build_index, load_index, search
from cmce.lifecycle import add_member, upgrade_query_model
from cmce.tables import TableError, embedding_array, embedding_column, read_metadata
from tests.test_embed import members


def test_adding_models_one_at_a_time_equals_building_at_once(tmp_path):
    _, paths, _ = members(tmp_path, n_models=3, rows=50)
    at_once = pq.read_table(combine_members(paths, tmp_path / "all.parquet"))
    grown = combine_members(paths[:1], tmp_path / "g1.parquet")
    for i, p in enumerate(paths[1:], start=2):
        grown = add_member(grown, p, tmp_path / f"g{i}.parquet", batch_size=16)  # batches ≠ row groups
    grown = pq.read_table(grown)
    for col in ("embedding", "ensemble_sum", "raw_m0", "raw_m1", "raw_m2"):
        np.testing.assert_allclose(embedding_column(grown, col, "g"), embedding_column(at_once, col, "a"), atol=1e-5)
    np.testing.assert_allclose(grown.column("uncertainty").to_numpy(), at_once.column("uncertainty").to_numpy(),
                               atol=1e-5)
    assert set(grown.column("n_models").to_pylist()) == {3}
    assert [m["name"] for m in read_metadata(tmp_path / "g3.parquet")["members"]] == ["m0", "m1", "m2"]


def test_add_member_refuses_duplicates_and_other_query_models(tmp_path):
    ids, paths, _ = members(tmp_path, n_models=2, rows=20)
    gallery = combine_members(paths, tmp_path / "g.parquet")
    with pytest.raises(TableError, match="already has a member named 'm1'"):
        add_member(gallery, paths[1], tmp_path / "out.parquet")
    from tests.test_embed import write_member

    other = write_member(tmp_path / "x.parquet", "x", ids, np.zeros((20, 3)), np.ones((20, 6)), query_sha="f" * 64)
    with pytest.raises(TableError, match="transformed for query model ffffffffffff"):
        add_member(gallery, other, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("tamper, message", [
    ("n_models", "column 'n_models' holds \\[5\\], but the metadata names 2"),
    ("sum_too_long", "not the sum of 2 unit vectors"),
    ("sum_other_direction", "not the sum of 2 unit vectors"),
    ("uncertainty", "column 'uncertainty' of id .* is not the spread its 'ensemble_sum' of 2 member\\(s\\) implies"),
])
def test_add_member_refuses_a_stored_ensemble_it_cannot_grow_from(tmp_path, tamper, message):
    """The new mean and uncertainty come from the stored sum and count alone: a count that is not the
    number of members, or a sum that does not match the stored embedding, would corrupt every row silently.
    build-index runs the same checks (its rejection reads the uncertainty)."""
    from cmce.index import build_index

    _, paths, _ = members(tmp_path, n_models=3, rows=20)
    gallery = pq.read_table(combine_members(paths[:2], tmp_path / "g.parquet"))
    cols = {c: gallery.column(c) for c in gallery.column_names}
    s = embedding_column(gallery, "ensemble_sum", "g")
    if tamper == "n_models":
        cols["n_models"] = pa.array(np.full(20, 5, np.int32))
    elif tamper == "sum_too_long":
        cols["ensemble_sum"] = embedding_array(s * 3)
    elif tamper == "uncertainty":
        cols["uncertainty"] = pa.array(gallery.column("uncertainty").to_numpy()[::-1].copy())
    else:
        cols["ensemble_sum"] = embedding_array(np.roll(s, 1, axis=1))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table(cols).replace_schema_metadata(gallery.schema.metadata), bad)
    with pytest.raises(TableError, match=message):
        add_member(bad, paths[2], tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    with pytest.raises(TableError, match=message):
        build_index(bad, tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_upgrade_query_model_without_gallery_images(smoke_run, tmp_path):
    lay, _ = smoke_run
    from cmce.checkpoint import load_embedding_model
    from cmce.config import DataConfig
    from cmce.embed import embed_split
    from cmce.train import train_embedding_model

    # a new query model, trained as usual (the train split stays available)
    spec = ModelSpec(name="query", arch="query_cnn", embedding_dim=24, width=8, seed=7)
    new_q = tmp_path / "query_v2.pt"
    train_embedding_model(lay.dataset, spec, DataConfig(source="digits", image_size=8), TrainConfig(epochs=2), new_q)
    # the gallery images are gone: keep only the train split of the dataset
    table = pq.read_table(lay.dataset)
    train_only = tmp_path / "train_only.parquet"
    pq.write_table(table.filter(pc.equal(table.column("split"), "train")), train_only)

    out = upgrade_query_model(lay.gallery, new_q, train_only,
                              [lay.train_embeddings(g) for g in lay.gallery_names],
                              TransformConfig(hidden_dim=32, epochs=3), tmp_path / "transforms",
                              tmp_path / "gallery_v2.parquet")
    old, new = pq.read_table(lay.gallery), pq.read_table(out)
    assert new.schema.field("embedding").type.list_size == 24
    for g in lay.gallery_names:
        np.testing.assert_array_equal(embedding_column(new, f"raw_{g}", "n"), embedding_column(old, f"raw_{g}", "o"))
    q2 = load_embedding_model(new_q)
    assert read_metadata(out)["query_model_sha256"] == q2.sha256
    index_dir = build_index(out, tmp_path / "index")
    # searching with the new query model works (queries embedded from wherever they come from) ...
    queries = embed_split(q2, lay.dataset, "test").embeddings[:5]
    res = search(load_index(index_dir, query_sha256=q2.sha256), queries, 3)
    assert len(res.ids) == 5 and all(len(r) == 3 for r in res.ids)
    # ... and the old query model is refused
    with pytest.raises(IndexLoadError, match="built for query model"):
        load_index(index_dir, query_sha256=load_embedding_model(lay.model("query")).sha256)


def test_upgrade_needs_train_embeddings_of_every_member(smoke_run, tmp_path, monkeypatch):
    """Checked before any work: resnet_a's transformation was refitted (every one but the last, at full size: many
    minutes) before vgg_b's missing file was found."""
    import cmce.lifecycle

    lay, _ = smoke_run
    monkeypatch.setattr(cmce.lifecycle, "fit_transformation", lambda *a, **kw: pytest.fail("fitted before the check"))
    monkeypatch.setattr(cmce.lifecycle, "embed_split", lambda *a, **kw: pytest.fail("embedded before the check"))
    with pytest.raises(TableError, match="no stored train embeddings for gallery model 'vgg_b'"):
        upgrade_query_model(lay.gallery, lay.model("query"), lay.dataset, [lay.train_embeddings("resnet_a")],
                            TransformConfig(epochs=1), tmp_path / "t", tmp_path / "g.parquet")
    assert not (tmp_path / "g.parquet").exists()


@pytest.mark.parametrize("change,message", [
    (lambda c: c[:3], "its classifier has 3 classes, but the train split has labels up to 9"),
    (lambda c: c * 0, "field 'classifier' has all-zero rows for 10 train class(es) (first: label 0)")])
def test_an_upgrade_to_a_query_classifier_that_cannot_score_the_train_labels_is_refused_before_any_work(
        smoke_run, tmp_path, monkeypatch, change, message):
    """fit-transform refused such a query model; the upgrade, which refits every transformation against the same
    frozen classifier, embedded the train split and then failed in torch (`Target 9 is out of bounds`), or fitted
    against zero rows without a word."""
    import torch

    import cmce.lifecycle
    from cmce.checkpoint import CheckpointError

    lay, _ = smoke_run
    obj = torch.load(lay.model("query"), weights_only=True)
    query = tmp_path / "query.pt"
    torch.save({**obj, "classifier": change(obj["classifier"])}, query)
    monkeypatch.setattr(cmce.lifecycle, "embed_split", lambda *a, **kw: pytest.fail("embedded before the check"))
    with pytest.raises(CheckpointError, match=re.escape(f"--query-model {query}: {message}")):
        upgrade_query_model(lay.gallery, query, lay.dataset, [lay.train_embeddings(g) for g in lay.gallery_names],
                            TransformConfig(epochs=1), tmp_path / "t", tmp_path / "g.parquet")
    assert not (tmp_path / "g.parquet").exists() and not (tmp_path / "t").exists()


def test_an_upgrade_whose_gallery_cannot_be_written_keeps_the_old_transformations(smoke_run, tmp_path,
                                                                                   monkeypatch):
    """A full disk at the gallery left the transformations already replaced by the new query model's, beside
    the old gallery: every later evaluate refused the pair."""
    import errno
    import shutil

    import cmce.lifecycle

    lay, _ = smoke_run
    transforms = shutil.copytree(lay.transformation(lay.gallery_names[0]).parent, tmp_path / "t")
    before = {p.name: p.read_bytes() for p in transforms.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(cmce.lifecycle.pq, "write_table", disk_full)
    out = tmp_path / "g.parquet"
    with pytest.raises(OSError, match=rf"^{out}: not written: No space left on device"):
        upgrade_query_model(lay.gallery, lay.model("query"), lay.dataset,
                            [lay.train_embeddings(g) for g in lay.gallery_names], TransformConfig(epochs=1),
                            transforms, out)
    assert {p.name: p.read_bytes() for p in transforms.iterdir()} == before and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_upgrade_refuses_a_train_split_without_the_stored_training_ids(smoke_run, tmp_path):
    lay, _ = smoke_run
    table = pq.read_table(lay.dataset)
    train = table.filter(pc.equal(table.column("split"), "train"))
    short = tmp_path / "short.parquet"
    pq.write_table(train.slice(3), short)  # the first 3 training images are gone
    stored = lay.train_embeddings(lay.gallery_names[0])
    with pytest.raises(TableError, match=rf"{stored}: holds {train.num_rows} rows that are not the train split of "
                                         rf"{short} \({train.num_rows - 3} rows, in order\): the stored embeddings "
                                         "and the dataset differ"):
        upgrade_query_model(lay.gallery, lay.model("query"), short,
                            [lay.train_embeddings(g) for g in lay.gallery_names],
                            TransformConfig(epochs=1), tmp_path / "t", tmp_path / "g.parquet")
    assert not (tmp_path / "t").exists() and not (tmp_path / "g.parquet").exists()


@pytest.mark.parametrize("edit", ["truncated", "relabelled"])
def test_upgrade_refuses_stored_train_embeddings_that_are_not_the_train_split(smoke_run, tmp_path, monkeypatch,
                                                                              edit):
    """3 of 1,258 stored rows refitted every transformation, and a gallery and index were rebuilt from them, exit 0;
    embeddings stored with other labels trained each T's classification term on them. Refused before any work."""
    import cmce.lifecycle

    lay, _ = smoke_run
    stored = lay.train_embeddings(lay.gallery_names[0])
    table = pq.read_table(stored)
    if edit == "truncated":
        table = table.slice(0, 3)
    else:
        labels = table.column("label").to_numpy().copy()
        labels[0] = (labels[0] + 1) % 10
        table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    edited = tmp_path / stored.name
    pq.write_table(table.replace_schema_metadata(pq.read_schema(stored).metadata), edited)
    monkeypatch.setattr(cmce.lifecycle, "embed_split", lambda *a, **kw: pytest.fail("embedded before the check"))
    why = "rows that are not the train split" if edit == "truncated" else "labels differ from those of the train split"
    with pytest.raises(TableError, match=rf"{edited}: (holds \d+ )?{why} of {lay.dataset}"):
        upgrade_query_model(lay.gallery, lay.model("query"), lay.dataset,
                            [edited, *[lay.train_embeddings(g) for g in lay.gallery_names[1:]]],
                            TransformConfig(epochs=1), tmp_path / "t", tmp_path / "g.parquet")
    assert not (tmp_path / "t").exists() and not (tmp_path / "g.parquet").exists()


def test_add_gallery_model_cli_equals_combining_all_members(smoke_run, tmp_path):
    from cmce.cli import main
    from cmce.config import DataConfig
    from cmce.train import train_embedding_model
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    new = tmp_path / "mob_c.pt"
    spec = ModelSpec(name="mob_c", arch="mobilenet", embedding_dim=40, width=8, seed=5)
    train_embedding_model(lay.dataset, spec, DataConfig(source="digits", image_size=8), TrainConfig(epochs=2), new)
    out, work = tmp_path / "gallery.parquet", tmp_path / "work"
    rc = main(["add-gallery-model", "--config", str(SMOKE), "--dataset", str(lay.dataset), "--gallery",
               str(lay.gallery), "--query-model", str(lay.model("query")), "--gallery-model", str(new),
               "--out", str(out), "--index-out", str(tmp_path / "index"), "--work-dir", str(work)])
    assert rc == 0
    expected = combine_members([lay.member(g) for g in lay.gallery_names] + [work / "member_mob_c.parquet"],
                               tmp_path / "direct.parquet")
    got, want = pq.read_table(out), pq.read_table(expected)
    np.testing.assert_allclose(embedding_column(got, "embedding", "g"), embedding_column(want, "embedding", "w"),
                               atol=1e-5)
    np.testing.assert_allclose(got.column("uncertainty").to_numpy(), want.column("uncertainty").to_numpy(),
                               atol=1e-5)
    assert [m["name"] for m in read_metadata(out)["members"]] == [*lay.gallery_names, "mob_c"]
    assert load_index(tmp_path / "index").meta["members"][-1]["name"] == "mob_c"
    # its --work-dir (member and train-embeddings files) passes whole as a folder of stored train embeddings
    stored = {lay.train_embeddings(g).parent for g in lay.gallery_names}
    assert main(["upgrade-query-model", "--config", str(SMOKE), "--dataset", str(lay.dataset), "--gallery", str(out),
                 "--query-model", str(lay.model("query")), "--train-embeddings", *map(str, stored), str(work),
                 "--transforms-out", str(tmp_path / "t2"), "--out", str(tmp_path / "up.parquet")]) == 0
    assert sorted(p.name for p in (tmp_path / "t2").iterdir()) == sorted(f"{g}.pt" for g in [*lay.gallery_names,
                                                                                          "mob_c"])


def test_add_gallery_model_refuses_another_query_model_before_any_work(smoke_run, tmp_path, caplog):
    """Another query model than the gallery's was refused once T was fitted and the whole gallery embedded, naming a
    working file (`…/member_resnet_c.parquet: transformed for query model d6e73033f675, the gallery for …`); two
    swapped models were named by their file alone."""
    from cmce.checkpoint import load_embedding_model
    from cmce.cli import main
    from cmce.config import DataConfig
    from cmce.train import train_embedding_model
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    other = tmp_path / "query_v2.pt"
    spec = ModelSpec(name="query", arch="query_cnn", embedding_dim=24, width=8, seed=7)
    train_embedding_model(lay.dataset, spec, DataConfig(source="digits", image_size=8), TrainConfig(epochs=1), other)
    work = tmp_path / "work"

    def add(query: Path, gallery_model: Path) -> str:
        caplog.clear()
        assert main(["add-gallery-model", "--config", str(SMOKE), "--dataset", str(lay.dataset), "--gallery",
                     str(lay.gallery), "--query-model", str(query), "--gallery-model", str(gallery_model),
                     "--out", str(tmp_path / "grown.parquet"), "--work-dir", str(work)]) == 2
        assert not work.exists() and not (tmp_path / "grown.parquet").exists()
        return caplog.records[-1].getMessage()

    served = load_embedding_model(lay.model("query")).sha256
    assert add(other, lay.model(lay.gallery_names[0])) == (
        f"cmce add-gallery-model: --query-model {other}: query model {load_embedding_model(other).sha256[:12]}, but "
        f"the gallery {lay.gallery} was transformed for query model {served[:12]}: give the query model it serves "
        "(upgrade-query-model moves a gallery to another)")
    gallery_model = lay.model(lay.gallery_names[0])
    assert add(gallery_model, lay.model("query")).startswith(f"cmce add-gallery-model: --query-model {gallery_model}: "
                                                             f"a gallery model {lay.gallery_names[0]!r}")


def test_two_train_embeddings_files_of_one_gallery_model_are_refused(smoke_run, tmp_path):
    """`--train-embeddings resnet_a.parquet vgg_b.parquet resnet_a_other.parquet`: the last file of resnet_a won
    silently (its transformation fitted on shuffled rows: loss 5.25 instead of 3.96)."""
    lay, _ = smoke_run
    first = lay.train_embeddings(lay.gallery_names[0])
    other = Path(shutil.copyfile(first, tmp_path / "other.parquet"))
    with pytest.raises(TableError, match=rf"{other} and {first}: two train-embeddings files of gallery model"):
        upgrade_query_model(lay.gallery, lay.model("query"), lay.dataset,
                            [first, *[lay.train_embeddings(g) for g in lay.gallery_names[1:]], other],
                            TransformConfig(hidden_dim=32, epochs=1), tmp_path / "transforms", tmp_path / "g.parquet")
    assert not (tmp_path / "g.parquet").exists()


def test_an_upgrade_says_it_fits_without_augmented_views_and_records_what_it_fitted(smoke_run, tmp_path, caplog):
    """transform.augment_views needs the gallery models run on augmented images, which an upgrade never does: the
    config's 4 views were silently dropped, and the step's params claimed them."""
    import dataclasses
    import logging

    from cmce.config import load_config
    from cmce.stages import UpgradeInputs, UpgradeOutputs
    from cmce.stages import upgrade_query_model as upgrade_stage
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(tmp_path), "transform.augment_views": 4, "transform.epochs": 2})
    stored = [lay.train_embeddings(g) for g in lay.gallery_names]
    with caplog.at_level(logging.WARNING, logger="cmce.stages"):
        record = upgrade_stage(cfg, UpgradeInputs(lay.dataset, lay.gallery, lay.model("query"), stored),
                               UpgradeOutputs(tmp_path / "gallery.parquet", tmp_path / "t"))
    assert any("transform.augment_views=4 is not applied by upgrade-query-model" in r.getMessage()
               for r in caplog.records)
    assert record.params["transform"] == dataclasses.asdict(dataclasses.replace(cfg.transform, augment_views=0))
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted(f"{g}.pt" for g in lay.gallery_names)


def _snapshot(*paths: Path) -> dict:
    return {p: ({str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()} if p.is_dir()
                else p.read_bytes()) for p in paths}


def test_index_settings_that_cannot_index_the_gallery_are_refused_before_a_lifecycle_step_replaces_it(
        smoke_run, tmp_path, caplog):
    """`--set index.ivfpq.m=7` (the smoke query space is 32-d): add-gallery-model and upgrade-query-model wrote the
    new gallery (and the refitted transformations) over their inputs, then failed building the index, exit 2. The
    rerun refused the model as already in the gallery, and the old index as built from another gallery version."""
    from cmce.cli import main
    from cmce.config import DataConfig
    from cmce.train import train_embedding_model
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    gallery, transforms = tmp_path / "gallery.parquet", tmp_path / "transforms"
    shutil.copyfile(lay.gallery, gallery)
    shutil.copytree(lay.transforms_dir, transforms)
    bad = ["--set", "index.type=ivfpq", "--set", "index.ivfpq.m=7"]
    kept = _snapshot(gallery, transforms)
    common = ["--config", str(SMOKE), *bad, "--dataset", str(lay.dataset), "--gallery", str(gallery),
              "--out", str(gallery), "--index-out", str(tmp_path / "index")]
    new = tmp_path / "mob_c.pt"
    train_embedding_model(lay.dataset, ModelSpec(name="mob_c", arch="mobilenet", embedding_dim=16, width=8, seed=5),
                          DataConfig(source="digits", image_size=8), TrainConfig(epochs=1), new)
    for argv in (["add-gallery-model", *common, "--query-model", str(lay.model("query")), "--gallery-model", str(new),
                  "--work-dir", str(tmp_path / "work")],
                 ["upgrade-query-model", *common, "--query-model", str(lay.model("query")), "--train-embeddings",
                  *[str(lay.train_embeddings(g)) for g in lay.gallery_names], "--transforms-out", str(transforms)]):
        caplog.clear()
        assert main(argv) == 2, argv[0]
        assert "index.ivfpq.m=7 must divide the embedding dimension 32" in caplog.text
        assert _snapshot(gallery, transforms) == kept
        assert not (tmp_path / "index").exists() and not (tmp_path / "work").exists()


def test_an_upgrade_of_a_gallery_with_nan_in_a_raw_column_is_refused_before_any_fit(smoke_run, tmp_path, monkeypatch):
    """The gallery's raw_* columns were read, and a NaN refused, only once every transformation was refitted."""
    import cmce.lifecycle

    lay, _ = smoke_run
    table = pq.read_table(lay.gallery)
    column = f"raw_{lay.gallery_names[0]}"
    values = embedding_column(table, column, "g").copy()
    values[2, 1] = np.inf
    arr = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), pa.float32()), values.shape[1])
    gallery = tmp_path / "gallery.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, arr), gallery)
    monkeypatch.setattr(cmce.lifecycle, "fit_transformation", lambda *a, **kw: pytest.fail("fitted before the check"))
    with pytest.raises(TableError, match=re.escape(f"{gallery}: column '{column}' has NaN/inf values in 1 rows")):
        upgrade_query_model(gallery, lay.model("query"), lay.dataset,
                            [lay.train_embeddings(g) for g in lay.gallery_names], TransformConfig(epochs=1),
                            tmp_path / "t", tmp_path / "g.parquet")


def test_nan_in_a_member_is_named_by_its_row_in_the_file_whatever_the_batch(smoke_run, tmp_path):
    """add-member reads batches: the row a NaN was named by counted from the batch's start (row 6 said 'row 2' in
    batches of 4)."""
    lay, _ = smoke_run
    member = lay.member(lay.gallery_names[-1])
    table = pq.read_table(member)
    values = embedding_column(table, "raw", "m").copy()
    values[6, 0] = np.nan
    arr = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), pa.float32()), values.shape[1])
    bad = tmp_path / "member.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("raw"), "raw", arr), bad)
    one = combine_members([lay.member(g) for g in lay.gallery_names[:-1]], tmp_path / "g.parquet")
    with pytest.raises(TableError, match=re.escape(f"{bad}: column 'raw' has NaN/inf values in 1 rows (first: row 6)")):
        add_member(one, bad, tmp_path / "out.parquet", batch_size=4)


def test_an_index_that_cannot_be_written_leaves_the_gallery_and_transformations_of_an_in_place_update(
        smoke_run, tmp_path, monkeypatch, caplog):
    """A full disk at the index: add-gallery-model and upgrade-query-model had already put the new gallery (and
    the refitted transformations) in place, beside the old index built from the old gallery. Now the index is
    built from the new gallery before it is renamed in: all of them are new, or none is."""
    import errno

    import cmce.index
    from cmce.cli import main
    from cmce.config import DataConfig
    from cmce.train import train_embedding_model
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    gallery, transforms, index = tmp_path / "gallery.parquet", tmp_path / "transforms", tmp_path / "index"
    shutil.copyfile(lay.gallery, gallery)
    shutil.copytree(lay.transforms_dir, transforms)
    build_index(gallery, index)
    kept = _snapshot(gallery, transforms, index)
    new = tmp_path / "mob_c.pt"
    train_embedding_model(lay.dataset, ModelSpec(name="mob_c", arch="mobilenet", embedding_dim=16, width=8, seed=5),
                          DataConfig(source="digits", image_size=8), TrainConfig(epochs=1), new)

    def disk_full(index, path, out_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cmce.index, "_write_faiss", disk_full)
    common = ["--config", str(SMOKE), "--dataset", str(lay.dataset), "--gallery", str(gallery), "--out", str(gallery),
              "--index-out", str(index), "--query-model", str(lay.model("query"))]
    for argv in (["add-gallery-model", *common, "--gallery-model", str(new), "--work-dir", str(tmp_path / "work")],
                 ["upgrade-query-model", *common, "--train-embeddings",
                  *[str(lay.train_embeddings(g)) for g in lay.gallery_names], "--transforms-out", str(transforms)]):
        caplog.clear()
        assert main(argv) == 2, argv[0]
        assert f"{index}: not written: No space left on device" in caplog.text
        assert _snapshot(gallery, transforms, index) == kept, argv[0]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], argv[0]
    monkeypatch.undo()
    # a failure of the index outside its own writes (its temporary folder not made) is the index's, not the gallery's
    import tempfile

    mkdtemp = tempfile.mkdtemp

    def no_room_for_the_index(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(".index."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return mkdtemp(*args, **kwargs)

    for argv in (["add-gallery-model", *common, "--gallery-model", str(new), "--work-dir", str(tmp_path / "work")],
                 ["upgrade-query-model", *common, "--train-embeddings",
                  *[str(lay.train_embeddings(g)) for g in lay.gallery_names], "--transforms-out", str(transforms)]):
        caplog.clear()
        with monkeypatch.context() as m:
            m.setattr(tempfile, "mkdtemp", no_room_for_the_index)
            assert main(argv) == 2, argv[0]
        assert f"{index}: not written: No space left on device" in caplog.text, argv[0]
        assert _snapshot(gallery, transforms, index) == kept, argv[0]
    assert main(["add-gallery-model", *common, "--gallery-model", str(new), "--work-dir", str(tmp_path / "work")]) == 0
    assert load_index(index).meta["gallery_sha256"] == cmce.index.file_sha256(gallery)


def test_add_gallery_model_refuses_a_dataset_whose_split_is_not_the_gallerys_before_any_work(smoke_run, tmp_path,
                                                                                               caplog):
    """A --dataset with ten test rows less was refused only once T was fitted and the split embedded, naming a work
    file (`work/member_X.parquet: embeds another dataset file or split than ...`), whose earlier version it had
    already replaced."""
    from cmce.cli import main
    from cmce.config import DataConfig
    from cmce.train import train_embedding_model
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    table = pq.read_table(lay.dataset)
    test_rows = np.flatnonzero(table.column("split").to_numpy(zero_copy_only=False) == "test")
    cut = tmp_path / "cut.parquet"
    pq.write_table(table.filter(~np.isin(np.arange(table.num_rows), test_rows[:10])), cut)
    new = tmp_path / "mob_c.pt"
    train_embedding_model(lay.dataset, ModelSpec(name="mob_c", arch="mobilenet", embedding_dim=16, width=8, seed=5),
                          DataConfig(source="digits", image_size=8), TrainConfig(epochs=1), new)
    caplog.clear()
    assert main(["add-gallery-model", "--config", str(SMOKE), "--dataset", str(cut), "--gallery", str(lay.gallery),
                 "--query-model", str(lay.model("query")), "--gallery-model", str(new),
                 "--out", str(tmp_path / "grown.parquet"), "--work-dir", str(tmp_path / "work")]) == 2
    assert caplog.records[-1].getMessage() == (
        f"cmce add-gallery-model: --dataset {cut}: its 'test' split is not the one {lay.gallery} embeds (other ids "
        "or labels): give the dataset the gallery was made from")
    assert not (tmp_path / "work").exists() and not (tmp_path / "grown.parquet").exists()


def test_a_lifecycle_step_stopped_between_its_renames_is_completed_by_running_it_again(smoke_run, tmp_path,
                                                                                         monkeypatch):
    """The outputs of an in-place update are renamed in one after another, the gallery last: a step stopped between
    them leaves the index (and the transformations) new beside the old gallery, which still lacks the change, so
    the same command run again completes it."""
    import errno
    import os

    import cmce.storage
    from cmce.cli import main
    from cmce.config import DataConfig
    from cmce.storage import file_sha256
    from cmce.train import train_embedding_model
    from cmce.transform import load_transformation
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    gallery, transforms, index = tmp_path / "gallery.parquet", tmp_path / "transforms", tmp_path / "index"
    shutil.copyfile(lay.gallery, gallery)
    shutil.copytree(lay.transforms_dir, transforms)
    build_index(gallery, index)
    new = tmp_path / "mob_c.pt"
    train_embedding_model(lay.dataset, ModelSpec(name="mob_c", arch="mobilenet", embedding_dim=16, width=8, seed=5),
                          DataConfig(source="digits", image_size=8), TrainConfig(epochs=1), new)
    replace = os.replace

    def stopped_at_the_gallery(src, dst):
        if Path(dst) == gallery:
            raise OSError(errno.EIO, "Input/output error")
        replace(src, dst)

    common = ["--config", str(SMOKE), "--dataset", str(lay.dataset), "--gallery", str(gallery), "--out", str(gallery),
              "--index-out", str(index), "--query-model", str(lay.model("query"))]
    for argv in (["add-gallery-model", *common, "--gallery-model", str(new), "--work-dir", str(tmp_path / "work")],
                 ["upgrade-query-model", *common, "--train-embeddings",
                  *[str(lay.train_embeddings(g)) for g in lay.gallery_names], str(tmp_path / "work"),
                  "--transforms-out", str(transforms)]):
        before = gallery.read_bytes()
        with monkeypatch.context() as m:
            m.setattr(cmce.storage.os, "replace", stopped_at_the_gallery)
            assert main(argv) == 2, argv[0]
        assert gallery.read_bytes() == before, argv[0]
        assert main(argv) == 0, argv[0]
        meta = read_metadata(gallery)
        assert load_index(index).meta["gallery_sha256"] == file_sha256(gallery), argv[0]
        assert {m["name"]: m["transformation_sha256"] for m in meta["members"]} == (
            {t.stem: load_transformation(t).sha256 for t in transforms.glob("*.pt")}
            if argv[0] == "upgrade-query-model" else
            {**{t.stem: load_transformation(t).sha256 for t in transforms.glob("*.pt")},
             "mob_c": load_transformation(tmp_path / "work" / "transform_mob_c.pt").sha256}), argv[0]


def test_a_tracked_addition_stopped_before_its_record_was_published_is_completed_by_running_it_again(
        smoke_run, tmp_path, monkeypatch, caplog):
    """A tracked in-place add-gallery-model whose tracking server failed (or that was killed) after the new gallery
    was put in place: the transformation was never registered, and the rerun was refused as "already a member", so
    production could not follow that gallery. The rerun now registers it, fitting nothing again."""
    from mlflow import MlflowClient

    import cmce.stages
    import cmce.tracking
    from cmce.cli import main
    from cmce.config import DataConfig
    from cmce.records import registry_name
    from cmce.storage import file_sha256
    from cmce.tracking import start_parent_run
    from cmce.train import train_embedding_model
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    gallery, index, work = tmp_path / "gallery.parquet", tmp_path / "index", tmp_path / "work"
    shutil.copyfile(lay.gallery, gallery)
    new = tmp_path / "mob_c.pt"
    train_embedding_model(lay.dataset, ModelSpec(name="mob_c", arch="mobilenet", embedding_dim=16, width=8, seed=5),
                          DataConfig(source="digits", image_size=8), TrainConfig(epochs=1), new)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "lifecycle", {})
    argv = ["--mlflow-parent", parent, "--mlflow-uri", uri, "add-gallery-model", "--config", str(SMOKE),
            "--dataset", str(lay.dataset), "--gallery", str(gallery), "--out", str(gallery), "--index-out",
            str(index), "--query-model", str(lay.model("query")), "--gallery-model", str(new), "--work-dir",
            str(work)]

    def unreachable(*args, **kwargs):
        raise OSError("tracking server unreachable")

    with monkeypatch.context() as m:
        m.setattr(cmce.tracking, "publish", unreachable)
        assert main(argv) == 2
    grown = gallery.read_bytes()
    added = {m["name"]: m for m in read_metadata(gallery)["members"]}["mob_c"]
    client = MlflowClient(tracking_uri=uri)
    name = registry_name("transform", "mob_c")
    assert not client.search_model_versions(f"name='{name}'")

    with monkeypatch.context() as m:  # nothing is fitted or embedded again
        m.setattr(cmce.stages, "fit_transform", lambda *a, **kw: pytest.fail("fitted again"))
        m.setattr(cmce.stages, "embed_member", lambda *a, **kw: pytest.fail("embedded again"))
        assert main(argv) == 0
    assert gallery.read_bytes() == grown
    [version] = client.search_model_versions(f"name='{name}'")
    assert version.tags["sha256"] == added["transformation_sha256"] == file_sha256(work / "transform_mob_c.pt")
    assert load_index(index).meta["gallery_sha256"] == file_sha256(gallery)

    # not the same work folder, or another gallery asked for: the member is refused as before
    for flag, other in (("--work-dir", tmp_path / "other"), ("--out", tmp_path / "g2.parquet")):
        changed = [*argv]
        changed[changed.index(flag) + 1] = str(other)
        caplog.clear()
        assert main(changed) == 2, flag
        assert "a gallery model named 'mob_c' is already in" in caplog.text, flag
