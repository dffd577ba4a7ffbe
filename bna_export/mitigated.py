"""The PyTorch reference of the mitigated classifier (design step 3): f first, g_t on the samples
f sends to a target t, flagged where g_t disagrees (or, for a target routed among its sources,
where g_t prefers one of them to t) and, with a flag drop, lowers t's lead far enough; and every
g_t's logits (the fit file's probes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .fitfile import Routing
from .norm import BnaModel


@dataclass
class Prediction:
    """Routed answers: ``label`` [N], ``triggered`` [N] bool, ``logits`` [N, K]."""

    label: np.ndarray
    triggered: np.ndarray
    logits: np.ndarray


def predict_mitigated(
    model: BnaModel,
    targets: Sequence[int],
    thetas: Sequence[Tensor] | None,
    x: np.ndarray,
    batch: int = 256,
    routing: Routing | None = None,
) -> Prediction:
    """The mitigated classifier (design step 3), in PyTorch: f first; samples that f sends to a
    target t run g_t; a sample whose g_t answer differs from t is flagged and answered by g_t.
    ``routing`` (:class:`~bna_export.fitfile.Routing`; None: the paper's rule): per target, the
    classes g_t may answer (its argmax over t and those; its logits are the output's where
    flagged), and how far t's lead over the best of them must fall from f to g_t for a flag."""
    labels, flags, logits = [], [], []
    dev = model.device
    lut = torch.full((max([*targets, 0]) + 1,), -1, dtype=torch.int64, device=dev)
    for ti, t in enumerate(targets):
        lut[t] = ti
    drops = torch.tensor(routing.drops if routing else [0.0] * len(targets), device=dev)
    allowed = None  # [T, K]: answer_mask, made at the first routed batch (K from its logits)
    thetas = None if thetas is None else [t.to(dev) for t in thetas]
    with torch.no_grad():
        for xb in torch.split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), batch):
            xb = xb.to(dev)
            lf = model(xb)
            y = lf.argmax(1)
            route = torch.where(y < lut.numel(), lut[y.clamp_max(lut.numel() - 1)], -1)
            routed = torch.nonzero(route >= 0).flatten()
            out, flag = lf.clone(), torch.zeros(len(y), dtype=torch.bool, device=dev)
            if targets and thetas is not None and routed.numel():
                j, t = route[routed], y[routed]
                with model.mitigated(thetas, j):
                    lg = model(xb[routed])
                if allowed is None:
                    answers = routing.answers if routing else [None] * len(targets)
                    allowed = answer_mask(targets, answers, lg.shape[1]).to(dev)
                y_g = lg.masked_fill(~allowed[j], -np.inf).argmax(1)
                changed = y_g != t
                drop = lead(lf[routed], t, allowed[j]) - lead(lg, t, allowed[j])
                changed &= (drops[j] == 0) | (drop > drops[j])
                flag[routed] = changed
                out[routed[changed]] = lg[changed]
                y = y.clone()
                y[routed] = torch.where(changed, y_g, t)
            labels.append(y.cpu())
            flags.append(flag.cpu())
            logits.append(out.cpu())
    return Prediction(
        torch.cat(labels).numpy(), torch.cat(flags).numpy(), torch.cat(logits).numpy()
    )


def lead(logits: Tensor, t: Tensor, allowed: Tensor) -> Tensor:
    """[N]: each row's logit of its class t over the highest of its other ``allowed`` ([N, K]
    bool) classes."""
    others = allowed.clone()
    others[torch.arange(len(t), device=t.device), t] = False
    best = logits.masked_fill(~others, -np.inf).amax(1)
    return logits.gather(1, t[:, None])[:, 0] - best


def flag_drops(
    model: BnaModel,
    data: Dataset,
    targets: Sequence[int],
    answers: Sequence[Sequence[int] | None],
    share: float,
) -> tuple[float, ...]:
    """Per target t, ``share`` times the median of t's lead (:func:`lead`) in f's logits on the
    clean images of t that f answers t: how far g_t must lower it to flag an image
    (:class:`~bna_export.fitfile.Routing`). 0 where ``share`` is 0, no image is, or ``answers``
    restricts g_t to t's sources: there g_t must prefer one source already, and t's lead over
    it alone is f's lead over an unrelated class, too large a drop (README, flag drop)."""
    out = []
    for t, a in zip(targets, answers, strict=True):
        x = data.x[data.y == t]
        if share <= 0 or a is not None or not len(x):
            out.append(0.0)
            continue
        with torch.no_grad():
            lf = model(torch.from_numpy(x).to(model.device))
        lf = lf[lf.argmax(1) == t]
        ts = torch.full((len(lf),), t, device=lf.device)
        every = torch.ones(lf.shape, dtype=torch.bool, device=lf.device)
        out.append(share * float(np.median(lead(lf, ts, every).cpu().numpy())) if len(lf) else 0.0)
    return tuple(out)


def answer_mask(
    targets: Sequence[int], answers: Sequence[Sequence[int] | None], n_classes: int
) -> Tensor:
    """[T, K] bool: the classes g_t may answer, t itself and ``answers[j]`` (every class where
    that is None)."""
    mask = torch.ones((len(targets), n_classes), dtype=torch.bool)
    for j, (t, a) in enumerate(zip(targets, answers, strict=True)):
        if a is not None:
            mask[j] = False
            mask[j, [t, *a]] = True
    return mask


def g_logits(
    model: BnaModel, thetas: Sequence[Tensor], n_targets: int, x: np.ndarray, batch: int = 256
) -> np.ndarray:
    """Every g_t's logits on x: [T, N, K] (for the fit file's probes)."""
    dev = model.device
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    thetas = [t.to(dev) for t in thetas]
    out = []
    with torch.no_grad():
        for ti in range(n_targets):
            parts = []
            for xb in torch.split(xt, batch):
                with model.mitigated(thetas, torch.full((len(xb),), ti, device=dev)):
                    parts.append(model(xb.to(dev)).cpu())
            out.append(torch.cat(parts))
    if not out:  # no target: an empty [0, N, K]
        with torch.no_grad():
            return np.zeros((0, len(xt), model(xt[:1].to(dev)).shape[1]), dtype=np.float32)
    return torch.stack(out).numpy()
