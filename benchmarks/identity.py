"""SHA-256 of the fit files and built graphs that fixed inputs give: run it before and after a
change that should not change behaviour (a refactor), and compare the two outputs.

The inputs (a 5-class 16×16 CNN poisoned all-to-one with a 3×3 patch, as ``model.pt2`` and as
``torch.onnx.export``'s ``model.onnx``, and the defender's clean images) are written once into
``--dir`` and reused, so both runs see the same bytes. Then, through the command line as a user
runs it: ``fit`` with no hint (about a minute), ``fit --targets 0``,
``fit --pairs 1:0,2:0``, ``fit`` from the ONNX, and ``build`` of each on the ONNX.

With ``--architectures``, also every architecture of :mod:`bna_export.lab.architectures` at
width 8 on 16×16 colour images (random weights, seeded BN statistics: the rewrite rules see
every kind of layer) as a ``.pt2`` and in the four ONNX export forms users deploy: ``fit
--targets 0,2`` (short settings) and ``build`` of each form.

Run: ``python benchmarks/identity.py --dir /tmp/identity [--architectures]`` (prints one
``name sha256`` line per file).
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


ARCHITECTURES = (
    "small-resnet", "resnet18", "preact-resnet18", "vgg11-bn", "mobilenetv2-short", "se-silu",
    "densenet", "normalized-cnn", "cnn",
)  # fmt: skip
SHORT = ["--epochs", "3", "--set", "reverse.steps=60", "--set", "reverse.min_steps=20",
         "--set", "families=patch,perturbation"]  # fmt: skip


def make_architectures(folder: Path) -> None:
    """Every architecture with seeded random weights and BN statistics, as .pt2 and in every
    export form, and 12 synthetic colour images per class for the defender; once."""
    import torch

    from bna_export.lab.architectures import make_classifier
    from bna_export.lab.scenario import EXPORT_FORMS, export_model, export_onnx_as, save_npz
    from bna_export.lab.zoo import synthetic_classes

    x, y = synthetic_classes(5, 12, size=16, channels=3, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    save_npz(folder / "colour.npz", x=x, y=y)
    for arch in ARCHITECTURES:
        torch.manual_seed(0)
        net = make_classifier(arch, 3, 5, 16, width=8).eval()
        g = torch.Generator().manual_seed(1)
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        export_model(net, x, folder / f"{arch}.pt2")
        for form in EXPORT_FORMS:
            export_onnx_as(net, torch.from_numpy(x[:2]), folder / f"{arch}-{form}.onnx", form)


FORMS = ("dynamo", "dynamo-unoptimized", "legacy", "legacy-unfolded")  # lab.scenario.EXPORT_FORMS


def architectures(folder: Path) -> None:
    if not (folder / "colour.npz").exists():
        make_architectures(folder)
    for arch in ARCHITECTURES:
        fit = f"{arch}.bna"
        cli(folder, "fit", "--model", f"{arch}.pt2", "--data", "colour.npz", "--targets", "0,2",
            *SHORT, "-o", fit, "--seed", "0")  # fmt: skip
        print(f"{fit:<36} {digest(folder / fit)}", flush=True)
        for form in FORMS:
            graph = f"{arch}-{form}.built.onnx"
            cli(folder, "build", f"{arch}-{form}.onnx", "--fit", fit, "-o", graph)
            print(f"{graph:<36} {digest(folder / graph)}", flush=True)


def cli(folder: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "bna_export.cli.main", *args, "--quiet"]
    subprocess.run(cmd, cwd=folder, check=True, stdout=subprocess.DEVNULL)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, type=Path, help="where the inputs live (made once)")
    ap.add_argument(
        "--architectures", action="store_true", help="also every architecture and export form"
    )
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
    if args.architectures:
        architectures(folder / "architectures")


if __name__ == "__main__":
    main()
