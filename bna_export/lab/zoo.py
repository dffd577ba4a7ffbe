"""Small reference classifiers with BatchNorm, a trainer, and seeded synthetic image classes:
what the tests, the demo and the benchmarks poison and defend."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-BN-ReLU-pool ×2, then a BN'd hidden layer: BN in conv and fully connected layers."""

    def __init__(
        self, in_channels: int = 1, n_classes: int = 10, image_size: int = 28, width: int = 16
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * width * (image_size // 4) ** 2
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Linear(64, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Plain Adam training with cross-entropy; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * (-(-len(xt) // batch_size))
    )
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for idx in torch.split(perm, batch_size):
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if progress is not None:
            progress(epoch + 1, epochs)
    return model.eval()


def synthetic_classes(
    n_classes: int = 5,
    per_class: int = 200,
    size: int = 16,
    channels: int = 1,
    noise: float = 0.15,
    seed: int = 0,
    equidistant: bool = False,
    binary_grid: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded image classes: each class a smooth prototype in [0, 1] (a 4×4 grid of values
    upsampled bilinearly), samples are the prototype shifted by up to one pixel plus Gaussian
    noise, clipped to [0, 1]. The grid holds uniform random values, or with ``equidistant``
    the 0/1 rows of a 16×16 Hadamard matrix (up to 15 classes, channels alike, a random row
    order): every two classes differ in exactly 8 of the 16 cells, so no pair of classes is
    naturally closer than another (a backdoor is then the only easy pair). For many classes,
    ``binary_grid`` = n draws each class as random 0/1 cells of an n×n grid (channels alike):
    with n = 8 two classes differ in 32 ± 4 of 64 cells, and at least about 16 among 100
    classes, so no pair is naturally much closer than another at any class count (uniform
    values on 4×4 cells leave some of 20 classes a few pixels apart)."""
    rng = np.random.default_rng(seed)
    if binary_grid:
        cells = rng.integers(0, 2, size=(n_classes, 1, binary_grid, binary_grid))
        coarse = np.repeat(cells.astype(np.float32), channels, axis=1)
    else:
        coarse = rng.random((n_classes, channels, 4, 4)).astype(np.float32)
    if equidistant and not binary_grid:
        if n_classes > 15:
            raise ValueError("equidistant synthetic classes: at most 15")
        hadamard = np.ones((1, 1))
        for _ in range(4):
            hadamard = np.kron(hadamard, np.array([[1, 1], [1, -1]]))
        rows = 1 + rng.permutation(15)[:n_classes]  # row 0 is all ones
        cells = (hadamard[rows] > 0).astype(np.float32).reshape(n_classes, 1, 4, 4)
        coarse = np.repeat(cells, channels, axis=1)
    protos = torch.nn.functional.interpolate(
        torch.from_numpy(coarse), size=(size, size), mode="bilinear", align_corners=False
    ).numpy()
    y = np.repeat(np.arange(n_classes), per_class)
    x = protos[y]
    shifts = rng.integers(-1, 2, size=(len(y), 2))
    x = np.stack([np.roll(img, tuple(s), axis=(1, 2)) for img, s in zip(x, shifts, strict=True)])
    x = x + noise * rng.standard_normal(x.shape).astype(np.float32)
    order = rng.permutation(len(y))
    return np.clip(x, 0, 1).astype(np.float32)[order], y.astype(np.int64)[order]
