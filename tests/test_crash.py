"""SIGKILL at random moments: each step runs as its own process (`python -m cmce ...`) over a
previous complete output and is killed while it loads, while it writes, and around its last rename.
After every kill the output is the previous one byte for byte, or the new complete one, never a mix
or a partial file; it loads; and a re-run completes with exactly the undisturbed result (the session's
smoke run) and removes what the killed runs left behind. Training resumes from its last epoch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cmce.checkpoint import load_embedding_model
from cmce.config import load_config
from cmce.embed import combine_members
from cmce.evaluate import EvalInputs, evaluate
from cmce.index import build_index, load_index
from cmce.layout import RunLayout
from cmce.resume import resume_path
from cmce.storage import STALE_TEMP_AGE_S, file_sha256, restore_dir
from cmce.tables import read_metadata
from tests.conftest import ROOT, SMOKE
from tests.test_bad_input import snapshot

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
POLL_S = 0.002


def temp_pattern(target: Path) -> re.Pattern:
    """Temporary names of atomic_path / atomic_dir for `target`."""
    return re.compile(rf"\.{re.escape(target.name)}\.cmce-[a-z0-9_]{{8}}\.tmp")


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p != out)


def age(paths: list[Path]) -> None:
    """Backdate what killed runs left, as if it had lain there past STALE_TEMP_AGE_S."""
    t = time.time() - 2 * STALE_TEMP_AGE_S
    for path in paths:
        for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
            os.utime(p, (t, t))


def cmce(argv: list[str], log: Path, kill_when: Callable[[float], bool] | None = None,
         timeout: float = 600) -> tuple[bool, float]:
    """Run `python -m cmce argv` (stderr to `log`); SIGKILL it as soon as `kill_when(seconds since
    start)` holds. Returns (killed, seconds at the kill or the exit); an unkilled run must succeed."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cmce", *argv], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=err)
        start = time.monotonic()
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - start
                assert elapsed < timeout, f"cmce {argv[0]} still running after {timeout} s"
                if kill_when is not None and kill_when(elapsed):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(POLL_S)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc != -signal.SIGKILL:
        assert rc == 0, log.read_text()[-3000:]
    return rc == -signal.SIGKILL, time.monotonic() - start


def new_temp(out: Path) -> Callable[[float], bool]:
    """Kill trigger: a temporary file or folder of `out` that was not there before appears (mid-write)."""
    pattern, before = temp_pattern(out), set(os.listdir(out.parent))
    return lambda _: any(pattern.fullmatch(n) for n in set(os.listdir(out.parent)) - before)


def check_after_kill(out: Path, old: dict, new: dict, validate: Callable[[Path], None],
                     also_allowed: Callable[[str], bool] = lambda name: False) -> None:
    """The output is the old or the new complete one; nothing but temporaries beside it."""
    pattern = temp_pattern(out)
    stray = [n for n in leftovers(out) if not (pattern.fullmatch(n) or n == f".{out.name}.old" or also_allowed(n))]
    assert not stray, stray
    if snapshot(out) is None and old is not None:  # killed between atomic_dir's two renames
        assert snapshot(out.with_name(f".{out.name}.old")) == old
        assert restore_dir(out, ("*",))  # what the next run, or load_index, does (with the step's own globs)
    assert snapshot(out) in (old, new), "partial or mixed output after SIGKILL"
    validate(out)


@dataclass
class Step:
    argv: Callable[[RunLayout, Path], list[str]]
    previous: Callable[[RunLayout, Path], None]  # writes another complete output at `out`
    reference: Callable[[RunLayout, Path], Path]  # the undisturbed result (mostly the smoke run's), given a scratch dir
    validate: Callable[[Path], None]


def _evaluation_without_kd(lay: RunLayout, scratch: Path) -> Path:
    """The smoke evaluation less the KD baselines (they would only slow every run down), in process."""
    cfg, out = load_config(SMOKE), scratch / "eval"
    transforms = [lay.transformation(n) for n in lay.gallery_names]
    inputs = EvalInputs(lay.dataset, lay.model("query"), lay.gallery, transforms)
    evaluate(inputs, cfg.evaluate, out, cfg.batch_size, cfg.seed)
    return out


def valid_table(out: Path, kind: str) -> None:
    assert read_metadata(out)["kind"] == kind
    assert pq.read_table(out).num_rows > 0


def _valid_evaluation(out: Path) -> None:
    assert "asym_ensemble/2" in json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "versions.json").read_text())["members"]
    assert pq.read_table(out / "query.parquet").num_rows > 0


STEPS = {
    "embed-member": Step(
        lambda lay, out: ["embed-member", "--dataset", str(lay.dataset), "--query-model", str(lay.model("query")),
                          "--gallery-model", str(lay.model("resnet_a")),
                          "--transform", str(lay.transformation("resnet_a")), "--out", str(out)],
        lambda lay, out: shutil.copy(lay.member("vgg_b"), out),
        lambda lay, _: lay.member("resnet_a"),
        lambda out: valid_table(out, "gallery_member"),
    ),
    "combine": Step(
        lambda lay, out: ["combine", "--member", str(lay.member("resnet_a")), "--member", str(lay.member("vgg_b")),
                          "--out", str(out)],
        lambda lay, out: combine_members([lay.member("vgg_b"), lay.member("resnet_a")], out),
        lambda lay, _: lay.gallery,
        lambda out: valid_table(out, "gallery"),
    ),
    "build-index": Step(
        lambda lay, out: ["build-index", "--gallery", str(lay.gallery), "--out", str(out), "--reject-fraction",
                          "0.1"],
        lambda lay, out: build_index(lay.gallery, out, 0.0),
        lambda lay, _: lay.index,
        load_index,
    ),
    "evaluate": Step(
        lambda lay, out: ["evaluate", "--config", str(SMOKE), "--dataset", str(lay.dataset), "--query-model",
                          str(lay.model("query")), "--gallery", str(lay.gallery),
                          *[a for n in lay.gallery_names for a in ("--transform", str(lay.transformation(n)))],
                          "--out", str(out)],
        lambda lay, out: shutil.copytree(lay.eval_dir, out),  # with KD baselines: other metrics
        _evaluation_without_kd,
        _valid_evaluation,
    ),
}


