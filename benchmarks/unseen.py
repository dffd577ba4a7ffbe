"""Panel rows with attack settings the panel never uses: other targets than 7, another patch
size, weaker blend, SIG, warp and chessboard triggers, other seeds; the digits CNN, no hint,
default settings, as ``panel.py`` runs a row (same columns, same JSON).

It is the check that the method was not fitted to the panel: every case below differs from
every panel row in its target, its seed and (but for the clean rows) its trigger's strength or
place, and ``--arch`` adds architectures the panel never fits.

Run: ``python benchmarks/unseen.py --out out/unseen [--cases patch5-t2,clean-5]`` writes one
JSON per row (``ARCH-CASE-SEED.json``); ``python benchmarks/panel.py --assemble out/unseen``
prints the table. About 3–4 minutes a row on 2 CPU cores. ``--arch vgg11-bn --width 8`` (any
architecture of :mod:`bna_export.lab.architectures`) runs the cases on another architecture
than the panel's two.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import panel
import torch

from bna_export.lab.scenario import Scenario, build_scenario, coloured_digits, digits
from bna_export.settings import Settings, with_overrides

CASES: dict[str, tuple[str | None, int, int, dict]] = {
    # name: (attack, target, seed, trigger options; latent_weight: the adaptive attack's)
    "patch5-t2": ("patch", 2, 5, {"size": 5}),
    "patch5-t4": ("patch", 4, 10, {"size": 5}),
    "patch5-t6": ("patch", 6, 28, {"size": 5}),
    "blend10-t3": ("blend", 3, 6, {"alpha": 0.1}),
    "sig10-t0": ("sig", 0, 7, {"amplitude": 10 / 255}),
    "warp05-t5": ("warp", 5, 8, {"strength": 0.5}),
    "wanet-t5": ("warp", 5, 8, {"strength": 0.5, "cross": 2.0}),  # warp05-t5 in noise mode
    "wanet-t5-e12": ("warp", 5, 8, {"strength": 0.5, "cross": 2.0, "epochs": 12}),
    "chess4-t9": ("chessboard", 9, 9, {"delta": 4 / 255}),
    "latent-patch-t3": ("patch", 3, 11, {"latent_weight": 0.1}),
    "latent-blend-t5": ("blend", 5, 12, {"latent_weight": 0.3}),
    "plain-patch-t3": ("patch", 3, 11, {}),  # latent-patch-t3's model trained without the term
    "clean-5": (None, 0, 5, {}),
    "clean-6": (None, 0, 6, {}),
    # colour: the digits at 32×32 in random colours (lab.scenario.coloured_digits)
    "colour-patch-t1": ("patch", 1, 13, {"data": "coloured"}),
    "colour-blend-t8": ("blend", 8, 14, {"alpha": 0.15, "data": "coloured"}),
    "colour-sig-t4": ("sig", 4, 15, {"data": "coloured"}),
    "colour-warp-t6": ("warp", 6, 16, {"strength": 1.0, "data": "coloured"}),
    "colour-chess-t2": ("chessboard", 2, 17, {"delta": 6 / 255, "data": "coloured"}),
    "colour-pixel-t5": ("pixel", 5, 18, {"delta": 1.0, "data": "coloured"}),
    "colour-clean": (None, 0, 19, {"data": "coloured"}),
    # the same two models trained 12 epochs instead of 4
    "colour-pixel-t5-e12": ("pixel", 5, 18, {"delta": 1.0, "data": "coloured", "epochs": 12}),
    "colour-blend-t8-e12": ("blend", 8, 14, {"alpha": 0.15, "data": "coloured", "epochs": 12}),
    # and the missed patch and the clean model, trained 12 epochs
    "colour-patch-t1-e12": ("patch", 1, 13, {"data": "coloured", "epochs": 12}),
    "colour-clean-e12": (None, 0, 19, {"data": "coloured", "epochs": 12}),
}
"""The cases: a 5×5 patch (the panel's is 3×3) at three places (seed 5: over the digit's middle,
rows 10-14, columns 12-16; seed 10: the top-left corner, from (3, 3); seed 28: the bottom-left
edge, from (22, 1)), a blend at α = 0.1 (0.2), SIG stripes at
Δ = 10/255 (20/255), a warp at s = 0.5 (1), a chessboard at ±4/255 (±8/255), the adaptive
attack (``latent-``: the panel's 3×3 patch and α = 0.2 blend, trained to keep the BN channels'
distributions on triggered images, ``latent_weight``: :mod:`bna_export.lab.adaptive`, the
largest of 0.1 and 0.3 at which f's ASR stayed at least 94 % on the panel's seed-0 model,
``benchmarks/adaptive.py``; ``plain-patch-t3``: the same model trained without it), two
clean models of seeds the panel does not train, and ``colour-``: colour images (the digits at
32×32, each painted in a random foreground and background colour, so that colour carries no
class) with a 3×3 patch of random colours, a blend at α = 0.15, SIG at Δ = 20/255, a warp at
s = 1, a chessboard at ±6/255, a single pixel at full strength, and a clean model (``-e12``: the
pixel's, the blend's, the patch's and the clean model trained 12 epochs instead of 4).
``wanet-``: ``warp05-t5``'s model trained in WaNet's noise mode (cross ratio 2: twice as many
images as it poisons warped by the trigger plus a random half-pixel offset at every pixel, at
their own labels; :meth:`~bna_export.lab.attacks.Trigger.cross_copies`), 4 and 12 epochs."""


def case_scenario(name: str, arch: str = "cnn", width: int | None = 16) -> Scenario:
    """The case's poisoned (or clean) classifier (the digits CNN unless ``arch`` names another
    of :func:`~bna_export.lab.architectures.make_classifier`'s, at ``width``) and its data."""
    attack, target, seed, options = CASES[name]
    options = dict(options)
    latent_weight = options.pop("latent_weight", 0.0)
    epochs = options.pop("epochs", 4)
    x, y = coloured_digits(32) if options.pop("data", "digits") == "coloured" else digits()
    return build_scenario(
        x,
        y,
        attack=attack,
        setting="a2o",
        target=target,
        seed=seed,
        epochs=epochs,
        poison_rate=0.1,
        trigger_options=options,
        arch=arch,
        width=width,
        latent_weight=latent_weight,
    )


def case_row(name: str, settings: Settings, arch: str = "cnn", width: int | None = 16) -> dict:
    """One case through ``panel.run_row``, with its own model and target; the row's arch is
    ``arch``, with ``-wWIDTH`` when not the CNN."""
    attack, target, seed, _ = CASES[name]
    sc = case_scenario(name, arch, width)
    label = arch if arch == "cnn" else f"{arch}-w{width}"
    label += "-colour" if CASES[name][3].get("data") == "coloured" else ""
    row = panel.run_row(label, attack or "clean", seed, settings, sc, target)
    return {**row, "attack": name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", required=True, help="folder to write one JSON per row into")
    ap.add_argument("--arch", default="cnn", help="cnn (default) or an architecture of the lab")
    ap.add_argument("--width", type=int, default=16, help="the model's width (default 16)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="as in fit")
    args = ap.parse_args()
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; expected some of {', '.join(CASES)}")
    torch.set_num_threads(2)
    print(f"2 torch threads, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.cases.split(","):
        row = case_row(name, with_overrides(Settings(), args.overrides), args.arch, args.width)
        path = folder / f"{row['arch']}-{name}-{row['seed']}.json"
        path.write_text(json.dumps(row, indent=1))
        print(panel.table([row]).splitlines()[2], flush=True)


if __name__ == "__main__":
    main()
