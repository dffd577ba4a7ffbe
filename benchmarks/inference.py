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

``--model resnet18`` (ResNet-18 at 32×32, trained for one epoch on coloured digits) and
``--model resnet50`` (ResNet-50-style bottleneck net at 224×224, random seeded weights: the
timing does not depend on them; its "clean" labels are f's own answers) time the models users
deploy; their target is the class f gives about one clean image in ten. Batches above 1 are
clean traffic in which f sends exactly round(n / 10) rows to the target; "floor" is 1 + that
share, the least a graph that runs g_t from the first layer on the routed rows can cost.

Run: ``python benchmarks/inference.py [--model cnn|resnet18|resnet50] [--threads 2]
[--repeats 200] [--batches 1,64] [--provider cpu|cuda] [--no-strip]``. Times are medians of one
``session.run`` from NumPy (host-device copies included on CUDA).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bna_export.data import Dataset
from bna_export.defend import fit_defence
from bna_export.export import build_graph
from bna_export.lab.scenario import Scenario, build_scenario, coloured_digits, export_onnx
from bna_export.lab.zoo import synthetic_classes
from bna_export.model import adapt_module
from bna_export.settings import FitSettings, ReverseSettings, Settings

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


def scenario(name: str) -> tuple[Scenario, int]:
    """The model to time, its data, and the target of its fit."""
    if name == "cnn":
        x, y = synthetic_classes(10, 300, 28, seed=1)
        return build_scenario(x, y, attack="patch", target=TARGET, width=16, epochs=3), TARGET
    if name == "resnet18":
        x, y = coloured_digits(32)
        sc = build_scenario(x, y, attack=None, arch="resnet18", width=64, epochs=1)
    else:  # random weights at 224×224; "clean" labels are f's own answers
        x, y = coloured_digits(32)
        x = torch.nn.functional.interpolate(torch.from_numpy(x[:1200]), size=224).numpy()
        torch.manual_seed(0)
        net = ResNet50().eval()
        with torch.no_grad():
            y = torch.cat([net(torch.from_numpy(b)).argmax(1) for b in np.split(x, 30)]).numpy()
        sc = Scenario(net, *_split(x, y), {}, None, "a2o", [])  # type: ignore[arg-type]
    with torch.no_grad():
        pred = sc.net.eval()(torch.from_numpy(sc.test.x[:512])).argmax(1).numpy()
    share = np.bincount(pred, minlength=10) / len(pred)
    present = [c for c in range(10) if (sc.defender.y == c).any()]
    return sc, int(min(present, key=lambda c: abs(share[c] - 0.1)))


def traffic(f_sess: ort.InferenceSession, x: np.ndarray, target: int, n: int) -> np.ndarray:
    """A batch of ``n`` clean test images of which f sends round(n / 10) to ``target``: clean
    traffic for one target of ten classes (a trained 10-class model's share; a model trained
    for one epoch gives its target anywhere from 8 % to 13 % of a batch), in a seeded order."""
    name = f_sess.get_inputs()[0].name
    routed = f_sess.run(None, {name: x})[0].argmax(1) == target
    k = round(n / 10)
    rng = np.random.default_rng(0)
    rows = np.concatenate(
        [
            rng.choice(np.flatnonzero(routed), k, replace=k > routed.sum()),
            rng.choice(np.flatnonzero(~routed), n - k, replace=n - k > (~routed).sum()),
        ]
    )
    return np.ascontiguousarray(x[rng.permutation(rows)])


def _split(x: np.ndarray, y: np.ndarray) -> tuple[Dataset, Dataset]:
    """Defender (up to 20 per class) and test images of a labelled set."""
    d = np.concatenate([np.flatnonzero(y == c)[:20] for c in np.unique(y)])
    rest = np.setdiff1d(np.arange(len(y)), d)
    return Dataset(x[d], y[d]), Dataset(x[rest], y[rest])


class ResNet50(torch.nn.Module):
    """A ResNet-50-shaped bottleneck net for 224×224 (7×7 stem, [3, 4, 6, 3] bottlenecks of
    expansion 4, 53 BN layers), with seeded random weights and BN statistics."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        nn = torch.nn

        class Bottleneck(nn.Module):
            def __init__(self, cin: int, mid: int, stride: int) -> None:
                super().__init__()
                out = 4 * mid
                self.body = nn.Sequential(
                    nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                    nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid),
                    nn.ReLU(), nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out),
                )  # fmt: skip
                self.short = (
                    nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                    if stride != 1 or cin != out
                    else nn.Identity()
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.relu(self.body(x) + self.short(x))

        layers, cin = [], 64
        for i, (mid, n) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            for j in range(n):
                layers.append(Bottleneck(cin, mid, 2 if i > 0 and j == 0 else 1))
                cin = 4 * mid
        self.net = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(cin, n_classes),
        )  # fmt: skip
        g = torch.Generator().manual_seed(0)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", choices=("cnn", "resnet18", "resnet50"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument(
        "--no-strip", action="store_true", help="skip STRIP (100 passes of f per input: slow)"
    )
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    sc, target = scenario(args.model)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    quick = Settings(reverse=ReverseSettings(steps=100), fit=FitSettings(epochs=3))
    fit = fit_defence(model, sc.defender, targets=[target], settings=quick).fit
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
            everything = np.concatenate([sc.test.x, *([sc.triggered["x"]] if sc.triggered else [])])
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
        clean = sc.test.x[sc.test.y != target]
        labels = f_sess.run(None, {name: clean})[0].argmax(1)
        inputs = {
            n: clean[labels != target][:1] if n == 1 else traffic(f_sess, sc.test.x, target, n)
            for n in batches
        }
        routed = {
            n: int((f_sess.run(None, {name: xb})[0].argmax(1) == target).sum())
            for n, xb in inputs.items()
        }
        rng = np.random.default_rng(0)
        blends = (
            {}
            if args.no_strip
            else {
                n: (
                    0.5 * np.repeat(xb, 100, 0)
                    + 0.5 * sc.defender.x[rng.integers(0, len(sc.defender), 100 * n)]
                ).astype(np.float32)
                for n, xb in inputs.items()
            }
        )
        rows = []
        for n, xb in inputs.items():
            row = {
                "batch": n,
                **dict(
                    zip(sessions, seconds(list(sessions.values()), xb, args.repeats), strict=True)
                ),
            }
            if not args.no_strip:
                (strip,) = seconds([f_sess], blends[n], max(5, args.repeats // 20))
                row["STRIP (100 blends)"] = strip
            rows.append(row)
    where = "CUDA" if args.provider == "cuda" else f"CPU, {args.threads} threads"
    sent = ", ".join(f"batch {n}: {k}" for n, k in routed.items())
    print(
        f"{args.model}, {where}, ONNX Runtime {ort.__version__}, load average "
        f"{os.getloadavg()[0]:.2f}; samples f sends to target {target}: {sent}{agree}"
    )
    keys = [k for k in rows[0] if k != "batch"]
    print("| batch | rows routed | floor | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r[k] * 1e3:.3f} ms ({r[k] / r['f alone']:.2f}×)" for k in keys]
        floor = 1 + routed[r["batch"]] / r["batch"]
        print(f"| {r['batch']} | {routed[r['batch']]} | {floor:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
