"""The dense reference: how the metrics were computed before they were blocked (cmce 2026-12, main at
fe63477), kept verbatim as the oracle the streaming implementation is tested against. It builds the whole
query × gallery matrix, so it is for small test cases only. One change: `score_matrix` takes the rows as
given (inner products), where evaluate normalised them first, so tests can use exact integer vectors."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

_BLOCK = 1024
Domains = tuple[np.ndarray, np.ndarray]


def knn_from_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k best allowed gallery items per row (order above); -1 pads rows with
    fewer than k allowed items."""
    q, g = scores.shape
    k = min(k, g)
    out = np.full((q, k), -1, dtype=np.int64)
    if k == 0:
        return out
    for start in range(0, q, _BLOCK):
        block = scores[start : start + _BLOCK]
        part = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < g else np.tile(np.arange(g), (len(block), 1))
        vals = np.take_along_axis(block, part, 1)
        kth = vals.min(axis=1)
        # rows where ties straddle the k-th place: argpartition picked arbitrary members of the tie
        crowded = (block >= kth[:, None]).sum(1) > k
        order = np.lexsort((part, -vals), axis=1)
        idx = np.take_along_axis(part, order, 1)
        for r in np.flatnonzero(crowded):
            idx[r] = np.argsort(-block[r], kind="stable")[:k]
        finite = np.isfinite(np.take_along_axis(block, idx, 1))
        out[start : start + len(block)] = np.where(finite, idx, -1)
    return out


