"""Where each step computes (cmce.device), tested on the CPU with torch.cuda.is_available mocked: the
resolution rules, the CLI flag against the config key, the device recorded with the step, and the KFP
training component choosing the GPU its pod was given."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from cmce import device as devices
from cmce import distributed as ddp
from cmce.cli import main
from cmce.records import StepRecord
from tests.conftest import SMOKE


@pytest.fixture
def gpu(monkeypatch):
    """This process sees one (pretend) CUDA device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Pretend GPU")


@pytest.fixture(autouse=True)
def back_to_auto():
    yield
    devices.select("auto")


def test_auto_is_cuda_when_torch_sees_a_gpu_and_the_cpu_otherwise(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve("auto") == torch.device("cuda", 0)
    assert devices.resolve("cuda") == torch.device("cuda", 0)
    assert devices.resolve("cpu") == torch.device("cpu")  # asked for: the CPU even beside a GPU


def test_cuda_without_a_gpu_and_unknown_names_are_refused_naming_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(devices.DeviceError, match=r"params.yaml: device: cuda was asked for, but torch sees no"):
        devices.resolve("cuda", "params.yaml: device")
    with pytest.raises(devices.DeviceError, match=r"--device: 'gpu' is not one of \['auto', 'cpu', 'cuda'\]"):
        devices.resolve("gpu", "--device")


def test_without_a_process_group_the_selected_device_is_current(gpu):
    devices.select("auto")
    assert devices.current() == torch.device("cuda", 0)
    devices.select("cpu")
    assert devices.current() == torch.device("cpu")


def test_a_process_group_decides_per_rank():
    assert ddp.Context(1, 2, 1, "nccl").device == torch.device("cuda", 1)
    assert ddp.Context(1, 2, 1, "gloo").device == torch.device("cpu")


def test_torchrun_backend_follows_the_device(gpu):
    devices.select("auto")
    assert ddp.default_backend() == "nccl"
    devices.select("cpu")
    assert ddp.default_backend() == "gloo"


def test_the_config_key_is_checked_at_load_time(tmp_path):
    from cmce.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"device: 'gpu' is not one of \['auto', 'cpu', 'cuda'\]"):
        load_config(SMOKE, {"device": "gpu"})
    assert load_config(SMOKE).device == "auto"


def _capture_train(monkeypatch) -> dict:
    """Replace the training step by one that records where it would compute."""
    seen: dict = {}

    def fake_train(*args) -> None:  # dataset, spec, data_cfg, train_cfg, out, role, key
        seen["device"] = devices.current()

    monkeypatch.setattr("cmce.stages.train_embedding_model", fake_train)
    monkeypatch.setattr("cmce.stages.record_model", lambda cfg, out, role: StepRecord("train-query"))
    return seen


def test_the_flag_wins_over_the_config_and_the_config_over_auto(gpu, monkeypatch, tmp_path):
    seen = _capture_train(monkeypatch)
    base = ["train", "--config", str(SMOKE), "--dataset", str(tmp_path / "d.parquet"), "--model", "query",
            "--out", str(tmp_path / "q.pt")]
    assert main(base) == 0
    assert seen["device"] == torch.device("cuda", 0)  # the smoke config says nothing: auto
    assert main(base + ["--set", "device=cpu"]) == 0
    assert seen["device"] == torch.device("cpu")
    on_cpu = tmp_path / "cpu.yaml"  # a config file that says cpu: the flag wins
    on_cpu.write_text(SMOKE.read_text().replace("device: auto", "device: cpu"))
    assert main(["--device", "cuda", *base[:2], str(on_cpu), *base[3:]]) == 0
    assert seen["device"] == torch.device("cuda", 0)
    # the flag and --set both on the command line: refused, not one of them dropped without a word
    assert main(["--device", "cuda", *base, "--set", "device=cpu"]) == 2


