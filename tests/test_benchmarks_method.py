import re
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.method import LAMBDA_GRID, lambda_table
from cmce.config import load_config
from cmce.steps import RunLayout
from tests.conftest import SMOKE


def _ids(path, split):
    t = pq.read_table(path, columns=["id", "split"])
    return set(t.filter(pc.equal(t.column("split"), split)).column("id").to_pylist())


def test_lambda_is_tuned_on_a_validation_split_carved_from_train(smoke_run, tmp_path):
    lay, metrics = smoke_run
    root = tmp_path / "run"  # a copy: the λ runs write next to the models
    for part in ("data", "models"):
        shutil.copytree(lay.root / part, root / part)
    own = RunLayout(root, lay.gallery_names)
    cfg = load_config(SMOKE, {"output_dir": str(root)})
    rows = lambda_table(cfg, own, metrics, 0.25)

    carved = root / "lambda_validation" / "run" / "data" / "dataset.parquet"
    assert _ids(carved, "train") | _ids(carved, "test") == _ids(own.dataset, "train")  # no test image seen

    table = {float(m[1]): (m[2], m[3], m[4]) for r in rows
             if (m := re.fullmatch(r"\| ([\d.]+)( \(.*\))? \| ([\d./ ]+) \| (.+) \|", r))}
    assert sorted(table) == sorted(LAMBDA_GRID)
    val_score = {lam: sum(map(float, v[1].split(" / ")[:2])) for lam, v in table.items()}  # R@1 + MAP@R
    chosen = [lam for lam, v in table.items() if v[0] and "chosen" in v[0]]
    assert chosen == [max(val_score, key=val_score.get)]
    measured = {lam for lam, v in table.items() if v[2] != "—"}
    assert measured == {0.0, chosen[0], cfg.transform.lam}
    ens = metrics[f"asym_ensemble/{len(cfg.gallery_models)}"]
    assert table[cfg.transform.lam][2] == " / ".join(f"{100 * ens[x]:.2f}" for x in ("R@1", "MAP@R", "TAR@FAR=0.001"))


def test_compatibility_table_reports_cka_and_alignment_for_every_gallery_model(smoke_run):
    from benchmarks.method import compatibility_table

    lay, metrics = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    rows = compatibility_table(cfg, lay, metrics)[2:]
    assert [r.split(" | ")[0].lstrip("| ").split(" ")[0] for r in rows] == lay.gallery_names
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        cka, cos = ([float(v) for v in c.split(" / ")] for c in cells[1:3])
        assert all(0.0 <= v <= 1.0 for v in cka) and all(-1.0 <= v <= 1.0 for v in cos)
        assert cos[0] > 0.5  # T was fitted on the train split: it aligns there
