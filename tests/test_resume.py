"""Training resumes from its last finished epoch: an interrupted run, run again, writes the very
checkpoint an uninterrupted run writes; a resume file written for anything else is ignored.
(The same through a SIGKILLed `cmce train` process: tests/test_crash.py.)"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import cmce.resume
from cmce import distributed as ddp
from cmce import stages
from cmce.config import TransformConfig, load_config
from cmce.resume import RESUME_FORMAT, Resume, fingerprint, resume_path
from cmce.storage import file_sha256
from cmce.transform import fit_transformation
from tests.conftest import SMOKE


class Crash(Exception):
    """Stands in for the process dying right after a resume file was written."""


@contextlib.contextmanager
def crash_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> Iterator[None]:
    save = Resume.save

    def save_then_crash(self, module, opt, sched, gen, done, epochs, history, *device_generator):
        save(self, module, opt, sched, gen, done, epochs, history, *device_generator)
        if done == epoch:
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(Resume, "save", save_then_crash)
        with pytest.raises(Crash):
            yield


def _kd(cfg, lay, out):
    stages.train_kd_student(cfg, stages.StudentInputs(lay.dataset, lay.model("resnet_a")), stages.ModelOutputs(out))


def _transform(cfg, lay, out):
    stages.fit_transform(cfg, stages.FitInputs(lay.dataset, lay.model("query"), lay.model("resnet_a")),
                         stages.FitOutputs(out))


STEPS = {  # step, the smoke run's output of the same step, epochs, epoch to crash after
    "kd_student": (_kd, lambda lay: lay.kd_student("resnet_a"), 3, 1),
    "transformation": (_transform, lambda lay: lay.transformation("resnet_a"), 10, 6),
}


@pytest.mark.parametrize("name", STEPS)
def test_interrupted_training_resumes_to_the_uninterrupted_checkpoint(name, smoke_run, tmp_path, monkeypatch, caplog):
    lay, _ = smoke_run
    step, reference, epochs, crash_at = STEPS[name]
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    out = tmp_path / "out.pt"
    with crash_after_epoch(monkeypatch, crash_at):
        step(cfg, lay, out)
    assert not out.exists()
    saved = torch.load(resume_path(out), map_location="cpu", weights_only=True)  # tensors and primitives only
    assert saved["format"] == RESUME_FORMAT and saved["epoch"] == crash_at and len(saved["history"]) == crash_at
    assert isinstance(saved["rng"]["generator"], torch.Tensor) and isinstance(saved["rng"]["numpy_keys"], torch.Tensor)

    with caplog.at_level(logging.INFO, logger="cmce"):
        step(cfg, lay, out)
    assert f"resuming from {resume_path(out)} after epoch {crash_at} of {epochs}" in caplog.text
    # byte for byte, so every weight, the optimizer's trajectory and the recorded history are the same
    assert file_sha256(out) == file_sha256(reference(lay))
    assert not resume_path(out).exists()  # dropped once the output is in place


def _fit(cfg: TransformConfig, resume: Resume | None) -> tuple[dict[str, torch.Tensor], list]:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(256, 6)).astype(np.float32)
    q = (g @ rng.normal(size=(6, 4))).astype(np.float32)
    labels = rng.integers(0, 3, 256)
    mlp, history = fit_transformation(g, q, labels, torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
                                      cfg, seed=0, resume=resume, query_scale=16.0)
    return mlp.state_dict(), history


def test_a_fit_with_input_dropout_resumes_to_the_uninterrupted_one(tmp_path, monkeypatch):
    cfg = TransformConfig(hidden_dim=16, epochs=6, batch_size=32, input_dropout=0.3)
    expected_state, expected_history = _fit(cfg, None)
    plain_state, _ = _fit(TransformConfig(hidden_dim=16, epochs=6, batch_size=32), None)
    assert not all(torch.equal(plain_state[k], expected_state[k]) for k in expected_state)  # the masks count
    resume = Resume(tmp_path / "t.pt.resume", fingerprint(transform=cfg))
    with crash_after_epoch(monkeypatch, 3):
        _fit(cfg, resume)
    state, history = _fit(cfg, resume)  # continues after epoch 3: the masks of epochs 4-6 come from the saved RNG
    assert history == expected_history
    assert all(torch.equal(state[k], expected_state[k]) for k in expected_state)


def _flip_in_entry(path, part):
    """One bit flipped inside the first zip entry whose name holds `part`, its stored CRC-32 left as it was."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if part in i.filename and i.file_size > 8)
    data = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(data[info.header_offset + a:info.header_offset + a + 2], "little")
                           for a in (26, 28))
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_resume_file_for_other_settings_or_unreadable_is_ignored(tmp_path, monkeypatch, caplog):
    cfg = TransformConfig(hidden_dim=16, epochs=6, batch_size=32)
    expected_state, expected_history = _fit(cfg, None)
    path = tmp_path / "t.pt.resume"
    for written_by, needle in ((TransformConfig(hidden_dim=16, epochs=6, batch_size=32, lr=0.01),
                                "written for other settings"),
                               (None, "unreadable resume file, starting over"),
                               ("flipped", "in the checkpoint's archive does not match its bytes; starting over")):
        if written_by is None:
            path.write_bytes(b"not a checkpoint")
        elif written_by == "flipped":  # a bit of a saved weight rotted: training went on from the changed weight
            path.unlink()
            with crash_after_epoch(monkeypatch, 3):
                _fit(cfg, Resume(path, fingerprint(transform=cfg)))
            _flip_in_entry(path, "/data/")
        else:
            with crash_after_epoch(monkeypatch, 3):
                _fit(written_by, Resume(path, fingerprint(transform=written_by)))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cmce"):
            state, history = _fit(cfg, Resume(path, fingerprint(transform=cfg)))
        assert needle in caplog.text and "resuming" not in caplog.text
        assert history == expected_history
        assert all(torch.equal(state[k], expected_state[k]) for k in expected_state)


