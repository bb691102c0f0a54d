"""Query × gallery scores, served a block of queries at a time: nothing here holds the whole matrix
unless it was handed one.

Two sources of scores share one interface (`Scores`):
- `InnerProducts`: queries and gallery as embedding rows (normalise them first for cosine), with the
  pairs a protocol leaves out: each query's own image (`self_cols`) and, under cross-domain protocols,
  every pair within one domain. Scores are computed on demand on the chosen device; nearest neighbours
  come from faiss on the CPU (its fused search) and from a matmul + top-k on a GPU.
  Each score is the float64 product rounded to float32, so a pair scores the same whatever else is
  scored with it: a float32 matmul rounded a dot product differently by the block's height and the
  column's place in it (MKL's kernels), so duplicate gallery items were not ties and R@1 and TAR moved
  with `evaluate.block_mb`. faiss's float32 candidates are scored again the same way.
- `ScoreMatrix`: an explicit score matrix (excluded pairs -inf), for tests and small research code.

Excluded pairs score -inf in every block. `pair_counts` counts each query's allowed (same-label) gallery
items without scoring anything when the source allows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

BLOCK_MB = 64.0  # default size of one block of float32 scores


def rows_per_block(width: int, block_mb: float) -> int:
    """Rows of `width` float32 values that fit in `block_mb` MB."""
    return max(1, int(block_mb * (1 << 20) // (4 * max(width, 1))))


def _pad(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad candidate lists to k columns with (-inf, -1)."""
    short = k - vals.shape[1]
    if short <= 0:
        return vals, idx
    return (torch.cat([vals, vals.new_full((len(vals), short), -math.inf)], 1),
            torch.cat([idx, idx.new_full((len(idx), short), -1)], 1))


class Scores:
    """Interface: shape, rows of scores, per-query pair counts, and top-k candidates."""

    n_queries: int
    n_gallery: int
    device: torch.device
    knn_rows: int = 1  # query rows a `candidates` call handles well at once

    def rows(self, queries: np.ndarray, reuse: bool = False) -> torch.Tensor:
        """Scores (float32, on self.device) of the given query rows against every gallery item. With
        `reuse`, the result may live in a buffer that the next call overwrites."""
        raise NotImplementedError

    def pair_counts(self, query_labels: np.ndarray, gallery_labels: np.ndarray,
                    keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per query: (R, its allowed gallery items with its label; all its allowed gallery items), counting
        only the `keep` columns when given."""
        raise NotImplementedError

    def relevant(self, query_labels: np.ndarray, gallery_labels: np.ndarray,
                 keep: np.ndarray | None = None) -> np.ndarray:
        return self.pair_counts(query_labels, gallery_labels, keep)[0]

    # how far a score `candidates` chose by may be from the score `rows` gives (0: the same numbers)
    candidate_error: float = 0.0

    def candidates(self, queries: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, gallery columns) of the k best allowed items per query row, in the order chosen, equal
        scores in any order; padded with (-inf, -1) where fewer are allowed. The scores are those of `rows`; the
        choice of items may be off by `candidate_error` in score (an item left out scores at most the
        lowest chosen one plus twice that)."""
        s = self.rows(queries)
        vals, idx = torch.topk(s, min(k, s.shape[1]), dim=1)
        idx = torch.where(torch.isfinite(vals), idx, -1)
        return _pad(vals, idx, k)


def _counts_from_rows(source: Scores, query_labels: np.ndarray, gallery_labels: np.ndarray,
                      keep: np.ndarray | None, block_mb: float) -> tuple[np.ndarray, np.ndarray]:
    gl = torch.tensor(np.asarray(gallery_labels), device=source.device)  # a copy: may be a read-only view
    kept = None if keep is None else torch.as_tensor(np.asarray(keep, bool), device=source.device)
    relevant, allowed = np.zeros(source.n_queries, np.int64), np.zeros(source.n_queries, np.int64)
    step = rows_per_block(source.n_gallery, block_mb)
    for start in range(0, source.n_queries, step):
        rows = np.arange(start, min(start + step, source.n_queries))
        ok = torch.isfinite(source.rows(rows))
        if kept is not None:
            ok &= kept[None, :]
        same = torch.as_tensor(np.asarray(query_labels)[rows], device=source.device)[:, None] == gl[None, :]
        relevant[rows] = (same & ok).sum(1).cpu().numpy()
        allowed[rows] = ok.sum(1).cpu().numpy()
    return relevant, allowed


@dataclass
class ScoreMatrix(Scores):
    """An explicit (queries × gallery) score matrix; excluded pairs are -inf."""

    scores: np.ndarray
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    block_mb: float = BLOCK_MB

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32)
        if self.scores.ndim != 2:
            raise ValueError(f"a score matrix must be 2-d, got shape {self.scores.shape}")
        self.n_queries, self.n_gallery = self.scores.shape
        self.knn_rows = rows_per_block(self.n_gallery, self.block_mb)

    def rows(self, queries: np.ndarray, reuse: bool = False) -> torch.Tensor:
        return torch.from_numpy(self.scores[queries]).to(self.device)

    def pair_counts(self, query_labels, gallery_labels, keep=None) -> tuple[np.ndarray, np.ndarray]:
        return _counts_from_rows(self, query_labels, gallery_labels, keep, self.block_mb)


