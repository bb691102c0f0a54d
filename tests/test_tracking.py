"""What a tracked run records in MLflow: code and data versions on every run, the data sets a step read as
its inputs, the gallery and index as artifacts of the steps that made them, headline metrics on the parent."""

import os
import re
from pathlib import Path

import pytest

from cmce import stages
from cmce.config import load_config
from cmce.evaluate import EvalInputs
from cmce.records import StepRecord
from cmce.runner import run_stage
from cmce.storage import file_sha256
from cmce.tracking import DATA_TAG, GIT_COMMIT_TAG, TrackingInfo, start_parent_run
from tests.conftest import SMOKE


@pytest.fixture(scope="module")
def tracked(smoke_run, tmp_path_factory):
    """The smoke run's last steps published under one parent run: a dataset step, combine, build-index, evaluate."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CMCE_GIT_COMMIT", "0123abcd")
        return _publish(smoke_run, tmp_path_factory.mktemp("tracked"))


def _publish(smoke_run, tmp_path):
    from mlflow import MlflowClient

    lay, _ = smoke_run
    cfg = load_config(SMOKE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    info = TrackingInfo(uri, start_parent_run(uri, "cmce", cfg.to_dict()))
    run_stage(lambda: StepRecord("prepare-data", inputs=[("dataset", lay.dataset)]), tracking=info)
    members = [lay.member(n) for n in lay.gallery_names]
    run_stage(stages.combine, stages.FilesInputs(members), stages.GalleryOutputs(tmp_path / "gallery.parquet"),
              tracking=info)
    run_stage(stages.build_gallery_index, cfg.index, stages.IndexInputs(lay.gallery),
              stages.IndexOutputs(tmp_path / "index"), tracking=info)
    transforms = [lay.transformation(n) for n in lay.gallery_names]
    inputs = EvalInputs(lay.dataset, lay.model("query"), lay.gallery, transforms, [], tmp_path / "index")
    run_stage(stages.evaluate_all, cfg, inputs, stages.EvalOutputs(tmp_path / "eval"), tracking=info)
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(info.run_id)
    children = {r.info.run_name: r for r in client.search_runs([parent.info.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == info.run_id}
    return lay, client, parent, children


def test_every_run_carries_the_code_and_data_versions(tracked):
    lay, _, parent, children = tracked
    data_sha = file_sha256(lay.dataset)
    assert set(children) == {"prepare-data", "combine", "build-index", "evaluate"}
    for run in [parent, *children.values()]:
        assert run.data.tags[GIT_COMMIT_TAG] == "0123abcd", run.info.run_name
        # build-index and combine read no dataset: they inherit the parent's data version
        assert run.data.tags[DATA_TAG] == data_sha, run.info.run_name


def test_the_headline_numbers_are_on_the_parent_run(tracked):
    _, _, parent, children = tracked
    evaluation = children["evaluate"].data.metrics
    assert parent.data.metrics["ensemble/R_at_1"] == evaluation["asym_ensemble/2/R_at_1"]
    assert parent.data.metrics["ensemble/MAP_at_R"] == evaluation["asym_ensemble/2/MAP_at_R"]
    assert 0 < parent.data.metrics["index/neighbour_recall_at_10"] <= 1  # the index's setting reaches a metric
    assert len(parent.data.metrics) < 25


def test_the_parent_run_keeps_the_config_as_one_file(tracked, tmp_path):
    import json
    from pathlib import Path

    _, client, parent, _ = tracked
    local = Path(client.download_artifacts(parent.info.run_id, "config.json", str(tmp_path)))
    assert json.loads(local.read_text()) == load_config(SMOKE).to_dict()


def test_data_sets_are_run_inputs(tracked):
    lay, _, _, children = tracked
    inputs = children["evaluate"].inputs.dataset_inputs
    by_role = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_role) == {"dataset", "gallery"}
    assert by_role["dataset"].digest == file_sha256(lay.dataset)[:16]
    assert by_role["gallery"].digest == file_sha256(lay.gallery)[:16]
    assert lay.dataset.name in by_role["dataset"].source


def test_gallery_and_index_are_artifacts_of_the_runs_that_made_them(tracked):
    _, client, _, children = tracked
    assert [a.path for a in client.list_artifacts(children["combine"].info.run_id)] == ["gallery.parquet"]
    index = {a.path for a in client.list_artifacts(children["build-index"].info.run_id, "index")}
    assert index == {f"index/{f}" for f in ("index.faiss", "ids.parquet", "rejected.parquet", "meta.json")}


def test_a_big_output_is_referenced_not_copied(smoke_run, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    lay, _ = smoke_run
    monkeypatch.setattr("cmce.tracking.ARTIFACT_MAX_MB", 0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    info = TrackingInfo(uri, start_parent_run(uri, "cmce", {}))
    out = tmp_path / "gallery.parquet"
    run_stage(stages.combine, stages.FilesInputs([lay.member(n) for n in lay.gallery_names]),
              stages.GalleryOutputs(out), tracking=info)
    client = MlflowClient(tracking_uri=uri)
    run = next(r for r in client.search_runs([client.get_run(info.run_id).info.experiment_id])
               if r.info.run_name == "combine")
    assert client.list_artifacts(run.info.run_id) == []
    assert run.data.tags["artifact.gallery.parquet"] == f"{out} sha256={file_sha256(out)}"


def test_the_registered_query_model_loads_with_mlflow_pyfunc(smoke_run, tmp_path):
    """Models from code: MLflow keeps cmce/pyfunc_model.py and the checkpoint (no pickle); load_model runs the code,
    which loads the weights weights-only; the signature is the uint8 pixel batch in, the embedding out."""
    import mlflow
    import numpy as np
    import torch
    from mlflow import MlflowClient

    from cmce.checkpoint import load_embedding_model
    from cmce.embed import embed_batch
    from cmce.tracking import PYFUNC, log_step

    lay, _ = smoke_run
    query = lay.model("query")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_step(uri, start_parent_run(uri, "cmce", {}), "train", register=[("cmce-query", query, file_sha256(query))])
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version_by_alias(PYFUNC, "candidate")
    assert version.tags["sha256"] == file_sha256(query)
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{PYFUNC}@candidate")
    model = load_embedding_model(query)
    shape = (5, model.in_channels, model.image_size, model.image_size)
    spec = loaded.metadata.get_input_schema().inputs[0]
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, *shape[1:])
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(loaded.predict(pixels), embed_batch(model, torch.from_numpy(pixels)))
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/{PYFUNC}/1", dst_path=str(tmp_path / "dl")))
    files = {p.name for p in logged.rglob("*")}
    assert "pyfunc_model.py" in files and "query.pt" in files and not any(f.endswith(".pkl") for f in files)
    # cmce travels in the model; the environment MLflow restores installs its pinned dependencies, not a package a
    # public index calls `cmce` (a bare requirement did)
    assert (logged / "code" / "cmce" / "checkpoint.py").is_file()
    wanted = (logged / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in wanted) and f"mlflow=={mlflow.__version__}" in wanted
    assert not [r for r in wanted if r.split("==")[0] == "cmce"]


def test_the_one_process_run_is_tracked_like_the_pipeline_runs(tmp_path):
    """`cmce --mlflow-uri U run` opens a parent run with the config, one nested run per stage, the headline
    numbers on the parent, the models registered as candidates, and the same metrics as an untracked run."""
    import json

    from mlflow import MlflowClient

    from cmce.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["--mlflow-uri", uri, "run", "--config", str(SMOKE), "--set", f"output_dir={tmp_path / 'run'}"]) == 0
    client = MlflowClient(tracking_uri=uri)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("cmce").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name for r in client.search_runs([parent.info.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    cfg = load_config(SMOKE)
    names = [g.name for g in cfg.gallery_models]
    assert {"prepare-data", "combine", "build-index", "evaluate", *(f"embed-{g}" for g in names)} <= children
    assert parent.info.status == "FINISHED" and "config.json" in {a.path for a in client.list_artifacts(
        parent.info.run_id)}
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert parent.data.metrics["ensemble/R_at_1"] == metrics["asym_ensemble/2"]["R@1"]
    query = client.get_model_version_by_alias("cmce-query", "candidate")
    assert query.tags["sha256"] == file_sha256(tmp_path / "run" / "models" / f"{cfg.query_model.name}.pt")


@pytest.mark.parametrize("value, recorded", [
    ("0123abcd", "0123abcd"),
    ("a" * 40, "a" * 40),
    ("x" * 9000, None),  # free text of any length went into every run's tag
    ("0123abc; rm -rf", None),
    ("abc12", None),  # too short to name a commit
])
def test_the_commit_variable_is_recorded_only_when_it_is_a_commit_id(monkeypatch, caplog, value, recorded):
    from cmce.tracking import code_tags

    monkeypatch.setenv("CMCE_GIT_COMMIT", value)
    monkeypatch.setattr("cmce.tracking._git_head", lambda: None)
    assert code_tags() == ({GIT_COMMIT_TAG: recorded} if recorded else {})
    assert ("CMCE_GIT_COMMIT" in caplog.text) == (recorded is None)


def test_a_step_whose_tracking_fails_ends_its_run_failed(tmp_path, monkeypatch):
    """A nested run whose records failed half-way was left RUNNING: a step still going, to anyone looking."""
    from mlflow import MlflowClient

    import cmce.tracking
    from cmce.tracking import log_step

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "cmce", {})

    def failing(*args, **kwargs):
        raise OSError("the store went away")

    monkeypatch.setattr(cmce.tracking, "log_datasets", failing)
    with pytest.raises(OSError, match="the store went away"):
        log_step(uri, parent, "build-index", {"a": 1}, {"m": 1.0})
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_run(parent).info.experiment_id], "attributes.run_name = 'build-index'")
    assert [r.info.status for r in runs] == ["FAILED"]


class _FullStdout:
    """Standard output on a full disk (`> /dev/full`): every write fails."""

    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


def test_mlflows_own_console_lines_do_not_fail_tracking_on_an_http_store(tmp_path, monkeypatch):
    """On an HTTP store MLflow writes "View run … at: URL" to standard output as a run ends: with stdout full (or
    an ascii encoding, for its emoji) the step was "written but not tracked" and its run left RUNNING."""
    import socket
    import subprocess
    import sys
    import time

    import requests
    from mlflow import MlflowClient

    from cmce.tracking import log_step

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'http.db'}", "--artifacts-destination", str(tmp_path / "art"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or slow to answer its first
                time.sleep(0.2)
        parent = start_parent_run(uri, "cmce", {})
        monkeypatch.setattr(sys, "stdout", _FullStdout())
        rid = log_step(uri, parent, "build-index", {"a": 1}, {"m": 1.0})
        monkeypatch.undo()
        assert MlflowClient(tracking_uri=uri).get_run(rid).info.status == "FINISHED"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_mlflow_experiment_name_is_honoured(tmp_path, monkeypatch, caplog):
    """MLFLOW_EXPERIMENT_NAME was ignored without a word: every run went to experiment `cmce`."""
    from mlflow import MlflowClient

    from cmce.tracking import log_step

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "other-exp")
    parent = start_parent_run(uri, "cmce", {})
    step = log_step(uri, parent, "build-index", {"a": 1})
    client = MlflowClient(tracking_uri=uri)
    other = client.get_experiment_by_name("other-exp")
    assert other is not None and client.get_experiment_by_name("cmce") is None
    assert {client.get_run(r).info.experiment_id for r in (parent, step)} == {other.experiment_id}
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", other.experiment_id)  # not read: said
    start_parent_run(uri, "cmce", {})
    assert "MLFLOW_EXPERIMENT_ID is not read: runs go to experiment 'cmce'" in caplog.text


def test_a_relative_sqlite_store_is_made_in_the_working_folder_with_its_artifacts_beside_it(tmp_path, monkeypatch):
    """`cmce --mlflow-uri sqlite:///rel.db track-start` (the form of MLflow's docs): exit 2 after 12 s, `relative path
    can't be expressed as a file URI`, naming nothing, and a 954 KB rel.db left in the working folder."""
    from mlflow import MlflowClient

    from cmce.cli import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "o" / "t.json"
    assert main(["--mlflow-uri", "sqlite:///rel.db", "track-start", "--config", str(SMOKE), "--out", str(out)]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["mlartifacts", "rel.db"]  # the run's config.json beside it
    experiment = MlflowClient(f"sqlite:///{work / 'rel.db'}").get_experiment_by_name("cmce")
    assert experiment.artifact_location == (work / "mlartifacts").as_uri()


@pytest.mark.parametrize("name, value, expected", [
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1000000", "an integer from 0 to 10 expected"),
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "-1", "an integer from 0 to 10 expected"),
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2.5", "an integer from 0 to 10 expected"),
    ("MLFLOW_HTTP_REQUEST_TIMEOUT", "0", "an integer of at least 1 expected"),
    ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "121", "an integer from 0 to 120 expected"),
    ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "nan", "a number of at least 0 expected"),
])
def test_an_mlflow_http_setting_out_of_mlflows_range_is_named_before_any_work(tmp_path, monkeypatch, caplog, name,
                                                                              value, expected):
    """MLFLOW_HTTP_REQUEST_MAX_RETRIES=1000000: `models:/…: registry http://…: The configured max_retries value
    (1000000) is in excess of the maximum allowable retries (10)`, a local setting reported as the registry's."""
    import logging

    from cmce.cli import main

    monkeypatch.setenv(name, value)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["--mlflow-uri", "http://127.0.0.1:9", "track-end", "--mlflow-parent", "0" * 32]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"cmce track-end: environment variable {name}={value!r}: {expected} (MLflow's range)"]


