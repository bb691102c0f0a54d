"""Retrieval and verification metrics: pure numpy, no I/O.

Conventions (stated once, used everywhere):
- A score matrix has one row per query and one column per gallery item; higher is more similar.
  Excluded pairs (a query's own image in the gallery, a rejected gallery item) are ``-inf``.
- Neighbours are ordered by score, descending; equal scores are ordered by gallery column, lower
  first (what a stable sort gives). Ties are therefore neither optimistic nor pessimistic but fixed.
- A query is *lone* when no allowed gallery item shares its label; lone queries are left out of
  Recall@K and MAP@R (as pytorch-metric-learning does) and reported as a count.
- Recall@K: fraction of queries with at least one same-label item among their first K neighbours.
- MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020): for a query with R same-label
  gallery items, AP@R = (1/R) Σ_{i=1..R} P(i)·rel(i) over its first R neighbours, P(i) the precision
  at rank i; MAP@R is the mean over queries.
- TAR@FAR (1:1 verification over all allowed query/gallery pairs): genuine pairs share a label,
  impostor pairs do not. A pair is accepted when its score is strictly above the threshold t, where t
  is the (m+1)-th largest impostor score and m = floor(FAR · #impostors); so at most m impostors are
  accepted. TAR is the fraction of genuine pairs accepted.
- Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", 2019): how
  alike two embeddings of the same images are, whatever their dimensions — see linear_cka.
"""

from __future__ import annotations

import math

import numpy as np

_BLOCK = 1024


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
    m = math.floor(far * n)
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


def check_metric_name(name: str) -> str:
    """A name retrieval_metrics can produce: R@K (K ≥ 1), MAP@R or TAR@FAR=x (0 < x < 1); KeyError otherwise."""
    if name == "MAP@R":
        return name
    if name.startswith("R@") and name[2:].isdigit() and int(name[2:]) >= 1:
        return name
    if name.startswith("TAR@FAR="):
        try:
            if 0.0 < float(name[len("TAR@FAR="):]) < 1.0:
                return name
        except ValueError:
            pass
    raise KeyError(f"unknown metric {name!r}; valid names: 'R@K' (K ≥ 1), 'MAP@R', 'TAR@FAR=x' (0 < x < 1)")


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment of two representations of the same n items, X (n×p) and Y (n×q):
    with columns centred, CKA = ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F), i.e. HSIC(XXᵀ, YYᵀ) normalised
    (Kornblith et al. 2019). 1 when Y is X up to a rotation and isotropic scaling, near 0 for unrelated
    representations; not invariant to general linear maps, so a low value says a linear map between
    the two spaces fits poorly. Computed in float64."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"linear_cka needs two 2-d arrays with the same rows, got {x.shape} and {y.shape}")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / denom) if denom > 0 else float("nan")
