"""Resumable training loops.

After every epoch a training loop saves its whole state (weights, optimizer, LR schedule, every RNG it
draws from, epoch, history) to `<out>.resume`, next to the output it will write, atomically. A run of
the same step that finds that file continues after the last finished epoch and ends with exactly the
weights an uninterrupted run gives. The file carries a fingerprint of everything the result depends on
(settings, the dataset file, the input models, the data-parallel world size, the device type, the CPU thread count,
deterministic kernels on CUDA, the code); a file written for
anything else is ignored with a warning and training starts over. The step deletes the file once its
output is in place. Delete it by hand to force a fresh start.

The name does not end in `.pt`, so folder globs for checkpoints (`--kd-dir`, `--transform-dir`) never
pick it up. It holds tensors and primitives only and is loaded weights-only.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmce import distributed as ddp
from cmce.checkpoint import archive_damage, save_torch
from cmce.errors import first_line
from cmce.output_checks import a_format
from cmce.storage import clean_stale_temps, file_sha256

log = logging.getLogger(__name__)
RESUME_FORMAT = "cmce-resume/1"
UPLOAD_EVERY_S = 60.0  # an s3:// output's state: an upload per epoch of a quick fit was dozens a minute


def resume_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.resume")


def resume_name(out: str) -> str:
    """`<out>.resume` of a path or of an s3:// URI (as a Path, `s3://b/k` would fold into `s3:/b/k`)."""
    from cmce.s3 import is_s3

    return f"{out.rstrip('/')}.resume" if is_s3(out) else str(resume_path(out))


def check_resume_file(path: Path, shown: str | None = None) -> None:
    """What lies at `<out>.resume` must be a resume state (a torch file) or nothing: a dataset there was read as an
    unreadable state, replaced by the training's and deleted at its end (exit 0); a folder failed after an epoch.
    `shown`: how to name it (an s3:// resume object's scratch copy by its URI)."""
    from cmce.output_checks import checkpoint_kind, file_format

    if path.is_symlink() or (path.exists() and not path.is_file()):
        what = "a link" if path.is_symlink() else "a folder" if path.is_dir() else "a pipe, device or socket"
        raise _refused(shown or str(path), f"is {what}")
    if path.exists() and (kind := file_format(path)) != "checkpoint":
        raise _not_a_state(shown or str(path), kind)
    if path.exists() and (fmt := checkpoint_kind(path)) not in (None, RESUME_FORMAT):  # a model: deleted as unreadable
        raise _refused(shown or str(path), f"holds a cmce checkpoint ({fmt}), not a saved training state")


def check_resume_object(uri: str) -> None:
    """check_resume_file for an s3:// output's `<out>.resume` object, by HEAD, LIST and a ranged GET (no download)."""
    from cmce import s3
    from cmce.output_checks import HEAD_BYTES, format_of

    if s3.is_prefix(uri):
        raise _refused(uri, "is a folder (a prefix holding objects)")
    size = s3.object_size(uri)
    if size is None:
        return
    if (kind := format_of(s3.read_range(uri, 0, HEAD_BYTES - 1)) if size else None) != "checkpoint":
        raise _not_a_state(uri, kind)


def _not_a_state(shown: str, kind: str | None) -> ValueError:
    held = f"{a_format(kind)} file" if kind else "a foreign file"
    return _refused(shown, f"holds {held}, not a saved training state")


def _refused(shown: str, said: str) -> ValueError:
    return ValueError(f"{shown}: the resume file of --out {said}; move it, or give another --out")


def file_identity(path: str | Path) -> dict[str, Any]:
    """Content identity of an input file: its sha256 and size."""
    return {"sha256": file_sha256(path), "size": os.path.getsize(path)}


