"""Time and peak memory of ``bna-export fit`` as a user runs it, per model: the digits CNN (3 BN
layers), the ResNet-style digits classifier (9 BN layers) and ResNet-18 at 32×32 (coloured
digits, 20 BN layers; ``resnet18-w16`` is the same network at a quarter of the width, what 2 CPU
cores fit in minutes), each poisoned with a 3×3 patch (all-to-one, target 7) and trained here.

Each fit is a fresh ``bna-export fit`` process (``--targets 7``, and with ``--no-hint`` also
the full detection), timed wall-clock, its peak resident memory read from the kernel
(``wait4``), the repaired classifier evaluated on the held-out test and triggered images.

Run: ``python benchmarks/fit_speed.py [--models cnn,small-resnet,resnet18-w16,resnet18] [--no-hint]
[--device cpu|cuda] [--set SECTION.FIELD=VALUE ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bna_export.lab.scenario import build_scenario, coloured_digits, digits, write_scenario

MODELS = {  # name: (data, architecture, width, training epochs)
    "cnn": ("digits", "cnn", 16, 4),
    "small-resnet": ("digits", "small-resnet", 16, 4),
    "resnet18": ("coloured", "resnet18", 64, 2),  # 11 M parameters: for a GPU
    "resnet18-w16": ("coloured", "resnet18", 16, 3),  # its quarter width (0.7 M): CPU-sized
}
CLI = [sys.executable, "-m", "bna_export.cli.main"]


def timed(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak resident memory (MB, from the kernel's wait4) and stdout of one
    child process."""
    t0 = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = child.stdout.read().decode() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return seconds, usage.ru_maxrss / 1024, out


def scenario_files(name: str, folder: Path) -> dict[str, Path]:
    data, arch, width, epochs = MODELS[name]
    x, y = digits() if data == "digits" else coloured_digits()
    torch.manual_seed(0)
    sc = build_scenario(
        x, y, attack="patch", target=7, seed=0, arch=arch, width=width, epochs=epochs
    )
    return write_scenario(sc, folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,small-resnet,resnet18-w16")
    ap.add_argument("--no-hint", action="store_true", help="also time fit with no hint")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(2)
    sets = [a for o in args.overrides for a in ("--set", o)]
    print(f"torch threads 2, device {args.device}, load average {os.getloadavg()[0]:.2f}")
    print("| model | BN layers | fit | wall s | peak RSS MB | targets | ASR | SIA | FPR | ACC |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            files = scenario_files(name, Path(tmp))
            modes = [("--targets 7", ["--targets", "7"])]
            if args.no_hint:
                modes.append(("no hint", []))
            for label, extra in modes:
                fit = Path(tmp) / "fit.bna"
                command = [
                    *CLI, "fit", "--model", str(files["model"]), "--data",
                    str(files["defender"]), "-o", str(fit), "--device", args.device,
                    "--json", "--quiet", *extra, *sets,
                ]  # fmt: skip
                seconds, peak, out = timed(command)
                report = json.loads(out)
                ev = subprocess.check_output([
                    *CLI, "evaluate", str(files["model"]), "--fit", str(fit), "--clean",
                    str(files["test"]), "--triggered", str(files["triggered"]), "--json",
                ], text=True)  # fmt: skip
                after = json.loads(ev)
                before = after["model"]
                layers = len(json.loads(subprocess.check_output(
                    [*CLI, "inspect", str(fit), "--json"], text=True))["layers"])  # fmt: skip
                print(
                    f"| {name} | {layers} | {label} | {seconds:.0f} | {peak:.0f} | "
                    f"{report['targets']} | {after['asr']:.3f} | {after['sia']:.3f} | "
                    f"{after['fpr']:.3f} | {before['acc']:.3f} → {after['acc']:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