@pytest.mark.parametrize("value", ["1", "3601", "+", "20s"])
def test_the_mlflow_deadline_out_of_range_is_named_before_any_work(value, monkeypatch, caplog):
    """CMCE_MLFLOW_DEADLINE_S bounds every registry read: 0 or 1 s refused every answer, a typo none."""
    import logging

    from cmce.cli import main

    monkeypatch.setenv("CMCE_MLFLOW_DEADLINE_S", value)
    with caplog.at_level(logging.INFO):
        assert main(["--mlflow-uri", "http://127.0.0.1:9", "track-end", "--mlflow-parent", "0" * 32]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"cmce track-end: environment variable CMCE_MLFLOW_DEADLINE_S={value!r}: "
                      "an integer from 2 to 3600 expected"]


def test_the_mlflow_http_ranges_are_mlflows_own(monkeypatch):
    """The bounds checked are those MLflow enforces, its own limit variable included."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import _validate_backoff_factor, _validate_max_retries

    from cmce.tracking_store import check_http_settings

    for bound, validate, name in ((10, _validate_max_retries, "MLFLOW_HTTP_REQUEST_MAX_RETRIES"),
                                  (120, _validate_backoff_factor, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")):
        for value in (0, bound):
            validate(value)
            monkeypatch.setenv(name, str(value))
            check_http_settings()
        for value in (-1, bound + 1):
            with pytest.raises(MlflowException):
                validate(value)
            monkeypatch.setenv(name, str(value))
            with pytest.raises(ValueError, match=name):
                check_http_settings()
        monkeypatch.delenv(name)
    monkeypatch.setenv("_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT", "20")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "15")
    _validate_max_retries(15)
    check_http_settings()


def test_an_in_memory_store_is_refused_and_a_home_store_expanded(monkeypatch, tmp_path):
    """`--mlflow-uri sqlite://` started a run in a store that ended with the process (its artifacts written to
    ./mlruns); `sqlite:///~/t.db` made a folder named `~` in the working folder."""
    from cmce.tracking_store import absolute_uri, check_uri_settings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for uri in ("sqlite://", "sqlite:///:memory:", "sqlite://?cache=shared"):
        with pytest.raises(ValueError, match=rf"^--mlflow-uri {re.escape(uri)}: an in-memory store, gone when"):
            check_uri_settings(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite://")
    with pytest.raises(ValueError, match="^MLFLOW_TRACKING_URI sqlite://: an in-memory store"):
        check_uri_settings(None)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert absolute_uri("sqlite:///~/t.db") == f"sqlite:///{tmp_path}/t.db"
    with pytest.raises(ValueError, match="~nosuchuser: no such user's home folder"):
        absolute_uri("sqlite:///~nosuchuser/t.db")


def test_a_store_a_stop_interrupts_while_it_is_made_is_not_left_half_made(tmp_path, monkeypatch):
    """SIGTERM while track-start made a new sqlite store: exit 143 "each output is whole or not written", and a
    half-migrated store (61 KB, 12 tables) left behind. The store is made aside and linked in whole."""
    import cmce.tracking as tracking
    from cmce.errors import Terminated

    real = tracking._close_engines

    def stopped(db_uri):  # the migrations have run, the store is not in place yet
        real(db_uri)
        raise Terminated(15)

    monkeypatch.setattr(tracking, "_close_engines", stopped)
    store = tmp_path / "new.db"
    with pytest.raises(Terminated):
        start_parent_run(f"sqlite:///{store}", "p", {})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    run_id = start_parent_run(f"sqlite:///{store}", "p", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlartifacts", "new.db"]
    from mlflow import MlflowClient

    assert MlflowClient(f"sqlite:///{store}").get_run(run_id).info.status == "RUNNING"


def test_a_store_left_half_made_by_a_kill_is_removed_by_the_next_making(tmp_path):
    """SIGKILL while a store was made aside: its `.new.db.cmce-XXXXXXXX.tmp` stayed, also after a retry made the
    store."""
    import os
    import time

    stale = tmp_path / ".new.db.cmce-5e306064.tmp"
    stale.write_bytes(b"SQLite format 3\x00 half migrated")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    start_parent_run(f"sqlite:///{tmp_path / 'new.db'}", "p", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlartifacts", "new.db"]


def test_promotion_moves_the_alias_only_to_a_version_whose_file_has_the_sha256(smoke_run, tmp_path):
    """A version whose sha256 tag named the gated query model over a KD student's file: the gate moved @production
    to it (the newest version with that tag), and every step then loaded the student."""
    from mlflow import MlflowClient

    from cmce.tracking import PRODUCTION, log_step

    lay, _ = smoke_run
    query, student = lay.model("query"), lay.kd_student("resnet_a")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "cmce", {})
    log_step(uri, parent, "train", register=[("cmce-query", query, file_sha256(query))])  # v1, true
    log_step(uri, parent, "train", register=[("cmce-query", student, file_sha256(query))])  # v2, its tag lies
    log_step(uri, parent, "gate", promote=[("cmce-query", file_sha256(query))])
    assert str(MlflowClient(tracking_uri=uri).get_model_version_by_alias("cmce-query", PRODUCTION).version) == "1"


def test_the_commit_tag_names_the_running_code_whatever_git_dir_says(tmp_path, monkeypatch):
    """GIT_DIR inherited from a shell (a hook, another checkout) tagged runs with another checkout's HEAD."""
    from cmce.tracking import GIT_COMMIT_TAG, code_tags

    monkeypatch.delenv("CMCE_GIT_COMMIT", raising=False)
    honest = code_tags()
    other = tmp_path / "other"
    import subprocess

    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    assert code_tags() == honest and (not honest or len(honest[GIT_COMMIT_TAG]) == 40)


