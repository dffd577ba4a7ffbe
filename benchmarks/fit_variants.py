"""The Θ fit under other settings, on the panel's and the unseen checks' models, with the known
target: each row's per-target trigger estimates are made once (default settings, as a no-hint
row makes its true target's), then Θ is fitted from them under the defaults and under every
``--variant``, and each fit's ACC, ASR, SIA, TPR and FPR are printed. Paired: the variants of a
row share its model, its estimates and (unless a variant sets ``seed``) the fit's seed.

The default fit of a row is the fit a no-hint panel row makes for its true target (a target's
Θ does not depend on the others fitted with it), so the ``default`` lines repeat the panel's
ASR and SIA for the one-target rows. Each row also prints its patch estimate's size and its
compactness (:func:`bna_export.families.compactness`, which gates ``fit.patch_widen``).

Run: ``python benchmarks/fit_variants.py --rows panel:cnn:patch:1,unseen:vgg11-bn:8:patch5-t6
--variant no-widen=fit.patch_widen=0 [--variant seed1=seed=1 ...]``; a variant's
``use=patch+blend`` fits Θ on those families' estimates only, ``use=own`` on the attack's own
trigger. A row is
``panel:ARCH:ATTACK:SEED[:TARGET]`` (an all-to-one panel row; TARGET another class to fit, e.g.
a false target) or ``unseen:ARCH:WIDTH:CASE`` (``benchmarks/unseen.py``). ``--only-compact X``
fits only the rows whose patch estimate's compactness is at least X (the rows that
``fit.patch_widen`` changes); ``--own-trigger`` adds a fit on the attack's own trigger. About
40 s a row for the digits CNN on 2 CPU cores, 3–8 minutes for the ResNets (most of it the
fits: 12 s each on the CNN, 50 s on the ResNets).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import panel
import torch
import unseen
from mitigation import oracle, repaired_metrics

from bna_export.defend import fit_defence
from bna_export.families import compactness
from bna_export.fit import fit_thetas
from bna_export.fitfile import Routing
from bna_export.lab.scenario import Scenario
from bna_export.mitigated import flag_drops
from bna_export.model import adapt_module
from bna_export.settings import Settings, with_overrides


def row_scenario(spec: str) -> tuple[str, Scenario, int]:
    """A row's label, model and data, and the target to fit."""
    kind, *rest = spec.split(":")
    if kind == "panel":
        arch, attack, seed = rest[0], rest[1], int(rest[2])
        target = int(rest[3]) if len(rest) > 3 else panel.TARGET
        sc = panel.panel_scenario(arch, attack, seed)
        return f"{arch} {attack} {seed} (t {target})", sc, target
    if kind == "unseen":
        arch, width, case = rest[0], int(rest[1]), rest[2]
        target = unseen.CASES[case][1]
        return (
            f"{arch}-w{width} {case} (t {target})",
            unseen.case_scenario(case, arch, width),
            target,
        )
    raise SystemExit(f"a row is panel:ARCH:ATTACK:SEED[:TARGET] or unseen:ARCH:WIDTH:CASE: {spec}")


def run_row(
    spec: str, variants: dict[str, list[str]], only_compact: float | None, own: bool = False
) -> list[dict]:
    label, sc, target = row_scenario(spec)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    base = Settings()
    out = fit_defence(model, sc.defender, targets=[target], settings=base)
    ests = out.triggers[target]
    masks = [e.tensors()["mask"] for e in ests if e.family == "patch"]
    compact = [round(compactness(m), 3) for m in masks]
    info = {"row": label, "families": out.record.families[target], "compactness": compact}
    info["patch_size"] = [round(float(m.sum()), 1) for m in masks]
    if only_compact is not None and not any(c >= only_compact for c in compact):
        return [{**info, "variant": None}]
    sources = {target: [k for k in range(10) if k != target]}
    routings: dict[float, Routing] = {}  # per flag drop: the variants that share one share it
    rows = []
    real = [oracle(sc.trigger, tuple(sc.defender.x.shape[1:]), target)] if sc.targets else []
    fits = [(name, *variant(base, sets, ests, real)) for name, sets in variants.items()]
    if own and real:  # Θ fitted on the attack's own trigger, default settings
        fits.append(("own trigger", base, real))
    for name, s, used in fits:
        t0 = time.perf_counter()
        res = fit_thetas(
            model, sc.defender, [target], sources, {target: used}, (0.0, 1.0), s.fit,
            s.histogram, seed=s.seed,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        drop = s.fit.flag_drop
        if drop not in routings:
            drops = flag_drops(model, sc.defender, [target], [None], drop)
            routings[drop] = Routing((None,), drops)
        m = repaired_metrics(model, sc, target, res.thetas, routings[drop])
        rows.append({**info, "variant": name, **m, "fit_seconds": seconds})
    return rows


def variant(
    base: Settings, sets: list[str], ests: list, real: list | None = None
) -> tuple[Settings, list]:
    """A variant's settings and the estimates it fits on (``use=FAMILY+FAMILY`` keeps only
    those families' estimates, ``use=own`` the attack's own trigger, ``real``, instead; every
    other item is a ``--set``)."""
    use = [s.partition("=")[2].split("+") for s in sets if s.startswith("use=")]
    kept = [e for e in ests if e.family in use[-1]] if use else ests
    if use and use[-1] == ["own"]:
        if not real:
            raise SystemExit("use=own needs an attacked row: a clean model has no trigger")
        kept = list(real)
    return with_overrides(base, [s for s in sets if not s.startswith("use=")]), kept


def split_sets(text: str) -> list[str]:
    """``a.b=1,c.d=2,3`` → ``["a.b=1", "c.d=2,3"]``: a piece without ``=`` continues the
    previous value (a tuple setting such as ``fit.trigger_scales=1,2``)."""
    out: list[str] = []
    for piece in (p for p in text.split(",") if p):
        if "=" in piece or not out:
            out.append(piece)
        else:
            out[-1] += "," + piece
    return out


def _cell(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description="The Θ fit under other settings, known target (see the module docstring)."
    )
    ap.add_argument("--rows", required=True, help="comma-separated rows (see the docstring)")
    ap.add_argument(
        "--variant", action="append", default=[],
        help="NAME=section.field=value[,...]; use=FAMILY[+FAMILY] fits only those estimates",
    )  # fmt: skip
    ap.add_argument("--only-compact", type=float, default=None)
    ap.add_argument(
        "--own-trigger", action="store_true",
        help="also fit Θ on the attack's own trigger (what Θ does with a perfect estimate)",
    )  # fmt: skip
    ap.add_argument("--json", action="store_true", help="one JSON object per fit, no table")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    variants = {"default": []}
    for v in args.variant:
        name, _, sets = v.partition("=")
        variants[name] = split_sets(sets)
    if not args.json:
        print(
            "| row | families | patch size | compactness | variant | ACC | ASR | SIA | TPR | FPR |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.rows.split(","):
        for r in run_row(spec, variants, args.only_compact, args.own_trigger):
            if args.json:
                print(json.dumps(r), flush=True)
                continue
            head = f"| {r['row']} | {r['families']} | {r['patch_size']} | {r['compactness']} |"
            if r["variant"] is None:
                print(f"{head} (not fitted: below --only-compact) | | | | | |", flush=True)
                continue
            vals = " | ".join(_cell(r.get(k)) for k in ("acc", "asr", "sia", "tpr", "fpr"))
            print(f"{head} {r['variant']} | {vals} |", flush=True)


if __name__ == "__main__":
    main()
