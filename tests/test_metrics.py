import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmce.metrics import exact_neighbours, far_threshold, linear_cka, neighbour_labels, retrieval_metrics
from cmce.scores import ScoreMatrix
from tests.dense_oracle import map_at_r, recall_at_k, tar_at_far  # the definitions, on explicit inputs


def knn(scores: np.ndarray, k: int) -> np.ndarray:
    return exact_neighbours(ScoreMatrix(scores), np.arange(len(scores)), k, step=2)

# 3 queries x 4 gallery items, worked out by hand in the comments
SCORES = np.array(
    [
        [0.9, 0.1, 0.8, 0.3],  # q0 (label 0): order g0 g2 g3 g1 → labels 0 1 1 0; R=2 → AP = (1/1)/2 = 0.5
        [0.2, 0.7, 0.6, 0.5],  # q1 (label 1): order g1 g2 g3 g0 → labels 0 1 1 0; R=2 → AP = (1/2)/2 = 0.25
        [0.5, 0.5, 0.4, 0.6],  # q2 (label 0): order g3 g0 g1 g2 (g0/g1 tie: lower column first) → AP = 0.25
    ]
)
QL = np.array([0, 1, 0])
GL = np.array([0, 0, 1, 1])


def test_hand_computed_recall_and_map():
    m = retrieval_metrics(SCORES, QL, GL, ks=[1, 2], fars=[])
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(1.0)
    assert m["MAP@R"] == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    assert m["lone_queries"] == 0


def test_ties_are_broken_by_gallery_column():
    scores = np.array([[0.5, 0.5]])
    assert knn(scores, 2).tolist() == [[0, 1]]
    # the same tie counts as a hit only when the lower column carries the query's label
    assert retrieval_metrics(scores, np.array([0]), np.array([1, 0]), ks=[1], fars=[])["R@1"] == 0.0
    assert retrieval_metrics(scores, np.array([0]), np.array([0, 1]), ks=[1], fars=[])["R@1"] == 1.0


def test_self_match_excluded_and_single_item_class_is_lone():
    # leave-one-out on labels [0, 0, 1]: the single class-1 item has nothing to retrieve
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    scores = emb @ emb.T
    np.fill_diagonal(scores, -np.inf)
    m = retrieval_metrics(scores, np.array([0, 0, 1]), np.array([0, 0, 1]), ks=[1], fars=[])
    assert m["lone_queries"] == 1
    assert m["R@1"] == 1.0 and m["MAP@R"] == 1.0


def test_tar_at_far_hand_computed():
    genuine = np.array([0.9, 0.8, 0.3])
    impostor = np.array([0.85, 0.5, 0.4, 0.2])
    assert far_threshold(impostor, 0.25) == 0.5  # m = 1: the 2nd largest impostor score
    assert tar_at_far(genuine, impostor, 0.25) == pytest.approx(2 / 3)
    assert tar_at_far(genuine, impostor, 0.1) == pytest.approx(1 / 3)  # m = 0: above the best impostor
    assert tar_at_far(genuine, impostor, 0.5) == pytest.approx(2 / 3)
    assert tar_at_far(genuine, impostor, 1.0) == 1.0


def test_the_impostors_a_far_allows_are_counted_exactly():
    """m = floor(FAR · n) in floats: floor(3e-4 · 10000) = floor(2.9999999999999996) = 2, one impostor fewer
    than the definition allows (618 counts below 200,000 impostors at FAR 0.29)."""
    assert far_threshold(np.arange(10000, dtype=np.float32), 3e-4) == 9996  # 9997, 9998, 9999 above: m = 3
    from cmce.metrics import impostors_allowed

    assert [impostors_allowed(0.29, n) for n in (100, 200, 300)] == [29, 58, 87]
    assert impostors_allowed(1e-3, 999) == 0 and impostors_allowed(1.0, 7) == 7
    # FARs from a numpy array (a library caller's np.logspace): numpy 2 writes a scalar's repr as `np.float64(0.0003)`,
    # which Fraction refused (ValueError)
    assert [impostors_allowed(far, 10000) for far in np.array([3e-4, 0.29])] == [3, 2900]
    assert impostors_allowed(np.float32(0.5), 10) == 5


def test_tar_ignores_excluded_pairs():
    scores = np.array([[-np.inf, 0.9, 0.1], [0.9, -np.inf, 0.2]])
    m = retrieval_metrics(scores, np.array([0, 0]), np.array([0, 0, 1]), ks=[1], fars=[0.5])
    # genuine pairs: 0.9, 0.9; impostors: 0.1, 0.2 → threshold 0.2 → TAR 1
    assert m["TAR@FAR=0.5"] == 1.0


def test_map_needs_enough_neighbours():
    with pytest.raises(ValueError, match="needs 3 neighbours"):
        map_at_r(np.zeros((1, 2), int), np.array([0]), np.array([3]))


def test_recall_counts_padding_as_miss():
    knn = np.array([[-1, -1]])
    assert recall_at_k(neighbour_labels(knn, np.array([0])), np.array([0]), 2) == 0.0


def tied_rows(min_gallery: int, max_gallery: int, *, k_below_gallery: bool):
    """(rows, k): up to 6 queries' scores over one gallery, few distinct values (many ties, straddling the cut), and
    a K up to the gallery's size (or one below it, where an item must be left out at the cut)."""
    def rows_and_k(q: int, g: int):
        rows = st.lists(st.lists(st.integers(0, 3), min_size=g, max_size=g), min_size=q, max_size=q)
        return st.tuples(rows, st.integers(1, g - 1 if k_below_gallery else g))
    return st.integers(1, 6).flatmap(
        lambda q: st.integers(min_gallery, max_gallery).flatmap(lambda g: rows_and_k(q, g)))


