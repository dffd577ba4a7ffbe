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

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .norm import BnaModel
from .problems import ANY, TOLERANCE, Forward, Problem, TriggerEstimate
from .settings import ReverseSettings
from .solver import Adam, Batch, CostSchedule

__all__ = [
    "ANY",
    "Forward",
    "Problem",
    "Progress",
    "TriggerEstimate",
    "attack_success",
    "choose_family",
    "relative_size",
    "reverse_engineer",
    "succeeds",
]

Progress = Callable[[int, int, Tensor], None]
"""progress(done, total, finished): problem-steps done (a finished problem counts all its
steps), the most there can be, and a [P] bool mask of the problems that have finished."""


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
    n_prob = len(problems)
    if n_prob == 0:
        return []
    batch = Batch(model, data, problems, input_range, settings, seed, forward, start)
    schedule = CostSchedule(n_prob, settings)
    adam = Adam(batch.tr)
    steps = torch.zeros(n_prob, dtype=torch.int64)
    active = torch.ones(n_prob, dtype=torch.bool)
    total = settings.steps * n_prob

    for step in range(settings.steps):
        idx_active = torch.nonzero(active).flatten()
        if idx_active.numel() == 0:
            break
        grads, step_hit = batch.gradients(step, idx_active, schedule.cost)
        steps[idx_active] += 1
        schedule.record(idx_active, step_hit)

        reached = step_hit >= settings.success - TOLERANCE  # this step's params succeed
        check = (step + 1) % settings.check_every == 0
        # a sampled batch's success is confirmed on the whole pool before it counts
        stepped = torch.zeros(n_prob, dtype=torch.bool)
        stepped[idx_active] = True
        pools, penalised = batch.pools, batch.penalised
        verify = torch.nonzero(reached & pools.drawn & stepped & (~penalised | check)).flatten()
        if verify.numel():
            full = batch.success(verify, batch.tr.raw)
            reached[verify] = full >= settings.success - TOLERANCE

        batch.grow(active, idx_active, reached, grads, step)

        pidx = idx_active[penalised[idx_active]]
        live = torch.zeros(n_prob, dtype=torch.bool)
        live[pidx] = True
        better = torch.zeros(n_prob, dtype=torch.bool)
        if check and pidx.numel():
            better = batch.keep_best(reached, live)
        adam.step(pidx, steps, grads, settings.lr, batch.dev)
        if check:
            active &= ~schedule.check(live, better, batch.best_size, steps)
            active &= ~(penalised & (steps >= batch.cap))  # the family's own cap, at a check
        if progress is not None:
            done_units = int(torch.where(active, steps, settings.steps).sum())
            progress(done_units, total, ~active)
    if progress is not None:
        progress(total, total, torch.ones(n_prob, dtype=torch.bool))
    return batch.estimates(steps)


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
    return estimate.success >= success - TOLERANCE


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