def test_a_password_in_the_tracking_uri_is_never_logged_but_kept_in_the_out_file(tmp_path, monkeypatch, caplog):
    """`cmce track-start --mlflow-uri http://bob:pw@host` logged `MLflow parent run <id> at http://bob:pw@host`.
    The --out file and the stdout line keep the whole URI: the later steps read it from there."""
    import json
    import logging

    from cmce.cli import main
    from tests.fake_servers import fake_mlflow

    art = (tmp_path / "art").as_uri()
    run = {"run": {"info": {"run_id": "a" * 32, "experiment_id": "1", "status": "RUNNING",
                            "artifact_uri": f"{art}/run", "lifecycle_stage": "active"}, "data": {}}}
    answers = {  # MLflow's REST calls that track-start makes; the rest (log-parameter, …) answer {}
        "/api/2.0/mlflow/experiments/get-by-name": {"experiment": {"experiment_id": "1", "name": "cmce",
                                                                   "artifact_location": art,
                                                                   "lifecycle_stage": "active"}},
        "/api/2.0/mlflow/runs/create": run, "/api/2.0/mlflow/runs/get": run,
    }

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    with fake_mlflow(answers) as port, caplog.at_level(logging.INFO):
        uri = f"http://bob:pw19secret@127.0.0.1:{port}"
        assert main(["--mlflow-uri", uri, "track-start", "--config", str(SMOKE), "--out",
                     str(tmp_path / "run.json")]) == 0
    assert f"MLflow parent run {'a' * 32} at http://***@127.0.0.1:{port}" in caplog.text
    assert "pw19secret" not in caplog.text
    assert json.loads((tmp_path / "run.json").read_text()) == {"uri": uri, "run_id": "a" * 32}


