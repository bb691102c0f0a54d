"""Data-parallel training under `torchrun`: one process per rank, gloo on CPU, nccl on GPU.

Without torchrun's environment nothing here does anything: world size 1, no process group, the
training loops run exactly as in a single process.

Semantics the training loops follow when a process group is up:
- every rank loads the full training data and draws the same global permutation (same seed), so all
  ranks run the same number of steps; a step's global batch of `batch_size` rows is split into
  `world_size` contiguous shares of `batch_size / world_size` rows (the batch size is the *global*
  batch, and must divide evenly), so the optimisation schedule matches a single-process run;
- DistributedDataParallel averages gradients; BatchNorm statistics are per rank during training and
  rank 0's buffers are broadcast at the end, so every rank ends with identical weights;
- only rank 0 writes checkpoints, logs, progress bars and tracking records.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cmce import device as devices
from cmce.errors import first_line

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """This process's place in the data-parallel group (rank 0 of 1 when there is none)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "" = no process group

    @property
    def enabled(self) -> bool:
        return bool(self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The rank's GPU under nccl, the CPU under gloo; without a group, the selected device (cmce.device)."""
        if self.enabled:
            return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        return devices.resolve(devices.selected())


def launched() -> bool:
    """True when started by torchrun (or anything else that sets its rendezvous variables)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def _env_count(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"environment variable {name}={value!r}: not a rank count or index (torchrun sets it)")
    return int(value)


def env_world_size() -> int:
    """WORLD_SIZE, once torchrun's variables are consistent (checked before any rank waits for the others, which
    would otherwise wait CMCE_DDP_TIMEOUT_S for a rank that cannot exist): integers, 1 <= WORLD_SIZE,
    RANK < WORLD_SIZE, LOCAL_RANK < LOCAL_WORLD_SIZE when that is set, MASTER_PORT a TCP port, and the timeout."""
    rank, world = _env_count("RANK", "0"), _env_count("WORLD_SIZE", "1")
    local_rank = _env_count("LOCAL_RANK", "0")
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world}: at least 1 rank expected")
    if rank >= world:
        raise ValueError(f"environment variable RANK={rank}: must be below WORLD_SIZE={world}")
    if "LOCAL_WORLD_SIZE" in os.environ:
        local_world = _env_count("LOCAL_WORLD_SIZE", "1")
        if not 1 <= local_world <= world:
            raise ValueError(f"environment variable LOCAL_WORLD_SIZE={local_world}: from 1 to WORLD_SIZE={world} "
                             "expected")
        if local_rank >= local_world:
            raise ValueError(f"environment variable LOCAL_RANK={local_rank}: must be below LOCAL_WORLD_SIZE="
                             f"{local_world}")
    elif local_rank >= world:
        raise ValueError(f"environment variable LOCAL_RANK={local_rank}: must be below WORLD_SIZE={world}")
    port = os.environ.get("MASTER_PORT", "1")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"environment variable MASTER_PORT={os.environ['MASTER_PORT']!r}: a TCP port from 1 to "
                         "65535 expected")
    if "MASTER_ADDR" in os.environ and not os.environ["MASTER_ADDR"].strip():
        raise ValueError("environment variable MASTER_ADDR is empty: the host of rank 0 expected")
    ddp_timeout_s()
    if world > 1 and "MASTER_ADDR" in os.environ:  # an unknown host failed only at the rendezvous timeout
        try:
            socket.getaddrinfo(os.environ["MASTER_ADDR"], None)
        except (OSError, UnicodeError):
            raise ValueError(f"environment variable MASTER_ADDR={os.environ['MASTER_ADDR']!r}: the host cannot be "
                             "resolved") from None
    return world


def partly_launched() -> list[str]:
    """torchrun's variables that are missing when WORLD_SIZE asks for several ranks: without them the command ran
    alone, as rank 0 of 1, and said nothing."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1") or launched():
        return []
    _env_count("WORLD_SIZE", "1")  # `abc` is no count: named as such (it was said to ask for several ranks)
    return [v for v in _TORCHRUN_VARS if v not in os.environ]


def current() -> Context:
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   str(dist.get_backend()))


def is_main() -> bool:
    return current().is_main


# a collective whose peer went away (killed, out of memory): gloo's "Read error [ADDR]:PORT: Connection reset by
# peer" (30 lines of traceback), nccl's remote errors
_PEER_GONE = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe|remote process exited|"
                        r"NCCL communicator was aborted|DistNetworkError", re.IGNORECASE)
_PEER_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")


def lost_peer(err: BaseException) -> str | None:
    """One line for a collective that failed because another rank went away, naming it (the other rank of two;
    else the peer's address), or None for any other error. torchrun's summary names the rank's own failure."""
    ctx = current()
    if not ctx.enabled or ctx.world_size < 2 or not isinstance(err, RuntimeError):
        return None
    text = str(err)
    gone = _PEER_GONE.search(text)
    if gone is None:
        return None
    address = _PEER_ADDRESS.search(text)
    who = f"rank {1 - ctx.rank}" if ctx.world_size == 2 else "a peer rank"
    at = f" at {address.group(1)}:{address.group(2)}" if address else ""
    return (f"rank {ctx.rank} of {ctx.world_size}: lost {who}{at} ({gone.group(0)}): it stopped or was killed; "
            "this rank stops too, its outputs whole or not written")


