"""Mitigation figures on real digits: for each attack, train a poisoned classifier (A2O, 20
clean images per class for the defender), run ``fit`` with the known target, and print ACC
before, then ACC, ASR, SIA, TPR, FPR of the repaired classifier, and the fit time.

Run: ``python benchmarks/mitigation.py [--arch cnn,small-resnet] [--attacks patch,blend]
[--seeds 0,1] [--set fit.lr=0.03 ...] [--oracle]``
(``--oracle``: Θ fitted on the attack's own trigger). ``cnn`` is the digits CNN (3 BN
layers), ``small-resnet`` a ResNet-style digits classifier (stem and three basic blocks,
16-64 channels, 9 BN layers).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bna_export.defend import fit_defence
from bna_export.fit import fit_thetas
from bna_export.fitfile import Mitigation, Routing
from bna_export.lab.attacks import Trigger
from bna_export.lab.scenario import Scenario, build_scenario, digits
from bna_export.layer_divergence import layer_divergence
from bna_export.metrics import compute_metrics
from bna_export.mitigated import flag_drops, predict_mitigated
from bna_export.model import adapt_module
from bna_export.reverse import Problem, TriggerEstimate
from bna_export.settings import Settings, with_overrides

TRIGGER_OPTIONS = {
    "patch": {},
    "blend": {"alpha": 0.2},
    "chessboard": {"delta": 8 / 255},
    "pixel": {"delta": 1.0},
    "warp": {"strength": 1.0},
    "sig": {},
}


def oracle(trigger: Trigger, shape: tuple[int, int, int], target: int) -> TriggerEstimate:
    """The attack's own trigger as a trigger estimate of the family that expresses it exactly
    (``--oracle``: what Θ does when the estimate is perfect)."""
    _, h, w = shape
    sources = tuple(k for k in range(10) if k != target)
    if trigger.kind == "patch":
        m, p = np.zeros((1, h, w), np.float32), np.zeros(shape, np.float32)
        i, j = trigger.location
        m[:, i : i + trigger.size, j : j + trigger.size] = 1
        p[:, i : i + trigger.size, j : j + trigger.size] = trigger.pattern
        fam, params = "patch", {"mask": m, "pattern": p}
    elif trigger.kind == "blend":
        alpha = np.array([trigger.alpha], np.float32)
        fam, params = "blend", {"alpha": alpha, "pattern": trigger.pattern.astype(np.float32)}
    elif trigger.kind == "warp":  # WaNet's grid units (s·k/H of [-1, 1]) in pixels
        flow = trigger.pattern[0] * trigger.strength / h * (h - 1) / 2
        fam, params = "warp", {"flow": flow.astype(np.float32)}
    else:  # chessboard, sig, pixel: additive
        v = np.zeros(shape, np.float32)
        if trigger.kind == "pixel":
            v[:, trigger.location[0], trigger.location[1]] = trigger.pattern
        else:
            v[:] = trigger.pattern
        fam, params = "perturbation", {"pattern": v}
    return TriggerEstimate(Problem(fam, target, sources), 0.0, 1.0, 0, params, shape)


def real_alteration(
    model, sc: Scenario, target: int, thetas: list | None = None
) -> tuple[float, float, float]:
    """How far the attack's own trigger moves f's BN outputs on the test set's source images
    (the paper's "activation distribution alteration", mean TV over BN channels, then layers),
    as :func:`~bna_export.layer_divergence.layer_divergence` measures it: (floor, before,
    after), ``after`` through Θ ``thetas`` ([1, 4, C] per layer: the target's; None: f's)."""
    est = oracle(sc.trigger, tuple(sc.test.x.shape[1:]), target)
    own = [la.f_theta()[None].to(model.device) for la in model.layers]
    floor, before, after = layer_divergence(
        model,
        sc.test,
        [target],
        {target: list(est.problem.sources)},
        {target: [est]},
        own if thetas is None else thetas,
        (0.0, 1.0),
    )
    return float(floor.mean()), float(before.mean()), float(after.mean())


def repaired_metrics(model, sc: Scenario, target: int, thetas, routing: Routing) -> dict:
    """ACC, ASR, SIA, TPR, FPR of the model repaired for ``target`` with ``thetas``, on the
    scenario's clean and triggered test sets."""
    pc = predict_mitigated(model, [target], thetas, sc.test.x, routing=routing)
    pt = predict_mitigated(model, [target], thetas, sc.triggered["x"], routing=routing)
    return compute_metrics(
        pc.label,
        sc.test.y,
        pc.triggered,
        pt.label,
        sc.triggered["y"],
        sc.triggered["attack_label"],
        pt.triggered,
        [target],
    )


def known_scenario(
    attack: str, target: int, seed: int, arch: str, latent_weight: float = 0.0
) -> Scenario:
    """The digits model poisoned all-to-one to ``target`` with ``attack`` at this table's
    strength (``latent_weight``: the adaptive attack's, ``benchmarks/adaptive.py``)."""
    x, y = digits()
    return build_scenario(
        x,
        y,
        attack=attack,
        target=target,
        seed=seed,
        trigger_options=TRIGGER_OPTIONS[attack],
        arch=arch,
        width=16 if arch == "cnn" else None,
        latent_weight=latent_weight,
    )


def evaluate_one(
    attack: str, target: int, seed: int, settings: Settings, arch: str, use_oracle: bool = False
) -> dict:
    sc = known_scenario(attack, target, seed, arch)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    base_c = predict_mitigated(model, [], None, sc.test.x)
    base_t = predict_mitigated(model, [], None, sc.triggered["x"])
    before = compute_metrics(
        base_c.label,
        sc.test.y,
        None,
        base_t.label,
        sc.triggered["y"],
        sc.triggered["attack_label"],
        None,
        [target],
    )
    t0 = time.perf_counter()
    if use_oracle:
        est = oracle(sc.trigger, tuple(sc.defender.x.shape[1:]), target)
        sources = {target: list(est.problem.sources)}
        res = fit_thetas(
            model, sc.defender, [target], sources, {target: [est]}, (0.0, 1.0), settings.fit,
            settings.histogram, seed=settings.seed,
        )  # fmt: skip
        th, fam = res.thetas, f"oracle {est.family}"
        drops = flag_drops(model, sc.defender, [target], [None], settings.fit.flag_drop)
        routing = Routing((None,), drops)
    else:
        out = fit_defence(model, sc.defender, targets=[target], settings=settings)
        th, routing = Mitigation.from_record(out.record).thetas, out.record.routing
        fam = out.record.families[target]
    seconds = time.perf_counter() - t0
    after = repaired_metrics(model, sc, target, th, routing)
    return {
        "arch": arch,
        "attack": attack,
        "seed": seed,
        "acc0": before["acc"],
        "asr0": before["asr"],
        **after,
        "family": fam,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cnn", help="cnn, small-resnet, or both comma-separated")
    ap.add_argument("--attacks", default="patch,blend,chessboard,pixel,warp,sig")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--target", type=int, default=7)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--oracle",
        action="store_true",
        help="fit Θ on the attack's own trigger (no reverse-engineering): the objective's bound",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = with_overrides(Settings(), args.overrides)
    rows = []
    print(
        "| arch | attack | seed | ACC before | ASR before | ACC | ASR | SIA | TPR | FPR | family "
        "| fit s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in args.arch.split(","):
        for attack in args.attacks.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                r = evaluate_one(attack, args.target, seed, settings, arch, args.oracle)
                rows.append(r)
                print(
                    f"| {arch} | {attack} | {seed} | {r['acc0']:.3f} | {r['asr0']:.3f} | "
                    f"{r['acc']:.3f} | {r['asr']:.3f} | {r['sia']:.3f} | {r['tpr']:.3f} | "
                    f"{r['fpr']:.3f} | {r['family']} | {r['seconds']:.0f} |",
                    flush=True,
                )
    if len(rows) > 1:
        mean = {
            k: float(np.mean([r[k] for r in rows]))
            for k in ("acc0", "acc", "asr", "sia", "tpr", "fpr")
        }
        print(
            f"| mean | | | {mean['acc0']:.3f} | | {mean['acc']:.3f} | {mean['asr']:.3f} | "
            f"{mean['sia']:.3f} | {mean['tpr']:.3f} | {mean['fpr']:.3f} | | |"
        )
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
