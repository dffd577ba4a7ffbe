"""The classifier architectures users deploy, at any width: VGG-BN, ResNet-18, PreAct-ResNet-18,
MobileNetV2, a squeeze-excitation net with SiLU, a DenseNet-style net, a small ResNet for
digits, input normalisation inside the model, and GroupNorm/LayerNorm nets (which BNA refuses).

They follow the CIFAR-sized reference designs (3×3 stems, no stem max-pool) that backdoor
benchmarks train; ``width`` scales every channel count so that tests can run them tiny.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .zoo import SmallCNN


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    """ResNet's two 3×3 conv-BN layers with an identity or 1×1 conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *_conv_bn(cout, cout)
        )
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style digits classifier: a conv-BN stem and three basic blocks (width, 2·width,
    4·width; the last two strided with projection shortcuts): 9 BN layers."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_conv_bn(in_channels, w), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(
            BasicBlock(w, w), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2)
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class ResNet18(nn.Module):
    """ResNet-18 for small images (3×3 stem, four stages of two basic blocks): 20 BN layers."""

    def __init__(self, in_channels: int = 3, n_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_conv_bn(in_channels, w), nn.ReLU(inplace=True))
        layers, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout)]
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class PreActBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv twice; the first BN reads the previous block's sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        short = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        return self.conv2(torch.relu(self.bn2(out))) + short


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 (the default model of BackdoorBench): every BN but the first block's
    reads an Add, which no exporter can fold into a convolution."""

    def __init__(self, in_channels: int = 3, n_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.stem = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        layers, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            layers += [PreActBlock(cin, cout, 1 if i == 0 else 2), PreActBlock(cout, cout)]
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.blocks(self.stem(x)))))


def _vgg_cfg(width: int, image_size: int) -> list[int | str]:
    """VGG-11's layout with channels scaled to ``width`` and only as many pools as fit."""
    cfg: list[int | str] = []
    pools, size = 0, image_size
    for item in (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"):
        if item == "M":
            if size >= 2:
                cfg.append("M")
                size //= 2
                pools += 1
        else:
            cfg.append(int(item) * width)
    return cfg


class VGG11BN(nn.Module):
    """VGG-11 with BN after every conv; a linear classifier on the pooled last feature map."""

    def __init__(
        self, in_channels: int = 3, n_classes: int = 10, width: int = 64, image_size: int = 32
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in _vgg_cfg(width, image_size):
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*_conv_bn(cin, int(item)), nn.ReLU(inplace=True)]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (BN, ReLU6), 3×3 depthwise (BN, ReLU6), 1×1 linear
    bottleneck (BN, no activation); a residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, cout, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images (stride-1 stem and first stages, as CIFAR versions do).

    ``width`` is the stem's channel count (32 in the original; the stages scale with it) and
    ``depth`` divides each stage's repeat count (1: the original 17 blocks)."""

    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    STAGES += ((6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(
        self, in_channels: int = 3, n_classes: int = 10, width: int = 32, depth: int = 1
    ) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(4, round(c * width / 32))

        layers: list[nn.Module] = [*_conv_bn(in_channels, ch(32)), nn.ReLU6(inplace=True)]
        cin = ch(32)
        for t, c, n, s in self.STAGES:
            for i in range(max(1, n // depth)):
                layers.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t))
                cin = ch(c)
        last = ch(1280)
        layers += [*_conv_bn(cin, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SEBlock(nn.Module):
    """Conv-BN-SiLU, conv-BN, scaled per channel by a squeeze-excitation gate (global pool,
    two 1×1 layers with SiLU and a sigmoid), plus the shortcut, SiLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, reduction: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.SiLU(), *_conv_bn(cout, cout))
        squeeze = max(2, cout // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cout, squeeze, 1),
            nn.SiLU(),
            nn.Conv2d(squeeze, cout, 1),
            nn.Sigmoid(),
        )
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return nn.functional.silu(out * self.gate(out) + self.shortcut(x))


class SENet(nn.Module):
    """A small squeeze-excitation net with SiLU activations: stem and three SE blocks."""

    def __init__(self, in_channels: int = 3, n_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_conv_bn(in_channels, w), nn.SiLU())
        self.blocks = nn.Sequential(SEBlock(w, w), SEBlock(w, 2 * w, 2), SEBlock(2 * w, 4 * w, 2))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class DenseLayer(nn.Module):
    """BN-ReLU-conv producing ``growth`` channels, concatenated to its input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], 1)


class DenseNet(nn.Module):
    """DenseNet-style: two dense blocks of ``layers`` BN-ReLU-conv layers each (every BN reads
    a concatenation), a BN-ReLU-1×1-conv-pool transition, and a final BN-ReLU."""

    def __init__(
        self, in_channels: int = 3, n_classes: int = 10, width: int = 12, layers: int = 3
    ) -> None:
        super().__init__()
        growth, c = width, 2 * width
        mods: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)]
        for block in range(2):
            for _ in range(layers):
                mods.append(DenseLayer(c, growth))
                c += growth
            if block == 0:
                half = c // 2
                mods += [
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(c, half, 1, bias=False),
                    nn.AvgPool2d(2),
                ]
                c = half
        mods += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*mods)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class NormalizedInput(nn.Module):
    """``net`` behind an input normalisation (x − mean) / std per channel, the way many
    deployed models take [0, 1] images; ``inplace`` normalises the caller's tensor in place, as
    torchvision's ``Normalize(inplace=True)`` does."""

    def __init__(
        self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], inplace: bool = False
    ) -> None:
        super().__init__()
        self.net = net
        self.in_place = inplace  # not named `inplace`: adapt_module switches those off
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_place:
            return self.net(x.sub_(self.mean).div_(self.std))
        return self.net((x - self.mean) / self.std)


