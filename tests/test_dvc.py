"""`dvc repro` of dvc.yaml on the smoke params in a temporary copy: clean status after, same metrics as
`cmce run` (and so as the KFP run), metrics/plots readable by DVC for any commit or experiment, stages
named by model, outputs pushed to the local remote."""

import csv
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, modules_seen
from tests.conftest import dvc as _dvc


def _stages(dvc_yaml: Path):
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        body = stage.get("do", stage)
        yield name, body, " ".join(body["cmd"]) if isinstance(body["cmd"], list) else body["cmd"]


def _params(body: dict) -> list[str]:
    """The params keys a stage lists, of its own params file or another's (`- ../params.yaml: [keys]`)."""
    return [key for entry in body.get("params", []) for key in (
        [k for keys in entry.values() for k in keys] if isinstance(entry, dict) else [entry])]


def _command(cmd: str) -> str | None:
    """The cmce subcommand a stage's cmd runs (through cmce.dvc_stage or not); None for `--source-digest`."""
    words = cmd.split()
    after = words[words.index("cmce.dvc_stage") + 1:] if "cmce.dvc_stage" in words else words[1:]
    return next((w for w in after if not w.startswith("-") and "/" not in w), None)


@pytest.mark.parametrize("dvc_yaml", ["dvc.yaml", "lifecycle/dvc.yaml"])
def test_every_input_and_setting_a_stage_command_reads_is_among_its_deps_and_params(dvc_yaml):
    """embed_member read {batch_size} without listing it (a changed batch size, other float kernels: the member was
    kept); gate_added read the query model without it among its deps (retrained, the gate was not run again)."""
    from cmce.argument_paths import INPUT_ARGS

    inputs = {f"--{name.replace('_', '-')}" for name in INPUT_ARGS} - {"--config"}  # params: checked key by key
    missing = []
    for name, body, cmd in _stages(ROOT / dvc_yaml):
        text = yaml.safe_dump(body)
        listed = _params(body)
        for key in re.findall(r"(?<![{$])\{([A-Za-z_][A-Za-z0-9_.]*)\}", cmd):  # dvc_stage's placeholders
            if key != "key" and f"${{{key}}}" not in text and not any(key == p or key.startswith(f"{p}.")
                                                                        for p in listed):
                missing.append(f"{name}: {{{key}}} not among its params")
        words = cmd.split()
        deps = [str(d) for d in body.get("deps", [])]
        for flag, value in zip(words, words[1:], strict=False):  # each word and the next
            path = re.sub(r"\{(?!key\})", "${", value).replace("{key}", "${key}")
            if flag in inputs and path not in deps:
                missing.append(f"{name}: {flag} {value} not among its deps")
    assert sorted(set(missing)) == []


@pytest.mark.parametrize("dvc_yaml", ["dvc.yaml", "lifecycle/dvc.yaml"])
def test_a_stage_that_fits_a_transformation_lists_the_data_section(dvc_yaml):
    """fit-transform reads data.hflip for transform.augment_views: add_gallery_model (which fits one) did not list
    `data`, so a changed data.hflip kept its transformation."""
    fitting = {"fit-transform", "add-gallery-model"}
    found = []
    for name, body, cmd in _stages(ROOT / dvc_yaml):
        if _command(cmd) in fitting:
            found.append((name, "data" in _params(body)))
    assert found and all(has for _, has in found), found


def test_every_library_module_a_stage_ran_is_among_its_deps(dvc_repo):
    """The stages listed a file or two of the library each (train.py, models.py): an edit to any other module their
    commands ran (feed.py, data/augment.py, embed.py in fit-transform) kept outputs made by the old code."""
    bodies = {name: body for name, body, _ in _stages(dvc_repo / "dvc.yaml")}
    seen = sorted(modules_seen(dvc_repo).iterdir())
    assert {p.name.partition("@")[0] for p in seen} == set(bodies)
    missing = []
    for record in seen:
        deps = [str(d).rstrip("/") for d in bodies[record.name.partition("@")[0]].get("deps", [])]
        for module in set(record.read_text().split()):
            path = Path("src", *module.split("."))
            file = str(path / "__init__.py" if (ROOT / path).is_dir() else path.with_suffix(".py"))
            if not any(file == d or file.startswith(f"{d}/") for d in deps):
                missing.append(f"{record.name}: {file}")
    assert sorted(missing) == []


