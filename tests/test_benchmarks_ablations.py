import shutil

from cmce.config import load_config
from cmce.layout import RunLayout
from tests.conftest import SMOKE, table_cells


def test_query_model_as_an_identity_member_reproduces_sym_query_alone(smoke_run, tmp_path):
    from benchmarks.ablations import _ensemble_of, query_member_ablation

    lay, metrics = smoke_run
    root = tmp_path / "run"
    for part in ("data", "models", "embeddings"):
        shutil.copytree(lay.root / part, root / part)
    own = RunLayout(root, lay.gallery_names)
    cfg = load_config(SMOKE, {"output_dir": str(root)})
    result = next(iter(query_member_ablation(cfg, own).values()))
    n = len(cfg.gallery_models)
    assert set(result) == {f"asym_ensemble/{n + 1}"}  # the config's members and the query model's
    member = root / "query_member" / "member_query.parquet"
    (tmp_path / "alone").mkdir()
    alone = _ensemble_of(cfg, own, own.model(cfg.query_model.name), [member], tmp_path / "alone")["asym_ensemble/1"]
    # with the identity transformation the query member alone is query→query retrieval
    for metric in ("R@1", "MAP@R", "TAR@FAR=0.001"):
        assert abs(alone[metric] - metrics["sym_query"][metric]) < 1e-6, metric


def test_levers_table_names_the_best_single_transformation_by_r1(smoke_run):
    from benchmarks.ablations import levers_table
    from benchmarks.report import shown

    _, metrics = smoke_run
    (row,) = levers_table({"(the config)": metrics}, 2)[2:]
    best = max((k for k in metrics if k.startswith("asym/")), key=lambda k: metrics[k]["R@1"])
    assert table_cells(row) == ["(the config)", shown(metrics["asym_ensemble/2"]), shown(metrics[best]),
                           shown(metrics["sym_query"])]
