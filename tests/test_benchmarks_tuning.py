import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.tuning import Validation, tuning_table
from cmce.config import load_config
from cmce.layout import RunLayout
from tests.conftest import SMOKE, table_cells


def _ids(path, split):
    t = pq.read_table(path, columns=["id", "split"])
    return set(t.filter(pc.equal(t.column("split"), split)).column("id").to_pylist())


def _score(cell):  # R@1 + MAP@R, the selection criterion
    return sum(map(float, cell.split(" / ")[:2]))


def test_transformation_settings_are_tuned_on_a_validation_split_carved_from_train(smoke_run, tmp_path):
    lay, metrics = smoke_run
    root = tmp_path / "run"  # a copy: the tuning runs write next to the models
    for part in ("data", "models"):
        shutil.copytree(lay.root / part, root / part)
    own = RunLayout(root, lay.gallery_names)
    cfg = load_config(SMOKE, {"output_dir": str(root)})
    v = Validation(cfg, own, metrics, 0.25)
    grid = {"lam": (0.0, 0.3), "depth": (1, 2)}
    rows = tuning_table(v, grid)

    carved = root / "validation" / "run" / "data" / "dataset.parquet"
    assert _ids(carved, "train") | _ids(carved, "test") == _ids(own.dataset, "train")  # no test image seen

    search = [table_cells(r) for r in rows if r.startswith("| λ |") or r.startswith("| depth |")]
    by_setting: dict[str, list] = {}
    for name, value, cell in search:
        by_setting.setdefault(name, []).append((float(value.split(" ")[0]), "chosen" in value, _score(cell)))
    # every grid value and the config's own value was tried
    assert {x for x, _, _ in by_setting["λ"]} == {0.0, 0.3, cfg.transform.lam}
    assert {x for x, _, _ in by_setting["depth"]} == {1, 2, cfg.transform.depth}
    chosen = {}
    for name, tried in by_setting.items():
        picks = [(x, score) for x, picked, score in tried if picked]
        assert len(picks) == 1 and picks[0][1] == max(score for _, _, score in tried)  # the validation argmax
        chosen[name] = picks[0][0]

    finals = {}  # label → (settings, validation, test); rows with equal settings share one row
    for r in rows:
        if r.startswith(("| config", "| tuned")):
            head, val, test = table_cells(r)
            labels, settings = head.split(": ")
            finals.update({label: (settings, val, test) for label in labels.split(" and ")})
    assert sorted(finals) == ["config", "tuned", "tuned with λ = 0"]
    width = "" if chosen["depth"] == 1 else ", hidden width 64"  # a linear T has no hidden width
    assert finals["tuned"][0] == f"λ {chosen['λ']:g}, depth {chosen['depth']:g}{width}, epochs 10"
    assert finals["tuned with λ = 0"][0] == f"λ 0, depth {chosen['depth']:g}{width}, epochs 10"
    ens = metrics[f"asym_ensemble/{len(cfg.gallery_models)}"]
    assert finals["config"][2] == " / ".join(f"{100 * ens[x]:.2f}" for x in ("R@1", "MAP@R", "TAR@FAR=0.001"))
    assert _score(finals["tuned"][1]) >= _score(finals["config"][1])
    # test is touched only for the final settings: one refit per distinct one other than the config's
    refits = {p.name for p in (root / "tuned").iterdir()} if (root / "tuned").exists() else set()
    assert len(refits) == len({settings for settings, _, _ in finals.values()}) - 1
