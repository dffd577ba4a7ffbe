"""What each trigger family contributes to detection: one poisoned digits model of the panel
(``benchmarks/panel.py``), every ordered pair solved in every family given (the sweep's
solver), and each target's trigger on the pooled images of every other class (the pooled rule),
then per family alone: its problem-steps and seconds (pairs and pooled problems), the pairs it
detects right and wrong, the best anomaly score of a true pair and of any other (the detecting
side), the all-to-one (column) score of the true target, and the pooled-rule score of the true
target and the best of the other targets, the all-to-all and vote rules; then the union rule
over the family sets tried. ``--load`` rescores sizes saved by ``--save`` (seconds, no model).

Run: ``python benchmarks/families.py --case cnn:blend:0 [--families patch,perturbation,blend,warp]
[--union patch+perturbation --union patch+perturbation+blend] [--set sweep.blend_steps=300]
[--save sizes.npz | --load sizes.npz] [--per-source] [--signals]``
(case ARCH:ATTACK:SEED, attack as in the panel, e.g. ``patch-a2a`` or ``clean``, or
``binary-a2o`` / ``binary-a2a``, the 10 synthetic classes of ``sweep_settings.py``, or
``equidistant:SEED``, the test suite's clean 8-class CNN on equidistant synthetic classes drawn
with that data seed (1: the tests' own); ``--set`` as in ``fit``, e.g. the sweep's solver
settings).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from panel import TARGET, panel_scenario, truth_of
from sweep_settings import scenario, true_pairs

from bna_export.detect import all_to_all_pairs, detect_pairs, large_side_scores
from bna_export.lab.scenario import Scenario, build_scenario, synthetic_scenario_data
from bna_export.model import adapt_module
from bna_export.reverse import reverse_engineer
from bna_export.settings import DetectSettings, Settings, with_overrides
from bna_export.sweep import pair_problems, pooled_problems, pooled_sizes, size_matrices
from bna_export.target_rules import row_minimum_votes, vote_targets
from bna_export.universal import (
    counted_pairs,
    destinations,
    map_pairs,
    universal_maps,
    universal_problems,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="cnn:blend:0")
    ap.add_argument("--families", default="patch,perturbation,blend,warp")
    ap.add_argument("--union", action="append", default=[])
    ap.add_argument("--save", help="also write the size matrices and pooled sizes to this .npz")
    ap.add_argument(
        "--load",
        help="score the size matrices and pooled sizes of this .npz (written by --save) instead "
        "of solving; the case still names the truth",
    )
    ap.add_argument(
        "--per-source",
        action="store_true",
        help="also print, per source, each family's true-pair size against its row's median and "
        "smallest, and whether the row's best union score is a true pair",
    )
    ap.add_argument(
        "--signals",
        action="store_true",
        help="also print, per family and target, two signals besides size: how far each pair's "
        "trigger transfers to the other classes' images (the median over the target's column of "
        "the share sent to t) and how much the column's triggers agree in where they act",
    )
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="e.g. sweep.blend_steps=300"
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.signals and args.load:
        ap.error("--signals solves triggers again; it cannot be used with --load")
    k, target, truth = 10, TARGET, set()
    if args.case.startswith("equidistant:"):
        k, target = 8, 0
    elif args.case.startswith("binary-"):  # the 10 synthetic classes of fit_scaling.py
        target = 0
        a2a_case = args.case.endswith("a2a")
        truth = {(s, (s + 1) % k) for s in range(k)} if a2a_case else {(s, 0) for s in range(1, k)}
    else:
        truth = truth_of(args.case.split(":")[1])
    true_mask = np.zeros((k, k), dtype=bool)
    for s, t in truth:
        true_mask[s, t] = True
    if not args.load:  # --load needs no model: the sizes are given
        sc = case_scenario(args.case)
        assert int(sc.defender.y.max()) + 1 == k
        assert not args.case.startswith("binary-") or true_pairs(sc, k) == truth
        model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
        model.use_channels_last(torch.from_numpy(sc.defender.x[:8]))
    settings = with_overrides(Settings(), args.overrides)
    solver, d = settings.sweep, settings.detect
    a2a = (d.all_to_all_bar, d.all_to_all_sources) if d.all_to_all_rule else None
    print(
        f"{args.case} {' '.join(args.overrides)}, 2 torch threads, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        "| families | problem-steps | sweep s | pairs right / wrong (of true) | best score "
        f"true / other | all-to-one score of {target} | effect of {target} / best other | "
        f"pooled score of {target} / best other | "
        "all-to-all rule: pairs, sources over its bar with distinct targets | vote rule: each "
        "family's most-named target, votes of sources; targets found |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    found, cost = [], {}
    if args.load:
        saved = np.load(args.load)
        cost = {f: (0, 0.0) for f in args.families.split(",")}
        sizes = {f: saved[f"pairs_{f}"] for f in cost}
        pooled = {f: saved[f"pooled_{f}"] for f in cost}
    for fam in [] if args.load else args.families.split(","):
        t0 = time.perf_counter()
        problems = pair_problems(k, [fam], 1) + pooled_problems(k, [fam], 1)
        problems += universal_problems(k, [fam])
        mine = reverse_engineer(model, sc.defender, problems, (0, 1), solver)
        cost[fam] = (sum(e.steps for e in mine), time.perf_counter() - t0)
        found += mine
    maps = {}
    if not args.load:
        found, maps = universal_maps(model, sc.defender, found, (0, 1), k, solver.success)
        sizes = size_matrices(found, k, list(cost), solver.success)
        pooled = pooled_sizes(found, k, list(cost), solver.success)
    if args.save:
        arrays = {f"pairs_{f}": z for f, z in sizes.items()}
        np.savez(args.save, **arrays, **{f"pooled_{f}": z for f, z in pooled.items()})
    for group in [[f] for f in cost] + [u.split("+") for u in args.union]:
        det = detect_pairs(
            {f: sizes[f] for f in group},
            pooled={f: pooled[f] for f in group},
            pooled_families=d.pooled_families,
            all_to_all=a2a,
            vote_share=d.vote_share if d.vote_rule else None,
            min_effect=d.min_effect,
        )
        pairs = set(det.pairs)
        best = {True: 0.0, False: 0.0}
        for f in group:
            st = det.statistics[f]
            big = st > np.nanmedian(st)
            for key, where in ((True, true_mask), (False, ~true_mask)):
                vals = det.scores[f][where & big & ~np.isnan(st)]
                if vals.size:
                    best[key] = max(best[key], float(vals.max()))
        a2o = max(float(det.target_scores[f][target]) for f in group)
        eff = np.stack([det.effects[f] for f in group])
        eff_true, eff_other = np.nanmax(eff[:, target]), np.nanmax(np.delete(eff, target, 1))
        # pooled rule, detecting side only (a smaller trigger than the targets' median)
        ps = np.stack([large_side_scores(1 / pooled[f], det.pooled_scores[f]) for f in group])
        pooled_true = float(ps[:, target].max())
        other = float(np.delete(ps, target, axis=1).max())
        steps = sum(cost[f][0] for f in group)
        secs = sum(cost[f][1] for f in group)
        over = all_to_all_pairs(det.statistics, det.scores, d.all_to_all_bar * d.mad_threshold, 0)
        rule = f"{len(det.all_to_all) or 'not fired'}, {len(over)} of {k} over the bar"
        named = []
        for f in group:
            votes, voters = row_minimum_votes(sizes[f])
            t = int(votes.argmax())
            named.append(f"{f} {t} ({votes[t]} of {voters[t]})")
        voted = sorted(
            vote_targets(
                {f: sizes[f] for f in group}, d.vote_share, d.pooled_families,
                det.effects, d.min_effect,
            )
        )  # fmt: skip
        print(
            f"| {'+'.join(group)} | {steps} | {secs:.0f} | {len(pairs & truth)} / "
            f"{len(pairs - truth)} ({len(truth)}) | {best[True]:.1f} / {best[False]:.1f} | "
            f"{a2o:.1f} | {eff_true:.2f} / {eff_other:.2f} | {pooled_true:.1f} / {other:.1f} | "
            f"{rule} | {', '.join(named)}; "
            f"{voted or 'none'} |",
            flush=True,
        )
    if maps:
        print_maps(maps, truth, d)
    if args.per_source:
        per_source(sizes, list(cost), true_mask)
    if args.signals:
        signals(model, sc.defender, found, k, solver.success)


def print_maps(maps: dict, truth: set, d: DetectSettings) -> None:
    """Per family the universal trigger (one for every class's images) and where it sends each
    class (its most frequent new class and the share of the class sent there), and the pairs
    the all-to-all map rule takes from it, with the classes it left out (``detect.map_complete``;
    right / wrong against the truth)."""
    print("\n| family | universal size | steps | class -> most frequent new class (share) | "
          "classes onto one class, most | classes the rule counts | map rule: pairs right / "
          "wrong |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for fam, m in maps.items():
        if m["map"] is None:
            print(f"| {fam} | {m['size']:.2f} | {m['steps']} | never succeeded | - | 0 | - |")
            continue
        dest, sent = destinations(m["map"])
        cells = " ".join(
            f"{c}→{d} ({x:.2f})" for c, (d, x) in enumerate(zip(dest, sent, strict=True))
        )
        pairs = set(map_pairs({fam: m["map"]}, d.map_share, d.all_to_all_sources, d.map_complete))
        crowd = np.bincount(dest, minlength=len(dest))
        print(
            f"| {fam} | {m['size']:.2f} | {m['steps']} | {cells} | {crowd.max()} of {len(dest)} "
            f"to {crowd.argmax()} | {len(counted_pairs(m['map'], d.map_share))} | "
            f"{len(pairs & truth)} / {len(pairs - truth)} |"
        )


def case_scenario(case: str) -> Scenario:
    """The case's poisoned model and data: a panel row (ARCH:ATTACK:SEED) or a synthetic set."""
    if case.startswith("binary-"):
        return scenario(case)
    if case.startswith("equidistant:"):  # as tests/conftest.py's clean_scenario
        x, y = synthetic_scenario_data(n_classes=8, equidistant=True, seed=int(case[12:]))
        return build_scenario(x, y, attack=None, target=0, width=8, epochs=6, seed=0)
    arch, attack, seed = case.split(":")
    return panel_scenario(arch, attack, int(seed))


def signals(model, data, found: list, k: int, success: float) -> None:
    """Per family and target: the transfer of the column's triggers (each pair's trigger
    embedded in the clean images of every class but its source and target that f answers
    correctly; the share f then sends to t; the median over the column) and the agreement of
    where they act (mean pairwise cosine of their 3×3-blurred footprints: a patch's mask, a
    perturbation's |v| summed over channels; blends act everywhere and are left out)."""
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        right = model(x).argmax(1).numpy() == data.y
    print("\n| family | signal | " + " | ".join(f"to {t}" for t in range(k)) + " |")
    print("|---|---|" + "---|" * k)
    for fam in sorted({e.family for e in found}):
        moved: list[list[float]] = [[] for _ in range(k)]
        prints: list[list[torch.Tensor]] = [[] for _ in range(k)]
        for e in found:
            s, t = e.problem.sources[0], e.problem.target
            if e.family != fam or len(e.problem.sources) != 1 or e.success < success - 1e-9:
                continue
            others = right & (data.y != s) & (data.y != t)
            with torch.no_grad():
                sent = model(e.apply(x[others], 0.0, 1.0)).argmax(1).numpy() == t
            moved[t].append(float(sent.mean()))
            if fam in ("patch", "perturbation"):
                where = e.mask if fam == "patch" else np.abs(e.pattern).sum(0)
                blur = torch.nn.functional.avg_pool2d(torch.tensor(where)[None, None], 3, 1, 1)
                prints[t].append(blur.flatten() / blur.norm().clamp_min(1e-12))
        cells = [f"{np.median(v):.2f}" if v else "-" for v in moved]
        print(f"| {fam} | transfer | " + " | ".join(cells) + " |")
        if fam in ("patch", "perturbation"):
            cells = []
            for ms in prints:
                gram = torch.stack(ms) @ torch.stack(ms).T if len(ms) > 1 else None
                n = len(ms)
                cells.append(
                    "-" if gram is None else f"{(gram.sum() - gram.trace()) / (n * (n - 1)):.2f}"
                )
            print(f"| {fam} | agreement | " + " | ".join(cells) + " |")


def per_source(sizes: dict[str, np.ndarray], families: list[str], true_mask: np.ndarray) -> None:
    """Per source: each family's true-pair size (mean over its true targets) against the
    row's median and smallest size (and which target that is), and the target of the row's best
    union anomaly score (on the large side: a smaller trigger than the median), marked * when it
    is a true pair."""
    det = detect_pairs(sizes)
    side = [large_side_scores(det.statistics[f], det.scores[f]) for f in families]
    union = np.nanmax(np.stack([np.where(np.isnan(det.statistics[f]), -np.inf, z)
                                for f, z in zip(families, side, strict=True)]), 0)  # fmt: skip
    np.fill_diagonal(union, -np.inf)
    head = " | ".join(f"{f} true / median / smallest (to)" for f in families)
    print(f"\n| source | {head} | best union score (to) |")
    print("|---|" + "---|" * (len(families) + 1))
    hits = 0
    for s in range(len(true_mask)):
        if not true_mask[s].any():
            continue
        cells = []
        for f in families:
            row = sizes[f][s]
            true = float(np.nanmean(row[true_mask[s]]))
            low = int(np.nanargmin(row))
            cells.append(f"{true:.2f} / {np.nanmedian(row):.2f} / {row[low]:.2f} ({low})")
        best = int(np.argmax(union[s]))
        hits += bool(true_mask[s, best])
        mark = "*" if true_mask[s, best] else ""
        print(f"| {s} | " + " | ".join(cells) + f" | {union[s, best]:.1f} ({best}{mark}) |")
    print(f"rows whose best union score is a true pair: {hits} of {int(true_mask.any(1).sum())}")


if __name__ == "__main__":
    main()