@functools.cache
def code_digest() -> str:
    """sha256 of cmce's own source and torch's version: a state saved by other code (an upgrade between the stop and
    the rerun) was resumed without a word, and gave bytes neither version gives."""
    import cmce

    h = hashlib.sha256(torch.__version__.encode())
    for path in sorted(Path(cmce.__file__).parent.rglob("*.py")):
        h.update(path.relative_to(Path(cmce.__file__).parent).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def fingerprint(**parts: Any) -> str:
    """sha256 of the JSON of `parts` (dataclasses expanded) plus the data-parallel world size, the device type, the
    CPU thread count and the code (code_digest): a batch split over another number of ranks, run on another kind of
    device, summed by another number of threads or by other code is a different computation, whose bytes a resumed
    run would give no uninterrupted run."""
    parts = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in parts.items()}
    for part in parts.values():  # where the data lives on the device does not change what is computed
        if isinstance(part, dict):
            part.pop("device_data_gb", None)
    ctx = ddp.current()
    parts["world_size"] = ctx.world_size
    parts["device"] = ctx.device.type
    if ctx.device.type == "cpu":
        parts["num_threads"] = torch.get_num_threads()
    else:  # (the CPU's kernels are deterministic either way)
        parts["deterministic"] = torch.are_deterministic_algorithms_enabled()
    parts["code"] = code_digest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _rng_state(generator: torch.Generator, device_generator: torch.Generator | None) -> dict[str, Any]:
    """Every random stream a training loop may draw from, as tensors and numbers only."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(gauss),
    }
    if device_generator is not None and device_generator is not generator:
        state["device_generator"] = device_generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator, device_generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if device_generator is not None and device_generator is not generator:
        device_generator.set_state(state["device_generator"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _progress(state: dict[str, Any], expected: int | None = None) -> tuple[int, int, list[dict[str, float]]]:
    """(finished epochs, epochs, history) of a saved state, checked: whole numbers with 0 <= epoch <= epochs (the
    loop's own `expected` count, when given), one history row of named numbers per finished epoch."""
    epoch, epochs, history = state["epoch"], state["epochs"], state["history"]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (epoch, epochs)) or not 0 <= epoch <= epochs \
            or expected not in (None, epochs):
        raise ValueError(f"epoch {epoch!r} of {epochs!r}" + (f", for a training of {expected}" if expected else ""))
    if not isinstance(history, list) or len(history) != epoch or not all(
            isinstance(row, dict) and all(isinstance(k, str) and isinstance(v, int | float) for k, v in row.items())
            for row in history):
        raise ValueError(f"a history that is not one row of numbers for each of its {epoch} epochs")
    # interned keys, as in rows the loop builds: pickle memoizes by identity, so the final checkpoint
    # is then byte-identical to an uninterrupted run's
    return epoch, epochs, [{sys.intern(k): v for k, v in row.items()} for row in history]


def _public(state: dict[str, Any]) -> set[str]:
    return {k for k in state if not (isinstance(k, str) and k.startswith("_"))}


def _snapshot(module: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
              generator: torch.Generator, device_generator: torch.Generator | None) -> tuple[Any, ...]:
    """What restore may change, as it was (a state that fails half-way through loading is undone)."""
    return ({k: v.detach().clone() for k, v in module.state_dict().items()}, copy.deepcopy(opt.state_dict()),
            copy.deepcopy(sched.state_dict()), _rng_state(generator, device_generator))


def _restore(before: tuple[Any, ...], module: nn.Module, opt: torch.optim.Optimizer,
             sched: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
             device_generator: torch.Generator | None) -> None:
    weights, optimizer, scheduler, rng = before
    module.load_state_dict(weights)
    opt.load_state_dict(optimizer)
    sched.load_state_dict(scheduler)
    _set_rng_state(rng, generator, device_generator)


