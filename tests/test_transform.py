import numpy as np
import pytest
import torch

from cmce.checkpoint import CheckpointError
from cmce.config import TransformConfig
from cmce.method import normalize
from cmce.transform import Transformation, fit_transformation, load_transformation, save_transformation
from tests.conftest import SMOKE


def test_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 8)).astype(np.float32)
    g_train = rng.normal(size=(3000, 16)).astype(np.float32)
    g_test = rng.normal(size=(500, 16)).astype(np.float32)
    cfg = TransformConfig(hidden_dim=0, depth=1, lam=0.0, epochs=60, batch_size=256, lr=1e-2)
    mlp, history = fit_transformation(g_train, g_train @ a, np.zeros(3000, int), torch.zeros(1, 8), cfg,
                                      query_scale=16.0)
    assert history[-1]["loss"] < history[0]["loss"]
    with torch.no_grad():
        pred = normalize(mlp(torch.from_numpy(g_test)).numpy())
    cos = (pred * normalize(g_test @ a)).sum(1)
    assert cos.mean() > 0.995 and cos.min() > 0.95


def test_cross_entropy_term_uses_frozen_query_classifier():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 600)
    w = torch.eye(3, 4)  # class c points along axis c
    g = rng.normal(size=(600, 6)).astype(np.float32) + 3 * np.eye(3, 6)[labels]
    q = rng.normal(size=(600, 4)).astype(np.float32)  # uninformative alignment target
    cfg = TransformConfig(hidden_dim=32, depth=2, lam=5.0, epochs=40, batch_size=128)
    mlp, _ = fit_transformation(g, q, labels, w, cfg, query_scale=16.0)
    with torch.no_grad():
        out = mlp(torch.from_numpy(g.astype(np.float32))).numpy()
    assert (out[:, :3].argmax(1) == labels).mean() > 0.9
    assert torch.equal(w, torch.eye(3, 4))  # classifier not modified


def test_the_cross_entropy_temperature_is_the_query_classifiers_own_unless_set(monkeypatch):
    """transform.scale was 16 whatever the query classifier was trained with: train.scale 8 alone changed the loss
    the method specifies (s·n(T(g))·n(W_q)ᵀ is the frozen classifier's own scoring)."""
    from cmce import transform

    seen = []

    def spy(pred, target, labels, weight, lam, scale):
        seen.append(scale)
        return real(pred, target, labels, weight, lam, scale)

    real = transform.transformation_loss
    monkeypatch.setattr(transform, "transformation_loss", spy)
    g, q = np.ones((8, 4), np.float32), np.ones((8, 3), np.float32)
    for cfg_scale, query_scale, used in ((None, 8.0, 8.0), (None, 30.0, 30.0), (4.0, 8.0, 4.0)):
        seen.clear()
        fit_transformation(g, q, np.zeros(8, int), torch.eye(1, 3), TransformConfig(epochs=1, batch_size=8,
                                                                                     scale=cfg_scale),
                           query_scale=query_scale)
        assert seen and set(seen) == {used}


def test_nan_inputs_are_refused():
    g = np.ones((4, 3), np.float32)
    g[2, 1] = np.nan
    with pytest.raises(ValueError, match="gallery embeddings contain NaN"):
        fit_transformation(g, np.ones((4, 2), np.float32), np.zeros(4, int), torch.zeros(1, 2), TransformConfig(),
                           query_scale=16.0)


def test_checkpoint_round_trip_and_model_checks(tmp_path):
    mlp, _ = fit_transformation(
        np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32),
        np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32),
        np.zeros(64, int), torch.zeros(1, 3), TransformConfig(hidden_dim=8, epochs=2, batch_size=32),
        query_scale=16.0,
    )
    gsha, qsha = "a" * 64, "b" * 64  # a file's sha256: what the loader accepts
    t = Transformation(mlp, "g", gsha, qsha, 5, 3, 8, 2)
    path = tmp_path / "t.pt"
    save_transformation(t, path)
    loaded = load_transformation(path, query_sha256=qsha, gallery_sha256=gsha)
    x = np.random.default_rng(2).normal(size=(10, 5)).astype(np.float32)
    np.testing.assert_allclose(loaded.apply(x), t.apply(x), atol=1e-6)
    with pytest.raises(CheckpointError, match="fitted for query model"):
        load_transformation(path, query_sha256="other")
    with pytest.raises(CheckpointError, match="fitted for gallery model"):
        load_transformation(path, gallery_sha256="other")
    with pytest.raises(ValueError, match="expects embeddings of dim 5"):
        loaded.apply(np.zeros((2, 4), np.float32))


def test_fit_transform_step_adds_augmented_views_to_the_fitting_pairs(smoke_run, tmp_path, monkeypatch):
    from cmce import stages
    from cmce.config import load_config
    from cmce.data.readers import load_split

    lay, _ = smoke_run
    seen = []
    real = stages.fit_transformation

    def spy(g, q, y, *args, **kwargs):
        seen.append((len(g), len(q), len(y)))
        return real(g, q, y, *args, **kwargs)

    monkeypatch.setattr(stages, "fit_transformation", spy)
    n = len(load_split(lay.dataset, "train", 1, 8).ids)
    for views in (0, 2):
        cfg = load_config(SMOKE, {"transform.augment_views": views, "transform.epochs": 1})
        stages.fit_transform(cfg, stages.FitInputs(lay.dataset, lay.model("query"), lay.model(lay.gallery_names[0])),
                             stages.FitOutputs(tmp_path / f"T{views}.pt"))
    assert seen == [(n, n, n), (3 * n, 3 * n, 3 * n)]


def test_a_batch_of_one_row_is_refused_before_fitting_hidden_layers(tmp_path):
    """`transform.batch_size=1` (or one training pair) failed deep in BatchNorm, after the embedding work:
    "Expected more than 1 value per channel when training", naming no key."""
    from cmce.config import ConfigError, load_config

    rng = np.random.default_rng(0)
    g, q = rng.normal(size=(1, 8)).astype(np.float32), rng.normal(size=(1, 4)).astype(np.float32)
    one_row = r"^transform.batch_size 64: 1 row\(s\) a step .* \(transform.depth 2\) normalise"
    with pytest.raises(ValueError, match=one_row):
        fit_transformation(g, q, np.zeros(1, np.int64), torch.zeros(3, 4), TransformConfig(batch_size=64, depth=2),
                           query_scale=16.0)
    mlp, _ = fit_transformation(g, q, np.zeros(1, np.int64), torch.zeros(3, 4), TransformConfig(depth=1, epochs=1),
                                query_scale=16.0)
    assert mlp is not None  # a linear map has no batch statistics: one row fits
    with pytest.raises(ConfigError, match=r"transform.batch_size 1: the hidden layers \(transform.depth 2\)"):
        load_config(SMOKE, {"transform.batch_size": 1})
