"""Running-sum ensemble of transformed gallery embeddings and its uncertainty.

With L2-normalised e_1..e_N and S = Σ e_i:
    Σ_{i<j} ‖e_i − e_j‖² = N² − ‖S‖²      (since ‖e_i‖ = 1)
so the mean pairwise squared distance is (N² − ‖S‖²) / (N(N−1)/2). Only S and N are stored, which
lets a model be added to a live ensemble without touching the other models.
"""

from __future__ import annotations

import numpy as np


def normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def uncertainty_from_sum(running_sum: np.ndarray, n_models: int) -> np.ndarray:
    """Mean pairwise squared distance of the N unit vectors whose sum is `running_sum` (0 when N < 2)."""
    if n_models < 2:
        return np.zeros(len(running_sum), dtype=np.float32)
    sq = np.einsum("ij,ij->i", running_sum.astype(np.float64), running_sum.astype(np.float64))
    pairs = n_models * (n_models - 1) / 2
    # clip tiny negatives from rounding when all members agree
    return np.clip((n_models**2 - sq) / pairs, 0.0, None).astype(np.float32)


def pairwise_uncertainty(members: np.ndarray) -> np.ndarray:
    """Direct form: mean over i<j of ‖e_i − e_j‖² for members of shape (N, items, dim)."""
    n = members.shape[0]
    if n < 2:
        return np.zeros(members.shape[1], dtype=np.float32)
    total = np.zeros(members.shape[1], dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            total += ((members[i].astype(np.float64) - members[j]) ** 2).sum(-1)
    return (total / (n * (n - 1) / 2)).astype(np.float32)


class RunningEnsemble:
    """Accumulates normalised member embeddings; gives the ensemble embedding and uncertainty."""

    def __init__(self, running_sum: np.ndarray | None = None, n_models: int = 0):
        self.sum = None if running_sum is None else np.asarray(running_sum, dtype=np.float64)
        self.n_models = n_models

    def add(self, member: np.ndarray) -> None:
        member = normalize(member).astype(np.float64)
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
        """The searched embedding: the normalised mean (cosine search)."""
        return normalize(self._require())

    @property
    def uncertainty(self) -> np.ndarray:
        return uncertainty_from_sum(self._require(), self.n_models)
