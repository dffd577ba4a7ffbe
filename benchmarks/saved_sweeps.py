"""Detection rules rescored on saved sweeps: every ``.npz`` that ``benchmarks/families.py
--save`` wrote in a folder (pair sizes and pooled sizes per family, no model needed), one row
per sweep: each family's most-named target (the vote rule: sources whose smallest trigger goes
to it, of those that could) with its effect (how many times smaller its triggers are than their
sources' typical one), and the targets the shipped rules find (before the intrinsic check,
which needs the model) against those the previous defaults found (no vote rule, no effect
floor). The true targets are a row file's own (``true_targets``), else follow from the file
name (``cnn-ATTACK-SEED``: 7, all-to-all: every class; ``*clean*`` and ``equidistant-*``: none).

The next column lists the pairs whose own score passes the threshold (before the floor), with
the smallest ratio among them; the last, how universal each target found by the shipped rules
is: its pooled trigger over the median of its pairs' (the smallest over families; about 1 when
one trigger moves every source), and the lowest of that among the targets not found. Panel
row files (``benchmarks/panel.py``, which keep their sizes) are read too.

Run: ``python benchmarks/saved_sweeps.py [FOLDER or FILE ...] [--set detect.min_effect=1.3]``
(default: ``benchmarks/sweep-sizes-2026-12-05``; ``--set`` as in ``fit``; it changes the
"shipped" column).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from bna_export.settings import Settings, with_overrides
from bna_export.sweep import detect_sizes
from bna_export.target_rules import row_minimum_votes


def truth_of(name: str, path: Path | None = None) -> str:
    """The true targets: a row file's own (``true_targets``), else read off the name."""
    if path is not None and path.suffix == ".json":
        row = json.loads(path.read_text())
        if "true_targets" in row and "a2a" not in name:
            return str(row["true_targets"]) if row["true_targets"] else "none"
    if "a2a" in name:
        return "all-to-all"
    return "none" if "clean" in name or name.startswith("equidistant") else "[7]"


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pair sizes and pooled sizes per family, from a ``families.py --save`` file or a panel
    row file (``benchmarks/panel.py``: its ``sizes`` and ``pooled_sizes``, null for NaN)."""
    if path.suffix == ".json":
        row = json.loads(path.read_text())
        arr = lambda v: np.array(v, dtype=np.float64)  # noqa: E731  (None -> NaN)
        return (
            {f: arr(z) for f, z in row["sizes"].items()},
            {f: arr(z) for f, z in row["pooled_sizes"].items()},
        )
    saved = np.load(path)
    fams = [k.removeprefix("pairs_") for k in saved.files if k.startswith("pairs_")]
    return {f: saved[f"pairs_{f}"] for f in fams}, {f: saved[f"pooled_{f}"] for f in fams}


def found(det) -> str:
    """Targets with their sources; ``column`` the column score of those the all-to-one rules
    found, in their family."""
    if det.all_to_all:
        return f"all-to-all, {len(det.all_to_all)} pairs"
    if not det.targets:
        return "none"
    out = []
    for t, s in det.sources.items():
        fam = det.all_to_one.get(t)
        column = f"; column {det.target_scores[fam][t]:.1f}" if fam else ""
        out.append(f"{t} ({len(s)} source{'s' * (len(s) > 1)}{column})")
    return ", ".join(out)


def over_threshold(det, threshold: float) -> str:
    """The pairs whose own score passes the threshold (large side), any family: how many, and
    the smallest ratio (row median / size) among them with its score."""
    best = []
    for fam, st in det.statistics.items():
        sc = det.scores[fam]
        ok = (sc >= threshold) & (st > np.nanmedian(st))
        best += [(float(st[p]), float(sc[p])) for p in zip(*np.nonzero(ok), strict=True)]
    if not best:
        return "none"
    ratio, score = min(best)
    return f"{len(best)}; smallest ×{ratio:.2f} ({score:.1f})"


def universality(sizes: dict, pooled: dict, t: int) -> float:
    """Target t's pooled size over the median of its pairs' sizes, the smallest over the
    families that have both (inf when none has)."""
    ratios = []
    for f, z in sizes.items():
        pairs = np.delete(z[:, t], t)  # the column without its diagonal
        if f in pooled and np.isfinite(pooled[f][t]) and np.isfinite(pairs).any():
            ratios.append(pooled[f][t] / np.nanmedian(pairs))
    return min(ratios, default=float("inf"))


def universal_cell(det, sizes: dict, pooled: dict) -> str:
    """The last column: each found target's universality, and the lowest of the others'."""
    if det.all_to_all:
        return "-"
    k = next(iter(sizes.values())).shape[0]
    u = {t: universality(sizes, pooled, t) for t in range(k)}
    rest = [v for t, v in u.items() if t not in det.sources and np.isfinite(v)]
    mine = ", ".join(f"{t}: {u[t]:.2f}" for t in det.sources) or "none found"
    return f"{mine}; others from {min(rest):.2f}" if rest else mine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "paths",
        nargs="*",
        default=[str(Path(__file__).parent / "sweep-sizes-2026-12-05")],
        help="folders of .npz sweeps, or single .npz / panel-row .json files",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    shipped = with_overrides(Settings(), args.overrides)
    before = dataclasses.replace(
        shipped, detect=dataclasses.replace(shipped.detect, vote_rule=False, min_effect=0.0)
    )
    print(
        "| sweep | truth | each family's most-named target: votes, effect | shipped rules "
        "| before (no vote rule, no effect floor) | pairs over the threshold: count; smallest "
        "ratio (score) | pooled / median pair: targets found; the others |"
    )
    print("|---|---|---|---|---|---|---|")
    files = []
    for p in map(Path, args.paths):
        files += sorted(p.glob("*.npz")) if p.is_dir() else [p]
    for path in files:
        sizes, pooled = load(path)
        det = detect_sizes(sizes, None, pooled, shipped)
        old = detect_sizes(sizes, None, pooled, before)
        cells = []
        for fam, eff in det.effects.items():
            votes, voters = row_minimum_votes(sizes[fam])
            t = int(votes.argmax())
            cells.append(f"{fam} {t}: {votes[t]} of {voters[t]}, ×{eff[t]:.2f}")
        print(
            f"| {path.stem} | {truth_of(path.stem, path)} | {'; '.join(cells)} | {found(det)} | "
            f"{found(old)} | {over_threshold(old, shipped.detect.mad_threshold)} | "
            f"{universal_cell(det, sizes, pooled)} |"
        )


if __name__ == "__main__":
    main()
