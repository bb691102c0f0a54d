"""Retrieval and verification metrics, computed a block of queries at a time: no I/O, and never a
whole query × gallery matrix (scores come from a cmce.scores source, block by block).

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
- Rejection: a gallery subset (the kept items) is scored as if the rest were not indexed: R, lone
  queries, neighbours and the impostor threshold are all those of the kept gallery.
- Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", 2019): how
  alike two embeddings of the same images are, whatever their dimensions — see linear_cka.

How it scales. Neighbours: per block of non-lone queries, the best R+1 candidates (faiss or a top-k),
put in the documented order; a tie across the R-th place is detected (the (R+1)-th score equals the R-th)
and that row ordered in full. TAR@FAR: an exact streaming selection of the impostor threshold. Scores
map to order-preserving 32-bit keys; a first pass counts genuine and impostor pairs per value of the
key's upper 16 bits, which locates the bin holding the (m+1)-th largest impostor; a second pass counts
that bin's pairs per value of the lower 16 bits, which gives the threshold's key exactly. Memory: one
block of scores plus 2 × 65,536 counts per gallery subset. Gallery subsets that nest (the kept items at
growing rejection rates) share one count per subset family, so a whole rejection curve costs one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

from cmce.scores import BLOCK_MB, ScoreMatrix, Scores, rows_per_block

HI = 1 << 16  # values of a key's upper (and of its lower) 16 bits
NO_LABEL = np.iinfo(np.int64).min  # the label of a padding neighbour: matches nothing


def neighbour_labels(knn: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """Labels of the neighbours; padding (-1) becomes a label that matches nothing."""
    labels = np.asarray(gallery_labels)[np.clip(knn, 0, None)]
    return np.where(knn >= 0, labels, NO_LABEL)


def average_precision_at_r(knn_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray,
                           width: int | None = None) -> np.ndarray:
    """AP@R of each query; `r` is each query's count of same-label gallery items (≥ 1). The sums run over
    `width` ranks (default: the largest r here), zeros beyond each query's R: give every block of queries the
    width of the whole set and each AP has the same bits, since numpy groups a sum's terms by its length."""
    r = np.asarray(r)
    if len(r) == 0:
        return np.zeros(0)
    needed = int(r.max())
    if knn_labels.shape[1] < needed:
        raise ValueError(f"MAP@R needs {needed} neighbours per query, got {knn_labels.shape[1]}")
    width = needed if width is None else width
    if knn_labels.shape[1] < width:  # ranks past every R here: never relevant
        knn_labels = np.pad(knn_labels, ((0, 0), (0, width - knn_labels.shape[1])), constant_values=-1)
    rel = knn_labels[:, :width] == np.asarray(query_labels)[:, None]
    ranks = np.arange(1, width + 1)
    rel &= ranks[None, :] <= r[:, None]
    precision = np.cumsum(rel, axis=1) / ranks[None, :]
    return (precision * rel).sum(axis=1) / r


def impostors_allowed(far: float, impostors: int) -> int:
    """m = floor(FAR · #impostors), exact for the FAR as written: in floats, floor(3e-4 · 10000) is 2, not 3."""
    return math.floor(Fraction(repr(float(far))) * impostors)  # float(): a numpy scalar's repr is np.float64(…)


def far_threshold(impostor: np.ndarray, far: float) -> float:
    """Score threshold t with at most floor(far · n) impostor scores strictly above it (the definition,
    on explicit scores; the streaming form is `measure`)."""
    n = len(impostor)
    if n == 0:
        return float("-inf")
    m = impostors_allowed(far, n)
    if m >= n:
        return float("-inf")
    return float(np.partition(impostor, n - 1 - m)[n - 1 - m])  # the (m+1)-th largest value


@dataclass
class Family:
    """Nested gallery subsets keep_0 ⊇ keep_1 ⊇ … ⊇ keep_{n-1}, stored as one level per gallery item:
    how many of the subsets keep it (subset r keeps the items of level > r)."""

    levels: np.ndarray
    n_subsets: int

    @classmethod
    def of(cls, keeps: list[np.ndarray]) -> Family:
        """From the subsets' keep masks, largest first; they must nest."""
        keeps = [np.asarray(k, bool) for k in keeps]
        if not keeps:
            raise ValueError("a family of gallery subsets needs at least one subset")
        for big, small in zip(keeps, keeps[1:], strict=False):
            if (small & ~big).any():
                raise ValueError("gallery subsets of one family must nest (each keeps a subset of the one before)")
        return cls(np.sum(keeps, axis=0).astype(np.int64), len(keeps))

    @classmethod
    def everything(cls, n_gallery: int, n_subsets: int = 1) -> Family:
        return cls(np.full(n_gallery, n_subsets, np.int64), n_subsets)

    def keep(self, r: int) -> np.ndarray:
        return self.levels > r


