"""Promotion gate: the decision rule, the served measurement, and MLflow's `production` alias."""

import json
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmce.promotion import decide, served_metrics


def test_decide_promotes_ties_and_improvements_only():
    base = {"R@1": 0.80, "MAP@R": 0.50}
    assert decide(base, {"R@1": 0.80, "MAP@R": 0.50}, ["R@1", "MAP@R"]).promoted
    assert decide(base, {"R@1": 0.81, "MAP@R": 0.55}, ["R@1", "MAP@R"]).promoted
    d = decide(base, {"R@1": 0.85, "MAP@R": 0.49}, ["R@1", "MAP@R"])
    assert not d.promoted and d.regressed == ["MAP@R"] and d.delta["MAP@R"] == pytest.approx(-0.01)
    assert decide(base, {"R@1": 0.85, "MAP@R": 0.49}, ["R@1", "MAP@R"], tolerance=0.02).promoted
    assert decide(base, {"R@1": 0.79, "MAP@R": 0.40}, ["R@1"], tolerance=0.02).promoted  # MAP@R not gated
    assert not decide(base, {"R@1": math.nan, "MAP@R": 0.9}, ["R@1", "MAP@R"]).promoted
    with pytest.raises(KeyError, match="TAR@FAR=0.001"):
        decide(base, base, ["TAR@FAR=0.001"])
    flat = d.flat()
    assert flat["promoted"] == 0.0 and flat["candidate/R@1"] == 0.85 and flat["baseline/MAP@R"] == 0.50


def test_a_drop_of_exactly_the_tolerance_passes_whatever_the_float_rounding():
    """The docs promise a promotion unless a metric drops by more than the tolerance; `c - b >= -tolerance` in
    floats refused 90 of 100 drops of exactly 30 queries in 3,000 at tolerance 0.01 (51/3000 - 21/3000 is
    -0.010000000000000002). One query more is still a regression."""
    exact = [k for k in range(2400, 2500) if decide({"R@1": k / 3000}, {"R@1": (k - 30) / 3000}, ["R@1"],
                                                     tolerance=0.01).promoted]
    assert len(exact) == 100
    assert not any(decide({"R@1": k / 3000}, {"R@1": (k - 31) / 3000}, ["R@1"], tolerance=0.01).promoted
                   for k in range(2400, 2500))


def test_served_metrics_equal_the_evaluation_of_the_full_ensemble(smoke_run):
    lay, metrics = smoke_run
    served = served_metrics(lay.dataset, lay.model("query"), lay.gallery, "test", [1, 2], [1e-3])
    n = len(lay.gallery_names)
    for key in ("R@1", "R@2", "MAP@R", "TAR@FAR=0.001"):
        assert served[key] == pytest.approx(metrics[f"asym_ensemble/{n}"][key], abs=1e-6), key


def test_served_metrics_leave_out_what_the_served_index_rejects(smoke_run):
    """The gate measured the whole stored gallery while the served index left out its most uncertain items, so a
    candidate was judged on items nobody searched. At the index's fraction it now meets the evaluation's curve."""
    lay, metrics = smoke_run
    whole = served_metrics(lay.dataset, lay.model("query"), lay.gallery, "test", [1], [1e-3])
    served = served_metrics(lay.dataset, lay.model("query"), lay.gallery, "test", [1], [1e-3], reject_fraction=0.3)
    rows = pq.ParquetFile(lay.gallery).metadata.num_rows
    assert whole["rejected"] == 0 and served["rejected"] == math.ceil(0.3 * rows)
    assert served["R@1"] == pytest.approx(1 - metrics["rejection/uncertainty"]["retrieval_error@0.3"], abs=1e-6)
    assert served["R@1"] != whole["R@1"]


def _scrambled(gallery, out, seed=0):
    """Same file and versions, each row's ensemble (embedding, running sum, uncertainty) moved to another row: a
    consistent candidate that must regress."""
    table = pq.read_table(gallery)
    perm = pa.array(np.random.default_rng(seed).permutation(table.num_rows))
    for name in ("embedding", "ensemble_sum", "uncertainty"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), table.column(i).take(perm))
    pq.write_table(table, out)
    return out


def _register_smoke_models(uri, parent, lay, cfg):
    from cmce.records import record_model, record_transformation
    from cmce.tracking import log_step

    records = [record_model(cfg, lay.model("query"), "query")]
    records += [record_model(cfg, lay.model(g), "gallery") for g in lay.gallery_names]
    records += [record_transformation(cfg, lay.transformation(g)) for g in lay.gallery_names]
    for r in records:
        log_step(uri, parent, r.step, register=r.register)


