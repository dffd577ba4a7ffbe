"""The flag drop (``fit.flag_drop``) as an ablation: per poisoned digits model, one known-target
fit, then the repaired classifier's FPR and ASR for each share (0: the paper's rule, a flag
wherever g_t's answer is not t), and the means and worst rows over the models.

g_t flags an image f answers t only when t's lead over the next class falls, from f's logits to
g_t's, by more than ``share`` × f's median lead on the defender's clean images of t. The fit
does not depend on the share, so every share is read off one fit per model.

Run: ``python benchmarks/flag_drop.py [--arch cnn,small-resnet] [--attacks warp,patch]
[--seeds 0,1] [--shares 0,0.3,0.6] [--set ...]`` (known target 7, 20 clean images a class).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from mitigation import TRIGGER_OPTIONS

from bna_export.defend import fit_defence
from bna_export.fitfile import Mitigation, Routing
from bna_export.lab.scenario import build_scenario, digits
from bna_export.metrics import compute_metrics
from bna_export.mitigated import flag_drops, predict_mitigated
from bna_export.model import adapt_module
from bna_export.settings import Settings, with_overrides


def one_model(arch: str, attack: str, seed: int, shares: list[float], settings: Settings) -> list:
    """(ACC, ASR, FPR) per share for one poisoned model, and f's ACC."""
    x, y = digits()
    sc = build_scenario(
        x, y, attack=attack, target=7, seed=seed, trigger_options=TRIGGER_OPTIONS[attack],
        arch=arch, width=16 if arch == "cnn" else None,
    )  # fmt: skip
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    out = fit_defence(model, sc.defender, targets=[7], settings=settings)
    m = Mitigation.from_record(out.record)
    acc0 = float((predict_mitigated(model, [], None, sc.test.x).label == sc.test.y).mean())
    out = []
    for share in shares:
        drops = flag_drops(model, sc.defender, m.targets, [None], share)
        routing = Routing((None,), drops)
        pc = predict_mitigated(model, m.targets, m.thetas, sc.test.x, routing=routing)
        pt = predict_mitigated(model, m.targets, m.thetas, sc.triggered["x"], routing=routing)
        r = compute_metrics(
            pc.label, sc.test.y, pc.triggered, pt.label, sc.triggered["y"],
            sc.triggered["attack_label"], pt.triggered, m.targets,
        )  # fmt: skip
        out.append((r["acc"], r["asr"], r["fpr"]))
    return [acc0, out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--attacks", default="patch,blend,chessboard,pixel,warp,sig")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--shares", default="0,0.3,0.5,0.6,0.7,0.8,1")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = with_overrides(Settings(), args.overrides)
    shares = [float(s) for s in args.shares.split(",")]
    print("FPR / ASR in %, ACC after (f's ACC in brackets)")
    print("| model | " + " | ".join(f"share {s:g}" for s in shares) + " |")
    print("|---|" + "---|" * len(shares))
    rows = []
    for arch in args.arch.split(","):
        for attack in args.attacks.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                acc0, res = one_model(arch, attack, seed, shares, settings)
                rows.append(res)
                print(f"| {arch} {attack} {seed} ({acc0:.3f}) | " + cells(res) + " |", flush=True)
    r = np.array(rows)  # [models, shares, (acc, asr, fpr)]
    mean, worst = r.mean(0), r.max(0)
    print("| mean | " + cells(mean) + " |")
    print("| worst | " + " | ".join(f"{100 * f:.1f} / {100 * a:.1f}" for _, a, f in worst) + " |")


def cells(res) -> str:
    """FPR / ASR in %, ACC, per share."""
    return " | ".join(f"{100 * f:.1f} / {100 * a:.1f}, {c:.3f}" for c, a, f in res)


if __name__ == "__main__":
    main()
