"""Which trigger the shared Θ of an all-to-all backdoor is fitted on, and what it gives.

On a panel all-to-all model (``--arch``, ``--seed``; digits, patch c → c + 1), solves the
universal untargeted trigger of each ``--families`` with the sweep's solver (what ``fit``
uses) or the per-target one (``--solver reverse``), at each ``--success`` bar, prints each
estimate's size, success and how many classes its map sends to c + 1 (``--restarts``: that
many starts per family), then fits one shared Θ on each family's smallest successful one
(every class kept) and prints ACC, ASR, SIA and FPR of the repaired model on the test
images. ``--oracle`` fits it on the real trigger instead: the bound the estimate is measured
against. ``--set SECTION.FIELD=VALUE`` changes a setting (as in ``fit``; the Θ fit's, e.g.).
``--start-from S:T,...`` solves those pairs (sweep solver) and starts the universal problem
from each pair's trigger instead of a random draw, as ``detect.map_starts`` does from the
best-scoring pairs, and prints how many classes each map counts. README, Results (the
all-to-all rows), Detection (map rule) and Θ objective (a Θ fit long enough).

    python benchmarks/universal_repair.py --seed 0 --families perturbation
    python benchmarks/universal_repair.py --seed 0 --families perturbation --solver reverse
    python benchmarks/universal_repair.py --seed 0 --oracle
    python benchmarks/universal_repair.py --arch small-resnet --seed 0 --oracle --set fit.epochs=30
    python benchmarks/universal_repair.py --arch small-resnet --seed 0 --families patch \
        --start-from 2:3,8:9,7:9,1:0
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from panel import panel_scenario

from bna_export.fit import fit_thetas
from bna_export.fitfile import Routing
from bna_export.lab.scenario import Scenario
from bna_export.mitigated import flag_drops, predict_mitigated
from bna_export.model import adapt_module
from bna_export.problems import OWN, Problem, TriggerEstimate
from bna_export.reverse import reverse_engineer, succeeds
from bna_export.settings import Settings, with_overrides
from bna_export.universal import class_map, counted_pairs, destinations


def real_patch(sc: Scenario, k: int) -> TriggerEstimate:
    """The scenario's own patch as an estimate of the patch family."""
    tr = sc.trigger
    c, h, w = tr.shape
    mask, pattern = np.zeros((1, h, w), np.float32), np.zeros((c, h, w), np.float32)
    i, j = tr.location
    mask[:, i : i + tr.size, j : j + tr.size] = 1
    pattern[:, i : i + tr.size, j : j + tr.size] = tr.pattern
    problem = Problem("patch", OWN, tuple(range(k)))
    params = {"mask": mask, "pattern": pattern}
    return TriggerEstimate(problem, float(mask.sum()), 1.0, 0, params, (c, h, w))


def repair(model, sc: Scenario, k: int, triggers: list[TriggerEstimate], s: Settings) -> str:
    """One Θ fitted on ``triggers`` for every class, and the repaired model's metrics."""
    classes = list(range(k))
    res = fit_thetas(
        model, sc.defender, [0], {0: classes}, {0: triggers}, (0.0, 1.0), s.fit, s.histogram,
        seed=s.seed, keep={0: classes},
    )  # fmt: skip
    thetas = [t[[0] * k] for t in res.thetas]
    drops = flag_drops(model, sc.defender, classes, [None] * k, s.fit.flag_drop)
    routing = Routing((None,) * k, drops)
    pc = predict_mitigated(model, classes, thetas, sc.test.x, routing=routing)
    pt = predict_mitigated(model, classes, thetas, sc.triggered["x"], routing=routing)
    acc, fpr = (pc.label == sc.test.y).mean(), pc.triggered.mean()
    asr = (pt.label == sc.triggered["attack_label"]).mean()
    sia = (pt.label == sc.triggered["y"]).mean()
    return f"ACC {acc:.3f}, ASR {100 * asr:.1f} %, SIA {sia:.3f}, FPR {100 * fpr:.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default="patch,perturbation")
    ap.add_argument("--solver", choices=("sweep", "reverse"), default="sweep")
    ap.add_argument("--success", default="0.95", help="success bars, comma-separated")
    ap.add_argument("--restarts", type=int, default=1, help="starts per family (the smallest used)")
    ap.add_argument("--oracle", action="store_true", help="fit on the real trigger")
    ap.add_argument("--start-from", default="", help="pairs S:T to start the universal from")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="SECTION.FIELD=V")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sc = panel_scenario(args.arch, "patch-a2a", args.seed)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    k, s = int(sc.test.y.max()) + 1, with_overrides(Settings(), args.overrides)
    f_acc = (predict_mitigated(model, [], None, sc.test.x).label == sc.test.y).mean()
    print(f"{args.arch} patch-a2a seed {args.seed}: f's ACC {f_acc:.3f}")
    if args.oracle:
        print(f"| real trigger | {repair(model, sc, k, [real_patch(sc, k)], s)} |")
        return
    for bar in (float(b) for b in args.success.split(",")):
        solver = replace(s.sweep if args.solver == "sweep" else s.reverse, success=bar)
        fams = args.families.split(",")
        problems = [Problem(f, OWN, tuple(range(k)), r) for f in fams for r in range(args.restarts)]
        t0 = time.perf_counter()
        start, named = None, []
        if args.start_from:
            pairs = [tuple(int(v) for v in p.split(":")) for p in args.start_from.split(",")]
            asked = [Problem(f, t, (a,)) for f in fams for a, t in pairs]
            start = reverse_engineer(model, sc.defender, asked, (0.0, 1.0), solver, s.seed)
            problems = [Problem(p.family, OWN, tuple(range(k)), i + 1) for i, p in enumerate(asked)]
            named = [
                f"from {p.sources[0]} → {p.target} (size {e.size:.2f})"
                for p, e in zip(asked, start, strict=True)
            ]
        t1 = time.perf_counter()
        found = reverse_engineer(
            model, sc.defender, problems, (0.0, 1.0), solver, s.seed, start=start
        )
        print(f"{len(problems)} universal problems solved in {time.perf_counter() - t1:.1f} s")
        for i, e in enumerate(found):
            m = class_map(model, sc.defender, e, (0.0, 1.0), k)
            dest, _ = destinations(m)
            right = sum(int(dest[c]) == (c + 1) % k for c in range(k))
            counted = len(counted_pairs(m, s.detect.map_share))
            how = named[i] if named else f"start {e.problem.restart}"
            print(
                f"| {args.solver} solver, success {bar} | {e.family} {how} | "
                f"size {e.size:.2f} | success {e.success:.2f} | {right} of {k} classes to "
                f"c + 1 | {counted} counted by the map rule |"
            )
        ok = [e for e in found if succeeds(e, bar)] or found
        used = [  # per family its smallest successful start
            min((e for e in ok if e.family == f), key=lambda e: e.size)
            for f in dict.fromkeys(e.family for e in ok)
        ]
        print(f"| shared Θ on those | {repair(model, sc, k, used, s)} | "
              f"{time.perf_counter() - t0:.0f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
