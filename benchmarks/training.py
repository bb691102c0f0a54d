"""Training-loop throughput: images/s of every architecture of a config in the cmce training loop
(cmce.train.run_epochs, as `cmce train` runs it) against a bare torch loop over device-resident tensors,
on one device, in one run.

    python -m benchmarks.training [--config params.yaml] [--images 2048] [--epochs 2] [--repeats 5]
                                  [--device auto] [--no-write]

Both loops train the same model from the same weights on the same random images at the config's size: the
config's batch size, AdamW, the cosine-softmax loss, the same augmentation when the config augments
(mirroring only with data.hflip), and on CUDA bf16 autocast with channels_last when the config asks for
mixed precision. The bare loop is what a careful hand-written loop does: the split on the device, one
permutation per epoch, no schedule, no progress bar, no per-epoch bookkeeping. So the ratio is what the
cmce loop's machinery costs. Each repeat runs both loops back to back in alternating order; the table
gives medians of images/s and of the paired ratios. Writes its section of BENCHMARKS.md (one current
section, replaced).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.args import config_or_error, device_or_error, positive_int
from benchmarks.report import add_config_options, config_shown, write_section
from cmce import device as devices
from cmce.config import ModelSpec, TrainConfig
from cmce.data.augment import augment
from cmce.data.codec import to_float
from cmce.data.readers import SplitArrays
from cmce.models import CosineClassifier, EmbeddingNet, count_parameters
from cmce.train import run_epochs

CLASSES = 10


def make_model(spec: ModelSpec, channels: int) -> nn.Module:
    torch.manual_seed(spec.seed)
    return nn.Sequential(EmbeddingNet(spec.arch, channels, spec.embedding_dim, spec.width, load_pretrained=False),
                         CosineClassifier(spec.embedding_dim, CLASSES, 16.0))


def loss_of(forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = forward(x)
    return F.cross_entropy(logits, y, label_smoothing=0.1), (logits.argmax(1) == y).float().mean()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, epochs: int,
              device: torch.device, hflip: bool) -> float:
    """Seconds for `epochs` epochs of a plain loop over tensors already on `device`."""
    fast = device.type == "cuda" and cfg.mixed_precision
    layout = torch.channels_last if fast else torch.contiguous_format
    started = time.perf_counter()
    model.to(device, memory_format=layout).train()
    x_all, y_all = images.to(device), labels.to(device)
    gen = torch.Generator(device).manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(images) // cfg.batch_size
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen, device=device)
        for s in range(steps):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            x = augment(x_all[idx], gen, hflip=hflip) if cfg.augment else x_all[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                loss, _ = loss_of(model, to_float(x).contiguous(memory_format=layout), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync(device)
    return time.perf_counter() - started


def cmce_loop(model: nn.Module, data: SplitArrays, cfg: TrainConfig, epochs: int, device: torch.device,
              hflip: bool) -> float:
    started = time.perf_counter()
    run_epochs(model, data, loss_of, cfg, epochs, seed=0, desc="bench", hflip=hflip)
    sync(device)
    return time.perf_counter() - started


def measure(cfg, images: int, epochs: int, repeats: int, device: torch.device) -> list[str]:
    rng = np.random.default_rng(0)
    size, channels = cfg.data.image_size, cfg.data.channels
    data = SplitArrays([f"x{i}" for i in range(images)], rng.integers(0, CLASSES, images),
                       torch.from_numpy(rng.integers(0, 256, (images, channels, size, size), dtype=np.uint8)))
    labels = torch.from_numpy(data.labels)
    seen = images // cfg.train.batch_size * cfg.train.batch_size * epochs
    rows = ["| model | parameters | bare loop, images/s | cmce loop, images/s | cmce / bare (median of paired "
            "ratios) | paired ratios (min–max) |", "|---|---|---|---|---|---|"]
    specs = [cfg.query_model, *cfg.gallery_models]
    for spec in specs:
        # warm-up: the first steps of each loop create kernels and allocator pools
        bare_loop(make_model(spec, channels), data.images[: 2 * cfg.train.batch_size],
                  labels[: 2 * cfg.train.batch_size], cfg.train, 1, device, cfg.data.hflip)
        cmce_loop(make_model(spec, channels), SplitArrays(data.ids[: 2 * cfg.train.batch_size],
                                                          data.labels[: 2 * cfg.train.batch_size],
                                                          data.images[: 2 * cfg.train.batch_size]),
                  cfg.train, 1, device, cfg.data.hflip)
        bare, ours = [], []
        for r in range(repeats):
            for side in (("bare", "cmce") if r % 2 == 0 else ("cmce", "bare")):
                model = make_model(spec, channels)
                if side == "bare":
                    bare.append(seen / bare_loop(model, data.images, labels, cfg.train, epochs, device, cfg.data.hflip))
                else:
                    ours.append(seen / cmce_loop(model, data, cfg.train, epochs, device, cfg.data.hflip))
        ratios = [o / b for o, b in zip(ours, bare, strict=True)]
        params = count_parameters(make_model(spec, channels))
        rows.append(f"| {spec.name} ({spec.arch}, width {spec.width}) | {params:,} | {statistics.median(bare):,.0f} | "
                    f"{statistics.median(ours):,.0f} | {statistics.median(ratios):.2f} | "
                    f"{min(ratios):.2f}–{max(ratios):.2f} |")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p)
    p.add_argument("--images", type=positive_int, default=2048,
                   help="training images (random, at the config's size; at least one batch)")
    p.add_argument("--epochs", type=positive_int, default=2, help="epochs per timed run")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--device", choices=devices.CHOICES, default="auto")
    p.add_argument("--no-write", action="store_true", help="print only, do not write BENCHMARKS.md")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = config_or_error(p, args.config, sets=args.set)
    if args.images < cfg.train.batch_size:  # the loops drop the last partial batch: no step would be timed
        p.error(f"--images {args.images} is less than one batch (train.batch_size {cfg.train.batch_size})")
    device = device_or_error(p, args.device)
    started = time.time()
    augmentation = ("on, mirroring too" if cfg.data.hflip else "on, no mirroring") if cfg.train.augment else "off"
    body = [f"Config `{config_shown(args.config)}`: {cfg.data.image_size}×{cfg.data.image_size}×{cfg.data.channels} "
            f"random images, {args.images:,} a run, {args.epochs} epochs, batch {cfg.train.batch_size}, augmentation "
            f"{augmentation}, device {devices.describe(device)}"
            + (f", mixed precision {'on' if cfg.train.mixed_precision else 'off'}" if device.type == "cuda" else "")
            + f". Median of {args.repeats} paired repeats.", ""]
    body += measure(cfg, args.images, args.epochs, args.repeats, device)
    command = "python -m benchmarks.training" + "".join(
        f" --{k} {v}" for k, v in vars(args).items() if k in ("images", "epochs", "repeats", "device")
        and v != p.get_default(k)) + ("" if args.config == p.get_default("config") else
                                      f" --config {config_shown(args.config)}") + "".join(
        f" --set {shlex.quote(s)}" for s in args.set)
    title = f"Training loop throughput ({device.type})"
    if args.no_write:
        sys.stdout.write("\n".join(body) + "\n")
    else:
        write_section(title, command, body, time.time() - started)


if __name__ == "__main__":
    main()