class Kept(NamedTuple):
    """One kept gallery's measures. `unanswerable`: the share of the queries the whole gallery answers that lost
    every match to the rejection; they leave `r1`'s denominator (as lone queries do), which flatters a rejection
    that removes a hard class's matches together, so it is reported beside the error."""

    r1: float
    tar: float
    unanswerable: float


@dataclass
class Measured:
    """Metrics of the whole gallery, and the measures of every subset of every family."""

    metrics: dict[str, float]
    subsets: list[list[Kept]] = field(default_factory=list)


def retrieval_metrics(
    scores: Scores | np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: list[int] = (1, 2, 4, 8),  # type: ignore[assignment]
    fars: list[float] = (1e-2, 1e-3, 1e-4),  # type: ignore[assignment]
    with_map: bool = True,
    block_mb: float = BLOCK_MB,
) -> dict[str, float]:
    """All metrics of one configuration: R@K, MAP@R, TAR@FAR, lone count. `scores`: a cmce.scores source
    (or an explicit matrix, excluded pairs -inf)."""
    return measure(scores, query_labels, gallery_labels, ks, fars, with_map, block_mb=block_mb).metrics


def measure(
    scores: Scores | np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: list[int] = (1, 2, 4, 8),  # type: ignore[assignment]
    fars: list[float] = (1e-2, 1e-3, 1e-4),  # type: ignore[assignment]
    with_map: bool = True,
    families: list[Family] = (),  # type: ignore[assignment]
    keep_far: float = 1e-3,
    block_mb: float = BLOCK_MB,
) -> Measured:
    """The metrics of the whole gallery and, from the same passes, R@1 and TAR@`keep_far` with only each
    subset of each family indexed."""
    src = scores if isinstance(scores, Scores) else ScoreMatrix(scores, block_mb=block_mb)
    ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
    if len(ql) != src.n_queries or len(gl) != src.n_gallery:
        raise ValueError(f"{len(ql)} query and {len(gl)} gallery labels for {src.n_queries} × {src.n_gallery} scores")
    ks = list(ks)
    step = rows_per_block(src.n_gallery, block_mb)
    r = src.relevant(ql, gl)
    nonlone = np.flatnonzero(r > 0)
    subset_r = [[src.relevant(ql, gl, f.keep(i)) for i in range(f.n_subsets)] for f in families]
    hits = {k: np.zeros(len(ql), bool) for k in ks}
    ap = np.zeros(len(ql))
    top1 = [[np.zeros(len(ql), bool) for _ in range(f.n_subsets)] for f in families]
    retry: list[list[list[np.ndarray]]] = [[[] for _ in range(f.n_subsets)] for f in families]
    map_width = int(r[nonlone].max(initial=0))  # every block sums AP over the same ranks (see average_precision_at_r)
    max_depth = max(max(ks, default=1), int(r.max(initial=0)) if with_map else 0)
    chunk = max(1, min(src.knn_rows, rows_per_block(3 * (max_depth + 1), block_mb)))  # candidates: 3 numbers each
    for start in range(0, len(nonlone), chunk):
        rows = nonlone[start:start + chunk]
        depth = max(max(ks, default=1), int(r[rows].max()) if with_map else 0)
        knn = exact_neighbours(src, rows, depth, step)
        labels = neighbour_labels(knn, gl)
        for k in ks:
            hits[k][rows] = (labels[:, :k] == ql[rows, None]).any(axis=1)
        if with_map:
            ap[rows] = average_precision_at_r(labels, ql[rows], r[rows], width=map_width)
        for f, fam in enumerate(families):
            level = np.where(knn >= 0, fam.levels[np.clip(knn, 0, None)], -1)
            for i in range(fam.n_subsets):
                kept = level > i
                first = knn[np.arange(len(rows)), kept.argmax(axis=1)]  # argmax: the first kept neighbour
                found = kept.any(axis=1)
                top1[f][i][rows] = found & (gl[first] == ql[rows])
                retry[f][i].append(rows[~found & (subset_r[f][i][rows] > 0)])  # all R+1 candidates rejected
    out: dict[str, float] = {}
    for k in ks:
        out[f"R@{k}"] = float(hits[k][nonlone].mean()) if len(nonlone) else float("nan")
    if with_map:
        out["MAP@R"] = float(ap[nonlone].mean()) if len(nonlone) else float("nan")
    for f, fam in enumerate(families):
        for i in range(fam.n_subsets):
            rows = np.concatenate([np.zeros(0, np.int64), *retry[f][i]])
            _top1_in_subset(src, rows, fam.keep(i), ql, gl, top1[f][i], step)
    counted = [Family.everything(src.n_gallery), *families]
    wanted = [(0, 0, far) for far in fars] + [(f + 1, i, keep_far) for f, fam in enumerate(families)
                                              for i in range(fam.n_subsets)]
    tars = dict(zip(wanted, tar_at_fars(src, ql, gl, counted, wanted, step), strict=True)) if wanted else {}
    for far in fars:
        out[f"TAR@FAR={far:g}"] = tars[0, 0, far]
    out["lone_queries"] = float(len(ql) - len(nonlone))
    subsets = []
    for f, fam in enumerate(families):
        row = []
        for i in range(fam.n_subsets):
            answerable = subset_r[f][i] > 0
            r1 = float(top1[f][i][answerable].mean()) if answerable.any() else float("nan")
            lost = float((len(nonlone) - answerable.sum()) / len(nonlone)) if len(nonlone) else float("nan")
            row.append(Kept(r1, tars[f + 1, i, keep_far], lost))
        subsets.append(row)
    return Measured(out, subsets)