def candidate_error(queries: np.ndarray, gallery: np.ndarray, device: torch.device) -> float:
    """How far a score that InnerProducts' `candidates` chose by may be from the one `rows` gives, for scores of
    at most ‖q‖‖g‖ (the rows' largest norms). On the CPU faiss chooses by float32 dot products, within
    d·2^-24·‖q‖‖g‖ of the exact ones, and ours are within half a float32 step of those. On a GPU both are float64
    products rounded to float32, but from matmuls of other shapes: the library may sum in another order for
    each, and a product on a float32 rounding boundary then rounds one step (2^-23·‖q‖‖g‖ at most) apart."""
    norms = [float(np.sqrt(np.max(np.einsum("ij,ij->i", a, a), initial=0.0))) for a in (queries, gallery)]
    steps = (queries.shape[1] + 1) * 2.0 ** -24 if device.type == "cpu" else 2.0 ** -23
    return 1.01 * steps * norms[0] * norms[1]


@dataclass
class InnerProducts(Scores):
    """Scores = inner products of query rows with gallery rows, computed when asked for.

    `self_cols[i]` ≥ 0: the gallery column holding query i's own image (left out). `domains`: (domain code
    of each query, of each gallery item); pairs within one domain are left out."""

    queries: np.ndarray
    gallery: np.ndarray
    self_cols: np.ndarray | None = None
    domains: tuple[np.ndarray, np.ndarray] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    block_mb: float = BLOCK_MB

    def __post_init__(self) -> None:
        # copies: the rows may be read-only views of a Parquet table, which torch must not wrap
        self.queries = np.array(self.queries, dtype=np.float32, order="C")
        self.gallery = np.array(self.gallery, dtype=np.float32, order="C")
        if self.queries.ndim != 2 or self.gallery.ndim != 2 or self.queries.shape[1] != self.gallery.shape[1]:
            raise ValueError(f"queries {self.queries.shape} and gallery {self.gallery.shape} must be 2-d with "
                             f"one dimension")
        for what, rows in (("query", self.queries), ("gallery", self.gallery)):
            if not np.isfinite(rows).all():  # the counts of pairs assume every score is finite
                raise ValueError(f"{what} embeddings contain NaN or inf values")
        self.n_queries, self.n_gallery = len(self.queries), len(self.gallery)
        if self.self_cols is None:
            self.self_cols = np.full(self.n_queries, -1, np.int64)
        self.self_cols = np.asarray(self.self_cols, dtype=np.int64)
        # the gallery as float64 (see the module docstring); a block's query rows are widened when scored
        self._q = torch.from_numpy(self.queries).to(self.device)
        self._g_t = torch.from_numpy(self.gallery).to(self.device, torch.float64).T.contiguous()
        self._domains = None if self.domains is None else tuple(torch.as_tensor(np.asarray(d), device=self.device)
                                                                 for d in self.domains)
        self._buffer: torch.Tensor | None = None
        self._buffer64: torch.Tensor | None = None
        # faiss searches thousands of queries per call far faster than a few hundred
        self.knn_rows = 8192 if self.device.type == "cpu" else rows_per_block(self.n_gallery, self.block_mb)
        self.candidate_error = candidate_error(self.queries, self.gallery, self.device)

    def rows(self, queries: np.ndarray, reuse: bool = False) -> torch.Tensor:
        """`reuse`: write into one buffer kept for the next call (the result is overwritten then); saves a
        fresh allocation, and its page faults, per block."""
        queries = np.asarray(queries)
        rows_t = torch.as_tensor(queries, device=self.device)
        if reuse:
            if self._buffer is None or self._buffer.shape[0] < len(queries):
                self._buffer = torch.empty((len(queries), self.n_gallery), device=self.device)
                self._buffer64 = torch.empty((len(queries), self.n_gallery), device=self.device,
                                             dtype=torch.float64)
            exact = torch.mm(self._q[rows_t].double(), self._g_t, out=self._buffer64[: len(queries)])
            s = self._buffer[: len(queries)].copy_(exact)
        else:
            s = (self._q[rows_t].double() @ self._g_t).float()
        own = self.self_cols[queries]
        hit = np.flatnonzero(own >= 0)
        if len(hit):
            s[torch.as_tensor(hit, device=self.device), torch.as_tensor(own[hit], device=self.device)] = -math.inf
        if self._domains is not None:
            s.masked_fill_(self._domains[0][rows_t][:, None] == self._domains[1][None, :], -math.inf)
        return s

    def pair_counts(self, query_labels, gallery_labels, keep=None) -> tuple[np.ndarray, np.ndarray]:
        """By counting labels and domains, no scores: the kept (same-label) items, minus the query's own
        image, minus the kept (same-label) items of its own domain."""
        ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
        kept = np.ones(self.n_gallery, bool) if keep is None else np.asarray(keep, bool)
        values, codes = np.unique(np.concatenate([gl, ql]), return_inverse=True)
        g_code, q_code = codes[: len(gl)], codes[len(gl):]
        relevant = np.bincount(g_code[kept], minlength=len(values))[q_code].astype(np.int64)
        allowed = np.full(self.n_queries, int(kept.sum()), np.int64)
        own = self.self_cols
        has = own >= 0
        own_left_out = np.zeros(self.n_queries, bool)
        own_left_out[has] = kept[own[has]]
        if self.domains is not None:
            qd, gd = (np.asarray(d) for d in self.domains)
            d_values, d_codes = np.unique(np.concatenate([gd, qd]), return_inverse=True)
            gd_code, qd_code = d_codes[: len(gd)], d_codes[len(gd):]
            allowed -= np.bincount(gd_code[kept], minlength=len(d_values))[qd_code]
            pair, q_pair = g_code * len(d_values) + gd_code, q_code * len(d_values) + qd_code
            relevant -= np.bincount(pair[kept], minlength=len(values) * len(d_values))[q_pair]
            own_left_out[has] &= gd[own[has]] != qd[has]  # else already left out with its domain
        own_same = np.zeros(self.n_queries, bool)
        own_same[has] = gl[own[has]] == ql[has]
        return relevant - (own_left_out & own_same), allowed - own_left_out

    def candidates(self, queries: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type != "cpu":
            return super().candidates(queries, k)
        return self._faiss_candidates(np.asarray(queries), k)

    def _faiss_candidates(self, queries: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """faiss's exhaustive inner-product search, one call per query domain over the other domains'
        items; one extra neighbour asked for where a query's own image may be among them."""
        import faiss

        vals = np.full((len(queries), k), -np.inf, np.float32)
        idx = np.full((len(queries), k), -1, np.int64)
        groups = [(np.arange(len(queries)), np.arange(self.n_gallery))]
        if self.domains is not None:
            qd, gd = (np.asarray(d) for d in self.domains)
            groups = [(np.flatnonzero(qd[queries] == d), np.flatnonzero(gd != d)) for d in np.unique(qd[queries])]
        for rows, cols in groups:
            if not len(rows) or not len(cols):
                continue
            gallery = self.gallery if len(cols) == self.n_gallery else self.gallery[cols]
            d, i = faiss.knn(self.queries[queries[rows]], gallery, min(k + 1, len(cols)),
                             metric=faiss.METRIC_INNER_PRODUCT)
            found = i >= 0
            i = np.where(found, cols[np.clip(i, 0, None)], -1)
            drop = ~found | (i == self.self_cols[queries[rows]][:, None])
            # stable: the kept entries stay in faiss's (best-first) order, the dropped ones go last
            order = np.argsort(drop, axis=1, kind="stable")[:, :k]
            d, i, drop = (np.take_along_axis(a, order, 1) for a in (d, i, drop))
            width = d.shape[1]
            vals[rows, :width] = np.where(drop, -np.inf, self._rescored(queries[rows], i))
            idx[rows, :width] = np.where(drop, -1, i)
        return torch.from_numpy(vals), torch.from_numpy(idx)

    def _rescored(self, queries: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The scores `rows` gives the pairs (queries[r], cols[r, j]) (cols -1: any value), in slices of about
        a quarter block of float64 products."""
        out = np.empty(cols.shape, np.float32)
        step = max(1, int(self.block_mb * (1 << 18) // (8 * max(cols.size // max(len(cols), 1), 1)
                                                          * self.queries.shape[1])))  # a quarter block
        for start in range(0, len(cols), step):
            part = slice(start, start + step)
            q = torch.from_numpy(self.queries[queries[part]]).double()
            g = torch.from_numpy(self.gallery[np.clip(cols[part], 0, None)]).double()
            out[part] = torch.bmm(g, q[:, :, None])[:, :, 0].float().numpy()
        return out
