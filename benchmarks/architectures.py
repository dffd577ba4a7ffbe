"""The repair of each architecture users deploy, as ``tests/test_architectures.py`` makes them
(seeded synthetic colour classes, 5 classes of 16×16, a 3×3 patch all-to-one to class 0), at a
chosen width and torch thread count: fitted with the known target from the ``.pt2`` and from the
``dynamo`` ONNX export, default settings; prints ASR, the share of clean target-class test
images flagged (FPR), the ACC drop and, with ``--repeat``, whether a second fit of the same model
gives the same fit file.

Run: ``python benchmarks/architectures.py [--arch mobilenetv2-short,resnet18] [--width 8]
[--threads 1,2,4] [--repeat] [--json]``. One process per thread count (training too depends on
it), so each row is what a user with that many threads gets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bna_export import artifact
from bna_export.defend import fit_defence
from bna_export.fitfile import Mitigation
from bna_export.lab.architectures import ARCHITECTURES
from bna_export.lab.scenario import build_scenario, export_model, export_onnx_as
from bna_export.lab.zoo import synthetic_classes
from bna_export.metrics import compute_metrics
from bna_export.mitigated import predict_mitigated
from bna_export.model import load_model

ZOO = ("cnn", "normalized-cnn", "normalized-cnn-inplace", *ARCHITECTURES)
TARGET = 0


def one(arch: str, width: int, threads: int, repeat: bool) -> list[dict]:
    """Train, export and fit one architecture in this process (``threads`` torch threads)."""
    torch.set_num_threads(threads)
    x, y = synthetic_classes(5, 300, 16, channels=3, seed=3)
    sc = build_scenario(
        x, y, attack="patch", target=TARGET, arch=arch, width=width, epochs=8, seed=0
    )
    folder = Path(tempfile.mkdtemp(prefix="bna-arch-"))
    example, clean = torch.from_numpy(sc.test.x[:2]), torch.from_numpy(sc.defender.x)
    export_model(sc.net, sc.test.x, folder / "model.pt2")
    export_onnx_as(sc.net, example, folder / "model.onnx", "dynamo")
    rows = []
    for name in ("model.pt2", "model.onnx"):
        model = load_model(str(folder / name), None, example, clean)
        fits = [
            fit_defence(model, sc.defender, targets=[TARGET]).fit for _ in range(2 if repeat else 1)
        ]
        m = Mitigation.from_fit(fits[0])
        pc = predict_mitigated(model, m.targets, m.thetas, sc.test.x, routing=m.routing)
        pt = predict_mitigated(model, m.targets, m.thetas, sc.triggered["x"], routing=m.routing)
        acc0 = float((predict_mitigated(model, [], None, sc.test.x).label == sc.test.y).mean())
        t = sc.triggered
        r = compute_metrics(
            pc.label, sc.test.y, pc.triggered, pt.label, t["y"], t["attack_label"], pt.triggered,
            [TARGET],
        )  # fmt: skip
        digests = [hashlib.sha256(artifact.encode(f)).hexdigest() for f in fits]
        rows.append(
            {
                "arch": arch,
                "width": width,
                "threads": threads,
                "from": name.split(".")[1],
                "asr": float(r["asr"]),
                "fpr": float(r["fpr"]),
                "acc_drop": acc0 - float(r["acc"]),
                "repeatable": (len(set(digests)) == 1) if repeat else None,
                "fit_sha256": digests[0],
                "bn_layers": len(model.layers),
                "acc_before": acc0,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = ", ".join(ZOO)
    ap.add_argument("--arch", default="mobilenetv2-short", help=f"comma-separated of {names}")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--threads", default="2", help="torch thread counts, comma-separated")
    ap.add_argument("--repeat", action="store_true", help="fit twice: is the fit file the same?")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        arch, threads = args.child.split(":")
        print(json.dumps(one(arch, args.width, int(threads), args.repeat)))
        return
    unknown = [a for a in args.arch.split(",") if a not in ZOO]
    if unknown:
        ap.error(f"unknown architecture(s) {', '.join(unknown)}; expected some of {names}")
    rows = []
    for arch in args.arch.split(","):
        for threads in args.threads.split(","):
            cmd = [sys.executable, __file__, "--child", f"{arch}:{threads}"]
            cmd += ["--width", str(args.width)] + (["--repeat"] if args.repeat else [])
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{arch} at {threads} threads failed:\n{run.stderr[-2000:]}")
            rows += json.loads(run.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| arch | width | threads | from | ASR % | FPR % | ACC drop (points) | repeatable |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rep = "-" if r["repeatable"] is None else ("yes" if r["repeatable"] else "**no**")
        print(
            f"| {r['arch']} | {r['width']} | {r['threads']} | {r['from']} | {100 * r['asr']:.1f} "
            f"| {100 * r['fpr']:.1f} | {100 * r['acc_drop']:.1f} | {rep} |"
        )


if __name__ == "__main__":
    main()
