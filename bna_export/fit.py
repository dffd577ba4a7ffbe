"""Fitting Θ_t = {µ, σ, υ, ω} for every BN channel and every target t, and the PyTorch reference
of the mitigated classifier.

For target t, p is the soft histogram of f's BN output on the clean images of S(t), q that of g_t's
BN output on the same images with t's estimated trigger(s) embedded; Θ_t minimises Σ D(p || q)
over every BN channel (a conv channel's spatial positions are samples of one distribution), plus
the cross-entropy terms of :class:`~bna_export.settings.FitSettings`. All targets are fitted in
one batch (each sample carries the index of the target whose Θ it runs under), and every layer's
histograms in one call, each from a bounded subsample (:mod:`bna_export.statistics`).

Parametrisation (for Adam's step size to mean the same in every channel): µ = µ₀ + σ₀·a,
σ = σ₀·exp(s), with µ₀, σ₀ = f's running mean and √(var + ε); υ, ω in normalised units.

One fit is: the clean statistics (:func:`~bna_export.statistics.clean_statistics`), the start
of the parameters (:class:`_Parameters`), the image sets each step draws from
(:class:`_Variants`, :func:`_draws`), and the loss of a step (:func:`_step_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .families import FAMILIES
from .histogram import divergence, normalise, soft_histogram
from .model import BnaModel
from .reverse import TriggerEstimate
from .settings import FitSettings, HistogramSettings
from .statistics import CleanStatistics, Table, clean_statistics, sample_blocks

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


def _jitter(x: Tensor, pixels: int, rng: np.random.Generator) -> Tensor:
    """Shift each image by up to ``pixels`` in each direction (edge-replicated): augmentation
    so the few clean target images generalise. x: (N, C, H, W)."""
    if pixels <= 0:
        return x
    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (pixels,) * 4, mode="replicate")
    dy = torch.from_numpy(rng.integers(0, 2 * pixels + 1, n)).to(x.device)
    dx = torch.from_numpy(rng.integers(0, 2 * pixels + 1, n)).to(x.device)
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = (dy[:, None] + ar_h[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pixels)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + ar_w[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


class _Variants:
    """Every way an image is shown to the fit, stacked per trigger family so that a batch
    embeds each family's variants in one op. Variant 0 is the clean image; then each estimate
    of each target at each scale (:meth:`~bna_export.families.Family.scaled`)."""

    def __init__(
        self,
        targets: Sequence[int],
        triggers: dict[int, Sequence[TriggerEstimate]],
        settings: FitSettings,
        input_range: tuple[float, float],
    ) -> None:
        self.lo, self.hi = input_range
        self.family: list[str | None] = [None]  # per variant
        self.row: list[int] = [0]  # per variant: its row in its family's stacked tensors
        stacks: dict[str, dict[str, list[Tensor]]] = {}
        index: dict[tuple[int, float], int] = {}

        def variant(est: TriggerEstimate, scale: float) -> int:
            key = (id(est), scale)
            if key not in index:
                index[key] = len(self.family)
                trig = est.kind.scaled(est.tensors(), scale)
                rows = stacks.setdefault(est.family, {k: [] for k in trig})
                self.family.append(est.family)
                self.row.append(len(next(iter(rows.values()))))
                for k, v in trig.items():
                    rows[k].append(v[0].float())
            return index[key]

        self.triggered = [
            [variant(e, s) for e in triggers[t] for s in settings.trigger_scales] for t in targets
        ]
        self.keep = [
            [0] + ([variant(e, 1.0) for e in triggers[t]] if settings.target_triggered else [])
            for t in targets
        ]
        self.names = sorted(stacks)
        self.params = {f: {k: torch.stack(v) for k, v in r.items()} for f, r in stacks.items()}
        self.code = torch.tensor([-1 if f is None else self.names.index(f) for f in self.family])
        self.rows = torch.tensor(self.row)

    def to(self, device: torch.device) -> _Variants:
        self.params = {f: {k: t.to(device) for k, t in r.items()} for f, r in self.params.items()}
        self.code, self.rows = self.code.to(device), self.rows.to(device)
        return self

    def apply(self, x: Tensor, which: Tensor) -> Tensor:
        """x: (N, C, H, W) with variant ``which`` [N] embedded."""
        out = x.clone()
        code = self.code[which]
        for fi, name in enumerate(self.names):
            at = torch.nonzero(code == fi).flatten()
            if not at.numel():
                continue
            r = self.rows[which[at]]
            trig = {k: t[r] for k, t in self.params[name].items()}
            out[at] = FAMILIES[name].embed(trig, x[at][:, None], self.lo, self.hi)[:, 0]
        return out


def _draws(
    pools: Sequence[np.ndarray],
    choices: Sequence[Sequence[int]],
    length: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass: per target (row), its pool of images in a fresh random order, each with a
    random one of its ``choices``, cycled to ``length``. Returns images and variants (T, L)."""
    sizes = np.array([len(p) for p in pools])
    keys = rng.random((len(pools), int(sizes.max())))
    keys[np.arange(keys.shape[1])[None, :] >= sizes[:, None]] = np.inf
    order = np.argsort(keys, axis=1, kind="stable")
    pos = order[np.arange(len(pools))[:, None], np.arange(length)[None, :] % sizes[:, None]]
    width = max(len(c) for c in choices)
    table = np.array([list(c) + [c[0]] * (width - len(c)) for c in choices])
    n_choice = np.array([len(c) for c in choices])
    pick = np.floor(rng.random((len(pools), length)) * n_choice[:, None]).astype(np.int64)
    padded = np.array([np.pad(p, (0, int(sizes.max()) - len(p))) for p in pools])
    rows = np.arange(len(pools))[:, None]
    return padded[rows, pos], table[rows, pick]


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


