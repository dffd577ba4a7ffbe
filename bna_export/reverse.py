"""Trigger reverse-engineering, solved as one batch of problems that share the model.

A problem is (family, target t, source classes S): find the smallest trigger sending clean images
of S to t. Families: ``patch`` (Neural Cleanse: x' = (1 - m)·x + m·p, size = ‖m‖₁) and
``perturbation`` (Xiang et al. 2020: x' = clip(x + v), size = ‖v‖₂). Each step draws a minibatch
per problem, runs all problems' triggered images through f at once and takes one Adam step per
problem on CE(f(x'), t) + λ·size, with Neural Cleanse's adaptive λ. A problem stops early once its
trigger succeeds and its size stops shrinking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .model import BnaModel
from .settings import ReverseSettings

FAMILIES = ("patch", "perturbation")
Progress = Callable[[int, int], None]
"""progress(done, total) callback; the CLI turns it into a progress bar."""

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_IMPROVEMENT = 0.99  # a new best must be 1% smaller to reset the early-stop patience


@dataclass(frozen=True)
class Problem:
    """One reverse-engineering problem: reach ``target`` from the images of ``sources``."""

    family: str
    target: int
    sources: tuple[int, ...]
    restart: int = 0


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


def _embed(
    x: Tensor, mask: Tensor, pattern: Tensor, v: Tensor, is_patch: Tensor, lo: float, hi: float
) -> Tensor:
    """x: (P, B, C, H, W); mask (P, 1, 1, H, W); pattern, v (P, 1, C, H, W); is_patch (P,)."""
    patched = (1 - mask) * x + mask * pattern
    shifted = torch.clamp(x + v, lo, hi)
    return torch.where(is_patch.view(-1, 1, 1, 1, 1), patched, shifted)


def _draw(pool_mat: Tensor, pool_len: Tensor, b: int, gen: torch.Generator) -> Tensor:
    """b image indices per row of pool_mat (P, L) holding pool_len (P,) valid entries: without
    replacement (a random permutation's first b), cycling through it when a pool is smaller."""
    keys = torch.rand(pool_mat.shape, generator=gen)
    keys[torch.arange(pool_mat.shape[1])[None, :] >= pool_len[:, None]] = 2.0  # padding last
    perm = keys.argsort(1)  # (P, L)
    cols = torch.arange(b)[None, :] % pool_len[:, None]  # (P, B)
    return pool_mat.gather(1, perm.gather(1, cols))


def reverse_engineer(
    model: BnaModel,
    data: Dataset,
    problems: Sequence[Problem],
    input_range: tuple[float, float],
    settings: ReverseSettings = ReverseSettings(),
    seed: int = 0,
    progress: Progress | None = None,
    max_images_per_forward: int = 4096,
) -> list[TriggerEstimate]:
    """Solve every problem as one batch; returns one estimate per problem, in order."""
    lo, hi = input_range
    n_prob = len(problems)
    if n_prob == 0:
        return []
    c, h, w = data.x.shape[1:]
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(data.x)
    pools = [data.of_classes(list(p.sources)) for p in problems]
    if any(pool.size == 0 for pool in pools):
        empty = next(p for p, pool in zip(problems, pools, strict=True) if pool.size == 0)
        raise ValueError(f"no clean images of source classes {empty.sources}")
    width = max(pool.size for pool in pools)
    pool_mat = torch.zeros((n_prob, width), dtype=torch.int64)  # (P, L) padded image indices
    pool_len = torch.tensor([pool.size for pool in pools])
    for i, pool in enumerate(pools):  # once, at set-up
        pool_mat[i, : pool.size] = torch.from_numpy(pool)
    targets = torch.tensor([p.target for p in problems])
    is_patch = torch.tensor([p.family == "patch" for p in problems])

    # Parameters: m = (tanh + 1)/2 and pattern in [lo, hi] by tanh; v raw, clamped to ±(hi - lo).
    params = {
        "mask": torch.randn((n_prob, 1, 1, h, w), generator=gen) * 0.1 - 2.0,
        "pattern": torch.randn((n_prob, 1, c, h, w), generator=gen) * 0.1,
        "v": torch.randn((n_prob, 1, c, h, w), generator=gen) * 0.001 * (hi - lo),
    }
    moments = {k: (torch.zeros_like(t), torch.zeros_like(t)) for k, t in params.items()}

    def decode(pr: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        mask = (torch.tanh(pr["mask"]) + 1) / 2
        pattern = lo + (hi - lo) * (torch.tanh(pr["pattern"]) + 1) / 2
        v = pr["v"]  # raw: a tanh would saturate and freeze v at ±(hi - lo)
        return mask, pattern, v

    def sizes(mask: Tensor, v: Tensor, patch: Tensor) -> Tensor:
        """‖m‖₁ for patch problems, ‖v‖₂ for perturbation problems: (p,)."""
        return torch.where(patch, mask.flatten(1).sum(1), v.flatten(1).norm(dim=1))

    cost = torch.where(is_patch, settings.init_cost, settings.init_cost_perturbation)
    steps = torch.zeros(n_prob, dtype=torch.int64)
    active = torch.ones(n_prob, dtype=torch.bool)
    best_size = torch.full((n_prob,), float("inf"))
    best = {k: t.clone() for k, t in params.items()}
    stale = torch.zeros(n_prob, dtype=torch.int64)
    up_count = torch.zeros(n_prob, dtype=torch.int64)
    down_count = torch.zeros(n_prob, dtype=torch.int64)
    hits = torch.zeros(n_prob)
    seen = torch.zeros(n_prob)
    b = settings.batch_size
    total = settings.steps * n_prob
    done = 0
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    per_forward = max(1, max_images_per_forward // b)

    for step in range(settings.steps):
        idx_active = torch.nonzero(active).flatten()
        if idx_active.numel() == 0:
            break
        grads = {k: torch.zeros_like(t) for k, t in params.items()}
        for chunk in torch.split(idx_active, per_forward):
            xb = x_all[_draw(pool_mat[chunk], pool_len[chunk], b, gen)]  # (p, B, C, H, W)
            sub = {k: params[k][chunk].clone().requires_grad_(True) for k in params}
            mask, pattern, v = decode(sub)
            xt = _embed(xb, mask, pattern, v, is_patch[chunk], lo, hi)
            logits = model(xt.flatten(0, 1))
            tgt = targets[chunk].repeat_interleave(b)
            loss_ce = ce(logits, tgt).view(len(chunk), b).mean(1)
            size = sizes(mask, v, is_patch[chunk])
            (loss_ce + cost[chunk] * size).sum().backward()
            for k in params:
                grads[k][chunk] = sub[k].grad
            with torch.no_grad():
                hit = (logits.argmax(1) == tgt).float().view(len(chunk), b).mean(1)
            hits[chunk] += hit
            seen[chunk] += 1
        # Adam, elementwise, on the active problems only.
        steps[idx_active] += 1
        b1, b2 = _ADAM_BETAS
        t = steps[idx_active].float()
        for k in params:
            m1, m2 = moments[k]
            g = grads[k][idx_active]
            m1[idx_active] = b1 * m1[idx_active] + (1 - b1) * g
            m2[idx_active] = b2 * m2[idx_active] + (1 - b2) * g * g
            shape = (-1,) + (1,) * (g.dim() - 1)
            m_hat = m1[idx_active] / (1 - b1**t).view(shape)
            v_hat = m2[idx_active] / (1 - b2**t).view(shape)
            lr = settings.perturbation_lr * (hi - lo) if k == "v" else settings.lr
            params[k][idx_active] -= lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)
        params["v"].clamp_(-(hi - lo), hi - lo)
        done += idx_active.numel()
        if progress is not None:
            progress(done, total)
        if (step + 1) % settings.check_every:
            continue
        # Success check, adaptive λ, best tracking and early stop (per problem).
        with torch.no_grad():
            rate = hits / seen.clamp_min(1)
            ok = rate >= settings.success
            mask, _, v = decode(params)
            size = sizes(mask, v, is_patch)
            better = ok & (size < best_size * _IMPROVEMENT) & active
            worse = active & ~better
            best_size = torch.where(better, size, best_size)
            for k in params:
                best[k][better] = params[k][better]
            # patience runs only while the trigger succeeds (λ is then pushing it smaller)
            stale = torch.where(better, 0, stale + (worse & ok).long())
            up_count = torch.where(ok, up_count + 1, 0)
            down_count = torch.where(ok, 0, down_count + 1)
            grow = active & (up_count >= settings.cost_patience)
            shrink = active & (down_count >= settings.cost_patience)
            cost = torch.where(grow, cost * settings.cost_multiplier, cost)
            cost = torch.where(shrink, cost / settings.cost_multiplier**1.5, cost)
            up_count = torch.where(grow, 0, up_count)
            down_count = torch.where(shrink, 0, down_count)
            finished = (
                active
                & torch.isfinite(best_size)
                & (stale >= settings.patience)
                & (steps >= settings.min_steps)
            )
            active &= ~finished
            hits.zero_()
            seen.zero_()
    if progress is not None:
        progress(total, total)

    # Never-successful problems keep their last trigger (their success says so).
    never = ~torch.isfinite(best_size)
    for k in params:
        best[k][never] = params[k][never]
    mask, pattern, v = decode(best)
    final_size = sizes(mask, v, is_patch)
    estimates = []
    with torch.no_grad():
        for i, prob in enumerate(problems):
            est = TriggerEstimate(
                problem=prob,
                size=float(final_size[i]),
                success=0.0,
                steps=int(steps[i]),
                mask=mask[i, 0, 0].numpy().copy() if prob.family == "patch" else None,
                pattern=(pattern[i, 0] if prob.family == "patch" else v[i, 0]).numpy().copy(),
            )
            est.success = attack_success(model, x_all[pools[i]], est, prob.target, (lo, hi))
            estimates.append(est)
    return estimates


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
            xt = estimate.apply(xb, *input_range)
            hits += int((model(xt).argmax(1) == target).sum())
    return hits / max(1, x.shape[0])


def relative_size(estimate: TriggerEstimate, input_range: tuple[float, float]) -> float:
    """Trigger size as a share of the largest possible one in its family: ‖m‖₁ / (H·W) for a
    patch, ‖v‖₂ / ((hi - lo)·√(C·H·W)) for a perturbation. Makes the families comparable."""
    c, h, w = estimate.pattern.shape
    if estimate.family == "patch":
        return estimate.size / (h * w)
    return estimate.size / ((input_range[1] - input_range[0]) * float(np.sqrt(c * h * w)))


def choose_family(
    estimates: Sequence[TriggerEstimate], input_range: tuple[float, float], success: float
) -> TriggerEstimate:
    """Rule for ``--trigger-type both`` with known targets: among the estimates whose trigger
    succeeds (≥ ``success`` of the source images), the one with the smallest relative size;
    when none succeeds, the one with the highest success."""
    ok = [e for e in estimates if e.success >= success]
    if ok:
        return min(ok, key=lambda e: relative_size(e, input_range))
    return max(estimates, key=lambda e: e.success)
