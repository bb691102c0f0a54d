"""The streaming metrics against the dense oracle (tests/dense_oracle.py: the implementation they
replaced): equal on random cases with ties, left-out pairs (own image, own domain), lone queries and
rejected gallery items, whatever the block size; and they never ask for more than a block of scores.

Embeddings are small integer vectors, so every score is exact and ties are everywhere: the oracle and
the blocked code see the very same numbers, and equality is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmce import metrics
from cmce.config import EvaluateConfig
from cmce.evaluate import kept_gallery_errors, measure_with_rejection, rejection_families
from cmce.metrics import Family, measure, retrieval_metrics
from cmce.scores import InnerProducts, ScoreMatrix, Scores, candidate_error, rows_per_block
from tests import dense_oracle as oracle

KS = [1, 2, 3, 5]
FARS = [0.0, 0.01, 0.1, 0.25, 0.5, 1.0]
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@st.composite
def cases(draw, max_q: int = 24, max_g: int = 30):
    """Integer embeddings with few values (ties), a few labels (lone queries), own-image columns, and
    sometimes domains (a cross-domain protocol)."""
    q, g, d = draw(st.integers(1, max_q)), draw(st.integers(1, max_g)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    labels = draw(st.integers(1, 4))
    queries = rng.integers(-2, 3, (q, d)).astype(np.float32)
    gallery = rng.integers(-2, 3, (g, d)).astype(np.float32)
    ql, gl = rng.integers(0, labels, q), rng.integers(0, labels, g)
    self_cols = np.where(rng.random(q) < 0.6, rng.integers(0, g, q), -1)
    domains = (rng.integers(0, 3, q), rng.integers(0, 3, g)) if draw(st.booleans()) else None
    return queries, gallery, ql, gl, self_cols, domains, rng


def sources(queries, gallery, self_cols, domains, block_mb):
    dense = oracle.score_matrix(queries, gallery, self_cols, domains)
    return dense, [InnerProducts(queries, gallery, self_cols, domains, block_mb=block_mb),
                   ScoreMatrix(dense, block_mb=block_mb)]


@SETTINGS
@given(cases(), st.sampled_from([64.0, 1e-4]))
def test_metrics_equal_the_dense_oracle(case, block_mb):
    queries, gallery, ql, gl, self_cols, domains, _ = case
    dense, srcs = sources(queries, gallery, self_cols, domains, block_mb)
    expected = oracle.retrieval_metrics(dense, ql, gl, KS, FARS)
    for src in srcs:
        got = retrieval_metrics(src, ql, gl, KS, FARS, block_mb=block_mb)
        assert got.keys() == expected.keys()
        for key in expected:
            assert same(got[key], expected[key]), (type(src).__name__, key, got[key], expected[key])


@SETTINGS
@given(cases(), st.sampled_from([64.0, 1e-4]), st.sampled_from([0.0, 0.1, 0.5]))
def test_rejected_galleries_equal_the_dense_oracle_on_the_kept_columns(case, block_mb, far):
    queries, gallery, ql, gl, self_cols, domains, rng = case
    dense, srcs = sources(queries, gallery, self_cols, domains, block_mb)
    order = rng.permutation(len(gl))
    keeps = []
    for rejected in sorted(rng.integers(0, len(gl), 3)):  # nested: the first n of one order rejected
        keep = np.ones(len(gl), bool)
        keep[order[:rejected]] = False
        keeps.append(keep)
    family = Family.of(keeps)
    for src in srcs:
        m = measure(src, ql, gl, [1], [], False, [family, Family.of([keeps[-1]])], far, block_mb)
        for i, keep in enumerate(keeps):
            expected = oracle.kept_gallery_errors(dense, ql, gl, keep, far)
            got = m.subsets[0][i]
            assert same(1.0 - got.r1, expected[0]) and same(1.0 - got.tar, expected[1]), (type(src).__name__, i)
            assert same(got.unanswerable, oracle.unanswerable_share(dense, ql, gl, keep)), (type(src).__name__, i)
        alone, within = m.subsets[1][0], m.subsets[0][-1]  # the same subset alone or within its family
        assert all(same(a, b) for a, b in zip(alone, within, strict=True))


def clustered(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, max(2, n // 15), n)
    centres = rng.integers(-3, 4, (labels.max() + 1, 6))
    x = (centres[labels] + rng.integers(-2, 3, (n, 6))).astype(np.float32)
    return x, labels


def test_the_tail_floor_from_a_sample_is_exact_and_a_wrong_floor_is_lowered(monkeypatch):
    x, labels = clustered(400)
    block_mb = 0.02  # 13 rows a block: a sample of 64 rows, so the tail starts at a finite floor
    src = InnerProducts(x, x, np.arange(400), block_mb=block_mb)
    dense = oracle.score_matrix(x, x, np.arange(400))
    fars = [1e-3, 1e-2]
    expected = oracle.retrieval_metrics(dense, labels, labels, [1], fars)
    floors = metrics._floors(src, labels, labels, max(fars), rows_per_block(400, block_mb))
    assert floors and all(math.isfinite(f) for f in floors)
    assert retrieval_metrics(src, labels, labels, [1], fars, block_mb=block_mb) == expected
    tried = []

    def too_high(*args):  # every floor above the thresholds: the counts must catch it and go lower
        tried.append("sampled")
        return [float(dense.max()), float(np.median(dense[np.isfinite(dense)]) + 1.0)]

    monkeypatch.setattr(metrics, "_floors", too_high)
    assert retrieval_metrics(src, labels, labels, [1], fars, block_mb=block_mb) == expected
    assert tried == ["sampled"]


def duplicated(n: int = 1003, d: int = 64, seed: int = 0):
    """Unit float embeddings where gallery items 0 and n-1 are one vector of different labels (7, then 8), and
    queries of label 7 near it: by the tie rule (column order) each query's first hit is item 0."""
    rng = np.random.default_rng(seed)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    gallery = unit(rng.standard_normal((n, d)))
    gallery[-1] = gallery[0]
    labels = rng.integers(0, 7, n)
    labels[0], labels[-1] = 7, 8
    queries = unit(gallery[0] + 0.05 * rng.standard_normal((64, d)))
    return queries, gallery, np.full(64, 7), labels


