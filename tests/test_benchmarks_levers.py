import shutil

import pytest

from benchmarks.levers import parse_try, try_levers
from cmce.config import ConfigError, load_config
from tests.conftest import SMOKE


@pytest.fixture()
def run_copy(smoke_run, tmp_path):
    """A copy of the smoke run's folder (refits write into the run)."""
    lay, metrics = smoke_run
    root = tmp_path / "run"
    shutil.copytree(lay.root, root)
    return root, metrics


def test_refitting_with_the_runs_own_settings_reproduces_its_metrics(run_copy):
    root, metrics = run_copy
    lam = load_config(SMOKE).transform.lam
    rows = try_levers(SMOKE, {}, 0, root, [f"lam={lam}", "lam=0"])
    assert list(rows) == ["(the run)", f"lam={lam}", "lam=0"]
    again, other = rows[f"lam={lam}"], rows["lam=0"]
    for config in ("sym_query", "asym/resnet_a", "asym/vgg_b", "asym_ensemble/2"):
        for metric in ("R@1", "MAP@R", "TAR@FAR=0.001"):
            assert again[config][metric] == pytest.approx(metrics[config][metric], abs=1e-9), (config, metric)
    # the change reached the transformations: without the CE term the ensemble retrieves differently
    assert other["asym_ensemble/2"] != metrics["asym_ensemble/2"]
    assert other["sym_query"] == metrics["sym_query"]


def test_an_unknown_transform_key_fails_naming_the_valid_ones_before_any_refit(run_copy):
    root, _ = run_copy
    with pytest.raises(ConfigError, match=r"transform: unknown key\(s\) \['dropout'\].*weight_decay"):
        try_levers(SMOKE, {}, 0, root, ["lam=0.5", "dropout=0.1"])
    assert not (root / "levers_tried").exists()


def test_a_config_that_did_not_make_the_run_is_refused(run_copy):
    root, _ = run_copy
    one = load_config(SMOKE).gallery_models[:1]
    only_first = [{"name": m.name, "arch": m.arch, "embedding_dim": m.embedding_dim, "width": m.width,
                   "seed": m.seed} for m in one]
    with pytest.raises(ValueError, match=r"versions\.json: the run's gallery members .* are not the config's"):
        # (no rejection: the smoke config's would need the second member)
        try_levers(SMOKE, {"gallery_models": only_first, "index.reject_fraction": 0.0}, 0, root, ["lam=0.5"])
    hidden = load_config(SMOKE).transform.hidden_dim
    with pytest.raises(ValueError, match=rf"transforms/resnet_a\.pt: fitted with \(hidden_dim, depth, epochs\) = "
                                         rf"\({hidden}, .*the config says \({2 * hidden}, "):
        try_levers(SMOKE, {"transform.hidden_dim": 2 * hidden}, 0, root, ["lam=0.5"])
    with pytest.raises(ValueError, match=r"is not a finished run: missing .*metrics\.json"):
        (root / "eval" / "metrics.json").unlink()
        try_levers(SMOKE, {}, 0, root, ["lam=0.5"])
    assert not (root / "levers_tried").exists()


@pytest.mark.parametrize("text", ["lam", "=0.1", "lam=0.1,epochs"])
def test_a_malformed_try_is_refused_with_an_example(text):
    with pytest.raises(ValueError, match="expected KEY=VALUE.*e.g. weight_decay=0.1"):
        parse_try(text)


def test_a_try_reads_its_values_as_yaml_scalars():
    assert parse_try("lam=0.1, epochs=60") == {"lam": 0.1, "epochs": 60}


def test_the_cli_records_the_command_it_ran_and_refuses_bad_input_by_name(run_copy, monkeypatch, capsys):
    from benchmarks.levers import main

    root, _ = run_copy
    monkeypatch.setattr("sys.argv", ["levers", "--run", str(root), "--config", str(SMOKE), "--try", "lam=0",
                                     "--no-write"])
    main()
    out = capsys.readouterr().out
    assert f"Command: `python -m benchmarks.levers --run {root} --config configs/smoke.yaml --try lam=0`" in out
    rows = [line for line in out.splitlines() if line.startswith("| (the run) |") or line.startswith("| lam=0 |")]
    assert len(rows) == 2
    monkeypatch.setattr("sys.argv", ["levers", "--run", str(root), "--config", str(SMOKE), "--try", "dropout=0.1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "unknown key(s) ['dropout']" in capsys.readouterr().err
