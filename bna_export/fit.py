"""Fitting Θ_t = {µ, σ, υ, ω} for every BN channel and every target t, and the PyTorch reference
of the mitigated classifier.

For target t, p is the soft histogram of f's BN output on the clean images of S(t), q that of g_t's
BN output on the same images with t's estimated trigger(s) embedded; Θ_t minimises Σ D(p || q)
over every BN channel (a conv channel's spatial positions are samples of one distribution), plus
an optional cross-entropy keeping g_t's answer t on clean images of t. All targets are fitted in
one batch: each sample carries the index of the target whose Θ it runs under.

Parametrisation (for Adam's step size to mean the same in every channel): µ = µ₀ + σ₀·a,
σ = σ₀·exp(s), with µ₀, σ₀ = f's running mean and √(var + ε); υ, ω in normalised units.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .histogram import bin_layout, divergence, normalise, soft_histogram
from .model import BnaModel
from .reverse import TriggerEstimate
from .settings import FitSettings, HistogramSettings

Progress = Callable[[int, int], None]


@dataclass
class FitResult:
    """Θ per layer ([T, 4, C]: µ, σ, υ, ω) for ``targets``, and the loss after every epoch."""

    targets: list[int]
    thetas: list[Tensor]
    history: list[float] = field(default_factory=list)


def _forward_captured(model: BnaModel, x: Tensor, batch: int, inputs: bool) -> list[Tensor]:
    outs: list[list[Tensor]] = [[] for _ in model.layers]
    with torch.no_grad():
        for xb in torch.split(x, batch):
            with model.capturing(inputs=inputs) as cap:
                model(xb)
            for acc, got in zip(outs, cap, strict=True):
                acc.append(got[0])
    return [torch.cat(o) for o in outs]


def _channels_last(a: Tensor) -> Tensor:
    """(N, C, *S) -> (C, N·S): every spatial position is a sample of its channel."""
    return a.transpose(0, 1).reshape(a.shape[1], -1)


def _rows(route: Tensor, a: Tensor) -> Tensor:
    """Row index route·C + c of every element of a: (N, C, *S), flattened like a."""
    c = a.shape[1]
    shape = (a.shape[0], c) + (1,) * (a.dim() - 2)
    r = route.view(-1, *([1] * (a.dim() - 1))) * c + torch.arange(c).view(1, c, *shape[2:])
    return r.expand_as(a).reshape(-1)


def _jitter(x: Tensor, pixels: int, rng: np.random.Generator) -> Tensor:
    """Shift each image by up to ``pixels`` in each direction (edge-replicated): augmentation
    so the few clean target images generalise. x: (N, C, H, W)."""
    if pixels <= 0:
        return x
    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (pixels,) * 4, mode="replicate")
    dy = torch.from_numpy(rng.integers(0, 2 * pixels + 1, n))
    dx = torch.from_numpy(rng.integers(0, 2 * pixels + 1, n))
    rows = (
        (dy[:, None] + torch.arange(h)[None])
        .view(n, 1, h, 1)
        .expand(n, x.shape[1], h, w + 2 * pixels)
    )
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def fit_thetas(
    model: BnaModel,
    data: Dataset,
    targets: Sequence[int],
    sources: dict[int, Sequence[int]],
    triggers: dict[int, Sequence[TriggerEstimate]],
    input_range: tuple[float, float],
    settings: FitSettings = FitSettings(),
    hist: HistogramSettings = HistogramSettings(),
    seed: int = 0,
    progress: Progress | None = None,
    eval_batch: int = 256,
) -> FitResult:
    """Fit Θ_t for every t in ``targets`` (sources S(t), triggers used to build q)."""
    lo_x, hi_x = input_range
    n_t = len(targets)
    rng = np.random.default_rng(seed)
    x_all = torch.from_numpy(data.x)

    # Clean statistics: pre-normalisation z for the clip start, f's outputs for p and the bins.
    z_clean = _forward_captured(model, x_all, eval_batch, inputs=True)
    out_clean = _forward_captured(model, x_all, eval_batch, inputs=False)
    layers = model.layers
    src_idx = [torch.from_numpy(data.of_classes(list(sources[t]))) for t in targets]
    tgt_idx = [torch.from_numpy(data.of_classes([t])) for t in targets]

    bins_lo, bins_n, p_hist = [], [], []
    for out in out_clean:
        c = out.shape[1]
        lows, highs, ps, ns = [], [], [], []
        for idx in src_idx:
            vals = _channels_last(out[idx])  # (C, n·S)
            lows.append(vals.min(1).values)
            highs.append(vals.max(1).values)
        lo_r, hi_r = torch.cat(lows), torch.cat(highs)  # (T·C,)
        n_r = bin_layout(lo_r, hi_r, hist.bin_width)
        for ti, idx in enumerate(src_idx):
            a = out[idx]
            rows = _rows(torch.full((a.shape[0],), ti), a)
            ps.append(a.reshape(-1))
            ns.append(rows)
        counts = soft_histogram(torch.cat(ps), torch.cat(ns), lo_r, n_r, hist)
        totals = torch.bincount(torch.cat(ns), minlength=n_t * c)
        bins_lo.append(lo_r)
        bins_n.append(n_r)
        p_hist.append(normalise(counts, totals))

    # Θ parameters per layer: a, s: (T, C) start at f; υ, ω start at the clean range.
    base = [la.f_theta() for la in layers]  # (4, C)
    a_par = [torch.zeros(n_t, la.channels, requires_grad=True) for la in layers]
    s_par = [torch.zeros(n_t, la.channels, requires_grad=True) for la in layers]
    clip_lo, clip_hi = [], []
    for la, z, b in zip(layers, z_clean, base, strict=True):
        if settings.clip_init == "clean":
            zn = _channels_last(
                (z - b[0].view(1, -1, *[1] * (z.dim() - 2)))
                / b[1].view(1, -1, *[1] * (z.dim() - 2))
            )
            lo_c, hi_c = zn.min(1).values, zn.max(1).values
        else:
            lo_c = torch.full((la.channels,), -settings.wide_clip)
            hi_c = torch.full((la.channels,), settings.wide_clip)
        clip_lo.append(lo_c.repeat(n_t, 1).requires_grad_(True))
        clip_hi.append(hi_c.repeat(n_t, 1).requires_grad_(True))
    params = clip_lo + clip_hi
    if settings.learn == "all":
        params = a_par + s_par + params
    opt = torch.optim.Adam(params, lr=settings.lr)

    def thetas() -> list[Tensor]:
        out = []
        for b, a, s, lo_c, hi_c in zip(base, a_par, s_par, clip_lo, clip_hi, strict=True):
            mu = b[0] + b[1] * a
            sigma = b[1] * torch.exp(s)
            out.append(torch.stack([mu, sigma, lo_c, hi_c], 1))  # (T, 4, C)
        return out

    # Triggered source images per target: every clean source image with every trigger of t.
    trig_x, trig_route, trig_y = [], [], []
    y_all = torch.from_numpy(data.y)
    with torch.no_grad():
        for ti, t in enumerate(targets):
            for est, scale in itertools.product(triggers[t], settings.trigger_scales):
                trig_x.append(est.apply(x_all[src_idx[ti]], lo_x, hi_x, scale))
                trig_route.append(torch.full((len(src_idx[ti]),), ti))
                trig_y.append(y_all[src_idx[ti]])
    per_target = [torch.nonzero(torch.cat(trig_route) == ti).flatten() for ti in range(n_t)]
    trig_x_all, trig_route_all = torch.cat(trig_x), torch.cat(trig_route)
    trig_y_all = torch.cat(trig_y)
    b = settings.batch_size
    steps_per_epoch = max(1, -(-max(len(p) for p in per_target) // b))
    total = settings.epochs * steps_per_epoch
    # Clean images of t (and, with target_triggered, t's images with t's triggers): g_t keeps t.
    ce_parts, ce_routes = [], []
    with torch.no_grad():
        for ti, t in enumerate(targets):
            ce_parts.append(x_all[tgt_idx[ti]])
            if settings.target_triggered:
                ce_parts += [e.apply(x_all[tgt_idx[ti]], lo_x, hi_x) for e in triggers[t]]
            n_t_imgs = sum(len(p) for p in ce_parts) - sum(len(r) for r in ce_routes)
            ce_routes.append(torch.full((n_t_imgs,), ti))
    ce_x, ce_route = torch.cat(ce_parts), torch.cat(ce_routes)
    ce_y = torch.tensor(targets, dtype=torch.int64)[ce_route]
    keep_idx = torch.cat(src_idx)
    keep_route = torch.cat([torch.full((len(s),), ti) for ti, s in enumerate(src_idx)])
    keep_x, keep_y = x_all[keep_idx], torch.from_numpy(data.y)[keep_idx]
    history: list[float] = []
    step = 0
    for _ in range(settings.epochs):
        perms = [p[torch.from_numpy(rng.permutation(len(p)))] for p in per_target]
        epoch_loss = 0.0
        for k in range(steps_per_epoch):
            # b images per target, cycling through that target's permutation.
            sel = torch.cat([pm[(torch.arange(b) + k * b) % len(pm)] for pm in perms])
            xb, rb = trig_x_all[sel], trig_route_all[sel]
            th = thetas()
            with model.mitigated(th, rb), model.capturing() as cap:
                logits_b = model(xb)
            loss = torch.zeros(())
            if settings.source_ce_weight > 0:
                loss = loss + settings.source_ce_weight * torch.nn.functional.cross_entropy(
                    logits_b, trig_y_all[sel]
                )
            for li, outs in enumerate(cap):
                a = outs[0]
                rows = _rows(rb, a)
                counts = soft_histogram(a.reshape(-1), rows, bins_lo[li], bins_n[li], hist)
                totals = torch.bincount(rows, minlength=counts.shape[0])
                q = normalise(counts, totals)
                d = divergence(p_hist[li], q, settings.divergence, settings.kl_eps)
                loss = loss + (d * (totals > 0)).sum()
            if settings.target_ce_weight > 0 and len(ce_x):
                with model.mitigated(th, ce_route):
                    logits = model(_jitter(ce_x, settings.jitter, rng))
                loss = loss + settings.target_ce_weight * torch.nn.functional.cross_entropy(
                    logits, ce_y
                )
            if settings.clean_ce_weight > 0:
                with model.mitigated(th, keep_route):
                    logits = model(keep_x)
                loss = loss + settings.clean_ce_weight * torch.nn.functional.cross_entropy(
                    logits, keep_y
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # σ stays positive through exp; keep υ ≤ ω
                for lo_c, hi_c in zip(clip_lo, clip_hi, strict=True):
                    mid = torch.minimum(lo_c, hi_c)
                    hi_c.copy_(torch.maximum(lo_c, hi_c))
                    lo_c.copy_(mid)
            epoch_loss += float(loss.detach())
            step += 1
            if progress is not None:
                progress(step, total)
        history.append(epoch_loss / steps_per_epoch)
    with torch.no_grad():
        final = [t.detach().clone() for t in thetas()]
    return FitResult(list(targets), final, history)


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
) -> Prediction:
    """The mitigated classifier (design step 3), in PyTorch: f first; samples that f sends to a
    target t run g_t; a sample whose g_t answer differs from t is flagged and answered by g_t."""
    labels, flags, logits = [], [], []
    lut = torch.full((max([*targets, 0]) + 1,), -1, dtype=torch.int64)
    for ti, t in enumerate(targets):
        lut[t] = ti
    with torch.no_grad():
        for xb in torch.split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), batch):
            lf = model(xb)
            y = lf.argmax(1)
            route = torch.where(y < lut.numel(), lut[y.clamp_max(lut.numel() - 1)], -1)
            routed = torch.nonzero(route >= 0).flatten()
            out, flag = lf.clone(), torch.zeros(len(y), dtype=torch.bool)
            if targets and thetas is not None and routed.numel():
                with model.mitigated(thetas, route[routed]):
                    lg = model(xb[routed])
                changed = lg.argmax(1) != y[routed]
                flag[routed] = changed
                out[routed[changed]] = lg[changed]
            labels.append(out.argmax(1))
            flags.append(flag)
            logits.append(out)
    return Prediction(
        torch.cat(labels).numpy(), torch.cat(flags).numpy(), torch.cat(logits).numpy()
    )


def g_logits(
    model: BnaModel, thetas: Sequence[Tensor], n_targets: int, x: np.ndarray, batch: int = 256
) -> np.ndarray:
    """Every g_t's logits on x: [T, N, K] (for the fit file's probes)."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = []
    with torch.no_grad():
        for ti in range(n_targets):
            parts = []
            for xb in torch.split(xt, batch):
                with model.mitigated(thetas, torch.full((len(xb),), ti)):
                    parts.append(model(xb))
            out.append(torch.cat(parts))
    if not out:  # no target: an empty [0, N, K]
        with torch.no_grad():
            return np.zeros((0, len(xt), model(xt[:1]).shape[1]), dtype=np.float32)
    return torch.stack(out).numpy()
