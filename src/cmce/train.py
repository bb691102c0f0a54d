"""Embedding-model training: cosine-softmax classification on the train split, and the
knowledge-distillation baseline (a query-architecture student regressing a gallery model's
normalised embedding)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cmce import device as devices
from cmce import distributed as ddp
from cmce.checkpoint import (
    CheckpointError,
    EmbeddingModel,
    load_embedding_model,
    refuse_diverged,
    require_role,
    save_embedding_model,
)
from cmce.config import ConfigError, DataConfig, ModelSpec, TrainConfig, check_model_name
from cmce.data.augment import augment
from cmce.data.codec import to_float
from cmce.data.readers import SplitArrays, dataset_info, load_split
from cmce.data.schema import DataError
from cmce.feed import BatchFeed
from cmce.models import MAX_PARAMETERS, CosineClassifier, EmbeddingNet, embedding_net_parameters, is_pretrained
from cmce.resume import Resume, file_identity

log = logging.getLogger(__name__)
History = list[dict[str, float]]


def subset(data: SplitArrays, fraction: float, seed: int) -> SplitArrays:
    if fraction >= 1.0:
        return data
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(data.ids), max(1, int(len(data.ids) * fraction)), replace=False))
    return SplitArrays([data.ids[i] for i in keep], data.labels[keep], data.images[keep])


def no_flip(data_cfg: DataConfig) -> dict[str, bool]:
    """The resume fingerprint's part for data.hflip: present only when off, so states saved before the key
    existed (always flipped) still match."""
    return {} if data_cfg.hflip else {"hflip": False}


def _schedule(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def run_epochs(
    model: nn.Module,
    data: SplitArrays,
    step_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    epochs: int,
    seed: int,
    desc: str,
    param_groups: list[dict] | None = None,
    resume: Resume | None = None,
    extra_modules: tuple[nn.Module, ...] = (),
    hflip: bool = True,
) -> History:
    """Shared optimisation loop: AdamW, warmup + cosine LR, optional augmentation, per-epoch log.

    `step_loss(forward, x, y)` computes (loss, metric) through `forward` (the model, or its
    DistributedDataParallel wrapper under torchrun), both as tensors on the device: they are summed
    there and read once per epoch, so a step never waits for the host. `cfg.batch_size` is the global
    batch: each data-parallel rank takes an equal share of it (see cmce.distributed). `param_groups`:
    optimiser groups of the model's parameters, each with its own peak "lr" (default: one group at
    cfg.lr); the schedule scales every group alike. With `resume`, the state is saved after every epoch
    and a matching saved state is continued from (cmce.resume). `extra_modules` (a frozen KD teacher)
    are moved to the device alongside the model. `hflip`: whether augmentation may mirror (data.hflip).

    Device (cmce.device): the split is fed by cmce.feed. On CUDA, augmentation draws from a seeded CUDA
    generator and, with cfg.mixed_precision, runs under bf16 autocast on channels_last tensors. On the
    CPU the loop computes exactly what it always has for a seed."""
    ctx = ddp.current()
    ddp.check_batch_size(cfg.batch_size, ctx, "train.batch_size")
    device = devices.current()
    fast = device.type == "cuda" and cfg.mixed_precision
    layout = torch.channels_last if fast else torch.contiguous_format
    for m in (model, *extra_modules):
        m.to(device, memory_format=layout)
    gen = torch.Generator().manual_seed(seed)  # the epoch order (and, on the CPU, the augmentation)
    aug_gen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    n = len(data.ids)
    steps_per_epoch = max(1, n // cfg.batch_size)
    opt = torch.optim.AdamW(param_groups or model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps_per_epoch * epochs, cfg.warmup_fraction))
    feed = BatchFeed(data.images, torch.from_numpy(data.labels), device, cfg.device_data_gb, desc)
    start, history = resume.restore(model, opt, sched, gen, desc, aug_gen, epochs) if resume else (0, [])
    forward = ddp.wrap(model, ctx)  # after restoring: DDP copies rank 0's (restored) weights to every rank
    for epoch in range(start, epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, metric
        desc_epoch = f"{desc} epoch {epoch + 1}/{epochs}"
        batches = feed.epoch(order, steps_per_epoch, cfg.batch_size)
        for x, y in tqdm(batches, total=steps_per_epoch, desc=desc_epoch, leave=False, mininterval=2,
                         disable=None if ctx.is_main else True):
            if cfg.augment:
                # the whole global batch, so the generator shared by the ranks stays in step
                x = augment(x, aug_gen, hflip=hflip)
            mine = ddp.rank_share(len(x), ctx.rank, ctx.world_size)
            inputs = to_float(x[mine]).contiguous(memory_format=layout)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                loss, metric = step_loss(forward, inputs, y[mine])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums += torch.stack([loss.detach().double(), metric.detach().double()])
        loss_sum, metric_sum = sums.tolist()  # the epoch's one read of the device
        loss_mean, metric_mean = ddp.mean_over_ranks([loss_sum / steps_per_epoch, metric_sum / steps_per_epoch], ctx)
        row = {"epoch": epoch + 1, "loss": loss_mean, "metric": metric_mean}
        history.append(row)
        refuse_diverged(row, desc)
        if ctx.is_main:
            log.info("%s epoch %d/%d loss %.4f metric %.4f", desc, epoch + 1, epochs, row["loss"], row["metric"])
        if resume:
            resume.save(model, opt, sched, gen, epoch + 1, epochs, history, aug_gen)
    ddp.sync_buffers(model, ctx)
    model.eval()
    for m in (model, *extra_modules):
        m.to("cpu", memory_format=torch.contiguous_format)
    return history


def train_embedding_model(
    dataset: str | Path,
    spec: ModelSpec,
    data_cfg: DataConfig,
    cfg: TrainConfig,
    out: str | Path,
    role: str = "embedding",
    key: str | None = None,
) -> EmbeddingModel:
    """Train one embedding model with a cosine-softmax head; save a weights-only checkpoint. `role` ("query" or
    "gallery", recorded in it) lets the steps that take one refuse the other; `key` is the spec's dotted key in
    the config (Config.model_key), which errors about its values name."""
    torch.manual_seed(spec.seed)
    split = load_split(dataset, "train", data_cfg.channels, data_cfg.image_size)
    data = subset(split, spec.data_fraction, spec.seed)
    classes = np.unique(data.labels)
    if len(classes) < 2 <= len(np.unique(split.labels)):  # the dataset has the classes: the fraction left them out
        raise ConfigError(f"{key or spec.name}.data_fraction {spec.data_fraction} keeps {len(data.ids)} of the "
                          f"{len(split.ids)} train images of {dataset}, of {len(classes)} class; training needs at "
                          "least 2 classes, so raise it")
    if len(classes) < 2:
        raise DataError(f"{dataset}: the train split needs at least 2 classes, got {len(classes)}")
    # classifier rows are indexed by the dataset label so the query head can score any train label: every label of
    # the split, not only of the data_fraction kept (a subset without the top label made a classifier fit-transform
    # then refused as "of another dataset")
    num_classes = int(split.labels.max()) + 1
    if num_classes * spec.embedding_dim > MAX_PARAMETERS:  # labels < 2^20 each, embedding_dim ≤ 65536 each
        raise DataError(f"{dataset}: labels up to {num_classes - 1} and {spec.name}'s embedding_dim "
                        f"{spec.embedding_dim} imply a classifier of {num_classes * spec.embedding_dim:,} parameters; "
                        f"the limit is {MAX_PARAMETERS:,}")
    net = EmbeddingNet(spec.arch, data_cfg.channels, spec.embedding_dim, spec.width)
    head = CosineClassifier(spec.embedding_dim, num_classes, cfg.scale)

    def step_loss(forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        return loss, (logits.argmax(1) == y).float().mean()

    epochs = spec.epochs or cfg.epochs
    groups = [
        {"params": list(net.backbone.parameters()), "lr": cfg.lr * spec.backbone_lr_scale},
        {"params": [*net.head.parameters(), *head.parameters()], "lr": cfg.lr},
    ]
    resume = Resume.next_to(out, kind="embedding", spec=spec, channels=data_cfg.channels,
                            image_size=data_cfg.image_size, train=cfg, epochs=epochs, dataset=file_identity(dataset),
                            **no_flip(data_cfg))
    # one module (backbone then head) so data-parallel training can wrap it as a whole
    history = run_epochs(nn.Sequential(net, head), data, step_loss, cfg, epochs, spec.seed, spec.name, groups,
                         resume=resume, hflip=data_cfg.hflip)
    model = EmbeddingModel(
        name=spec.name,
        arch=spec.arch,
        net=net,
        classifier=head.weight.detach(),
        scale=cfg.scale,
        in_channels=data_cfg.channels,
        image_size=data_cfg.image_size,
        embedding_dim=spec.embedding_dim,
        meta={"history": history, "seed": spec.seed, "train_images": len(data.ids), "role": role,
              "pretrained": is_pretrained(spec.arch), "backbone_lr_scale": spec.backbone_lr_scale},
    )
    return _save_on_main(model, out, spec.width, resume)


def train_distilled_student(
    dataset: str | Path,
    teacher_path: str | Path,
    student_spec: ModelSpec,
    data_cfg: DataConfig,
    cfg: TrainConfig,
    out: str | Path,
    epochs: int | None = None,
) -> EmbeddingModel:
    """KD baseline: a student of the query architecture regressing the teacher's normalised embedding."""
    teacher = require_role(load_embedding_model(teacher_path), "gallery", f"--kd-teacher {teacher_path}")
    try:  # its student's name, checked before the training rather than when the student is saved
        check_model_name(f"kd_{teacher.name}", "its KD student's name")
    except ConfigError as err:
        raise CheckpointError(f"--kd-teacher {teacher_path}: {err} (the teacher's name has {len(teacher.name)} "
                              "characters; at most 61 leave room for the kd_ prefix)") from None
    if (teacher.in_channels, teacher.image_size) != (data_cfg.channels, data_cfg.image_size):
        # the teacher saw images of another size (distilled at it without a word, exit 0) or channel count (a conv
        # traceback); every other step embeds a model at its own size
        raise CheckpointError(f"--kd-teacher {teacher_path}: trained on {teacher.image_size}×{teacher.image_size} "
                              f"images of {teacher.in_channels} channel(s), but data.image_size is "
                              f"{data_cfg.image_size} and data.channels {data_cfg.channels}: distil it with the "
                              "settings it was trained with")
    torch.manual_seed(student_spec.seed)
    size = embedding_net_parameters(student_spec.arch, data_cfg.channels, teacher.embedding_dim, student_spec.width)
    if size > MAX_PARAMETERS:  # the config bounds the students of its own gallery models; this teacher is a file
        raise CheckpointError(f"{teacher_path}: its embedding_dim {teacher.embedding_dim} and {student_spec.name}'s "
                              f"width {student_spec.width} imply a KD student of {size:,} parameters; the limit is "
                              f"{MAX_PARAMETERS:,}")
    data = load_split(dataset, "train", data_cfg.channels, data_cfg.image_size)
    net = EmbeddingNet(student_spec.arch, data_cfg.channels, teacher.embedding_dim, student_spec.width)

    def step_loss(forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            target = F.normalize(teacher.net(x).float(), dim=-1)
        pred = F.normalize(forward(x).float(), dim=-1)
        loss = (pred - target).pow(2).sum(-1).mean()
        return loss, (pred.detach() * target).sum(-1).mean()

    epochs = epochs or cfg.epochs
    resume = Resume.next_to(out, kind="kd_student", spec=student_spec, channels=data_cfg.channels,
                            image_size=data_cfg.image_size, train=cfg, epochs=epochs, dataset=file_identity(dataset),
                            teacher=teacher.sha256, **no_flip(data_cfg))
    history = run_epochs(net, data, step_loss, cfg, epochs, student_spec.seed, f"kd/{teacher.name}",
                         resume=resume, extra_modules=(teacher.net,), hflip=data_cfg.hflip)
    info = dataset_info(dataset)
    student = EmbeddingModel(
        name=f"kd_{teacher.name}",
        arch=student_spec.arch,
        net=net,
        classifier=teacher.classifier,
        scale=teacher.scale,
        in_channels=data_cfg.channels,
        image_size=data_cfg.image_size,
        embedding_dim=teacher.embedding_dim,
        meta={"history": history, "teacher_sha256": teacher.sha256, "role": "kd_student",
              "dataset_source": info.get("source", "")},
    )
    return _save_on_main(student, out, student_spec.width, resume)


def _save_on_main(model: EmbeddingModel, out: str | Path, width: int, resume: Resume) -> EmbeddingModel:
    """Rank 0 writes the checkpoint (then drops the resume file) and returns it as loaded; the other
    ranks return their identical in-memory copy (no sha256: they hold no file). Every rank returns once
    the file is in place."""
    if ddp.is_main():
        save_embedding_model(model, out, width)
        model = load_embedding_model(out)
        resume.remove()
    ddp.barrier()
    return model