def test_a_reordered_ensemble_reruns_combine_and_what_reads_the_gallery(dvc_repo, tmp_path):
    """The ensemble's order is gallery_models' order, and DVC compares that mapping as a dict, order aside: swapping
    two models left `dvc status` clean, and asym_ensemble/1 named the old first model's numbers."""
    from cmce.tables import read_metadata

    repo = tmp_path / "repo"
    shutil.copytree(dvc_repo, repo, symlinks=True)
    params = repo / "params.yaml"
    lines = params.read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.startswith("gallery_models:")) + 1
    lines[first], lines[first + 1] = lines[first + 1], lines[first]
    params.write_text("".join(lines))
    res = _dvc(repo, "repro")
    assert res.returncode == 0, res.stderr
    ran = re.findall(r"Running stage '([^']+)'", res.stdout)
    assert ran == ["combine", "build_index", "evaluate"], res.stdout
    gallery = read_metadata(repo / "artifacts" / "gallery.parquet")
    assert [m["name"] for m in gallery["members"]] == ["vgg_b", "resnet_a"]


@pytest.mark.parametrize("dvc_yaml", ["dvc.yaml", "lifecycle/dvc.yaml"])
def test_every_stage_that_computes_with_torch_reads_and_tracks_the_device_and_thread_count(dvc_yaml):
    """embed_member ran without the config: on a GPU host it embedded on CUDA in bf16 although params.yaml said
    `device: cpu`; and no stage tracked device or num_threads, so changing either kept outputs made otherwise
    (deterministic too: it changes a CUDA run's bytes)."""
    computing = {"train", "fit-transform", "embed-member", "evaluate", "gate", "add-gallery-model",
                 "upgrade-query-model"}
    wrong = []
    for name, body, cmd in _stages(ROOT / dvc_yaml):
        if _command(cmd) in computing and not ("--config" in cmd.split()
                                               and {"device", "num_threads", "deterministic"} <= set(_params(body))):
            wrong.append(name)
    assert wrong == []


def test_the_lifecycle_stages_follow_the_library_by_its_digest_which_ignores_byte_code(tmp_path, caplog):
    """lifecycle/ is a DVC project of its own, and DVC applies a .dvcignore only inside one: its stages' dep on
    ../src/cmce changed with every .pyc Python wrote, and each ran again (a model retrained) after any import."""
    from cmce.dvc_stage import main as stage

    stages = list(_stages(ROOT / "lifecycle" / "dvc.yaml"))
    assert stages and all("../artifacts/library.sha256" in body["deps"] and not any(
        "src/cmce" in str(d) for d in body["deps"]) for _, body, _ in stages)
    library = shutil.copytree(ROOT / "src" / "cmce", tmp_path / "cmce", ignore=shutil.ignore_patterns("__pycache__"))
    digest = tmp_path / "library.sha256"
    assert stage(["--source-digest", str(library), str(digest)]) == 0
    before = digest.read_text()
    assert "  dvc_stage.py\n" in before and "  data/codec.py\n" in before
    (library / "__pycache__").mkdir(exist_ok=True)
    (library / "__pycache__" / "config.cpython-311.pyc").write_bytes(b"byte code")
    (library / "stray.pyc").write_bytes(b"byte code")
    assert stage(["--source-digest", str(library), str(digest)]) == 0 and digest.read_text() == before
    (library / "method.py").write_text((library / "method.py").read_text() + "\n# an edit\n")
    assert stage(["--source-digest", str(library), str(digest)]) == 0 and digest.read_text() != before
    caplog.clear()
    assert stage(["--source-digest", str(tmp_path / "none"), str(digest)]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"python -m cmce.dvc_stage: --source-digest {tmp_path / 'none'}: not a folder"]