def exact_neighbours(src: Scores, rows: np.ndarray, depth: int, step: int) -> np.ndarray:
    """Gallery columns of the `depth` best allowed items of each query row, in the documented order
    (score descending, then column ascending); -1 pads rows with fewer allowed items. `step`: rows whose
    full scores are computed at once where a tie straddles the cut."""
    vals, idx = src.candidates(rows, depth + 1)
    vals, idx = vals.cpu(), idx.cpu()
    # ties in column order: sort by column, then stably by score (padding, -inf, goes last)
    by_col = torch.argsort(idx, dim=1, stable=True)
    vals, idx = vals.gather(1, by_col), idx.gather(1, by_col)
    by_score = torch.argsort(-vals, dim=1, stable=True)
    vals, idx = vals.gather(1, by_score), idx.gather(1, by_score)
    out = idx[:, :depth].numpy().copy()
    # the (depth+1)-th candidate scores as the depth-th (or, where the candidates were chosen by other numbers,
    # within twice their error of it): a tie may straddle the cut, or an item left out may belong above it, so
    # the full row decides
    slack = 2 * src.candidate_error
    crowded = np.flatnonzero((torch.isfinite(vals[:, depth]) & (vals[:, depth] >= vals[:, depth - 1] - slack)).numpy())
    for start in range(0, len(crowded), step):
        part = crowded[start:start + step]
        order = torch.sort(src.rows(rows[part]).cpu(), dim=1, descending=True, stable=True)
        top = torch.where(torch.isfinite(order.values[:, :depth]), order.indices[:, :depth], -1).numpy()
        out[part] = -1
        out[part, :top.shape[1]] = top
    return out


def _top1_in_subset(src: Scores, rows: np.ndarray, keep: np.ndarray, ql: np.ndarray, gl: np.ndarray,
                    top1: np.ndarray, step: int) -> None:
    """Top-1 hits of `rows` with only the `keep` columns indexed, from their full rows (for queries whose
    candidates were all rejected)."""
    dropped = torch.as_tensor(~keep, device=src.device)
    for start in range(0, len(rows), step):
        part = rows[start:start + step]
        s = src.rows(part).masked_fill_(dropped[None, :], -math.inf)
        first = s.argmax(dim=1).cpu().numpy()  # the first of equal maxima: the lowest column
        top1[part] = gl[first] == ql[part]


