"""The KFP pipeline: compiled YAML is current and loadable; a local run produces every per-model output
and the same metrics as `cmce run`; MLflow holds the runs and the registered models."""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from kfp import components

from cmce.storage import file_sha256
from pipeline.__main__ import COMPILED, PACKAGES, _arguments, build_parser, compile_pipeline, run_local
from tests.conftest import SMOKE
from tests.s3server import free_ports

GALLERY = ["resnet_a", "vgg_b"]


def test_committed_yaml_equals_a_fresh_compile(tmp_path, monkeypatch):
    for var in ("CMCE_CPU_IMAGE", "CMCE_CUDA_IMAGE", "CMCE_GPU", "CMCE_K8S_SECRET"):
        monkeypatch.delenv(var, raising=False)
    for name, package in PACKAGES.items():
        fresh = compile_pipeline(tmp_path / f"{name}.yaml", name)
        assert fresh.read_text() == package.read_text(), f"{package}: run `python -m pipeline compile` and commit it"
        assert components.load_component_from_file(str(package)).name.startswith("cmce")
    loaded = components.load_component_from_file(str(COMPILED))
    assert loaded.name == "cmce"
    spec = COMPILED.read_text()
    assert "localhost/cmce:cpu" in spec and "localhost/cmce:cuda" in spec and "resourceMemoryLimit" in spec
    assert "nvidia.com/gpu" in spec  # training tasks ask for a GPU


def test_compile_writes_through_no_link_planted_at_a_temporary_name(tmp_path, monkeypatch):
    """compile wrote to the fixed name `.cmce_pipeline.tmp.yaml`: a link planted there had a file outside --out-dir
    written over, and two compiles into one folder raced for it (No such file or directory)."""
    for var in ("CMCE_CPU_IMAGE", "CMCE_CUDA_IMAGE", "CMCE_GPU", "CMCE_K8S_SECRET"):
        monkeypatch.delenv(var, raising=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".cmce_pipeline.tmp.yaml").symlink_to(victim)
    compiled = compile_pipeline(out / "cmce_pipeline.yaml", "cmce")
    assert victim.read_text() == "precious" and compiled.read_text() == COMPILED.read_text()
    assert sorted(p.name for p in out.iterdir()) == [".cmce_pipeline.tmp.yaml", "cmce_pipeline.yaml"]


def test_every_task_that_runs_a_model_gets_a_gpu_and_the_cuda_image():
    """On a cluster these pods get a GPU, which each step then uses by itself (tests/test_device.py); the rest
    run the CPU image without one."""
    executors = _compiled()[0]["deploymentSpec"]["executors"]
    on_gpu = {name.removeprefix("exec-") for name, e in executors.items()
              if (e["container"].get("resources", {}).get("accelerator") or {}).get("resourceType") == "nvidia.com/gpu"}
    assert on_gpu == {"train-model", "train-model-2", "train-kd-student", "fit-transform", "embed-gallery-shard",
                      "evaluate", "evaluate-2"}
    for name, e in executors.items():
        assert e["container"]["image"] == ("localhost/cmce:cuda" if name.removeprefix("exec-") in on_gpu
                                           else "localhost/cmce:cpu"), name


def _compiled(path=COMPILED) -> tuple[dict, dict]:
    """The pipeline spec and the Kubernetes platform spec (its second YAML document; {} when absent)."""
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {}).get("platforms", {}).get("kubernetes", {})


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, in the root DAG and inside loops and conditions, by task name."""
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    return {name: task for dag in dags for name, task in dag["tasks"].items()}


# tasks that open or close MLflow runs, register models or move aliases, by their component
SIDE_EFFECTS = {"start-tracking", "train-model", "export-query", "fit-transform", "evaluate", "gate",
                "upgrade-query-model"}
NO_RETRY = {"resolve-config", "gallery-model-names", "shard-list"}  # a failure there is the input's, not passing


def _component(task: dict) -> str:
    import re

    return re.sub(r"-\d+$", "", task["componentRef"]["name"].removeprefix("comp-"))


def test_a_query_model_upgrade_exports_its_query_model_for_the_edge_before_the_gate():
    """A promoted upgrade moved cmce-query's `production` and left cmce-query-onnx's on the old query model, which
    the promoted index refuses: the upgrade exported nothing. The gate now waits for the export of the new model."""
    tasks = _tasks(_compiled(PACKAGES["upgrade-query-model"])[0])
    export = tasks["export-query"]["inputs"]["artifacts"]["query_model"]["taskOutputArtifact"]
    trained = tasks["upgrade-query-model"]["inputs"]["artifacts"]["query_model"]["taskOutputArtifact"]
    assert export == trained and export["producerTask"] == "train-model"
    assert "export-query" in tasks["gate"]["dependentTasks"]


def test_the_evaluation_that_closes_the_parent_run_waits_for_the_export():
    """evaluate closes the MLflow parent run; nothing ordered it after export-query, whose nested run and ONNX
    registration then landed under a FINISHED parent (on kfp.local, with 5 hash seeds in 8), and whose failure
    left the run FINISHED with its metrics. Each evaluation's branch now waits for the export."""
    spec, _ = _compiled()

    def evaluates(task: dict) -> bool:  # the task is evaluate, or a loop or condition holding one
        inner = spec["components"][task["componentRef"]["name"]].get("dag", {}).get("tasks", {})
        return _component(task) == "evaluate" or any(evaluates(t) for t in inner.values())

    root = spec["root"]["dag"]["tasks"]
    branches = [name for name, task in root.items() if evaluates(task)]
    assert branches and all("export-query" in root[b]["dependentTasks"] for b in branches), branches


@pytest.mark.parametrize("package", list(PACKAGES.values()), ids=list(PACKAGES))
def test_tasks_with_side_effects_are_never_cached_and_the_rest_retry(package):
    tasks = {name: task for name, task in _tasks(_compiled(package)[0]).items() if "componentRef" in task
             and not task["componentRef"]["name"].startswith("comp-for-loop")
             and not task["componentRef"]["name"].startswith("comp-condition")
             and "importer" not in task["componentRef"]["name"]}
    assert {"start-tracking", "build-index"} <= {_component(t) for t in tasks.values()}
    for name, task in tasks.items():
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (_component(task) not in SIDE_EFFECTS), name
        retry = task.get("retryPolicy", {})
        assert retry.get("maxRetryCount", 0) == (0 if _component(task) in NO_RETRY else 2), name
        if retry:
            assert retry["backoffDuration"] == "30s" and retry["backoffFactor"] == 2.0, name