def test_repro_then_status_is_clean(dvc_repo):
    """The lifecycle stages (a DVC project of their own, not yet run) leave the main project's status alone."""
    assert (dvc_repo / "lifecycle" / "dvc.yaml").exists()
    res = _dvc(dvc_repo, "status")
    assert res.returncode == 0 and "up to date" in res.stdout, res.stdout
    res = _dvc(dvc_repo, "stage", "list", "--name-only")
    assert {"train_gallery@resnet_a", "fit_transform@vgg_b", "train_kd@vgg_b"} <= set(res.stdout.split()), res.stdout


def test_metrics_show_is_the_flat_summary_equal_to_the_in_process_run(dvc_repo, smoke_run):
    from cmce.report import summary

    _, expected = smoke_run
    res = _dvc(dvc_repo, "metrics", "show", "--json")
    assert res.returncode == 0 and "failed" not in res.stderr.lower(), res.stderr
    shown = json.loads(res.stdout)
    (files,) = [v["data"] for v in shown.values()]
    assert list(files) == ["artifacts/eval/summary.json"]
    metrics = files["artifacts/eval/summary.json"]["data"]
    assert metrics == pytest.approx(summary(expected))
    assert len(metrics) <= 20 and all(isinstance(v, float) for v in metrics.values())
    # the index's setting reaches a metric: the smoke config rejects 10 % of the gallery
    assert metrics["index/indexed"] == pytest.approx(0.9, abs=0.01)
    full = json.loads((dvc_repo / "artifacts" / "eval" / "metrics.json").read_text())
    assert full.keys() == expected.keys()
    for key in expected:
        assert full[key] == pytest.approx(expected[key], nan_ok=True), key


def _git(repo, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    import subprocess

    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def _find(tree, key):
    """Every value under `key` anywhere in a nested JSON tree."""
    if isinstance(tree, dict):
        return ([tree[key]] if key in tree else []) + [v for x in tree.values() for v in _find(x, key)]
    return [v for x in tree for v in _find(x, key)] if isinstance(tree, list) else []


def test_an_experiment_on_an_index_setting_shows_in_exp_show_metrics_and_plots_diff(dvc_repo, tmp_path):
    """The problem as reported: `dvc exp run -S index.reject_fraction=0.3` ran, but `exp show` had `!` for every
    metric and `metrics diff` had no numbers for HEAD (metrics were neither in git nor in the cache)."""
    repo = tmp_path / "repo"
    shutil.copytree(dvc_repo, repo, symlinks=True)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "baseline")
    gallery = (repo / "artifacts" / "gallery.parquet").read_bytes()
    res = _dvc(repo, "exp", "run", "-S", "index.reject_fraction=0.3", "--name", "reject30")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ran = [line for line in res.stdout.splitlines() if line.startswith("Running stage")]
    # combine reads the params file for the ensemble's order: it runs on any edit, and writes the same bytes
    assert [line.split("'")[1] for line in ran] == ["combine", "build_index", "evaluate"], ran
    assert (repo / "artifacts" / "gallery.parquet").read_bytes() == gallery
    res = _dvc(repo, "exp", "show", "--json")
    assert res.returncode == 0, res.stderr
    indexed = sorted(_find(json.loads(res.stdout), "index/indexed"))
    assert indexed[0] == pytest.approx(0.7, abs=0.01) and indexed[-1] == pytest.approx(0.9, abs=0.01), indexed
    res = _dvc(repo, "exp", "apply", "reject30")
    assert res.returncode == 0, res.stderr
    res = _dvc(repo, "metrics", "diff", "HEAD", "--json")
    assert res.returncode == 0 and "artifacts/eval/summary.json" in res.stdout, (res.stdout, res.stderr)
    diff = json.loads(res.stdout)["artifacts/eval/summary.json"]
    assert diff["index/indexed"]["old"] == pytest.approx(0.9, abs=0.01)
    assert diff["index/indexed"]["new"] == pytest.approx(0.7, abs=0.01)
    res = _dvc(repo, "plots", "diff", "HEAD", "--json")
    assert res.returncode == 0, res.stderr
    plots = json.loads(res.stdout)["data"]
    (recall,) = [v for k, v in plots.items() if k.startswith("recall@K")]
    drawn = {(d["rev"], d["field"]) for p in recall for d in p["content"]["data"]["values"]}
    assert drawn == {(rev, f) for rev in ("HEAD", "workspace") for f in ("served", "sym_query")}, drawn


