"""The transformation T_i: an MLP mapping one gallery model's embedding into the query space, fitted
with both backbones frozen on their precomputed embeddings of the training images, by the loss of
cmce.method.transformation_loss. The query model never changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cmce import device as devices
from cmce import distributed as ddp
from cmce.checkpoint import (
    HISTORY,
    SHA,
    TRANSFORM_FORMAT,
    TRANSFORM_SIZES,
    CheckpointError,
    check_fields,
    check_sizes,
    check_weights,
    load_checkpoint,
    read_checkpoint,
    refuse_diverged,
    require_keys,
    save_checkpoint,
)
from cmce.config import ConfigError, TransformConfig, check_model_name
from cmce.errors import joined_lines
from cmce.method import transformation_loss
from cmce.models import MAX_PARAMETERS, mlp_parameters
from cmce.resume import Resume

log = logging.getLogger(__name__)


def build_mlp(in_dim: int, out_dim: int, hidden_dim: int, depth: int) -> nn.Sequential:
    """`depth` linear layers; hidden ones followed by BatchNorm + ReLU. depth=1 is a linear map."""
    if depth < 1:
        raise ValueError(f"transform.depth must be >= 1, got {depth}")
    dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@dataclass
class Transformation:
    mlp: nn.Sequential
    gallery_model: str  # name
    gallery_model_sha256: str
    query_model_sha256: str
    in_dim: int
    out_dim: int
    hidden_dim: int
    depth: int
    sha256: str = ""
    history: list[dict[str, float]] = field(default_factory=list)

    @torch.no_grad()
    def apply(self, raw: np.ndarray | torch.Tensor, batch_size: int = 8192) -> np.ndarray:
        """Raw gallery embeddings → L2-normalised embeddings in the query space (float32)."""
        x = torch.from_numpy(np.array(raw, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"transformation for {self.gallery_model!r} expects embeddings of dim {self.in_dim}, "
                f"got shape {tuple(x.shape)}"
            )
        device = devices.current()
        self.mlp.to(device).eval()
        out = [F.normalize(self.mlp(x[i : i + batch_size].to(device)), dim=-1).cpu()
               for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.out_dim), np.float32)


def fit_transformation(
    gallery_emb: np.ndarray,
    query_emb: np.ndarray,
    labels: np.ndarray,
    query_classifier: torch.Tensor,
    cfg: TransformConfig,
    seed: int = 0,
    desc: str = "transform",
    resume: Resume | None = None,
    *,
    query_scale: float,
) -> tuple[nn.Sequential, list[dict[str, float]]]:
    """Fit the MLP on paired embeddings of the same training images. Returns (mlp, per-epoch history).
    `query_scale`: the query classifier's temperature, the CE term's unless cfg.scale says another.
    Under torchrun every rank holds all embeddings; `cfg.batch_size` is the global batch (cmce.distributed).
    With `resume`, the state is saved after every epoch and a matching saved state is continued from."""
    if len(gallery_emb) != len(query_emb) or len(gallery_emb) != len(labels):
        raise ValueError("gallery embeddings, query embeddings and labels must have the same length")
    for name, arr in (("gallery", gallery_emb), ("query", query_emb)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} embeddings contain NaN or inf values")
    ctx = ddp.current()
    ddp.check_batch_size(cfg.batch_size, ctx, "transform.batch_size")
    per_rank = min(cfg.batch_size, len(gallery_emb)) // (ctx.world_size if ctx.enabled else 1)
    if cfg.depth > 1 and per_rank < 2:  # BatchNorm: "Expected more than 1 value per channel when training"
        raise ValueError(f"transform.batch_size {cfg.batch_size}: {per_rank} row(s) a step on each rank, but the "
                         f"hidden layers (transform.depth {cfg.depth}) normalise over the batch; give at least 2")
    device = devices.current()
    torch.manual_seed(seed)
    g = torch.from_numpy(np.array(gallery_emb, dtype=np.float32)).to(device)
    q = torch.from_numpy(np.array(query_emb, dtype=np.float32)).to(device)
    y = torch.as_tensor(labels, dtype=torch.long).to(device)
    w = query_classifier.detach().float().to(device)
    scale = query_scale if cfg.scale is None else cfg.scale
    mlp = build_mlp(g.shape[1], q.shape[1], cfg.hidden_dim, cfg.depth).to(device)
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, len(g) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    gen = torch.Generator().manual_seed(seed)  # the epoch order (and, on the CPU, the dropout masks)
    mask_gen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    start, history = resume.restore(mlp, opt, sched, gen, desc, mask_gen, cfg.epochs) if resume else (0, [])
    forward = ddp.wrap(mlp, ctx)
    for epoch in tqdm(range(start, cfg.epochs), desc=desc, leave=False, mininterval=2,
                      disable=None if ctx.is_main else True):
        mlp.train()
        order = torch.randperm(len(g), generator=gen).to(device)  # one copy an epoch; steps slice it there
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, align, ce: read once an epoch
        for s in range(steps):
            batch = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            mine = ddp.rank_share(len(batch), ctx.rank, ctx.world_size)
            idx = batch[mine]
            x = g[idx]
            if cfg.input_dropout:  # one mask for the global batch: the same on every rank, whatever the world size
                keep = torch.rand((len(batch), g.shape[1]), generator=mask_gen, device=device) >= cfg.input_dropout
                x = x * keep[mine] / (1.0 - cfg.input_dropout)
            loss, align, ce = transformation_loss(forward(x), q[idx], y[idx], w, cfg.lam, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums += torch.stack([loss.detach(), align.detach(), ce.detach()]).double()
        row = dict(zip(("loss", "align", "ce"), ddp.mean_over_ranks((sums / steps).tolist(), ctx), strict=True))
        history.append({"epoch": epoch + 1, **row})
        refuse_diverged(history[-1], desc)
        if resume:
            resume.save(mlp, opt, sched, gen, epoch + 1, cfg.epochs, history, mask_gen)
    if ctx.is_main:
        log.info("%s: final loss %.4f (align %.4f, ce %.4f)", desc, *(history[-1][k] for k in ("loss", "align", "ce")))
    ddp.sync_buffers(mlp, ctx)
    mlp.eval()
    return mlp.cpu(), history


def save_transformation(t: Transformation, path: str | Path) -> str:
    obj: dict[str, Any] = {
        "format": TRANSFORM_FORMAT,
        "gallery_model": t.gallery_model,
        "gallery_model_sha256": t.gallery_model_sha256,
        "query_model_sha256": t.query_model_sha256,
        "in_dim": t.in_dim,
        "out_dim": t.out_dim,
        "hidden_dim": t.hidden_dim,
        "depth": t.depth,
        "history": t.history,
        "state_dict": {k: v.detach().cpu().clone() for k, v in t.mlp.state_dict().items()},
    }
    t.sha256 = save_checkpoint(obj, path, load_transformation)
    return t.sha256


def check_transform_folder(folder: str | Path, shown: str | None = None) -> None:
    """A folder of transformations replaced whole (upgrade-query-model): every *.pt already in it must be a
    transformation, or replacing it would delete model checkpoints that happen to end in .pt too. `shown`: the
    folder as the user gave it, where `folder` is a local copy of its *.pt files."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.pt")):
        try:
            load_checkpoint(path, TRANSFORM_FORMAT)
        except CheckpointError as err:
            reason = str(err).removeprefix(f"{path}: ")
            raise CheckpointError(f"{shown or folder}: holds {path.name}, which is not a transformation ({reason}); "
                                  "this step replaces the folder whole, so give an empty or new folder") from None


