import numpy as np
import pytest

from cmce.config import EvaluateConfig
from cmce.evaluate import EvalInputs, cosine_scores, evaluate, rejection_curves


def dense(queries, gallery, self_cols, domains=None) -> np.ndarray:
    """The whole cosine score matrix, for these small cases."""
    return cosine_scores(queries, gallery, self_cols, domains).rows(np.arange(len(queries))).numpy()


def test_collected_inputs_in_any_order_give_the_same_metrics(smoke_run, tmp_path):
    lay, metrics = smoke_run
    names = lay.gallery_names[::-1]
    inputs = EvalInputs(lay.dataset, lay.model("query"), lay.gallery,
                        [lay.transformation(n) for n in names], [lay.kd_student(n) for n in names])
    cfg = EvaluateConfig(rejection_rates=[0.0, 0.1, 0.3], random_repeats=2)
    again = evaluate(inputs, cfg, tmp_path)
    assert list(again) == list(metrics)
    for key in metrics:
        assert again[key] == pytest.approx(metrics[key], nan_ok=True)


def test_missing_transformation_is_refused(smoke_run, tmp_path):
    lay, _ = smoke_run
    inputs = EvalInputs(lay.dataset, lay.model("query"), lay.gallery, [lay.transformation("resnet_a")])
    with pytest.raises(ValueError, match=r"missing for \['vgg_b'\]"):
        evaluate(inputs, EvaluateConfig(), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_cosine_scores_exclude_self_pairs():
    x = np.eye(3, dtype=np.float32)
    s = dense(x, x, np.array([0, -1, 2]))
    assert np.isneginf(s[0, 0]) and s[1, 1] == 1.0 and np.isneginf(s[2, 2])


def test_uncertainty_rejection_beats_random_when_uncertainty_marks_the_errors():
    # 2 classes; the gallery items flagged uncertain are exactly the ones that look like the other class
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    centres = np.array([[1.0, 0.0], [0.0, 1.0]])
    confused = rng.choice(200, 20, replace=False)
    shown = labels.copy()
    shown[confused] = 1 - labels[confused]  # these items embed like the other class
    emb = centres[shown] + 0.05 * rng.normal(size=(200, 2))
    scores = cosine_scores(emb, emb, np.arange(200))
    uncertainty = np.zeros(200)
    uncertainty[confused] = 1.0
    cfg = EvaluateConfig(rejection_rates=[0.0, 0.1], random_repeats=3)
    out = rejection_curves(scores, labels, labels, uncertainty, cfg, seed=0)
    unc, rnd = out["rejection/uncertainty"], out["rejection/random"]
    assert unc["retrieval_error@0"] == rnd["retrieval_error@0"]
    # confused queries still fail (queries are never rejected); the others no longer hit confused items
    assert unc["retrieval_error@0.1"] < rnd["retrieval_error@0.1"] - 0.04
    assert unc["verification_error@0.1"] < rnd["verification_error@0.1"]


def test_results_table_follows_the_configured_metrics():
    from cmce.report import markdown_table

    table = markdown_table({"a": {"R@1": 0.5, "R@5": 0.75, "MAP@R": 0.25, "lone_queries": 0.0}})
    assert table.splitlines()[0] == "| configuration | R@1 | R@5 | MAP@R |"
    assert "| a | 50.00 | 75.00 | 25.00 |" in table


def test_cross_vendor_scores_count_only_the_other_vendors_drawing():
    from cmce.metrics import retrieval_metrics

    # 4 classes x 2 vendors; the vendor's style dominates, so a query's nearest other image is its own
    # vendor's drawing of another class, and the same class by the other vendor comes second
    classes = np.tile(np.arange(4), 2)
    vendor = np.repeat([0, 1], 4)
    emb = np.hstack([np.eye(4)[classes], 3.0 * np.eye(2)[vendor]])  # cosine 0.9 within a vendor, 0.1 across
    plain = retrieval_metrics(cosine_scores(emb, emb, np.arange(8)), classes, classes, [1], [])
    cross_scores = dense(emb, emb, np.arange(8), (vendor, vendor))
    cross = retrieval_metrics(cross_scores, classes, classes, [1], [])
    assert np.isneginf(cross_scores[vendor[:, None] == vendor[None, :]]).all()
    assert np.isfinite(cross_scores[vendor[:, None] != vendor[None, :]]).all()
    assert plain["R@1"] == 0.0 and cross["R@1"] == 1.0 and cross["MAP@R"] == 1.0


def test_cross_domains_only_under_the_cross_vendor_protocol(tmp_path):
    from cmce.config import DataConfig
    from cmce.data.prepare import prepare_dataset
    from cmce.evaluate import cross_domains
    from cmce.tables import TableError

    from .test_importers_emoji import fake_emoji_root

    root = fake_emoji_root(tmp_path / "raw")
    ids = ["google/1f436", "twitter/1f436", "twitter/1f44d-1f3fb"]
    disjoint = prepare_dataset(DataConfig(source="emoji", protocol="disjoint"), tmp_path / "d.parquet", 0, root)
    assert cross_domains(disjoint, ids, ids) is None
    cross = prepare_dataset(DataConfig(source="emoji", protocol="cross_vendor"), tmp_path / "c.parquet", 0, root)
    q, g = cross_domains(cross, ids, ids[::-1])
    assert q.tolist() == [0, 1, 1] and g.tolist() == [1, 1, 0]
    with pytest.raises(TableError, match=r"c.parquet: no domain for 1 gallery ids, e.g. 'google/nope'"):
        cross_domains(cross, ids, ["google/nope"])


def test_self_columns_point_each_query_at_its_own_gallery_row_or_minus_one():
    from cmce.evaluate import self_columns

    assert self_columns(["a", "x", "c"], ["c", "a", "b"]).tolist() == [1, -1, 0]
