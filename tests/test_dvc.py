"""`dvc repro` of dvc.yaml on the smoke params in a temporary copy: clean status after, same metrics as
`cmce run` (and so as the KFP run), metrics/plots readable by DVC, outputs pushed to the local remote."""

import json
import shutil

import pytest
import yaml

from tests.conftest import dvc as _dvc


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


def test_same_models_as_the_in_process_run(dvc_repo, smoke_run):
    """Byte-identical checkpoints through DVC and in one process (sha256: the version artifacts record)."""
    from cmce.storage import file_sha256

    lay, _ = smoke_run
    art = dvc_repo / "artifacts"
    pairs = [(art / "models" / "query.pt", lay.model("query"))]
    for g in lay.gallery_names:
        pairs += [(art / "models" / f"{g}.pt", lay.model(g)), (art / "transforms" / f"{g}.pt", lay.transformation(g)),
                  (art / "kd" / g / "student.pt", lay.kd_student(g))]
    for made, expected in pairs:
        assert file_sha256(made) == file_sha256(expected), made


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


def test_kd_disabled_leaves_the_student_folders_empty(dvc_repo, smoke_run, tmp_path):
    """kd.enabled: false re-runs only the train_kd stages (now no-ops, their folders empty) and evaluate."""
    repo = tmp_path / "repo"
    shutil.copytree(dvc_repo, repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["kd"]["enabled"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    res = _dvc(repo, "repro")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Running stage 'train_kd@" in res.stdout and "Running stage 'train_query'" not in res.stdout, res.stdout
    names = [g["name"] for g in params["gallery_models"]]
    assert [sorted((repo / "artifacts" / "kd" / n).iterdir()) for n in names] == [[] for _ in names]
    _, expected = smoke_run
    got = json.loads((repo / "artifacts" / "eval" / "metrics.json").read_text())
    assert got.keys() == {k for k in expected if not k.startswith("kd/")}
    for key in got:
        assert got[key] == pytest.approx(expected[key], nan_ok=True), key
