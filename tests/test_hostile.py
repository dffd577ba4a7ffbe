"""Hostile input: every bad file or datum gets exit 2, one line on stderr and nothing written;
nothing inside a file is ever run (pickle payloads would create a marker file); an interrupted
run leaves nothing behind."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from bna_export.cli.main import cli
from click.testing import CliRunner

from bna_export import artifact
from bna_export.lab.scenario import export_onnx


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def refused(res, message: str, out_dir: Path, before: set[Path]) -> None:
    """Exit 2, exactly one line on stderr holding ``message``, and nothing new in out_dir."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert set(out_dir.iterdir()) == before, sorted(set(out_dir.iterdir()) - before)


class Payload:
    """Unpickling this creates the marker file: proof that code from the input ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def bad(patch_scenario, patch_files, tmp_path_factory):
    """A folder of broken inputs for the 5-class 16×16 patch model."""
    d = tmp_path_factory.mktemp("bad")
    sc = patch_scenario
    x, y = sc.defender.x, sc.defender.y

    def npz(name, **arrays):
        np.savez(d / name, **arrays)
        return d / name

    model = patch_files["model"].read_bytes()
    (d / "cut.pt2").write_bytes(model[: len(model) // 2])
    (d / "junk.onnx").write_bytes(b"\x08\x07" + os.urandom(300))
    onnx_path = d / "f.onnx"
    export_onnx(sc.net, sc.test.x, onnx_path)
    proto = onnx.load(str(onnx_path))
    raw = proto.SerializeToString()
    (d / "cut.onnx").write_bytes(raw[: len(raw) // 3])
    good = patch_files["defender"].read_bytes()
    (d / "cut.npz").write_bytes(good[: len(good) // 2])
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    inf = x.copy()
    inf[1, 0, 3, 3] = np.inf
    return {
        "folder": d,
        "onnx": onnx_path,
        "cut.pt2": d / "cut.pt2",
        "junk.onnx": d / "junk.onnx",
        "cut.onnx": d / "cut.onnx",
        "cut.npz": d / "cut.npz",
        "shape": npz("shape.npz", x=x[:, :, :8, :8], y=y),
        "channels": npz("channels.npz", x=np.repeat(x, 3, 1), y=y),
        "dtype": npz("dtype.npz", x=x.astype(np.int32), y=y),
        "labels": npz("labels.npz", x=x, y=np.where(y == 4, 7, y)),
        "nan": npz("nan.npz", x=nan, y=y),
        "inf": npz("inf.npz", x=inf, y=y),
        "empty": npz("empty.npz", x=x[:0], y=y[:0]),
        "no class 3": npz("no3.npz", x=x[y != 3], y=y[y != 3]),
    }


FIT_CASES = [
    # (what, --model, --data, extra options, message)
    ("a missing model", "missing.pt2", "defender", [], "does not exist"),
    ("a folder as the data", "model", "folder-as-file", [], "no class sub-folders"),
    ("a truncated .pt2", "cut.pt2", "defender", [], "is not a torch.export archive"),
    ("a corrupted .onnx", "junk.onnx", "defender", [], "not a readable ONNX model"),
    ("a truncated .onnx", "cut.onnx", "defender", [], "not a readable ONNX model"),
    ("a truncated .npz", "model", "cut.npz", [], "not a readable .npz"),
    ("images of the wrong size", "model", "shape", [], "the model failed on an input"),
    ("images with 3 channels", "model", "channels", [], "the model failed on an input"),
    ("images of dtype int32", "model", "dtype", [], "expected float32 or uint8"),
    ("labels outside the classes", "model", "labels", ["--targets", "0"], "label 7"),
    ("NaN in the images", "model", "nan", [], "NaN or Inf"),
    ("Inf in the images", "model", "inf", [], "NaN or Inf"),
    ("an empty data set", "model", "empty", [], "the data set is empty"),
    ("a class with no images", "model", "no class 3", [], "class 3 has no clean image"),
    ("--targets naming no class", "model", "defender", ["--targets", "5"], "class 5 does not"),
    ("--pairs naming no class", "model", "defender", ["--pairs", "0:9"], "class 9 does not"),
]


@pytest.mark.parametrize(
    "what, model, data, extra, message", FIT_CASES, ids=[c[0] for c in FIT_CASES]
)
def test_fit_refuses(bad, patch_files, out, what, model, data, extra, message):
    paths = {**bad, **patch_files, "folder-as-file": bad["folder"]}
    model_arg = paths.get(model, out / model)
    before = set(out.iterdir())
    res = invoke("fit", "--model", model_arg, "--data", paths[data], *extra, "-o", out / "f.bna")
    refused(res, message, out, before)


_CHILD = """
import json, sys
from click.testing import CliRunner
from bna_export.cli.main import cli
answers = []
for args in json.loads(sys.argv[1]):
    res = CliRunner().invoke(cli, args)
    answers.append([res.exit_code, res.stderr])
