"""Trigger reverse-engineering, solved as one batch of problems that share the model.

A problem is (family, target t, source classes S, restart): find the smallest trigger of its
family (:mod:`bna_export.families`) sending clean images of S to t; with t = :data:`ANY` (an
untargeted problem, one source s), to any class but s. A family's ``rule`` picks its update:

- ``penalised`` (Neural Cleanse, Wang et al. 2019): Adam on CE(f(x'), t) + λ·size with Neural
  Cleanse's adaptive λ; a problem stops early once its trigger succeeds and stops shrinking.
- ``grow`` (Xiang et al. 2020): starting near 0, the trigger takes normalised steps down the
  gradient of CE(f(x'), t) and stops the first time it succeeds: the size is that of the
  shortest path to success, so it needs no λ.

Each step runs every active problem's triggered images through f at once (chunked to bound
memory, one family per chunk) and updates each problem from its own gradient. Every random
choice of a problem (its initialisation, its minibatches) comes from a generator seeded by the
problem itself, and f's answer on an image does not depend on the other images of the batch, so
a problem's estimate is the same whichever problems it is solved with: solving all pairs in one
process or sharded over several gives the same estimates.

``forward`` replaces f (e.g. by g_t, to find the triggers that still work on a repaired model),
and ``start`` warm-starts problems from earlier estimates.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .families import FAMILIES, Family, Trigger
from .model import BnaModel
from .settings import ReverseSettings

ANY = -1
"""The target of an untargeted problem: any class but its (single) source."""
Progress = Callable[[int, int, Tensor], None]
"""progress(done, total, finished): problem-steps done (a finished problem counts all its
steps), the most there can be, and a [P] bool mask of the problems that have finished."""
Forward = Callable[[Tensor, Tensor], Tensor]
"""forward(x, problem): logits of images x [N, C, H, W], each belonging to problem [N] (its
index in the list solved)."""

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_IMPROVEMENT = 0.99  # a new best must be 1% smaller to reset the early-stop patience
_TOLERANCE = 1e-9  # success rates are ratios of counts: 19/20 reaches 0.95


@dataclass(frozen=True)
class Problem:
    """One reverse-engineering problem: reach ``target`` from the images of ``sources``."""

    family: str
    target: int
    sources: tuple[int, ...]
    restart: int = 0

    def seed(self, seed: int) -> int:
        """The problem's own random seed: a hash of the run's seed and the problem."""
        key = f"{seed}:{self.family}:{self.target}:{self.sources}:{self.restart}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


@dataclass
class TriggerEstimate:
    """A reverse-engineered trigger: its family's tensors ``params`` (see
    :mod:`bna_export.families`; e.g. patch: ``mask`` [1, H, W] and ``pattern`` [C, H, W]) for
    images of ``shape`` (C, H, W)."""

    problem: Problem
    size: float
    success: float
    steps: int
    params: dict[str, np.ndarray]
    shape: tuple[int, int, int]

    @property
    def family(self) -> str:
        return self.problem.family

    @property
    def kind(self) -> Family:
        return FAMILIES[self.problem.family]

    @property
    def mask(self) -> np.ndarray | None:
        """A patch's mask [H, W] (None for other families)."""
        m = self.params.get("mask")
        return None if m is None else m[0]

    @property
    def pattern(self) -> np.ndarray:
        """The pattern [C, H, W] of a patch or blend, the additive v of a perturbation."""
        return self.params["pattern"]

    def tensors(self, device: torch.device | str = "cpu") -> Trigger:
        """The trigger as tensors with a leading problem dimension of 1."""
        return {k: torch.as_tensor(v, device=device)[None] for k, v in self.params.items()}

    def apply(self, x: Tensor, lo: float, hi: float, scale: float = 1.0) -> Tensor:
        """Embed the trigger in x: [N, C, H, W]; ``scale`` strengthens (> 1) or weakens it
        (the family's :meth:`~bna_export.families.Family.scaled`)."""
        trig = {k: v.to(x.dtype) for k, v in self.tensors(x.device).items()}
        if scale != 1.0:
            trig = self.kind.scaled(trig, scale)
        return self.kind.embed(trig, x[None], lo, hi)[0]


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (a CUDA GPU with bf16, or a
    CPU with AVX512-BF16 / AMX that oneDNN uses); elsewhere bf16 is emulated and slow."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """Mixed precision for f's forward passes: bfloat16 where asked ('bfloat16', or 'auto' on
    hardware with native bf16), else plain float32."""
    on = precision == "bfloat16" or (precision == "auto" and bf16_native(device))
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _goal(logits: Tensor, target: Tensor, away: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample, the loss and whether f's answer meets the goal: reach ``target``, or, where
    ``away`` ≥ 0 (an untargeted problem), leave class ``away``: −log(1 − p_away)."""
    hit = logits.argmax(1) == target
    loss = torch.nn.functional.cross_entropy(logits, target.clamp_min(0), reduction="none")
    untargeted = away >= 0
    if bool(untargeted.any()):
        rest = logits.scatter(1, away.clamp_min(0)[:, None], float("-inf")).logsumexp(1)
        leave = logits.logsumexp(1) - rest  # −log Σ_{c ≠ away} p_c
        loss = torch.where(untargeted, leave, loss)
        hit = torch.where(untargeted, logits.argmax(1) != away, hit)
    return loss, hit