def neighbour_labels(knn: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """Labels of the neighbours; padding (-1) becomes a label that matches nothing."""
    labels = np.asarray(gallery_labels)[np.clip(knn, 0, None)]
    return np.where(knn >= 0, labels, np.iinfo(np.int64).min)


def recall_at_k(knn_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Recall@K over the given (non-lone) queries; see the module docstring."""
    if len(query_labels) == 0:
        return float("nan")
    hits = (knn_labels[:, :k] == np.asarray(query_labels)[:, None]).any(axis=1)
    return float(hits.mean())


def map_at_r(knn_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray) -> float:
    """MAP@R over the given queries; `r` is each query's count of same-label gallery items (≥ 1)."""
    if len(query_labels) == 0:
        return float("nan")
    r = np.asarray(r)
    width = int(r.max())
    if knn_labels.shape[1] < width:
        raise ValueError(f"MAP@R needs {width} neighbours per query, got {knn_labels.shape[1]}")
    rel = knn_labels[:, :width] == np.asarray(query_labels)[:, None]
    ranks = np.arange(1, width + 1)
    within_r = ranks[None, :] <= r[:, None]
    rel &= within_r
    precision = np.cumsum(rel, axis=1) / ranks[None, :]
    ap = (precision * rel).sum(axis=1) / r
    return float(ap.mean())


def far_threshold(impostor: np.ndarray, far: float) -> float:
    """Score threshold t with at most floor(far · n) impostor scores strictly above it."""
    n = len(impostor)
    if n == 0:
        return float("-inf")
    m = math.floor(Fraction(repr(float(far))) * n)  # exact for the FAR as written (3e-4 · 10000 is 3)
    if m >= n:
        return float("-inf")
    # the (m+1)-th largest value
    return float(np.partition(impostor, n - 1 - m)[n - 1 - m])


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float:
    """True-accept rate at the given false-accept rate; see the module docstring."""
    if len(genuine) == 0:
        return float("nan")
    return float((np.asarray(genuine) > far_threshold(np.asarray(impostor), far)).mean())


def relevant_counts(scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """R per query: allowed gallery items sharing the query's label."""
    same = np.asarray(query_labels)[:, None] == np.asarray(gallery_labels)[None, :]
    return (same & np.isfinite(scores)).sum(axis=1)


def pair_scores(
    scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of all allowed genuine and impostor pairs."""
    gen, imp = [], []
    gl = np.asarray(gallery_labels)
    for start in range(0, len(scores), _BLOCK):
        block = scores[start : start + _BLOCK]
        same = np.asarray(query_labels[start : start + _BLOCK])[:, None] == gl[None, :]
        ok = np.isfinite(block)
        gen.append(block[same & ok])
        imp.append(block[~same & ok])
    return np.concatenate(gen), np.concatenate(imp)


def retrieval_metrics(
    scores: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: list[int] = (1, 2, 4, 8),  # type: ignore[assignment]
    fars: list[float] = (1e-2, 1e-3, 1e-4),  # type: ignore[assignment]
    with_map: bool = True,
) -> dict[str, float]:
    """All metrics of one configuration from its score matrix: R@K, MAP@R, TAR@FAR, lone count."""
    query_labels = np.asarray(query_labels)
    r = relevant_counts(scores, query_labels, gallery_labels)
    keep = r > 0
    depth = max(max(ks), int(r.max()) if with_map and keep.any() else 0)
    knn = knn_from_scores(scores[keep], depth)
    labels = neighbour_labels(knn, gallery_labels)
    out: dict[str, float] = {f"R@{k}": recall_at_k(labels, query_labels[keep], k) for k in ks}
    if with_map:
        out["MAP@R"] = map_at_r(labels, query_labels[keep], r[keep]) if keep.any() else float("nan")
    if fars:
        gen, imp = pair_scores(scores, query_labels, gallery_labels)
        for far in fars:
            out[f"TAR@FAR={far:g}"] = tar_at_far(gen, imp, far)
    out["lone_queries"] = float((~keep).sum())
    return out


def score_matrix(queries: np.ndarray, gallery: np.ndarray, self_cols: np.ndarray,
                 domains: Domains | None = None) -> np.ndarray:
    """Inner-product scores; the pair (query i, gallery self_cols[i]) is excluded (-inf) when self_cols[i] ≥ 0,
    and with `domains` every pair within one domain is."""
    scores = np.asarray(queries, np.float32) @ np.asarray(gallery, np.float32).T
    rows = np.flatnonzero(self_cols >= 0)
    scores[rows, self_cols[rows]] = -np.inf
    if domains is not None:
        scores[domains[0][:, None] == domains[1][None, :]] = -np.inf
    return scores


def kept_gallery_errors(scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, keep: np.ndarray,
                        far: float) -> tuple[float, float]:
    """(retrieval error 1 − R@1, verification error 1 − TAR@`far`) with only the `keep` gallery columns indexed;
    the verification threshold is set on the kept gallery's impostor pairs. As for lone queries, a query whose
    every match was rejected leaves the R@1 denominator: the error is over the queries the kept gallery can answer."""
    m = retrieval_metrics(scores[:, keep], query_labels, gallery_labels[keep], ks=[1], fars=[far], with_map=False)
    return 1.0 - m["R@1"], 1.0 - m[f"TAR@FAR={far:g}"]


def unanswerable_share(scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                       keep: np.ndarray) -> float:
    """The share of the queries the whole gallery answers (not lone) that are lone with only `keep` indexed."""
    full = retrieval_metrics(scores, query_labels, gallery_labels, ks=[1], fars=[], with_map=False)["lone_queries"]
    kept = retrieval_metrics(scores[:, keep], query_labels, gallery_labels[keep], ks=[1], fars=[],
                             with_map=False)["lone_queries"]
    answered = len(query_labels) - full
    return (kept - full) / answered if answered else float("nan")


def pairwise_uncertainty(members: np.ndarray) -> np.ndarray:
    """The direct form of cmce.method's uncertainty, from the running sum: mean over i<j of ‖e_i − e_j‖² for
    members of shape (N, items, dim)."""
    n = members.shape[0]
    if n < 2:
        return np.zeros(members.shape[1], dtype=np.float32)
    total = np.zeros(members.shape[1], dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            total += ((members[i].astype(np.float64) - members[j]) ** 2).sum(-1)
    return (total / (n * (n - 1) / 2)).astype(np.float32)
