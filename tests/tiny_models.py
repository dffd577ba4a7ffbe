"""Factories importable as ``tiny_models:make_cnn`` (the CLI's package.module:callable form)."""

from torch import nn

from bna_export.zoo import SmallCNN


def make_cnn() -> nn.Module:
    return SmallCNN(1, 5, 16, 8)


def make_no_bn() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 5))


def make_not_a_module() -> int:
    return 3