def _keep_target(
    model: BnaModel,
    thetas: list[Tensor],
    x_all: Tensor,
    variants: _Variants,
    tgt: Sequence[np.ndarray],
    which: Tensor,
    per_target: int,
    rng: np.random.Generator,
    settings: FitSettings,
) -> Tensor:
    """g_t's logits on ``per_target`` clean images of each target t, each plain or with one of
    t's estimated triggers (``which`` indexes each target's (image, variant) pairs, image-major),
    shifted by up to ``settings.jitter`` pixels."""
    n_keep = torch.tensor([len(k) for k in variants.keep])
    route = torch.arange(len(tgt)).repeat_interleave(per_target)
    image = which // n_keep[route]
    width = max(len(k) for k in variants.keep)
    keep = torch.tensor([list(k) + [0] * (width - len(k)) for k in variants.keep])
    var = keep[route, which % n_keep[route]]
    size = max(len(t) for t in tgt)
    pools = torch.tensor(np.stack([np.pad(t, (0, size - len(t))) for t in tgt]))
    dev = x_all.device
    x = variants.apply(x_all[pools[route, image].to(dev)], var.to(dev))
    with model.mitigated(thetas, route.to(dev)):
        return model(_jitter(x, settings.jitter, rng))


def _refreshing(settings: FitSettings, epoch: int) -> bool:
    """Whether the triggers are refreshed before ``epoch`` (every ``refresh_every`` epochs,
    never before the first)."""
    every = settings.refresh_every
    return every > 0 and epoch > 0 and epoch % every == 0


