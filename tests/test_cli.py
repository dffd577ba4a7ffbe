"""The command line as a user runs it: exit codes, one-line errors, JSON on stdout."""

import json
import sys

import numpy as np
import pytest
import torch
from bna_export.cli.main import cli
from click.testing import CliRunner
from tiny_models import export_onnx, make_cnn

from bna_export.settings import Settings


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_fit_then_evaluate_repairs_the_model(patch_files, fitted):
    out, report = fitted
    assert report["targets"] == [0] and report["attacked"] is True
    assert report["sources"] == {"0": [1, 2, 3, 4]}
    common = ["--clean", patch_files["test"], "--triggered", patch_files["triggered"], "--json"]
    before = json.loads(invoke("evaluate", patch_files["model"], *common).stdout)
    after = json.loads(invoke("evaluate", patch_files["model"], "--fit", out, *common).stdout)
    assert set(after) >= {"acc", "asr", "sia", "tpr", "fpr"}
    assert before["asr"] > 0.9 and before["tpr"] is None
    assert after["asr"] < 0.1, after
    assert before["acc"] - after["acc"] < 0.03, (before, after)
    assert after["sia"] > 0.8 and after["tpr"] > 0.8
    keys = ("acc", "asr", "sia", "tpr", "fpr")
    assert {k: after["model"][k] for k in keys} == {k: before[k] for k in keys}


def test_evaluate_table(patch_files, fitted):
    res = invoke(
        "evaluate",
        patch_files["model"],
        "--fit",
        fitted[0],
        "--clean",
        patch_files["test"],
        "--triggered",
        patch_files["triggered"],
    )
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["metric", "model", "mitigated"]
    assert [ln.split()[0] for ln in lines[1:]] == ["ACC", "ASR", "SIA", "TPR", "FPR"]


def test_inspect_json_has_the_design_keys(fitted):
    res = invoke("inspect", fitted[0], "--json")
    assert res.exit_code == 0
    info = json.loads(res.stdout)
    for key in ("attacked", "targets", "pairs", "sources", "scores", "settings", "layers"):
        assert key in info
    assert info["pairs"] == [[1, 0], [2, 0], [3, 0], [4, 0]]
    assert len(info["layers"]) == 3
    assert set(info["scores"]) == set(Settings().families)  # one entry per per-target trigger
    text = invoke("inspect", fitted[0]).stdout
    assert "targets: [0]" in text and "BatchNorm layers" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--targets", "9"], "class 9 does not exist"),
        (["--pairs", "1:1"], "same source and target"),
        (["--pairs", "1-2"], "expected SOURCE:TARGET"),
        (["--targets", "a"], "comma-separated"),
        (["--targets", "1", "--pairs", "0:1"], "at most one of --targets and --pairs"),
        (["--device", "tpu"], "'tpu' is not one of"),
        pytest.param(
            ["--device", "cuda"],
            "sees no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_fit_bad_options_exit_2_with_one_line(patch_files, tmp_path, extra, message):
    out = tmp_path / "f.bna"
    res = invoke(
        "fit",
        "--model",
        patch_files["model"],
        "--data",
        patch_files["defender"],
        "-o",
        out,
        "-q",
        *extra,
    )
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_files_exit_2(patch_files, tmp_path):
    out = tmp_path / "f.bna"
    res = invoke(
        "fit",
        "--model",
        patch_files["model"],
        "--data",
        tmp_path / "nope.npz",
        "--targets",
        "0",
        "-o",
        out,
    )
    assert res.exit_code == 2 and "no such file" in res.stderr
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"garbage")
    res = invoke(
        "fit", "--model", patch_files["model"], "--data", junk, "--targets", "0", "-o", out
    )
    assert res.exit_code == 2 and "not a readable .npz" in res.stderr
    res = invoke(
        "fit",
        "--model",
        tmp_path / "m.pt2",
        "--data",
        patch_files["defender"],
        "--targets",
        "0",
        "-o",
        out,
    )
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = invoke("inspect", junk)
    assert res.exit_code == 2 and "not a .bna fit file" in res.stderr
    res = invoke(
        "fit",
        "--model",
        patch_files["model"],
        "--data",
        patch_files["defender"],
        "--targets",
        "0",
        "-o",
        tmp_path / "missing" / "f.bna",
    )
    assert res.exit_code == 2 and "folder does not exist" in res.stderr
    assert not out.exists()


def test_evaluate_refuses_a_fit_of_another_model(patch_files, fitted, tmp_path):
    import numpy as np

    from bna_export import artifact

    fit = artifact.load(fitted[0])
    fit.tensors["layer.0.running_mean"] = fit.tensors["layer.0.running_mean"] + 1.0
    other = tmp_path / "other.bna"
    artifact.save(other, fit)
    res = invoke("evaluate", patch_files["model"], "--fit", other, "--clean", patch_files["test"])
    assert res.exit_code == 2 and "not the model that was fitted" in res.stderr
    np.testing.assert_array_equal(
        artifact.load(fitted[0]).tensors["theta.0"], fit.tensors["theta.0"]
    )