def default_backend() -> str:
    """nccl when the selected device (cmce.device) is CUDA, else gloo."""
    return "nccl" if devices.resolve(devices.selected()).type == "cuda" else "gloo"


def ddp_timeout_s() -> float:
    """CMCE_DDP_TIMEOUT_S: how long a rank waits for the others to join (default 300 s), 1 s to a day."""
    text = os.environ.get("CMCE_DDP_TIMEOUT_S", "300")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 1 <= value <= 86400:  # NaN fails this too
        raise ValueError(f"environment variable CMCE_DDP_TIMEOUT_S={text!r}: seconds from 1 to 86400 expected")
    return value


def init_from_env(backend: str | None = None) -> Context:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). Default backend: nccl when the selected device (cmce.device) is CUDA, else gloo.
    A no-op outside torchrun or when a group is already up."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; cannot train data-parallel")
    backend = backend or default_backend()
    if backend == "nccl":
        local, visible = _env_count("LOCAL_RANK", "0"), torch.cuda.device_count()
        if local >= visible:  # torch's own message was "invalid device ordinal", from deep in CUDA
            raise ValueError(f"environment variable LOCAL_RANK={local}: this rank would use GPU {local}, but torch "
                             f"sees {visible} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')});"
                             " start at most one rank per visible GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local)
    timeout = ddp_timeout_s()
    # nothing else is logged until every rank has joined: say what it waits for, and for how long at most
    log.info("joining %s ranks at %s:%s (rank %s); waiting up to %.0f s for the others (CMCE_DDP_TIMEOUT_S)",
             os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["RANK"],
             timeout)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        store, rank, world = _rendezvous(timeout, where)
        # as init_process_group's own env:// path: the store may be torchrun's agent store, shared with others
        dist.init_process_group(backend=backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError, dist.DistStoreError) as err:  # the other ranks never came
        raise OSError(f"torchrun rendezvous at {where} failed: {first_line(err)}") from None
    ctx = current()
    log.info("data-parallel: rank %d of %d, backend %s", ctx.rank, ctx.world_size, ctx.backend)
    return ctx


def _rendezvous(timeout: float, where: str) -> tuple[dist.Store, int, int]:
    """torch's env:// rendezvous (the TCPStore of MASTER_ADDR:MASTER_PORT), given up after the timeout and a
    margin: c10d's client waits without a deadline for the answer to its first ping, so a port where another
    service listens and waits for more bytes (an HTTP server) hung a rank for good. It runs in a daemon thread
    (the store releases the GIL while it waits); a thread left waiting goes with the process, which exits."""
    import threading

    from torch.distributed import rendezvous

    result: dict[str, object] = {}

    def join() -> None:
        try:
            result["store"] = next(rendezvous("env://", timeout=datetime.timedelta(seconds=timeout)))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = err

    thread = threading.Thread(target=join, name="cmce-rendezvous", daemon=True)
    thread.start()
    thread.join(timeout + min(5.0, 1.0 + timeout / 10))  # c10d's own deadline, when it keeps one, comes first
    if thread.is_alive():
        _left_waiting.append(thread)
        raise OSError(f"torchrun rendezvous at {where} failed: no TCPStore answer within {timeout:g} s "
                      "(CMCE_DDP_TIMEOUT_S); is MASTER_PORT the port of another service?")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    store, rank, world = result["store"]  # type: ignore[misc]
    store.set_timeout(datetime.timedelta(seconds=timeout))
    return store, rank, world


_left_waiting: list[object] = []  # rendezvous threads given up on, still inside c10d's C++


def threads_left_waiting() -> bool:
    """A rendezvous thread was left inside c10d: the interpreter's shutdown must not wait for it to come back (it
    aborted the process, `terminate called without an active exception`, exit -6 instead of 2)."""
    return any(t.is_alive() for t in _left_waiting)  # type: ignore[attr-defined]


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a failure, skip the barrier: the other ranks may be inside a
    collective that this rank will never join (torchrun stops them)."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap(module: nn.Module, ctx: Context) -> nn.Module:
    """DistributedDataParallel around `module` (already on ctx.device) when a group is up."""
    if not ctx.enabled:
        return module
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def check_batch_size(batch_size: int, ctx: Context, field: str) -> None:
    if ctx.enabled and batch_size % ctx.world_size:
        raise ValueError(f"{field}={batch_size} is the global batch and must be divisible by the "
                         f"world size {ctx.world_size}")


def rank_share(n: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous share of a global batch of `n` rows (equal shares; a remainder, only
    possible in a short last batch, is dropped so every rank does the same work)."""
    if world_size == 1:
        return slice(None)
    per_rank = n // world_size
    if per_rank == 0:
        raise ValueError(f"a batch of {n} rows cannot be split over {world_size} ranks")
    return slice(rank * per_rank, (rank + 1) * per_rank)


def mean_over_ranks(values: list[float], ctx: Context) -> list[float]:
    """Average per-rank scalars (epoch loss/metric) so every rank logs the global value."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def sync_buffers(module: nn.Module, ctx: Context) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart within a step)."""
    if ctx.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, 0)


def agree(value: int, ctx: Context) -> bool:
    """True when every rank holds the same integer (always, without a process group)."""
    if not ctx.enabled:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == -int(t[1])