def _edit(state: dict, edit: str) -> None:
    if edit == "extra weight":
        state["model"]["zzz"] = torch.zeros(3)
    elif edit == "mis-shaped weight":
        first = next(iter(state["model"]))
        state["model"][first] = torch.zeros(2, 2)
    elif edit == "short rng":
        state["rng"]["torch"] = state["rng"]["torch"][:10]
    elif edit == "no model":
        del state["model"]
    elif edit == "history of numbers":
        state["history"] = [1, 2, 3]
    elif edit == "bad scheduler":
        state["scheduler"] = {"lr_lambdas": 1}
    elif edit == "mis-shaped optimizer moment":  # a traceback at the first optimizer step, every rerun
        moments = next(iter(state["optimizer"]["state"].values()))
        moments["exp_avg"] = torch.zeros(3, 3)
    elif edit == "short scheduler list":  # `zip() argument 2 is shorter than argument 1`, every rerun
        state["scheduler"]["base_lrs"] = state["scheduler"]["base_lrs"][:-1]
    elif edit == "no epoch":
        del state["epoch"]
    elif edit == "finished at 999":  # epoch, epochs and history edited together: the loop's own count decides
        state["epoch"] = state["epochs"] = 999
        state["history"] = state["history"] * 333
    else:  # an epoch past the end, before the start, or a text
        state["epoch"] = {"epoch 999": 999, "epoch -3": -3, "epoch as text": "1", "epoch None": None,
                          "epoch x": "x"}[edit]


@pytest.mark.parametrize("edit", ["extra weight", "mis-shaped weight", "short rng", "no model", "history of numbers",
                                  "bad scheduler", "mis-shaped optimizer moment", "short scheduler list",
                                  "epoch 999", "epoch -3", "epoch as text", "epoch None", "epoch x",
                                  "no epoch", "finished at 999"])
