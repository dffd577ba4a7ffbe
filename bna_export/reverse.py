"""Trigger reverse-engineering, solved as one batch of problems that share the model.

A problem is (family, target t, source classes S, restart): find the smallest trigger sending
clean images of S to t; with t = :data:`ANY` (an untargeted problem, one source s), to any class
but s. Families:

- ``patch`` (Neural Cleanse, Wang et al. 2019): x' = (1 - m)·x + m·p, size ‖m‖₁. Adam on
  CE(f(x'), t) + λ·‖m‖₁ with Neural Cleanse's adaptive λ; a problem stops early once its trigger
  succeeds and stops shrinking.
- ``perturbation`` (Xiang et al. 2020): x' = clip(x + v, lo, hi), size ‖v‖₂. Starting near 0,
  v takes normalised steps down the gradient of CE(f(x'), t) and stops the first time the
  trigger succeeds: the size is that of the shortest path to success, so it needs no λ.

Each step runs every active problem's triggered images through f at once (chunked to bound
memory) and updates each problem from its own gradient. Every random choice of a problem (its
initialisation, its minibatches) comes from a generator seeded by the problem itself, and f's
answer on an image does not depend on the other images of the batch, so a problem's estimate is
the same whichever problems it is solved with: solving all pairs in one process or sharded over
several gives the same estimates.
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
from .model import BnaModel
from .settings import ReverseSettings

FAMILIES = ("patch", "perturbation")
ANY = -1
"""The target of an untargeted problem: any class but its (single) source."""
Progress = Callable[[int, int, Tensor], None]
"""progress(done, total, finished): problem-steps done (a finished problem counts all its
steps), the most there can be, and a [P] bool mask of the problems that have finished."""

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
    """A reverse-engineered trigger. patch: ``mask`` [H, W], ``pattern`` [C, H, W];
    perturbation: ``pattern`` is the additive v [C, H, W] and ``mask`` is None."""

    problem: Problem
    size: float
    success: float
    steps: int
    mask: np.ndarray | None
    pattern: np.ndarray

    @property
    def family(self) -> str:
        return self.problem.family

    def apply(self, x: Tensor, lo: float, hi: float, scale: float = 1.0) -> Tensor:
        """Embed the trigger in x: [N, C, H, W]; ``scale`` multiplies the mask (clipped to
        [0, 1]) or the perturbation, to make a weaker or stronger version of it."""
        pattern = torch.as_tensor(self.pattern, dtype=x.dtype, device=x.device)
        if self.mask is not None:
            m = torch.as_tensor(self.mask, dtype=x.dtype, device=x.device)
            m = torch.clamp(m * scale, 0, 1)
            return (1 - m) * x + m * pattern
        return torch.clamp(x + scale * pattern, lo, hi)


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


def _embed(
    x: Tensor, mask: Tensor, pattern: Tensor, v: Tensor, is_patch: Tensor, lo: float, hi: float
) -> Tensor:
    """x: (P, B, C, H, W); mask (P, 1, 1, H, W); pattern, v (P, 1, C, H, W); is_patch (P,)."""
    patched = (1 - mask) * x + mask * pattern
    shifted = torch.clamp(x + v, lo, hi)
    return torch.where(is_patch.view(-1, 1, 1, 1, 1), patched, shifted)


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


def reverse_engineer(
    model: BnaModel,
    data: Dataset,
    problems: Sequence[Problem],
    input_range: tuple[float, float],
    settings: ReverseSettings = ReverseSettings(),
    seed: int = 0,
    progress: Progress | None = None,
) -> list[TriggerEstimate]:
    """Solve every problem as one batch (at most ``settings.max_problems`` at a time, which
    bounds the memory the problems' parameters take); one estimate per problem, in order."""
    if len(problems) > settings.max_problems:
        return _in_groups(model, data, problems, input_range, settings, seed, progress)
    lo, hi = input_range
    n_prob = len(problems)
    if n_prob == 0:
        return []
    dev = model.device
    c, h, w = data.x.shape[1:]
    gens = [torch.Generator().manual_seed(p.seed(seed)) for p in problems]
    pools = _Pools(data, problems, settings.batch_size, settings.steps, gens)
    x_all = torch.from_numpy(data.x).to(dev)
    targets = torch.tensor([p.target for p in problems])
    away = torch.tensor([p.sources[0] if p.target == ANY else -1 for p in problems])
    is_patch = torch.tensor([p.family == "patch" for p in problems])

    # Parameters: m = (tanh + 1)/2 and pattern in [lo, hi] by tanh; v raw, in ±(hi - lo).
    # Bookkeeping ((P,) tensors) stays on the CPU; images and parameters live on ``dev``.
    params = {
        "mask": torch.stack([torch.randn((1, 1, h, w), generator=g) for g in gens]) * 0.1 - 2.0,
        "pattern": torch.stack([torch.randn((1, c, h, w), generator=g) for g in gens]) * 0.1,
        "v": torch.stack([torch.randn((1, c, h, w), generator=g) for g in gens])
        * settings.perturbation_init
        * (hi - lo),
    }
    params = {k: t.to(dev) for k, t in params.items()}
    adam = ("mask", "pattern")
    moments = {k: (torch.zeros_like(params[k]), torch.zeros_like(params[k])) for k in adam}

    def decode(pr: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        mask = (torch.tanh(pr["mask"]) + 1) / 2
        pattern = lo + (hi - lo) * (torch.tanh(pr["pattern"]) + 1) / 2
        return mask, pattern, pr["v"]

    def sizes(mask: Tensor, v: Tensor, patch: Tensor) -> Tensor:
        """‖m‖₁ for patch problems, ‖v‖₂ for perturbation problems: (p,), on the CPU."""
        l1, l2 = mask.flatten(1).sum(1).cpu(), v.flatten(1).norm(dim=1).cpu()
        return torch.where(patch, l1, l2)

    cost = torch.zeros(n_prob)  # λ = 0 until the trigger first succeeds (Neural Cleanse)
    steps = torch.zeros(n_prob, dtype=torch.int64)
    active = torch.ones(n_prob, dtype=torch.bool)
    best_size = torch.full((n_prob,), float("inf"))
    best = {k: t.clone() for k, t in params.items()}
    stale = torch.zeros(n_prob, dtype=torch.int64)
    up_count = torch.zeros(n_prob, dtype=torch.int64)
    down_count = torch.zeros(n_prob, dtype=torch.int64)
    grown = torch.zeros(n_prob, dtype=torch.bool)
    shrunk = torch.zeros(n_prob, dtype=torch.bool)
    hits = torch.zeros(n_prob, dtype=torch.float64)
    seen = torch.zeros(n_prob, dtype=torch.float64)
    total = settings.steps * n_prob
    per_forward = max(1, settings.images_per_forward // pools.batch)
    step_size = settings.perturbation_step * (hi - lo)

    for step in range(settings.steps):
        idx_active = torch.nonzero(active).flatten()
        if idx_active.numel() == 0:
            break
        grads = {k: torch.zeros_like(t) for k, t in params.items()}
        step_hit = torch.zeros(n_prob, dtype=torch.float64)
        # one family per chunk: each embeds its own way and differentiates its own parameters
        for patch in (True, False):
            keys = adam if patch else ("v",)
            mine = idx_active[is_patch[idx_active] == patch]
            for chunk in torch.split(mine, per_forward) if mine.numel() else ():
                index, weight = pools.step(chunk, step)
                weight = weight.to(dev)
                xb = x_all[index.to(dev)]  # (p, B, C, H, W)
                sub = {k: params[k][chunk].clone().requires_grad_(True) for k in keys}
                if patch:
                    mask = (torch.tanh(sub["mask"]) + 1) / 2  # (p, 1, 1, H, W)
                    pattern = lo + (hi - lo) * (torch.tanh(sub["pattern"]) + 1) / 2
                    xt = (1 - mask) * xb + mask * pattern
                    penalty = cost[chunk].to(dev) * mask.flatten(1).sum(1)
                else:
                    xt = torch.clamp(xb + sub["v"], lo, hi)
                    penalty = torch.zeros(len(chunk), device=dev)
                with _autocast(dev, settings.precision):
                    logits = model(xt.flatten(0, 1)).float()
                ce, hit = _goal(
                    logits,
                    targets[chunk].repeat_interleave(pools.batch).to(dev),
                    away[chunk].repeat_interleave(pools.batch).to(dev),
                )
                norm = weight.sum(1)
                loss_ce = (ce.view(len(chunk), -1) * weight).sum(1) / norm
                (loss_ce + penalty).sum().backward()
                for k in keys:
                    grads[k][chunk] = sub[k].grad
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
        verify = torch.nonzero(reached & pools.drawn & stepped & (~is_patch | check)).flatten()
        if verify.numel():
            with torch.no_grad():
                mask, pattern, v = decode(params)
                full = _success(
                    model,
                    x_all,
                    pools,
                    verify,
                    mask,
                    pattern,
                    v,
                    is_patch,
                    (targets, away),
                    (lo, hi),
                    settings,
                )
            reached[verify] = full >= settings.success - _TOLERANCE

        # perturbation: stop at the first success, else one normalised step down the gradient
        pert = idx_active[~is_patch[idx_active]]
        if pert.numel():
            done = pert[reached[pert]]
            best["v"][done] = params["v"][done]
            best_size[done] = params["v"][done].flatten(1).norm(dim=1).cpu()
            active[done] = False
            go = pert[~reached[pert]]
            g = grads["v"][go]
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1, 1)
            params["v"][go] = torch.clamp(params["v"][go] - step_size * g, lo - hi, hi - lo)

        pidx = idx_active[is_patch[idx_active]]
        live = torch.zeros(n_prob, dtype=torch.bool)
        live[pidx] = True
        if check:
            # best tracking on the parameters this step evaluated (exact for a whole pool)
            with torch.no_grad():
                mask, _, v = decode(params)
                size = sizes(mask, v, is_patch)
                better = reached & (size < best_size * _IMPROVEMENT) & live
                best_size = torch.where(better, size, best_size)
                for k in adam:
                    best[k][better] = params[k][better]

        # patch: Adam, elementwise, on the active patch problems only
        if pidx.numel():
            b1, b2 = _ADAM_BETAS
            t = steps[pidx].float().to(dev)
            for k in adam:
                m1, m2 = moments[k]
                g = grads[k][pidx]
                m1[pidx] = b1 * m1[pidx] + (1 - b1) * g
                m2[pidx] = b2 * m2[pidx] + (1 - b2) * g * g
                shape = (-1,) + (1,) * (g.dim() - 1)
                m_hat = m1[pidx] / (1 - b1**t).view(shape)
                v_hat = m2[pidx] / (1 - b2**t).view(shape)
                params[k][pidx] -= settings.lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)
        if check:
            # adaptive λ and early stop of patch problems, on the success of the last window
            with torch.no_grad():
                ok = hits / seen.clamp_min(1) >= settings.success - _TOLERANCE
                first = live & ok & (cost == 0)  # first success: the size penalty starts
                cost = torch.where(first, settings.init_cost, cost)
                up_count = torch.where(first, 0, up_count)
                down_count = torch.where(first, 0, down_count)
                started = live & (cost > 0) & ~first
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
                hits.zero_()
                seen.zero_()
        if progress is not None:
            done_units = int(torch.where(active, steps, settings.steps).sum())
            progress(done_units, total, ~active)
    if progress is not None:
        progress(total, total, torch.ones(n_prob, dtype=torch.bool))

    # Never-successful problems keep their last trigger (their success says so).
    never = ~torch.isfinite(best_size)
    for k in params:
        best[k][never] = params[k][never]
    mask, pattern, v = decode(best)
    final_size = sizes(mask, v, is_patch)
    everyone = torch.arange(n_prob)
    success = _success(
        model,
        x_all,
        pools,
        everyone,
        mask,
        pattern,
        v,
        is_patch,
        (targets, away),
        (lo, hi),
        settings,
    )
    mask, pattern, v = mask.cpu(), pattern.cpu(), v.cpu()
    return [
        TriggerEstimate(
            problem=prob,
            size=float(final_size[i]),
            success=float(success[i]),
            steps=int(steps[i]),
            mask=mask[i, 0, 0].numpy().copy() if prob.family == "patch" else None,
            pattern=(pattern[i, 0] if prob.family == "patch" else v[i, 0]).numpy().copy(),
        )
        for i, prob in enumerate(problems)
    ]


def _in_groups(
    model: BnaModel,
    data: Dataset,
    problems: Sequence[Problem],
    input_range: tuple[float, float],
    settings: ReverseSettings,
    seed: int,
    progress: Progress | None,
) -> list[TriggerEstimate]:
    """:func:`reverse_engineer` on consecutive groups of ``settings.max_problems`` problems
    (the same estimates: a problem's estimate does not depend on the others), with one
    progress over all of them."""
    size, n = settings.max_problems, len(problems)
    finished = torch.zeros(n, dtype=torch.bool)
    out: list[TriggerEstimate] = []
    for start in range(0, n, size):
        part = problems[start : start + size]
        report = None
        if progress is not None:

            def report(done: int, total: int, mask: Tensor, at: int = start) -> None:
                finished[at : at + len(mask)] = mask
                progress(at * settings.steps + done, n * settings.steps, finished.clone())

        out += reverse_engineer(model, data, part, input_range, settings, seed, report)
    return out


def _success(
    model: BnaModel,
    x_all: Tensor,
    pools: _Pools,
    which: Tensor,
    mask: Tensor,
    pattern: Tensor,
    v: Tensor,
    is_patch: Tensor,
    goals: tuple[Tensor, Tensor],
    input_range: tuple[float, float],
    settings: ReverseSettings,
) -> Tensor:
    """Share of the whole pool that each problem in ``which`` moves to its goal (``goals``:
    every problem's target and away class, see :func:`_goal`) with its trigger (mask,
    pattern, v: every problem's, (P, ...)): (len(which),) float64, on the CPU."""
    out = torch.zeros(len(which), dtype=torch.float64)  # 19/20 must compare >= 0.95
    per_forward = max(1, settings.images_per_forward // pools.width)
    dev = x_all.device
    targets, away = goals
    with torch.no_grad():
        for rows in torch.split(torch.arange(len(which)), per_forward):
            chunk = which[rows]
            index, weight = pools.full(chunk)
            dc = chunk.to(dev)
            xt = _embed(
                x_all[index.to(dev)],
                mask[dc],
                pattern[dc],
                v[dc],
                is_patch[chunk].to(dev),
                *input_range,
            )
            with _autocast(dev, settings.precision):
                logits = model(xt.flatten(0, 1)).float()
            n = index.shape[1]
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
    """Trigger size as a share of the largest possible one in its family: ‖m‖₁ / (H·W) for a
    patch, ‖v‖₂ / ((hi - lo)·√(C·H·W)) for a perturbation. Makes the families comparable."""
    c, h, w = estimate.pattern.shape
    if estimate.family == "patch":
        return estimate.size / (h * w)
    return estimate.size / ((input_range[1] - input_range[0]) * float(np.sqrt(c * h * w)))


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