def score_keys(s: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of float32 scores: a < b ⇔ key(a) < key(b) (−0.0 made +0.0 first,
    as they compare equal)."""
    bits = (s + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _tail(src: Scores, ql: np.ndarray, gl: np.ndarray, floor: float, step: int):
    """Block by block, the allowed pairs scoring at least `floor` (every allowed pair when it is -inf):
    (their keys, gallery columns, genuine?), on the source's device."""
    gl_t = torch.tensor(gl, device=src.device)  # a copy: the labels may be a read-only view of a table
    for start in range(0, src.n_queries, step):
        rows = np.arange(start, min(start + step, src.n_queries))
        s = src.rows(rows, reuse=True)
        r_i, c_i = torch.nonzero(torch.isfinite(s) if floor == -math.inf else s >= floor, as_tuple=True)
        if len(r_i):
            genuine = torch.as_tensor(ql[rows], device=src.device)[r_i] == gl_t[c_i]
            yield score_keys(s[r_i, c_i]), c_i, genuine


def tar_at_fars(src: Scores, ql: np.ndarray, gl: np.ndarray, families: list[Family],
                wanted: list[tuple[int, int, float]], step: int) -> list[float]:
    """TAR at each (family, subset, FAR) in `wanted`, by the counting passes of the module docstring. The
    passes count only the tail of pairs scoring at least a floor estimated from a sample of queries to lie
    below every threshold wanted; the counts prove it does (else the floor is lowered and counted again)."""
    out: list[float] = [float("nan")] * len(wanted)
    pending = []  # (position in wanted, family, subset, m, genuine pairs)
    totals = {}
    for f, i in dict.fromkeys((f, i) for f, i, _ in wanted):
        relevant, allowed = src.pair_counts(ql, gl, families[f].keep(i))
        totals[f, i] = int(relevant.sum()), int(allowed.sum() - relevant.sum())
    for j, (f, i, far) in enumerate(wanted):
        genuine, impostors = totals[f, i]
        m = impostors_allowed(far, impostors)
        if genuine and (impostors == 0 or m >= impostors):
            out[j] = 1.0  # threshold -inf: every genuine pair is accepted
        elif genuine:
            pending.append((j, f, i, m, genuine))
    if not pending:
        return out
    fars = sorted({wanted[j][2] for j, *_ in pending})
    for floor in (*_floors(src, ql, gl, max(fars), step), -math.inf):
        coarse = _coarse_counts(src, ql, gl, families, floor, step)
        tail_impostors = [coarse[f][:, i + 1:, 0].sum() for _, f, i, _, _ in pending]
        if all(n >= m + 1 for n, (_, _, _, m, _) in zip(tail_impostors, pending, strict=True)):
            break  # the floor lies below every threshold wanted
    plans = [_locate(coarse[f][:, i + 1:].sum(axis=1), m) for _, f, i, m, _ in pending]
    need = [sorted({b for (_, fam, *_), (b, _, _) in zip(pending, plans, strict=True) if fam == f})
            for f in range(len(families))]
    fine = _fine_counts(src, ql, gl, families, need, floor, step)
    for (j, f, i, _, genuine), (bin_, rank, above) in zip(pending, plans, strict=True):
        counts = fine[f][bin_][:, i + 1:].sum(axis=1)  # (lower 16 bits, genuine?) of the kept pairs in the bin
        lower = HI - 1 - int(np.searchsorted(np.cumsum(counts[::-1, 0]), rank))
        out[j] = float((above + counts[lower + 1:, 1].sum()) / genuine)
    return out


def _floors(src: Scores, ql: np.ndarray, gl: np.ndarray, far: float, step: int) -> list[float]:
    """Candidate floors for the tail, highest first: impostor scores of a sample of queries (one block of them)
    at 3 and at 30 times the largest FAR wanted (plus a margin of 64 pairs), so the tail is a small share of all
    pairs."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(src.n_queries, min(src.n_queries, step), replace=False))  # one block
    s = src.rows(rows)
    impostor = s[torch.isfinite(s) & (torch.as_tensor(ql[rows], device=src.device)[:, None]
                                      != torch.tensor(gl, device=src.device)[None, :])].cpu().numpy()
    ranks = [math.ceil(factor * far * len(impostor)) + 64 for factor in (3, 30)]
    ranks = [r for r in ranks if r < len(impostor)]
    if not ranks:
        return []
    top = np.partition(impostor, [len(impostor) - 1 - r for r in ranks])
    return [float(top[len(impostor) - 1 - r]) for r in ranks]


def _coarse_counts(src: Scores, ql: np.ndarray, gl: np.ndarray, families: list[Family], floor: float,
                   step: int) -> list[np.ndarray]:
    """Per family: counts of the tail's pairs per (upper 16 bits of the key, level, genuine?)."""
    levels = [torch.as_tensor(f.levels, device=src.device) for f in families]
    n_levels = [f.n_subsets + 1 for f in families]
    counts = [torch.zeros(HI * n * 2, dtype=torch.int64, device=src.device) for n in n_levels]
    for keys, cols, genuine in _tail(src, ql, gl, floor, step):
        upper = ((keys >> 16) + HI // 2).long()
        for f, n in enumerate(n_levels):
            counts[f] += torch.bincount((upper * n + levels[f][cols]) * 2 + genuine, minlength=HI * n * 2)
    return [c.view(HI, n, 2).cpu().numpy() for c, n in zip(counts, n_levels, strict=True)]


def _locate(counts: np.ndarray, m: int) -> tuple[int, int, int]:
    """From the tail's (upper bin, genuine?) counts: the bin holding the (m+1)-th largest impostor score,
    that score's rank from the top within the bin, and the genuine pairs in the bins above."""
    from_top = np.cumsum(counts[::-1, 0])
    pos = int(np.searchsorted(from_top, m + 1))
    bin_ = HI - 1 - pos
    return bin_, m + 1 - (int(from_top[pos - 1]) if pos else 0), int(counts[bin_ + 1:, 1].sum())


def _fine_counts(src: Scores, ql: np.ndarray, gl: np.ndarray, families: list[Family], need: list[list[int]],
                 floor: float, step: int) -> list[dict[int, np.ndarray]]:
    """Per family and needed upper bin: counts per (lower 16 bits, level, genuine?) of the tail's pairs in it."""
    dev = src.device
    union = sorted({b for bins in need for b in bins})
    slot_of_bin = torch.full((HI,), -1, dtype=torch.int64, device=dev)
    slot_of_bin[torch.as_tensor(union, dtype=torch.int64, device=dev)] = torch.arange(len(union), device=dev)
    fam_slot = []
    for bins in need:
        m = torch.full((len(union),), -1, dtype=torch.int64, device=dev)
        m[torch.as_tensor([union.index(b) for b in bins], dtype=torch.int64, device=dev)] = torch.arange(
            len(bins), device=dev)
        fam_slot.append(m)
    levels = [torch.as_tensor(f.levels, device=dev) for f in families]
    n_levels = [f.n_subsets + 1 for f in families]
    counts = [torch.zeros(max(len(b), 1) * HI * n * 2, dtype=torch.int64, device=dev)
              for b, n in zip(need, n_levels, strict=True)]
    for keys, cols, genuine in _tail(src, ql, gl, floor, step):
        slot = slot_of_bin[((keys >> 16) + HI // 2).long()]
        sel = torch.nonzero(slot >= 0, as_tuple=True)[0]
        lower, cols, genuine, slot = (keys[sel] & 0xFFFF).long(), cols[sel], genuine[sel], slot[sel]
        for f, n in enumerate(n_levels):
            mine = fam_slot[f][slot]
            ok = mine >= 0
            idx = ((mine[ok] * HI + lower[ok]) * n + levels[f][cols[ok]]) * 2 + genuine[ok]
            counts[f] += torch.bincount(idx, minlength=counts[f].numel())
    out = []
    for f, n in enumerate(n_levels):
        c = counts[f].view(-1, HI, n, 2).cpu().numpy()
        out.append({b: c[j] for j, b in enumerate(need[f])})
    return out


def check_metric_name(name: str) -> str:
    """A name retrieval_metrics can produce: R@K (K ≥ 1), MAP@R or TAR@FAR=x (0 < x < 1), in the spelling it
    produces (`R@01` is R@1, `TAR@FAR=1e-3` TAR@FAR=0.001: measured, then not found under the name given); KeyError
    otherwise."""
    if name == "MAP@R":
        return name
    if name.startswith("R@") and name[2:].isdigit() and name[2:].isascii() and int(name[2:]) >= 1:
        return f"R@{int(name[2:])}"
    if name.startswith("TAR@FAR="):
        try:
            if 0.0 < (far := float(name[len("TAR@FAR="):])) < 1.0:
                return f"TAR@FAR={far:g}"
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
