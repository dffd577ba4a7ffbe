"""How the fit with no hint scales with the number of classes K: seeded synthetic 16×16 classes
(K = 10, 20, 50, 100; each class random 0/1 cells of an 8×8 grid, so no two classes are
naturally a few pixels apart at any K: :func:`bna_export.lab.zoo.synthetic_classes`), a small CNN
(width 8) poisoned with a 3×3 patch, all-to-one to class 0 (``--setting a2o``, default) or
all-to-all c → c + 1 (``a2a``: 20 % poisoned, 16 epochs), 20 clean images per class for the
defender, default settings.

Prints per K: the sweep's form (every pair, or the screen), its problems and problem-steps
(one step of one problem: a forward and backward pass of its images) and their ratio to the
first K, the whole fit's wall time and peak memory (one process per K, its peak resident memory
from the kernel), the targets and the true and wrong pairs detected, the best all-to-one score
of the planted target (a2o), and the repaired ASR and clean accuracy.

Run: ``python benchmarks/fit_scaling.py [--classes 10,20,50,100] [--setting a2o|a2a]
[--set SECTION.FIELD=V ...]`` (``--set detect.screen_above=1000``: every pair, for comparison;
one K per child process: ``--one K`` is what the parent runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from bna_export.defend import fit_defence
from bna_export.fitfile import Mitigation
from bna_export.lab.scenario import build_scenario
from bna_export.lab.zoo import synthetic_classes
from bna_export.metrics import compute_metrics
from bna_export.mitigated import predict_mitigated
from bna_export.model import adapt_module
from bna_export.settings import Settings, with_overrides

TRAINING = {  # an all-to-all backdoor takes more poison and epochs (ASR 21 % at 10 %, 8 epochs)
    "a2o": {"poison_rate": 0.1, "epochs": 8},
    "a2a": {"poison_rate": 0.2, "epochs": 16},
}


def one(k: int, setting: str, overrides: list[str]) -> dict:
    torch.set_num_threads(2)
    x, y = synthetic_classes(k, 120, 16, seed=k, binary_grid=8)
    t0 = time.perf_counter()
    sc = build_scenario(
        x, y, attack="patch", setting=setting, target=0, width=8, seed=0,
        defender_per_class=20, test_fraction=0.25, **TRAINING[setting],
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    settings = with_overrides(Settings(), overrides)
    t0 = time.perf_counter()
    out = fit_defence(model, sc.defender, settings=settings)
    fit_s = time.perf_counter() - t0
    rec = out.record
    sweep = rec.detection.sweep
    thetas = Mitigation.from_record(rec).thetas
    clean = predict_mitigated(model, rec.targets, thetas, sc.test.x, routing=rec.routing)
    trig = predict_mitigated(model, rec.targets, thetas, sc.triggered["x"], routing=rec.routing)
    base = predict_mitigated(model, [], None, sc.triggered["x"])
    t = sc.triggered
    after = compute_metrics(
        clean.label, sc.test.y, clean.triggered, trig.label, t["y"], t["attack_label"],
        trig.triggered, sc.targets,
    )  # fmt: skip
    truth = (
        {(s, 0) for s in range(1, k)} if setting == "a2o" else {(s, (s + 1) % k) for s in range(k)}
    )
    found = set(rec.pairs)
    scores = [v for f in rec.detection.target_scores.values() for v in [f[0]] if v is not None]
    return {
        "k": k,
        "exhaustive": sweep["exhaustive"],
        "problems": sweep["problems"],
        "problem_steps": sweep["problem_steps"],
        "fit_s": fit_s,
        "train_s": train_s,
        "targets": rec.targets,
        "right": len(found & truth),
        "wrong": len(found - truth),
        "truth": len(truth),
        "score_0": max(scores, default=float("nan")),
        "asr_before": float(np.mean(base.label == t["attack_label"])),
        "asr": after["asr"],
        "acc": after["acc"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="10,20,50,100")
    ap.add_argument("--setting", default="a2o", choices=("a2o", "a2a"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.setting, args.overrides)))
        return
    print(
        f"{args.setting}, 2 torch threads, load average {os.getloadavg()[0]:.2f} at start"
        + (f", --set {' --set '.join(args.overrides)}" if args.overrides else "")
    )
    print(
        "| K | sweep | problems | problem-steps | × first | fit s | peak RSS MB | targets "
        "| pairs right / wrong (of true) | a2o score of 0 | ASR before | ASR | ACC |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = None
    for k in (int(v) for v in args.classes.split(",")):
        sets = [a for o in args.overrides for a in ("--set", o)]
        child = subprocess.Popen(
            [sys.executable, __file__, "--one", str(k), "--setting", args.setting, *sets],
            stdout=subprocess.PIPE,
        )
        out = child.stdout.read().decode() if child.stdout else ""
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"K = {k} failed")
        r = json.loads(out.strip().splitlines()[-1])
        base = base or r["problem_steps"]
        found = f"{r['targets'][:6]}{'…' if len(r['targets']) > 6 else ''}"
        print(
            f"| {k} | {'every pair' if r['exhaustive'] else 'screen'} | {r['problems']} | "
            f"{r['problem_steps']} | {r['problem_steps'] / base:.1f} | {r['fit_s']:.0f} | "
            f"{usage.ru_maxrss / 1024:.0f} | {found} | {r['right']} / {r['wrong']} "
            f"({r['truth']}) | {r['score_0']:.1f} | {r['asr_before']:.3f} | {r['asr']:.3f} | "
            f"{r['acc']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