def test_help_explains():
    res = invoke("fit", "--help")
    assert res.exit_code == 0 and "--targets" in res.stdout and "--seed" in res.stdout


def fit_cli(files, out, *extra):
    return invoke(
        "fit", "--model", files["model"], "--data", files["defender"], "-o", out, "-q", *extra
    )


@pytest.fixture(scope="module")
def detected(a2o_detected_file):
    return a2o_detected_file


def test_fit_without_a_hint_finds_the_target_and_repairs(a2o_files, detected):
    out, report = detected
    assert report["mode"] == "detect" and report["targets"] == [0] and report["ranks"] == 1
    assert report["detected_pairs"] and all(t == 0 for _, t in report["detected_pairs"])
    common = ["--clean", a2o_files["test"], "--triggered", a2o_files["triggered"], "--json"]
    after = json.loads(invoke("evaluate", a2o_files["model"], "--fit", out, *common).stdout)
    assert after["model"]["asr"] > 0.9 and after["asr"] < 0.1 and after["sia"] > 0.8


def test_inspect_shows_score_histograms_and_detected_pairs(detected, tmp_path):
    text = invoke("inspect", detected[0]).stdout
    assert "anomaly scores, patch family (56 pairs" in text
    assert "anomaly scores, perturbation family (56 pairs" in text
    assert "<- threshold" in text and "detected pairs:" in text and "-> 0 (" in text
    info = json.loads(invoke("inspect", detected[0], "--json").stdout)
    assert info["mode"] == "detect" and info["detected_pairs"]
    assert {p["target"] for p in info["detected_pairs"]} == {0}
    assert len(info["scores"]["patch"]) == 56 and info["detection"]["threshold"] == 7.0
    png = tmp_path / "scores.png"
    res = invoke("inspect", detected[0], "--plot", png, "--json")
    assert res.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.png"]


