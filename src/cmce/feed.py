"""Batches of a decoded training split for a training loop, fed so the device never waits on the host.

- CPU: the split is already in memory; a batch is gathered from it (what the loop has always done).
- CUDA, split within the budget (`train.device_data_gb`): the uint8 images and the labels are copied
  to the GPU once; a batch is a gather on the GPU.
- CUDA, split over the budget: the images stay in host memory; while the GPU works on batch s, batch s+1
  is gathered into one of two pinned staging buffers and copied on a side stream, which the compute
  stream waits for on the device.

The resident paths cost no host synchronisation per step (the epoch's order goes to the device once, the
labels live there). The prefetch path waits on the host only before it refills a staging buffer, for the
copy out of it issued two steps earlier.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)
GB = 1 << 30


def fits_on_device(device: torch.device, nbytes: int, budget_gb: float) -> bool:
    """Whether a split of `nbytes` is kept whole on `device` (on the CPU it already is)."""
    return device.type != "cuda" or nbytes <= budget_gb * GB


class BatchFeed:
    """Yields (uint8 images NxCxHxW, int64 labels N) on `device` for each step of an epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device, budget_gb: float,
                 desc: str = "train"):
        self.device = device
        self.labels = labels.to(device)
        self.resident = fits_on_device(device, images.numel() * images.element_size(), budget_gb)
        self.images = images.to(device) if self.resident else images  # pageable: only the staging buffers pin
        if not self.resident:
            log.info("%s: %.2f GB of images exceed train.device_data_gb=%g; prefetching batches through pinned "
                     "memory", desc, images.numel() * images.element_size() / GB, budget_gb)

    def epoch(self, order: torch.Tensor, steps: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch: step s takes order[s·B : (s+1)·B] (order drawn on the CPU)."""
        on_device = order.to(self.device)
        labels = (self.labels[on_device[s * batch_size:(s + 1) * batch_size]] for s in range(steps))
        if self.resident:
            for s, y in enumerate(labels):
                yield self.images[on_device[s * batch_size:(s + 1) * batch_size]], y
            return
        yield from zip(self._prefetched(order, steps, batch_size), labels, strict=True)

    def _prefetched(self, order: torch.Tensor, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
        buffers = [torch.empty((batch_size, *self.images.shape[1:]), dtype=self.images.dtype).pin_memory()
                   for _ in range(2)]
        copied: list[torch.cuda.Event | None] = [None, None]
        side = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)

        def issue(s: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            idx = order[s * batch_size:(s + 1) * batch_size]
            slot = s % 2
            if copied[slot] is not None:
                copied[slot].synchronize()  # the copy out of this buffer, issued two steps ago, is done
            buf = buffers[slot][: len(idx)]
            torch.index_select(self.images, 0, idx, out=buf)
            with torch.cuda.stream(side):
                x = buf.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            copied[slot] = event
            return x, event

        nxt = issue(0) if steps else None
        for s in range(steps):
            x, ready = nxt
            if s + 1 < steps:
                nxt = issue(s + 1)
            compute.wait_event(ready)  # on the device: the compute stream waits for the copy
            x.record_stream(compute)  # made on the side stream, used on this one: not reused too early
            yield x