def test_a_resume_state_edited_inside_its_fingerprint_starts_over(tmp_path, monkeypatch, caplog, edit):
    """Tracebacks (load_state_dict, the RNG, the history), a bare key as the error (`cmce train: model`), or, with
    epoch 999, the weights of 3 finished epochs written as the finished model of 6, exit 0. Now: warned, and the
    training starts over from untouched objects (a state that failed half-way through loading is undone)."""
    cfg = TransformConfig(hidden_dim=16, epochs=6, batch_size=32)
    expected_state, expected_history = _fit(cfg, None)
    path = tmp_path / "t.pt.resume"
    with crash_after_epoch(monkeypatch, 3):
        _fit(cfg, Resume(path, fingerprint(transform=cfg)))
    state = torch.load(path, map_location="cpu", weights_only=True)
    _edit(state, edit)
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="cmce"):
        got, history = _fit(cfg, Resume(path, fingerprint(transform=cfg)))
    assert "a saved state this training cannot take" in caplog.text and "resuming" not in caplog.text
    assert history == expected_history
    assert all(torch.equal(got[k], expected_state[k]) for k in expected_state)


def test_a_model_checkpoint_at_the_resume_path_is_refused_not_deleted(tmp_path):
    """A gallery model copied to `T.pt.resume` was read as a state of another format, replaced and deleted."""
    from cmce.resume import check_resume_file
    from tests.test_bad_input import tiny_model

    model = tiny_model(tmp_path / "T.pt.resume", "vgg_b", "vgg", 10, seed=3)
    before = file_sha256(model)
    with pytest.raises(ValueError, match=r"T.pt.resume: the resume file of --out holds a cmce checkpoint "
                                         r"\(cmce-embedding-model/\d+\), not a saved training state"):
        check_resume_file(model)
    assert file_sha256(model) == before


def test_fingerprint_covers_settings_inputs_and_world_size(monkeypatch):
    base = fingerprint(kind="embedding", train={"lr": 0.005}, dataset={"sha256": "a" * 64, "size": 10})
    assert base == fingerprint(kind="embedding", train={"lr": 0.005}, dataset={"sha256": "a" * 64, "size": 10})
    assert base != fingerprint(kind="embedding", train={"lr": 0.004}, dataset={"sha256": "a" * 64, "size": 10})
    assert base != fingerprint(kind="embedding", train={"lr": 0.005}, dataset={"sha256": "b" * 64, "size": 10})
    monkeypatch.setattr(cmce.resume.ddp, "current", lambda: ddp.Context(rank=0, world_size=2, backend="gloo"))
    assert base != fingerprint(kind="embedding", train={"lr": 0.005}, dataset={"sha256": "a" * 64, "size": 10})


def test_fingerprint_covers_the_cpu_thread_count_and_the_code(monkeypatch):
    """A state saved under `--threads 2` was resumed under `--threads 1` (bytes no uninterrupted run gives, since
    another count sums in another order), and one saved by other code (an upgrade between the stop and the rerun)
    without a word."""
    parts = {"kind": "embedding", "train": {"lr": 0.005}}
    threads = torch.get_num_threads()
    base = fingerprint(**parts)
    try:
        torch.set_num_threads(threads + 1)
        assert fingerprint(**parts) != base
    finally:
        torch.set_num_threads(threads)
    assert fingerprint(**parts) == base
    monkeypatch.setattr(cmce.resume, "code_digest", lambda: "other code")
    assert fingerprint(**parts) != base
    monkeypatch.undo()
    digest = cmce.resume.code_digest()
    assert len(digest) == 64 and digest == cmce.resume.code_digest()


def test_fingerprint_covers_deterministic_kernels_on_cuda_only(monkeypatch):
    """A CUDA state saved without deterministic kernels was resumed under `deterministic: true` (bytes no
    deterministic run gives); the CPU's kernels are deterministic either way, so a CPU state stays good."""
    from types import SimpleNamespace

    parts = {"kind": "embedding"}
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        cpu = fingerprint(**parts)
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert fingerprint(**parts) == cpu
        monkeypatch.setattr(cmce.resume.ddp, "current",
                            lambda: SimpleNamespace(world_size=1, device=torch.device("cuda", 0)))
        on = fingerprint(**parts)
        torch.use_deterministic_algorithms(False)
        assert fingerprint(**parts) != on
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