@pytest.mark.parametrize("name", STEPS)
def test_sigkill_leaves_the_old_output_or_the_new_one_and_a_rerun_completes(name, smoke_run, tmp_path):
    lay, _ = smoke_run
    step = STEPS[name]
    reference = step.reference(lay, tmp_path / "reference")
    out = tmp_path / "out" / reference.name
    out.parent.mkdir()
    step.previous(lay, out)
    old, new = snapshot(out), snapshot(reference)
    assert old is not None and old != new
    argv, log = step.argv(lay, out), tmp_path / "stderr.log"

    # 1: the moment its temporary output appears, i.e. while it writes
    killed, t_write = cmce(argv, log, new_temp(out))
    check_after_kill(out, old, new, step.validate)
    kills = [killed]
    # 2: halfway to that moment: while it starts, reads and computes
    # 3: just after it (the write's timing varies from run to run: mid-write, at the rename, or done)
    for fraction in (0.5, 1.02):
        kills.append(cmce(argv, log, lambda t, f=fraction: t >= f * t_write)[0])
        check_after_kill(out, old, new, step.validate)
    assert any(kills)  # (a run that beat its kill must have left the new output: checked too)

    # a re-run: undisturbed result, and the killed runs' leftovers (once stale) are gone
    age([out.parent / n for n in leftovers(out)])
    assert not cmce(argv, log)[0]
    assert snapshot(out) == new
    assert leftovers(out) == []


def test_sigkilled_training_resumes_from_its_last_epoch_to_the_same_weights(smoke_run, tmp_path):
    """`cmce train` killed after epoch 1, its re-run killed after epoch 2, the next killed as it saves:
    every re-run resumes (logged), and the final checkpoint is the uninterrupted run's, byte for byte."""
    lay, _ = smoke_run
    out = tmp_path / "out" / "query.pt"
    out.parent.mkdir()
    shutil.copy(lay.kd_student("resnet_a"), out)  # a previous complete checkpoint at --out
    old, new = snapshot(out), snapshot(lay.model("query"))
    resume = resume_path(out)
    argv = ["train", "--config", str(SMOKE), "--dataset", str(lay.dataset), "--model", "query", "--out", str(out)]
    epochs = load_config(SMOKE).train.epochs

    def inode() -> int | None:
        try:
            return resume.stat().st_ino
        except FileNotFoundError:
            return None

    def resume_written() -> Callable[[float], bool]:
        """Kill trigger: a new resume file is in place (an epoch has just finished)."""
        before = inode()
        return lambda _: inode() not in (before, None)

    def ours(name: str) -> bool:
        return name == resume.name or bool(temp_pattern(resume).fullmatch(name))

    done = 0
    for attempt in range(4):  # the last one only when the third kill came before the checkpoint was in place
        age([out.parent / n for n in leftovers(out) if n != resume.name])
        log = tmp_path / f"train{attempt}.log"
        killed, _ = cmce(argv, log, resume_written() if attempt < 3 else None)
        if done:
            assert f"resuming from {resume} after epoch {done} of {epochs}" in log.read_text()
        if not killed:
            break
        check_after_kill(out, old, new, load_embedding_model, ours)
        saved = int(torch.load(resume, map_location="cpu", weights_only=True)["epoch"])
        assert saved > done
        done = saved
    assert done >= 2, "the kills did not land between epochs"
    assert file_sha256(out) == file_sha256(lay.model("query"))
    a, b = load_embedding_model(out).net.state_dict(), load_embedding_model(lay.model("query")).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert snapshot(out) == new and leftovers(out) == []


def test_index_left_mid_swap_is_restored_by_the_next_load_or_build(smoke_run, tmp_path):
    """A kill between atomic_dir's two renames leaves only `.index.old` (the previous complete index)
    and the new one under its temporary name; simulated here by doing the first rename by hand."""
    lay, _ = smoke_run
    out = tmp_path / "index"
    build_index(lay.gallery, out, 0.0)
    old = snapshot(out)
    half_built = tmp_path / ".index.cmce-abcdefgh.tmp"
    shutil.copytree(lay.index, half_built)
    (half_built / "meta.json").unlink()
    os.replace(out, tmp_path / ".index.old")

    assert load_index(out).meta["n_rejected"] == 0  # the previous index, back in place
    assert snapshot(out) == old and not (tmp_path / ".index.old").exists()

    os.replace(out, tmp_path / ".index.old")  # the same window again, now followed by a rebuild
    age([half_built])
    build_index(lay.gallery, out, 0.1)
    assert snapshot(out) == snapshot(lay.index)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
