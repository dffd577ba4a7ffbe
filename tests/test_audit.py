"""The graph audit: backdoors planted in the graph (a Where that swaps the logits of stamped
images, the same behind an If) are found and refused by `fit` and `build`, never carried into
a built graph without a word; shape arithmetic and plain classifiers audit clean."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from bna_export.cli.main import cli
from click.testing import CliRunner
from onnx import TensorProto, helper
from tiny_models import export_onnx

from bna_export.audit import audit_file
from bna_export.errors import ModelError
from bna_export.lab.graph_backdoors import plant
from bna_export.model import load_model

ATTACKER = 3


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def planted(patch_scenario, tmp_path_factory):
    """f of the patch scenario as ONNX, and the same graph with each planted backdoor."""
    folder = tmp_path_factory.mktemp("audit")
    example = torch.from_numpy(patch_scenario.test.x[:2])
    clean = export_onnx(patch_scenario.net, example, folder / "f.onnx", "dynamo")
    return clean, {
        k: plant(clean, folder / f"{k}.onnx", k, target=ATTACKER) for k in ("where", "if")
    }


def stamped(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, :, :3, :3] = 1.0
    return x


@pytest.mark.parametrize("kind", ["where", "if"])
def test_a_planted_graph_backdoor_works_and_is_found(planted, patch_scenario, kind):
    clean, models = planted
    x = patch_scenario.test.x[:16]
    sess = ort.InferenceSession(str(models[kind]), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    assert (sess.run(None, {name: stamped(x)})[0].argmax(1) == ATTACKER).all()
    assert (sess.run(None, {name: x})[0].argmax(1) != ATTACKER).any()  # clean images unchanged
    assert onnx.checker.check_model(onnx.load(str(models[kind]))) is None  # passes the checker
    found = audit_file(models[kind])
    ops = {f.op for f in found.findings}
    assert ops == ({"Greater", "Where"} if kind == "where" else {"Greater", "If"})
    greater = next(f for f in found.findings if f.op == "Greater")
    assert greater.constants == ("planted_threshold=0.9",)
    assert audit_file(clean).clean


@pytest.mark.parametrize("kind", ["where", "if"])
def test_fit_and_build_refuse_a_graph_backdoor_with_one_line(
    planted, patch_files, fitted, tmp_path, kind
):
    _, models = planted
    path = models[kind]
    res = invoke("audit", path)
    assert res.exit_code == 1 and "graph logic found" in res.stdout
    out = tmp_path / "o"
    out.mkdir()
    for args in (
        [
            "fit",
            "--model",
            path,
            "--data",
            patch_files["defender"],
            "--targets",
            "0",
            "-o",
            out / "f.bna",
        ],
        ["build", path, "--fit", fitted[0], "-o", out / "b.onnx"],
    ):
        res = invoke(*args)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "graph logic a weight repair cannot remove" in lines[0]
        assert "planted_" in lines[0] and ("If" in lines[0] or "Where" in lines[0])
        assert list(out.iterdir()) == []
    x = torch.from_numpy(np.load(patch_files["defender"])["x"])
    with pytest.raises(ModelError, match="graph logic"):
        load_model(str(path), None, x[:2], x)


def test_allowed_graph_logic_is_carried_but_said(planted, patch_scenario, fitted, tmp_path):
    _, models = planted
    out = tmp_path / "b.onnx"
    res = invoke("build", models["where"], "--fit", fitted[0], "-o", out, "--allow-graph-logic")
    assert res.exit_code == 0, res.output
    warning = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "planted_Where" in warning[0]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    said = json.loads(meta["bna.audit"])
    assert not said["clean"] and {f["op"] for f in said["findings"]} == {"Greater", "Where"}
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    label = sess.run(["label"], {sess.get_inputs()[0].name: stamped(patch_scenario.test.x[:8])})
    assert (label[0] == ATTACKER).all()  # the repair does not remove it: that is why it is said


def _graph(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def test_shape_arithmetic_is_not_graph_logic_and_a_constant_output_is(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    one = helper.make_tensor("one", TensorProto.INT64, [], [1])
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    # an exporter's dynamic reshape: Where on the batch size, which depends on the shape only
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"]),
        helper.make_node("Equal", ["n", "one"], ["is_one"]),
        helper.make_node("Where", ["is_one", "one", "n"], ["m"]),
        helper.make_node("Unsqueeze", ["m", "zero1"], ["m1"]),
        helper.make_node("Concat", ["m1", "four"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = [one, zero, helper.make_tensor("zero1", TensorProto.INT64, [1], [0]),
             helper.make_tensor("four", TensorProto.INT64, [1], [4])]  # fmt: skip
    onnx.save(_graph(nodes, [x], [y], inits), str(tmp_path / "shape.onnx"))
    assert audit_file(tmp_path / "shape.onnx").clean
    # logits that are a constant, whatever the image
    const = helper.make_tensor("c", TensorProto.FLOAT, [1, 4], [0, 0, 9, 0])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Expand", ["c", "s"], ["y"]),
    ]
    onnx.save(_graph(nodes, [x], [y], [const]), str(tmp_path / "const.onnx"))
    found = audit_file(tmp_path / "const.onnx")
    assert not found.clean and found.detached_outputs == ("y",)
    # an ArgMax whose result picks values is logic; one that is an output is not
    am = helper.make_tensor_value_info("am", TensorProto.INT64, ["N"])
    nodes = [helper.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=0)]
    onnx.save(_graph(nodes, [x], [y, am][1:]), str(tmp_path / "argmax.onnx"))
    assert audit_file(tmp_path / "argmax.onnx").clean
    nodes = [
        helper.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=1),
        helper.make_node("GatherElements", ["x", "am"], ["picked"], axis=1),
        helper.make_node("Expand", ["picked", "s4"], ["y"]),
    ]
    s4 = helper.make_tensor("s4", TensorProto.INT64, [2], [1, 4])
    onnx.save(_graph(nodes, [x], [y], [s4]), str(tmp_path / "pick.onnx"))
    ops = {f.op for f in audit_file(tmp_path / "pick.onnx").findings}
    assert ops == {"ArgMax", "GatherElements"}


def test_audit_json_and_unreadable_input(planted, tmp_path):
    clean, models = planted
    res = invoke("audit", clean, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["clean"] is True
    res = invoke("audit", models["if"], "--json")
    got = json.loads(res.stdout)
    assert res.exit_code == 1 and {f["op"] for f in got["findings"]} == {"Greater", "If"}
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not onnx")
    res = invoke("audit", bad)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1


def _gate_graph(tmp_path, name, gate_nodes, *, functions=(), opsets=(), order=None):
    """x [N, 4] → y [N, 4]: y = Where(gate, 9, x) with ``gate_nodes`` computing ``gate`` from x."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    consts = [
        helper.make_tensor("t", TensorProto.FLOAT, [], [0.9]),
        helper.make_tensor("nine", TensorProto.FLOAT, [], [9.0]),
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
    ]
    nodes = [*gate_nodes, helper.make_node("Where", ["gate", "nine", "x"], ["y"], name="swap")]
    if order is not None:
        nodes = [nodes[i] for i in order]
    graph = helper.make_graph(nodes, "g", [x], [y], consts)
    imports = [helper.make_opsetid("", 18), *opsets]
    model = helper.make_model(graph, opset_imports=imports, functions=list(functions))
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_gates_an_attacker_would_hide_are_found(tmp_path):
    greater = helper.make_node("Greater", ["x", "t"], ["gate"], name="test")
    hidden = helper.make_function(
        "evil", "Gate", ["a", "b"], ["c"], [helper.make_node("Greater", ["a", "b"], ["c"])],
        [helper.make_opsetid("", 18)],
    )  # fmt: skip
    cases = {
        "in-a-function": (
            [helper.make_node("Gate", ["x", "t"], ["gate"], domain="evil", name="call")],
            {"functions": [hidden], "opsets": [helper.make_opsetid("evil", 1)]},
            {"Greater"},
        ),
        "out-of-order": ([greater], {"order": [1, 0]}, {"Greater"}),
        "cast-to-bool": (
            [
                helper.make_node("Sub", ["x", "t"], ["d"]),
                helper.make_node("Relu", ["d"], ["r"]),
                helper.make_node("Cast", ["r"], ["gate"], to=TensorProto.BOOL, name="cast"),
            ],
            {},
            {"Cast"},
        ),
        "other-domain": (
            [
                helper.make_node("Binarizer", ["x"], ["b"], domain="ai.onnx.ml", threshold=0.9),
                helper.make_node("Cast", ["b"], ["gate"], to=TensorProto.BOOL),
            ],
            {"opsets": [helper.make_opsetid("ai.onnx.ml", 3)]},
            {"Binarizer", "Cast"},
        ),
    }
    for name, (gate, options, expected) in cases.items():
        found = audit_file(_gate_graph(tmp_path, name, gate, **options))
        ops = {f.op for f in found.findings}
        assert expected <= ops and "Where" in ops, (name, found.summary())


