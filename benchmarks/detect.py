"""Speed of the pair sweep: every ordered class pair in both trigger families solved as one
batch, against a loop that solves the same problems one pair at a time, for K = 10 and K = 20
classes on small CNNs. Both do the same work (same problems, seeds and steps; a problem's
estimate does not depend on the batch it is solved in, which the script checks), so the ratio
is the gain of batching alone.

Run: ``python benchmarks/detect.py [--classes 10,20] [--steps 30] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bna_export.data import Dataset
from bna_export.lab.zoo import SmallCNN, synthetic_classes, train_classifier
from bna_export.model import adapt_module
from bna_export.reverse import reverse_engineer
from bna_export.settings import ReverseSettings
from bna_export.sweep import pair_problems

MODELS = {  # name: (image side, width): the synthetic test CNN and the digits CNN
    "16x16 w8": (16, 8),
    "28x28 w16": (28, 16),
}


def setup(k: int, side: int, width: int) -> tuple[torch.nn.Module, Dataset]:
    x, y = synthetic_classes(k, 60, side, seed=k)
    net = train_classifier(SmallCNN(1, k, side, width), x, y, epochs=1, seed=0)
    defender = np.concatenate([np.flatnonzero(y == c)[:20] for c in range(k)])
    return adapt_module(net, torch.from_numpy(x[:2])), Dataset(x[defender], y[defender])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="10,20")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=30, help="steps per problem (all run them)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # every patch problem runs all its steps; a perturbation stops at its first success
    settings = ReverseSettings(steps=args.steps, min_steps=args.steps)
    print(f"steps per problem: {args.steps}; threads: {args.threads}")
    print("| model | K | problems | problem-steps | batched s | one pair at a time s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        side, width = MODELS[name]
        for k in (int(c) for c in args.classes.split(",")):
            model, data = setup(k, side, width)
            problems = pair_problems(k, ("patch", "perturbation"), 1)
            t0 = time.perf_counter()
            batched = reverse_engineer(model, data, problems, (0.0, 1.0), settings)
            t_batch = time.perf_counter() - t0
            t0 = time.perf_counter()
            alone = [reverse_engineer(model, data, [p], (0.0, 1.0), settings)[0] for p in problems]
            t_loop = time.perf_counter() - t0
            same = all(
                a.size == b.size and a.steps == b.steps for a, b in zip(batched, alone, strict=True)
            )
            if not same:
                raise SystemExit("batched and pair-at-a-time estimates differ: not the same work")
            work = sum(e.steps for e in batched)
            print(
                f"| {name} | {k} | {len(problems)} | {work} | {t_batch:.1f} | {t_loop:.1f} | "
                f"{t_loop / t_batch:.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
