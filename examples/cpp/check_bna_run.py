"""The ctest of ``bna_run``: builds a small graph with bna-export (a 5-class CNN poisoned with a
3×3 patch, trained in seconds; ``fit --targets 0``; ``build``), runs ``bna_run`` and
``bna-export run`` on the same ``.npy`` files, and checks that they give the same label and flag
for every image. Then checks that ``bna_run`` refuses bad input with exit 2 and one line.

Run: ``python examples/cpp/check_bna_run.py --bna-run build/bna_run --work build/check
[--provider cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bna_export.lab.scenario import (
    build_scenario,
    export_onnx,
    synthetic_scenario_data,
    write_scenario,
)


def bna_export(*args: str) -> str:
    cmd = [sys.executable, "-m", "bna_export.cli.main", *args]
    # run outside the checkout, where the bna_export/ folder would shadow the installed package
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if res.returncode != 0:
        sys.exit(f"bna-export {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def bna_run(exe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *args], capture_output=True, text=True)


def parse(stdout: str) -> tuple[np.ndarray, np.ndarray]:
    rows = np.array([line.split() for line in stdout.splitlines()], dtype=np.int64).reshape(-1, 2)
    return rows[:, 0], rows[:, 1].astype(bool)


def expect_refusal(exe: str, what: str, *args: str) -> None:
    res = bna_run(exe, *args)
    lines = res.stderr.strip().splitlines()
    ok = res.returncode == 2 and len(lines) == 1 and lines[0].startswith("bna_run: ")
    ok = ok and not res.stdout
    print(f"  {'ok' if ok else 'FAILED'}: {what}: exit {res.returncode}, {res.stderr.strip()!r}")
    if not ok:
        sys.exit(f"bna_run did not refuse {what} with exit 2 and one line")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bna-run", required=True, help="the built bna_run executable")
    ap.add_argument("--work", required=True, help="a scratch folder (emptied first)")
    ap.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    exe, work = str(Path(args.bna_run).resolve()), Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    x, y = synthetic_scenario_data()
    sc = build_scenario(x, y, attack="patch", target=0, width=8, epochs=6, seed=0)
    files = write_scenario(sc, work)
    onnx_path, fit, built = work / "model.onnx", work / "fit.bna", work / "repaired.onnx"
    export_onnx(sc.net, sc.test.x, onnx_path)
    bna_export("fit", "--model", str(files["model"]), "--data", str(files["defender"]),
               "--targets", "0", "-o", str(fit), "--seed", "0", "--quiet")  # fmt: skip
    bna_export("build", str(onnx_path), "--fit", str(fit), "-o", str(built), "--quiet")

    images = np.concatenate([sc.test.x, sc.triggered["x"]]).astype(np.float32)
    cases = {
        "float32 N×C×H×W": images,
        "uint8 N×H×W": np.round(images[:, 0] * 255).astype(np.uint8),
    }
    for i, (name, arr) in enumerate(cases.items()):
        npy = work / f"x{i}.npy"
        np.save(npy, arr)
        ref = bna_export(
            "run", str(built), "--data", str(npy), "--provider", args.provider, "--json", "--quiet"
        )
        ref = json.loads(ref)
        res = bna_run(exe, str(built), str(npy), "--provider", args.provider, "--batch-size", "7")
        if res.returncode != 0:
            sys.exit(f"bna_run failed on {name} ({res.returncode}): {res.stderr.strip()}")
        label, flag = parse(res.stdout)
        want_label, want_flag = np.array(ref["label"]), np.array(ref["flags"], dtype=bool)
        same = label.shape == want_label.shape and (label == want_label).all()
        same = same and (flag == want_flag).all()
        print(f"  {'ok' if same else 'FAILED'}: {name}: {len(label)} images, "
              f"{int(flag.sum())} flagged; bna-export ran on {ref['provider']}; "
              f"{res.stderr.strip()}")  # fmt: skip
        if not same:
            sys.exit(f"bna_run and bna-export run disagree on {name}")
        if not (flag.any() and not flag.all()):
            sys.exit(f"{name}: expected both flagged and unflagged images")

    npy = str(work / "x0.npy")
    expect_refusal(exe, "a missing graph", str(work / "nope.onnx"), npy)
    expect_refusal(exe, "a missing .npy", str(built), str(work / "nope.npy"))
    plain = work / "plain.onnx"  # f with its weights inline: loads, but is not a built graph
    onnx.save(onnx.load(str(onnx_path)), str(plain))
    expect_refusal(exe, "a graph not made by build", str(plain), npy)
    expect_refusal(exe, "a graph with external data (never followed)", str(onnx_path), npy)
    np.save(work / "small.npy", images[:, :, :8])
    expect_refusal(exe, "images of the wrong size", str(built), str(work / "small.npy"))
    np.save(work / "ints.npy", images.astype(np.int32))
    expect_refusal(exe, "an unsupported dtype", str(built), str(work / "ints.npy"))
    bad = images.copy()
    bad[3, 0, 2, 2] = np.nan
    np.save(work / "nan.npy", bad)
    expect_refusal(exe, "NaN in the images", str(built), str(work / "nan.npy"))
    raw = (work / "x0.npy").read_bytes()
    (work / "cut.npy").write_bytes(raw[: len(raw) // 2])
    expect_refusal(exe, "a truncated .npy", str(built), str(work / "cut.npy"))
    (work / "junk.npy").write_bytes(b"\x93NUMPY\x01\x00\xff\xff{'descr'")
    expect_refusal(exe, "a corrupted .npy header", str(built), str(work / "junk.npy"))
    expect_refusal(exe, "an unknown option", str(built), npy, "--fast")
    expect_refusal(exe, "a bad batch size", str(built), npy, "--batch-size", "0")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        expect_refusal(exe, "--provider cuda without CUDA", str(built), npy, "--provider", "cuda")
    print("bna_run matches bna-export run")


if __name__ == "__main__":
    main()
