"""The trigger estimates of one fit: the pair sweep and the per-target estimates, each
with its solver settings and its progress in pairs, and the Θ fit's refresh of the triggers
against the current g_t."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import Dataset
from .distributed import Shard, solve
from .fit import Refresh
from .norm import BnaModel
from .problems import OWN
from .reverse import Problem, TriggerEstimate, reverse_engineer
from .settings import Settings
from .sweep import SweepResult, run_sweep

StageProgress = Callable[[str, int, int, str], None]
"""progress(stage, done, total, note); stages: 'screen' (one untargeted problem per source, many
classes only), 'sweep' (class pairs), 'universal' (the universal triggers started from the best
pairs), 'reverse' (per target), 'fit' (Θ); ``note`` says what is done in words (e.g. '37/90
pairs')."""


def pairs_progress(
    problems: Sequence[Problem], progress: StageProgress | None, shard: Shard, stage: str
) -> Callable[[int, int, torch.Tensor], None] | None:
    """Turn the solver's per-problem progress into 'pairs done' (of this rank's problems'
    source-target pairs; in the sweep, pooled targets and the universal trigger counted apart)
    for the stage's bar."""
    if progress is None:
        return None
    mine = shard.mine(len(problems))
    keys = sorted({(problems[i].sources, problems[i].target) for i in mine})
    slot = {k: j for j, k in enumerate(keys)}
    pair_of = torch.tensor([slot[(problems[i].sources, problems[i].target)] for i in mine])
    index = torch.tensor(mine, dtype=torch.int64)
    what = "pairs" if stage == "sweep" else "problems"
    universal = torch.tensor([k[1] == OWN for k in keys], dtype=torch.bool)
    pooled = torch.tensor([stage == "sweep" and len(k[0]) > 1 for k in keys], dtype=torch.bool)
    pooled &= ~universal
    single = ~pooled & ~universal
    n_pooled, n_universal = int(pooled.sum()), int(universal.sum())

    def report(done: int, total: int, finished: torch.Tensor) -> None:
        left = torch.zeros(len(keys)).index_add_(0, pair_of, (~finished[index]).float())
        ready = left == 0
        parts = []
        if single.any():
            parts.append(f"{int((ready & single).sum())}/{int(single.sum())} {what}")
        if n_pooled:
            parts.append(f"{int((ready & pooled).sum())}/{n_pooled} pooled targets")
        if n_universal:
            parts.append("universal " + ("done" if bool(ready[universal].all()) else "running"))
        progress(stage, done, total, ", ".join(parts))

    return report


@dataclass
class Job:
    """What every reverse-engineering call of one fit shares."""

    model: BnaModel
    data: Dataset
    families: list[str]
    input_range: tuple[float, float]
    settings: Settings
    shard: Shard
    progress: StageProgress | None

    def solve(
        self,
        problems: Sequence[Problem],
        progress: Callable[[int, int, torch.Tensor], None] | None,
        sweep: bool = False,
        start: Sequence[TriggerEstimate] | None = None,
    ) -> list[TriggerEstimate]:
        """Estimates of ``problems`` with the sweep's solver settings (``sweep``) or the
        per-target ones (``start``: an estimate per problem to start from)."""
        s = self.settings
        return solve(
            self.model,
            self.data,
            problems,
            self.input_range,
            s.sweep if sweep else s.reverse,
            s.seed,
            self.shard,
            progress,
            start,
        )

    def per_target(
        self, sources: dict[int, list[int]], known: dict[Problem, TriggerEstimate]
    ) -> list[TriggerEstimate]:
        """Every family and restart of each target on its pooled sources; a problem that the
        sweep already solved (a target with one source) is not solved again."""
        problems = [
            Problem(f, t, tuple(v), r)
            for t, v in sources.items()
            for f in self.families
            for r in range(self.settings.reverse.restarts)
        ]
        todo = [p for p in problems if p not in known]
        report = self.progress
        fresh = self.solve(
            todo, None if report is None else (lambda d, n, _f: report("reverse", d, n, ""))
        )
        found = {**known, **dict(zip(todo, fresh, strict=True))}
        return [found[p] for p in problems]


ROUND = 1000
"""A refreshed problem's restart number: its round times this plus the restart it came from,
so every round draws its own minibatches."""


def refresher(job: Job, sources: dict[int, list[int]]) -> Refresh:
    """The Θ fit's refresh (``fit.refresh_every``): each target's latest triggers, re-solved
    against g_t (the current Θ) from where they are, with the ``refresh`` solver; those that
    still send ``fit.refresh_success`` of the pooled sources to t, and moved, are returned."""
    s = job.settings
    latest: dict[int, list[TriggerEstimate]] = {}

    def refresh(targets, thetas, triggers, round_):
        base = {t: latest.get(t, list(triggers[t])) for t in targets}
        problems, start, route = [], [], []
        for i, t in enumerate(targets):
            for e in base[t]:
                r = round_ * ROUND + e.problem.restart % ROUND
                # a shared group's universal trigger stays universal on its own sources
                own = e.problem.target == OWN
                srcs = e.problem.sources if own else tuple(sources[t])
                problems.append(Problem(e.family, OWN if own else t, srcs, r))
                start.append(e)
                route.append(i)
        index = torch.tensor(route, device=job.model.device)

        def g(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
            with job.model.mitigated(thetas, index[which]):
                return job.model(x)

        found = reverse_engineer(
            job.model, job.data, problems, job.input_range, s.refresh, s.seed, forward=g,
            start=start,
        )  # fmt: skip
        out: dict[int, list[TriggerEstimate]] = {}
        growth = s.fit.refresh_growth or float("inf")
        for i, t in enumerate(targets):
            pairs = [(e, b) for e, b, j in zip(found, start, route, strict=True) if j == i]
            latest[t] = [e for e, _ in pairs]
            out[t] = [
                e
                for e, b in pairs
                if e.success >= s.fit.refresh_success - 1e-9
                and e.size <= growth * b.size
                and not all(np.array_equal(e.params[k], b.params[k]) for k in e.params)
            ]
        return out

    return refresh


def find_backdoors(job: Job, n_classes: int, families: list[str]) -> SweepResult:
    """The pair sweep (or its screen) and the detection, before the intrinsic check."""

    def solve(
        problems: Sequence[Problem], stage: str, start: Sequence[TriggerEstimate] | None = None
    ) -> list[TriggerEstimate]:
        report = pairs_progress(problems, job.progress, job.shard, stage)
        return job.solve(problems, report, sweep=True, start=start)

    return run_sweep(job.model, job.data, n_classes, families, job.input_range, job.settings, solve)