def test_a_pair_scores_the_same_whatever_is_scored_with_it():
    """A float32 matmul rounded one pair differently by the block's height and the column's place (MKL's
    kernels): duplicate gallery items were no ties, and metrics moved with evaluate.block_mb."""
    queries, gallery, _, _ = duplicated()
    src = InnerProducts(queries, gallery)
    whole = src.rows(np.arange(64)).numpy()
    assert (whole[:, 0] == whole[:, -1]).all()
    for height in (1, 3, 7, 33):
        for start in range(0, 64, height):
            rows = np.arange(start, min(start + height, 64))
            assert np.array_equal(src.rows(rows, reuse=True).numpy(), whole[rows])
    vals, idx = src.candidates(np.arange(64), 5)  # faiss's choice, scored as `rows` scores
    assert np.array_equal(vals.numpy(), np.take_along_axis(whole, idx.numpy(), 1))


class OneStepApart(InnerProducts):
    """A GPU's candidates: the float64 products of a matmul of another shape, summed in another order, so a score
    on a float32 rounding boundary comes back one float32 step from the one `rows` gives (here: each candidate's
    score one step down, the duplicate item's one step up)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.candidate_error = candidate_error(self.queries, self.gallery, torch.device("cuda"))

    def candidates(self, queries, k):
        vals, idx = Scores.candidates(self, queries, k)
        step = torch.where(idx == self.n_gallery - 1, math.inf, -math.inf)
        return torch.nextafter(vals, step), idx


def test_candidates_one_float32_step_off_give_the_exact_neighbours():
    """On a GPU the candidates' scores and the full rows come from matmuls of other shapes; with no slack for that
    (candidate_error 0 there) a tie at the cut went unnoticed and the duplicate item could take the first place."""
    queries, gallery, _, _ = duplicated()
    src = OneStepApart(queries, gallery)
    expected = np.argsort(-src.rows(np.arange(64)).numpy(), axis=1, kind="stable")[:, :1]
    assert (expected[:, 0] == 0).all()  # the tie rule: item 0 before its duplicate
    assert np.array_equal(metrics.exact_neighbours(src, np.arange(64), 1, step=8), expected)
    scores = src.rows(np.arange(64)).numpy()
    assert src.candidate_error >= np.spacing(np.abs(scores).max()) > 0  # one float32 step of the largest score
    assert candidate_error(queries, gallery, torch.device("cpu")) > 64 * 2.0 ** -24  # faiss's float32 error


@pytest.mark.parametrize("faiss_knn", [True, False])
def test_metrics_of_float_embeddings_with_duplicates_do_not_depend_on_the_block_size(faiss_knn, monkeypatch):
    queries, gallery, ql, gl = duplicated()
    if not faiss_knn:
        monkeypatch.setattr(InnerProducts, "candidates", Scores.candidates)
    results = [retrieval_metrics(InnerProducts(queries, gallery, block_mb=mb), ql, gl, [1, 2], [1e-3, 1e-2],
                                 block_mb=mb) for mb in (64.0, 0.02, 0.005, 1e-4)]
    assert results[0]["R@1"] == 1.0 and all(r == results[0] for r in results), results


class Spy(InnerProducts):
    """Records the largest number of query rows scored at once."""

    widest = 0

    def rows(self, queries, reuse=False):
        Spy.widest = max(Spy.widest, len(queries))
        return super().rows(queries, reuse)


@pytest.mark.parametrize("faiss_knn", [True, False])
def test_no_more_than_one_block_of_scores_is_ever_computed(faiss_knn, monkeypatch):
    x, labels = clustered(600, seed=1)
    block_mb = 0.05
    step = rows_per_block(600, block_mb)
    src = Spy(x, x, np.arange(600), block_mb=block_mb)
    if not faiss_knn:  # the top-k path (a GPU's) scores its candidate rows itself
        monkeypatch.setattr(Spy, "candidates", Scores.candidates)
        src.knn_rows = step
    Spy.widest = 0
    rates, families = rejection_families(np.random.default_rng(0).random(600), EvaluateConfig(), 0)
    measure(src, labels, labels, [1, 2, 4, 8], [1e-3, 1e-2], True, families, 1e-3, block_mb)
    assert 0 < Spy.widest <= step < 600


def test_evaluations_rejection_curves_equal_the_dense_oracle_per_kept_gallery():
    x, labels = clustered(300, seed=2)
    src = InnerProducts(x, x, np.arange(300))
    dense = oracle.score_matrix(x, x, np.arange(300))
    uncertainty = np.random.default_rng(3).random(300)
    cfg = EvaluateConfig(rejection_rates=[0.3, 0.0, 0.1], random_repeats=3)
    values, curves = measure_with_rejection(src, labels, labels, uncertainty, cfg, seed=7)
    assert values == oracle.retrieval_metrics(dense, labels, labels, cfg.recall_k, cfg.far)
    rates, families = rejection_families(uncertainty, cfg, seed=7)
    assert rates == [0.0, 0.1, 0.3]
    for rate in cfg.rejection_rates:
        i = rates.index(rate)
        unc = oracle.kept_gallery_errors(dense, labels, labels, families[0].keep(i), cfg.rejection_far)
        assert (curves["rejection/uncertainty"][f"retrieval_error@{rate:g}"],
                curves["rejection/uncertainty"][f"verification_error@{rate:g}"]) == unc
        randoms = [oracle.kept_gallery_errors(dense, labels, labels, f.keep(i), cfg.rejection_far)
                   for f in families[1:]]
        assert curves["rejection/random"][f"retrieval_error@{rate:g}"] == pytest.approx(
            np.mean([r[0] for r in randoms]), abs=1e-15)
        assert curves["rejection/uncertainty"][f"unanswerable@{rate:g}"] == oracle.unanswerable_share(
            dense, labels, labels, families[0].keep(i))
        assert curves["rejection/random"][f"unanswerable@{rate:g}"] == pytest.approx(np.mean(
            [oracle.unanswerable_share(dense, labels, labels, f.keep(i)) for f in families[1:]]), abs=1e-15)
        # a random repeat rejects as many items as uncertainty does at each rate, nested across rates
        assert all((~f.keep(i)).sum() == (~families[0].keep(i)).sum() for f in families[1:])
    assert list(curves["rejection/uncertainty"]) == [f"{k}@{r:g}" for r in cfg.rejection_rates
                                                      for k in ("retrieval_error", "verification_error",
                                                                "unanswerable")]
    assert kept_gallery_errors(src, labels, labels, families[0].keep(1), 1e-3) == oracle.kept_gallery_errors(
        dense, labels, labels, families[0].keep(1), 1e-3)


def test_subsets_of_one_family_must_nest():
    with pytest.raises(ValueError, match="must nest"):
        Family.of([np.array([True, False]), np.array([False, True])])


def test_no_rejection_rates_give_empty_curves_and_non_finite_embeddings_are_refused():
    x, labels = clustered(60, seed=4)
    values, curves = measure_with_rejection(InnerProducts(x, x, np.arange(60)), labels, labels, np.zeros(60),
                                            EvaluateConfig(rejection_rates=[]), seed=0)
    assert curves == {"rejection/uncertainty": {}, "rejection/random": {}} and values["lone_queries"] >= 0
    x[3, 0] = np.nan
    with pytest.raises(ValueError, match="query embeddings contain NaN or inf"):
        InnerProducts(x, np.ones((4, x.shape[1]), np.float32))
