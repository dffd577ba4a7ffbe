"""The update rules of the batched trigger solver (:func:`bna_export.reverse.reverse_engineer`):
one batch's images, parameters and best triggers with its gradient step (:class:`Batch`), the
``grow`` rule, Adam for the ``penalised`` rule (:class:`Adam`), and Neural Cleanse's adaptive λ
and early stop (:class:`CostSchedule`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .families import FAMILIES, Trigger
from .norm import BnaModel
from .problems import (
    ANY,
    OWN,
    TOLERANCE,
    Forward,
    Pools,
    Problem,
    TriggerEstimate,
    Triggers,
    autocast,
    away_of,
    goal,
    sizes,
    success,
)
from .settings import ReverseSettings

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_IMPROVEMENT = 0.99  # a new best must be 1% smaller to reset the early-stop patience


class Batch:
    """One batch of problems being solved: the images, the parameters per family, each
    problem's goal, and the best trigger each has had (the answer); [P] vectors on the CPU,
    parameters on the model's device."""

    def __init__(
        self,
        model: BnaModel,
        data: Dataset,
        problems: Sequence[Problem],
        input_range: tuple[float, float],
        settings: ReverseSettings,
        seed: int,
        forward: Forward | None,
        start: Sequence[TriggerEstimate | None] | None,
    ) -> None:
        self.problems, self.settings = problems, settings
        self.lo, self.hi = input_range
        self.span = self.hi - self.lo
        self.dev = dev = model.device
        self.shape = (int(data.x.shape[1]), int(data.x.shape[2]), int(data.x.shape[3]))
        gens = [torch.Generator().manual_seed(p.seed(seed)) for p in problems]
        self.pools = Pools(data, problems, settings.batch_size, settings.steps, gens)
        self.x_all = torch.from_numpy(data.x).to(dev)
        self.targets = torch.tensor([p.target for p in problems])
        self.away = torch.tensor(
            [p.sources[0] if p.target == ANY else OWN if p.target == OWN else -1 for p in problems]
        )
        self.labels = torch.from_numpy(np.asarray(data.y)).long()
        self.run = forward or (lambda x, _which: model(x))
        first = []
        for i, p in enumerate(problems):
            fam = FAMILIES[p.family]
            drawn = fam.start(gens[i], self.shape, self.span, settings.perturbation_init)
            given = None if start is None else start[i]
            if given is not None:
                warm = {k: v[0] for k, v in fam.encode(given.tensors(), self.lo, self.hi).items()}
                drawn = {k: warm[k].float() for k in fam.keys}
            first.append(drawn)
        self.tr = Triggers(problems, first, dev)
        self.best = self.tr.clone()
        self.best_size = torch.full((len(problems),), float("inf"), dtype=torch.float64)
        self.penalised = torch.tensor([FAMILIES[p.family].rule == "penalised" for p in problems])
        self.cap = torch.tensor([FAMILIES[p.family].max_steps(settings) for p in problems])

    def gradients(
        self, step: int, active: Tensor, cost: Tensor
    ) -> tuple[dict[str, Trigger], Tensor]:
        """Every active problem's gradient of its loss at ``step`` (per family, rows of the
        family's tensors; ``cost``: each problem's λ) and its success on this step's images
        ([P] float64)."""
        s, tr, pools, dev = self.settings, self.tr, self.pools, self.dev
        grads = {f: {k: torch.zeros_like(t) for k, t in r.items()} for f, r in tr.raw.items()}
        step_hit = torch.zeros(len(self.problems), dtype=torch.float64)
        per_forward = max(1, s.images_per_forward // pools.batch)
        # one family per chunk: each embeds its own way and differentiates its own parameters
        for name in tr.names:
            fam = FAMILIES[name]
            mine = tr.of(name, active)
            for chunk in torch.split(mine, per_forward) if mine.numel() else ():
                rows = tr.row[chunk].to(dev)
                index, weight = pools.step(chunk, step)
                weight = weight.to(dev)
                xb = self.x_all[index.to(dev)]  # (p, B, C, H, W)
                sub = {k: t[rows].clone().requires_grad_(True) for k, t in tr.raw[name].items()}
                trig = fam.decode(sub, self.lo, self.hi)
                xt = fam.embed(trig, xb, self.lo, self.hi)
                with autocast(dev, s.precision):
                    which = chunk.repeat_interleave(pools.batch).to(dev)
                    logits = self.run(xt.flatten(0, 1), which).float()
                ce, hit = goal(
                    logits,
                    self.targets[chunk].repeat_interleave(pools.batch).to(dev),
                    away_of(self.away[chunk], index, self.labels).to(dev),
                    s.confidence,
                )
                norm = weight.sum(1)
                loss = (ce.view(len(chunk), -1) * weight).sum(1) / norm
                if fam.rule == "penalised":
                    loss = loss + cost[chunk].to(dev) * fam.penalty(trig, s)
                loss.sum().backward()
                for k in sub:
                    grads[name][k][rows] = sub[k].grad
                with torch.no_grad():
                    hit = hit.double().view(len(chunk), -1)
                    step_hit[chunk] = ((hit * weight.double()).sum(1) / norm.double()).cpu()
        return grads, step_hit

    def success(self, which: Tensor, raw: dict[str, Trigger]) -> Tensor:
        """Share of the whole pool that each problem of ``which`` sends to its goal with its
        trigger in ``raw``."""
        return success(
            self.run,
            self.x_all,
            self.pools,
            which,
            self.tr,
            raw,
            (self.targets, self.away, self.labels),
            (self.lo, self.hi),
            self.settings,
        )

    def grow(self, active: Tensor, which: Tensor, reached: Tensor, grads: dict, step: int) -> None:
        """The ``grow`` families: a problem whose trigger succeeds stops with it (its size is
        that of the shortest path to success), the others take one normalised step down the
        gradient, and stop at the family's size limit or step cap (of the problems ``which``;
        ``active`` updated)."""
        s, tr, dev, lo, hi = self.settings, self.tr, self.dev, self.lo, self.hi
        for name in tr.names:
            fam = FAMILIES[name]
            if fam.rule != "grow":
                continue
            mine = tr.of(name, which)
            if not mine.numel():
                continue
            raw, store = tr.raw[name], self.best[name]
            done, go = mine[reached[mine]], mine[~reached[mine]]
            d_rows, g_rows = tr.row[done].to(dev), tr.row[go].to(dev)
            if done.numel():
                for k in raw:
                    store[k][d_rows] = raw[k][d_rows]
                with torch.no_grad():
                    at = fam.decode({k: raw[k][d_rows] for k in raw}, lo, hi)
                    self.best_size[done] = fam.size(at).double().cpu()
                active[done] = False
            if not go.numel():
                continue
            g = {k: grads[name][k][g_rows] for k in raw}
            length = torch.sqrt(sum(t.flatten(1).pow(2).sum(1) for t in g.values()))
            length = length.clamp_min(1e-12)
            moved = {
                k: raw[k][g_rows]
                - fam.step_length(s, self.span)
                * g[k]
                / length.view((-1,) + (1,) * (g[k].dim() - 1))
                for k in raw
            }
            moved = fam.bound(moved, self.shape, self.span)
            for k in raw:
                raw[k][g_rows] = moved[k]
            if np.isfinite(fam.limit(s)):  # too large to be this kind of trigger
                with torch.no_grad():
                    now = fam.size(fam.decode(moved, lo, hi)).cpu()
                active[go[now > fam.limit(s)]] = False
            if step + 1 >= fam.max_steps(s):
                active[go] = False

    def keep_best(self, reached: Tensor, live: Tensor) -> Tensor:
        """Best tracking of the penalised problems ``live`` (a [P] mask) on the parameters this
        step evaluated (exact for a whole pool); returns the [P] mask of new bests."""
        tr, n = self.tr, len(self.problems)
        size = sizes(tr.raw, tr, self.lo, self.hi, n)
        better = reached & (size < self.best_size * _IMPROVEMENT) & live
        self.best_size = torch.where(better, size, self.best_size)
        for name in tr.names:
            if FAMILIES[name].rule != "penalised":
                continue
            rows = tr.row[tr.of(name, torch.nonzero(better).flatten())].to(self.dev)
            for k in tr.raw[name]:
                self.best[name][k][rows] = tr.raw[name][k][rows]
        return better

    def estimates(self, steps: Tensor) -> list[TriggerEstimate]:
        """Each problem's best trigger (a never-successful one keeps its last, and its success
        says so), its size, its success on the whole pool and its steps."""
        tr, lo, hi, n = self.tr, self.lo, self.hi, len(self.problems)
        never = torch.nonzero(~torch.isfinite(self.best_size)).flatten()
        for name in tr.names:
            rows = tr.row[tr.of(name, never)].to(self.dev)
            for k in tr.raw[name]:
                self.best[name][k][rows] = tr.raw[name][k][rows]
        final_size = sizes(self.best, tr, lo, hi, n)
        rate = self.success(torch.arange(n), self.best)
        decoded = {}
        with torch.no_grad():
            for name in tr.names:
                decoded[name] = {
                    k: v.cpu() for k, v in FAMILIES[name].decode(self.best[name], lo, hi).items()
                }
        return [
            TriggerEstimate(
                problem=prob,
                size=float(final_size[i]),
                success=float(rate[i]),
                steps=int(steps[i]),
                params={
                    k: v[int(tr.row[i])].numpy().copy() for k, v in decoded[prob.family].items()
                },
                shape=self.shape,
            )
            for i, prob in enumerate(self.problems)
        ]


class Adam:
    """Adam, elementwise, for the penalised problems' raw parameters (per problem: a problem's
    bias correction counts its own steps)."""

    def __init__(self, tr: Triggers) -> None:
        self.tr = tr
        self.moments = {
            f: {k: (torch.zeros_like(t), torch.zeros_like(t)) for k, t in tr.raw[f].items()}
            for f in tr.names
            if FAMILIES[f].rule == "penalised"
        }

    def step(self, which: Tensor, steps: Tensor, grads: dict, lr: float, dev: torch.device):
        b1, b2 = _ADAM_BETAS
        tr = self.tr
        for name, mom in self.moments.items():
            mine = tr.of(name, which)
            if not mine.numel():
                continue
            rows = tr.row[mine].to(dev)
            t = steps[mine].float().to(dev)
            for k, (m1, m2) in mom.items():
                g = grads[name][k][rows]
                m1[rows] = b1 * m1[rows] + (1 - b1) * g
                m2[rows] = b2 * m2[rows] + (1 - b2) * g * g
                shape_t = (-1,) + (1,) * (g.dim() - 1)
                m_hat = m1[rows] / (1 - b1**t).view(shape_t)
                v_hat = m2[rows] / (1 - b2**t).view(shape_t)
                tr.raw[name][k][rows] -= lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)