def test_image_values_as_positions_and_hardmax_are_found(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None])
    nodes = [
        helper.make_node("Hardmax", ["x"], ["h"], axis=1),
        helper.make_node("Cast", ["h"], ["hi"], to=TensorProto.INT64),
        helper.make_node("ReduceMax", ["hi"], ["start"], keepdims=0),
        helper.make_node("Reshape", ["start", "one"], ["start1"]),
        helper.make_node("Slice", ["x", "start1", "four", "one"], ["y"]),
    ]
    inits = [helper.make_tensor("one", TensorProto.INT64, [1], [1]),
             helper.make_tensor("four", TensorProto.INT64, [1], [4])]  # fmt: skip
    onnx.save(_graph(nodes, [x], [y], inits), str(tmp_path / "slice.onnx"))
    ops = {f.op for f in audit_file(tmp_path / "slice.onnx").findings}
    assert {"Hardmax", "Slice"} <= ops


def test_the_exporters_softplus_threshold_is_not_graph_logic(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [  # softplus(x) with PyTorch's threshold 20, as torch.onnx's dynamo export writes it
        helper.make_node("Greater", ["x", "twenty"], ["big"]),
        helper.make_node("Softplus", ["x"], ["soft"]),
        helper.make_node("Where", ["big", "x", "soft"], ["y"]),
    ]
    twenty = helper.make_tensor("twenty", TensorProto.FLOAT, [], [20.0])
    onnx.save(_graph(nodes, [x], [y], [twenty]), str(tmp_path / "softplus.onnx"))
    assert audit_file(tmp_path / "softplus.onnx").clean


def test_evaluate_takes_what_fit_took(planted, patch_files):
    _, models = planted
    common = ["--clean", patch_files["test"]]
    res = invoke("evaluate", models["where"], *common)
    assert res.exit_code == 2 and "graph logic" in res.stderr
    res = invoke("evaluate", models["where"], *common, "--allow-graph-logic", "--json")
    assert res.exit_code == 0, res.output


def test_the_inputs_own_bna_metadata_does_not_reach_the_build(planted, fitted, tmp_path):
    clean, _ = planted
    proto = onnx.load(str(clean))  # with its external data, saved inline below
    proto.metadata_props.add(key="bna.audit", value='{"clean": true, "forged": 1}')
    forged = tmp_path / "forged.onnx"
    onnx.save(proto, str(forged))
    out = tmp_path / "b.onnx"
    assert invoke("build", forged, "--fit", fitted[0], "-o", out).exit_code == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert "bna.audit" not in meta