class _KeepWeight:
    """The weight of the keep-t term per target: ``fit.target_ce_weight``; with
    ``fit.target_flag_budget``, after every step it is multiplied by ``fit.target_weight_step``
    while more than that share of t's clean images (those f answers t for, as routing would) are
    flagged by g_t, and divided by it otherwise, within [1/r, r]× the start (r:
    ``fit.target_weight_range``): Neural Cleanse's adaptive λ, applied to the false flags the
    defender can see."""

    def __init__(
        self, model: BnaModel, data: Dataset, targets: Sequence[int], settings: FitSettings
    ) -> None:
        dev, n_t = model.device, len(targets)
        self.settings = settings
        self.weight = torch.full((n_t,), float(settings.target_ce_weight), device=dev)
        self.adaptive = settings.target_flag_budget > 0 and settings.target_ce_weight > 0
        self.flagged = torch.zeros(n_t, device=dev)  # share of routed clean t images flagged
        if not self.adaptive:
            return
        idx = [data.of_classes([t]) for t in targets]
        x = torch.from_numpy(data.x[np.concatenate(idx)]).to(dev)
        route = torch.arange(n_t, device=dev).repeat_interleave(
            torch.tensor([len(i) for i in idx], device=dev)
        )
        label = torch.tensor(list(targets), device=dev)[route]
        with torch.no_grad():
            routed = model(x).argmax(1) == label
        self.x, self.route, self.label = x[routed], route[routed], label[routed]
        ones = torch.ones_like(self.route, dtype=torch.float32)
        self.n = torch.zeros_like(self.weight).index_add_(0, self.route, ones).clamp_min(1)
        self.adaptive = bool(routed.any())

    def update(self, model: BnaModel, thetas: list[Tensor]) -> None:
        """One step of the rule, with g_t's current Θ (call under ``torch.no_grad``)."""
        s = self.settings
        if not self.adaptive:
            return
        with model.mitigated(thetas, self.route):
            flag = (model(self.x).argmax(1) != self.label).float()
        self.flagged = torch.zeros_like(self.weight).index_add_(0, self.route, flag) / self.n
        step = torch.where(
            self.flagged > s.target_flag_budget, s.target_weight_step, 1 / s.target_weight_step
        )
        w0 = s.target_ce_weight
        self.weight = torch.clamp(
            self.weight * step, w0 / s.target_weight_range, w0 * s.target_weight_range
        )


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
) -> FitResult:
    """Fit Θ_t for every t in ``targets`` (sources S(t), triggers used to build q), at most
    ``settings.targets_per_pass`` targets at a time (each group seeded by its place). With
    ``refresh``, every ``settings.refresh_every`` epochs the triggers that still work on the
    current g_t join each target's triggers."""
    group = settings.targets_per_pass
    if len(targets) > group:
        parts = [list(targets[i : i + group]) for i in range(0, len(targets), group)]
        out = []
        for j, part in enumerate(parts):
            report = None
            if progress is not None:

                def report(done: int, total: int, j: int = j) -> None:
                    progress(j * total + done, total * len(parts))

            out.append(
                fit_thetas(
                    model,
                    data,
                    part,
                    sources,
                    triggers,
                    input_range,
                    settings,
                    hist,
                    seed + j,
                    report,
                    refresh,
                )
            )
        thetas = [torch.cat([r.thetas[i] for r in out]) for i in range(len(out[0].thetas))]
        history = [float(sum(h)) for h in zip(*(r.history for r in out), strict=True)]
        used = {t: e for r in out for t, e in r.triggers.items()}
        return FitResult(list(targets), thetas, history, used)
    n_t, dev = len(targets), model.device
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    clean = clean_statistics(model, data, [sources[t] for t in targets], settings, hist, gen)
    params = _Parameters(model, clean, n_t, settings)
    opt = torch.optim.Adam(params.learned, lr=settings.lr)
    mine = {t: list(triggers[t]) for t in targets}
    variants = _Variants(targets, mine, settings, input_range).to(dev)
    keep = _KeepWeight(model, data, targets, settings)
    x_all, y_all = torch.from_numpy(data.x).to(dev), torch.from_numpy(data.y).to(dev)
    src = [data.of_classes(list(sources[t])) for t in targets]
    tgt = [data.of_classes([t]) for t in targets]
    b = settings.batch_size
    steps_per_epoch = max(1, -(-max(len(s) for s in src) // b))
    target_label = torch.tensor(list(targets), device=dev)
    total = settings.epochs * steps_per_epoch
    history: list[float] = []
    step = 0
    for epoch in range(settings.epochs):
        if refresh is not None and _refreshing(settings, epoch):
            with torch.no_grad():
                now = [t.detach().clone() for t in params.thetas()]
            fresh = refresh(list(targets), now, mine, epoch // settings.refresh_every)
            mine = {t: mine[t] + list(fresh.get(t, [])) for t in targets}
            variants = _Variants(targets, mine, settings, input_range).to(dev)
        keep_pairs = [  # every (clean image of t, keep variant) pair, as a flat pool per target
            np.arange(len(i) * len(k)) for i, k in zip(tgt, variants.keep, strict=True)
        ]
        tb = settings.target_batch or max(len(p) for p in keep_pairs)
        img, var = _draws(src, variants.triggered, steps_per_epoch * b, rng)
        pair, _ = _draws(keep_pairs, [[0]] * n_t, steps_per_epoch * tb, rng)
        epoch_loss = 0.0
        for k in range(steps_per_epoch):
            cut = slice(k * b, (k + 1) * b)
            sel = torch.from_numpy(img[:, cut].reshape(-1)).to(dev)
            xb = variants.apply(x_all[sel], torch.from_numpy(var[:, cut].reshape(-1)).to(dev))
            route = torch.arange(n_t, device=dev).repeat_interleave(b)
            th = params.thetas()
            with model.mitigated(th, route), model.capturing() as cap:
                logits = model(xb)
            loss = _q_divergence(cap, clean.table, n_t, settings, hist, gen)
            if settings.source_ce_weight > 0:
                ce = torch.nn.functional.cross_entropy(logits, y_all[sel])
                loss = loss + settings.source_ce_weight * ce
            if settings.target_ce_weight > 0:
                which = torch.from_numpy(pair[:, k * tb : (k + 1) * tb].reshape(-1))
                logits_t = _keep_target(model, th, x_all, variants, tgt, which, tb, rng, settings)
                ce = torch.nn.functional.cross_entropy(
                    logits_t, target_label.repeat_interleave(tb), reduction="none"
                )
                loss = loss + (keep.weight.repeat_interleave(tb) * ce).mean()
            if settings.clean_ce_weight > 0:
                with model.mitigated(th, route):
                    ce = torch.nn.functional.cross_entropy(model(x_all[sel]), y_all[sel])
                loss = loss + settings.clean_ce_weight * ce
            opt.zero_grad()
            loss.backward()
            opt.step()
            params.keep_ordered()
            if keep.adaptive:
                with torch.no_grad():
                    keep.update(model, params.thetas())
            epoch_loss += float(loss.detach())
            step += 1
            if progress is not None:
                progress(step, total)
        history.append(epoch_loss / steps_per_epoch)
    with torch.no_grad():
        final = [t.detach().cpu().clone() for t in params.thetas()]
    return FitResult(list(targets), final, history, mine)


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
    dev = model.device
    lut = torch.full((max([*targets, 0]) + 1,), -1, dtype=torch.int64, device=dev)
    for ti, t in enumerate(targets):
        lut[t] = ti
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
                with model.mitigated(thetas, route[routed]):
                    lg = model(xb[routed])
                changed = lg.argmax(1) != y[routed]
                flag[routed] = changed
                out[routed[changed]] = lg[changed]
            labels.append(out.argmax(1).cpu())
            flags.append(flag.cpu())
            logits.append(out.cpu())
    return Prediction(
        torch.cat(labels).numpy(), torch.cat(flags).numpy(), torch.cat(logits).numpy()
    )


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