print(json.dumps(answers))
"""


def test_fit_refusals_write_nothing_else_to_the_real_stderr(bad, patch_files, tmp_path):
    """Every FIT_CASES refusal again, in a child process: besides the one line of each (which
    the child's CliRunner catches) nothing reaches the process's own stderr, where PyTorch's
    and ONNX Runtime's loggers write and an in-process capture does not look."""
    paths = {**bad, **patch_files, "folder-as-file": bad["folder"]}
    calls = [
        [
            "fit",
            "--model",
            str(paths.get(m, tmp_path / m)),
            "--data",
            str(paths[d]),
            *extra,
            "-o",
            str(tmp_path / "f.bna"),
        ]
        for _, m, d, extra, _ in FIT_CASES
    ]
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(calls)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    for (code, err), case in zip(json.loads(res.stdout), FIT_CASES, strict=True):
        assert code == 2 and len(err.strip().splitlines()) == 1 and case[4] in err, (case, err)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_build_and_run_refuse(bad, patch_files, fitted, out):
    before = set(out.iterdir())
    fit = artifact.load(fitted[0])
    raw = artifact.encode(fit)
    (out / "cut.bna").write_bytes(raw[: len(raw) // 2])
    (out / "flip.bna").write_bytes(raw[:16] + bytes([raw[16] ^ 0x55]) + raw[17:])  # the "{"
    before = set(out.iterdir())
    common = ["--clean", patch_files["test"]]
    for name, message in (("cut.bna", "truncated or corrupt"), ("flip.bna", "not valid JSON")):
        res = invoke("evaluate", patch_files["model"], "--fit", out / name, *common)
        refused(res, message, out, before)
        res = invoke("build", bad["onnx"], "--fit", out / name, "-o", out / "g.onnx")
        refused(res, message, out, before)
    res = invoke("build", bad["cut.onnx"], "--fit", fitted[0], "-o", out / "g.onnx")
    refused(res, "not a readable ONNX model", out, before)
    res = invoke("evaluate", patch_files["model"], "--fit", fitted[0], "--clean", bad["nan"])
    refused(res, "NaN or Inf", out, before)
    # a built graph, then data it cannot take
    graph = out / "g.onnx"
    assert invoke("build", bad["onnx"], "--fit", fitted[0], "-o", graph).exit_code == 0
    before = set(out.iterdir())
    for data, message in ((bad["shape"], "images are (1, 8, 8)"), (bad["nan"], "NaN or Inf")):
        res = invoke("run", graph, "--data", data, "-o", out / "pred.npz")
        refused(res, message, out, before)
    res = invoke("run", bad["onnx"], "--data", patch_files["test"], "-o", out / "pred.npz")
    refused(res, "not a graph made by `bna-export build`", out, before)


def test_a_fit_file_with_a_malformed_header_is_refused(fitted, out):
    fit = artifact.load(fitted[0])
    fit.header["scores"] = {"patch": [{"target": 0}]}
    fit.header["detection"] = {"scores_computed": True, "pair_families": {}}
    bad = out / "bad.bna"
    artifact.save(bad, fit)
    before = set(out.iterdir())
    refused(invoke("inspect", bad), "malformed", out, before)


def test_no_pickle_is_ever_run(patch_scenario, patch_files, fitted, out, tmp_path):
    """A pickle payload in an .npz, in a --weights file and inside a .pt2 archive, and ONNX
    external data outside the model's folder: all refused, and the payload never runs."""
    marker = tmp_path / "MARKER"
    payload = Payload(marker)
    x, y = patch_scenario.defender.x, patch_scenario.defender.y
    evil_npz = out / "evil.npz"
    np.savez(evil_npz, x=x, y=y, attack_label=np.array([payload], dtype=object))
    evil_weights = out / "evil.pt"
    torch.save({"features.0.weight": payload}, evil_weights)
    buf = io.BytesIO()
    torch.save((payload,), buf)
    evil_pt2 = out / "evil.pt2"
    with zipfile.ZipFile(patch_files["model"]) as src, zipfile.ZipFile(evil_pt2, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if "sample_inputs/" in item.filename:  # torch.export.load unpickles these
                data = buf.getvalue()
            dst.writestr(item, data)
    inner = out / "model"
    inner.mkdir()
    export_onnx(patch_scenario.net, patch_scenario.test.x, inner / "m.onnx")
    proto = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../evil.pt"
    onnx.save(proto, str(inner / "m.onnx"))
    before = set(out.iterdir())
    o = out / "f.bna"
    trig = ["--clean", patch_files["test"], "--triggered", evil_npz]
    refused(invoke("evaluate", patch_files["model"], *trig), "not a readable .npz", out, before)
    res = invoke("fit", "--model", "tiny_models:make_cnn", "--weights", evil_weights,
                 "--data", patch_files["defender"], "-o", o)  # fmt: skip
    refused(res, "is not a plain state dict", out, before)
    res = invoke("fit", "--model", evil_pt2, "--data", patch_files["defender"], "-o", o)
    refused(res, "holds pickled objects", out, before)
    for cmd in (["fit", "--model", inner / "m.onnx", "--data", patch_files["defender"]],
                ["build", inner / "m.onnx", "--fit", fitted[0]]):  # fmt: skip
        refused(invoke(*cmd, "-o", o), "outside the model's folder", out, before)
    assert not marker.exists()


def test_ctrl_c_leaves_nothing_behind(patch_files, out):
    """SIGINT in the middle of a fit: exit 130, one line, no fit file and no temporary file."""
    cmd = [
        sys.executable,
        "-m",
        "bna_export.cli.main",
        "fit",
        "--model",
        str(patch_files["model"]),
        "--data",
        str(patch_files["defender"]),
        "-o",
        str(out / "f.bna"),
        "--targets",
        "0",
        "--epochs",
        "100000",
    ]  # fmt: skip  (a target given: the Θ fit runs, and is still running when the signal comes)
    before = set(out.iterdir())
    # a shell's background job starts with SIGINT ignored, and a child inherits that: give the
    # fit the disposition a user's terminal gives it (an ignored SIGINT left it running before)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        time.sleep(8)  # imports done, the trigger estimates or the Θ fit running
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never leave the fit running for the rest of the suite
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; nothing was written"
    assert set(out.iterdir()) == before