@pytest.mark.parametrize("where", ["--mlflow-uri", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "pipeline"])
def test_a_server_uri_with_a_query_string_is_refused_without_showing_it(tmp_path, monkeypatch, caplog, capsys,
                                                                         where):
    """`--mlflow-uri 'http://host/?token=…'`: MLflow appends its API paths after the query string, so no request
    reached the API, and the error printed the token. Refused before any work, naming the flag or variable."""
    import logging

    from cmce.cli import main

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    bad = "http://127.0.0.1:9/?token=tok19secret"
    argv = ["search", "--index", str(tmp_path / "index"), "--query-model", str(tmp_path / "q.pt"),
            "--images", str(tmp_path / "a.png")]
    if where == "--mlflow-uri":
        argv = ["--mlflow-uri", bad, *argv]
    elif where == "MLFLOW_REGISTRY_URI":
        monkeypatch.setenv(where, bad)
        argv = ["--mlflow-uri", "http://127.0.0.1:9", *argv]
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", bad)
    if where == "pipeline":
        from pipeline.__main__ import main

        argv, where = ["run", "--local", "--root", str(tmp_path / "r")], "MLFLOW_TRACKING_URI"
    with caplog.at_level(logging.INFO):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"{where} http://127.0.0.1:9/?…: an MLflow server URI takes no query" in errors[0]
    assert "MLFLOW_TRACKING_TOKEN" in errors[0], errors
    assert "tok19secret" not in caplog.text + "".join(capsys.readouterr())
    assert not (tmp_path / "r").exists()


