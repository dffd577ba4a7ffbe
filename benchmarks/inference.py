"""Inference cost of the built graph against f alone, in ONNX Runtime on the CPU or on CUDA.

Trains a digits-sized CNN (28×28, width 16, 10 classes; seeded synthetic classes, so it runs
without the demo data) poisoned all-to-one to class 7, fits Θ for target 7 (a short fit: the
timing does not depend on its quality), exports f with ``torch.onnx.export`` (default, BN
folded), builds the graph, and times on the same clean inputs and the same runtime: f alone;
the built graph; a graph that runs every g_t on the whole batch; and STRIP with its usual 100
blends per input (f on 100 superimposed copies). Batch 1 with a sample f does not send to the
target, and batches of clean traffic (about one sample in ten goes to the target). With
``--provider cuda`` it also checks that the built graph gives the same labels and flags on CUDA
as on the CPU, on clean and triggered images.

Run: ``python benchmarks/inference.py [--threads 2] [--repeats 200] [--batches 1,64]
[--provider cpu|cuda]``. Times are medians of one ``session.run`` from NumPy (host-device
copies included on CUDA).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bna_export.defend import fit_defence
from bna_export.graph import build_graph
from bna_export.model import adapt_module
from bna_export.scenario import build_scenario, export_onnx
from bna_export.settings import FitSettings, ReverseSettings, Settings
from bna_export.zoo import synthetic_classes

TARGET = 7


def make_session(model: bytes | str, threads: int, provider: str = "cpu") -> ort.InferenceSession:
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    sess = ort.InferenceSession(model, options, providers=providers)
    if sess.get_providers()[0] != providers[0]:
        raise SystemExit(f"{providers[0]} did not take the session")
    return sess


def seconds(sessions: list[ort.InferenceSession], x: np.ndarray, repeats: int) -> list[float]:
    """Median wall time of one run of each session, the sessions interleaved run by run (so
    that a change of CPU clock or load hits all of them alike)."""
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for _ in range(5):
        for s, feed in zip(sessions, feeds, strict=True):
            s.run(None, feed)
    times = np.zeros((repeats, len(sessions)))
    for r in range(repeats):
        for k, (s, feed) in enumerate(zip(sessions, feeds, strict=True)):
            t0 = time.perf_counter()
            s.run(None, feed)
            times[r, k] = time.perf_counter() - t0
    return [float(t) for t in np.median(times, 0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    x, y = synthetic_classes(10, 300, 28, seed=1)
    sc = build_scenario(x, y, attack="patch", target=TARGET, width=16, epochs=3, seed=0)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    quick = Settings(reverse=ReverseSettings(steps=100), fit=FitSettings(epochs=3))
    fit = fit_defence(model, sc.defender, targets=[TARGET], settings=quick).fit
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.onnx"
        export_onnx(sc.net, sc.test.x, path)
        built = build_graph(path, fit).data
        sessions = {
            "f alone": make_session(str(path), args.threads, args.provider),
            "built graph": make_session(built, args.threads, args.provider),
            "every g_t on the whole batch": make_session(
                build_graph(path, fit, whole_batch=True).data, args.threads, args.provider
            ),
        }
        f_sess = sessions["f alone"]
        name = f_sess.get_inputs()[0].name
        agree = ""
        if args.provider == "cuda":
            everything = np.concatenate([sc.test.x, sc.triggered["x"]])
            on_gpu = sessions["built graph"].run(["label", "triggered"], {name: everything})
            on_cpu = make_session(built, args.threads).run(
                ["label", "triggered"], {name: everything}
            )
            same = all((a == b).all() for a, b in zip(on_gpu, on_cpu, strict=True))
            agree = (
                f"; built graph on CUDA vs CPU, {len(everything)} clean and triggered images "
                f"({int(on_cpu[1].sum())} flagged): labels and flags "
                + ("identical" if same else "DIFFER")
            )
        clean = sc.test.x[sc.test.y != TARGET]
        labels = f_sess.run(None, {name: clean})[0].argmax(1)
        inputs = {
            n: clean[labels != TARGET][:1]
            if n == 1
            else np.resize(sc.test.x, (n, *sc.test.x.shape[1:]))
            for n in batches
        }
        routed = {
            n: int((f_sess.run(None, {name: xb})[0].argmax(1) == TARGET).sum())
            for n, xb in inputs.items()
        }
        rng = np.random.default_rng(0)
        blends = {
            n: (
                0.5 * np.repeat(xb, 100, 0)
                + 0.5 * sc.defender.x[rng.integers(0, len(sc.defender), 100 * n)]
            ).astype(np.float32)
            for n, xb in inputs.items()
        }
        rows = []
        for n, xb in inputs.items():
            row = {
                "batch": n,
                **dict(
                    zip(sessions, seconds(list(sessions.values()), xb, args.repeats), strict=True)
                ),
            }
            (strip,) = seconds([f_sess], blends[n], max(5, args.repeats // 20))
            row["STRIP (100 blends)"] = strip
            rows.append(row)
    where = "CUDA" if args.provider == "cuda" else f"CPU, {args.threads} threads"
    sent = ", ".join(f"batch {n}: {k}" for n, k in routed.items())
    print(f"{where}, ONNX Runtime {ort.__version__}; samples f sends to the target: {sent}{agree}")
    keys = [k for k in rows[0] if k != "batch"]
    print("| batch | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r[k] * 1e3:.3f} ms ({r[k] / r['f alone']:.2f}×)" for k in keys]
        print(f"| {r['batch']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
