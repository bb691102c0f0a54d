"""Training-time augmentation, batched on whatever device the images are on."""

from __future__ import annotations

import torch


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2, hflip: bool = True) -> torch.Tensor:
    """Random translation by up to `pad` pixels (edge pixels replicated) and, with `hflip`, random horizontal
    flip, on a uint8 batch NxCxHxW. Draws from `generator`, which must live on the images' device (a CUDA
    batch is augmented on the GPU from a seeded CUDA generator; a CPU batch gives the same values as
    ever for the same CPU generator)."""
    n, c, h, w = images.shape
    dev = images.device
    dy = torch.randint(-pad, pad + 1, (n, 1), generator=generator, device=dev)
    dx = torch.randint(-pad, pad + 1, (n, 1), generator=generator, device=dev)
    rows = (torch.arange(h, device=dev)[None] + dy).clamp_(0, h - 1).view(n, 1, h, 1)
    cols = (torch.arange(w, device=dev)[None] + dx).clamp_(0, w - 1)
    if hflip:
        flip = torch.rand(n, generator=generator, device=dev) < 0.5
        # a flip reverses the row of source columns: torch.where keeps this free of a data-dependent (host-synced)
        # index
        cols = torch.where(flip[:, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
    chan = torch.arange(c, device=dev).view(1, c, 1, 1)
    return images[batch, chan, rows, cols.view(n, 1, 1, w)]