def test_a_refused_setting_leaves_the_stages_previous_outputs_in_place(dvc_repo, tmp_path):
    """`dvc repro` after `index.reject_fraction: 1.5`: cmce refused it naming the key, but DVC had deleted the
    previous artifacts/index (and evaluate's files) before the command ran; only `dvc checkout` brought them back."""
    from cmce.storage import file_sha256

    repo = tmp_path / "repo"
    shutil.copytree(dvc_repo, repo, symlinks=True)
    outputs = sorted(p for folder in ("index", "eval") for p in (repo / "artifacts" / folder).iterdir())
    before = {p: file_sha256(p) for p in outputs}
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("reject_fraction: 0.1", "reject_fraction: 1.5"))
    res = _dvc(repo, "repro")
    assert res.returncode != 0 and "index.reject_fraction must be in [0, 1), got 1.5" in res.stderr, res.stderr
    assert {p: file_sha256(p) for p in outputs} == before
    # every output a step replaces whole: DVC leaves it alone. Not the folders steps add files to: a persistent one
    # would keep (and cache) the files of a model since renamed
    added_to = {"artifacts/raw", "artifacts/added/work"}
    for name in ("dvc.yaml", "lifecycle/dvc.yaml"):
        stages = yaml.safe_load((ROOT / name).read_text())["stages"]
        for stage, spec in stages.items():
            for out in (o for kind in ("outs", "metrics") for o in (spec.get("do", spec).get(kind) or [])):
                persistent = isinstance(out, dict) and next(iter(out.values())) == {"persist": True}
                path = next(iter(out)) if isinstance(out, dict) else out
                assert persistent == (path not in added_to), (name, stage, out)


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
    assert "recall.png" in html and "rejection.png" in html and "recall@K of the served ensemble" in html
    rows = list(csv.DictReader((dvc_repo / "artifacts" / "eval" / "recall.csv").open()))
    assert [r["served"] for r in rows] == [r["asym_ensemble/2"] for r in rows]
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
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = _dvc(repo, "repro")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Running stage 'train_kd@" in res.stdout and "Running stage 'train_query'" not in res.stdout, res.stdout
    names = list(params["gallery_models"])
    assert [sorted((repo / "artifacts" / "kd" / n).iterdir()) for n in names] == [[] for _ in names]
    _, expected = smoke_run
    got = json.loads((repo / "artifacts" / "eval" / "metrics.json").read_text())
    assert got.keys() == {k for k in expected if not k.startswith("kd/")}
    for key in got:
        assert got[key] == pytest.approx(expected[key], nan_ok=True), key


def _commands(dvc_file):
    """Every stage's `cmd` in a dvc.yaml, foreach stages' included, as written (before DVC fills it in)."""
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    return {name: (s["do"] if "foreach" in s else s)["cmd"] for name, s in stages.items()}


def test_no_stage_command_holds_text_from_the_config():
    """DVC puts `${...}` values into a command line its shell reads: no quoting makes any value safe there."""
    from tests.conftest import ROOT

    for dvc_file in (ROOT / "dvc.yaml", ROOT / "lifecycle" / "dvc.yaml"):
        commands = _commands(dvc_file)
        assert len(commands) >= 6 and all("${" not in cmd for cmd in commands.values()), (dvc_file, commands)