def test_a_component_whose_stage_left_threads_in_a_read_exits_without_waiting_for_them():
    """A KFP task whose S3 transfer was given up (a trickling server) reported its failure, then the interpreter's
    exit joined the transfer's worker threads, still in their reads: the task hung as long as the server did."""
    code = """if True:
        import threading, time
        from cmce.errors import threads_left_running
        from cmce.runner import run_stage

        def stage():
            threading.Thread(target=time.sleep, args=(60,)).start()  # a worker the exit would join
            threads_left_running()
            raise OSError("s3://b/g.parquet: the S3 endpoint gave no whole answer within 3 s")

        run_stage(stage)
    """
    import subprocess
    import sys
    import time

    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert res.returncode == 1 and time.monotonic() - started < 30, (res.returncode, res.stderr[-2000:])
    assert "ERROR cmce: s3://b/g.parquet: the S3 endpoint gave no whole answer" in res.stderr


@pytest.mark.parametrize("server", ["trickling headers", "retry after an hour"])
def test_a_registry_that_never_finishes_its_answer_is_given_up_at_the_deadline(tmp_path, monkeypatch, server):
    """`cmce serve --query-model models:/q@production` against an MLflow server sending a header line every 0.5 s
    (each within the request timeout), or answering 429 with `Retry-After: 3600`, hung until it was killed."""
    import threading
    import time

    from cmce.serving.state import QueryModelSource
    from cmce.tracking import check_parent_run
    from tests.fake_servers import Quiet, serving

    stop = threading.Event()

    class Registry(Quiet):
        def do_GET(self):  # noqa: N802 - http.server's name
            if server == "retry after an hour":
                self.reply(429, headers=(("Retry-After", "3600"),))
                return
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.5):
                self.wfile.write(b"X-Slow: 1\r\n")
                self.wfile.flush()

    with serving(Registry) as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("CMCE_MLFLOW_DEADLINE_S", "3")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        started = time.monotonic()
        try:
            with pytest.raises(ValueError, match=r"models:/q@production: ") as caught:  # as serve says it
                QueryModelSource("models:/q@production", Path).key()
            took = time.monotonic() - started
            with pytest.raises(ValueError, match=r"--mlflow-parent r1: ") as parent:  # a tracked step's first read
                check_parent_run(f"http://127.0.0.1:{port}", "r1")
        finally:
            stop.set()
    assert took < 15, took
    said = f"no whole answer from MLflow at http://127.0.0.1:{port} within 3 s (CMCE_MLFLOW_DEADLINE_S)"
    if server == "trickling headers":
        assert str(caught.value) == f"models:/q@production: {said}: unreachable, silent or trickling"
        assert str(parent.value) == f"--mlflow-parent r1: {said}: unreachable, silent or trickling"
    else:
        assert "too many 429 error responses" in str(caught.value)


