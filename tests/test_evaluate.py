import dataclasses
import logging

import numpy as np
import pytest

from cmce.config import EvaluateConfig
from cmce.evaluate import (
    EvalInputs,
    configuration_metrics,
    cosine_scores,
    evaluate,
    index_checks,
    load_evaluation,
    rejection_curves,
)
from cmce.index import build_index, load_index
from cmce.tables import TableError


def dense(queries, gallery, self_cols, domains=None) -> np.ndarray:
    """The whole cosine score matrix, for these small cases."""
    return cosine_scores(queries, gallery, self_cols, domains).rows(np.arange(len(queries))).numpy()


def test_collected_inputs_in_any_order_give_the_same_metrics(smoke_run, tmp_path):
    lay, metrics = smoke_run
    names = lay.gallery_names[::-1]
    inputs = EvalInputs(lay.dataset, lay.model("query"), lay.gallery,
                        [lay.transformation(n) for n in names], [lay.kd_student(n) for n in names], lay.index)
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


def test_a_recall_k_that_cannot_miss_under_cross_vendor_is_refused(tmp_path):
    """Under cross_vendor a query is ranked among the other vendors' items only, but the vacuous-K check left out
    only its own image: with two vendors any K of at least half the gallery gave R@K = 1.0, accepted."""
    import collections

    from cmce.config import DataConfig
    from cmce.data.prepare import prepare_dataset
    from cmce.data.readers import read_domains
    from cmce.evaluate import check_recall_k, smallest_own_domain

    from .test_importers_emoji import fake_emoji_root

    root = fake_emoji_root(tmp_path / "raw")
    cross = prepare_dataset(DataConfig(source="emoji", protocol="cross_vendor"), tmp_path / "c.parquet", 0, root)
    disjoint = prepare_dataset(DataConfig(source="emoji", protocol="disjoint"), tmp_path / "d.parquet", 0, root)
    test = read_domains(cross, "test")
    per_vendor = collections.Counter(test.values())
    assert len(per_vendor) == 2 and smallest_own_domain(cross, "test") == min(per_vendor.values())
    assert smallest_own_domain(disjoint, "test") == 0
    answered_from = len(test) - min(per_vendor.values())  # the other vendor's items, for the smaller's queries
    with pytest.raises(ValueError, match=rf"R@{answered_from} is 1 for every query with a match .* less at least the "
                                         rf"{min(per_vendor.values())} items of a query's own domain"):
        check_recall_k([1, answered_from], len(test), "g", own_image_left_out=True,
                       own_domain_items=smallest_own_domain(cross, "test"))
    check_recall_k([1, answered_from - 1], len(test), "g", own_image_left_out=True,
                   own_domain_items=smallest_own_domain(cross, "test"))


def test_self_columns_point_each_query_at_its_own_gallery_row_or_minus_one():
    from cmce.evaluate import self_columns

    assert self_columns(["a", "x", "c"], ["c", "a", "b"]).tolist() == [1, -1, 0]


def test_index_settings_show_in_the_index_checks(smoke_run, tmp_path):
    """The built index is searched as served: with nothing rejected a flat index returns exact search's
    neighbours and the ensemble's R@1; rejecting 30 % of the gallery shows in the share indexed and the
    neighbour recall."""
    lay, metrics = smoke_run
    names = lay.gallery_names
    data = load_evaluation(EvalInputs(lay.dataset, lay.model("query"), lay.gallery,
                                      [lay.transformation(n) for n in names]))
    checks = {}
    for fraction in (0.0, 0.3):
        data.index = load_index(build_index(lay.gallery, tmp_path / f"index{fraction}", fraction, "flat"))
        checks[fraction] = index_checks(data)
    whole, rejected = checks[0.0], checks[0.3]
    assert whole["indexed"] == 1.0 and whole["neighbour_recall@10"] == pytest.approx(1.0)
    assert whole["R@1"] == pytest.approx(metrics[f"asym_ensemble/{len(names)}"]["R@1"])
    assert rejected["indexed"] == pytest.approx(0.7, abs=1 / len(data.gallery_ids))
    assert rejected["neighbour_recall@10"] < 0.9
    assert metrics["index"]["indexed"] == pytest.approx(0.9, abs=1 / len(data.gallery_ids))  # smoke: 0.1 rejected


