import numpy as np
import pytest

from cmce.method import RunningEnsemble, normalize, uncertainty_from_sum
from tests.dense_oracle import pairwise_uncertainty


def _members(n: int, items: int = 50, dim: int = 8, seed: int = 0) -> np.ndarray:
    return normalize(np.random.default_rng(seed).normal(size=(n, items, dim)))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_running_sum_uncertainty_equals_direct_pairwise(n):
    members = _members(n)
    ens = RunningEnsemble()
    for m in members:
        ens.add(m)
    np.testing.assert_allclose(ens.uncertainty, pairwise_uncertainty(members), rtol=1e-5, atol=1e-6)


def test_incremental_equals_all_at_once():
    members = _members(4, seed=1)
    first = RunningEnsemble()
    for m in members[:2]:
        first.add(m)
    # resume from the stored running sum, as a live gallery would
    resumed = RunningEnsemble(first.sum.astype(np.float32), first.n_models)
    for m in members[2:]:
        resumed.add(m)
    direct = RunningEnsemble()
    for m in members:
        direct.add(m)
    np.testing.assert_allclose(resumed.embedding, direct.embedding, atol=1e-6)
    np.testing.assert_allclose(resumed.uncertainty, direct.uncertainty, atol=1e-5)


def test_mean_and_embedding():
    members = _members(3, seed=2)
    ens = RunningEnsemble()
    for m in members:
        ens.add(m)
    np.testing.assert_allclose(ens.mean, members.mean(0), atol=1e-6)
    np.testing.assert_allclose(ens.embedding, normalize(members.mean(0)), atol=1e-6)


def test_known_values():
    e = np.array([[1.0, 0.0]])
    assert uncertainty_from_sum(e, 1).tolist() == [0.0]  # one member: no disagreement defined
    assert uncertainty_from_sum(2 * e, 2).tolist() == [0.0]  # identical members
    assert uncertainty_from_sum(e - e, 2).tolist() == [4.0]  # antipodal members: ‖e − (−e)‖² = 4
    # unnormalised input is normalised on the way in
    ens = RunningEnsemble()
    ens.add(np.array([[3.0, 0.0]]))
    ens.add(np.array([[0.0, 5.0]]))
    assert ens.uncertainty[0] == pytest.approx(2.0)


def test_shape_mismatch_is_refused():
    ens = RunningEnsemble()
    ens.add(np.ones((3, 4)))
    with pytest.raises(ValueError, match="does not match"):
        ens.add(np.ones((3, 5)))
    with pytest.raises(ValueError, match="empty ensemble"):
        _ = RunningEnsemble().embedding


def test_normalize_keeps_the_direction_of_huge_rows_and_refuses_rows_without_one():
    x = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
    huge = x * np.float32(1e30)  # a float32 sum of its squares overflows to inf
    assert np.allclose(normalize(huge), normalize(x), atol=1e-6)
    assert np.allclose(np.linalg.norm(normalize(x), axis=1), 1.0, atol=1e-6)
    for bad, message in ((np.zeros(16), "row 3 is all zeros"), (np.full(16, np.nan), "row 3 is not finite"),
                         (np.full(16, 3e38), "row 3 is not finite")):
        y = x.copy()
        y[3] = bad
        with pytest.raises(ValueError, match=f"g.parquet: {message}"):
            normalize(y, "g.parquet")
