import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.degraded import DEGRADED, degrade, degraded_copy, degraded_gallery, degraded_table
from benchmarks.references import REJECTED
from cmce.config import load_config
from cmce.method import rejection_mask
from cmce.tables import embedding_column, float_column, read_table, string_column
from tests.conftest import SMOKE, table_cells


def _changed_ids(before_path, after_path) -> set[str]:
    """Ids whose image bytes differ between two datasets of the same rows."""
    before, after = (pq.read_table(p, columns=["id", "image"]) for p in (before_path, after_path))
    return {i for i, a, b in zip(before.column("id").to_pylist(), before.column("image").to_pylist(),
                                 after.column("image").to_pylist(), strict=True) if a != b}


def _png(x: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(x).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("shape", [(28, 28), (32, 32, 4)])
def test_degrade_keeps_size_and_mode_and_loses_the_fine_detail(shape):
    checker = ((np.indices(shape[:2]).sum(axis=0) % 2) * 255).astype(np.uint8)  # detail at the pixel scale
    x = np.stack([checker] * 3 + [np.full(shape[:2], 200, np.uint8)], axis=-1) if len(shape) == 3 else checker
    out = np.asarray(Image.open(io.BytesIO(degrade(_png(x), np.random.default_rng(0)))))
    assert out.shape == x.shape and out.dtype == np.uint8
    colour = out[..., :3] if out.ndim == 3 else out
    # the 0/255 checkerboard is averaged to mid-grey, up to the noise
    assert abs(colour.mean() - 127.5) < 10 and colour.std() < 0.5 * checker.std()
    if out.ndim == 3:
        assert (out[..., 3] == 200).all()  # alpha is not noised
    again = degrade(_png(x), np.random.default_rng(0))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(again))), out)  # seeded


def test_degraded_copy_changes_only_the_chosen_test_images(smoke_run, tmp_path):
    lay, _ = smoke_run
    out = tmp_path / "degraded.parquet"
    chosen = degraded_copy(lay.dataset, out, DEGRADED, seed=3)
    before, after = pq.read_table(lay.dataset), pq.read_table(out)
    assert after.schema == before.schema and after.schema.metadata == before.schema.metadata
    for column in ("id", "label", "split"):
        assert after.column(column).equals(before.column(column))
    changed = _changed_ids(lay.dataset, out)
    split = dict(zip(before.column("id").to_pylist(), before.column("split").to_pylist(), strict=True))
    n_test = sum(s == "test" for s in split.values())
    assert changed == chosen and len(chosen) == round(DEGRADED * n_test)
    assert {split[i] for i in chosen} == {"test"}
    assert degraded_copy(lay.dataset, tmp_path / "again.parquet", DEGRADED, seed=3) == chosen


def test_degraded_gallery_differs_from_the_runs_only_at_the_degraded_items(smoke_run, tmp_path):
    lay, _ = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    gallery, degraded = degraded_gallery(cfg, lay, tmp_path / "degraded")
    new, old = read_table(gallery), read_table(lay.gallery)
    ids = string_column(new, "id", "new")
    assert ids == string_column(old, "id", "old")
    moved = ~np.isclose(embedding_column(new, "embedding", "new"), embedding_column(old, "embedding", "old"),
                        atol=1e-5).all(axis=1)
    assert {i for i, m in zip(ids, moved, strict=True) if m} == degraded


def test_degraded_table_reports_the_known_ordering_and_the_share_caught(smoke_run, tmp_path):
    lay, metrics = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    root = tmp_path / "degraded"  # not inside the shared run: other tests compare its files
    rows = degraded_table(cfg, lay, metrics, root)
    text = "\n".join(rows)
    assert "| clean |" in text and "% degraded |" in text
    known = next(r for r in rows if r.startswith("| the degraded items (known) |"))
    err, drop = table_cells(known)[1:]
    base = float(next(r for r in rows if r.startswith("| nothing |")).split("|")[2])
    assert abs((base - float(err)) / base * 100 - float(drop.rstrip(" %"))) < 0.02
    # the sweep over operating points has a column for the known ordering, and its 1e-3 row repeats the drop above
    sweep = text.split("other operating points")[1].splitlines()
    assert "relative drop: the degraded items (known)" in sweep[2]
    thousandth = next(r for r in sweep if r.startswith("| 0.001 |")).split(" | ")
    assert abs(float(thousandth[1].split(" ± ")[0]) - base) < 0.01
    assert abs(float(thousandth[4].split(" ± ")[0]) - float(drop.rstrip(" %"))) < 0.01
    # the share caught, recomputed from what the table's run wrote
    g = read_table(root / "gallery.parquet")
    is_degraded = np.isin(string_column(g, "id", "g"), list(_changed_ids(lay.dataset, root / "dataset.parquet")))
    rejected = rejection_mask(float_column(g, "uncertainty", "g"), REJECTED)
    caught = float(text.split("most uncertain: ")[1].split(" %")[0])
    assert abs(caught - 100 * is_degraded[rejected].mean()) < 0.05