def test_the_index_checks_leave_lone_queries_out_as_every_configuration_does(smoke_run, tmp_path, caplog):
    """A query alone in its class in the index was counted as a miss: one test image a class gave the index an
    R@1 of 0.00 beside configurations that were all undefined."""
    lay, _ = smoke_run
    names = lay.gallery_names
    data = load_evaluation(EvalInputs(lay.dataset, lay.model("query"), lay.gallery,
                                      [lay.transformation(n) for n in names]))
    data.index = load_index(build_index(lay.gallery, tmp_path / "index", 0.0, "flat"))
    before = index_checks(data)["R@1"]
    row = {i: r for r, i in enumerate(data.index.ids)}
    alone = [q for q in data.query_ids[::2] if q in row]  # each given a class of its own
    for n, q in enumerate(alone):
        data.index.labels[row[q]] = 10_000 + n
    lone = set(alone)
    data.query_labels = np.array([10_000 + alone.index(q) if q in lone else y
                                  for q, y in zip(data.query_ids, data.query_labels.tolist(), strict=True)])
    others = index_checks(data)["R@1"]
    kept = [i for i, q in enumerate(data.query_ids) if q not in lone]  # the same index, searched by the others alone
    alone_out = dataclasses.replace(data, queries=data.queries[kept], query_labels=data.query_labels[kept],
                                    query_ids=[data.query_ids[i] for i in kept])
    assert others == pytest.approx(index_checks(alone_out)["R@1"]) and len(kept) < len(data.query_ids)
    data.index.labels[:] = np.arange(len(data.index.ids)) + 10_000  # every item alone in its class
    data.query_labels = np.array([10_000 + row[q] for q in data.query_ids])
    assert np.isnan(index_checks(data)["R@1"]) and not np.isnan(before)
    # and every configuration undefined is said, once (a table of dashes, exit 0, said nothing)
    gallery_row = {i: r for r, i in enumerate(data.gallery_ids)}
    data.gallery_labels = np.arange(len(data.gallery_ids)) + 10_000
    data.query_labels = np.array([10_000 + gallery_row[q] for q in data.query_ids])
    data.index = None
    with caplog.at_level(logging.WARNING, logger="cmce.evaluate"):
        metrics = configuration_metrics(data, EvaluateConfig())
    assert all(np.isnan(m["R@1"]) for name, m in metrics.items() if "R@1" in m)
    said = [r.getMessage() for r in caplog.records if "every query is lone" in r.getMessage()]
    assert len(said) == 1 and "each class needs at least 2 test images" in said[0], said


def test_an_index_of_another_gallery_is_refused(smoke_run, tmp_path):
    lay, _ = smoke_run
    other = tmp_path / "other.parquet"
    import pyarrow.parquet as pq

    table = pq.read_table(lay.gallery)
    pq.write_table(table, other, row_group_size=7)  # the same rows, another file (another sha256)
    build_index(other, tmp_path / "index", 0.0, "flat")
    inputs = EvalInputs(lay.dataset, lay.model("query"), lay.gallery,
                        [lay.transformation(n) for n in lay.gallery_names], [], tmp_path / "index")
    with pytest.raises(TableError, match="built from another gallery"):
        evaluate(inputs, EvaluateConfig(), tmp_path / "eval")


def _metrics(n_members: int = 2) -> dict:
    """A metrics dict shaped as evaluate writes it; asym/a equals asym_ensemble/1 (the ensemble of a alone)."""
    def row(r1: float) -> dict:
        return {"R@1": r1, "R@2": r1 + 0.02, "R@4": r1 + 0.03, "R@8": r1 + 0.04, "MAP@R": r1 - 0.3,
                "TAR@FAR=0.001": float("nan")}

    names = "abcdefgh"[:n_members]
    out = {"sym_query": row(0.6), **{f"sym_gallery/{m}": row(0.8) for m in names},
           **{f"asym/{m}": row(0.7) for m in names},
           **{f"asym_ensemble/{n}": row(0.7 + 0.01 * (n - 1)) for n in range(1, n_members + 1)},
           "index": {"indexed": 0.9, "neighbour_recall@10": 0.88, "R@1": 0.72}}
    rates = ("0", "0.1", "0.3")
    out["rejection/uncertainty"] = {f"{p}_error@{r}": 0.2 - 0.001 * i for i, r in enumerate(rates)
                                    for p in ("retrieval", "verification")}
    out["rejection/random"] = {f"{p}_error@{r}": 0.2 for r in rates for p in ("retrieval", "verification")}
    return out