def load_transformation(
    path: str | Path, query_sha256: str | None = None, gallery_sha256: str | None = None
) -> Transformation:
    """Load a transformation; refuse it if it was fitted for another query or gallery model."""
    obj, sha256 = read_checkpoint(path, TRANSFORM_FORMAT)
    require_keys(obj, ["gallery_model", "gallery_model_sha256", "query_model_sha256", "in_dim", "out_dim",
                       "hidden_dim", "depth", "state_dict"], path)
    # hidden_dim only matters with a hidden layer (an identity or linear map records 0)
    linear = type(obj["depth"]) is int and obj["depth"] == 1
    check_sizes(obj, {**TRANSFORM_SIZES, **({"hidden_dim": "[0, 65536]"} if linear else {})}, path)
    check_fields(obj, {"gallery_model_sha256": SHA, "query_model_sha256": SHA, "history": HISTORY}, path)
    try:
        check_model_name(obj["gallery_model"], "field 'gallery_model'")
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    size = mlp_parameters(obj["in_dim"], obj["out_dim"], obj["hidden_dim"], obj["depth"])
    if size > MAX_PARAMETERS:  # each size in its range, together (hidden_dim² · depth) terabytes
        raise CheckpointError(f"{path}: fields 'hidden_dim' {obj['hidden_dim']} and 'depth' {obj['depth']} imply an "
                              f"MLP of {size:,} parameters; the limit is {MAX_PARAMETERS:,}")
    for role, expected in (("query", query_sha256), ("gallery", gallery_sha256)):
        actual = obj[f"{role}_model_sha256"]
        if expected is not None and actual != expected:
            raise CheckpointError(
                f"{path}: transformation was fitted for {role} model {actual[:12]}, "
                f"but {role} model {expected[:12]} was given"
            )
    check_weights(obj, path)
    mlp = build_mlp(obj["in_dim"], obj["out_dim"], obj["hidden_dim"], obj["depth"])
    try:
        mlp.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match the recorded MLP shape: {joined_lines(err)}") from None
    mlp.eval()
    return Transformation(
        mlp=mlp,
        gallery_model=obj["gallery_model"],
        gallery_model_sha256=obj["gallery_model_sha256"],
        query_model_sha256=obj["query_model_sha256"],
        in_dim=obj["in_dim"],
        out_dim=obj["out_dim"],
        hidden_dim=obj["hidden_dim"],
        depth=obj["depth"],
        sha256=sha256,
        history=obj.get("history", []),
    )
