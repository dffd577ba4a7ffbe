"""`bna-export report`: one self-contained HTML page from a real fit (the a2o scenario's no-hint
fit and the planted graph backdoor's fit), checked as text and rendered in headless Chromium
(skipped with the reason when no Chromium is installed)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bna_export.cli.main import cli
from click.testing import CliRunner
from PIL import Image
from tiny_models import export_onnx

from bna_export import artifact, fitfile, html_report
from bna_export.lab.graph_backdoors import plant
from bna_export.onnxfile import model_sha256

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def evaluated(a2o_files, a2o_detected_file, tmp_path_factory):
    """`evaluate --json` of the repaired a2o model, written where `report --eval` reads it."""
    fit_path, _ = a2o_detected_file
    res = invoke(
        "evaluate", a2o_files["model"], "--clean", a2o_files["test"], "--triggered",
        a2o_files["triggered"], "--fit", fit_path, "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    path = tmp_path_factory.mktemp("eval") / "eval.json"
    path.write_text(res.stdout)
    return path


@pytest.fixture(scope="module")
def page(a2o_detected_file, evaluated, tmp_path_factory):
    fit_path, _ = a2o_detected_file
    out = tmp_path_factory.mktemp("report") / "report.html"
    res = invoke("report", fit_path, "--eval", evaluated, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    said = json.loads(res.stdout)
    assert said["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    return out


def test_the_fit_file_keeps_the_evidence(a2o_files, a2o_detected_file):
    rec = fitfile.load(a2o_detected_file[0])
    ev = rec.evidence
    assert ev.model_sha256 == hashlib.sha256(a2o_files["model"].read_bytes()).hexdigest()
    assert ev.audit is None  # a .pt2: there is no graph to audit
    parts = (ev.floor, ev.before, ev.after)
    assert all(v.shape == (len(rec.targets), len(rec.layers)) for v in parts)
    assert all(((v >= 0) & (v <= 1)).all() for v in parts)  # total variation
    assert (ev.before[:, -1] > ev.floor[:, -1]).all()  # the trigger moves the deepest layer
    probes = rec.probes
    for t in rec.targets:
        stamped = probes.trigger_of == t
        assert stamped.any() and set(probes.truth[stamped]) <= set(rec.sources[t])
    assert set(probes.truth[probes.trigger_of == -1]) == set(range(rec.n_classes))


def test_the_page_holds_every_part_and_fetches_nothing(page, a2o_detected_file, a2o_files):
    html = page.read_text()
    rec = fitfile.load(a2o_detected_file[0])
    assert "Backdoor found and repaired: target 0" in html
    assert hashlib.sha256(a2o_detected_file[0].read_bytes()).hexdigest() in html
    assert rec.evidence.model_sha256 in html and rec.data_sha256 in html
    for s, t in rec.detection.detected_pairs:
        assert f"<td>{s}</td><td>{t}</td>" in html
    # histograms (one figure), one target figure, the divergence figure: PNGs inline
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 3
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    for la in rec.layers:
        assert f"<td>{la.name}</td>" in html
    assert "<th>ASR</th>" in html and "model as delivered (f)" in html and "repaired" in html
    assert not re.search(r"(src|href)=\"(?!data:)", html) and "<script" not in html
    assert "<link" not in html and "url(" not in html


def test_the_same_fit_gives_the_same_page(page, a2o_detected_file, evaluated, tmp_path):
    """In another process too (another hash seed)."""
    again = tmp_path / "again.html"
    cmd = [sys.executable, "-m", "bna_export.cli.main", "report", str(a2o_detected_file[0]),
           "--eval", str(evaluated), "-o", str(again)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                         "PYTHONHASHSEED": "7"}, timeout=300)  # fmt: skip
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert again.read_bytes() == page.read_bytes()


def test_a_kept_graph_backdoor_is_in_the_report(patch_scenario, patch_files, tmp_path):
    example = torch.from_numpy(patch_scenario.test.x[:2])
    clean = export_onnx(patch_scenario.net, example, tmp_path / "f.onnx", "dynamo")
    model = plant(clean, tmp_path / "where.onnx", "where", target=3)
    fit = tmp_path / "f.bna"
    res = invoke(
        "fit", "--model", model, "--data", patch_files["defender"], "--targets", "0", "-o", fit,
        "-q", "--allow-graph-logic", "--set", "fit.epochs=3",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rec = fitfile.load(fit)
    assert rec.evidence.model_sha256 == model_sha256(model)
    assert {f.op for f in rec.evidence.audit.findings} == {"Greater", "Where"}
    out = tmp_path / "r.html"
    assert invoke("report", fit, "-o", out).exit_code == 0
    html = out.read_text()
    assert "Graph logic found and kept" in html and "planted_Where" in html
    assert "No detection run (targets given)" in html


def test_an_older_fit_file_still_reports(a2o_detected_file, tmp_path):
    """A fit file written before `report` (no evidence, no probe roles) gives a page that says
    what it lacks."""
    fit = artifact.load(a2o_detected_file[0])
    header = {k: v for k, v in fit.header.items() if k != "evidence"}
    drop = ("divergence.", "probe.truth", "probe.trigger_of")
    tensors = {k: v for k, v in fit.tensors.items() if not k.startswith(drop)}
    old = tmp_path / "old.bna"
    artifact.save(old, artifact.FitFile(header, tensors))
    out = tmp_path / "old.html"
    res = invoke("report", old, "-o", out)
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert html.count("a fit file written before `report`") >= 3


@pytest.mark.parametrize(
    "content, says",
    [
        (None, "no such file"),
        ("{", "not a JSON file"),
        ("[1, 2]", "not what `evaluate --json` writes"),
        ('{"model": {}, "acc": 1}', "is not a rate"),
        ("[" * 100000 + "]" * 100000, "not a JSON file"),
        ('{"acc": ' + "9" * 5000 + "}", "not a JSON file"),
        ('{"model": {"acc": 1, "asr": 2, "sia": 0, "tpr": null, "fpr": null}, "acc": 1, '
         '"asr": 0, "sia": 1, "tpr": 1, "fpr": 0}', "asr is not a rate"),
    ],
)  # fmt: skip
def test_a_bad_eval_file_is_one_line_and_writes_nothing(a2o_detected_file, tmp_path, content, says):
    ev = tmp_path / "eval.json"
    if content is not None:
        ev.write_text(content)
    out = tmp_path / "r.html"
    res = invoke("report", a2o_detected_file[0], "--eval", ev, "-o", out)
    assert res.exit_code == 2 and not out.exists()
    assert len(res.stderr.strip().splitlines()) == 1 and says in res.stderr, res.stderr


def test_a_bad_fit_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.bna"
    bad.write_bytes(b"not a fit file")
    for path in (bad, tmp_path / "missing.bna"):
        res = invoke("report", path, "-o", tmp_path / "r.html")
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def _colour_pixels(png: Path, rgb: tuple[int, int, int]) -> int:
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(img - np.array(rgb)).sum(2) < 30).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(page, tmp_path):
    """The page opens in a real browser with no console message, and the screenshot shows the
    plots: the histograms' grey-green bars and the divergence plot's blue bars are drawn only
    inside the inline PNGs."""
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--window-size=1200,4000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    assert _colour_pixels(shot, (0x88, 0xAA, 0xAA)) > 200  # score histograms
    assert _colour_pixels(shot, (0x33, 0x88, 0xAA)) > 200  # divergence after Θ


def test_names_from_the_fit_file_are_escaped(a2o_detected_file, tmp_path):
    """A fit file is untrusted: a layer name or audit finding holding markup stays text."""
    fit = artifact.load(a2o_detected_file[0])
    evil = '<script>alert("x")</script><img src="http://example.invalid/x.png">'
    header = json.loads(json.dumps(fit.header))
    header["layers"][0]["name"] = evil
    header["detection"]["sweep"].update(problems=evil, problem_steps=evil)
    header["scores"]["$\\frac$"] = header["scores"]["patch"]  # no mathtext from the file
    header["evidence"]["audit"] = {
        "clean": False,
        "findings": [{"node": evil, "op": "Where", "reason": evil, "constants": [evil]}],
        "detached_outputs": [evil],
    }
    path = tmp_path / "evil.bna"
    artifact.save(path, artifact.FitFile(header, fit.tensors))
    out = tmp_path / "evil.html"
    res = invoke("report", path, "-o", out)
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "<script" not in html and not re.search(r"(src|href)=\"(?!data:)", html)
    assert "&lt;script&gt;" in html


@pytest.mark.parametrize(
    "change",
    [
        lambda h, t: t.update({"trigger.0.mask": np.ones((1, 3, 3), np.float32)}),
        lambda h, t: t.update({"probe.x": t["probe.x"][:, :, :8]}),
        lambda h, t: h["triggers"][0].update(family="sparkle"),
        lambda h, t: t.update({"probe.f_logits": t["probe.f_logits"][:, 0]}),
        lambda h, t: t.update({"probe.triggered": np.stack([t["probe.triggered"]] * 2, 1)}),
        lambda h, t: h.update(input_shape=[0, 16, 16]),
        lambda h, t: h["evidence"].update(divergence="$\\frac$"),
        lambda h, t: h["detection"].update(threshold=10**400),
        lambda h, t: h.update(input_range=[0, 10**400]),
    ],
)
def test_a_fit_file_the_pictures_cannot_use_is_one_line(fitted, tmp_path, change):
    """What only the pictures read (trigger tensors, probe images) is checked too."""
    fit = artifact.load(fitted[0])
    header = json.loads(json.dumps(fit.header))
    tensors = dict(fit.tensors)
    first = next(tr for tr in header["triggers"] if tr["used"])
    assert first["index"] == 0 and first["family"] == "patch"
    change(header, tensors)
    bad = tmp_path / "bad.bna"
    artifact.save(bad, artifact.FitFile(header, tensors))
    out = tmp_path / "r.html"
    res = invoke("report", bad, "-o", out)
    assert res.exit_code == 2 and not out.exists(), res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "fit file" in lines[0], res.stderr


def test_the_checks_that_take_findings_back_are_in_the_report(a2o_detected_file):
    """The intrinsic and natural-feature checks' measures and verdicts are on the page, as
    `inspect` prints them."""
    rec = fitfile.load(a2o_detected_file[0])
    det = dataclasses.replace(
        rec.detection,
        natural={3: {"patch": 0.61, "blend": 0.58}, 5: {}},
        natural_dropped=(3,),
        intrinsic={
            4: fitfile.Intrinsic("blend", 2.5, {0: 0.3, 1: 0.5}, {}, (0,), (1,)),
            6: fitfile.Intrinsic("patch", None, {2: 0.2}, {}, (2,), ()),
        },
    )
    html = html_report.render(
        dataclasses.replace(rec, detection=det), "x.bna", "0" * 64, None, False
    )
    rows = re.findall(r"<tr><td>(intrinsic|natural feature)</td><td>(\d+)</td><td>([^<]*)</td>"
                      r"<td>([^<]*)</td></tr>", html)  # fmt: skip
    assert rows == [
        ("intrinsic", "4", "pooled blend trigger 2.5 vs per-pair up to 0.5", "dropped sources 1"),
        ("intrinsic", "6", "pooled patch trigger not solved vs per-pair up to 0.2", "kept"),
        (
            "natural feature",
            "3",
            "feature alignment patch 0.61, blend 0.58",
            "dropped: a natural hub",
        ),
        ("natural feature", "5", "feature alignment no trigger succeeded", "kept"),
    ]
    plain = dataclasses.replace(rec.detection, natural={}, natural_dropped=(), intrinsic={})
    html = html_report.render(
        dataclasses.replace(rec, detection=plain), "x.bna", "0" * 64, None, False
    )
    assert "<td>natural feature</td>" not in html and "<td>intrinsic</td>" not in html
