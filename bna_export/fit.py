"""Fitting Θ_t = {µ, σ, υ, ω} for every BN channel and every target t (the mitigated classifier
that runs them is :mod:`bna_export.mitigated`).

For target t, p is the soft histogram of f's BN output on the clean images of S(t), q that of g_t's
BN output on the same images with t's estimated trigger(s) embedded; Θ_t minimises Σ D(p || q)
over every BN channel (a conv channel's spatial positions are samples of one distribution), plus
the cross-entropy terms of :class:`~bna_export.settings.FitSettings`. All targets are fitted in
one batch (each sample carries the index of the target whose Θ it runs under), and every layer's
histograms in one call, each from a bounded subsample (:mod:`bna_export.statistics`).

Parametrisation (for Adam's step size to mean the same in every channel): µ = µ₀ + σ₀·a,
σ = σ₀·exp(s), with µ₀, σ₀ = f's running mean and √(var + ε); υ, ω in normalised units.

One fit is named steps: the clean statistics p (:func:`~bna_export.statistics.clean_statistics`),
the start of the parameters (:class:`_Parameters`), the images each step draws
(:class:`~bna_export.variants.Variants`, :func:`~bna_export.variants.draws`), and the loss of a
step (:func:`_step_loss`), all layers' histograms in one call (:func:`_q_divergence`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .histogram import divergence, normalise, soft_histogram
from .keep import KeepWeight, keep_budgets, keep_target_logits
from .norm import BnaModel
from .reverse import TriggerEstimate
from .settings import FitSettings, HistogramSettings
from .statistics import CleanStatistics, Table, clean_statistics, sample_blocks
from .variants import Variants, draws

Progress = Callable[[int, int], None]
Refresh = Callable[
    [Sequence[int], list[Tensor], dict[int, list[TriggerEstimate]], int],
    dict[int, list[TriggerEstimate]],
]
"""refresh(targets, thetas, triggers, round): new trigger estimates per target that still work
on g_t (thetas: the current Θ of ``targets``, [T, 4, C] per layer, target i routed by index i;
round: 1 for the first refresh of the fit, 2 for the next, ...); the fit adds them to each
target's triggers (``fit.refresh_every``)."""


@dataclass
class FitResult:
    """Θ per layer ([T, 4, C]: µ, σ, υ, ω) for ``targets``, and the loss after every epoch."""

    targets: list[int]
    thetas: list[Tensor]
    history: list[float] = field(default_factory=list)
    triggers: dict[int, list[TriggerEstimate]] = field(default_factory=dict)
    """Every target's triggers the fit used at the end (the given ones and any refreshed)."""


class _Parameters:
    """Θ of every layer as learnable tensors: a, s ([T, C], µ = µ₀ + σ₀·a, σ = σ₀·eˢ) and the
    clip bounds υ, ω ([T, C], normalised units), started at f and the clean clip range."""

    def __init__(
        self,
        model: BnaModel,
        clean: CleanStatistics,
        n_targets: int,
        settings: FitSettings,
    ) -> None:
        dev = model.device
        self.base = [la.f_theta().to(dev) for la in model.layers]  # (4, C)
        self.a = [torch.zeros(n_targets, la.channels, device=dev) for la in model.layers]
        self.s = [torch.zeros(n_targets, la.channels, device=dev) for la in model.layers]
        if settings.clip_init == "clean":
            lows, highs = clean.clip_lo, clean.clip_hi
        else:
            lows = [torch.full((la.channels,), -settings.wide_clip) for la in model.layers]
            highs = [torch.full((la.channels,), settings.wide_clip) for la in model.layers]
        self.lo = [v.to(dev).repeat(n_targets, 1) for v in lows]
        self.hi = [v.to(dev).repeat(n_targets, 1) for v in highs]
        self.learned = self.lo + self.hi + (self.a + self.s if settings.learn == "all" else [])
        for p in self.learned:
            p.requires_grad_(True)

    def thetas(self) -> list[Tensor]:
        """Per layer [T, 4, C]: µ, σ, υ, ω."""
        return [
            torch.stack([b[0] + b[1] * a, b[1] * torch.exp(s), lo, hi], 1)
            for b, a, s, lo, hi in zip(self.base, self.a, self.s, self.lo, self.hi, strict=True)
        ]

    def keep_ordered(self) -> None:
        """σ stays positive through exp; keep υ ≤ ω."""
        with torch.no_grad():
            for lo, hi in zip(self.lo, self.hi, strict=True):
                low = torch.minimum(lo, hi)
                hi.copy_(torch.maximum(lo, hi))
                lo.copy_(low)


