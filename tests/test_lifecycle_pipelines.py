"""The live-gallery operations as KFP pipelines (kfp.local, on the smoke KFP run's artifacts and MLflow
server) and as DVC stages (lifecycle/dvc.yaml, on top of the smoke `dvc repro`)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cmce.records import served_versions
from cmce.tables import embedding_column, read_metadata
from pipeline.__main__ import build_parser, run_local
from tests.conftest import SMOKE
from tests.conftest import dvc as _dvc


def _lifecycle_run(kfp_run: Path, tmp_path: Path, pipeline: str, monkeypatch,
                   inputs: list[str] | None = None) -> tuple[Path, str]:
    """Run a lifecycle pipeline on the artifacts of the smoke KFP run (`inputs`: by flags; default --inputs-from),
    tracked by a copy of its MLflow store (registered versions included), so the run's own aliases stay as other
    tests expect them."""
    db = tmp_path / "mlflow.db"
    shutil.copy(kfp_run.parent / "mlflow.db", db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    argv = ["run", "--local", "--pipeline", pipeline, "--params", str(SMOKE), "--root", str(tmp_path / "kfp"),
            *(inputs or ["--inputs-from", str(kfp_run)])]
    return run_local(build_parser().parse_args(argv)), uri


def _check_alias_follows_decision(uri: str, decision: dict, gallery: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for name, sha in served_versions(gallery):
        shas = [v.tags.get("sha256") for v in client.search_model_versions(f"name='{name}'")]
        assert sha in shas, f"{name}: the version served by the candidate is not registered"
        if decision["promoted"]:
            assert client.get_model_version_by_alias(name, "production").tags["sha256"] == sha, name
    if not decision["promoted"]:
        with pytest.raises(Exception, match="production"):
            client.get_model_version_by_alias("cmce-query", "production")


def test_add_gallery_model_pipeline(kfp_run, tmp_path, monkeypatch, caplog):
    run_dir, uri = _lifecycle_run(kfp_run, tmp_path, "add-gallery-model", monkeypatch, [
        "--dataset-uri", str(kfp_run / "prepare-data" / "dataset"),
        "--query-model-uri", str(kfp_run / "train-model" / "model"),
        "--gallery-uri", str(kfp_run / "merge-shards" / "gallery")])
    served, grown = kfp_run / "merge-shards" / "gallery", run_dir / "add-member" / "new_gallery"
    names = [m["name"] for m in read_metadata(grown)["members"]]
    assert names[-1] == "resnet_c" and sorted(names[:-1]) == ["resnet_a", "vgg_b"]
    old, new = pq.read_table(served), pq.read_table(grown)
    for name in names[:-1]:  # existing members are carried over, not recomputed
        col = f"raw_{name}"
        np.testing.assert_array_equal(embedding_column(new, col, "new"), embedding_column(old, col, "old"))
    index_meta = json.loads((run_dir / "build-index" / "index" / "meta.json").read_text())
    assert index_meta["members"][-1]["name"] == "resnet_c"
    decision = json.loads((run_dir / "gate" / "decision").read_text())
    assert decision["promoted"] == (not decision["regressed"])
    assert set(decision["candidate"]) == {"R@1", "MAP@R"}
    _check_alias_follows_decision(uri, decision, grown)
    # chained: the query model upgraded on the grown gallery, from the add run's folder (its dataset, query model
    # and the other members' train embeddings are found in the run it started from); a gallery the gate refused is
    # taken with a warning
    (run_dir / "gate" / "decision").write_text(json.dumps({**decision, "promoted": False, "regressed": ["MAP@R"]}))
    caplog.clear()
    chained = run_local(build_parser().parse_args(["run", "--local", "--pipeline", "upgrade-query-model", "--params",
                                                   str(SMOKE), "--root", str(tmp_path / "kfp"),
                                                   "--inputs-from", str(run_dir)]))
    assert f"{run_dir}: its gate did not promote the gallery it made (regressed on MAP@R)" in caplog.text
    upgraded = chained / "upgrade-query-model"
    assert [m["name"] for m in read_metadata(upgraded / "new_gallery")["members"]] == names
    assert len(list((upgraded / "transformations").glob("*.pt"))) == 3


def test_upgrade_query_model_pipeline(kfp_run, tmp_path, monkeypatch):
    """From the KFP run's folder itself: its train embeddings, one per task folder, are gathered for the run."""
    run_dir, uri = _lifecycle_run(kfp_run, tmp_path, "upgrade-query-model", monkeypatch)
    upgraded = run_dir / "upgrade-query-model" / "new_gallery"
    meta = read_metadata(upgraded)
    from cmce.checkpoint import load_embedding_model

    assert meta["query_model_sha256"] == load_embedding_model(run_dir / "train-model" / "model").sha256
    assert meta["upgraded_from_query_model_sha256"] == load_embedding_model(kfp_run / "train-model" / "model").sha256
    assert len(list((run_dir / "upgrade-query-model" / "transformations").glob("*.pt"))) == 2
    decision = json.loads((run_dir / "gate" / "decision").read_text())
    assert decision["promoted"] == (not decision["regressed"])
    _check_alias_follows_decision(uri, decision, upgraded)
    # the train embeddings it read are its run's inputs, by the files in the KFP run (the folder they were gathered
    # into for the run is gone)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run, = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "attributes.run_name = 'upgrade-query-model'")
    read = sorted(json.loads(d.dataset.source)["uri"] for d in run.inputs.dataset_inputs
                  if {t.value for t in d.tags} == {"train_embeddings"})
    assert read == sorted(p.resolve().as_uri() for p in kfp_run.glob("for-loop-*/fit-transform*/train_embeddings"))


def test_dvc_lifecycle_stages(dvc_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(dvc_repo, repo, symlinks=True)
    ops = repo / "lifecycle"  # a DVC project of its own, on the main project's outputs
    res = _dvc(ops, "repro")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ran = [line for line in res.stdout.splitlines() if line.startswith("Running stage")]
    # the main pipeline was already reproduced: only the lifecycle stages run
    assert len(ran) == 7, ran
    for op in ("added", "upgraded"):
        decision = json.loads((ops / "artifacts" / op / "decision.json").read_text())
        assert decision["promoted"] == (not decision["regressed"])
        assert (ops / "artifacts" / op / "index" / "meta.json").exists()
    # the upgraded query model is exported for the edge, as the KFP upgrade does (DVC exported none)
    import onnx

    from cmce.config import load_config
    from cmce.storage import file_sha256

    new_query = load_config(repo / "params.yaml").lifecycle.new_query_model.name
    exported = onnx.load(ops / "artifacts" / "edge" / f"{new_query}.onnx")
    props = {p.key: p.value for p in exported.metadata_props}
    assert props["query_model_sha256"] == file_sha256(ops / "artifacts" / "models" / f"{new_query}.pt")
    res = _dvc(ops, "metrics", "show", "--json")
    assert res.returncode == 0 and "artifacts/upgraded/decision.json" in res.stdout, res.stdout[-2000:]
    for where in (ops, repo):
        res = _dvc(where, "status")
        assert "up to date" in res.stdout, res.stdout
