"""What a warp backdoor fires on, and what Θ learns from: on warp rows of the panel or of
``unseen.py``, f's attack success under the real warp, under it at half and twice its size,
under random smooth warps (WaNet's uniform control grids) of several sizes, and under a uniform
sub-pixel shift; the per-target warp estimate's size and its cosine with the real control grid;
and Θ fitted (default settings, known target, fit seeds 0-2) on the attack's own warp, on a warp
of the same size in a random direction, and on the default estimates.

Run: ``python benchmarks/warp_response.py --rows panel:cnn:warp:1,unseen:cnn:16:wanet-t5``
(rows as in ``fit_variants.py``). About a minute and a half a digits-CNN row on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from fit_variants import row_scenario
from mitigation import oracle, repaired_metrics

from bna_export.defend import fit_defence
from bna_export.families import FAMILIES
from bna_export.fit import fit_thetas
from bna_export.fitfile import Routing
from bna_export.mitigated import flag_drops
from bna_export.model import adapt_module
from bna_export.reverse import TriggerEstimate
from bna_export.settings import Settings

WARP = FAMILIES["warp"]
SIZES = (0.16, 0.3, 0.55, 1.0)  # RMS of the random control grids, pixels
DRAWS = 8  # random warps per size


def success(net: torch.nn.Module, x: torch.Tensor, flow: torch.Tensor, target: int) -> float:
    """Share of ``x`` that f sends to ``target`` under the warp of control grid ``flow``."""
    with torch.no_grad():
        out = net(WARP.embed({"flow": flow[None]}, x[None], 0.0, 1.0)[0])
    return float((out.argmax(1) == target).float().mean())


def random_flow(shape: torch.Size, rms: float, gen: torch.Generator) -> torch.Tensor:
    """A WaNet control grid (uniform in [-1, 1]) scaled to ``rms`` pixels."""
    f = torch.rand(shape, generator=gen) * 2 - 1
    return f / f.pow(2).mean().sqrt() * rms


def with_flow(est: TriggerEstimate, flow: torch.Tensor) -> TriggerEstimate:
    """``est`` with its control grid replaced."""
    return TriggerEstimate(
        est.problem, est.size, est.success, est.steps, {"flow": flow.numpy()}, est.shape
    )


def run_row(spec: str, seeds: list[int]) -> None:
    label, sc, target = row_scenario(spec)
    if sc.trigger.kind != "warp" or not sc.targets:
        raise SystemExit(f"{spec}: not a warp backdoor")
    net = sc.net.eval()
    x, y = torch.from_numpy(sc.test.x), torch.from_numpy(sc.test.y)
    xs = x[y != target]
    own = oracle(sc.trigger, tuple(sc.defender.x.shape[1:]), target)
    real = own.tensors()["flow"][0]
    rms = float(real.pow(2).mean().sqrt())
    gen = torch.Generator().manual_seed(0)
    print(f"## {label}: real warp {rms:.2f} px RMS", flush=True)
    at = [success(net, xs, real * k, target) for k in (1.0, 0.5, 2.0)]
    print(f"- f's success: real {at[0]:.3f}, half {at[1]:.3f}, double {at[2]:.3f}")
    for size in SIZES:
        s = [success(net, xs, random_flow(real.shape, size, gen), target) for _ in range(DRAWS)]
        spread = f"{min(s):.3f}-{max(s):.3f}"
        print(f"- {DRAWS} random warps of {size} px: mean {np.mean(s):.3f} ({spread})")
    for shift in (0.25, 0.5):
        flow = torch.zeros_like(real)
        flow[0] = shift
        print(f"- a uniform {shift} px shift: {success(net, xs, flow, target):.3f}")
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    base = Settings()
    ests = fit_defence(model, sc.defender, targets=[target], settings=base).triggers[target]
    for e in (e for e in ests if e.family == "warp"):
        f = e.tensors()["flow"][0]
        cos = torch.nn.functional.cosine_similarity(f.flatten(), real.flatten(), dim=0)
        print(f"- the warp estimate: {float(f.pow(2).mean().sqrt()):.2f} px, cosine {cos:.2f}")
    sources = {target: [k for k in range(10) if k != target]}
    routing = Routing((None,), flag_drops(model, sc.defender, [target], [None], base.fit.flag_drop))
    fits = {
        "own warp": [own],
        "own size, random direction": [with_flow(own, random_flow(real.shape, rms, gen))],
        "the default estimates": list(ests),
    }
    print(f"\n| Θ fitted on | ASR % / FPR %, fit seeds {', '.join(map(str, seeds))} |\n|---|---|")
    for name, used in fits.items():
        cells = []
        for seed in seeds:
            res = fit_thetas(
                model, sc.defender, [target], sources, {target: used}, (0.0, 1.0), base.fit,
                base.histogram, seed=seed,
            )  # fmt: skip
            m = repaired_metrics(model, sc, target, res.thetas, routing)
            cells.append(f"{100 * m['asr']:.1f} / {100 * m['fpr']:.1f}")
        print(f"| {name} | {', '.join(cells)} |", flush=True)
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", required=True, help="comma-separated warp rows (fit_variants.py's)")
    ap.add_argument("--seeds", default="0,1,2", help="fit seeds (default 0,1,2)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    for spec in args.rows.split(","):
        run_row(spec, [int(s) for s in args.seeds.split(",")])


if __name__ == "__main__":
    main()