@dataclass
class Resume:
    """The resume file of one training run and the fingerprint a file must carry to be resumed. For an s3:// output
    (`remote`: its `<out>.resume` object) the file is kept on S3 too, uploaded at most every UPLOAD_EVERY_S and after
    the last epoch: the step writes in a scratch folder that ends with the command, and a rerun of a stopped or
    preempted job started over."""

    path: Path
    fingerprint: str
    remote: str | None = None
    _uploaded: float = float("-inf")  # when the state was last uploaded (at most every UPLOAD_EVERY_S, and the last)

    @classmethod
    def next_to(cls, out: str | Path, **parts: Any) -> Resume:
        from cmce.s3 import is_s3
        from cmce.storage import origin

        uri = origin(out)  # the s3:// URI a scratch output stands for, else the path itself
        return cls(resume_path(out), fingerprint(**parts), resume_name(uri) if is_s3(uri) else None)

    def _fetch(self) -> None:
        """The remote resume object, when there is one, into `path` (checked before any work: check_resume_object;
        its copy again, as a local file is)."""
        from cmce import s3

        if self.path.exists() or s3.object_size(self.remote) is None:
            return
        s3.download(self.remote, self.path)
        check_resume_file(self.path, self.remote)

    def _read(self) -> dict[str, Any] | None:
        if self.remote:
            self._fetch()
        if not self.path.exists():
            return None
        data = self.path.read_bytes()  # read once: checked and loaded from the same bytes
        if (damaged := archive_damage(data)) is not None:  # training would go on from changed weights
            log.warning("%s: %s; starting over", self.path, damaged)
            return None
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - garbage makes the unpickler raise almost anything (KeyError, …)
            log.warning("%s: unreadable resume file, starting over: %s: %s", self.path, type(err).__name__, err)
            return None
        if not isinstance(obj, dict) or obj.get("format") != RESUME_FORMAT:
            log.warning("%s: not a %s file, starting over", self.path, RESUME_FORMAT)
            return None
        if obj.get("fingerprint") != self.fingerprint:
            log.warning("%s was written for other settings, data, input models, world size, device, thread count "
                        "or code; ignoring it and starting over", self.path)
            return None
        try:  # its epoch decides, with the other ranks, whether to resume at all
            _progress(obj)
        except (KeyError, TypeError, ValueError) as err:
            log.warning("%s: a saved state this training cannot take (%s: %s); starting over", self.path,
                        type(err).__name__, first_line(err))
            return None
        return obj

    def load(self) -> dict[str, Any] | None:
        """The saved state when there is one for this very training, else None. Under torchrun every
        rank reads the file; unless all of them find the same epoch, all start over together."""
        state = self._read()
        if not ddp.agree(int(state["epoch"]) if state else 0, ddp.current()):
            log.warning("%s: data-parallel ranks disagree on the resume state (is the folder shared?); "
                        "starting over", self.path)
            return None
        return state

    def save(self, module: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
             generator: torch.Generator, epoch: int, epochs: int, history: list[dict[str, float]],
             device_generator: torch.Generator | None = None) -> None:
        """State after `epoch` finished epochs (rank 0 writes; atomic, so a kill keeps the previous one).
        `device_generator`: the loop's generator on the GPU, when it has one besides `generator`."""
        if not ddp.is_main():
            return
        obj = {
            "format": RESUME_FORMAT,
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "epochs": epochs,
            "model": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": _rng_state(generator, device_generator),
            "history": history,
        }
        save_torch(obj, self.path)
        if self.remote and (epoch == epochs or time.monotonic() - self._uploaded >= UPLOAD_EVERY_S):
            self._upload()

    def _upload(self) -> None:
        """One PUT (or a completed multipart upload): the object is the old state or the new. Failed, the training
        goes on with the state kept here alone (the output's own upload will say whether the endpoint is gone)."""
        from cmce import s3

        try:
            s3.upload_file(self.path, self.remote)
            self._uploaded = time.monotonic()
        except (OSError, ValueError) as err:
            log.warning("%s: the training state is not kept on S3 from here on (%s)", self.remote, err)
            self.remote = None

    def restore(self, module: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                generator: torch.Generator, desc: str, device_generator: torch.Generator | None = None,
                epochs: int | None = None) -> tuple[int, list[dict[str, float]]]:
        """Load the saved state into the given objects; returns (finished epochs, history), (0, []) if none.
        `epochs`: the loop's own count, which the state's must be."""
        state = self.load()
        if state is None:
            return 0, []
        before = _snapshot(module, opt, sched, generator, device_generator)
        try:
            epoch, epochs, history = _progress(state, epochs)
            for name, fresh in (("optimizer", opt.state_dict()), ("scheduler", sched.state_dict())):
                # loaded as given, missing fields kept fresh; torch's private ones (`_is_initial`) come and go
                if not isinstance(state[name], dict) or _public(state[name]) != _public(fresh):
                    raise ValueError(f"a {name} state with other fields than this training's")
            _check_lists(state["scheduler"], sched.state_dict(), "scheduler")
            module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            _check_optimizer_shapes(opt)
            sched.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"], generator, device_generator)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            # a state edited inside its fingerprint (or left by a cmce whose model changed): a traceback, or a
            # finished model after one epoch of 3 (epoch 999); the untouched objects train from the start
            _restore(before, module, opt, sched, generator, device_generator)
            log.warning("%s: a saved state this training cannot take (%s: %s); starting over", self.path,
                        type(err).__name__, first_line(err))
            return 0, []
        if ddp.is_main():
            log.info("%s: resuming from %s after epoch %d of %d", desc, self.path, epoch, epochs)
        return epoch, history

    def remove(self) -> None:
        """Called once the final output is written."""
        if ddp.is_main():
            self.path.unlink(missing_ok=True)
            clean_stale_temps(self.path)
            if self.remote:  # once every output is uploaded: a failed upload leaves the state to resume from
                from cmce.storage import after_upload

                after_upload(self.path, self._delete_remote)

    def _delete_remote(self) -> None:
        from cmce import s3

        try:
            s3.delete(self.remote)
        except (OSError, ValueError) as err:  # the output is up: a state left behind is said, not a failure
            log.warning("%s: left behind, delete it by hand (%s)", self.remote, err)


def _check_lists(state: dict, fresh: dict, name: str) -> None:
    """Each list of the state as long as this training's (one value per parameter group): a shorter `base_lrs` failed
    the first scheduler step, on every rerun."""
    for key, value in fresh.items():
        if isinstance(value, list) and (not isinstance(state.get(key), list) or len(state[key]) != len(value)):
            raise ValueError(f"a {name} state whose {key!r} is not a list of {len(value)}")


def _check_optimizer_shapes(opt: torch.optim.Optimizer) -> None:
    """Each per-parameter tensor of the loaded optimizer state (Adam's moments) of its parameter's shape: another
    shape failed the first optimizer step with a traceback, on every rerun."""
    for group in opt.param_groups:
        for param in group["params"]:
            for key, value in opt.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"an optimizer state {key!r} of shape {tuple(value.shape)} for a parameter of "
                                     f"shape {tuple(param.shape)}")