def test_gate_moves_production_alias_only_without_regression(smoke_run, tmp_path, caplog):
    from mlflow import MlflowClient

    from cmce.cli import main
    from cmce.config import load_config
    from cmce.records import served_versions
    from cmce.tracking import start_parent_run
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "lifecycle", {})
    _register_smoke_models(uri, parent, lay, load_config(SMOKE))
    # the query model's ONNX export is registered too: its production alias follows the query model's
    assert main(["--mlflow-parent", parent, "--mlflow-uri", uri, "export-query", "--query-model",
                 str(lay.model("query")), "--out", str(tmp_path / "query.onnx")]) == 0
    client = MlflowClient(tracking_uri=uri)
    bad = _scrambled(lay.gallery, tmp_path / "scrambled.parquet")

    def gate(candidate, out, *extra):
        return main(["--mlflow-parent", parent, "--mlflow-uri", uri, "gate", "--config", str(SMOKE), "--dataset",
                     str(lay.dataset), "--baseline-query-model", str(lay.model("query")), "--baseline-gallery",
                     str(lay.gallery), "--query-model", str(lay.model("query")), "--gallery", str(candidate),
                     "--out", str(out), *extra])

    assert gate(bad, tmp_path / "bad.json") == 0
    decision = json.loads((tmp_path / "bad.json").read_text())
    assert not decision["promoted"] and "R@1" in decision["regressed"]
    assert decision["candidate"]["R@1"] < decision["baseline"]["R@1"]
    rows = pq.ParquetFile(lay.gallery).metadata.num_rows  # measured as served: the config's index rejects 10 %
    assert decision["reject_fraction"] == 0.1 and decision["rejected"] == {"baseline": math.ceil(0.1 * rows),
                                                                           "candidate": math.ceil(0.1 * rows)}
    for name in ("cmce-query", "cmce-query-onnx", "cmce-query-pyfunc"):
        with pytest.raises(Exception, match="production"):
            client.get_model_version_by_alias(name, "production")
    # the numbers are logged on the gate's run either way
    runs = client.search_runs([client.get_run(parent).info.experiment_id], "attributes.run_name = 'gate'")
    assert runs and runs[0].data.metrics["promoted"] == 0.0 and "delta/R_at_1" in runs[0].data.metrics

    # a regression is a verdict (exit 1), told apart from bad input (exit 2); the decision is still written
    assert gate(bad, tmp_path / "bad2.json", "--require-promotion") == 1
    assert not json.loads((tmp_path / "bad2.json").read_text())["promoted"]

    assert gate(lay.gallery, tmp_path / "same.json") == 0  # a tie is not a regression
    assert json.loads((tmp_path / "same.json").read_text())["promoted"]
    for name, sha in served_versions(lay.gallery):
        version = client.get_model_version_by_alias(name, "production")
        assert version.tags["sha256"] == sha, name
    served_query = client.get_model_version_by_alias("cmce-query", "production").tags["sha256"]
    for along in ("cmce-query-onnx", "cmce-query-pyfunc"):  # the edge's model and mlflow.pyfunc's follow it
        assert client.get_model_version_by_alias(along, "production").tags["sha256"] == served_query, along
    runs = client.search_runs([client.get_run(parent).info.experiment_id], "attributes.run_name = 'gate'")
    assert any(r.data.tags.get("promotion") == "done" for r in runs)
    # production moved on since this baseline was served (a later upgrade): promoting a candidate grown from the
    # baseline rolled the upgrade back without a word ("no regression", @production moved to the old query model)
    vgg = next(n for n, _ in served_versions(lay.gallery) if n.startswith("cmce-transform-"))
    upgraded = client.create_model_version(vgg, source=str(lay.gallery), tags={"sha256": "0" * 64})
    client.set_registered_model_alias(vgg, "production", upgraded.version)
    assert gate(lay.gallery, tmp_path / "rolled_back.json") == 0
    withheld = json.loads((tmp_path / "rolled_back.json").read_text())
    assert not withheld["promoted"] and f"{vgg}@production (v{upgraded.version}) moved since the baseline" in \
        withheld["not_promoted"]
    assert client.get_model_version_by_alias(vgg, "production").version == upgraded.version
    # without a parent run nothing is published, so no alias can move: said, not left to be guessed
    caplog.clear()
    assert main(["--mlflow-uri", uri, "gate", "--config", str(SMOKE), "--dataset", str(lay.dataset),
                 "--baseline-query-model", str(lay.model("query")), "--baseline-gallery", str(lay.gallery),
                 "--query-model", str(lay.model("query")), "--gallery", str(lay.gallery),
                 "--out", str(tmp_path / "unpublished.json")]) == 0
    assert "promoted, but no alias moved: give --mlflow-parent" in caplog.text
    written = json.loads((tmp_path / "unpublished.json").read_text())  # a metrics table shows the file, not the log
    assert (written["promoted"], written["production_alias"]) == (True, "not moved: the gate is not tracked (no "
                                                                        "--mlflow-parent)")


