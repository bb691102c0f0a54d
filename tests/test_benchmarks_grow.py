import shutil
from dataclasses import replace

import pytest

from benchmarks.grow import grow_run
from cmce.config import load_config
from cmce.layout import RunLayout
from cmce.stages import run_all
from cmce.storage import file_sha256
from tests.conftest import SMOKE


def grown_config(out):
    """The smoke config with one more gallery member after its two."""
    cfg = load_config(SMOKE, {"output_dir": str(out)})
    return replace(cfg, gallery_models=[*cfg.gallery_models, cfg.lifecycle.add_gallery_model])


@pytest.fixture()
def finished(smoke_run, tmp_path):
    """The smoke run as seed 0 of a finished benchmark run (seed 0 shifts no seed)."""
    lay, metrics = smoke_run
    root = tmp_path / "finished" / "seed0"
    shutil.copytree(lay.root, root)
    return root, metrics


def test_a_grown_run_is_the_run_of_the_grown_config_made_from_scratch(finished, tmp_path):
    src, _ = finished
    cfg = grown_config(tmp_path / "grown")
    grown = grow_run(cfg, src)
    fresh = run_all(replace(cfg, output_dir=str(tmp_path / "fresh")))
    assert set(grown) == set(fresh)
    for config, values in fresh.items():
        for metric, value in values.items():
            assert grown[config][metric] == pytest.approx(value, abs=1e-9), (config, metric)
    new, old = RunLayout(tmp_path / "grown"), RunLayout(src)
    # the kept members were copied, and a run from scratch makes the very same files
    for name in ("query", "resnet_a", "vgg_b"):
        assert file_sha256(new.model(name)) == file_sha256(old.model(name)) == file_sha256(
            RunLayout(tmp_path / "fresh").model(name))
    assert file_sha256(new.transformation("vgg_b")) == file_sha256(old.transformation("vgg_b"))
    assert "asym_ensemble/3" in grown and "kd/resnet_c" in grown


def test_a_run_of_another_config_is_refused_before_anything_is_trained(finished, tmp_path):
    src, _ = finished
    cfg = grown_config(tmp_path / "grown")
    swapped = replace(cfg, gallery_models=[cfg.gallery_models[1], cfg.gallery_models[0], cfg.gallery_models[2]])
    with pytest.raises(ValueError, match=r"versions\.json: the run's gallery members .* are not the first members"):
        grow_run(swapped, src)
    reseeded = replace(cfg, query_model=replace(cfg.query_model, seed=cfg.query_model.seed + 1))
    with pytest.raises(ValueError, match=r"models/query\.pt: trained with \(seed, epochs\) = \(0, 3\), the config "
                                         r"says \(1, 3\)"):
        grow_run(reseeded, src)
    other_data = replace(cfg, data=replace(cfg.data, heldout_fraction=0.4))
    with pytest.raises(ValueError, match=r"data/dataset\.parquet: not the dataset the config prepares"):
        grow_run(other_data, src)
    assert not (tmp_path / "grown" / "models").exists()


def test_a_run_missing_a_kept_members_files_is_refused(finished, tmp_path):
    src, _ = finished
    RunLayout(src).member("vgg_b").unlink()
    with pytest.raises(ValueError, match=r"is not a finished run: missing .*embeddings/gallery/vgg_b\.parquet"):
        grow_run(grown_config(tmp_path / "grown"), src)


def test_a_run_cannot_grow_into_its_own_folder(finished):
    src, _ = finished
    with pytest.raises(ValueError, match="the run to grow from is the output folder"):
        grow_run(grown_config(src), src)


def test_the_cli_checks_every_seeds_run_before_training_any(finished, tmp_path, monkeypatch, capsys):
    from benchmarks import method

    src, _ = finished  # seed 0 only
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["method", "--config", str(SMOKE), "--seeds", "0,1", "--ablations", "",
                                     "--grow-from", str(src.parent), "--out", str(out), "--no-write"])
    with pytest.raises(SystemExit) as exit_:
        method.main()
    assert exit_.value.code == 2
    assert f"{src.parent / 'seed1'} is not a finished run: missing" in capsys.readouterr().err
    assert not out.exists()


def test_the_cli_grows_every_seed_checking_its_run_once(finished, tmp_path, monkeypatch):
    import json

    from benchmarks import grow, method

    src, metrics = finished
    checked, real = [], grow.reusable_members

    def counted(cfg, run):
        checked.append(run)
        return real(cfg, run)

    monkeypatch.setattr(method, "reusable_members", counted)
    monkeypatch.setattr(grow, "reusable_members", counted)
    members = ("[{name: resnet_a, arch: resnet, embedding_dim: 48, width: 12, seed: 1}, "
               "{name: vgg_b, arch: vgg, embedding_dim: 48, width: 12, seed: 2, data_fraction: 0.8}, "
               "{name: resnet_d, arch: resnet, embedding_dim: 48, width: 12, seed: 3}]")
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["method", "--config", str(SMOKE), "--seeds", "0", "--ablations", "",
                                     "--grow-from", str(src.parent), "--out", str(out), "--no-write",
                                     "--set", f"gallery_models={members}"])
    method.main()
    assert checked == [src]  # checked before training, and not again when grown
    grown = json.loads((RunLayout(out / "seed0").eval_dir / "metrics.json").read_text())
    assert grown["asym_ensemble/2"] == pytest.approx(metrics["asym_ensemble/2"], abs=1e-9)
    assert "asym_ensemble/3" in grown and "kd/resnet_d" in grown
