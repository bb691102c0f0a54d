"""The method of the paper, in one place; everything else calls these.

A lightweight query model φ_q and N gallery models φ_g1..φ_gN; one transformation T_i per gallery model
into the query space, fitted with both backbones frozen (n = L2 normalisation, W_q = the frozen query
classifier, s = its scale):

    L_i = ‖n(T_i(φ_gi(x))) − n(φ_q(x))‖² + λ · CE(s · n(T_i(φ_gi(x))) · n(W_q)ᵀ, y)        transformation_loss

Gallery side, with e_i = n(T_i(φ_gi(x))) and the running sum S = Σ_i e_i:

    embedding   = n(S)                                     (the normalised mean: cosine search)   RunningEnsemble
    uncertainty = mean_{i<j} ‖e_i − e_j‖² = (N² − ‖S‖²) / (N(N−1)/2)        (since ‖e_i‖ = 1)   uncertainty_from_sum

Only S and N are stored, so a model joins a live ensemble without touching the others. The most uncertain
gallery items can be left out of the index: rejection_mask. The query embedding is φ_q(x), unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cmce.models import cosine_logits


def normalize(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """n(x): rows scaled to unit L2 norm (float32). A row that is not finite or has no direction (all zeros) is
    refused, naming `what` and the row: scaling it would give a vector that scores like a real one. Norms are
    summed in float64 a block at a time, since a float32 sum of squares overflows from about 1e19 and would turn
    the row into zeros."""
    x = np.asarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    squares = np.empty(len(rows))
    for start in range(0, len(rows), 65536):
        block = rows[start : start + 65536].astype(np.float64)
        squares[start : start + 65536] = np.einsum("ij,ij->i", block, block)
    norms = np.sqrt(squares)
    bad = np.flatnonzero(~(np.isfinite(norms) & (norms > 0) & (norms <= np.finfo(np.float32).max)))
    if len(bad):
        i = int(bad[0])
        problem = "is all zeros" if squares[i] == 0 else "is not finite (or too large to normalise)"
        raise ValueError(f"{what}: row {i} {problem}; {len(bad)} such row(s)")
    out = rows / norms.astype(np.float32)[:, None]
    # a norm below float32's smallest normal number is rounded coarsely as a float32: divide those rows in float64
    tiny = np.flatnonzero(norms < np.finfo(np.float32).tiny)
    if len(tiny):
        out[tiny] = (rows[tiny].astype(np.float64) / norms[tiny, None]).astype(np.float32)
    return out.reshape(x.shape)


def transformation_loss(
    out: torch.Tensor, query: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, lam: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total, alignment and cross-entropy terms of L_i for a batch: `out` = T_i(φ_gi(x)), `query` = φ_q(x)."""
    align = (F.normalize(out, dim=-1) - F.normalize(query, dim=-1)).pow(2).sum(-1).mean()
    ce = F.cross_entropy(cosine_logits(out, classifier, scale), labels) if lam > 0 else out.new_zeros(())
    return align + lam * ce, align, ce


# float32 storage of S, the embedding and the uncertainty: far above their rounding, far below any real mismatch
STORED_TOLERANCE = 1e-3


def uncertainty_from_sum(running_sum: np.ndarray, n_models: int) -> np.ndarray:
    """Mean pairwise squared distance of the N unit vectors whose sum is `running_sum` (0 when N < 2)."""
    if n_models < 2:
        return np.zeros(len(running_sum), dtype=np.float32)
    sq = np.einsum("ij,ij->i", running_sum.astype(np.float64), running_sum.astype(np.float64))
    pairs = n_models * (n_models - 1) / 2
    # clip tiny negatives from rounding when all members agree
    return np.clip((n_models**2 - sq) / pairs, 0.0, None).astype(np.float32)


class RunningEnsemble:
    """Accumulates normalised member embeddings e_i into S; gives the ensemble embedding and uncertainty."""

    def __init__(self, running_sum: np.ndarray | None = None, n_models: int = 0):
        self.sum = None if running_sum is None else np.asarray(running_sum, dtype=np.float64)
        self.n_models = n_models

    def add(self, member: np.ndarray, what: str = "member embeddings") -> None:
        """Add one member's embeddings; `what` names them in an error (a row without a direction)."""
        member = normalize(member, what).astype(np.float64)
        if self.sum is not None and self.sum.shape != member.shape:
            raise ValueError(f"member shape {member.shape} does not match the ensemble {self.sum.shape}")
        self.sum = member if self.sum is None else self.sum + member
        self.n_models += 1

    def _require(self) -> np.ndarray:
        if self.sum is None:
            raise ValueError("empty ensemble: add at least one member")
        return self.sum

    @property
    def mean(self) -> np.ndarray:
        """Mean of the normalised members (not itself unit length)."""
        return (self._require() / self.n_models).astype(np.float32)

    @property
    def embedding(self) -> np.ndarray:
        """The searched embedding n(S): the normalised mean."""
        return normalize(self._require(), "ensemble sum")

    @property
    def uncertainty(self) -> np.ndarray:
        return uncertainty_from_sum(self._require(), self.n_models)


def rejected_count(n: int, fraction: float) -> int:
    """How many of n items rejection_mask rejects."""
    return min(int(np.ceil(fraction * n - 1e-9)), max(n - 1, 0)) if fraction > 0 else 0


def rejection_mask(uncertainty: np.ndarray, fraction: float) -> np.ndarray:
    """True for the ceil(fraction·n) most uncertain items (ties broken by position, stable); never all of
    them, as an index needs at least one item. Growing fractions give nested masks."""
    n = len(uncertainty)
    n_reject = rejected_count(n, fraction)
    mask = np.zeros(n, dtype=bool)
    if n_reject:
        mask[np.argsort(-np.asarray(uncertainty), kind="stable")[:n_reject]] = True
    return mask
