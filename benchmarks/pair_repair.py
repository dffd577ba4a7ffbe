"""Known pairs on a panel model: ``fit --pairs`` (no detection) and, per target, the share of
clean images of t (those f answers t for) that its g_t flags, on the defender's 20 a class and
on the test set; then ACC before and after, and the attack's ASR and SIA.

A target with one source is what a natural pair the detection took for a backdoor becomes
(small ResNet, seed-1 patch: 0 → 8 and 6 → 4), and what one pair of an all-to-all attack is
when it is fitted on its own (``--set fit.map_shared=false``): this prints what its g_t costs
the clean images of t (README, Θ fit: one-source targets).

Run: ``python benchmarks/pair_repair.py --arch small-resnet --attack patch --seed 1 --pairs
0:8,6:4,0:7,1:7,2:7,3:7,4:7,5:7,6:7,8:7,9:7 [--set fit.single_source_budget=0 ...]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from panel import ATTACKS, panel_scenario

from bna_export.defend import fit_defence
from bna_export.fitfile import Mitigation
from bna_export.mitigated import predict_mitigated
from bna_export.model import adapt_module
from bna_export.settings import Settings, with_overrides


def flag_rates(m: Mitigation, model, x: np.ndarray, y: np.ndarray) -> tuple[list, float, float]:
    """Per target (share of its routed clean images flagged, how many), ACC of f and of the
    routed classifier."""
    targets = m.targets
    base = predict_mitigated(model, [], None, x)
    out = predict_mitigated(model, targets, m.thetas, x, routing=m.routing)
    rates = []
    for t in targets:
        routed = (y == t) & (base.label == t)
        rates.append(
            (float(out.triggered[routed].mean()) if routed.any() else 0.0, int(routed.sum()))
        )
    return rates, float((base.label == y).mean()), float((out.label == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="small-resnet", choices=("cnn", "small-resnet"))
    kinds = [a for a in ATTACKS if a != "clean" and not a.endswith("-a2a")]
    ap.add_argument(
        "--attack",
        default="patch",
        choices=[*ATTACKS, *(f"{k}-a2a" for k in kinds if f"{k}-a2a" not in ATTACKS)],
        help="a panel attack, or any trigger's all-to-all version (KIND-a2a)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pairs", required=True, help="source:target pairs, comma-separated")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(2)
    pairs = [tuple(int(c) for c in p.split(":")) for p in args.pairs.split(",")]
    settings = with_overrides(Settings(), args.overrides)
    sc = panel_scenario(args.arch, args.attack, args.seed)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    t0 = time.perf_counter()
    out = fit_defence(model, sc.defender, pairs=pairs, settings=settings)
    seconds = time.perf_counter() - t0
    m = Mitigation.from_record(out.record)
    sources = out.record.sources
    print(f"{args.arch} {args.attack} seed {args.seed}, {' '.join(args.overrides) or 'defaults'}")
    print("| target | sources | flagged, defender | flagged, test |")
    print("|---|---|---|---|")
    d_rates, _, d_acc = flag_rates(m, model, sc.defender.x, sc.defender.y)
    t_rates, acc0, acc = flag_rates(m, model, sc.test.x, sc.test.y)
    for t, (dr, dn), (tr, tn) in zip(m.targets, d_rates, t_rates, strict=True):
        print(f"| {t} | {list(sources[t])} | {dr:.3f} (of {dn}) | {tr:.3f} (of {tn}) |")
    trig = predict_mitigated(model, m.targets, m.thetas, sc.triggered["x"], routing=m.routing)
    asr = float((trig.label == sc.triggered["attack_label"]).mean())
    sia = float((trig.label == sc.triggered["y"]).mean())
    print(
        f"ACC {acc0:.3f} -> {acc:.3f} (defender's images: {d_acc:.3f}), ASR {asr:.3f}, "
        f"SIA {sia:.3f}, fit {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