def test_a_registry_answering_other_json_is_not_called_a_pending_registration(monkeypatch):
    """A server answering every request 200 with JSON that is no model version: `version  of  is
    PENDING_REGISTRATION, not READY`, name and number blank, a wrong reason."""
    from cmce.serving.state import QueryModelSource
    from tests.fake_servers import fake_mlflow

    with fake_mlflow({"/api/2.0/mlflow/registered-models/alias": {"model_version": {"source": None}}}) as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        with pytest.raises(ValueError) as caught:
            QueryModelSource("models:/q@production", Path).key()
    assert str(caught.value) == ("models:/q@production: the registry answered without a model version (no name, no "
                                 "number): not an MLflow server's answer; check MLFLOW_TRACKING_URI / --mlflow-uri")


def test_a_registry_answer_protobuf_cannot_parse_is_one_line_naming_the_registry(monkeypatch):
    """`{"model_version": {"version": NaN}}`: an 83-line protobuf ParseError traceback, exit 1, no registry named."""
    from cmce.registry import resolve_model_uri
    from tests.fake_servers import fake_mlflow

    with fake_mlflow({"/api/2.0/mlflow/registered-models/alias": {"model_version": {"version": float("nan")}}}) as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        with pytest.raises(ValueError) as caught:
            resolve_model_uri("models:/q@candidate")
    assert str(caught.value).startswith(f"models:/q@candidate: registry http://127.0.0.1:{port}: Failed to parse"), \
        str(caught.value)


