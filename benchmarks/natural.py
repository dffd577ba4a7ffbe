"""The natural-feature check's alignment (``bna_export.natural``) of panel targets: per row
(arch, attack, seed) and target, each family's alignment of its per-target trigger estimates on
all other classes' images (those that succeed), their minimum, and whether the check would call
the target a natural hub at ``--bar`` (0.3, the bar tried; the check is off by default).

The targets of a row: the all-to-one target of an attacked row (the panel's 7, or the model is
poisoned to ``--target``), or on a clean model the targets given with ``--targets`` (the hubs
detection found there; README, Detection). Each row trains its panel model (seeded, as
``panel.py`` does) and solves its per-target estimates with the default solver: about a
minute a row on 2 CPU cores.

Run: ``python benchmarks/natural.py --arch cnn,small-resnet --attacks patch,clean --seeds 0,1
[--targets small-resnet:0=0.2,...] [--target 0] [--bar 0.3]``; ``--json FILE`` also writes
the rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from panel import ATTACKS, TARGET, panel_scenario

from bna_export.distributed import Shard
from bna_export.estimates import Job
from bna_export.model import adapt_module
from bna_export.natural import natural_targets, own_look, target_alignments
from bna_export.settings import Settings


def row(
    arch: str, attack: str, seed: int, targets: list[int], settings: Settings, bar: float
) -> list[dict]:
    sc = panel_scenario(arch, attack, seed, targets[0] if attack != "clean" else TARGET)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    job = Job(model, sc.defender, list(settings.families), (0.0, 1.0), settings, Shard(), None)
    k = int(sc.defender.y.max()) + 1
    estimates = job.per_target({t: [c for c in range(k) if c != t] for t in targets}, {})
    got = target_alignments(model, sc.defender, estimates, (0.0, 1.0), settings.reverse.success)
    natural = natural_targets(got, bar)
    # the reference: t's own look (its mean clean image) as the trigger, through the same path
    looks = [own_look(sc.defender, t, [c for c in range(k) if c != t]) for t in targets]
    own = {
        t: a["blend"]
        for t, a in target_alignments(model, sc.defender, looks, (0.0, 1.0), 0.0).items()
    }
    return [
        {
            "arch": arch,
            "attack": attack,
            "seed": seed,
            "target": t,
            "backdoor": attack != "clean",
            "alignment": got[t],
            "smallest": min(got[t].values(), default=None),
            "natural": t in natural,
            "own": own[t],
        }
        for t in targets
    ]


def _ratio(r: dict) -> str:
    return "-" if r["smallest"] is None else f"{r['smallest'] / r['own']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cnn,small-resnet")
    ap.add_argument("--attacks", default=",".join(a for a in ATTACKS if not a.endswith("a2a")))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument(
        "--targets",
        default="small-resnet:0=0.2,small-resnet:2=0,small-resnet:3=8",
        help="the clean rows' targets, ARCH:SEED=T.T,... (the hubs detection found)",
    )
    ap.add_argument(
        "--target", type=int, default=TARGET, help="the attacked rows' target (the panel's: 7)"
    )
    ap.add_argument(
        "--bar", type=float, default=0.3, help="the bar a natural hub reaches (tried: 0.3)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = Settings()
    clean = {}
    for item in filter(None, args.targets.split(",")):
        key, _, ts = item.partition("=")
        clean[key] = [int(t) for t in ts.split(".")]
    rows = []
    print(
        "| arch | attack | seed | target | each family's alignment | smallest | natural hub? | "
        "t's own look | smallest / own | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in args.arch.split(","):
        for attack in args.attacks.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                targets = clean.get(f"{arch}:{seed}", []) if attack == "clean" else [args.target]
                if not targets:
                    continue
                t0 = time.perf_counter()
                out = row(arch, attack, seed, targets, settings, args.bar)
                took = time.perf_counter() - t0
                for r in out:
                    fams = ", ".join(f"{f} {a:.2f}" for f, a in r["alignment"].items())
                    small = "-" if r["smallest"] is None else f"{r['smallest']:.2f}"
                    print(
                        f"| {arch} | {attack} | {seed} | {r['target']} | {fams} | {small} | "
                        f"{'yes' if r['natural'] else 'no'} | {r['own']:.2f} | "
                        f"{_ratio(r)} | {took:.0f} |",
                        flush=True,
                    )
                rows += out
    bar = args.bar
    planted = [r["smallest"] for r in rows if r["backdoor"] and r["smallest"] is not None]
    hubs = [r["smallest"] for r in rows if not r["backdoor"] and r["smallest"] is not None]
    if planted:
        print(f"\nplanted targets: alignment {min(planted):.2f} to {max(planted):.2f}", end="")
        print(f", {sum(a >= bar for a in planted)} of {len(planted)} at or above {bar}")
    if hubs:
        print(f"clean models' targets: {min(hubs):.2f} to {max(hubs):.2f}", end="")
        print(f", {sum(a >= bar for a in hubs)} of {len(hubs)} at or above {bar}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)


if __name__ == "__main__":
    main()