@settings(max_examples=60, deadline=None)
@given(tied_rows(1, 9, k_below_gallery=False))
def test_knn_equals_stable_full_sort(data):
    rows, k = data
    scores = np.array(rows, dtype=np.float32)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    assert knn(scores, k).tolist() == expected.tolist()


class NoisyChoice(ScoreMatrix):
    """Candidates chosen by scores off by up to `candidate_error` (as faiss's float32 ones are), returned with the
    true scores: an item that belongs at the cut may be left out of the candidates."""

    candidate_error = 0.3

    def candidates(self, queries, k):
        s = self.rows(queries)
        noise = torch.from_numpy(np.random.default_rng(len(queries)).uniform(-0.3, 0.3, tuple(s.shape)))
        idx = torch.topk(s + noise.float(), min(k, s.shape[1]), dim=1).indices
        return s.gather(1, idx), idx


@settings(max_examples=60, deadline=None)
@given(tied_rows(2, 12, k_below_gallery=True))
def test_knn_is_exact_when_the_candidates_were_chosen_by_inexact_scores(data):
    rows, k = data
    scores = np.array(rows, dtype=np.float32) * 0.25  # steps of 0.25: within the noise's reach
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    got = exact_neighbours(NoisyChoice(scores), np.arange(len(scores)), k, step=2)
    assert got.tolist() == expected.tolist()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=4, max_size=12), st.integers(0, 10_000))
def test_recall_is_monotone_in_k_and_bounds_map(labels, seed):
    labels = np.array(labels)
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(len(labels), len(labels)))
    np.fill_diagonal(scores, -np.inf)
    m = retrieval_metrics(scores, labels, labels, ks=[1, 2, 4, 8], fars=[])
    if m["lone_queries"] == len(labels):
        return
    r = [m[f"R@{k}"] for k in (1, 2, 4, 8)]
    assert r == sorted(r)
    assert 0.0 <= m["MAP@R"] <= 1.0


def test_linear_cka_matches_the_kernel_definition_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    y = x @ rng.normal(size=(6, 4)) + 0.5 * rng.normal(size=(300, 4))
    # reference: HSIC of the centred linear kernels, normalised (Kornblith et al. 2019, eq. 2-4)
    h = np.eye(300) - 1.0 / 300
    k, m = h @ x @ x.T @ h, h @ y @ y.T @ h
    expected = np.sum(k * m) / np.sqrt(np.sum(k * k) * np.sum(m * m))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-9)
    assert linear_cka(y, x) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    assert linear_cka(x, rng.normal(size=(300, 6))) < 0.1  # unrelated
    assert linear_cka(x, x * np.array([10, 1, 1, 1, 1, 1])) < 0.9  # not invariant to anisotropic scaling
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(x, y[:-1])


# pytorch-metric-learning, run in a child process: importing it patches faiss's Index.search process-wide
# (faiss.contrib.torch_utils), after which cmce's own searches with search parameters fail
ACCURACY_CALCULATOR = """
import json, sys
import faiss, numpy as np, torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN
a = np.load(sys.argv[1])
calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), avg_of_avgs=False,
                          k="max_bin_count", device=torch.device("cpu"),
                          knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP))
q, ql = torch.from_numpy(a["queries"]), torch.from_numpy(a["query_labels"])
got = (calc.get_accuracy(q, ql) if a["symmetric"] else
       calc.get_accuracy(q, ql, torch.from_numpy(a["gallery"]), torch.from_numpy(a["gallery_labels"]),
                         ref_includes_query=False))
print(json.dumps(got))
"""


@pytest.mark.parametrize("symmetric", [False, True])
def test_recall_and_map_at_r_equal_pytorch_metric_learnings_on_scores_without_ties(symmetric, tmp_path):
    """The definitions as the field's reference implements them: AccuracyCalculator's precision_at_1 and
    mean_average_precision_at_r (faiss inner-product search, k = the largest class), on random unit vectors (no
    exact ties), with lone queries, and with each query's own image left out when queries are the gallery."""
    import json
    import subprocess
    import sys

    pytest.importorskip("pytorch_metric_learning")
    from cmce.scores import InnerProducts

    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(300, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    gallery_labels = rng.integers(0, 30, 300)
    if symmetric:
        queries, query_labels, own = gallery, gallery_labels.copy(), np.arange(300)
        query_labels[:5] = gallery_labels[:5] = 100 + np.arange(5)  # singletons: lone once their own image is out
    else:
        queries = rng.normal(size=(120, 16)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        query_labels, own = rng.integers(0, 34, 120), None  # labels 30-33: lone
    ours = retrieval_metrics(InnerProducts(queries, gallery, own, None, torch.device("cpu"), 64.0), query_labels,
                             gallery_labels, [1], [0.1])
    np.savez(tmp_path / "case.npz", queries=queries, query_labels=query_labels, gallery=gallery,
             gallery_labels=gallery_labels, symmetric=symmetric)
    child = subprocess.run([sys.executable, "-c", ACCURACY_CALCULATOR, str(tmp_path / "case.npz")],
                           capture_output=True, text=True, check=True)
    pml = json.loads(child.stdout.splitlines()[-1])
    assert ours["lone_queries"] > 0 and 0 < ours["R@1"] < 1 and 0 < ours["MAP@R"] < 1
    assert ours["R@1"] == pytest.approx(pml["precision_at_1"], abs=1e-9)
    assert ours["MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-9)