def test_a_gate_that_cannot_be_tracked_says_not_promoted(smoke_run, tmp_path, caplog, monkeypatch):
    """The decision is written before the gate's record is published, and @production moves on publishing: when the
    artifact store failed, decision.json still said `"promoted": true` while no alias moved (exit 2)."""
    from mlflow import MlflowClient

    import cmce.tracking
    from cmce.cli import main
    from cmce.config import load_config
    from cmce.tracking import start_parent_run
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "lifecycle", {})
    _register_smoke_models(uri, parent, lay, load_config(SMOKE))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cmce.tracking, "log_artifact_or_reference", full)
    assert main(["--mlflow-parent", parent, "--mlflow-uri", uri, "gate", "--config", str(SMOKE), "--dataset",
                 str(lay.dataset), "--baseline-query-model", str(lay.model("query")), "--baseline-gallery",
                 str(lay.gallery), "--query-model", str(lay.model("query")), "--gallery", str(lay.gallery),
                 "--out", str(tmp_path / "decision.json"), "--require-promotion"]) == 2
    said = json.loads((tmp_path / "decision.json").read_text())
    assert not said["promoted"] and "the gate could not be tracked" in said["not_promoted"], said
    assert "No space left on device" in said["not_promoted"]
    with pytest.raises(Exception, match="production"):
        MlflowClient(tracking_uri=uri).get_model_version_by_alias("cmce-query", "production")
    monkeypatch.undo()

    def gate(out):
        return main(["--mlflow-parent", parent, "--mlflow-uri", uri, "gate", "--config", str(SMOKE), "--dataset",
                     str(lay.dataset), "--baseline-query-model", str(lay.model("query")), "--baseline-gallery",
                     str(lay.gallery), "--query-model", str(lay.model("query")), "--gallery", str(lay.gallery),
                     "--out", str(out)])

    # a failure while the aliases move may leave some moved: the decision is not made to say none did
    def cut(*args, **kwargs):
        raise OSError("the registry went away")

    monkeypatch.setattr(cmce.tracking, "_move_production", cut)
    assert gate(tmp_path / "cut.json") == 2
    said = json.loads((tmp_path / "cut.json").read_text())
    assert said["promoted"] and said["production_alias"].startswith("may be partly moved: the registry went away")
    monkeypatch.undo()
    # moved, then the run could not be closed: the promotion stands, a warning says so
    real = MlflowClient.set_terminated

    def unclosable(self, run_id, status=None, end_time=None):
        if status in (None, "FINISHED"):
            raise OSError("the store went away")
        return real(self, run_id, status, end_time)

    monkeypatch.setattr(MlflowClient, "set_terminated", unclosable)
    caplog.clear()
    assert gate(tmp_path / "moved.json") == 0
    assert json.loads((tmp_path / "moved.json").read_text())["promoted"]
    assert "moved @production, but could not close the gate's run" in caplog.text
    monkeypatch.undo()
    assert MlflowClient(tracking_uri=uri).get_model_version_by_alias("cmce-query", "production")


