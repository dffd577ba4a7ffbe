"""The adaptive attack's strength: how far training a backdoor to keep its BN channels'
distributions (``build_scenario(latent_weight=W)``, Doan et al. 2021) lowers the alteration
BNA measures, and what it costs the attack in ASR and clean accuracy.

For each attack and weight W it trains the digits model poisoned all-to-one (10 %, 4 epochs,
as the panel's rows) and prints ACC and ASR of f, the alignment term of the last epoch, and
the real trigger's alteration of f's BN outputs on the test set's source images (mean TV
over channels and layers, :func:`mitigation.real_alteration`) beside the sampling floor.
No defence is fitted here: ``benchmarks/unseen.py`` runs the chosen weight's rows.

Run: ``python benchmarks/adaptive.py [--arch cnn] [--attacks patch,blend] [--weights 0,0.1,0.3,1]
[--target 7] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import os

import torch
from mitigation import known_scenario, real_alteration

from bna_export.metrics import compute_metrics
from bna_export.mitigated import predict_mitigated
from bna_export.model import adapt_module


def measure(arch: str, attack: str, weight: float, target: int, seed: int) -> dict:
    """One poisoned model at one alignment weight: f's ACC, ASR and the real alteration."""
    sc = known_scenario(attack, target, seed, arch, weight)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    trig = sc.triggered
    pc = predict_mitigated(model, [], None, sc.test.x)
    pt = predict_mitigated(model, [], None, trig["x"])
    m = compute_metrics(pc.label, sc.test.y, None, pt.label, trig["y"], trig["attack_label"])
    floor, before, _ = real_alteration(model, sc, target)
    align = sc.info.get("alignment", [float("nan")])[-1]
    return {"acc": m["acc"], "asr": m["asr"], "align": align, "floor": floor, "before": before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cnn", help="cnn or an architecture of the lab")
    ap.add_argument("--attacks", default="patch,blend")
    ap.add_argument("--weights", default="0,0.1,0.3,1")
    ap.add_argument("--target", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"2 torch threads, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    print("| arch | attack | W | ACC | ASR | alignment term | alteration (floor) |")
    print("|---|---|---|---|---|---|---|")
    for attack in args.attacks.split(","):
        for w in (float(v) for v in args.weights.split(",")):
            r = measure(args.arch, attack, w, args.target, args.seed)
            print(
                f"| {args.arch} | {attack} | {w:g} | {r['acc']:.3f} | {r['asr']:.3f} | "
                f"{r['align']:.4f} | {r['before']:.4f} ({r['floor']:.4f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
