"""Fitting from the deployed ONNX alone vs from the PyTorch module, on the same poisoned model.

For each case: trains the poisoned CNN, exports it with ``torch.onnx.export`` (default: BN folded
into the Convs, weights in an external-data file), runs ``fit`` with no hint on the module and on
the ONNX (``fit --model model.onnx``), and prints the targets and sources each found and the
repaired ASR/SIA on the triggered test images.

Run: ``python benchmarks/onnx_fit.py [--digits]`` (the 8-class synthetic all-to-one case, about
2 minutes; ``--digits`` adds the demo's digits case, about 10 more minutes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bna_export.defend import fit_defence
from bna_export.fitfile import Mitigation
from bna_export.lab.scenario import build_scenario, digits, export_onnx, synthetic_scenario_data
from bna_export.mitigated import predict_mitigated
from bna_export.model import adapt_module, load_model


def repaired(model, fit, triggered) -> tuple[float, float]:
    m = Mitigation.from_fit(fit)
    pred = predict_mitigated(model, m.targets, m.thetas, triggered["x"], routing=m.routing)
    asr = float((pred.label == triggered["attack_label"]).mean())
    return asr, float((pred.label == triggered["y"]).mean())


def compare(name: str, sc) -> None:
    x = sc.defender.x
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(sc.net, sc.test.x, path)
        models = {
            "PyTorch module": adapt_module(sc.net, torch.from_numpy(sc.test.x[:2])),
            "model.onnx": load_model(str(path), None, torch.from_numpy(x[:2]), torch.from_numpy(x)),
        }
        for kind, model in models.items():
            t0 = time.perf_counter()
            out = fit_defence(model, sc.defender)
            rec = out.record
            asr, sia = repaired(model, out.fit, sc.triggered)
            measured = sum(la.measured for la in model.layers)
            print(
                f"| {name} | {kind} | {len(model.layers)} ({measured} measured) | "
                f"{rec.targets} | { {t: list(v) for t, v in rec.sources.items()} } | "
                f"{asr:.3f} | {sia:.3f} | "
                f"{time.perf_counter() - t0:.0f} s |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", action="store_true", help="also the demo's digits case")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("| case | fitted from | h layers | targets | sources | ASR | SIA | fit time |")
    print("|---|---|---|---|---|---|---|---|")
    x, y = synthetic_scenario_data(n_classes=8, equidistant=True)
    sc = build_scenario(x, y, attack="patch", target=0, width=8, epochs=6, seed=0)
    compare("synthetic 8 classes, patch, target 0", sc)
    if args.digits:
        x, y = digits()
        compare("digits, patch, target 7", build_scenario(x, y, attack="patch", target=7, seed=1))


if __name__ == "__main__":
    main()