class CostSchedule:
    """Neural Cleanse's adaptive λ and early stop for the penalised problems, decided at every
    ``check_every``-th step on the success over the window since the last check ([P] on the
    CPU): λ = 0 until the trigger first succeeds, then multiplied while it succeeds for
    ``cost_patience`` checks and divided while it fails; a problem stops once λ has been both
    raised and lowered (the size met the success boundary from both sides) and its best has
    not improved for ``patience`` checks."""

    def __init__(self, n: int, settings: ReverseSettings) -> None:
        self.settings = settings
        self.cost = torch.zeros(n)
        self.stale = torch.zeros(n, dtype=torch.int64)
        self.up_count = torch.zeros(n, dtype=torch.int64)
        self.down_count = torch.zeros(n, dtype=torch.int64)
        self.grown = torch.zeros(n, dtype=torch.bool)
        self.shrunk = torch.zeros(n, dtype=torch.bool)
        self.hits = torch.zeros(n, dtype=torch.float64)
        self.seen = torch.zeros(n, dtype=torch.float64)

    def record(self, which: Tensor, step_hit: Tensor) -> None:
        """Add this step's success of the problems ``which`` to the window."""
        self.hits[which] += step_hit[which]
        self.seen[which] += 1

    def check(self, live: Tensor, better: Tensor, best_size: Tensor, steps: Tensor) -> Tensor:
        """Update λ and the counters of the problems ``live`` ([P] mask); returns the [P] mask
        of problems that finished."""
        s = self.settings
        with torch.no_grad():
            ok = self.hits / self.seen.clamp_min(1) >= s.success - TOLERANCE
            first_ok = live & ok & (self.cost == 0)  # first success: the size penalty starts
            self.cost = torch.where(first_ok, s.init_cost, self.cost)
            up = torch.where(first_ok, 0, self.up_count)
            down = torch.where(first_ok, 0, self.down_count)
            started = live & (self.cost > 0) & ~first_ok
            # patience runs only while the trigger succeeds (λ is then pushing it smaller)
            self.stale = torch.where(better, 0, self.stale + (live & ~better & ok).long())
            up = torch.where(started & ok, up + 1, 0)
            down = torch.where(started & ~ok, down + 1, 0)
            grow = started & (up >= s.cost_patience)
            shrink = started & (down >= s.cost_patience)
            self.cost = torch.where(grow, self.cost * s.cost_multiplier, self.cost)
            self.cost = torch.where(shrink, self.cost / s.cost_multiplier**1.5, self.cost)
            self.up_count = torch.where(grow, 0, up)
            self.down_count = torch.where(shrink, 0, down)
            self.grown |= grow
            self.shrunk |= shrink
            finished = (
                live
                & torch.isfinite(best_size)
                & (self.stale >= s.patience)
                & (steps >= s.min_steps)
                & self.grown
                & self.shrunk
            )
            self.hits.zero_()
            self.seen.zero_()
        return finished