def _project_with(tmp_path, edit):
    """The DVC projects (main and lifecycle) over params.yaml changed by `edit`."""
    import subprocess

    from tests.conftest import ROOT

    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    for name in (".dvc", ".dvcignore", "dvc.yaml", "src", "lifecycle"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("tmp", "cache", "artifacts", "dvc.lock",
                                                                            "__pycache__"))
        else:
            shutil.copy(src, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def _stand_ins(repo):
    """Empty files for the stages' inputs (DVC removes a stage's outputs, another's inputs, before its command)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    names = [params["query_model"]["name"], *params["gallery_models"]]
    deps = ["artifacts/data/dataset.parquet", "artifacts/library.sha256",
            *(f"artifacts/{kind}/{n}.pt" for kind in ("models", "transforms") for n in names)]
    for dep in deps:
        (repo / dep).parent.mkdir(parents=True, exist_ok=True)
        (repo / dep).touch()


def _refused(repo, stage, key, where="."):
    """`dvc repro` of the one stage fails on one line from cmce naming `key`; no value ran as a command."""
    _stand_ins(repo)
    res = _dvc(repo / where, "repro", "--single-item", stage)
    errors = [line for line in res.stderr.splitlines() if " ERROR cmce: " in line]
    assert res.returncode != 0 and len(errors) == 1 and f": {key}: " in errors[0], (stage, res.stdout, res.stderr)
    assert "unrecognized arguments" not in res.stderr
    assert not list(repo.rglob("PWNED*")), "a config value ran as a shell command"
    return errors[0]


def _set(*keys_values):
    def edit(params):
        for dotted, value in keys_values:
            *path, last = dotted.split(".")
            for part in path:
                params = params[part]
            params[last] = value
    return edit


def _gallery_key(name):
    def edit(params):
        params["gallery_models"] = {name: params["gallery_models"].pop("vgg"), **params["gallery_models"]}
    return edit


@pytest.mark.parametrize("value", ["q1;touch PWNED_1;#", "q'\"$(touch PWNED_2)`touch PWNED_3`\\"])
def test_a_config_value_that_is_shell_text_is_refused_never_run(tmp_path, value):
    """params.yaml's query model named `q1;touch PWNED_DVC;#`: `dvc repro` ran the `touch`. Any value, quotes and
    all, of any key a stage's command uses: the query model's name, a gallery model's key, a lifecycle model's
    name, batch_size."""
    _refused(_project_with(tmp_path / "q", _set(("query_model.name", value))), "train_query", "query_model.name")
    repo = _project_with(tmp_path / "g", _gallery_key(value))
    for stage in ("train_gallery", "fit_transform", "embed_member", "train_kd"):
        _refused(repo, f"{stage}@{value}", f"gallery_models.{value}")
    repo = _project_with(tmp_path / "l", _set(("lifecycle.new_query_model.name", value)))
    _refused(repo, "train_new_query_model", "lifecycle.new_query_model.name", where="lifecycle")
    _refused(_project_with(tmp_path / "b", _set(("batch_size", value))), "embed_member@resnet", "batch_size")


def test_a_name_that_climbs_out_of_artifacts_deletes_nothing(tmp_path):
    """A gallery key `../../victim` made the output `artifacts/models/../../victim.pt`: DVC deleted the stage's
    outputs before its command ran, so `victim.pt` at the project's root was gone before cmce refused the name."""
    repo = _project_with(tmp_path / "g", _gallery_key("../../victim"))
    _stand_ins(repo)
    for name in ("victim.pt", "victim.parquet"):
        (repo / name).write_bytes(b"the user's file")
    for stage in ("train_gallery", "fit_transform", "embed_member"):  # refused by DVC's params check or by cmce
        assert _dvc(repo, "repro", "--single-item", f"{stage}@../../victim").returncode != 0
        assert all((repo / name).read_bytes() == b"the user's file" for name in ("victim.pt", "victim.parquet")), stage
    repo = _project_with(tmp_path / "q", _set(("query_model.name", "../../victim")))
    (repo / "victim.pt").write_bytes(b"the user's file")
    _refused(repo, "train_query", "query_model.name")
    assert (repo / "victim.pt").read_bytes() == b"the user's file"


def test_a_model_name_with_a_space_is_named_by_its_key(tmp_path):
    """`query v2` split into two arguments: `cmce: unrecognized arguments: v2 v2.pt`, no key named."""
    error = _refused(_project_with(tmp_path / "q", _set(("query_model.name", "query v2"))), "train_query",
                     "query_model.name")
    assert "'query v2' is not a model name" in error
    _refused(_project_with(tmp_path / "g", _gallery_key("vgg v2")), "train_gallery@vgg v2", "gallery_models.vgg v2")
    repo = _project_with(tmp_path / "l", _set(("lifecycle.add_gallery_model.name", "added v2")))
    _refused(repo, "train_added_model", "lifecycle.add_gallery_model.name", where="lifecycle")


def test_a_stage_command_names_config_values_by_key_and_its_gallery_model_by_dvc_stage(tmp_path, monkeypatch, caplog):
    from cmce.config import load_config
    from cmce.dvc_stage import main, resolve
    from tests.conftest import SMOKE

    cfg = load_config(SMOKE)
    gallery = cfg.gallery_models[-1].name
    args = ["--model", "{key}", "--out", "m/{query_model.name}-{key}.pt", "--batch-size", "{batch_size}"]
    assert resolve(args, cfg, f"train_gallery@{gallery}") == [
        "--model", gallery, "--out", f"m/{cfg.query_model.name}-{gallery}.pt", "--batch-size", str(cfg.batch_size)]
    monkeypatch.delenv("DVC_STAGE", raising=False)
    for stage, command, message in (
            (None, ["--model", "{key}"], "{key}: DVC_STAGE is not set"),
            ("train_query", ["--model", "{key}"], "DVC_STAGE='train_query' is not a foreach stage"),
            (f"train_gallery@{gallery}x", ["--model", "{key}"], "is not a foreach stage of a gallery model"),
            ("train_query", ["--model", "{train}"], "{train}: not a config value")):
        if stage:
            monkeypatch.setenv("DVC_STAGE", stage)
        caplog.clear()
        assert main(["train", "--config", str(SMOKE), *command, "--out", str(tmp_path / "m.pt")]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and message in errors[0], errors
    assert list(tmp_path.iterdir()) == []


def _stage_error(caplog, argv):
    """The exit status and the one error line of `python -m cmce.dvc_stage argv`, run in a thread (a hang fails)."""
    import threading

    from cmce.dvc_stage import main

    caplog.clear()
    status = []
    run = threading.Thread(target=lambda: status.append(main(argv)), daemon=True)
    run.start()
    run.join(timeout=30)
    assert not run.is_alive(), f"{argv} hangs"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert status == [2] and len(errors) == 1, (status, errors)
    return errors[0]


def test_a_config_that_is_not_a_regular_file_is_refused_by_the_stage_as_by_cmce(tmp_path, caplog, monkeypatch):
    """The stage read its config (Path.read_text) before any check: a FIFO hung it, /dev/zero was a MemoryError
    traceback, `--config=` an IsADirectoryError traceback. Each is one line, as `cmce train` says it."""
    monkeypatch.delenv("DVC_STAGE", raising=False)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    tail = ["--model", "{query_model.name}", "--out", str(tmp_path / "o" / "m.pt")]
    for config in (str(fifo), *[p for p in ("/dev/zero",) if os.path.exists(p)]):
        for argv in (["train", "--config", config, *tail], ["train", f"--config={config}", *tail]):
            error = _stage_error(caplog, argv)
            assert error.endswith(f"{config}: is not a regular file or folder (a device, pipe or socket); give a file")
    assert _stage_error(caplog, ["train", "--config=", *tail]).endswith(": --config: empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.yaml"]


def test_a_make_dir_that_is_a_file_is_named_and_left_as_it_is(tmp_path, caplog, monkeypatch):
    """`--make-dir o/afile` (a file) was a FileExistsError traceback."""
    from tests.conftest import SMOKE

    monkeypatch.delenv("DVC_STAGE", raising=False)
    afile = tmp_path / "afile"
    afile.write_text("the user's file")
    tail = ["train", "--config", str(SMOKE), "--model", "{query_model.name}", "--out", str(tmp_path / "m.pt")]
    error = _stage_error(caplog, ["--make-dir", str(afile), *tail])
    assert error.endswith(f"--make-dir {afile}: is a file, not a folder")
    assert afile.read_text() == "the user's file"
    assert _stage_error(caplog, ["--make-dir=", *tail]).endswith(": --make-dir: empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_doubled_braces_are_literal_braces_in_a_stage_command(tmp_path, caplog, monkeypatch):
    """`--out 'o/{run}.pt'` was refused as a placeholder, and a path holding braces could not be given at all."""
    from cmce.config import load_config
    from cmce.dvc_stage import resolve
    from tests.conftest import SMOKE

    cfg = load_config(SMOKE)
    name = cfg.query_model.name
    assert resolve(["o/{{run}}.pt", "{{{query_model.name}}}", "a}}{{b", "{{}}"], cfg, None) == [
        "o/{run}.pt", f"{{{name}}}", "a}{b", "{}"]
    # a single brace is refused, as str.format refuses it: `o/x_{query_model.name}}.pt` wrote `o/x_query}.pt`
    for dotted in ("query_model.__module__", "query_model.name.__class__.__name__", "gallery_models"):
        with pytest.raises(ValueError, match=rf"^\{{{re.escape(dotted)}\}}: not a config value"):  # Python's own
            resolve([f"o/{{{dotted}}}"], cfg, None)
    for arg, at in (("o/x_{query_model.name}}.pt", 23), ("x{y", 2), ("{a-b}", 1)):
        with pytest.raises(ValueError, match=rf"^'{re.escape(arg)}': a single '[{{}}]' at character {at}; "):
            resolve([arg], cfg, None)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    error = _stage_error(caplog, ["train", "--config", str(SMOKE), "--out", str(tmp_path / "{run}.pt")])
    assert "{run}: not a config value" in error
    assert list(tmp_path.iterdir()) == []


def test_make_dir_touches_no_file_before_cmce_has_checked_the_command(smoke_run, tmp_path, monkeypatch):
    """`--make-dir` removed the command's previous `--out` before cmce parsed it: an input given as
    `--kd-teacher=o/s.pt` with `--out o/s.pt`, a member in `--members-dir`, a dataset at `--out` of a training
    (then written over, exit 0), `--out` given twice: each was deleted, then the command refused. Folders it
    made for a command that failed stayed behind."""
    from cmce.dvc_stage import main as stage
    from tests.conftest import SMOKE

    monkeypatch.delenv("DVC_STAGE", raising=False)
    lay, _ = smoke_run
    folder = tmp_path / "o"
    folder.mkdir()
    teacher = folder / "s.pt"
    shutil.copy(lay.model("resnet_a"), teacher)
    dataset = folder / "keep.parquet"
    shutil.copy(lay.dataset, dataset)
    train = ["train", "--config", str(SMOKE), "--set", "train.epochs=1", "--dataset", str(lay.dataset)]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for command in ([*train, f"--kd-teacher={teacher}", "--out", str(teacher)],
                    [*train, "--model", "query", "--out", str(dataset)],
                    [*train, "--model", "query", "--out", str(teacher), "--out", str(folder / "b.pt")],
                    ["combine", "--config", str(SMOKE), "--members-dir", str(folder), "--out", str(dataset)]):
        assert stage(["--make-dir", str(folder), *command]) == 2, command
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, command
    deep = tmp_path / "new" / "deep"
    assert stage(["--make-dir", str(deep), *train, "--model", "nope", "--out", str(deep / "m.pt")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_an_earlier_student_is_removed_only_once_a_kd_disabled_command_has_run(smoke_run, tmp_path, monkeypatch):
    """kd.enabled false trains no student: the stage's earlier one must not stay as this run's output. Only a model
    checkpoint at `--out` goes, after cmce ran; any other file there is left."""
    from cmce.dvc_stage import main as stage
    from tests.conftest import SMOKE

    monkeypatch.delenv("DVC_STAGE", raising=False)
    lay, _ = smoke_run
    folder = tmp_path / "kd"
    folder.mkdir()
    student = folder / "student.pt"
    shutil.copy(lay.kd_student("resnet_a"), student)
    (folder / "notes.txt").write_text("the user's")
    command = ["train", "--config", str(SMOKE), "--set", "kd.enabled=false", "--dataset", str(lay.dataset),
               "--kd-teacher", str(lay.model("resnet_a")), "--out", str(student)]
    assert stage(["--make-dir", str(folder), *command]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    shutil.copy(lay.dataset, student)  # not a model: left as it is
    assert stage(["--make-dir", str(folder), *command]) == 0
    assert student.read_bytes() == lay.dataset.read_bytes()
    for model in (lay.model("query"), lay.model("resnet_a")):  # a model, but no student: left (it was removed)
        shutil.copy(model, student)
        assert stage(["--make-dir", str(folder), *command]) == 0
        assert student.read_bytes() == model.read_bytes()


def test_a_placeholder_takes_the_value_the_commands_own_set_gives(tmp_path, monkeypatch):
    """`--set query_model.width=4 --out 'q_w{query_model.width}.pt'` wrote a width-4 model named q_w8.pt: the
    placeholders were filled from the config file alone."""
    from cmce.config import load_config
    from cmce.dvc_stage import overrides_of, resolve
    from cmce.overrides import parse_overrides
    from tests.conftest import SMOKE

    command = ["train", "--config", str(SMOKE), "--set", "query_model.width=4", "--set=query_model.name=q2",
               "--out", "q_w{query_model.width}_{query_model.name}.pt"]
    assert overrides_of(command) == ["query_model.width=4", "query_model.name=q2"]
    cfg = load_config(SMOKE, parse_overrides(overrides_of(command)))
    assert resolve(command, cfg, None)[-1] == "q_w4_q2.pt"


def test_the_stage_entry_point_runs_without_docstrings():
    """PYTHONOPTIMIZE=2 strips docstrings: `python -m cmce.dvc_stage --help` was an AttributeError traceback."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONOPTIMIZE": "2", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "cmce.dvc_stage", "--help"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "usage: python -m cmce.dvc_stage" in res.stdout, res.stderr


def test_a_stage_command_without_config_reads_its_placeholders_from_params(tmp_path, caplog, monkeypatch):
    """The lifecycle project's export of the new query model (export-query takes no --config) resolved
    `{lifecycle.new_query_model.name}` from params.yaml in its own folder, which has none: the stage failed."""
    from cmce.config import load_config
    from cmce.dvc_stage import main
    from tests.conftest import SMOKE

    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    name = load_config(SMOKE).query_model.name
    export = ["export-query", "--query-model", "{query_model.name}.pt", "--out", "edge/{query_model.name}.onnx"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["--params", str(SMOKE), *export]) == 2  # resolved, then refused by cmce: no such model
    said = [r.getMessage() for r in caplog.records]
    assert f"python -m cmce.dvc_stage: cmce export-query --query-model {name}.pt --out edge/{name}.onnx" in said
    assert _stage_error(caplog, export).endswith("params.yaml: config file not found")  # no --params: here's
    assert _stage_error(caplog, ["--params", str(SMOKE), "train", "--config", str(SMOKE), "--model", "x", "--out",
                                 "m.pt"]).endswith("--params is for a cmce command that takes no --config; this "
                                                   "one's --config is its params")
    assert _stage_error(caplog, ["--params=", *export]).endswith(": --params: empty")
    assert list(tmp_path.iterdir()) == []