def test_summary_is_flat_small_and_finite():
    from cmce.report import summary

    s = summary(_metrics(3))
    assert all(isinstance(v, float) and np.isfinite(v) for v in s.values())
    assert len(s) <= 20 and "ensemble/TAR@FAR=0.001" not in s  # not finite: left out, never NaN in JSON
    assert s["ensemble/R@1"] == pytest.approx(0.72) and s["ensemble/MAP@R"] == pytest.approx(0.42)
    assert s["index/neighbour_recall@10"] == 0.88 and s["asym/c/R@1"] == 0.7
    assert s["rejection/retrieval_error@0.3/uncertainty"] == pytest.approx(0.198)


def test_plot_data_files_hold_what_the_plots_draw(tmp_path):
    import csv

    from cmce.report import write_reports

    metrics = _metrics(2)
    write_reports(metrics, {}, tmp_path, rejection_far=1e-3)
    recall = list(csv.DictReader((tmp_path / "recall.csv").open()))
    assert [int(r["K"]) for r in recall] == [1, 2, 4, 8]
    assert set(recall[0]) == {"K", "served", "sym_query", "sym_gallery/a", "sym_gallery/b", "asym/a", "asym/b",
                              "asym_ensemble/1", "asym_ensemble/2"}
    assert [float(r["served"]) for r in recall] == [float(r["asym_ensemble/2"]) for r in recall] == \
        pytest.approx([71, 73, 74, 75])
    rejection = list(csv.DictReader((tmp_path / "rejection.csv").open()))
    assert [float(r["rejected"]) for r in rejection] == [0, 10, 30]
    assert float(rejection[2]["retrieval_uncertainty"]) == pytest.approx(19.8)
    assert float(rejection[2]["verification_random"]) == pytest.approx(20.0)
    for name in ("recall.png", "rejection.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_one_member_writes_rejection_files_that_say_there_is_none_and_replace_earlier_curves(tmp_path):
    """With one gallery member no rejection is measured: rejection.csv and .png were not written, so DVC (which
    declares them) failed the stage, and an earlier run's curves were left beside the new numbers."""
    import csv

    from cmce.report import write_reports

    write_reports(_metrics(2), {}, tmp_path, rejection_far=1e-3)
    before = (tmp_path / "rejection.png").read_bytes()
    one = {k: v for k, v in _metrics(1).items() if not k.startswith("rejection/")}  # as evaluate reports one member
    write_reports(one, {}, tmp_path, rejection_far=1e-3)
    with (tmp_path / "rejection.csv").open() as f:
        reader = csv.DictReader(f)
        assert list(reader) == [] and reader.fieldnames[:3] == ["rejected", "retrieval_uncertainty", "retrieval_random"]
    assert (tmp_path / "rejection.png").read_bytes() != before


def test_recall_plot_shows_every_configuration_with_plain_ticks():
    import matplotlib.pyplot as plt

    from cmce.report import recall_figure

    fig = recall_figure(_metrics(5))
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 1 + 5 + 5 + 5
    styles = {(line.get_marker(), line.get_linestyle(), line.get_color()) for line in lines}
    assert len(styles) == len(lines)  # asym/a is not drawn exactly like asym_ensemble/1, over which it lies
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)] == []  # no "3×10⁰"
    legend = ax.get_legend()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # beside the axes, covering no line
    plt.close(fig)


def test_rejection_plot_names_its_far_and_does_not_magnify_noise():
    import matplotlib.pyplot as plt

    from cmce.report import MIN_SPAN, rejection_figure

    fig = rejection_figure(_metrics(2), far=1e-3)
    retrieval, verification = fig.axes
    assert "FAR = 0.001" in verification.get_title()
    for ax in fig.axes:  # the curves differ by 0.2 points: drawn within a span of at least MIN_SPAN points
        lo, hi = ax.get_ylim()
        assert hi - lo >= MIN_SPAN and 0 <= lo and hi <= 100
    plt.close(fig)