def test_a_step_asked_for_cuda_on_a_cpu_machine_exits_2_naming_the_key(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = _capture_train(monkeypatch)
    argv = ["train", "--config", str(SMOKE), "--set", "device=cuda", "--dataset", str(tmp_path / "d.parquet"),
            "--model", "query", "--out", str(tmp_path / "q.pt")]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert not seen
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"{SMOKE}: device: cuda was asked for" in errors[0]


def test_the_device_is_logged_and_recorded_with_the_steps_tracking_params(gpu, monkeypatch, tmp_path, caplog):
    _capture_train(monkeypatch)
    logged: dict = {}
    monkeypatch.setattr("cmce.tracking.log_step", lambda uri, parent, step, params, *rest: logged.update(params))
    monkeypatch.setattr("cmce.tracking.check_parent_run", lambda uri, run_id: None)  # no tracking store here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")  # main sets it: restored after the test
    argv = ["--mlflow-parent", "run123", "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", "train", "--config",
            str(SMOKE), "--dataset", str(tmp_path / "d.parquet"), "--model", "query", "--out", str(tmp_path / "q.pt")]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert logged["device"] == "cuda:0 (Pretend GPU)" and logged["deterministic"] is False
    assert any("computing on cuda:0 (Pretend GPU)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("config_device", "expected"), [("auto", "cuda"), ("cpu", "cpu")])
def test_the_kfp_training_component_uses_the_gpu_of_its_pod(gpu, monkeypatch, tmp_path, config_device, expected):
    """The KFP train task runs the CUDA image with one GPU: the component's own code path (the config → the
    stage) must pick it without torchrun, and keep the CPU when the config says so."""
    from components.steps import train_model

    seen = _capture_train(monkeypatch)
    config = tmp_path / "config.yaml"
    config.write_text(SMOKE.read_text().replace("device: auto", f"device: {config_device}"))
    tracking = tmp_path / "tracking.json"
    tracking.write_text(json.dumps({"uri": "", "run_id": ""}))
    train_model.python_func(config=SimpleNamespace(path=str(config)), tracking=SimpleNamespace(path=str(tracking)),
                            model_name="query", dataset=SimpleNamespace(path=str(tmp_path / "d.parquet")),
                            model=SimpleNamespace(path=str(tmp_path / "q.pt")))
    assert seen["device"].type == expected


@pytest.mark.parametrize(("config", "expected"), [(None, ("cuda", None)), ("cpu", ("cpu", 1))])
def test_an_embedding_step_given_a_config_computes_on_its_device_with_its_threads(gpu, monkeypatch, tmp_path,
                                                                                     config, expected):
    """embed-member took no config: DVC's embed_member stage embedded on the GPU in bf16 although params.yaml said
    `device: cpu` (which every other stage and `cmce run` obeyed), with torch's thread count, not num_threads."""
    seen: dict = {}

    def fake_embed(inputs, outputs) -> StepRecord:
        seen["device"], seen["threads"] = devices.current().type, torch.get_num_threads()
        return StepRecord("embed")

    monkeypatch.setattr("cmce.stages.embed_member", fake_embed)
    argv = ["embed-member", "--dataset", str(tmp_path / "d.parquet"), "--query-model", str(tmp_path / "q.pt"),
            "--gallery-model", str(tmp_path / "g.pt"), "--transform", str(tmp_path / "t.pt"),
            "--out", str(tmp_path / "m.parquet")]
    if config:
        (tmp_path / "c.yaml").write_text(SMOKE.read_text().replace("device: auto", f"device: {config}")
                                          .replace("num_threads: null", "num_threads: 1"))
        argv += ["--config", str(tmp_path / "c.yaml")]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert (seen["device"], seen["threads"] if config else None) == expected


FIRST_SQRT = """
import hashlib, sys, torch
{setup}
torch.manual_seed(0)
x = torch.rand(24576) * 1e-6  # large enough for torch to split the sqrt across threads
print(hashlib.sha256(x.sqrt().numpy().tobytes()).hexdigest())
"""


def test_the_first_vector_math_call_of_a_process_is_reproducible():
    # Without settle_cpu_vector_math about 1 fresh process in 4 computed part of this first sqrt with another
    # MKL kernel (2-core Xeon): 12 processes would then all agree with a settled one by chance only (~2 %).
    reference = subprocess.run([sys.executable, "-c", FIRST_SQRT.format(setup="torch.ones(16).sqrt()")],
                               capture_output=True, text=True, check=True).stdout
    # one at a time: the race needs both threads of a process running at once
    runs = [subprocess.run([sys.executable, "-c", FIRST_SQRT.format(setup="import cmce.device")],
                           capture_output=True, text=True, check=True).stdout for _ in range(12)]
    assert runs == [reference] * 12


def test_a_rank_beyond_the_visible_gpus_is_refused_naming_local_rank(gpu, monkeypatch):
    """Two ranks on a node that shows each process one GPU (CUDA_VISIBLE_DEVICES): rank 1 died with CUDA's
    "invalid device ordinal" from deep in torch."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail(f"set_device({i}) was tried"))
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500", "CUDA_VISIBLE_DEVICES": "3"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"^environment variable LOCAL_RANK=1: this rank would use GPU 1, but torch "
                                         r"sees 1 \(CUDA_VISIBLE_DEVICES=3\)"):
        ddp.init_from_env("nccl")


@pytest.fixture
def determinism_restored(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored (unset) after the test
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


def test_deterministic_asks_torch_for_deterministic_kernels_and_false_gives_them_back(determinism_restored):
    """On CUDA, cuDNN's convolution gradients and cuBLAS sum in no fixed order: `deterministic: true` is the one way
    to the same bytes run to run there. cuBLAS reads its workspace setting when its handle is made, so the stage sets
    it first (a value the user gave is kept)."""
    import dataclasses
    import os

    from cmce import stages
    from cmce.config import load_config

    cfg = load_config(SMOKE)
    assert cfg.deterministic is False  # the default: the faster kernels
    stages.use_device(dataclasses.replace(cfg, deterministic=True))
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    stages.use_device(cfg)  # the next step of the same process (cmce run, a DVC stage) as its config says
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_deterministic_training_on_the_cpu_writes_the_same_bytes(determinism_restored, tmp_path, smoke_run):
    """The CPU's kernels are deterministic already: the setting changes nothing there but its record."""
    from cmce.storage import file_sha256

    lay, _ = smoke_run
    shas = []
    for value in ("false", "true"):
        out = tmp_path / f"q_{value}.pt"
        assert main(["--threads", "1", "train", "--config", str(SMOKE), "--set", "train.epochs=1", "--set",
                     f"deterministic={value}", "--dataset", str(lay.dataset), "--model", "query",
                     "--out", str(out)]) == 0
        shas.append(file_sha256(out))
    assert shas[0] == shas[1]
