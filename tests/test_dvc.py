"""`dvc repro` of dvc.yaml on the smoke params in a temporary copy: clean status after, same metrics as
`cmce run` (and so as the KFP run), metrics/plots readable by DVC, outputs pushed to the local remote."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SMOKE


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvcrepo")
    for name in (".dvc", ".dvcignore", "dvc.yaml", "src"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    shutil.rmtree(repo / ".dvc" / "tmp", ignore_errors=True)
    shutil.copy(SMOKE, repo / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    res = _dvc(repo, "repro")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return repo


def test_repro_then_status_is_clean(dvc_repo):
    res = _dvc(dvc_repo, "status")
    assert res.returncode == 0 and "up to date" in res.stdout, res.stdout


def test_same_metrics_as_the_in_process_run(dvc_repo, smoke_run):
    _, expected = smoke_run
    res = _dvc(dvc_repo, "metrics", "show", "--json")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    metrics = next(iter(shown.values()))["data"]["artifacts/eval/metrics.json"]["data"]
    assert metrics.keys() == expected.keys()
    for key in expected:
        assert metrics[key] == pytest.approx(expected[key], nan_ok=True), key


def test_plots_and_push(dvc_repo, tmp_path):
    res = _dvc(dvc_repo, "plots", "show", "-o", str(tmp_path / "plots"))
    assert res.returncode == 0, res.stderr
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "recall.png" in html and "rejection.png" in html
    res = _dvc(dvc_repo, "push")
    assert res.returncode == 0, res.stderr
    assert any((dvc_repo / "dvc-storage").rglob("*")), "nothing pushed to the local remote"


def test_params_change_reruns_only_downstream(dvc_repo):
    params = dvc_repo / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("reject_fraction: 0.1", "reject_fraction: 0.2"))
        res = _dvc(dvc_repo, "status")
        assert "build_index" in res.stdout and "train_query" not in res.stdout, res.stdout
    finally:
        params.write_text(original)