def test_pods_get_credentials_from_a_secret_and_gpu_tasks_gpu_nodes():
    spec, k8s = _compiled()
    executors = spec["deploymentSpec"]["executors"]
    on_gpu = {name for name, e in executors.items() if (e["container"].get("resources", {}).get("accelerator") or {})}
    platform = k8s["deploymentSpec"]["executors"]
    assert set(platform) == set(executors)
    for name, pod in platform.items():
        (secret,) = pod["secretAsEnv"]
        assert secret["secretName"] == "cmce-credentials" and secret["optional"] is True, name
        env = {e["envVar"]: e["secretKey"] for e in secret["keyToEnv"]}
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"} <= set(env) and all(k == v for k, v in env.items()), name
        if name in on_gpu:
            assert pod["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}, name
            assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        else:
            assert "nodeSelector" not in pod and "tolerations" not in pod, name


def test_compile_options_drop_the_secret_and_the_gpu_placement(tmp_path, monkeypatch):
    monkeypatch.setenv("CMCE_K8S_SECRET", "")
    monkeypatch.setenv("CMCE_GPU", "0")
    spec, k8s = _compiled(compile_pipeline(tmp_path / "cpu.yaml"))
    assert k8s == {}  # no secret, no GPU node: nothing Kubernetes-specific left
    monkeypatch.setenv("CMCE_K8S_SECRET", "team-keys")
    _, k8s = _compiled(compile_pipeline(tmp_path / "keys.yaml"))
    assert {p["secretAsEnv"][0]["secretName"] for p in k8s["deploymentSpec"]["executors"].values()} == {"team-keys"}


def test_run_settings_are_the_params_and_key_value_overrides_only(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("query_model: {name: q}\ngallery_models: [{name: a, arch: vgg}, {name: b, arch: resnet}]\n")
    args = build_parser().parse_args(["submit", "--host", "http://127.0.0.1:1", "--params", str(params),
                                      "--set", "train.epochs=2", "--set", "gallery_models=[b]"])
    out = _arguments(args)
    assert out["overrides"] == ["train.epochs=2", "gallery_models=[b]"] and "q" in out["params_yaml"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["submit"])  # --host is required
    with pytest.raises(SystemExit):
        build_parser().parse_args(["submit", "--host", "h", "--epochs", "2"])  # no flag per setting any more
    from cmce.config import ConfigError, resolve_config_text

    resolved = yaml.safe_load(resolve_config_text(out["params_yaml"], out["overrides"]))
    assert resolved["train"]["epochs"] == 2 and [m["name"] for m in resolved["gallery_models"]] == ["b"]
    with pytest.raises(ConfigError, match=r"unknown gallery model\(s\) \['c'\]; valid names: \['a', 'b'\]"):
        resolve_config_text(out["params_yaml"], ["gallery_models=[c]"])
    with pytest.raises(ConfigError, match=r"train.epochs must be in \[1, 100000\], got 0"):
        resolve_config_text(out["params_yaml"], ["train.epochs=0"])
    bad = build_parser().parse_args(["submit", "--host", "h", "--set", "train.epochs"])
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        _arguments(bad)


def test_an_unknown_key_from_set_is_named_as_the_override_not_the_params_file(tmp_path):
    """`--set nosuch.key=1` was `<params file>: : unknown key(s) ['nosuch']`: the file has no such key."""
    from cmce.config import ConfigError, resolve_config_text

    params = tmp_path / "p.yaml"
    params.write_text("query_model: {name: q}\ngallery_models: [{name: a, arch: vgg}]\n")
    args = build_parser().parse_args(["submit", "--host", "h", "--params", str(params), "--set", "nosuch.key=1"])
    with pytest.raises(ConfigError, match=r"^--set nosuch.key: unknown key\(s\) \['nosuch'\]; valid keys") as err:
        _arguments(args)
    assert str(params) not in str(err.value)
    with pytest.raises(ConfigError, match=r"^--set train.epoch: train: unknown key\(s\) \['epoch'\]"):
        resolve_config_text(params.read_text(), ["train.epoch=1"])  # the first task of a submitted run


def test_a_single_valued_option_given_twice_is_refused(capsys):
    """`python -m pipeline run --params a.yaml --params b.yaml` ran b.yaml alone (the last won); lists repeat."""
    for argv, option in [(["run", "--local", "--params", "a.yaml", "--params", "b.yaml"], "--params"),
                         (["submit", "--host", "h", "--pipeline", "cmce", "--pipeline", "cmce"], "--pipeline")]:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"python -m pipeline {argv[0]}: argument {option}: given twice; give it once "
            f"(see python -m pipeline {argv[0]} --help)"]
    assert build_parser().parse_args(["submit", "--host", "h", "--set", "a=1", "--set", "b=2"]).set == ["a=1", "b=2"]


def test_local_run_has_every_per_model_and_per_shard_output(kfp_run):
    iterations = sorted(kfp_run.glob("for-loop-*-iteration-*"))
    per_model = [it for it in iterations if (it / "train-model-2").exists()]
    per_student = [it for it in iterations if (it / "train-kd-student").exists()]
    per_shard = [it for it in iterations if (it / "embed-gallery-shard").exists()]
    assert len(per_model) == 2 and len(per_student) == 2 and len(per_shard) == 2, iterations
    for it in per_model:
        for artifact in ("train-model-2/model", "fit-transform/transformation", "fit-transform/train_embeddings"):
            assert (it / artifact).stat().st_size > 0, it / artifact
    for it in per_student:
        assert (it / "train-kd-student" / "student").stat().st_size > 0, it
    shard_rows = []
    for it in per_shard:
        task = sorted(p.name for p in (it / "embed-gallery-shard").iterdir())
        assert task == ["executor_output.json", "gallery"]  # kfp.local's record and the artifact: no working files
        meta = json.loads(pq.read_schema(it / "embed-gallery-shard" / "gallery").metadata[b"cmce"])
        assert meta["shard"] in ("0/2", "1/2") and [m["name"] for m in meta["members"]] == GALLERY
        shard_rows.append(pq.ParquetFile(it / "embed-gallery-shard" / "gallery").metadata.num_rows)
    gallery = kfp_run / "merge-shards" / "gallery"
    meta = json.loads(pq.read_schema(gallery).metadata[b"cmce"])
    assert [m["name"] for m in meta["members"]] == GALLERY and "shard" not in meta
    assert pq.ParquetFile(gallery).metadata.num_rows == sum(shard_rows) and min(shard_rows) > 0
    assert (kfp_run / "build-index" / "index" / "meta.json").exists()
    assert "| asym_ensemble/2 |" in (kfp_run / "evaluate" / "results").read_text()


def test_a_local_run_names_its_query_model_and_index_and_the_commands_that_use_them(kfp_run, capsys):
    """Its task folders are kfp.local's (`train-model/model`, `for-loop-1-iteration-0/train-model-2/model`): a new
    user guessed which `model` was the query model. The summary names it by the sha256 the index records, and
    each command it prints runs as printed."""
    import shlex

    from cmce.cli import main as cmce
    from pipeline.next_steps import next_steps

    said = next_steps(kfp_run, {})
    assert f"query model   {kfp_run / 'train-model' / 'model'}\n" in said
    assert f"index         {kfp_run / 'build-index' / 'index'}\n" in said
    assert f"dataset       {kfp_run / 'prepare-data' / 'dataset'}\n" in said
    assert f"gallery       {kfp_run / 'merge-shards' / 'gallery'}\n" in said  # what --gallery takes
    search = [line.split() for line in said.splitlines() if " search " in line and "--dataset" in line]
    assert len(search) == 1
    argv = shlex.split(" ".join(search[0]))
    capsys.readouterr()
    assert cmce(argv[argv.index("search"):]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == 3 and all(len(a["hits"]) == 5 for a in answers)
    assert all(hit["id"] != a["query"] for a in answers for hit in a["hits"])  # --exclude-self, as printed
    serve = next(line for line in said.splitlines() if " serve " in line)
    assert "--query-model" in serve and "--index" in serve and "--dataset" in serve
    nothing = kfp_run.parent / "not-a-run"
    nothing.mkdir()
    assert next_steps(nothing, {}) == ""  # a run without an index: no summary


def test_a_lifecycle_runs_summary_finds_its_query_model_among_its_inputs(tmp_path):
    """add-gallery-model indexes the served query model, an input: no `model` of the run's own is it."""
    from pipeline.next_steps import next_steps

    run_dir, inputs = tmp_path / "cmce-add-gallery-model-1", tmp_path / "w"
    for folder in (run_dir / "for-loop-1-iteration-0" / "train-model", run_dir / "build-index" / "index", inputs):
        folder.mkdir(parents=True)
    (run_dir / "for-loop-1-iteration-0" / "train-model" / "model").write_bytes(b"the new gallery model")
    query, dataset = inputs / "query.pt", inputs / "dataset.parquet"
    query.write_bytes(b"the served query model")
    (run_dir / "build-index" / "index" / "meta.json").write_text(json.dumps({"query_model_sha256": file_sha256(query)}))
    said = next_steps(run_dir, {"query_model_uri": str(query), "dataset_uri": str(dataset)})
    assert f"query model   {query}\n" in said and f"dataset       {dataset}\n" in said
    assert next_steps(run_dir, {}) == ""  # the index's query model is nowhere: nothing to point to


def test_kfp_locals_warnings_of_cluster_settings_are_said_once_not_twice_a_task(caplog):
    """kfp.local's own warnings, raised by its own code: `localhost/cmce:cuda` on a CPU-only run read as a fault."""
    import warnings

    from kfp.local.orchestrator.task_executor import _warn_local_only_noops
    from kfp.local.subprocess_task_handler import SubprocessTaskHandler
    from kfp.pipeline_spec import pipeline_spec_pb2 as spec

    from pipeline.relay import cluster_settings_said_once

    def warn() -> None:
        SubprocessTaskHandler.validate_image(None, "localhost/cmce:cuda")
        _warn_local_only_noops("train-model", spec.PipelineTaskSpec(task_info=spec.PipelineTaskInfo(name="train")),
                               spec.PipelineDeploymentConfig.PipelineContainerSpec())

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warn()
        assert len(seen) == 2, [str(w.message) for w in seen]  # they still warn outside a local run
        seen.clear()
        with caplog.at_level(logging.INFO, logger="pipeline"), cluster_settings_said_once():
            warn()
            warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another warning"]
    assert "images, resource and GPU requests apply on a cluster" in caplog.text


@pytest.mark.parametrize("terminal", [False, True])
def test_the_relayed_task_output_loses_the_executors_input_dump_and_colours_off_a_terminal(terminal):
    """A task's executor dumped its whole input as JSON: two thirds of `make run`'s 2,400 lines. kfp.local
    indents each relayed line in a write of its own, and colours its lines even into a file."""
    import io

    from pipeline.relay import TidiedRelay

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    out = Stream()
    relay = TidiedRelay(out)
    task = ["[KFP Executor 2026-12-06 07:03:04,188 INFO]: Got executor_input:", "{", '    "inputs": {',
            '        "parameterValues": {"overrides": []}', "    }", "}",
            "[KFP Executor 2026-12-06 07:03:05,001 INFO]: query epoch 1/3 loss 0.6183",
            "{not the dump: a line of the task's own}"]
    print("\x1b[96m'resolve-config'\x1b[0m starts", file=relay)
    for line in task:
        relay.write("    ")  # kfp.local's indented print: the indentation first, then the line
        relay.write(line + "\n")
    relay.write("    last line, no end")
    assert out.getvalue().count("\n") == 3  # whole lines only, until flushed
    relay.flush()
    colour = ("\x1b[96m", "\x1b[0m") if terminal else ("", "")
    assert out.getvalue().splitlines() == [
        f"{colour[0]}'resolve-config'{colour[1]} starts",
        "    [KFP Executor 2026-12-06 07:03:05,001 INFO]: query epoch 1/3 loss 0.6183",
        "    {not the dump: a line of the task's own}",
        "    last line, no end"]


def test_parallel_branches_relayed_at_once_keep_their_own_lines_and_dumps():
    """kfp.local relays parallel branches from parallel threads: one branch's dump swallowed the other's
    traceback lines, and one half-written line took the other's text."""
    import io

    from pipeline.relay import TidiedRelay

    out = io.StringIO()
    relay = TidiedRelay(out)
    a_dumps, b_fails = threading.Event(), threading.Event()

    def branch_a() -> None:
        relay.write("    [KFP Executor 1 INFO]: Got executor_input:\n    {\n")
        a_dumps.set()
        b_fails.wait(10)
        relay.write('        "inputs": {}\n    }\n    [KFP Executor 2 INFO]: a done\n')

    def branch_b() -> None:
        a_dumps.wait(10)
        relay.write("    Traceback (most recent call last):\n")
        relay.write('      File "/x.py", line 3')  # a partial line, ended after the other branch wrote
        b_fails.set()
        relay.write("\n    ValueError: b failed\n")

    threads = [threading.Thread(target=branch_a), threading.Thread(target=branch_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert out.getvalue().splitlines() == ["    Traceback (most recent call last):", '      File "/x.py", line 3',
                                           "    ValueError: b failed", "    [KFP Executor 2 INFO]: a done"]

    out.truncate(0)
    out.seek(0)
    ended = threading.Event()

    def a_task_ends_without_its_lines_end() -> None:
        relay.write("    ")  # kfp.local's indentation of the next line, then a half line
        relay.flush()  # by a logging handler of this thread: the indentation alone waits for its line
        relay.write("half a line")
        ended.set()

    worker = threading.Thread(target=a_task_ends_without_its_lines_end)
    worker.start()
    ended.wait(10)
    relay.flush()  # another thread's flush (a log record): the worker's half line is not cut
    assert out.getvalue() == ""
    relay.flush_all()  # the run's end
    assert out.getvalue() == "    half a line"
    worker.join(10)


def test_local_run_matches_in_process_run(kfp_run, smoke_run):
    _, expected = smoke_run
    got = json.loads((kfp_run / "evaluate" / "report" / "metrics.json").read_text())
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], nan_ok=True), key


def test_local_run_makes_the_same_models_as_the_in_process_run(kfp_run, smoke_run):
    """The same config and seed give byte-identical checkpoints through KFP and in one process: every model,
    transformation and KD student (compared by sha256, the version every artifact records)."""
    from cmce.checkpoint import load_embedding_model
    from cmce.storage import file_sha256
    from cmce.transform import load_transformation

    lay, _ = smoke_run
    made = {"query": kfp_run / "train-model" / "model"}
    for it in kfp_run.glob("for-loop-*-iteration-*"):
        if (it / "train-model-2").exists():
            name = load_embedding_model(it / "train-model-2" / "model").name
            made[name] = it / "train-model-2" / "model"
            made[f"T_{name}"] = it / "fit-transform" / "transformation"
        if (it / "train-kd-student").exists():
            made[load_embedding_model(it / "train-kd-student" / "student").name] = it / "train-kd-student" / "student"
    expected = {"query": lay.model("query")}
    for g in GALLERY:
        expected |= {g: lay.model(g), f"T_{g}": lay.transformation(g), f"kd_{g}": lay.kd_student(g)}
    assert made.keys() == expected.keys()
    for name in expected:
        assert file_sha256(made[name]) == file_sha256(expected[name]), name
    assert load_transformation(made[f"T_{GALLERY[0]}"]).gallery_model == GALLERY[0]


def test_local_run_without_kd_trains_no_student(tmp_path, smoke_run):
    """kd.enabled: false in the params skips the KD branch: no student task, no kd/* metrics, the rest equal."""
    params = yaml.safe_load(SMOKE.read_text())
    params["kd"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run_dir = run_local(build_parser().parse_args(["run", "--local", "--params", str(tmp_path / "params.yaml"),
                                                   "--root", str(tmp_path / "kfp"), "--no-mlflow"]))
    assert not list(run_dir.rglob("train-kd-student*"))
    got = json.loads(next(run_dir.glob("evaluate*/report/metrics.json")).read_text())
    _, expected = smoke_run
    assert got.keys() == {k for k in expected if not k.startswith("kd/")}
    for key in got:
        assert got[key] == pytest.approx(expected[key], nan_ok=True), key


def test_mlflow_has_runs_and_loads_registered_query_model(kfp_run):
    import mlflow
    from mlflow import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{kfp_run.parent / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("cmce")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_name == "cmce")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = {r.info.run_name for r in children}
    assert {"prepare-data", "train-query", "export-query", "train-resnet_a", "train-vgg_b", "fit-transform-resnet_a",
            "embed-gallery", "merge", "build-index", "evaluate"} <= names
    evaluation = next(r for r in children if r.info.run_name == "evaluate")
    assert 0 < evaluation.data.metrics["asym_ensemble/2/R_at_1"] <= 1
    # the pipeline run itself: headline numbers, code and data versions (on every step's run too)
    assert parent.data.metrics["ensemble/R_at_1"] == evaluation.data.metrics["asym_ensemble/2/R_at_1"]
    from cmce.storage import file_sha256
    from cmce.tracking import DATA_TAG, GIT_COMMIT_TAG, code_tags

    data_sha = file_sha256(kfp_run / "prepare-data" / "dataset")
    assert {r.data.tags.get(DATA_TAG) for r in [parent, *children]} == {data_sha}
    assert {r.data.tags.get(GIT_COMMIT_TAG) for r in [parent, *children]} == {code_tags().get(GIT_COMMIT_TAG)}
    index_run = next(r for r in children if r.info.run_name == "build-index")
    assert "index/meta.json" in {a.path for a in client.list_artifacts(index_run.info.run_id, "index")}
    assert "asym_ensemble/2/TAR_at_FAR_0.001" in evaluation.data.metrics
    assert evaluation.data.params["registry.cmce-query"].startswith("cmce-query@candidate=v")
    train = next(r for r in children if r.info.run_name == "train-query")
    assert len(client.get_metric_history(train.info.run_id, "loss")) == 3  # one point per epoch
    for name in ("cmce-query", "cmce-gallery-resnet_a", "cmce-transform-vgg_b"):
        assert client.get_model_version_by_alias(name, "candidate").version

    # a fresh client alone fetches the registered query model; it reproduces the pipeline's query embeddings
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/cmce-query@candidate")
    from pathlib import Path

    from cmce.checkpoint import load_embedding_model
    from cmce.embed import embed_split
    from cmce.tables import embedding_column

    ckpt = next(p for p in Path(local).rglob("*") if p.is_file())
    model = load_embedding_model(ckpt)
    emb = embed_split(model, kfp_run / "prepare-data" / "dataset", "test")
    query = pq.read_table(kfp_run / "evaluate" / "report" / "query.parquet")
    assert emb.ids == query.column("id").to_pylist()
    np.testing.assert_allclose(emb.embeddings, embedding_column(query, "embedding", "q"), atol=1e-5)

    # the query model's ONNX export, registered with the checkpoint's sha256 and checked against torch in the step
    edge = client.get_model_version_by_alias("cmce-query-onnx", "candidate")
    assert edge.tags["sha256"] == model.sha256
    export_run = next(r for r in children if r.info.run_name == "export-query")
    assert export_run.data.metrics["max_abs_diff"] <= 1e-4 and export_run.data.metrics["top_k_agreement"] == 1.0


@pytest.mark.parametrize("argv, needle", [
    (["run", "--local", "--params", "{tmp}/nope.yaml"], "nope.yaml: config file not found"),
    (["run", "--local", "--params", "{tmp}/list.yaml"], "list.yaml: top level must be a mapping"),
    # an empty list was read as an empty file: `gallery_models must list at least one model`
    (["run", "--local", "--params", "{tmp}/empty_list.yaml"], "empty_list.yaml: top level must be a mapping of "
                                                               "settings, not a YAML list"),
    (["compile", "--out-dir", "{tmp}/no/such"], "--out-dir {tmp}/no/such: no such folder"),
    (["compile", "--out-dir", "{tmp}/list.yaml"], "--out-dir {tmp}/list.yaml: not a folder"),  # was `no such`
    # a URI as a local path: `./s3:/b/r` was made in the working folder and filled with a whole run, exit 0
    (["run", "--local", "--root", "s3://b/r"], "--root s3://b/r: a local folder is read here, not a URI"),
    (["run", "--local", "--params", "s3://b/p.yaml"], "--params s3://b/p.yaml: a local file is read here, not a URI"),
    # a folder nothing can be made in: two tasks' FileNotFoundError tracebacks, then exit 1 naming a task
    (["run", "--local", "--no-mlflow", "--root", "/proc/self"], "--root /proc/self: cannot write there"),
])
def test_the_pipeline_command_refuses_bad_input_in_one_line(tmp_path, caplog, argv, needle):
    from pipeline.__main__ import main

    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "empty_list.yaml").write_text("[]\n")
    caplog.clear()
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and needle.format(tmp=tmp_path) in errors[0], errors


def test_submit_to_a_dead_or_foreign_host_is_one_line_naming_it(tmp_path, caplog, monkeypatch):
    """A dead KFP host gave three tracebacks; an HTTP server that is not KFP, 158 lines of retries over 25 s,
    neither naming --host."""
    import functools
    import http.server
    import socket
    import threading

    from pipeline.__main__ import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # a file store there is refused before the host
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    foreign = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for host, reason in ((dead, "cannot reach the KFP API"), (foreign, "not a KFP API endpoint")):
            caplog.clear()
            with caplog.at_level(logging.INFO):
                assert main(["submit", "--host", host]) == 2
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and f"--host {host}: {reason}" in errors[0], caplog.text
        caplog.clear()  # a password in the URL is not printed (it was, twice)
        assert main(["submit", "--host", dead.replace("http://", "http://alice:s3cr3tpw@")]) == 2
        assert "s3cr3tpw" not in caplog.text and "http://***@127.0.0.1" in caplog.text
    finally:
        server.shutdown()
        server.server_close()


def test_a_submitted_run_logs_to_the_tracking_server_given(monkeypatch, caplog):
    """`submit` could not set the pipeline's mlflow_uri: a run submitted as the README said was tracked nowhere and
    registered no model, unsaid. A store only this machine reaches, or a password the KFP UI would show, is refused
    before the endpoint is called."""
    from pipeline.__main__ import build_parser, main, submit_arguments

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def arguments(*argv: str) -> dict:
        return submit_arguments(build_parser().parse_args(["submit", "--host", "http://127.0.0.1:1", *argv]))

    assert arguments("--mlflow-uri", "https://mlflow.example:5000")["mlflow_uri"] == "https://mlflow.example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.cluster.local")
    assert arguments()["mlflow_uri"] == "http://mlflow.cluster.local"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert "mlflow_uri" not in arguments()
    assert "the run is tracked nowhere and registers no model" in caplog.text
    for uri, said in (("sqlite:///runs/mlflow.db", "a store on this machine"), ("runs/mlruns", "a store on this"),
                      ("https://alice:s3cr3tpw@mlflow.example", "credentials in the URI"),
                      # these were taken: the tasks failed on them, or (databricks) were said to be a local store
                      ("ftp://x", "not a tracking server's URI (ftp:)"),
                      ("mlflow-artifacts:/x", "not a tracking server's URI (mlflow-artifacts:)"),
                      ("http://", "no host"), ("https:///path", "no host"), ("http://h:99999", "not a port 1 to 65535"),
                      ("http://h:0", "not a port"), ("databricks", "a Databricks workspace, whose credentials the "
                                                                   "cluster's tasks do not get"),
                      ("databricks://profile", "a Databricks workspace")):
        caplog.clear()
        assert main(["submit", "--host", "http://127.0.0.1:1", "--mlflow-uri", uri]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "--mlflow-uri" in errors[0] and said in errors[0], errors
        assert "s3cr3tpw" not in caplog.text and "KFP API" not in caplog.text  # the host was not called


@pytest.mark.parametrize("spelling, gpu", [("false", False), ("No", False), ("off", False), ("true", True),
                                           ("1", True)])
def test_the_gpu_switch_reads_the_usual_spellings(tmp_path, monkeypatch, spelling, gpu):
    """`CMCE_GPU=false` compiled the GPU pipeline: only `0` counted."""
    monkeypatch.setenv("CMCE_GPU", spelling)
    text = compile_pipeline(tmp_path / "p.yaml").read_text()
    assert ("nvidia.com/gpu" in text) == gpu


@pytest.mark.parametrize("name, value, message", [
    ("CMCE_GPU", "nope", "environment variable CMCE_GPU='nope': one of 1, true"),
    ("CMCE_K8S_SECRET", "Bad_Secret!", "environment variable CMCE_K8S_SECRET='Bad_Secret!': not a Kubernetes Secret"),
    ("CMCE_K8S_SECRET", "-keys", "not a Kubernetes Secret name"),
])
def test_a_compile_setting_out_of_its_range_is_refused_by_name(tmp_path, monkeypatch, caplog, name, value, message):
    """`CMCE_K8S_SECRET='Bad_Secret!'` was compiled into every task; the cluster refused it only at run time."""
    from pipeline.__main__ import main

    monkeypatch.setenv(name, value)
    assert main(["compile", "--out-dir", str(tmp_path)]) == 2
    assert message in caplog.text and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, value", [("CMCE_CUDA_IMAGE", ""), ("CMCE_CPU_IMAGE", ""), ("CMCE_CPU_IMAGE", "  ")])
def test_an_image_variable_set_but_blank_is_refused_by_name(tmp_path, monkeypatch, caplog, name, value):
    """`CMCE_CUDA_IMAGE="$IMG"` with IMG unset compiled, exit 0, YAML whose GPU tasks had no image at all."""
    from pipeline.__main__ import main

    monkeypatch.setenv(name, value)
    assert main(["compile", "--out-dir", str(tmp_path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"environment variable {name} is set but empty" in errors[0], errors
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["my image:latest", "team/Cmce:cpu", "cmce:", "cmce:v1 ", "reg.io/cmce@sha256:ab12",
                                   "reg.io//cmce", "cmce:" + "x" * 129, "reg.io/-cmce", "cmce\n"])
def test_an_image_reference_a_cluster_would_refuse_is_refused_at_compile_time(tmp_path, monkeypatch, caplog, value):
    """`CMCE_CPU_IMAGE='my image:latest'` was compiled into 16 tasks; pods failed only at start (InvalidImageName)."""
    from pipeline.__main__ import main

    monkeypatch.setenv("CMCE_CPU_IMAGE", value)
    assert main(["compile", "--out-dir", str(tmp_path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"environment variable CMCE_CPU_IMAGE={value!r}: not an image reference" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_image_references_of_the_grammar_are_compiled_in(tmp_path, monkeypatch):
    digest = "0123456789abcdef" * 4
    images = {"CMCE_CPU_IMAGE": "registry.example.com:5000/team/cmce__x.y-z:v1.2_rc-3",
              "CMCE_CUDA_IMAGE": f"[fd00::1]:443/cmce/cuda@sha256:{digest}"}
    for name, value in images.items():
        monkeypatch.setenv(name, value)
    executors = _compiled(compile_pipeline(tmp_path / "p.yaml"))[0]["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == set(images.values())


@pytest.mark.parametrize("argv, message", [
    (["run", "--local", "--parallelism", "-1"], "argument --parallelism: must be from 0 to 1024, got -1"),
    (["run", "--local", "--embed-shards", "0"], "argument --embed-shards: must be from 1 to 1024, got 0"),
    (["submit", "--host", "h", "--embed-workers", "65"], "argument --embed-workers: must be from 0 to 64, got 65"),
    (["run", "--local", "--embed-shards", "two"], "argument --embed-shards: invalid integer from 1 to 1024 value"),
])
def test_a_numeric_option_out_of_its_range_is_refused_at_parse_time_by_name(capsys, argv, message):
    """`--parallelism -1` was kfp's `ParallelFor parallelism must be >= 0` (no flag named); `--embed-shards 0` was
    accepted and failed in its task, after the training."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0], err
    usage = build_parser().parse_args(["run", "--local"])  # the defaults are in range
    assert (usage.parallelism, usage.embed_shards, usage.embed_workers) == (1, None, None)


def test_lifecycle_inputs_are_refused_for_the_cmce_pipeline_and_required_for_a_lifecycle_one(tmp_path, caplog):
    """`--inputs-from RUN` without `--pipeline` ran the whole cmce pipeline, exit 0, the flag unread; a lifecycle
    pipeline without its inputs exited 1 with a bare line; an unfinished KFP run's folder was `…/data/dataset.parquet
    not found`."""
    from pipeline.__main__ import main

    run, kfp = tmp_path / "run", tmp_path / "kfp" / "cmce-2026-12-06-07-03-04-122569"
    run.mkdir()
    (kfp / "prepare-data").mkdir(parents=True)  # as kfp.local names its task folders
    for argv, said in [
        (["--inputs-from", str(run)], "--inputs-from: the lifecycle pipelines' inputs"),
        (["--query-model-uri", "q.pt", "--gallery-uri", "g.parquet"], "--query-model-uri, --gallery-uri: the"),
        (["--pipeline", "add-gallery-model"], "pipeline add-gallery-model needs --inputs-from RUN_DIR or "
                                              "--dataset-uri"),
        (["--pipeline", "add-gallery-model", "--inputs-from", str(kfp)], f"--inputs-from {kfp}: no "
                                                                          "prepare-data/dataset (a KFP run of the")]:
        caplog.clear()
        assert main(["run", "--local", "--no-mlflow", "--root", str(tmp_path / "root"), *argv]) == 2
        assert caplog.records[-1].getMessage().startswith(f"python -m pipeline run: {said}")
    assert not (tmp_path / "root").exists()


def test_a_kfp_run_of_the_cmce_pipeline_gives_the_lifecycle_pipelines_their_inputs(kfp_run, tmp_path, caplog):
    """`make run` makes a KFP run; --inputs-from took only a `cmce run` folder, and the user had to find the query
    model among the run's `model` files and gather its train embeddings into one folder by hand. The query model is
    the one the gallery was made for; a cluster cannot read the run's local files."""
    import shlex

    from cmce.tables import read_metadata
    from pipeline.__main__ import LIFECYCLE
    from pipeline.next_steps import lifecycle_commands

    same = ["--params", str(SMOKE), "--set", "train.epochs=2", "--root", str(tmp_path / "r"), "--no-mlflow"]
    said = lifecycle_commands(kfp_run, LIFECYCLE, same).splitlines()  # as a finished run prints them
    assert [line.split()[line.split().index("--pipeline") + 1] for line in said] == list(LIFECYCLE)
    argv = shlex.split(said[1])
    args = build_parser().parse_args(argv[argv.index("run"):])
    assert (args.params, args.set, args.root, args.no_mlflow) == (str(SMOKE), ["train.epochs=2"], str(tmp_path / "r"),
                                                                  True)  # the run's own settings
    got = _arguments(args)
    assert (got["dataset_uri"], got["gallery_uri"]) == (str(kfp_run / "prepare-data" / "dataset"),
                                                         str(kfp_run / "merge-shards" / "gallery"))
    assert got["query_model_uri"] == str(kfp_run / "train-model" / "model")
    members = {m["sha256"] for m in read_metadata(got["gallery_uri"])["members"]}
    assert {read_metadata(f)["gallery_model"]["sha256"] for f in got["train_embeddings_uri"]} == members
    # grown with another run's data settings (params.yaml's over the smoke run's 8-px digits): a 28-px model was
    # trained on the images enlarged, nothing said. Said before any task; the run's own params are silent
    bare = build_parser().parse_args(["run", "--local", "--pipeline", "add-gallery-model", "--inputs-from",
                                      str(kfp_run)])
    caplog.clear()
    assert _arguments(bare)["dataset_uri"] == got["dataset_uri"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "the run's dataset and query model were made with data.source=digits; data.image_size=8, data.channels=1; "
        "params.yaml (with its --set) says data.source=fashion_mnist, data.image_size=28, data.channels=1: the "
        "params that run was made with go with --params"]
    caplog.clear()
    _arguments(args)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with pytest.raises(ValueError, match=rf"^--inputs-from {kfp_run}: a local KFP run's folder, which a cluster's "):
        _arguments(build_parser().parse_args(["submit", "--host", "h", "--pipeline", "upgrade-query-model",
                                              "--inputs-from", str(kfp_run)]))
    lifecycle = (tmp_path / "cmce-add-gallery-model-2026-12-06-10-00-00-000000").resolve()
    (lifecycle / "add-member").mkdir(parents=True)
    add = ["run", "--local", "--pipeline", "add-gallery-model", "--params", str(SMOKE), "--inputs-from"]
    with pytest.raises(ValueError, match=rf"^--inputs-from {lifecycle}: no new gallery \(a lifecycle run that "):
        _arguments(build_parser().parse_args([*add, str(lifecycle)]))
    unfinished = (tmp_path / "cmce-2026-12-06-10-00-00-000000").resolve()  # stopped before prepare-data
    for task in ("resolve-config", "start-tracking"):
        (unfinished / task).mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"^--inputs-from {unfinished}: no prepare-data/dataset \(a KFP run of "):
        _arguments(build_parser().parse_args([*add, str(unfinished)]))
    flags = {"--dataset-uri": got["dataset_uri"], "--gallery-uri": got["gallery_uri"],
             "--query-model-uri": got["query_model_uri"]}  # what the folder lacks, given by flags
    given = _arguments(build_parser().parse_args([*add, str(unfinished), *(x for kv in flags.items() for x in kv)]))
    assert (given["dataset_uri"], given["gallery_uri"], given["query_model_uri"]) == tuple(flags.values())
    # the model the pipeline trains: unset (a KeyError in train-model, three times), or already a member (trained
    # and embedded for minutes, then refused by add-member three times)
    with pytest.raises(ValueError, match=r"^lifecycle.add_gallery_model: not set in the params"):
        _arguments(build_parser().parse_args([*add, str(kfp_run), "--set", "lifecycle.add_gallery_model=null"]))
    import dataclasses

    from cmce.config import load_config
    from pipeline.__main__ import _check_lifecycle_model

    cfg = load_config(SMOKE)
    member = read_metadata(got["gallery_uri"])["members"][0]["name"]
    cfg.lifecycle.add_gallery_model = dataclasses.replace(cfg.lifecycle.add_gallery_model, name=member)
    with pytest.raises(ValueError, match=rf"^lifecycle.add_gallery_model.name: '{member}' is already a member of"):
        _check_lifecycle_model("add-gallery-model", got, cfg)


def test_a_local_run_asks_for_no_device_this_machine_lacks_and_one_run_at_a_time_writes_into_a_root(tmp_path,
                                                                                                    monkeypatch,
                                                                                                    caplog):
    """`--set device=cuda` on a CPU machine failed each task three times (DeviceError tracebacks); two runs at once
    into one --root each reported the newest run folder as its own (the other's results, exit 0), and a stop of one
    marked the other's MLflow run KILLED."""
    import fcntl

    from pipeline.__main__ import main
    from pipeline.cleanup import ROOT_LOCK

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    caplog.clear()
    assert main(["run", "--local", "--no-mlflow", "--params", str(SMOKE), "--set", "device=cuda", "--root",
                 str(tmp_path / "r")]) == 2
    assert "device: cuda was asked for, but torch sees no CUDA device" in caplog.records[-1].getMessage()
    root = tmp_path / "busy"
    root.mkdir()
    with open(root / ROOT_LOCK, "w") as held:  # another run's, under way
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        caplog.clear()
        assert main(["run", "--local", "--no-mlflow", "--params", str(SMOKE), "--root", str(root)]) == 2
    assert caplog.records[-1].getMessage() == (f"python -m pipeline run: --root {root}: another local run is writing "
                                               "there now; wait for it to end, or give another --root")
    assert sorted(p.name for p in root.iterdir()) == [ROOT_LOCK]  # no run folder made


def test_a_cmce_run_folder_gives_the_query_model_its_gallery_was_made_for_whatever_its_name(smoke_run, tmp_path):
    """A run made with query_model.name=q: `--inputs-from` looked for models/query.pt (not found)."""
    lay, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(lay.root, run)
    (run / "models" / "query.pt").rename(run / "models" / "q.pt")
    got = _arguments(build_parser().parse_args(["run", "--local", "--pipeline", "add-gallery-model", "--params",
                                                str(SMOKE), "--inputs-from", str(run)]))
    assert got["query_model_uri"] == str(run / "models" / "q.pt")


@pytest.mark.parametrize("decision, said", [
    ("{not json", "not a readable gate decision (JSONDecodeError"),
    ("{}", "not a readable gate decision (KeyError"),
    ('{"promoted": true, "baseline_gallery": "RUN/add-member/new_gallery"}', "the runs it started from lead back"),
    # a TypeError traceback
    ('{"promoted": false, "regressed": true, "baseline_gallery": "x"}', "decision: not a readable gate decision "
                                                                        "(regressed: a list expected, not true)"),
    ('{"promoted": false, "regressed": 5, "baseline_gallery": "x"}', "(regressed: a list expected, not 5)"),
    ('{"promoted": "no", "baseline_gallery": "x"}', '(promoted: true or false expected, not "no")'),
])
def test_a_lifecycle_run_whose_decision_is_unreadable_or_loops_is_refused_naming_it(tmp_path, decision, said):
    """A decision edited by hand: a KeyError traceback, or a chain of runs followed for ever."""
    run = (tmp_path / "cmce-add-gallery-model-2026-12-06-11-00-00-000000").resolve()
    for task in ("add-member", "gate"):
        (run / task).mkdir(parents=True)
    (run / "add-member" / "new_gallery").write_bytes(b"PAR1")
    (run / "gate" / "decision").write_text(decision.replace("RUN", str(run)))
    with pytest.raises(ValueError, match=re.escape(said)):
        _arguments(build_parser().parse_args(["run", "--local", "--pipeline", "upgrade-query-model",
                                              "--inputs-from", str(run)]))


def test_a_query_model_replaced_since_its_gallery_was_made_is_named_as_the_cause(tmp_path):
    """A lifecycle run chained from a `cmce run` folder written again since: "no model of the run is the query model
    its gallery was transformed for", nothing said of the cause or of the files looked at."""
    import pyarrow as pa

    from cmce.tables import with_metadata, write_table
    from pipeline.run_folder import query_model_of

    gallery = write_table(with_metadata(pa.table({"id": ["a"]}), {"query_model_sha256": "ab" * 32}),
                          tmp_path / "gallery.parquet")
    (models := tmp_path / "models").mkdir()
    (models / "query.pt").write_bytes(b"the model of a later run")
    with pytest.raises(ValueError) as err:
        query_model_of(tmp_path, str(gallery), [models / "query.pt"])
    assert str(err.value) == (f"{tmp_path}: no model of the run is the query model its gallery {gallery} was "
                              f"transformed for (sha256 abababababab; looked at {models / 'query.pt'}): a model "
                              "replaced since (a run written again into its folder) is not it; give it with "
                              "--query-model-uri")


def test_a_kfp_runs_train_embeddings_are_gathered_through_links_to_their_files(tmp_path):
    """A relative link to a file was linked itself, dangling in the folder gathered; a link there is to the file.
    It resolves to that file: hard links made the temporary folder's path what the run recorded as read."""
    from pipeline.run_folder import gather

    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "real").write_bytes(b"embeddings")
    (tmp_path / "task" / "train_embeddings").symlink_to("real")
    folder = gather([str(tmp_path / "task" / "train_embeddings")], tmp_path / "gathered")
    assert (folder / "0.parquet").read_bytes() == b"embeddings"
    assert (folder / "0.parquet").resolve() == tmp_path / "task" / "real"


def test_every_flag_of_the_pipeline_runner_has_help():
    """`--run-name RUN_NAME`, `--no-mlflow`, `--namespace NAMESPACE` and others were shown bare."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    bare = {name: [a.option_strings[-1] for a in sp._actions if a.option_strings and not a.help]
            for name, sp in sub.items()}
    assert {name: flags for name, flags in bare.items() if flags} == {}


def test_the_numeric_ranges_are_in_the_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(0 to 1024, 0 = no cap" in text and "(1 to 1024)" in text and "(0 to 64;" in text


def test_a_relative_tracking_store_is_one_absolute_store_for_every_task(tmp_path, monkeypatch, caplog):
    """MLFLOW_TRACKING_URI=sqlite:///rel.db: the start-tracking task failed (`relative path can't be expressed as a
    file URI`) with a traceback, was retried three times, and had made a store first. The tasks get the store the
    path names in the working folder, as an absolute URI; a setting out of range stops the run before anything."""
    from kfp import local

    from pipeline.__main__ import main

    work, root = tmp_path / "work", tmp_path / "root"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    seen = []

    def started(**_):
        seen.append(os.environ["MLFLOW_TRACKING_URI"])
        raise OSError("stopped before any task")

    monkeypatch.setattr(local, "init", started)
    assert main(["run", "--local", "--root", str(root)]) == 2
    assert seen == [f"sqlite:///{work / 'rel.db'}"] and list(work.iterdir()) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "-1")
    caplog.clear()
    assert main(["run", "--local", "--root", str(tmp_path / "root2")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["python -m pipeline run: environment variable MLFLOW_HTTP_REQUEST_MAX_RETRIES='-1': an integer "
                      "from 0 to 10 expected (MLflow's range)"]
    assert len(seen) == 1 and not (tmp_path / "root2").exists() and list(work.iterdir()) == []


def test_a_local_run_reads_a_relative_data_path_from_the_params_folder_and_checks_the_compiled_params(tmp_path):
    """`python -m pipeline run --local` started outside the project fetched 30 MB of Fashion-MNIST into the working
    folder (data.path is relative); `--set train.epochs=0` without --params failed in the first task, with a
    traceback, after the run folder was made."""
    from cmce.config import ConfigError
    from pipeline.cmce_pipeline import PARAMS_FILE

    run = build_parser().parse_args(["run", "--local", "--root", str(tmp_path / "r")])
    assert _arguments(run)["overrides"] == [f"data.path={PARAMS_FILE.parent / 'data/fashion-mnist'}"]
    submit = build_parser().parse_args(["submit", "--host", "h"])
    assert "overrides" not in _arguments(submit)  # on a cluster, the container's own folders
    bad = build_parser().parse_args(["run", "--local", "--root", str(tmp_path / "r"), "--set", "train.epochs=0"])
    with pytest.raises(ConfigError, match=r"^--set train.epochs must be in \[1, 100000\], got 0"):
        _arguments(bad)
    assert not (tmp_path / "r").exists()


def test_a_relative_data_path_given_with_set_is_the_working_folders_and_given_once(tmp_path, monkeypatch):
    """`run --local --set data.path=rel` appended the launcher's own absolute data.path to the user's: the first task
    refused `data.path` as given twice, while the launcher's check had passed. A path on the command line is the
    working folder's; the other overrides are kept."""
    from cmce.config import load_config
    from cmce.overrides import parse_overrides
    from pipeline.cmce_pipeline import PARAMS_FILE

    monkeypatch.chdir(tmp_path)
    for given in (["--set", "data.path=rel/data"], ["--set", "data={path: rel/data, heldout_fraction: 0.25}"]):
        run = build_parser().parse_args(["run", "--local", "--root", str(tmp_path / "r"), *given,
                                         "--set", "train.epochs=2"])
        overrides = _arguments(run)["overrides"]
        assert overrides[-1] == f"data.path={tmp_path / 'rel/data'}"
        cfg = load_config(PARAMS_FILE, parse_overrides(overrides))  # as the first task reads them
        assert (cfg.data.path, cfg.train.epochs) == (str(tmp_path / "rel/data"), 2)
        assert cfg.data.heldout_fraction == (0.25 if "heldout" in given[1] else load_config(PARAMS_FILE).data.
                                             heldout_fraction)


def test_lifecycle_inputs_missing_from_the_run_folder_are_named_before_the_run(tmp_path):
    """`--pipeline add-gallery-model --inputs-from <a run folder without gallery.parquet>` failed in its add-member
    task with a traceback, retried three times (30 s, then 60 s apart)."""
    (tmp_path / "partial").mkdir()
    args = build_parser().parse_args(["run", "--local", "--root", str(tmp_path / "r"), "--pipeline",
                                      "add-gallery-model", "--inputs-from", str(tmp_path / "partial")])
    with pytest.raises(ValueError, match=rf"^--inputs-from {tmp_path / 'partial'}: .*dataset.parquet not found"):
        _arguments(args)
    assert not (tmp_path / "r").exists()


def _run_folder(where):
    """The inputs a lifecycle pipeline takes from a `cmce run` folder: an empty dataset, a query model that is only
    bytes (its sha256 matters), a gallery made for it and the train embeddings of its one member (metadata only)."""
    import pyarrow as pa

    from cmce.data.schema import DATASET_SCHEMA
    from cmce.storage import file_sha256

    for rel in ("data", "models"):
        (where / rel).mkdir(parents=True, exist_ok=True)
    pq.write_table(DATASET_SCHEMA.empty_table(), where / "data/dataset.parquet")
    (where / "models/query.pt").write_bytes(b"the query model")
    query, member = file_sha256(where / "models/query.pt"), {"name": "resnet_a", "arch": "resnet", "sha256": "1" * 64}
    (where / "embeddings/train").mkdir(parents=True)
    for rel, meta in (("gallery.parquet", {"kind": "gallery", "split": "test", "query_model_sha256": query,
                                           "members": [{**member, "transformation_sha256": "2" * 64}]}),
                      ("embeddings/train/resnet_a.parquet", {"kind": "train_embeddings", "gallery_model": member,
                                                             "query_model_sha256": query})):
        pq.write_table(pa.table({"id": ["a"]}).replace_schema_metadata({"cmce": json.dumps(meta)}), where / rel)
    return where


@pytest.mark.parametrize("pipeline, flag, value, message", [
    ("add-gallery-model", "--gallery-uri", "s3://bucket/gallery.parquet",
     r"^--gallery-uri s3://bucket/gallery.parquet: the local runner reads local paths only"),
    ("add-gallery-model", "--dataset-uri", "{w}/data", r"^--dataset-uri: {w}/data is a folder, not a file"),
    ("add-gallery-model", "--query-model-uri", "{w}/models", r"^--query-model-uri: {w}/models is a folder, not a file"),
    ("upgrade-query-model", "--train-embeddings-uri", "{w}/gallery.parquet",
     r"^--train-embeddings-uri: {w}/gallery.parquet is not a folder"),
])
def test_a_lifecycle_input_the_local_runner_cannot_read_is_named_before_the_run(tmp_path, pipeline, flag, value,
                                                                                  message):
    """An s3:// gallery on the local runner failed in add-member three times (`/s3/…: file not found`, 135 s); a
    folder as --dataset-uri failed in its task (`is a directory`), retried at 30 s and 60 s."""
    w = _run_folder(tmp_path / "w")
    args = build_parser().parse_args(["run", "--local", "--root", str(tmp_path / "r"), "--pipeline", pipeline,
                                      "--inputs-from", str(w), flag, value.format(w=w)])
    with pytest.raises(ValueError, match=message.format(w=w)):
        _arguments(args)
    assert not (tmp_path / "r").exists()
    assert set(_arguments(build_parser().parse_args(["run", "--local", "--pipeline", pipeline, "--inputs-from",
                                                     str(w)]))) >= {"dataset_uri", "gallery_uri"}  # whole: accepted


@pytest.mark.parametrize("pipeline, flag, value", [
    ("add-gallery-model", "--query-model-uri", "models:/cmce-query@candidate"),
    ("add-gallery-model", "--gallery-uri", "runs:/0123abcd/gallery.parquet"),
    ("upgrade-query-model", "--train-embeddings-uri", "mlflow-artifacts:/1/abc/artifacts/train"),
])
@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_registered_model_or_run_artifact_as_a_lifecycle_input_is_refused_saying_to_download_it(
        tmp_path, pipeline, flag, value, command):
    """`--query-model-uri models:/cmce-query@candidate` said `not found (a run folder `cmce run` finished?)`: no
    task of either runner reads MLflow's URIs. It is said before a local input that is missing (here the dataset)."""
    w = _run_folder(tmp_path / "w")
    where = ["--local", "--root", str(tmp_path / "r")] if command == "run" else ["--host", "http://127.0.0.1:9"]
    args = build_parser().parse_args([command, *where, "--pipeline", pipeline, "--inputs-from", str(w), flag, value,
                                      "--dataset-uri", str(tmp_path / "D")])
    with pytest.raises(ValueError, match=rf"^{flag} {value}: the pipeline's inputs are files .* not registered models "
                                         rf"or run artifacts: download it first \(`mlflow artifacts download -u "
                                         rf"{value} -d DIR`"):
        _arguments(args)


def test_a_query_model_the_gallery_was_not_made_for_is_refused_before_any_task(tmp_path, caplog, monkeypatch):
    """`--inputs-from W --query-model-uri W/models/kd_resnet_a.pt`: three tasks ran for 42 s, then add-member failed
    (`transformed for query model d24e2d22dc86, the gallery for 92195e9e8b60`), retried twice."""
    from kfp import local

    from pipeline.__main__ import main

    w = _run_folder(tmp_path / "w")
    (w / "models/kd_resnet_a.pt").write_bytes(b"a KD student")
    monkeypatch.setattr(local, "init", lambda **_: pytest.fail("a task ran"))
    for pipeline in ("add-gallery-model", "upgrade-query-model"):
        caplog.clear()
        assert main(["run", "--local", "--no-mlflow", "--root", str(tmp_path / "r"), "--pipeline", pipeline,
                     "--inputs-from", str(w), "--query-model-uri", str(w / "models/kd_resnet_a.pt")]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        made_for = json.loads(pq.read_schema(w / "gallery.parquet").metadata[b"cmce"])["query_model_sha256"]
        assert errors == [f"python -m pipeline run: --query-model-uri: {w / 'models/kd_resnet_a.pt'} (sha256 "
                          f"{file_sha256(w / 'models/kd_resnet_a.pt')[:12]}) is not the query model the gallery "
                          f"{w / 'gallery.parquet'} was transformed for ({made_for[:12]}); give that query model"]
    assert not (tmp_path / "r").exists()


def test_train_embeddings_missing_a_member_of_the_gallery_are_refused_before_any_task(tmp_path):
    """upgrade-query-model trained a new query model first, then failed: `no stored train embeddings for gallery
    model 'resnet_a'`. A gallery file that is no gallery is named by its flag too."""
    w = _run_folder(tmp_path / "w")
    other = tmp_path / "other"
    other.mkdir()
    args = build_parser().parse_args(["run", "--local", "--pipeline", "upgrade-query-model", "--inputs-from", str(w),
                                      "--train-embeddings-uri", str(other)])
    with pytest.raises(ValueError, match=rf"^--train-embeddings-uri: {other} holds no train embeddings of the "
                                         r"gallery's model resnet_a \(no file of their sha256\)$"):
        _arguments(args)
    args = build_parser().parse_args(["run", "--local", "--pipeline", "add-gallery-model", "--inputs-from", str(w),
                                      "--gallery-uri", str(w / "embeddings/train/resnet_a.parquet")])
    with pytest.raises(ValueError, match=r"^--gallery-uri: .*resnet_a.parquet is not a gallery file "
                                         r"\(kind 'train_embeddings'\)$"):
        _arguments(args)


@pytest.mark.parametrize("under, says", [("", "is a file"), ("sub", "{file} is a file")])
@pytest.mark.parametrize("mlflow", [[], ["--no-mlflow"]])
def test_a_root_that_is_a_file_is_refused_by_name_and_left_alone(tmp_path, caplog, under, says, mlflow):
    """`--root rootfile.md` ended in `[Errno 17] File exists`, naming no flag."""
    from pipeline.__main__ import main

    file = tmp_path / "rootfile.md"
    file.write_text("notes\n")
    root = file / under if under else file
    caplog.clear()
    assert main(["run", "--local", *mlflow, "--root", str(root)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"python -m pipeline run: --root {root}: {says.format(file=file)}, not a folder"]
    assert file.read_text() == "notes\n"


def test_a_root_inside_the_run_folder_a_lifecycle_run_reads_is_refused(tmp_path, caplog):
    """`--root w2/kroot` with `--inputs-from w2`: 58 s of work written into the run folder it read."""
    from pipeline.__main__ import main

    w = _run_folder(tmp_path / "w")
    before = sorted(p.relative_to(w) for p in w.rglob("*"))
    caplog.clear()
    assert main(["run", "--local", "--no-mlflow", "--pipeline", "add-gallery-model", "--inputs-from", str(w),
                 "--root", str(w / "kroot")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"python -m pipeline run: --root {w / 'kroot'} is inside --inputs-from {w}: the run would "
                      "write into the run folder it reads; give a root elsewhere"]
    assert sorted(p.relative_to(w) for p in w.rglob("*")) == before


@pytest.mark.parametrize("root", ["{w}/embeddings/train", "{w}/embeddings/train/kroot"])
def test_a_root_inside_or_at_an_input_given_by_flag_is_refused(tmp_path, caplog, monkeypatch, root):
    """Only --inputs-from was looked at: `--root <the --train-embeddings-uri folder>` was taken, the run's files
    written among the train embeddings it reads."""
    from kfp import local

    from pipeline.__main__ import main

    w = _run_folder(tmp_path / "w")
    before = sorted(p.relative_to(w) for p in w.rglob("*"))
    monkeypatch.setattr(local, "init", lambda **_: pytest.fail("a task ran"))
    inputs = {"--dataset-uri": w / "data/dataset.parquet", "--query-model-uri": w / "models/query.pt",
              "--gallery-uri": w / "gallery.parquet", "--train-embeddings-uri": w / "embeddings/train"}
    caplog.clear()
    assert main(["run", "--local", "--no-mlflow", "--pipeline", "upgrade-query-model", "--root", root.format(w=w),
                 *(str(x) for kv in inputs.items() for x in kv)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    flag = "--train-embeddings-uri"
    assert errors == [f"python -m pipeline run: --root {root.format(w=w)} is inside {flag} {inputs[flag]}: the run "
                      "would write into an input it reads; give a root elsewhere"]
    assert sorted(p.relative_to(w) for p in w.rglob("*")) == before


@pytest.mark.parametrize("dataset, said", [("params.yaml", "params.yaml: not a readable Parquet file"),
                                           ("{w}/gallery.parquet", "it holds a cmce gallery file, not a dataset")])
def test_a_dataset_uri_that_is_no_dataset_is_refused_by_name_before_any_task(tmp_path, caplog, monkeypatch,
                                                                              dataset, said):
    """`--dataset-uri params.yaml` passed every check, for the run's tasks to fail on it."""
    from kfp import local

    from pipeline.__main__ import ROOT, main

    w = _run_folder(tmp_path / "w")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(local, "init", lambda **_: pytest.fail("a task ran"))
    caplog.clear()
    assert main(["run", "--local", "--no-mlflow", "--pipeline", "add-gallery-model", "--root", str(tmp_path / "r"),
                 "--inputs-from", str(w), "--dataset-uri", dataset.format(w=w)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("python -m pipeline run: --dataset-uri: ") and said in errors[0]
    assert not (tmp_path / "r").exists()


def test_submit_refuses_lifecycle_inputs_on_this_machine_naming_the_flag(tmp_path):
    """A `cmce run` folder, or `--dataset-uri d.parquet` beside s3:// files, was submitted: the cluster's importer
    tasks cannot read this machine's files."""
    w = _run_folder(tmp_path / "w")
    submit = ["submit", "--host", "h", "--pipeline", "add-gallery-model"]
    s3 = ["--query-model-uri", "s3://b/query.pt", "--gallery-uri", "s3://b/gallery.parquet"]
    with pytest.raises(ValueError, match=rf"^--inputs-from {w}: {w / 'data/dataset.parquet'} is a path on this "
                                         r"machine, which a cluster's tasks cannot read; give its s3:// URI with "
                                         r"--dataset-uri$"):
        _arguments(build_parser().parse_args([*submit, "--inputs-from", str(w)]))
    with pytest.raises(ValueError, match=rf"^--dataset-uri: {w / 'data/dataset.parquet'} is a path on this machine"):
        _arguments(build_parser().parse_args([*submit, *s3, "--dataset-uri", str(w / "data/dataset.parquet")]))
    with pytest.raises(ValueError, match=r"^--dataset-uri: file:///d/dataset.parquet is a path on this machine"):
        _arguments(build_parser().parse_args([*submit, *s3, "--dataset-uri", "file:///d/dataset.parquet"]))
    given = _arguments(build_parser().parse_args([*submit, *s3, "--dataset-uri", "s3://b/dataset.parquet"]))
    assert given["dataset_uri"] == "s3://b/dataset.parquet"  # a cluster's files: taken


def test_submit_to_a_host_that_is_no_url_names_host(monkeypatch, caplog):
    """`--host http://a..b`: urllib3's parse error was said without the flag."""
    from pipeline.__main__ import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.clear()
    assert main(["submit", "--host", "http://a..b"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("python -m pipeline submit: --host http://a..b: not a usable URL")


@pytest.mark.parametrize("argv", [
    ["run", "--local", "--pipeline", "add-gallery-model", "--inputs-from", "{w}", "--gallery-uri", ""],
    ["run", "--local", "--pipeline", "add-gallery-model", "--inputs-from", " "],
    ["run", "--local", "--root", ""], ["run", "--local", "--params", ""],
    ["submit", "--host", ""], ["submit", "--host", "x", "--package", ""], ["compile", "--out-dir", ""],
])
def test_a_blank_path_or_uri_is_refused_at_parse_time_by_name(tmp_path, capsys, argv):
    """`--gallery-uri ''` (an unset variable) ran for a minute on --inputs-from's gallery and exited 0."""
    w = _run_folder(tmp_path / "w")
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([a.format(w=w) for a in argv])
    flag = next(a for a in reversed(argv) if a.startswith("--"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument {flag}: blank" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGALRM])
def test_a_stopped_local_run_leaves_no_task_and_nothing_in_the_temp_folder(tmp_path, signum):
    """SIGTERM during a local run left kfp.local's workspace (and each task's `mktemp -d` folder) in the temp
    folder, and no line saying why it ended."""
    import psutil

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--local", "--no-mlflow", "--root",
                             str(tmp_path / "r")], cwd=root, env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": path},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, tasks = time.monotonic() + 120, []
        while not tasks and proc.poll() is None and time.monotonic() < deadline:  # a task under way
            tasks = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.1)
        assert tasks and any(tmp.iterdir()), "no task started"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum
    errors = [line for line in err.splitlines() if " ERROR " in line or "Traceback" in line]
    assert len(errors) == 1 and f"interrupted ({signal.Signals(signum).name})" in errors[0], err[-2000:]
    assert list(tmp.iterdir()) == []
    assert not any(task.is_running() and task.status() != psutil.STATUS_ZOMBIE for task in tasks)


@pytest.mark.parametrize("flag", ["1", ""])
def test_a_task_of_the_local_runner_leaves_ctrl_c_to_it(flag):
    """Importing cmce in a task of `python -m pipeline run --local` (the runner sets the flag only where it stops
    its tasks itself) ignores SIGINT; elsewhere Ctrl-C keeps its meaning."""
    from cmce import TASK_IGNORES_CTRL_C

    probe = "import signal, cmce; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    env = {**os.environ, TASK_IGNORES_CTRL_C: flag, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(flag == "1")


def test_the_runner_tells_its_tasks_to_leave_ctrl_c_only_where_it_takes_ctrl_c(monkeypatch, tmp_path):
    from cmce import TASK_IGNORES_CTRL_C
    from pipeline.__main__ import stopping, tasks_environment

    monkeypatch.delenv(TASK_IGNORES_CTRL_C, raising=False)
    for signals, expected in (((signal.SIGINT, signal.SIGTERM), "1"), ((signal.SIGTERM,), None)):
        monkeypatch.setattr(stopping, "signals", signals)
        with tasks_environment(str(tmp_path)):
            assert os.environ.get(TASK_IGNORES_CTRL_C) == expected
            assert os.environ["TMPDIR"] == str(tmp_path / "tmp")
        assert TASK_IGNORES_CTRL_C not in os.environ


STOPPED_STAGE = """
import sys, time
from pathlib import Path
from cmce.runner import run_stage
from cmce.storage import atomic_path

def slow_write():
    with atomic_path(Path(sys.argv[1]) / "out" / "model.pt") as scratch:
        scratch.write_text("half")
        print("writing", flush=True)
        time.sleep(60)

run_stage(slow_write)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stage_stopped_in_its_task_cleans_up_and_says_one_line(tmp_path, signum):
    """The local runner stops its tasks with SIGTERM, as Kubernetes ends a pod: a task died at once, its temporary
    file left beside its output. A Ctrl-C printed a traceback. The stage's cleanups run; one line, 128 + signal."""
    path = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_STAGE, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path})
    try:
        assert proc.stdout.readline() == "writing\n"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    assert err.count("\n") == 1 and f"slow_write: interrupted ({signal.Signals(signum).name})" in err, err
    assert not (tmp_path / "out").exists()  # neither the temporary file nor the folder made for the output


def _tasks_ignore_ctrl_c(runner: int) -> bool:
    """Every Python task process of the runner `runner` (kfp.local starts each under a shell) ignores SIGINT."""
    import psutil

    ignored = []
    for task in psutil.Process(runner).children(recursive=True):
        with contextlib.suppress(OSError, psutil.Error):  # a task that ended meanwhile
            if "kfp.dsl.executor_main" not in task.cmdline():  # the Python task, not the shell holding its script
                continue
            mask = next(line for line in Path(f"/proc/{task.pid}/status").read_text().splitlines()
                        if line.startswith("SigIgn:"))
            ignored.append(bool(int(mask.split()[1], 16) & (1 << (signal.SIGINT - 1))))
    return bool(ignored) and all(ignored)


def test_ctrl_c_twice_to_the_whole_process_group_is_one_line(tmp_path):
    """Ctrl-C reaches every process of the terminal's group: the tasks stopped on their own, and kfp.local's worker
    threads printed their failure (`Task … finished with status FAILURE`, `Retrying in 30.0s`) above the runner's
    line; later, a task's traceback whenever it came before the runner's handler ran (one CI run in ~20). The tasks
    leave Ctrl-C to the runner, which stops them once it has silenced them: only the runner's line is said."""
    import psutil

    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])
    out = tmp_path / "stdout"
    with open(out, "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--local", "--no-mlflow", "--params",
                                 str(SMOKE), "--root", str(tmp_path / "r")], cwd=root,
                                env={**os.environ, "PYTHONPATH": path}, stdout=stdout, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        deadline, branch = time.monotonic() + 180, None
        while branch is None and proc.poll() is None and time.monotonic() < deadline:
            branch = next((tmp_path / "r").glob("*/for-loop-*/*"), None)  # a task of a branch's worker thread
            time.sleep(0.1)
        assert branch is not None and psutil.Process(proc.pid).children(), "no branch task started"
        while not _tasks_ignore_ctrl_c(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # the task has imported cmce: Ctrl-C comes in its step, not while Python starts
        assert _tasks_ignore_ctrl_c(proc.pid), "the run's tasks take Ctrl-C themselves"
        said = out.stat().st_size
        for _ in range(2):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.5)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT
    after = out.read_text()[said:]
    assert not [noise for noise in ("Retrying", "FAILURE", "Traceback") if noise in err or noise in after], (
        err[-3000:], after[-3000:])
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "interrupted (SIGINT)" in errors[0], err[-3000:]


def test_output_relayed_after_a_stop_signal_is_taken_but_before_its_handler_runs_is_dropped(capsys):
    """The flaky Ctrl-C above: a task's traceback, relayed by a kfp.local thread, came out above the runner's line
    whenever it arrived before the main thread ran the stop handler. Here the main thread blocks the signal while it
    waits for a relaying thread, which takes the signal itself (its C-level handler) and then writes: the handler has
    not run, the write is dropped all the same; what came before it is kept."""
    import threading

    from pipeline.relay import silenced_on_stop

    handled, seen_by_relay, go = [], [], threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: handled.append(signum))

    def relay() -> None:
        go.wait()
        print("a task's line")
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # its C-level handler runs in this thread
        seen_by_relay.append(list(handled))
        print("Traceback (most recent call last):")
        sys.stdout.writelines(["Retrying in 30.0s\n"])

    try:
        with silenced_on_stop((signal.SIGUSR1,)):
            thread = threading.Thread(target=relay)
            thread.start()  # with this thread's signal mask: it takes the signal
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # this thread does not
            try:
                go.set()
                thread.join()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen_by_relay == [[]] and handled == [signal.SIGUSR1]  # it wrote before the handler ran
    assert capsys.readouterr().out == "a task's line\n"


def test_the_workspace_of_a_killed_run_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """SIGKILL to `python -m pipeline run --local`: its workspace (with the tasks' temporary folders) stayed in the
    temp folder for good. The next run removes it, and leaves a live run's workspace and other KFP users' alone."""
    import tempfile

    from pipeline.cleanup import remove_orphaned_workspaces

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])
    hold = ("import sys, tempfile, time; from pipeline.cleanup import WORKSPACE_PREFIX, hold; "
            "w = tempfile.mkdtemp(prefix=WORKSPACE_PREFIX); hold(w); open(w + '/task.tmp', 'w').close(); "
            "print(w, flush=True); time.sleep(600)")
    runs = [subprocess.Popen([sys.executable, "-c", hold], cwd=root, env={**os.environ, "TMPDIR": str(tmp),
                                                                         "PYTHONPATH": path},
                             stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        killed, live = (Path(run.stdout.readline().strip()) for run in runs)
        runs[0].kill()
        runs[0].wait(30)
        foreign = tmp / "kfp-workspace-other"  # made by kfp.local itself: no lock file
        foreign.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        remove_orphaned_workspaces()
        assert sorted(tmp.iterdir()) == sorted([live, foreign]) and (live / "task.tmp").exists()
    finally:
        for run in runs:
            run.kill()
            run.wait(30)


def test_a_stopped_local_run_marks_its_parent_mlflow_run_killed(tmp_path):
    """A local run stopped once its parent MLflow run was open: the run stayed RUNNING for good."""
    from mlflow import MlflowClient

    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    env = {**os.environ, "PYTHONPATH": path, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_REGISTRY_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--local", "--root", str(tmp_path / "r")],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, track = time.monotonic() + 120, None
        while track is None and proc.poll() is None and time.monotonic() < deadline:  # the parent run is open
            track = next((tmp_path / "r").glob("*/start-tracking/tracking"), None)
            time.sleep(0.1)
        assert track is not None, "start-tracking did not finish"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_id = json.loads(track.read_text())["run_id"]
    assert proc.returncode == 128 + signal.SIGTERM
    assert f"; MLflow run {run_id} marked KILLED" in err, err[-2000:]
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "KILLED"


def test_flags_a_pipeline_does_not_take_are_refused_not_dropped(tmp_path, capsys):
    """`--pipeline add-gallery-model --embed-shards 3` ran 102 s, the flag dropped unsaid; `compile --out-dir
    s3://b/p` said `s3:/b/p: no such folder`."""
    w = _run_folder(tmp_path / "w")
    args = build_parser().parse_args(["run", "--local", "--pipeline", "add-gallery-model", "--inputs-from", str(w),
                                      "--embed-shards", "3"])
    with pytest.raises(ValueError, match=r"^--embed-shards applies to the cmce pipeline only, not add-gallery-model$"):
        _arguments(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compile", "--out-dir", "s3://b/p"])
    assert "argument --out-dir: s3://b/p: compile writes to a local folder" in capsys.readouterr().err


def test_a_tracking_uri_mlflow_has_no_store_for_is_refused_before_any_task(tmp_path, monkeypatch, caplog):
    """MLFLOW_TRACKING_URI=ftp://…: the start-tracking task failed with MLflow's `KeyError: 'ftp'` three times,
    30 s and 60 s apart, and the run was still going at 120 s."""
    from kfp import local

    from pipeline.__main__ import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://127.0.0.1/x")
    monkeypatch.setattr(local, "init", lambda **_: pytest.fail("a task ran"))
    assert main(["run", "--local", "--root", str(tmp_path / "r")]) == 2
    error = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(error) == 1 and "MLFLOW_TRACKING_URI ftp://127.0.0.1/x: MLflow keeps no runs at a ftp: URI" in error[0]
    assert not (tmp_path / "r").exists()


def test_an_http_tracking_server_is_checked_and_its_password_kept_out_of_the_task_inputs(tmp_path, monkeypatch,
                                                                                        caplog):
    """MLFLOW_TRACKING_URI=http://bob:pw@host: a dead server was found only by the first task, retried for minutes,
    and the pipeline runner printed the password among each task's inputs and tracebacks. The server is asked once
    before any task; the tasks get the URI without its user-info, the credentials in MLflow's own variables."""
    import base64

    from kfp import local

    from pipeline.__main__ import main
    from tests.fake_servers import fake_mlflow

    heard, seen = [], {}
    for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = free_ports(1)[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:pw123x@127.0.0.1:{dead}")
    monkeypatch.setattr(local, "init", lambda **_: pytest.fail("a task ran"))
    assert main(["run", "--local", "--root", str(tmp_path / "r1")]) == 2
    error = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert f"MLFLOW_TRACKING_URI=http://***@127.0.0.1:{dead}: the tracking server cannot be used" in error, error
    assert "pw123x" not in caplog.text and not (tmp_path / "r1").exists()

    def started(**_):
        seen.update({k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                                    "MLFLOW_TRACKING_PASSWORD")})
        raise OSError("stopped before any task")

    with fake_mlflow({"/api/2.0/mlflow/experiments/search": {"experiments": []}}, heard) as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:pw123x@127.0.0.1:{port}")
        monkeypatch.setattr(local, "init", started)
        assert main(["run", "--local", "--root", str(tmp_path / "r2")]) == 2
    assert seen == {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_TRACKING_USERNAME": "bob",
                    "MLFLOW_TRACKING_PASSWORD": "pw123x"}
    assert heard and heard[0] == "Basic " + base64.b64encode(b"bob:pw123x").decode()


def test_a_failed_local_run_closes_its_parent_mlflow_run_and_says_so_in_one_line(tmp_path, monkeypatch, caplog):
    """A task failing after start-tracking: kfp.local's RuntimeError came as a traceback (with colour codes), and
    the parent MLflow run stayed RUNNING for good, as after a stop. It is marked FAILED (KILLED on a stop), once,
    only the run this command made (an older run folder's parent is left alone), and the line says so."""
    from mlflow import MlflowClient

    import pipeline.__main__ as runner
    from cmce.tracking import start_parent_run
    from pipeline.cleanup import close_parent_run

    root = tmp_path / "root"
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    older = start_parent_run(uri, "older", {})  # an earlier run's, in a folder made before this command
    (root / "cmce-old" / "start-tracking").mkdir(parents=True)
    (root / "cmce-old" / "start-tracking" / "tracking").write_text(json.dumps({"uri": uri, "run_id": older}))
    made = []

    def failing(**kwargs):
        run_id = start_parent_run(kwargs["mlflow_uri"], "cmce", {})
        made.append(run_id)
        folder = root / "cmce-new" / "start-tracking"
        folder.mkdir(parents=True)
        (folder / "tracking").write_text(json.dumps({"uri": kwargs["mlflow_uri"], "run_id": run_id}))
        raise RuntimeError("Pipeline \x1b[95m'cmce'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m. "
                           "Inner task failed: \x1b[96m'train-model'\x1b[0m.")

    monkeypatch.setattr(runner, "pipeline_function", lambda *_: failing)
    caplog.clear()
    assert runner.main(["run", "--local", "--root", str(root)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["python -m pipeline run: Pipeline 'cmce' finished with status FAILURE. Inner task failed: "
                      f"'train-model'. (its output is above); MLflow run {made[0]} marked FAILED"], errors
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(made[0]).info.status == "FAILED"
    assert client.get_run(older).info.status == "RUNNING"
    # given every folder: the one ended already is not marked twice
    assert close_parent_run(root, set(), "KILLED") == f"; MLflow run {older} marked KILLED"
    assert client.get_run(made[0]).info.status == "FAILED"


def test_a_submission_without_params_checks_the_params_compiled_into_the_package_it_submits(tmp_path):
    """`submit` without --params checked params.yaml, while the run gets its package's compiled-in params: a
    package compiled from other params, lacking the model an add-gallery-model run trains, was submitted and failed
    on the cluster. Its compiled-in params are checked; a package of another pipeline, or no package, is refused."""
    spec, *platform = yaml.safe_load_all(PACKAGES["add-gallery-model"].read_text())  # and its Secret's placement
    default = spec["root"]["inputDefinitions"]["parameters"]["params_yaml"]
    params = json.loads(default["defaultValue"])
    del params["lifecycle"]["add_gallery_model"]
    default["defaultValue"] = json.dumps(params)
    package = tmp_path / "add.yaml"
    package.write_text(yaml.safe_dump_all([spec, *platform]))
    submit = ["submit", "--host", "h", "--pipeline", "add-gallery-model", "--query-model-uri", "s3://b/query.pt",
              "--gallery-uri", "s3://b/gallery.parquet", "--dataset-uri", "s3://b/dataset.parquet"]
    assert _arguments(build_parser().parse_args(submit))["gallery_uri"] == "s3://b/gallery.parquet"
    with pytest.raises(ValueError, match=r"^lifecycle.add_gallery_model: not set in the params; "):
        _arguments(build_parser().parse_args([*submit, "--package", str(package)]))
    params["bogus"] = 1
    default["defaultValue"] = json.dumps(params)
    (tmp_path / "bogus.yaml").write_text(yaml.safe_dump_all([spec, *platform]))
    with pytest.raises(ValueError, match=rf"^--package {tmp_path / 'bogus.yaml'} \(its compiled-in params\): unknown "):
        _arguments(build_parser().parse_args([*submit, "--package", str(tmp_path / "bogus.yaml")]))
    given = _arguments(build_parser().parse_args([*submit, "--package", str(package), "--params", str(SMOKE)]))
    assert json.loads(given["params_yaml"])["lifecycle"]["add_gallery_model"]  # --params given: those are sent
    with pytest.raises(ValueError, match=rf"^--package {COMPILED}: compiled pipeline 'cmce', not --pipeline "
                                         r"add-gallery-model's 'cmce-add-gallery-model'$"):
        _arguments(build_parser().parse_args([*submit, "--package", str(COMPILED)]))
    (tmp_path / "notes.yaml").write_text("a: 1\n")
    with pytest.raises(ValueError, match=r"notes.yaml: not a compiled cmce pipeline \(`python -m pipeline compile`"):
        _arguments(build_parser().parse_args([*submit, "--package", str(tmp_path / "notes.yaml")]))
    (tmp_path / "bytes.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"bytes.yaml: not text, not a compiled pipeline$"):
        _arguments(build_parser().parse_args([*submit, "--package", str(tmp_path / "bytes.yaml")]))