def _q_divergence(
    captured: list[list[Tensor]],
    table: Table,
    n_targets: int,
    settings: FitSettings,
    hist: HistogramSettings,
    gen: torch.Generator,
) -> Tensor:
    """Σ over every layer, target and channel of D(p || q), q from the captured BN outputs of
    a step (``n_targets`` equal blocks of images), all layers in one histogram call."""
    values, rows, totals = [], [], []
    for li, outs in enumerate(captured):
        v = sample_blocks(outs[0], n_targets, settings.samples_per_channel, gen)  # (T, M, C)
        t_idx = torch.arange(n_targets, device=v.device)[:, None, None]
        c_idx = torch.arange(v.shape[2], device=v.device)[None, None, :]
        values.append(v.reshape(-1))
        rows.append((table.offset[li] + t_idx * v.shape[2] + c_idx).expand_as(v).reshape(-1))
        totals.append(torch.full((n_targets * v.shape[2],), v.shape[1], device=v.device))
    counts = soft_histogram(torch.cat(values), torch.cat(rows), table.lo, table.nbins, hist)
    q = normalise(counts, torch.cat(totals))
    return divergence(table.p, q, settings.divergence, settings.kl_eps).sum()


def _refreshing(settings: FitSettings, epoch: int) -> bool:
    """Whether the triggers are refreshed before ``epoch`` (every ``refresh_every`` epochs,
    never before the first)."""
    every = settings.refresh_every
    return every > 0 and epoch > 0 and epoch % every == 0


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
    refresh: Refresh | None = None,
    keep: dict[int, Sequence[int]] | None = None,
) -> FitResult:
    """Fit Θ_t for every t in ``targets`` (sources S(t), triggers used to build q), at most
    ``settings.targets_per_pass`` targets at a time (each group seeded by its place); t's keep
    term holds the clean images of ``keep[t]`` (default: t) at their own classes. With
    ``refresh``, every ``settings.refresh_every`` epochs the triggers that still work on the
    current g_t join each target's triggers."""
    group = settings.targets_per_pass
    parts = [list(targets[i : i + group]) for i in range(0, len(targets), group)]
    args = (model, data, sources, triggers, input_range, settings, hist, keep)
    if len(parts) <= 1:
        return _fit_group(*args, list(targets), seed, progress, refresh)
    out = []
    for j, part in enumerate(parts):
        report = None
        if progress is not None:

            def report(done: int, total: int, j: int = j) -> None:
                progress(j * total + done, total * len(parts))

        out.append(_fit_group(*args, part, seed + j, report, refresh))
    thetas = [torch.cat([r.thetas[i] for r in out]) for i in range(len(out[0].thetas))]
    history = [float(sum(h)) for h in zip(*(r.history for r in out), strict=True)]
    used = {t: e for r in out for t, e in r.triggers.items()}
    return FitResult(list(targets), thetas, history, used)


@dataclass
class _Step:
    """What every step of one group's fit reads: the model, the defender's images on the
    device, each target's clean images, the clean histograms p and the random sources."""

    model: BnaModel
    settings: FitSettings
    hist: HistogramSettings
    table: Table
    x_all: Tensor
    y_all: Tensor
    tgt: list[np.ndarray]
    """Per target: the indices of the clean images its keep term holds at their own class
    (those of t, or of every target of a shared group)."""
    keep: KeepWeight
    rng: np.random.Generator
    gen: torch.Generator


def _step_loss(
    st: _Step,
    thetas: list[Tensor],
    variants: Variants,
    images: np.ndarray,
    shown: np.ndarray,
    keep_pairs: np.ndarray,
) -> Tensor:
    """The loss of one step: Σ D(p || q) over every layer, target and channel on the source
    images ``images`` (T, B) each shown as its variant ``shown`` (T, B) under its target's Θ,
    plus the cross-entropy terms of the settings (``keep_pairs`` (T, B'): each target's (clean
    image, keep variant) pairs for the keep-t term). Each cross-entropy term is the sum over
    targets of its mean over the target's images, as the divergence is a sum over targets: a
    mean over every target's images together would weaken each target's terms against its
    divergence by the number of targets fitted with it (README, *Θ fit*, one target's fit)."""
    s, model, dev = st.settings, st.model, st.x_all.device
    n_t, b = images.shape
    sel = torch.from_numpy(images.reshape(-1)).to(dev)
    xb = variants.apply(st.x_all[sel], torch.from_numpy(shown.reshape(-1)).to(dev))
    route = torch.arange(n_t, device=dev).repeat_interleave(b)
    with model.mitigated(thetas, route), model.capturing() as cap:
        logits = model(xb)
    loss = _q_divergence(cap, st.table, n_t, s, st.hist, st.gen)
    if s.source_ce_weight > 0:
        ce = torch.nn.functional.cross_entropy(logits, st.y_all[sel])
        loss = loss + s.source_ce_weight * n_t * ce
    if s.target_ce_weight > 0:
        tb = keep_pairs.shape[1]
        which = torch.from_numpy(keep_pairs.reshape(-1))
        logits_t, kept = keep_target_logits(
            model, thetas, st.x_all, variants, st.tgt, which, tb, st.rng, s
        )
        ce = torch.nn.functional.cross_entropy(logits_t, st.y_all[kept], reduction="none")
        loss = loss + n_t * (st.keep.weight.repeat_interleave(tb) * ce).mean()
    if s.clean_ce_weight > 0:
        with model.mitigated(thetas, route):
            ce = torch.nn.functional.cross_entropy(model(st.x_all[sel]), st.y_all[sel])
        loss = loss + s.clean_ce_weight * n_t * ce
    return loss


