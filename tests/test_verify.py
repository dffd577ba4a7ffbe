"""Provenance of a built graph: its metadata names the SHA-256 of the model (graph and external
data) and of the fit file, and `verify` rebuilds it and passes only on the same bytes."""

from __future__ import annotations

import hashlib
import json
import shutil

import onnx
from bna_export.cli.main import cli
from click.testing import CliRunner

from bna_export.onnxfile import model_sha256


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def flip_one_byte(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_built_graph_names_its_model_and_fit(built_files, fitted):
    onnx_path, out, _ = built_files
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["bna.fit_sha256"] == hashlib.sha256(fitted[0].read_bytes()).hexdigest()
    assert meta["bna.model_sha256"] == model_sha256(onnx_path)
    data = onnx_path.with_name(onnx_path.name + ".data")  # the dynamo export's external data
    assert data.exists()
    before = model_sha256(onnx_path)
    copy = data.read_bytes()
    try:  # the hash covers it: change it and the hash changes
        flip_one_byte(data, 0.99)
        assert model_sha256(onnx_path) != before
    finally:
        data.write_bytes(copy)


def test_verify_passes_on_a_fresh_build_and_fails_on_any_changed_byte(
    built_files, fitted, tmp_path
):
    onnx_path, out, _ = built_files
    res = invoke("verify", out, "--model", onnx_path, "--fit", fitted[0])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("verified:")
    res = invoke("verify", out, "--model", onnx_path, "--fit", fitted[0], "--json")
    got = json.loads(res.stdout)
    assert got["identical"] and got["built_sha256"] == got["rebuilt_sha256"]

    # one byte of the built graph
    built = tmp_path / "built.onnx"
    shutil.copy(out, built)
    flip_one_byte(built)
    res = invoke("verify", built, "--model", onnx_path, "--fit", fitted[0])
    assert res.exit_code == 1 and res.stdout.startswith("NOT verified:"), res.output
    assert len(res.stdout.strip().splitlines()) == 1

    # one byte of the model (a copy with its external data, in another folder)
    folder = tmp_path / "model"
    folder.mkdir()
    for f in onnx_path.parent.glob(onnx_path.name + "*"):
        shutil.copy(f, folder / f.name)
    model = folder / onnx_path.name
    res = invoke("verify", out, "--model", model, "--fit", fitted[0])
    assert res.exit_code == 0, res.output  # the same bytes elsewhere: the same build
    target = folder / (onnx_path.name + ".data")
    flip_one_byte(target if target.exists() else model, 0.9)
    res = invoke("verify", out, "--model", model, "--fit", fitted[0])
    assert res.exit_code == 1 and "built from another model" in res.stdout, res.output

    # one byte of the fit file
    fit = tmp_path / "fit.bna"
    shutil.copy(fitted[0], fit)
    flip_one_byte(fit, 0.9)
    res = invoke("verify", out, "--model", onnx_path, "--fit", fit)
    assert res.exit_code == 1 and "NOT verified" in res.stdout, res.output
    assert "another fit file" in res.stdout or "cannot be rebuilt" in res.stdout

    # f itself given as the built graph
    res = invoke("verify", onnx_path, "--model", onnx_path, "--fit", fitted[0])
    assert res.exit_code == 1 and "not a graph made by `bna-export build`" in res.stdout

    res = invoke("verify", tmp_path / "missing.onnx", "--model", onnx_path, "--fit", fitted[0])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
