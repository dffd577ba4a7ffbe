"""SHA-256 of the fit files and built graphs that fixed inputs give: run it before and after a
change that should not change behaviour (a refactor), and compare the two outputs.

The inputs (a 5-class 16×16 CNN poisoned all-to-one with a 3×3 patch, as ``model.pt2`` and as
``torch.onnx.export``'s ``model.onnx``, and the defender's clean images) are written once into
``--dir`` and reused, so both runs see the same bytes. Then, through the command line as a user
runs it: ``fit`` with no hint (about a minute), ``fit --targets 0``,
``fit --pairs 1:0,2:0``, ``fit`` from the ONNX, and ``build`` of each on the ONNX.

Run: ``python benchmarks/identity.py --dir /tmp/identity`` (prints one ``name sha256`` line per
file).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

FITS = {
    "detect": ["--model", "model.pt2", "--epochs", "4"],
    "targets": ["--model", "model.pt2", "--targets", "0", "--epochs", "4"],
    "pairs": ["--model", "model.pt2", "--pairs", "1:0,2:0", "--epochs", "4"],
    "onnx": ["--model", "model.onnx", "--targets", "0", "--epochs", "4"],
}


def make_inputs(folder: Path) -> None:
    """Train and write the model (.pt2 and .onnx) and the defender's images, once."""
    from bna_export.lab.scenario import (
        build_scenario,
        export_model,
        export_onnx,
        save_npz,
        synthetic_scenario_data,
    )

    x, y = synthetic_scenario_data()
    sc = build_scenario(x, y, attack="patch", target=0, width=8, epochs=6, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    export_model(sc.net, sc.test.x, folder / "model.pt2")
    export_onnx(sc.net, sc.test.x, folder / "model.onnx")
    save_npz(folder / "defender.npz", x=sc.defender.x, y=sc.defender.y)


def cli(folder: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "bna_export.cli.main", *args, "--quiet"]
    subprocess.run(cmd, cwd=folder, check=True, stdout=subprocess.DEVNULL)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, type=Path, help="where the inputs live (made once)")
    args = ap.parse_args()
    folder = args.dir.resolve()
    if not (folder / "defender.npz").exists():
        make_inputs(folder)
    for name in ("model.pt2", "model.onnx", "defender.npz"):
        print(f"{name:<20} {digest(folder / name)}")
    for name, opts in FITS.items():
        fit, graph = f"{name}.bna", f"{name}.onnx"
        cli(folder, "fit", *opts, "--data", "defender.npz", "-o", fit, "--seed", "0")
        cli(folder, "build", "model.onnx", "--fit", fit, "-o", graph)
        print(f"{fit:<20} {digest(folder / fit)}", flush=True)
        print(f"{graph:<20} {digest(folder / graph)}", flush=True)


if __name__ == "__main__":
    main()
