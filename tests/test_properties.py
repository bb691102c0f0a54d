"""Property-based tests (hypothesis): the metrics against a brute-force reference written from the
definitions in metrics.py's docstring, their invariances and bounds, the running-sum uncertainty, and
the Parquet round trip of the embedding tables. Example counts are kept small so the file runs in seconds."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cmce.config import ConfigError, check_model_name
from cmce.embed import combine_members, member_metadata, member_schema, member_table
from cmce.method import normalize, uncertainty_from_sum
from cmce.metrics import retrieval_metrics
from cmce.tables import (
    embedding_array,
    embedding_column,
    int_column,
    read_metadata,
    read_table,
    string_column,
    with_metadata,
    write_table,
)
from tests.dense_oracle import pairwise_uncertainty

KS = [1, 2, 3, 5]
FARS = [0.0, 0.1, 0.25, 0.5, 1.0]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- brute-force reference
def reference_metrics(scores: np.ndarray, ql: np.ndarray, gl: np.ndarray) -> dict[str, float]:
    """Loops over queries and candidate thresholds; nothing shared with metrics.py."""
    recalls: dict[int, list[float]] = {k: [] for k in KS}
    aps, lone = [], 0
    for i in range(len(ql)):
        allowed = [j for j in range(len(gl)) if math.isfinite(scores[i, j])]
        # descending score, ties by lower column (the documented order)
        ranked = sorted(allowed, key=lambda j: (-scores[i, j], j))
        rel = [gl[j] == ql[i] for j in ranked]
        r = sum(rel)
        if r == 0:
            lone += 1
            continue
        for k in KS:
            recalls[k].append(float(any(rel[:k])))
        hits, ap = 0, 0.0
        for rank, is_rel in enumerate(rel[:r], start=1):
            if is_rel:
                hits += 1
                ap += hits / rank
        aps.append(ap / r)
    out = {f"R@{k}": float(np.mean(v)) if v else math.nan for k, v in recalls.items()}
    out["MAP@R"] = float(np.mean(aps)) if aps else math.nan
    genuine, impostor = [], []
    for i in range(len(ql)):
        for j in range(len(gl)):
            if math.isfinite(scores[i, j]):
                (genuine if gl[j] == ql[i] else impostor).append(scores[i, j])
    for far in FARS:
        allowed_fa = math.floor(far * len(impostor))
        # the lowest threshold (accept: score > t) that accepts at most floor(FAR·#impostors) impostors
        candidates = sorted({-math.inf, *genuine, *impostor})
        t = next(c for c in candidates if sum(s > c for s in impostor) <= allowed_fa)
        out[f"TAR@FAR={far:g}"] = float(np.mean([s > t for s in genuine])) if genuine else math.nan
    out["lone_queries"] = float(lone)
    return out


@st.composite
def problems(draw, distinct: bool = False):
    """A score matrix with excluded pairs (-inf) and few labels; few score values, hence many ties,
    unless `distinct`."""
    q, g = draw(st.integers(1, 7)), draw(st.integers(1, 10))
    n_labels = draw(st.integers(1, 3))
    if distinct:
        values = np.array(draw(st.permutations(range(q * g))), dtype=np.float64).reshape(q, g)
    else:
        values = draw(arrays(np.float64, (q, g), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0])))
    excluded = draw(arrays(np.bool_, (q, g))) & draw(arrays(np.bool_, (q, g)))  # about a quarter of the pairs
    scores = np.where(excluded, -np.inf, values)
    ql = draw(arrays(np.int64, q, elements=st.integers(0, n_labels - 1)))
    gl = draw(arrays(np.int64, g, elements=st.integers(0, n_labels - 1)))
    return scores, ql, gl


def metrics(scores, ql, gl):
    return retrieval_metrics(scores, ql, gl, ks=KS, fars=FARS)


# ---------------------------------------------------------------- metrics
@FAST
@given(problems())
def test_metrics_equal_the_brute_force_reference(problem):
    scores, ql, gl = problem
    assert metrics(scores, ql, gl) == pytest.approx(reference_metrics(scores, ql, gl), nan_ok=True)


@FAST
@given(problems())
def test_bounds_and_monotonicity(problem):
    m = metrics(*problem)
    values = [m[k] for k in m if k != "lone_queries"]
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in values)
    recall = [m[f"R@{k}"] for k in KS]
    if not math.isnan(recall[0]):
        assert recall == sorted(recall)  # R@K never decreases with K
    tar = [m[f"TAR@FAR={f:g}"] for f in FARS]
    if not math.isnan(tar[0]):
        assert tar == sorted(tar)  # accepting more impostors never accepts fewer genuine pairs
        assert tar[-1] == 1.0  # FAR = 1: every pair accepted


@FAST
@given(problems(distinct=True), st.randoms(use_true_random=False))
def test_gallery_order_does_not_matter_without_ties(problem, rnd):
    scores, ql, gl = problem
    perm = np.array(rnd.sample(range(len(gl)), len(gl)))
    assert metrics(scores[:, perm], ql, gl[perm]) == pytest.approx(metrics(scores, ql, gl), nan_ok=True)


@FAST
@given(problems(), st.randoms(use_true_random=False))
def test_query_order_never_matters_and_gallery_order_not_for_tar(problem, rnd):
    """With ties, the gallery order decides rankings (documented) but never the verification metric."""
    scores, ql, gl = problem
    rows = np.array(rnd.sample(range(len(ql)), len(ql)))
    assert metrics(scores[rows], ql[rows], gl) == pytest.approx(metrics(scores, ql, gl), nan_ok=True)
    cols = np.array(rnd.sample(range(len(gl)), len(gl)))
    permuted = metrics(scores[:, cols], ql, gl[cols])
    original = metrics(scores, ql, gl)
    for far in FARS:
        assert permuted[f"TAR@FAR={far:g}"] == pytest.approx(original[f"TAR@FAR={far:g}"], nan_ok=True)


@FAST
@given(
    st.lists(st.integers(0, 3), min_size=2, max_size=12),
    st.integers(0, 2**32 - 1),
)
def test_a_perfect_ranking_scores_one(labels, seed):
    """Every same-label item scored above every other item: MAP@R = R@K = TAR = 1 (lone queries aside)."""
    labels = np.array(labels)
    rng = np.random.default_rng(seed)
    same = labels[:, None] == labels[None, :]
    scores = np.where(same, 2.0 + rng.random(same.shape), rng.random(same.shape))
    np.fill_diagonal(scores, -np.inf)  # leave-one-out
    m = metrics(scores, labels, labels)
    lone = int(sum((labels == c).sum() == 1 for c in labels))
    assert m["lone_queries"] == lone
    if lone < len(labels):
        assert m["MAP@R"] == 1.0 and all(m[f"R@{k}"] == 1.0 for k in KS)
        assert all(m[f"TAR@FAR={f:g}"] == 1.0 for f in FARS)


# ---------------------------------------------------------------- ensemble
@FAST
@given(st.integers(2, 5), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_running_sum_uncertainty_equals_pairwise(n_models, items, dim, seed):
    members = normalize(np.random.default_rng(seed).normal(size=(n_models, items, dim)))
    np.testing.assert_allclose(uncertainty_from_sum(members.sum(0), n_models), pairwise_uncertainty(members),
                               atol=1e-5)


# ---------------------------------------------------------------- Parquet round trip
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def embedding_tables(draw, transformed_elements=finite32):
    rows = draw(st.integers(0, 12))
    ids = draw(st.lists(st.text(max_size=10), min_size=rows, max_size=rows, unique=True))
    labels = draw(arrays(np.int32, rows, elements=st.integers(-(2**31), 2**31 - 1)))
    raw = draw(arrays(np.float32, (rows, draw(st.integers(1, 5))), elements=finite32))
    transformed = draw(arrays(np.float32, (rows, draw(st.integers(1, 5))), elements=transformed_elements))
    meta = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=4))
    return ids, labels, raw, transformed, meta, draw(st.integers(1, 5))


@FAST
@given(embedding_tables())
def test_embedding_table_round_trip_is_exact(tmp_path, table_parts):
    ids, labels, raw, transformed, meta, row_group = table_parts
    table = pa.table({"id": pa.array(ids, pa.string()), "label": pa.array(labels, pa.int32()),
                      "raw": embedding_array(raw), "transformed": embedding_array(transformed)})
    path = write_table(with_metadata(table, meta), tmp_path / "t.parquet", row_group_size=row_group)
    back = read_table(path)
    assert string_column(back, "id", "t") == ids
    assert int_column(back, "label", "t").tolist() == labels.tolist()
    # bit for bit, -0.0 and subnormals included
    assert embedding_column(back, "raw", "t", raw.shape[1]).tobytes() == raw.tobytes()
    assert embedding_column(back, "transformed", "t", transformed.shape[1]).tobytes() == transformed.tobytes()
    assert read_metadata(path) == meta


def _is_model_name(name: str) -> bool:
    try:
        return check_model_name(name, "name") == name
    except ConfigError:
        return False


# names a config accepts: the regex alone also made '0E0', which YAML 1.2 reads as a number and the metadata refuses
MODEL_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,7}", fullmatch=True).filter(_is_model_name)


@FAST
# transformed rows as T writes them: of sane norm (normalising a 1e-16 or 1e38 vector is not at stake here)
@given(embedding_tables(st.floats(0.25, 1.0, width=32)), MODEL_NAMES)
def test_member_file_round_trip_through_combine(tmp_path, table_parts, name):
    """A per-model file written with the project's schema helpers reads back exactly, and a one-member
    gallery built from it keeps ids, labels, raw embeddings and versions, with the transformed rows
    normalised as the ensemble embedding."""
    ids, labels, raw, transformed, _, row_group = table_parts
    if not ids:
        return
    meta = member_metadata(name, "resnet", "a" * 64, "b" * 64, "c" * 64, "test")
    path = tmp_path / "member.parquet"
    pq.write_table(member_table(ids, labels, raw, transformed, member_schema(raw.shape[1], transformed.shape[1],
                                                                             meta)), path, row_group_size=row_group)
    back = read_table(path)
    assert string_column(back, "id", "m") == ids and int_column(back, "label", "m").tolist() == labels.tolist()
    assert embedding_column(back, "raw", "m").tobytes() == raw.tobytes()
    assert embedding_column(back, "transformed", "m").tobytes() == transformed.tobytes()
    assert read_metadata(path) == meta
    gallery = read_table(combine_members([path], tmp_path / "gallery.parquet", batch_size=row_group))
    assert string_column(gallery, "id", "g") == ids
    assert int_column(gallery, "label", "g").tolist() == labels.tolist()
    assert embedding_column(gallery, f"raw_{name}", "g").tobytes() == raw.tobytes()
    np.testing.assert_allclose(embedding_column(gallery, "embedding", "g"), normalize(transformed), atol=1e-6)
    gmeta = read_metadata(tmp_path / "gallery.parquet")
    assert gmeta["query_model_sha256"] == "c" * 64
    assert gmeta["members"] == [{"name": name, "arch": "resnet", "sha256": "a" * 64, "transformation_sha256": "b" * 64}]
