"""The device-ready training loops, on the CPU, compute exactly what the plain loops they replaced did:
the same weights, bit for bit, and the same per-epoch history for a fixed seed. The references below
are those plain loops (a host read of the loss every step, augmentation with boolean indexing), kept
as they were."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cmce.config import TrainConfig, TransformConfig
from cmce.data.augment import augment
from cmce.data.codec import to_float
from cmce.data.readers import SplitArrays
from cmce.feed import BatchFeed
from cmce.method import transformation_loss
from cmce.models import CosineClassifier, EmbeddingNet
from cmce.train import _schedule, run_epochs
from cmce.transform import build_mlp, fit_transformation


def plain_augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    n, c, h, w = images.shape
    dy = torch.randint(-pad, pad + 1, (n, 1), generator=generator)
    dx = torch.randint(-pad, pad + 1, (n, 1), generator=generator)
    rows = (torch.arange(h)[None] + dy).clamp_(0, h - 1).view(n, 1, h, 1)
    cols = (torch.arange(w)[None] + dx).clamp_(0, w - 1)
    flip = torch.rand(n, generator=generator) < 0.5
    cols[flip] = cols[flip].flip(-1)
    batch = torch.arange(n).view(n, 1, 1, 1)
    chan = torch.arange(c).view(1, c, 1, 1)
    return images[batch, chan, rows, cols.view(n, 1, 1, w)]


def plain_loop(model, images, labels, step_loss, cfg: TrainConfig, epochs: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    steps = max(1, n // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps * epochs, cfg.warmup_fraction))
    labels = torch.from_numpy(labels)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        total, metric_sum = 0.0, 0.0
        for step in range(steps):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = images[idx]
            if cfg.augment:
                x = plain_augment(x, gen)
            loss, metric = step_loss(model, to_float(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            metric_sum += float(metric)
        history.append({"epoch": epoch + 1, "loss": total / steps, "metric": metric_sum / steps})
    model.eval()
    return history


def classification_loss(forward, x, y):
    logits = forward(x)
    return F.cross_entropy(logits, y, label_smoothing=0.1), (logits.argmax(1) == y).float().mean()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("augmented", [True, False])
def test_the_embedding_loop_on_the_cpu_equals_the_plain_loop_bit_for_bit(augmented):
    torch.manual_seed(0)
    model = nn.Sequential(EmbeddingNet("query_cnn", 1, 16, 8), CosineClassifier(16, 5, 16.0))
    reference = copy.deepcopy(model)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (70, 1, 8, 8), dtype=np.uint8))
    labels = rng.integers(0, 5, 70)
    cfg = TrainConfig(epochs=2, batch_size=16, augment=augmented)
    history = run_epochs(model, SplitArrays([str(i) for i in range(70)], labels, images), classification_loss, cfg,
                         2, seed=3, desc="test")
    expected = plain_loop(reference, images, labels, classification_loss, cfg, 2, seed=3)
    assert same_weights(model, reference)
    assert history == expected


def plain_fit(g, q, y, w, cfg: TransformConfig, seed: int):
    torch.manual_seed(seed)
    g, q, y = torch.from_numpy(g), torch.from_numpy(q), torch.as_tensor(y)
    mlp = build_mlp(g.shape[1], q.shape[1], cfg.hidden_dim, cfg.depth)
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, len(g) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(cfg.epochs):
        mlp.train()
        order = torch.randperm(len(g), generator=gen)
        sums = np.zeros(3)
        for s in range(steps):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            x = g[idx]
            if cfg.input_dropout:
                keep = torch.rand((len(idx), g.shape[1]), generator=gen) >= cfg.input_dropout
                x = x * keep / (1.0 - cfg.input_dropout)
            loss, align, ce = transformation_loss(mlp(x), q[idx], y[idx], w, cfg.lam, cfg.scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums += [loss.item(), align.item(), ce.item()]
        history.append({"epoch": epoch + 1, **dict(zip(("loss", "align", "ce"), (sums / steps).tolist(), strict=True))})
    mlp.eval()
    return mlp, history


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_the_transformation_fit_on_the_cpu_equals_the_plain_loop_bit_for_bit(dropout):
    rng = np.random.default_rng(1)
    g = rng.normal(size=(90, 12)).astype(np.float32)
    q = rng.normal(size=(90, 6)).astype(np.float32)
    y = rng.integers(0, 4, 90)
    w = torch.from_numpy(rng.normal(size=(4, 6)).astype(np.float32))
    cfg = TransformConfig(hidden_dim=16, depth=2, epochs=3, batch_size=32, input_dropout=dropout, scale=16.0)
    mlp, history = fit_transformation(g, q, y, w, cfg, seed=5, query_scale=16.0)
    reference, expected = plain_fit(g, q, y, w, cfg, seed=5)
    assert same_weights(mlp, reference)
    assert history == expected


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7), st.integers(0, 3),
       st.integers(0, 2**31 - 1))
def test_augmentation_draws_and_moves_exactly_as_before(n, c, h, w, pad, seed):
    images = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8))
    a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert torch.equal(augment(images, a, pad), plain_augment(images, b, pad))
    assert a.get_state().equal(b.get_state())  # the same draws, so later steps stay in step


def test_the_cpu_feed_gathers_each_step_from_the_split_in_memory():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    labels = torch.arange(10) * 10
    feed = BatchFeed(images, labels, torch.device("cpu"), budget_gb=0.0)  # the budget only matters on CUDA
    assert feed.resident
    order = torch.tensor([3, 1, 4, 0, 9, 2, 6, 5, 8, 7])
    batches = list(feed.epoch(order, steps=3, batch_size=3))
    assert [x.view(-1).tolist() for x, _ in batches] == [[3, 1, 4], [0, 9, 2], [6, 5, 8]]
    assert [y.tolist() for _, y in batches] == [[30, 10, 40], [0, 90, 20], [60, 50, 80]]


def test_device_resident_data_is_what_fits_the_budget():
    from cmce.feed import fits_on_device

    assert fits_on_device(torch.device("cpu"), nbytes=10**12, budget_gb=0.0)  # memory is where it already is
    assert fits_on_device(torch.device("cuda", 0), nbytes=2**30, budget_gb=1.0)
    assert not fits_on_device(torch.device("cuda", 0), nbytes=2**30 + 1, budget_gb=1.0)
    assert math.isclose(TrainConfig().device_data_gb, 4.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 7), st.integers(2, 7), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_without_hflip_augmentation_only_shifts(n, h, w, pad, seed):
    """data.hflip false (a mirror image is another class): every augmented image is its original shifted, never
    mirrored; the draws are the shifts alone."""
    images = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 1, h, w), dtype=np.uint8))
    gen = torch.Generator().manual_seed(seed)
    out = augment(images, gen, pad, hflip=False)
    shifts = torch.Generator().manual_seed(seed)
    dy = torch.randint(-pad, pad + 1, (n, 1), generator=shifts)
    dx = torch.randint(-pad, pad + 1, (n, 1), generator=shifts)
    rows = (torch.arange(h)[None] + dy).clamp_(0, h - 1)
    cols = (torch.arange(w)[None] + dx).clamp_(0, w - 1)
    for i in range(n):
        assert torch.equal(out[i, 0], images[i, 0][rows[i]][:, cols[i]])
    assert gen.get_state().equal(shifts.get_state())


def test_data_hflip_reaches_the_training_loop(monkeypatch, tmp_path):
    """The switch is read where images are augmented: the query, gallery and KD loops all go through run_epochs."""
    from cmce import train
    from cmce.config import DataConfig, ModelSpec
    from cmce.data.prepare import prepare_dataset

    dataset = prepare_dataset(DataConfig(source="digits", image_size=8, max_train_per_class=4), tmp_path / "d.parquet")
    seen = []

    def spy(images, generator, pad=2, hflip=True):
        seen.append(hflip)
        return augment(images, generator, pad, hflip)

    monkeypatch.setattr(train, "augment", spy)
    cfg = TrainConfig(epochs=1, batch_size=16)
    for hflip in (False, True):
        data_cfg = DataConfig(image_size=8, hflip=hflip)
        teacher = tmp_path / f"g{hflip}.pt"
        train.train_embedding_model(dataset, ModelSpec(width=4, embedding_dim=8), data_cfg, cfg, teacher, "gallery")
        assert seen and set(seen) == {hflip}  # each loop augments, each with the switch
        seen.clear()
        train.train_distilled_student(dataset, teacher, ModelSpec(width=4), data_cfg, cfg, tmp_path / f"kd{hflip}.pt")
        assert seen and set(seen) == {hflip}
        seen.clear()


def test_a_model_trained_on_a_fraction_of_the_split_has_a_classifier_row_for_every_label_of_the_split(smoke_run,
                                                                                                      tmp_path):
    """The classifier was sized by the labels the fraction kept: without label 9, 9 rows, and fit-transform then
    refused the query model on its own dataset as one 'of another dataset'."""
    from cmce.checkpoint import load_embedding_model
    from cmce.cli import main
    from cmce.data.readers import load_split
    from cmce.train import subset
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    split = load_split(lay.dataset, "train", 1, 8)
    fraction = next(f for f in (0.004, 0.005, 0.006, 0.008, 0.01, 0.015, 0.02)
                    if len(np.unique(labels := subset(split, f, 0).labels)) >= 2 and labels.max() < split.labels.max())
    out = tmp_path / "q.pt"
    assert main(["--threads", "1", "train", "--config", str(SMOKE), "--set", "train.epochs=1", "--set",
                 f"query_model.data_fraction={fraction}", "--set", "query_model.seed=0", "--dataset",
                 str(lay.dataset), "--model", "query", "--out", str(out)]) == 0
    assert load_embedding_model(out).classifier.shape[0] == int(split.labels.max()) + 1
    assert main(["--threads", "1", "fit-transform", "--config", str(SMOKE), "--set", "transform.epochs=1",
                 "--dataset", str(lay.dataset), "--query-model", str(out), "--gallery-model",
                 str(lay.model(lay.gallery_names[0])), "--out", str(tmp_path / "t.pt")]) == 0
