"""The natural-feature check: whether an all-to-one target's trigger makes the model see more
of the target's own features (a natural hub: dropped) or features the target's images do not
have (a backdoor: kept), after EX-RAY (Liu et al. 2021: a trigger is injected when its features
differ from those that tell the source and target classes apart).

A clean model can have a *hub*, a class that every other class reaches a little more cheaply
than usual; its trigger sizes, effects and votes can look like a weak all-to-one backdoor's
(README, Detection). What differs is what the trigger does inside the model. At every BN layer
but the first, an image's feature vector is its channels' spatial means; for each source image
x of class s and a trigger T, the shift φ(T(x)) − φ(x) is compared (cosine) with the natural
direction μ_t − μ_s between the class means of the defender's clean images. A hub's trigger
moves the features toward t's (0.38–0.58 on the digits ResNets' hubs). The panel's backdoors,
all to class 7, stayed at 0.24 or less, but backdoors to class 0 reach 0.30–0.65: how far a
trigger aligns depends more on the class than on the trigger, so the check is off by default
(``detect.natural_alignment``; README, Detection). The first BN layer is left out: its channel
means are an affine map of the input's few channel means, so they say only whether the trigger
adds ink.

A target's alignment is the smallest, over its trigger estimates that succeed, of the mean
over layers of the mean over images of that cosine: one estimate that looks like a backdoor
keeps the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .norm import BnaModel
from .reverse import Problem, TriggerEstimate, succeeds

CHUNK = 256
"""Images per forward pass."""


def layer_features(
    model: BnaModel, x: Tensor, embed: Callable[[Tensor], Tensor] | None = None
) -> list[Tensor]:
    """Every BN layer's output but the first, as per-image channel means: [N, C_l] each, of
    the images x (``embed``: with it applied to each chunk of them on the model's device)."""
    parts: list[list[Tensor]] = [[] for _ in model.layers[1:]]
    with torch.no_grad():
        for xb in torch.split(x, CHUNK):
            xb = xb.to(model.device)
            with model.capturing() as cap:
                model(xb if embed is None else embed(xb))
            for out, got in zip(parts, cap[1:], strict=True):
                z = got[0].float()
                out.append(z.mean(dim=tuple(range(2, z.dim()))) if z.dim() > 2 else z)
    return [torch.cat(p) for p in parts]


def class_means(features: Sequence[Tensor], y: Tensor, n_classes: int) -> list[Tensor]:
    """Per layer, the [K, C] mean feature of each class (0 for a class with no image)."""
    counts = torch.bincount(y, minlength=n_classes).clamp(min=1).to(features[0].dtype)
    return [
        torch.zeros(n_classes, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, y, f)
        / counts[:, None]
        for f in features
    ]


def alignment(
    model: BnaModel,
    data: Dataset,
    estimate: TriggerEstimate,
    means: Sequence[Tensor],
    input_range: tuple[float, float],
    features: Sequence[Tensor] | None = None,
) -> float:
    """Mean over layers of the mean over the estimate's source images of cos(φ(T(x)) − φ(x),
    μ_t − μ_y) (module docstring); NaN for a model with fewer than two BN layers.
    ``features``: :func:`layer_features` of every image of ``data``, when already computed."""
    if len(means) == 0:
        return float("nan")
    t = estimate.problem.target
    keep = np.isin(data.y, estimate.problem.sources)
    x = torch.from_numpy(data.x[keep])
    y = torch.from_numpy(data.y[keep]).to(means[0].device)
    if features is None:
        clean = layer_features(model, x)
    else:
        rows = torch.from_numpy(np.flatnonzero(keep)).to(means[0].device)
        clean = [f[rows] for f in features]
    moved = layer_features(model, x, lambda xb: estimate.apply(xb, *input_range))
    per_layer = [
        torch.nn.functional.cosine_similarity(m - c, mu[t][None] - mu[y], dim=1).mean()
        for c, m, mu in zip(clean, moved, means, strict=True)
    ]
    return float(torch.stack(per_layer).mean())


def own_look(data: Dataset, target: int, sources: Sequence[int]) -> TriggerEstimate:
    """The target's own look as a trigger: a blend of α = 1 toward the mean clean image of t,
    which replaces every source image by it (a reference: how far t's look itself aligns)."""
    pattern = data.x[data.y == target].mean(0).astype(np.float32)
    return TriggerEstimate(
        Problem("blend", target, tuple(sources)),
        1.0,
        1.0,
        0,
        {"alpha": np.ones(1, np.float32), "pattern": pattern},
        tuple(data.x.shape[1:]),
    )


def target_alignments(
    model: BnaModel,
    data: Dataset,
    estimates: Sequence[TriggerEstimate],
    input_range: tuple[float, float],
    success: float,
) -> dict[int, dict[str, float]]:
    """Per target, the smallest alignment of each family's estimates that succeed (a family
    with none is left out, a target with none maps to {})."""
    n_classes = int(data.y.max()) + 1
    y = torch.from_numpy(data.y).to(model.device)
    features = layer_features(model, torch.from_numpy(data.x))
    means = class_means(features, y, n_classes)
    out: dict[int, dict[str, float]] = {}
    for e in estimates:
        mine = out.setdefault(e.problem.target, {})
        if not succeeds(e, success):
            continue
        a = alignment(model, data, e, means, input_range, features)
        if np.isfinite(a):
            mine[e.family] = min(a, mine.get(e.family, np.inf))
    return out


def natural_targets(alignments: dict[int, dict[str, float]], bar: float) -> list[int]:
    """The targets whose every family's alignment reaches ``bar``: natural hubs."""
    return sorted(t for t, a in alignments.items() if a and min(a.values()) >= bar)