@pytest.mark.parametrize("credential", ["token", "user and password"])
def test_a_registry_echoing_the_credential_it_was_sent_never_has_it_printed(tmp_path, credential):
    """A registry answering 401 `bad credentials: Bearer <token>` (its message repeating the Authorization header):
    `cmce serve --query-model models:/q@one` printed the token, or MLflow's Basic user:password, on stderr."""
    import base64
    import subprocess
    import sys

    from tests.fake_servers import Quiet, serving

    class Echoing(Quiet):
        def do_GET(self):  # noqa: N802 - http.server's name
            said = f'{{"error_code": "UNAUTHENTICATED", "message": "bad credentials: {self.headers["Authorization"]}"}}'
            self.reply(401, said.encode(), (("Content-Type", "application/json"),))

    secret = "s3cretPW19x"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}  # a user:password earlier
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")  # tests put there (credentials_to_env) wins over a token
    env.update({"MLFLOW_TRACKING_TOKEN": secret} if credential == "token" else
               {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": secret})
    with serving(Echoing) as port:
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
        res = subprocess.run([sys.executable, "-m", "cmce", "export-query", "--query-model", "models:/q@one", "--out",
                              str(tmp_path / "q.onnx")], env=env, capture_output=True, text=True, timeout=120)
    shown = res.stdout + res.stderr
    assert res.returncode == 2 and "UNAUTHENTICATED: bad credentials: " in res.stderr, res.stderr
    assert secret not in shown and base64.b64encode(f"u:{secret}".encode()).decode() not in shown, shown
    assert ("Bearer ***" if credential == "token" else "Basic ***") in res.stderr, res.stderr


@pytest.mark.parametrize("text, expected", [
    ("bad credentials: Bearer abc.DEF-123", "bad credentials: Bearer ***"),
    ("Authorization: Basic dTpTRUNSRVRQVzQ1Ng==", "Authorization: Basic ***"),
    ("Bearer authentication required; Basic auth disabled", "Bearer authentication required; Basic auth disabled"),
    ("?X-Amz-Signature=0a1b2c&X-Amz-Security-Token=FwoG%2Fz", "?X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("Credential=AKIA/20261205/us-east-1/s3/aws4_request, Signature=f00d", "Credential=AKIA/20261205/us-east-1/s3/"
                                                                           "aws4_request, Signature=***"),
    ("http://bob:pw@host/api failed", "http://***@host/api failed"),
    ("the key is longsecretvalue and again longsecretvalue.", "the key is *** and again ***."),
    ("s3://b/longsecretvalues/ and xlongsecretvalue", "s3://b/longsecretvalues/ and xlongsecretvalue"),  # words
    ("artifacts/tests/latest/test_x.parquet", "artifacts/tests/latest/test_x.parquet"),  # a 4-letter password
    ("max token 512 exceeded; token = _ENDPOINT.set(url)", "max token 512 exceeded; token = _ENDPOINT.set(url)"),
    ("Authorization: Token 9f8e7d6c5b4a", "Authorization: Token ***"),
])
def test_credentials_are_concealed_in_any_text(text, expected, monkeypatch):
    """Every credential, and nothing else: LocalStack's usual key `test` had `tests/latest/` printed as
    `***s/la***/`, and `max token 512` lost its number."""
    from cmce.redaction import conceal

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "longsecretvalue")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "test")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    assert conceal(text) == expected


def test_every_log_line_and_traceback_is_concealed(monkeypatch, capsys):
    """The commands' log handler conceals what any logger says, a logged traceback included."""
    import logging

    from cmce.errors import OneLineFormatter

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok3nvalue")
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "sent %s", ("tok3nvalue",), None)
    try:
        raise ValueError("Bearer tok3nvalue refused")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = OneLineFormatter("%(message)s").format(record)
    assert "tok3nvalue" not in line and line.startswith("sent ***") and "ValueError: Bearer ***" in line, line


