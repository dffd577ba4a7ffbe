"""Factories importable as ``tiny_models:make_cnn`` (the CLI's package.module:callable form),
and the ONNX export forms users deploy (``export_onnx``)."""

from __future__ import annotations

import torch
from torch import nn

from bna_export.lab.scenario import EXPORT_FORMS
from bna_export.lab.scenario import export_onnx_as as export_onnx
from bna_export.lab.zoo import SmallCNN

__all__ = ["EXPORT_FORMS", "ResidualNet", "export_onnx", "make_cnn"]


class ResidualNet(nn.Module):
    """A tiny residual CNN whose BN layers cannot all be folded: one after an Add, one after a
    ReLU (besides a foldable conv-BN); running statistics are seeded, not the identity."""

    def __init__(self, n_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn_add = nn.BatchNorm2d(width)
        self.bn_relu = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, n_classes)
        g = torch.Generator().manual_seed(0)
        for bn in (self.bn1, self.bn_add, self.bn_relu):
            bn.running_mean.copy_(torch.randn(width, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(width, generator=g) + 0.5)
            bn.weight.data.copy_(torch.randn(width, generator=g) * 0.5 + 1)
            bn.bias.data.copy_(torch.randn(width, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        b = self.bn_add(self.conv2(a) + a)
        c = self.bn_relu(torch.relu(b))
        return self.head(c.mean((2, 3)))


def make_cnn() -> nn.Module:
    return SmallCNN(1, 5, 16, 8)


def make_no_bn() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 5))


def make_not_a_module() -> int:
    return 3