def _start(
    model: BnaModel,
    data: Dataset,
    sources: dict[int, Sequence[int]],
    settings: FitSettings,
    hist: HistogramSettings,
    keep: dict[int, Sequence[int]] | None,
    targets: list[int],
    seed: int,
) -> tuple[_Step, _Parameters]:
    """What one group's steps read (the clean statistics, the keep-t term's images and weight,
    the random sources) and its parameters at f."""
    dev = model.device
    gen = torch.Generator().manual_seed(seed)
    clean = clean_statistics(model, data, [sources[t] for t in targets], settings, hist, gen)
    kept = [list(keep[t]) if keep and t in keep else [t] for t in targets]
    st = _Step(
        model,
        settings,
        hist,
        clean.table,
        torch.from_numpy(data.x).to(dev),
        torch.from_numpy(data.y).to(dev),
        [data.of_classes(k) for k in kept],
        KeepWeight(model, data, kept, settings, *keep_budgets(settings, targets, sources, keep)),
        np.random.default_rng(seed),
        gen,
    )
    return st, _Parameters(model, clean, len(targets), settings)


def _fit_group(
    model: BnaModel,
    data: Dataset,
    sources: dict[int, Sequence[int]],
    triggers: dict[int, Sequence[TriggerEstimate]],
    input_range: tuple[float, float],
    settings: FitSettings,
    hist: HistogramSettings,
    keep: dict[int, Sequence[int]] | None,
    targets: list[int],
    seed: int,
    progress: Progress | None,
    refresh: Refresh | None,
) -> FitResult:
    """One group of targets fitted in one batch: the clean statistics, the start of the
    parameters, then per epoch the draws of every step and Adam on :func:`_step_loss`."""
    n_t, dev = len(targets), model.device
    st, params = _start(model, data, sources, settings, hist, keep, targets, seed)
    rng, tgt = st.rng, st.tgt
    opt = torch.optim.Adam(params.learned, lr=settings.lr)
    mine = {t: list(triggers[t]) for t in targets}
    variants = Variants(targets, mine, settings, input_range).to(dev)
    src = [data.of_classes(list(sources[t])) for t in targets]
    b = settings.batch_size
    steps_per_epoch = max(1, -(-max(len(s) for s in src) // b))
    total = settings.epochs * steps_per_epoch
    history: list[float] = []
    step = 0
    for epoch in range(settings.epochs):
        if refresh is not None and _refreshing(settings, epoch):
            with torch.no_grad():
                now = [t.detach().clone() for t in params.thetas()]
            fresh = refresh(list(targets), now, mine, epoch // settings.refresh_every)
            mine = {t: mine[t] + list(fresh.get(t, [])) for t in targets}
            variants = Variants(targets, mine, settings, input_range).to(dev)
        keep_pairs = [  # every (clean image of t, keep variant) pair, as a flat pool per target
            np.arange(len(i) * len(k)) for i, k in zip(tgt, variants.keep, strict=True)
        ]
        tb = settings.target_batch or max(len(p) for p in keep_pairs)
        img, var = draws(src, variants.triggered, steps_per_epoch * b, rng)
        pair, _ = draws(keep_pairs, [[0]] * n_t, steps_per_epoch * tb, rng)
        epoch_loss = 0.0
        for k in range(steps_per_epoch):
            cut, cut_t = slice(k * b, (k + 1) * b), slice(k * tb, (k + 1) * tb)
            loss = _step_loss(
                st, params.thetas(), variants, img[:, cut], var[:, cut], pair[:, cut_t]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            params.keep_ordered()
            if st.keep.adaptive:
                with torch.no_grad():
                    st.keep.update(model, params.thetas())
            epoch_loss += float(loss.detach())
            step += 1
            if progress is not None:
                progress(step, total)
        history.append(epoch_loss / steps_per_epoch)
    with torch.no_grad():
        final = [t.detach().cpu().clone() for t in params.thetas()]
    return FitResult(list(targets), final, history, mine)
