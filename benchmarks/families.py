"""What each trigger family contributes to detection: one poisoned digits model of the panel
(``benchmarks/panel.py``), every ordered pair solved in every family given (the sweep's
solver), then per family alone: its problem-steps and seconds, the pairs it detects right and
wrong, the best anomaly score of a true pair and of any other (the detecting side), and the
all-to-one score of the true target; then the union rule over the family sets tried.

Run: ``python benchmarks/families.py --case cnn:blend:0 [--families patch,perturbation,blend,warp]
[--union patch+perturbation --union patch+perturbation+blend] [--set sweep.blend_steps=300]``
(case ARCH:ATTACK:SEED, attack as in the panel, e.g. ``patch-a2a`` or ``clean``; ``--set`` as
in ``fit``, e.g. the sweep's solver settings).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from panel import TARGET, panel_scenario, truth_of

from bna_export.detect import detect_pairs
from bna_export.model import adapt_module
from bna_export.reverse import reverse_engineer
from bna_export.settings import Settings, with_overrides
from bna_export.sweep import pair_problems, size_matrices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="cnn:blend:0")
    ap.add_argument("--families", default="patch,perturbation,blend,warp")
    ap.add_argument("--union", action="append", default=[])
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="e.g. sweep.blend_steps=300"
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    arch, attack, seed = args.case.split(":")
    sc = panel_scenario(arch, attack, int(seed))
    k = int(sc.defender.y.max()) + 1
    truth = truth_of(attack)
    true_mask = np.zeros((k, k), dtype=bool)
    for s, t in truth:
        true_mask[s, t] = True
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    model.use_channels_last(torch.from_numpy(sc.defender.x[:8]))
    solver = with_overrides(Settings(), args.overrides).sweep
    print(
        f"{args.case} {' '.join(args.overrides)}, 2 torch threads, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        "| families | problem-steps | sweep s | pairs right / wrong (of true) | best score "
        "true / other | all-to-one score of 7 |"
    )
    print("|---|---|---|---|---|---|")
    found, cost = [], {}
    for fam in args.families.split(","):
        t0 = time.perf_counter()
        mine = reverse_engineer(model, sc.defender, pair_problems(k, [fam], 1), (0, 1), solver)
        cost[fam] = (sum(e.steps for e in mine), time.perf_counter() - t0)
        found += mine
    sizes = size_matrices(found, k, list(cost), (0, 1), solver.success)
    for group in [[f] for f in cost] + [u.split("+") for u in args.union]:
        det = detect_pairs({f: sizes[f] for f in group})
        pairs = set(det.pairs)
        best = {True: 0.0, False: 0.0}
        for f in group:
            st = det.statistics[f]
            big = st > np.nanmedian(st)
            for key, where in ((True, true_mask), (False, ~true_mask)):
                vals = det.scores[f][where & big & ~np.isnan(st)]
                if vals.size:
                    best[key] = max(best[key], float(vals.max()))
        a2o = max(float(det.target_scores[f][TARGET]) for f in group)
        steps = sum(cost[f][0] for f in group)
        secs = sum(cost[f][1] for f in group)
        print(
            f"| {'+'.join(group)} | {steps} | {secs:.0f} | {len(pairs & truth)} / "
            f"{len(pairs - truth)} ({len(truth)}) | {best[True]:.1f} / {best[False]:.1f} | "
            f"{a2o:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
