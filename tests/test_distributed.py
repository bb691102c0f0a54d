"""Data-parallel training: two torchrun ranks (gloo, 127.0.0.1) end with identical weights, and resume together;
without torchrun nothing changes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmce import distributed as ddp
from cmce.checkpoint import load_embedding_model
from cmce.cli import main
from cmce.transform import load_transformation
from tests.conftest import ROOT, SMOKE

WORLD = 2
SMOKE_BATCH = 64  # train.batch_size in configs/smoke.yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_data") / "d.parquet"
    assert main(["prepare-data", "--config", str(SMOKE), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/ddp_worker.py on 2 gloo ranks: train query, KD student, fit-transform through the CLI."""
    out = tmp_path_factory.mktemp("ddp")
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "tests" / "ddp_worker.py"), str(out), str(SMOKE), str(dataset)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return out


def _ranks(run: Path, tag: str) -> list[dict]:
    return [torch.load(run / "ranks" / f"{tag}_rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tag", ["query", "kd_query"])
def test_ranks_end_with_identical_trained_weights(ddp_run, tag):
    r0, r1 = _ranks(ddp_run, tag)
    _assert_same(r0["final"], r1["final"])  # parameters and BatchNorm buffers
    _assert_same(r0["initial"], r1["initial"])
    changed = [k for k in r0["final"] if k.endswith("weight") and not torch.equal(r0["final"][k], r0["initial"][k])]
    assert len(changed) >= 3, "training did not change the weights"
    assert r0["history"] == r1["history"]  # epoch loss/metric averaged over the ranks


@pytest.mark.parametrize("tag", ["query", "kd_query"])
def test_each_rank_trains_on_its_half_of_every_global_batch(ddp_run, tag):
    r0, r1 = _ranks(ddp_run, tag)
    train_rows = load_embedding_model(ddp_run / "q.pt").meta["train_images"]
    steps = train_rows // SMOKE_BATCH
    assert r0["sizes"] == r1["sizes"] == [SMOKE_BATCH // WORLD] * steps  # same step count: no rank waits forever
    assert not torch.equal(r0["first_batch"], r1["first_batch"])


def test_rank0_checkpoints_hold_the_shared_weights(ddp_run):
    r0, _ = _ranks(ddp_run, "query")
    model = load_embedding_model(ddp_run / "q.pt")  # net = module 0, cosine head = module 1
    _assert_same(model.net.state_dict(), {k[2:]: v for k, v in r0["final"].items() if k.startswith("0.")})
    assert torch.equal(model.classifier, r0["final"]["1.weight"])
    assert model.meta["history"] == r0["history"]
    student = load_embedding_model(ddp_run / "s.pt")
    _assert_same(student.net.state_dict(), _ranks(ddp_run, "kd_query")[0]["final"])
    t0, t1 = _ranks(ddp_run, "transform")
    _assert_same(t0["final"], t1["final"])
    _assert_same(load_transformation(ddp_run / "t.pt").mlp.state_dict(), t0["final"])
    # one writer: the three outputs and the per-rank records, no leftover temporary files
    assert sorted(p.name for p in ddp_run.iterdir()) == ["q.pt", "ranks", "s.pt", "t.pt"]


def test_without_torchrun_training_is_single_process(dataset, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not ddp.launched() and ddp.current() == ddp.Context()
    out = tmp_path / "q.pt"
    threads = torch.get_num_threads()  # one thread, like each torchrun rank: far faster on a busy small machine
    try:
        assert main(["--threads", "1", "train", "--config", str(SMOKE), "--set", "train.epochs=1",
                     "--dataset", str(dataset), "--model", "query", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert not torch.distributed.is_initialized()
    model = load_embedding_model(out)
    assert model.meta["history"][0]["metric"] > 0.1  # above the 10-class chance level after one epoch


def test_rank_share_splits_a_batch_into_equal_disjoint_parts():
    rows = torch.arange(10)
    parts = [rows[ddp.rank_share(10, r, 2)] for r in range(2)]
    assert torch.equal(torch.cat(parts), rows)
    three = [rows[ddp.rank_share(7, r, 3)].tolist() for r in range(3)]
    assert three == [[0, 1], [2, 3], [4, 5]]  # the remainder of a short batch is dropped on every rank
    assert ddp.rank_share(10, 0, 1) == slice(None)
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        ddp.rank_share(3, 0, 4)


def test_global_batch_must_divide_by_world_size():
    ddp.check_batch_size(64, ddp.Context(0, 2, 0, "gloo"), "train.batch_size")
    with pytest.raises(ValueError, match=r"train.batch_size=65 .* world size 2"):
        ddp.check_batch_size(65, ddp.Context(0, 2, 0, "gloo"), "train.batch_size")


def test_other_subcommands_refuse_several_ranks(tmp_path, monkeypatch, caplog):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = main(["build-index", "--gallery", str(tmp_path / "g.parquet"), "--out", str(tmp_path / "index")])
    assert rc == 2 and "does not run data-parallel" in caplog.text
    assert not torch.distributed.is_initialized() and list(tmp_path.iterdir()) == []


def test_a_rank_killed_mid_training_is_one_line_on_the_others(dataset, tmp_path):
    """A peer rank killed (out of memory, a node lost): rank 0 printed a 30-line gloo traceback ending
    `RuntimeError: ... Connection reset by peer`."""
    import signal
    import time

    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    port = _free_port()
    ranks, logs = [], []
    for rank in range(WORLD):
        env = {**os.environ, "PYTHONPATH": path, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "CMCE_DDP_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
        logs.append(tmp_path / f"rank{rank}.log")
        ranks.append(subprocess.Popen(
            [sys.executable, "-m", "cmce", "train", "--config", str(SMOKE), "--set", "train.epochs=300", "--dataset",
             str(dataset), "--model", "query", "--out", str(tmp_path / "q.pt")],
            env=env, stdout=subprocess.DEVNULL, stderr=logs[-1].open("w")))
    try:
        deadline = time.monotonic() + 240
        while "epoch 2/300" not in logs[0].read_text():  # both ranks are in the training loop
            assert ranks[0].poll() is None and time.monotonic() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL)
        assert ranks[0].wait(timeout=120) == 1, logs[0].read_text()[-3000:]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = logs[0].read_text()
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert "Traceback" not in text and len(errors) == 1, text[-3000:]
    assert "cmce train: rank 0 of 2: lost rank 1" in errors[0], errors[0]


def test_ranks_stopped_while_training_to_s3_resume_together_from_its_resume_object(dataset, s3_server, tmp_path):
    """With an s3:// --out the ranks other than 0 write to scratch copies: unless those stand for the output's URI,
    they find no state when run again, disagree with rank 0 (which fetched it) and all start over."""
    import signal
    import time

    bucket = f"cmce-ddp-{os.getpid()}"
    s3_server.client().create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/q.pt"
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])

    def ranks(run: str) -> tuple[list[subprocess.Popen], list[Path]]:
        port, procs, logs = _free_port(), [], []
        for rank in range(WORLD):
            env = {**os.environ, **s3_server.env(), "PYTHONPATH": path, "RANK": str(rank), "WORLD_SIZE": str(WORLD),
                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "CMCE_DDP_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
            logs.append(tmp_path / f"{run}_rank{rank}.log")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "cmce", "train", "--config", str(SMOKE), "--set", "train.epochs=20",
                 "--dataset", str(dataset), "--model", "query", "--out", out],
                env=env, stdout=subprocess.DEVNULL, stderr=logs[-1].open("w")))
        return procs, logs

    def stored() -> set[str]:
        return {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])}

    procs, logs = ranks("stopped")
    try:
        deadline = time.monotonic() + 240
        while "q.pt.resume" not in stored():  # the state after the first epoch is up
            assert procs[0].poll() is None and time.monotonic() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.1)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=120) for proc in procs] != [0, 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert stored() == {"q.pt.resume"}, logs[0].read_text()[-3000:]
    procs, logs = ranks("again")
    assert [proc.wait(timeout=240) for proc in procs] == [0, 0], logs[0].read_text()[-3000:]
    text = "".join(log.read_text() for log in logs)
    assert "resuming from" in text and "disagree" not in text, text[-3000:]
    assert stored() == {"q.pt"}
