"""Where each step runs: the one place that picks a torch device.

`device: auto | cpu | cuda` (config key; the CLI's global `--device` flag wins over it). `auto` is CUDA
when torch sees a GPU, else the CPU; `cuda` without a GPU is an error rather than a silent CPU run.
In one plain process the device is cuda:0 or the CPU. Under torchrun with a process group, each rank
runs on its own GPU (cuda:LOCAL_RANK, nccl) or on the CPU (gloo), as cmce.distributed set it up.

The CLI selects the device once per step (`select`); library code asks `current()`.
Importing this module also settles the CPU's vector-math kernels (`settle_cpu_vector_math`); every module that
trains, fits, embeds or evaluates imports it.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

CHOICES = ("auto", "cpu", "cuda")
_selected: str = "auto"
_announced: torch.device | None = None  # the device last named in the log


def settle_cpu_vector_math() -> None:
    """Make the first vector-math call of the process a serial one.

    torch's CPU build computes sqrt, log, tanh and their kin through MKL's vector-math library, which picks its
    CPU-specific kernels on first use. When that first use is a tensor large enough for torch to split across
    threads, the threads race on the choice and part of the tensor can come from a kernel that rounds
    differently: the first sqrt of 24,576 floats in a fresh process differed in about 1 process in 4 (2-core
    Xeon), and so did 4 % of transformations (the first AdamW step), which made KFP tasks, DVC stages and one
    process disagree. One tiny call on this thread makes the choice before any parallel one."""
    torch.ones(16).sqrt()


settle_cpu_vector_math()


class DeviceError(ValueError):
    """A device was asked for that this machine cannot give; the message names the setting."""


def resolve(spec: str = "auto", where: str = "device") -> torch.device:
    """The device `spec` means on this machine, ignoring torchrun (see `current`)."""
    if spec not in CHOICES:
        raise DeviceError(f"{where}: {spec!r} is not one of {list(CHOICES)}")
    if spec == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if spec == "cuda":
        raise DeviceError(f"{where}: cuda was asked for, but torch sees no CUDA device "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    return torch.device("cpu")


def select(spec: str, where: str = "device") -> torch.device:
    """Make `spec` this process's device for the steps that follow; returns it (checked now, so a bad
    setting fails before any work)."""
    global _selected, _announced
    resolved = resolve(spec, where)
    _selected, _announced = spec, None  # a new step names its device again
    return resolved


def selected() -> str:
    return _selected


def current() -> torch.device:
    """The device this process computes on: the rank's device under a torchrun process group, else
    the selected one."""
    from cmce import distributed as ddp  # late: distributed imports this module

    global _announced
    device = ddp.current().device
    if device != _announced:  # each step's log names the device it computes on, once
        log.info("computing on %s", describe(device))
        _announced = device
    return device


def use_deterministic(on: bool) -> None:
    """Ask torch for deterministic kernels (or give them back) for the steps that follow. An op without one warns
    rather than stops (warn_only). cuBLAS reads its workspace setting when its first handle is made: set here, before
    the step's first CUDA op (a value the user gave is kept)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False  # autotuning may pick another algorithm each run


def describe(device: torch.device) -> str:
    """`cuda:0 (NVIDIA H200)` or `cpu (2 threads)`: what a log line or a tracking record says."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"