def test_the_kfp_gate_task_withholds_a_promotion_no_alias_can_follow(smoke_run, tmp_path, caplog):
    """A lifecycle pipeline on a `cmce run` folder (whose models were never registered) ended with a decision file
    saying `"promoted": true`; a warning 50 lines above said no alias moved. The task withholds it as the CLI does."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from cmce.tracking import start_parent_run
    from components.steps import gate
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = tmp_path / "tracking.json"
    tracking.write_text(json.dumps({"uri": uri, "run_id": start_parent_run(uri, "lifecycle", {})}))
    decision, logged = tmp_path / "decision.json", {}
    at = lambda path: SimpleNamespace(path=str(path))  # noqa: E731 - a KFP artifact as the task sees it
    gate.python_func(config=at(SMOKE), tracking=at(tracking), dataset=at(lay.dataset),
                     baseline_query_model=at(lay.model("query")), baseline_gallery=at(lay.gallery),
                     query_model=at(lay.model("query")), gallery=at(lay.gallery), index=at(tmp_path),
                     metrics=SimpleNamespace(log_metric=logged.__setitem__), decision=at(decision))
    said = json.loads(decision.read_text())
    assert not said["promoted"] and said["regressed"] == [] and "@production not moved" in said["not_promoted"]
    assert logged["promoted"] == 0.0 and "gate: not promoted: ['cmce-" in caplog.text
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("cmce").experiment_id], "attributes.run_name = 'gate'")
    assert run[0].data.metrics["promoted"] == 0.0
    # untracked (--no-mlflow), nothing can move either: the file says so beside its verdict, as the CLI's does
    tracking.write_text(json.dumps({"uri": "", "run_id": ""}))
    gate.python_func(config=at(SMOKE), tracking=at(tracking), dataset=at(lay.dataset),
                     baseline_query_model=at(lay.model("query")), baseline_gallery=at(lay.gallery),
                     query_model=at(lay.model("query")), gallery=at(lay.gallery), index=at(tmp_path),
                     metrics=SimpleNamespace(log_metric=logged.__setitem__), decision=at(decision))
    said = json.loads(decision.read_text())
    assert (said["promoted"], said["production_alias"]) == (True, "not moved: the run is not tracked (--no-mlflow)")


def test_a_gate_whose_query_model_is_registered_only_under_a_lying_tag_is_not_promoted(smoke_run, tmp_path):
    """The check before publishing read the sha256 tag alone, the move hashed the file: a version tagged with the
    query model's sha256 over a KD student's file let decision.json say "promoted" (and --require-promotion exit
    0) while no alias moved."""
    from mlflow import MlflowClient

    from cmce.cli import main
    from cmce.storage import file_sha256
    from cmce.tracking import PRODUCTION, log_step, start_parent_run
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "lifecycle", {})
    files = [(f"cmce-{role}-{g}", path) for g in lay.gallery_names
             for role, path in (("gallery", lay.model(g)), ("transform", lay.transformation(g)))]
    log_step(uri, parent, "train", register=[(name, path, file_sha256(path)) for name, path in files])
    query, student = lay.model("query"), lay.kd_student(lay.gallery_names[0])
    log_step(uri, parent, "train", register=[("cmce-query", student, file_sha256(query))])  # its tag lies
    gate = ["--mlflow-parent", parent, "--mlflow-uri", uri, "gate", "--config", str(SMOKE), "--dataset",
            str(lay.dataset), "--baseline-query-model", str(query), "--baseline-gallery", str(lay.gallery),
            "--query-model", str(query), "--gallery", str(lay.gallery), "--out", str(tmp_path / "d.json")]
    assert main([*gate, "--require-promotion"]) == 1
    decision = json.loads((tmp_path / "d.json").read_text())
    assert not decision["promoted"] and "['cmce-query'] have no registered version whose file" in decision[
        "not_promoted"]
    client = MlflowClient(tracking_uri=uri)
    assert not [v for v in client.search_model_versions("name='cmce-query'") if PRODUCTION in v.aliases]


def test_gate_moves_nothing_when_the_served_versions_are_not_registered(smoke_run, tmp_path, caplog):
    from mlflow import MlflowClient

    from cmce.cli import main
    from cmce.tracking import start_parent_run
    from tests.conftest import SMOKE

    lay, _ = smoke_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "lifecycle", {})
    gate = ["--mlflow-parent", parent, "--mlflow-uri", uri, "gate", "--config", str(SMOKE), "--dataset",
            str(lay.dataset), "--baseline-query-model", str(lay.model("query")), "--baseline-gallery",
            str(lay.gallery), "--query-model", str(lay.model("query")), "--gallery", str(lay.gallery)]
    # the metrics pass, but @production cannot move: not promoted (it was "promoted": true, and exit 0 with
    # --require-promotion, while servers following @production kept the old pair)
    with caplog.at_level(logging.INFO):
        assert main([*gate, "--out", str(tmp_path / "d.json")]) == 0
    assert "gate: promoted" not in caplog.text  # it was logged before "not moving @production"
    assert "gate: no regression" in caplog.text and "gate: not promoted: ['cmce-" in caplog.text
    decision = json.loads((tmp_path / "d.json").read_text())
    assert not decision["promoted"] and decision["regressed"] == [] and "cmce-query" in decision["not_promoted"]
    assert main([*gate, "--out", str(tmp_path / "required.json"), "--require-promotion"]) == 1
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_run(parent).info.experiment_id], "attributes.run_name = 'gate'")[0]
    assert run.data.tags["promotion"].startswith("skipped: unregistered") and "cmce-query" in run.data.tags["promotion"]
    assert not any(k.startswith("promoted.") for k in run.data.params) and run.data.metrics["promoted"] == 0.0
