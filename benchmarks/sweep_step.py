"""The cost of one reverse-engineering step of the sweep (f's forward and its gradient with
respect to the images) with f as loaded and with its BatchNorms folded into the convolutions
before them (``bna_export/folded.py``, what the sweep runs), optionally under ``torch.compile``.

Each model of ``fit_speed.py`` is trained here (poisoned with a 3×3 patch), saved as ``.pt2``
and loaded as ``fit`` loads it (channels-last where it gives the same logits); the step runs on
the defender's images (20 per class). Medians of ``--repeat`` steps after 3 warm-up steps,
the variants interleaved ``--rounds`` times; ratios are plain / folded of the same round.

Run: ``python benchmarks/sweep_step.py [--models small-resnet,cnn] [--repeat 15] [--rounds 2]
[--compile]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fit_speed import scenario_files

from bna_export.model import load_model


def step_ms(run, x: torch.Tensor, repeat: int) -> float:
    def once() -> None:
        xi = x.clone().requires_grad_(True)
        out = run(xi)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.logsumexp(1).sum().backward()

    for _ in range(3):
        once()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small-resnet,cnn")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of each")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch threads 2, load average {os.getloadavg()[0]:.2f} at start")
    print("| model | images | round | f as loaded ms | folded ms | ratio | compiled ms | "
          "compiled folded ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            files = scenario_files(name, Path(tmp))
            x = torch.from_numpy(np.load(files["defender"])["x"])
            model = load_model(str(files["model"]), None, x[:2], x)
            model.use_channels_last(x[:8])
            alone = model.alone
            if alone is None:
                raise SystemExit(f"{name}: nothing was folded")

            def plain(xi: torch.Tensor, m=model, alone=alone) -> torch.Tensor:
                m.alone = None
                try:
                    return m(xi)
                finally:
                    m.alone = alone

            compiled = {}
            if args.compile:
                fmt = torch.channels_last if model.channels_last else torch.contiguous_format
                for key, net in (("plain", model.net), ("folded", alone)):
                    fn = torch.compile(net)
                    compiled[key] = lambda xi, fn=fn, fmt=fmt: fn(xi.contiguous(memory_format=fmt))
            for r in range(args.rounds):
                a = step_ms(plain, x, args.repeat)
                b = step_ms(model, x, args.repeat)
                c = step_ms(compiled["plain"], x, args.repeat) if compiled else float("nan")
                d = step_ms(compiled["folded"], x, args.repeat) if compiled else float("nan")
                print(f"| {name} | {len(x)} | {r + 1} | {a:.1f} | {b:.1f} | {a / b:.2f} | "
                      f"{c:.1f} | {d:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