class _Pools:
    """Which images each problem sees at each step.

    A problem whose pool fits in the batch sees its whole pool every step (weights mark the
    padding); a larger pool is sampled without replacement from the problem's own schedule,
    drawn once at set-up from the problem's generator. Indices: (P, B) per step.
    """

    def __init__(
        self,
        data: Dataset,
        problems: Sequence[Problem],
        batch_size: int,
        steps: int,
        gens: Sequence[torch.Generator],
    ) -> None:
        pools = [torch.from_numpy(data.of_classes(list(p.sources))) for p in problems]
        empty = next((p for p, pool in zip(problems, pools, strict=True) if not len(pool)), None)
        if empty is not None:
            raise ValueError(f"no clean images of source classes {empty.sources}")
        self.length = torch.tensor([len(pool) for pool in pools])  # (P,)
        self.width = int(self.length.max())
        self.batch = min(batch_size, self.width)
        self.matrix = torch.zeros((len(pools), self.width), dtype=torch.int64)  # (P, L)
        for i, pool in enumerate(pools):  # once, at set-up
            self.matrix[i, : len(pool)] = pool
        self.drawn = self.length > self.batch  # (P,) problems that sample their pool
        self.row = torch.cumsum(self.drawn.long(), 0) - 1  # row in the schedule
        self.schedule = (
            torch.stack(  # (P_drawn, steps, B) positions in the pool
                [
                    torch.rand((steps, int(self.length[i])), generator=gens[i]).argsort(1)[
                        :, : self.batch
                    ]
                    for i in torch.nonzero(self.drawn).flatten().tolist()
                ]
            )
            if bool(self.drawn.any())
            else torch.zeros((0, steps, self.batch), dtype=torch.int64)
        )

    def step(self, chunk: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Image indices (p, B) and weights (p, B) of the problems ``chunk`` at ``step``."""
        pos = torch.arange(self.batch).expand(len(chunk), -1).clone()
        drawn = self.drawn[chunk]
        if bool(drawn.any()):
            pos[drawn] = self.schedule[self.row[chunk[drawn]], step]
        weight = (pos < self.length[chunk, None]).float()
        return self.matrix[chunk].gather(1, pos), weight

    def full(self, chunk: Tensor) -> tuple[Tensor, Tensor]:
        """Every image of each problem's pool (p, L) with weights (p, L)."""
        pos = torch.arange(self.width)
        return self.matrix[chunk], (pos[None, :] < self.length[chunk, None]).float()


class _Triggers:
    """Every problem's raw parameters, kept per family (a family's problems are the rows of
    its tensors); ``row[i]`` is problem i's row in its family's tensors."""

    def __init__(self, problems: Sequence[Problem], raw: Sequence[Trigger], dev: torch.device):
        self.names = list(dict.fromkeys(p.family for p in problems))
        self.family = torch.tensor([self.names.index(p.family) for p in problems])
        self.row = torch.zeros(len(problems), dtype=torch.int64)
        self.raw: dict[str, Trigger] = {}
        for fi, name in enumerate(self.names):
            members = torch.nonzero(self.family == fi).flatten()
            self.row[members] = torch.arange(len(members))
            keys = FAMILIES[name].keys
            self.raw[name] = {
                k: torch.stack([raw[i][k] for i in members.tolist()]).to(dev) for k in keys
            }

    def of(self, name: str, among: Tensor) -> Tensor:
        """The problems of ``among`` that belong to family ``name``."""
        return among[self.family[among] == self.names.index(name)]

    def clone(self) -> dict[str, Trigger]:
        return {f: {k: t.clone() for k, t in r.items()} for f, r in self.raw.items()}


def _sizes(raw: dict[str, Trigger], tr: _Triggers, lo: float, hi: float, n: int) -> Tensor:
    """Every problem's trigger size from raw parameters ``raw`` (one dict per family): (n,)."""
    out = torch.zeros(n, dtype=torch.float64)
    everyone = torch.arange(n)
    with torch.no_grad():
        for name in tr.names:
            mine = tr.of(name, everyone)
            fam = FAMILIES[name]
            out[mine] = fam.size(fam.decode(raw[name], lo, hi)).double().cpu()
    return out


def reverse_engineer(
    model: BnaModel,
    data: Dataset,
    problems: Sequence[Problem],
    input_range: tuple[float, float],
    settings: ReverseSettings = ReverseSettings(),
    seed: int = 0,
    progress: Progress | None = None,
    forward: Forward | None = None,
    start: Sequence[TriggerEstimate | None] | None = None,
) -> list[TriggerEstimate]:
    """Solve every problem as one batch (at most ``settings.max_problems`` at a time, which
    bounds the memory the problems' parameters take, and problems of much larger pools apart,
    see :func:`_groups`); one estimate per problem, in order. ``forward`` (default f) is the
    classifier the triggers are solved against; ``start`` gives a problem an earlier estimate
    of its family to start from instead of a random draw."""
    groups = _groups(data, problems, settings)
    if len(groups) > 1:
        return _in_groups(
            model, data, problems, groups, input_range, settings, seed, progress, forward, start
        )
    lo, hi = input_range
    span = hi - lo
    n_prob = len(problems)
    if n_prob == 0:
        return []
    dev = model.device
    shape = (int(data.x.shape[1]), int(data.x.shape[2]), int(data.x.shape[3]))
    gens = [torch.Generator().manual_seed(p.seed(seed)) for p in problems]
    pools = _Pools(data, problems, settings.batch_size, settings.steps, gens)
    x_all = torch.from_numpy(data.x).to(dev)
    targets = torch.tensor([p.target for p in problems])
    away = torch.tensor([p.sources[0] if p.target == ANY else -1 for p in problems])
    run = forward or (lambda x, _which: model(x))

    # Parameters per family on ``dev``; bookkeeping ((P,) tensors) stays on the CPU.
    first = []
    for i, p in enumerate(problems):
        fam = FAMILIES[p.family]
        drawn = fam.start(gens[i], shape, span, settings.perturbation_init)
        given = None if start is None else start[i]
        if given is not None:
            warm = {k: v[0] for k, v in fam.encode(given.tensors(), lo, hi).items()}
            drawn = {k: warm[k].float() for k in fam.keys}
        first.append(drawn)
    tr = _Triggers(problems, first, dev)
    penalised = torch.tensor([FAMILIES[p.family].rule == "penalised" for p in problems])
    cap = torch.tensor([FAMILIES[p.family].max_steps(settings) for p in problems])
    moments = {
        f: {k: (torch.zeros_like(t), torch.zeros_like(t)) for k, t in tr.raw[f].items()}
        for f in tr.names
        if FAMILIES[f].rule == "penalised"
    }

    cost = torch.zeros(n_prob)  # λ = 0 until the trigger first succeeds (Neural Cleanse)
    steps = torch.zeros(n_prob, dtype=torch.int64)
    active = torch.ones(n_prob, dtype=torch.bool)
    best_size = torch.full((n_prob,), float("inf"), dtype=torch.float64)
    best = tr.clone()
    stale = torch.zeros(n_prob, dtype=torch.int64)
    up_count = torch.zeros(n_prob, dtype=torch.int64)
    down_count = torch.zeros(n_prob, dtype=torch.int64)
    grown = torch.zeros(n_prob, dtype=torch.bool)
    shrunk = torch.zeros(n_prob, dtype=torch.bool)
    hits = torch.zeros(n_prob, dtype=torch.float64)
    seen = torch.zeros(n_prob, dtype=torch.float64)
    total = settings.steps * n_prob
    per_forward = max(1, settings.images_per_forward // pools.batch)

    for step in range(settings.steps):
        idx_active = torch.nonzero(active).flatten()
        if idx_active.numel() == 0:
            break
        grads = {f: {k: torch.zeros_like(t) for k, t in r.items()} for f, r in tr.raw.items()}
        step_hit = torch.zeros(n_prob, dtype=torch.float64)
        # one family per chunk: each embeds its own way and differentiates its own parameters
        for name in tr.names:
            fam = FAMILIES[name]
            mine = tr.of(name, idx_active)
            for chunk in torch.split(mine, per_forward) if mine.numel() else ():
                rows = tr.row[chunk].to(dev)
                index, weight = pools.step(chunk, step)
                weight = weight.to(dev)
                xb = x_all[index.to(dev)]  # (p, B, C, H, W)
                sub = {k: t[rows].clone().requires_grad_(True) for k, t in tr.raw[name].items()}
                trig = fam.decode(sub, lo, hi)
                xt = fam.embed(trig, xb, lo, hi)
                with _autocast(dev, settings.precision):
                    which = chunk.repeat_interleave(pools.batch).to(dev)
                    logits = run(xt.flatten(0, 1), which).float()
                ce, hit = _goal(
                    logits,
                    targets[chunk].repeat_interleave(pools.batch).to(dev),
                    away[chunk].repeat_interleave(pools.batch).to(dev),
                )
                norm = weight.sum(1)
                loss = (ce.view(len(chunk), -1) * weight).sum(1) / norm
                if fam.rule == "penalised":
                    loss = loss + cost[chunk].to(dev) * fam.penalty(trig, settings)
                loss.sum().backward()
                for k in sub:
                    grads[name][k][rows] = sub[k].grad
                with torch.no_grad():
                    hit = hit.double().view(len(chunk), -1)
                    step_hit[chunk] = ((hit * weight.double()).sum(1) / norm.double()).cpu()
        steps[idx_active] += 1
        hits[idx_active] += step_hit[idx_active]
        seen[idx_active] += 1

        reached = step_hit >= settings.success - _TOLERANCE  # this step's params succeed
        check = (step + 1) % settings.check_every == 0
        # a sampled batch's success is confirmed on the whole pool before it counts
        stepped = torch.zeros(n_prob, dtype=torch.bool)
        stepped[idx_active] = True
        verify = torch.nonzero(reached & pools.drawn & stepped & (~penalised | check)).flatten()
        if verify.numel():
            full = _success(
                run, x_all, pools, verify, tr, tr.raw, (targets, away), input_range, settings
            )
            reached[verify] = full >= settings.success - _TOLERANCE

        # grow: stop at the first success, else one normalised step down the gradient
        for name in tr.names:
            fam = FAMILIES[name]
            if fam.rule != "grow":
                continue
            mine = tr.of(name, idx_active)
            if not mine.numel():
                continue
            raw, store = tr.raw[name], best[name]
            done, go = mine[reached[mine]], mine[~reached[mine]]
            d_rows, g_rows = tr.row[done].to(dev), tr.row[go].to(dev)
            if done.numel():
                for k in raw:
                    store[k][d_rows] = raw[k][d_rows]
                with torch.no_grad():
                    at = fam.decode({k: raw[k][d_rows] for k in raw}, lo, hi)
                    best_size[done] = fam.size(at).double().cpu()
                active[done] = False
            if not go.numel():
                continue
            g = {k: grads[name][k][g_rows] for k in raw}
            length = torch.sqrt(sum(t.flatten(1).pow(2).sum(1) for t in g.values()))
            length = length.clamp_min(1e-12)
            moved = {
                k: raw[k][g_rows]
                - fam.step_length(settings, span)
                * g[k]
                / length.view((-1,) + (1,) * (g[k].dim() - 1))
                for k in raw
            }
            moved = fam.bound(moved, shape, span)
            for k in raw:
                raw[k][g_rows] = moved[k]
            if np.isfinite(fam.limit(settings)):  # too large to be this kind of trigger
                with torch.no_grad():
                    now = fam.size(fam.decode(moved, lo, hi)).cpu()
                active[go[now > fam.limit(settings)]] = False
            if step + 1 >= fam.max_steps(settings):
                active[go] = False

        pidx = idx_active[penalised[idx_active]]
        live = torch.zeros(n_prob, dtype=torch.bool)
        live[pidx] = True
        better = torch.zeros(n_prob, dtype=torch.bool)
        if check and pidx.numel():
            # best tracking on the parameters this step evaluated (exact for a whole pool)
            size = _sizes(tr.raw, tr, lo, hi, n_prob)
            better = reached & (size < best_size * _IMPROVEMENT) & live
            best_size = torch.where(better, size, best_size)
            for name in moments:
                rows = tr.row[tr.of(name, torch.nonzero(better).flatten())].to(dev)
                for k in tr.raw[name]:
                    best[name][k][rows] = tr.raw[name][k][rows]

        # penalised: Adam, elementwise, on the active problems only
        b1, b2 = _ADAM_BETAS
        for name, mom in moments.items():
            mine = tr.of(name, pidx)
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
                tr.raw[name][k][rows] -= settings.lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)
        if check:
            # adaptive λ and early stop of penalised problems, on the success of the last window
            with torch.no_grad():
                ok = hits / seen.clamp_min(1) >= settings.success - _TOLERANCE
                first_ok = live & ok & (cost == 0)  # first success: the size penalty starts
                cost = torch.where(first_ok, settings.init_cost, cost)
                up_count = torch.where(first_ok, 0, up_count)
                down_count = torch.where(first_ok, 0, down_count)
                started = live & (cost > 0) & ~first_ok
                # patience runs only while the trigger succeeds (λ is then pushing it smaller)
                stale = torch.where(better, 0, stale + (live & ~better & ok).long())
                up_count = torch.where(started & ok, up_count + 1, 0)
                down_count = torch.where(started & ~ok, down_count + 1, 0)
                grow = started & (up_count >= settings.cost_patience)
                shrink = started & (down_count >= settings.cost_patience)
                cost = torch.where(grow, cost * settings.cost_multiplier, cost)
                cost = torch.where(shrink, cost / settings.cost_multiplier**1.5, cost)
                up_count = torch.where(grow, 0, up_count)
                down_count = torch.where(shrink, 0, down_count)
                grown |= grow
                shrunk |= shrink
                # Neural Cleanse stops only once λ has been both raised and lowered: the size
                # has met the success boundary from both sides
                finished = (
                    live
                    & torch.isfinite(best_size)
                    & (stale >= settings.patience)
                    & (steps >= settings.min_steps)
                    & grown
                    & shrunk
                )
                active &= ~finished
                active &= ~(penalised & (steps >= cap))  # the family's own cap, at a check
                hits.zero_()
                seen.zero_()
        if progress is not None:
            done_units = int(torch.where(active, steps, settings.steps).sum())
            progress(done_units, total, ~active)
    if progress is not None:
        progress(total, total, torch.ones(n_prob, dtype=torch.bool))

    # Never-successful problems keep their last trigger (their success says so).
    never = torch.nonzero(~torch.isfinite(best_size)).flatten()
    for name in tr.names:
        rows = tr.row[tr.of(name, never)].to(dev)
        for k in tr.raw[name]:
            best[name][k][rows] = tr.raw[name][k][rows]
    final_size = _sizes(best, tr, lo, hi, n_prob)
    everyone = torch.arange(n_prob)
    success = _success(
        run, x_all, pools, everyone, tr, best, (targets, away), input_range, settings
    )
    decoded = {}
    with torch.no_grad():
        for name in tr.names:
            decoded[name] = {
                k: v.cpu() for k, v in FAMILIES[name].decode(best[name], lo, hi).items()
            }
    return [
        TriggerEstimate(
            problem=prob,
            size=float(final_size[i]),
            success=float(success[i]),
            steps=int(steps[i]),
            params={k: v[int(tr.row[i])].numpy().copy() for k, v in decoded[prob.family].items()},
            shape=shape,
        )
        for i, prob in enumerate(problems)
    ]


def _groups(data: Dataset, problems: Sequence[Problem], settings: ReverseSettings) -> list[Tensor]:
    """The problems solved together, as index tensors: those whose pools fit in one batch, and
    the larger pools by size (within 2× of each other), each at most ``settings.max_problems``.
    A batch pads every problem's images to the largest pool in it: a one-class pair beside a
    pooled problem of every other class would see 32 images per step instead of its 20 and
    check its success on 180 instead of 20."""
    counts = np.bincount(data.y, minlength=1 + max((max(p.sources) for p in problems), default=0))
    length = np.array([int(counts[list(p.sources)].sum()) for p in problems])
    bucket = np.where(
        length <= settings.batch_size, -1, np.ceil(np.log2(np.maximum(length, 1)))
    ).astype(int)
    out = []
    for b in np.unique(bucket):
        members = torch.from_numpy(np.flatnonzero(bucket == b))
        out += list(torch.split(members, settings.max_problems))
    return out


def _in_groups(
    model: BnaModel,
    data: Dataset,
    problems: Sequence[Problem],
    groups: Sequence[Tensor],
    input_range: tuple[float, float],
    settings: ReverseSettings,
    seed: int,
    progress: Progress | None,
    forward: Forward | None,
    start: Sequence[TriggerEstimate | None] | None,
) -> list[TriggerEstimate]:
    """:func:`reverse_engineer` on each group of problems in turn (the same estimates: a
    problem's estimate does not depend on the others), with one progress over all of them."""
    n = len(problems)
    finished = torch.zeros(n, dtype=torch.bool)
    out: list[TriggerEstimate | None] = [None] * n
    before = 0
    for members in groups:
        part = [problems[i] for i in members.tolist()]
        report = None
        if progress is not None:

            def report(done: int, total: int, mask: Tensor, m=members, b=before) -> None:
                finished[m] = mask
                progress(b * settings.steps + done, n * settings.steps, finished.clone())

        run = None
        if forward is not None:

            def run(x: Tensor, which: Tensor, m: Tensor = members) -> Tensor:
                return forward(x, m.to(which.device)[which])

        given = None if start is None else [start[i] for i in members.tolist()]
        found = reverse_engineer(model, data, part, input_range, settings, seed, report, run, given)
        for i, e in zip(members.tolist(), found, strict=True):
            out[i] = e
        before += len(members)
    return [e for e in out if e is not None]


def _success(
    run: Forward,
    x_all: Tensor,
    pools: _Pools,
    which: Tensor,
    tr: _Triggers,
    raw: dict[str, Trigger],
    goals: tuple[Tensor, Tensor],
    input_range: tuple[float, float],
    settings: ReverseSettings,
) -> Tensor:
    """Share of the whole pool that each problem in ``which`` moves to its goal (``goals``:
    every problem's target and away class, see :func:`_goal`) with its trigger (``raw``: every
    problem's raw parameters, per family): (len(which),) float64, on the CPU."""
    out = torch.zeros(len(which), dtype=torch.float64)  # 19/20 must compare >= 0.95
    per_forward = max(1, settings.images_per_forward // pools.width)
    dev = x_all.device
    lo, hi = input_range
    targets, away = goals
    position = torch.arange(len(which))
    with torch.no_grad():
        for name in tr.names:
            fam = FAMILIES[name]
            in_family = position[tr.family[which] == tr.names.index(name)]
            for rows in torch.split(in_family, per_forward) if in_family.numel() else ():
                chunk = which[rows]
                index, weight = pools.full(chunk)
                r = tr.row[chunk].to(dev)
                trig = fam.decode({k: t[r] for k, t in raw[name].items()}, lo, hi)
                xt = fam.embed(trig, x_all[index.to(dev)], lo, hi)
                n = index.shape[1]
                with _autocast(dev, settings.precision):
                    logits = run(xt.flatten(0, 1), chunk.repeat_interleave(n).to(dev)).float()
                _, hit = _goal(
                    logits,
                    targets[chunk].repeat_interleave(n).to(dev),
                    away[chunk].repeat_interleave(n).to(dev),
                )
                weight = weight.double().to(dev)
                hit = hit.double().view(len(chunk), -1)
                out[rows] = ((hit * weight).sum(1) / weight.sum(1)).cpu()
    return out


def attack_success(
    model: BnaModel,
    x: Tensor,
    estimate: TriggerEstimate,
    target: int,
    input_range: tuple[float, float],
    batch: int = 512,
) -> float:
    """Share of images x that f sends to ``target`` with the trigger embedded."""
    hits = 0
    with torch.no_grad():
        for xb in torch.split(x, batch):
            xt = estimate.apply(xb.to(model.device), *input_range)
            hits += int((model(xt).argmax(1) == target).sum())
    return hits / max(1, x.shape[0])


def relative_size(estimate: TriggerEstimate, input_range: tuple[float, float]) -> float:
    """Trigger size as a share of the largest possible one in its family (‖m‖₁ / (H·W) for a
    patch, ‖v‖₂ / ((hi - lo)·√(C·H·W)) for a perturbation, ...): makes families comparable."""
    largest = estimate.kind.largest(estimate.shape, *input_range)
    return estimate.size / largest


def succeeds(estimate: TriggerEstimate, success: float) -> bool:
    """Whether a trigger estimate moves at least ``success`` of its source images."""
    return estimate.success >= success - _TOLERANCE


def choose_family(
    estimates: Sequence[TriggerEstimate], input_range: tuple[float, float], success: float
) -> TriggerEstimate:
    """Rule for ``--trigger-type both`` with known targets: among the estimates whose trigger
    succeeds (≥ ``success`` of the source images), the one with the smallest relative size;
    when none succeeds, the one with the highest success."""
    ok = [e for e in estimates if succeeds(e, success)]
    if ok:
        return min(ok, key=lambda e: relative_size(e, input_range))
    return max(estimates, key=lambda e: e.success)
