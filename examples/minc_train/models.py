"""Backbones (torchvision ResNets, a small conv net for 28-px CPU runs) and MLP heads."""
from __future__ import annotations

import torch
from torch import nn

ARCHS = ("convnet", "resnet18", "resnet50")
STEMS = ("auto", "imagenet", "s1", "s2")


def _cbr(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvNet(nn.Module):
    """A small VGG-style conv net for 28/32-px images on the CPU.

    Stages of 3×3 conv-BN-ReLU with widths ``width·(1, 2, 4, 8)``; the first runs at
    full resolution, each later one halves it (28→14→7→4).  The output is the last
    feature map average-pooled to ``pool``×``pool`` and flattened, so
    ``out_dim = 8·width·pool²`` (``pool=1``: global average pooling).
    """

    def __init__(self, in_channels: int = 1, width: int = 32, pool: int = 1):
        super().__init__()
        w = width
        self.features = nn.Sequential(*_cbr(in_channels, w, 1), *_cbr(w, 2 * w, 2),
                                      *_cbr(2 * w, 4 * w, 2), *_cbr(4 * w, 8 * w, 2))
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.out_dim = 8 * w * pool * pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return torch.flatten(self.pool(self.features(x)), 1)


def build_backbone(arch: str, in_channels: int = 3, stem: str = "auto", image_size: int = 224,
                   width: int = 32, pool: int = 1) -> tuple[nn.Module, int]:
    """(backbone, feature dim).  ResNets come from torchvision (random init, ``fc`` removed).

    ``stem``: ``imagenet`` (7×7/2 conv + max-pool), ``s1``/``s2`` (3×3 conv of stride 1/2,
    no max-pool: the CIFAR stem for 28-32 px), ``auto`` = ``s1`` below 96 px else ``imagenet``.
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if stem not in STEMS:
        raise ValueError(f"--stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if arch == "convnet":
        net = ConvNet(in_channels, width, pool)
        return net, net.out_dim
    import torchvision
    net = getattr(torchvision.models, arch)(weights=None)
    if stem == "auto":
        stem = "s1" if image_size < 96 else "imagenet"
    if stem in ("s1", "s2"):
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1 if stem == "s1" else 2, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """``layers`` linear layers with BN+ReLU between them (and BN after the last if ``last_bn``)."""
    if layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {layers}")
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


class SSLModel(nn.Module):
    """Online network: ``backbone`` → ``projector`` (→ ``predictor`` for MINC).

    ``forward(x)`` returns ``(z, p)``: the projection and the prediction (``p is z``
    without a predictor).  ``encoder`` (backbone + projector) is what the EMA target copies.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.encoder = nn.Sequential()
        self.encoder.add_module("backbone", backbone)
        self.encoder.add_module("projector", projector)
        self.predictor = predictor

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, x):
        z = self.encoder(x)
        p = self.predictor(z) if self.predictor is not None else z
        return z, p