@pytest.mark.parametrize("server", ["answering 200 {} to everything", "silent after half a status line"])
def test_track_start_names_a_server_that_is_no_mlflow_or_goes_silent(tmp_path, monkeypatch, caplog, server):
    """`cmce track-start --mlflow-uri` at a server answering `200 {}` to every request: `Invalid value "" for
    parameter 'run_id'`, naming nothing wrong with the server; at one sending `HTTP/1.1 200 OK\\r\\nContent-Len` and
    nothing more: MLflow's retries and read timeouts, 60 s before the refusal."""
    import logging
    import threading
    import time

    from cmce.cli import main
    from tests.fake_servers import Quiet, serving

    stop = threading.Event()

    class NotMlflow(Quiet):
        def do_GET(self):  # noqa: N802 - http.server's name
            if server.startswith("silent"):
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Len")
                self.wfile.flush()
                stop.wait(60)
                return
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.reply(200, b"{}", (("Content-Type", "application/json"),))

        do_POST = do_GET

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CMCE_MLFLOW_DEADLINE_S", "3")
    with serving(NotMlflow) as port, caplog.at_level(logging.INFO):
        started = time.monotonic()
        try:
            code = main(["--mlflow-uri", f"http://127.0.0.1:{port}", "track-start", "--config", str(SMOKE), "--out",
                         str(tmp_path / "run.json")])
        finally:
            stop.set()
        took = time.monotonic() - started
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and took < 15, (code, errors, took)
    if server.startswith("silent"):
        assert errors[0] == (f"cmce track-start: http://127.0.0.1:{port}: the tracking server cannot be used "
                             f"(the tracking server: no whole answer from MLflow at http://127.0.0.1:{port} within 3 s "
                             "(CMCE_MLFLOW_DEADLINE_S): unreachable, silent or trickling)"), errors
    else:
        assert errors[0] == (f"cmce track-start: http://127.0.0.1:{port}: answered without an experiment id: not an "
                             "MLflow tracking server"), errors
    assert not (tmp_path / "run.json").exists()


def test_an_experiment_name_longer_than_mlflow_takes_is_named(monkeypatch):
    """MLFLOW_EXPERIMENT_NAME of 20,000 characters: `sqlite:///…/m.db: 'name' exceeds the maximum length of 500
    characters`, blaming the store."""
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH

    from cmce.tracking import MAX_EXPERIMENT_NAME, experiment_name

    assert MAX_EXPERIMENT_NAME == MAX_EXPERIMENT_NAME_LENGTH
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "e" * 500)
    assert experiment_name() == "e" * 500
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "e" * 20_000)
    with pytest.raises(ValueError, match="^environment variable MLFLOW_EXPERIMENT_NAME: 20000 characters, more than "
                                         "MLflow's 500$"):
        experiment_name()


def test_a_stop_while_production_moves_moves_every_alias_first(tmp_path, monkeypatch):
    """SIGTERM between two alias moves left @production half-moved: the new query model served with the old
    transformation (exit 143, decision.json "promoted": true). The stop now waits for the last alias."""
    import os
    import signal

    from mlflow import MlflowClient

    from cmce.errors import Terminated, forget_signals, terminate_by_exception
    from cmce.storage import file_sha256
    from cmce.tracking import PRODUCTION, log_step

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "p", {})
    files = {name: tmp_path / f"{name}.pt" for name in ("cmce-gallery-a", "cmce-transform-a")}
    for name, path in files.items():
        path.write_bytes(name.encode())
        log_step(uri, parent, "train", register=[(name, path, file_sha256(path))])
    real = MlflowClient.set_registered_model_alias
    moved = []

    def stopped_after_the_first(self, name, alias, version):
        real(self, name, alias, version)
        moved.append(name)
        if alias == PRODUCTION and len(moved) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", stopped_after_the_first)
    handlers = terminate_by_exception()
    try:
        with pytest.raises(Terminated):
            log_step(uri, parent, "gate", promote=[(name, file_sha256(p)) for name, p in files.items()])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        forget_signals()
    client = MlflowClient(tracking_uri=uri)
    assert moved == list(files)
    assert all(str(client.get_model_version_by_alias(name, PRODUCTION).version) == "1" for name in files)
