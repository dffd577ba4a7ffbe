"""Detection rules rescored on saved sweeps: every ``.npz`` that ``benchmarks/families.py
--save`` wrote in a folder (pair sizes and pooled sizes per family, no model needed), one row
per sweep: each family's most-named target (the vote rule: sources whose smallest trigger goes
to it, of those that could) with its effect (how many times smaller its triggers are than their
sources' typical one), and the targets the shipped rules find (before the intrinsic check,
which needs the model) against those the previous defaults found (no vote rule, no effect
floor). The true targets follow from the file name
(``cnn-ATTACK-SEED``: 7, all-to-all: every class; ``*clean*`` and ``equidistant-*``: none).

Run: ``python benchmarks/saved_sweeps.py [benchmarks/sweep-sizes-2026-12-05] [--set
detect.min_effect=1.3]`` (``--set`` as in ``fit``; it changes the "shipped" column).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from bna_export.settings import Settings, with_overrides
from bna_export.sweep import detect_sizes
from bna_export.target_rules import row_minimum_votes


def truth_of(name: str) -> str:
    if "a2a" in name:
        return "all-to-all"
    return "none" if "clean" in name or name.startswith("equidistant") else "[7]"


def detect(saved: np.lib.npyio.NpzFile, settings: Settings):
    fams = [k.removeprefix("pairs_") for k in saved.files if k.startswith("pairs_")]
    sizes = {f: saved[f"pairs_{f}"] for f in fams}
    return detect_sizes(sizes, None, {f: saved[f"pooled_{f}"] for f in fams}, settings)


def found(det) -> str:
    if det.all_to_all:
        return f"all-to-all, {len(det.all_to_all)} pairs"
    if not det.targets:
        return "none"
    return ", ".join(f"{t} ({len(s)} source{'s' * (len(s) > 1)})" for t, s in det.sources.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "folder", nargs="?", default=str(Path(__file__).parent / "sweep-sizes-2026-12-05")
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    shipped = with_overrides(Settings(), args.overrides)
    before = dataclasses.replace(
        shipped, detect=dataclasses.replace(shipped.detect, vote_rule=False, min_effect=0.0)
    )
    print(
        "| sweep | truth | each family's most-named target: votes, effect | shipped rules "
        "| before (no vote rule, no effect floor) |"
    )
    print("|---|---|---|---|---|")
    for path in sorted(Path(args.folder).glob("*.npz")):
        saved = np.load(path)
        det = detect(saved, shipped)
        cells = []
        for fam, eff in det.effects.items():
            votes, voters = row_minimum_votes(saved[f"pairs_{fam}"])
            t = int(votes.argmax())
            cells.append(f"{fam} {t}: {votes[t]} of {voters[t]}, ×{eff[t]:.2f}")
        print(
            f"| {path.stem} | {truth_of(path.stem)} | {'; '.join(cells)} | {found(det)} | "
            f"{found(detect(saved, before))} |"
        )


if __name__ == "__main__":
    main()