class NormNet(nn.Module):
    """A conv net normalised with GroupNorm or LayerNorm instead of BatchNorm (BNA refuses it:
    there is no BatchNorm statistic to correct)."""

    def __init__(
        self, in_channels: int = 3, n_classes: int = 10, width: int = 16, norm: str = "group"
    ) -> None:
        super().__init__()

        def norm_layer(c: int) -> nn.Module:
            return nn.GroupNorm(min(4, c), c) if norm == "group" else nn.GroupNorm(1, c)

        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1),
            norm_layer(w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, 1, 1),
            norm_layer(2 * w),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.norm = nn.LayerNorm(2 * w) if norm == "layer" else nn.Identity()
        self.fc = nn.Linear(2 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.head(self.features(x))))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "small-resnet": SmallResNet,
    "resnet18": ResNet18,
    "preact-resnet18": PreActResNet18,
    "vgg11-bn": VGG11BN,
    "mobilenetv2": MobileNetV2,
    "mobilenetv2-short": functools.partial(MobileNetV2, depth=3),  # one block per stage
    "se-silu": SENet,
    "densenet": DenseNet,
}
"""Factories ``(in_channels, n_classes, width, ...)`` of the BN architectures above."""


def make_classifier(
    arch: str, in_channels: int, n_classes: int, image_size: int, width: int | None = None
) -> nn.Module:
    """A classifier of ``arch`` ('cnn': :class:`~bna_export.lab.zoo.SmallCNN`, or a key of
    :data:`ARCHITECTURES`; 'normalized-cnn': the CNN behind an input normalisation,
    'normalized-cnn-inplace' one that normalises the caller's tensor in place) at
    ``width`` (the architecture's own default when None)."""
    kw = {} if width is None else {"width": width}
    if arch == "cnn":
        return SmallCNN(in_channels, n_classes, image_size, **kw)
    if arch in ("normalized-cnn", "normalized-cnn-inplace"):
        net = SmallCNN(in_channels, n_classes, image_size, **kw)
        mean, std = (0.5,) * in_channels, (0.25,) * in_channels
        return NormalizedInput(net, mean, std, inplace=arch.endswith("inplace"))
    if arch in ("groupnorm", "layernorm"):
        return NormNet(in_channels, n_classes, norm=arch[:-4], **kw)
    if arch not in ARCHITECTURES:
        names = ["cnn", "normalized-cnn", "normalized-cnn-inplace", *ARCHITECTURES]
        known = ", ".join([*names, "groupnorm", "layernorm"])
        raise ValueError(f"unknown architecture {arch!r}; expected one of {known}")
    if arch == "vgg11-bn":
        return VGG11BN(in_channels, n_classes, image_size=image_size, **kw)
    return ARCHITECTURES[arch](in_channels, n_classes, **kw)