def test_inspect_plot_without_matplotlib_is_one_clear_line(detected, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "scores.png"
    res = invoke("inspect", detected[0], "--plot", png)
    assert res.exit_code == 2 and "needs matplotlib" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not png.exists()


def test_no_backdoor_detected_serves_the_model_unchanged(
    clean_files, clean_scenario, clean_detected_file, tmp_path
):
    out, printed = clean_detected_file
    assert "no backdoor detected" in printed and "served unchanged" in printed
    info = json.loads(invoke("inspect", out, "--json").stdout)
    assert info["attacked"] is False and info["targets"] == [] and info["detected_pairs"] == []
    common = ["--clean", clean_files["test"], "--triggered", clean_files["triggered"], "--json"]
    ev = json.loads(invoke("evaluate", clean_files["model"], "--fit", out, *common).stdout)
    keys = ("acc", "asr", "sia")
    assert {k: ev[k] for k in keys} == {k: ev["model"][k] for k in keys}
    assert ev["tpr"] == 0.0 and ev["fpr"] in (0.0, None)
    # build: f plus the three outputs; nothing is flagged, labels are f's
    onnx_path = export_onnx(
        clean_scenario.net,
        torch.from_numpy(clean_scenario.test.x[:2]),
        tmp_path / "f.onnx",
        "dynamo",
    )
    built = tmp_path / "built.onnx"
    info = json.loads(invoke("build", onnx_path, "--fit", out, "-o", built, "--json").stdout)
    assert info["attacked"] is False and info["layers"] == []
    ev_built = json.loads(invoke("evaluate", built, *common).stdout)
    assert {k: ev_built[k] for k in keys} == {k: ev["model"][k] for k in keys}
    assert ev_built["tpr"] == 0.0


@pytest.fixture(scope="module")
def built(built_files):
    return built_files


def test_build_then_run_and_evaluate_the_graph(patch_files, fitted, built, tmp_path):
    _, out, text = built
    assert "features.1" in text and "-> Conv" in text and "self-check: " in text
    common = ["--clean", patch_files["test"], "--triggered", patch_files["triggered"], "--json"]
    ref = json.loads(invoke("evaluate", patch_files["model"], "--fit", fitted[0], *common).stdout)
    ev = json.loads(invoke("evaluate", out, "--provider", "cpu", *common).stdout)
    keys = ("acc", "asr", "sia", "tpr", "fpr")
    assert {k: ev[k] for k in keys} == {k: ref[k] for k in keys}
    assert {k: ev["model"][k] for k in keys} == {k: ref["model"][k] for k in keys}
    assert ev["provider"] == "cpu"
    pred = tmp_path / "pred.npz"
    res = invoke("run", out, "--data", patch_files["triggered"], "-o", pred, "--provider", "cpu")
    assert res.exit_code == 0 and "provider cpu" in res.stdout
    with np.load(pred) as f:
        assert set(f.files) == {"label", "triggered", "logits"}
        assert f["triggered"].mean() > 0.8 and f["logits"].shape[1] == 5


def test_build_writes_a_triton_repository(patch_scenario, fitted, built, tmp_path):
    onnx_path = built[0]
    repo, graph = tmp_path / "models", tmp_path / "bna.onnx"
    for _ in range(2):  # a second build replaces the model in place
        res = invoke(
            "build", onnx_path, "--fit", fitted[0], "-o", graph, "--triton-repo", repo, "--json"
        )
        assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["triton"] == str(repo / "bna")
    assert sorted(p.name for p in repo.iterdir()) == ["bna"]
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == [
        "bna",
        "bna/1",
        "bna/1/model.onnx",
        "bna/config.pbtxt",
    ]
    assert (repo / "bna/1/model.onnx").read_bytes() == graph.read_bytes()
    config = (repo / "bna/config.pbtxt").read_text()
    c, h, w = patch_scenario.test.x.shape[1:]
    assert 'name: "bna"' in config and 'backend: "onnxruntime"' in config
    assert "max_batch_size: 64" in config and "dynamic_batching" in config
    assert f'name: "images"\n    data_type: TYPE_FP32\n    dims: [ {c}, {h}, {w} ]' in config
    assert 'name: "label"\n    data_type: TYPE_INT64\n    dims: [ 1 ]' in config
    assert 'name: "triggered"\n    data_type: TYPE_BOOL\n    dims: [ 1 ]' in config
    assert 'name: "logits"\n    data_type: TYPE_FP32\n    dims: [ 5 ]' in config


def test_build_refuses_another_model_and_writes_nothing(fitted, tmp_path):
    torch.manual_seed(3)
    other = export_onnx(make_cnn().eval(), torch.rand(2, 1, 16, 16), tmp_path / "o.onnx", "legacy")
    out = tmp_path / "out.onnx"
    res = invoke("build", other, "--fit", fitted[0], "-o", out)
    assert res.exit_code == 2 and "not the model that was fitted" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


def test_run_with_cuda_where_there_is_none_is_one_clear_line(patch_files, built):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    res = invoke("run", built[1], "--data", patch_files["test"], "--provider", "cuda")
    assert res.exit_code == 2 and "no CUDA execution provider" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_set_overrides_settings_and_rejects_unknown_ones(patch_files, tmp_path):
    res = fit_cli(patch_files, tmp_path / "f.bna", "--targets", "0", "--set", "reverse.nope=1")
    assert res.exit_code == 2 and "SECTION.FIELD=VALUE" in res.stderr
    res = fit_cli(patch_files, tmp_path / "f.bna", "--targets", "0", "--set", "reverse.steps=x")
    assert res.exit_code == 2 and "expected int" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_fit_build_and_evaluate_from_the_onnx_alone(patch_files, built, fitted, tmp_path):
    """A user with only model.onnx: fit it, build it (layers by name), evaluate both ways."""
    onnx_path = built[0]
    fit = tmp_path / "fit.bna"
    data = ["--data", patch_files["defender"], "--targets", "0", "-o", fit, "--quiet"]
    res = invoke("fit", "--model", onnx_path, *data, "--json")
    assert res.exit_code == 0, res.output
    layers = json.loads(invoke("inspect", fit, "--json").stdout)["layers"]
    assert len(layers) == 3 and all(la["measured"] for la in layers)
    again = tmp_path / "again.bna"  # deterministic: the same bytes
    assert invoke("fit", "--model", onnx_path, *data[:4], "-o", again, "-q").exit_code == 0
    assert again.read_bytes() == fit.read_bytes()
    out = tmp_path / "out.onnx"
    info = json.loads(invoke("build", onnx_path, "--fit", fit, "-o", out, "--json").stdout)
    assert info["found_by"] == "name" and info["self_check"]["max_logit_error"] < 1e-4
    common = ["--clean", patch_files["test"], "--triggered", patch_files["triggered"], "--json"]
    ref = json.loads(invoke("evaluate", onnx_path, "--fit", fit, *common).stdout)
    ev = json.loads(invoke("evaluate", out, *common).stdout)
    keys = ("acc", "asr", "sia", "tpr", "fpr")
    assert {k: ev[k] for k in keys} == {k: ref[k] for k in keys}
    assert ref["asr"] < 0.1 and ref["model"]["asr"] > 0.9 and ref["sia"] > 0.8
    # the .pt2 of the same model (`fit --targets 0`): the same layers are found by value
    info = json.loads(invoke("build", onnx_path, "--fit", fitted[0], "-o", out, "--json").stdout)
    assert info["found_by"] == "value"
    res = invoke("fit", "--model", onnx_path, "--weights", fit, *data)
    assert res.exit_code == 2 and "drop --weights" in res.output
    res = invoke("evaluate", patch_files["model"], "--fit", fit, *common)  # .pt2 + ONNX's fit
    assert res.exit_code == 2 and "the fit file was made from an .onnx file" in res.stderr
