"""How small is a patch backdoor's own trigger by the sweep's measure? The patch solver started
from the real trigger (its mask and pattern) shrinks it to the smallest part that still sends
95 % of the images to the target; set against the sizes the sweep finds from random starts for
every target (the natural triggers), this says whether any trigger-size rule can see the
backdoor: when the real trigger, shrunk, is no smaller than the natural ones, none can.

Per case: every target's pooled size and median pair size from random starts (the sweep's
solver, patch family), then the true target's from the real trigger, with the share of the
mask that stays on the real patch.

Run: ``python benchmarks/true_start.py --cases patch5-t2,patch5-t4`` (the patch cases of
``benchmarks/unseen.py``) or ``--cases cnn:0`` (the panel's patch row of that architecture and
seed). About a minute a case on 2 CPU cores (the CNN).
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import panel
import torch
import unseen

from bna_export.distributed import Shard
from bna_export.estimates import Job
from bna_export.lab.scenario import Scenario
from bna_export.model import adapt_module
from bna_export.problems import Problem, TriggerEstimate
from bna_export.settings import Settings
from bna_export.sweep import pair_problems, pooled_problems, pooled_sizes, size_matrices


def scenario(case: str) -> tuple[Scenario, int]:
    """The case's model and data, and its all-to-one target."""
    if case in unseen.CASES:
        attack, target, _, _ = unseen.CASES[case]
        if attack != "patch":
            raise SystemExit(f"{case} is not a patch case")
        return unseen.case_scenario(case), target
    arch, seed = case.split(":")
    return panel.panel_scenario(arch, "patch", int(seed)), panel.TARGET


def real_start(sc: Scenario, problem: Problem) -> TriggerEstimate:
    """The real patch as a patch-family estimate of ``problem`` (the pattern elsewhere is the
    middle of the range; the mask, 0 there, leaves it out)."""
    trig = sc.trigger
    (i, j), k = trig.location, trig.size
    c, h, w = trig.shape
    mask = np.zeros((1, h, w), np.float32)
    mask[:, i : i + k, j : j + k] = 0.999
    pattern = np.full((c, h, w), (trig.lo + trig.hi) / 2, np.float32)
    pattern[:, i : i + k, j : j + k] = trig.pattern
    return TriggerEstimate(
        problem, float(k * k), 1.0, 0, {"mask": mask, "pattern": pattern}, trig.shape
    )


def on_patch(sc: Scenario, e: TriggerEstimate) -> float:
    """The share of the estimate's mask on the real patch."""
    (i, j), k = sc.trigger.location, sc.trigger.size
    m = e.params["mask"][0]
    return float(m[i : i + k, j : j + k].sum() / max(m.sum(), 1e-12))


def sizes(estimates: list[TriggerEstimate], k: int, success: float) -> tuple[np.ndarray, ...]:
    """Per target: the pooled size and the median pair size (NaN where it failed), from the
    sweep's own size tables."""
    pairs = size_matrices(estimates, k, ["patch"], success)["patch"]
    with warnings.catch_warnings():  # a target with no successful pair: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        medians = np.nanmedian(pairs, axis=0)
    return pooled_sizes(estimates, k, ["patch"], success)["patch"], medians


def run(case: str, settings: Settings) -> str:
    sc, target = scenario(case)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    k = int(sc.net(torch.from_numpy(sc.test.x[:1])).shape[1])
    job = Job(
        model, sc.defender, ["patch"], (sc.trigger.lo, sc.trigger.hi), settings, Shard(), None
    )
    success = settings.sweep.success
    found = job.solve(pair_problems(k, ["patch"], 1) + pooled_problems(k, ["patch"], 1), None, True)
    pooled, pairs = sizes(found, k, success)
    mine = [Problem("patch", target, tuple(s for s in range(k) if s != target))]
    mine += [Problem("patch", target, (s,)) for s in range(k) if s != target]
    real = job.solve(mine, None, True, [real_start(sc, p) for p in mine])
    rpooled, rpairs = sizes(real, k, success)
    others = [t for t in range(k) if t != target]
    lines = [
        f"{case}: target {target}, a {sc.trigger.size}×{sc.trigger.size} patch at "
        f"{sc.trigger.location} ({sc.trigger.size**2} px)",
        "target | pooled px | median pair px (random starts)",
    ]
    lines += [f"{t} | {pooled[t]:.1f} | {pairs[t]:.1f}" for t in range(k)]
    lines.append(
        f"{target} from the real trigger | {rpooled[target]:.1f} | {rpairs[target]:.1f} "
        f"(on the patch: pooled {on_patch(sc, real[0]):.2f}, pairs median "
        f"{np.median([on_patch(sc, e) for e in real[1:]]):.2f}; random starts: pooled "
        f"{on_patch(sc, next(e for e in found if e.problem == mine[0])):.2f})"
    )
    lines.append(
        f"real trigger, shrunk, over the smallest other target: pooled "
        f"{rpooled[target] / np.nanmin(pooled[others]):.2f}, median pair "
        f"{rpairs[target] / np.nanmin(pairs[others]):.2f} (below 1: smaller than every natural one)"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="patch5-t2,patch5-t4,patch5-t6,cnn:0")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"2 torch threads, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    for case in args.cases.split(","):
        print(run(case, Settings()), "\n", flush=True)


if __name__ == "__main__":
    main()
