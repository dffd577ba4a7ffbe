"""The ONNX rewriter: every export form of f, built with a real fit file, run in ONNX Runtime
(and the ONNX reference evaluator) against the PyTorch reference of the mitigated classifier."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from tiny_models import EXPORT_FORMS, ResidualNet, export_onnx

from bna_export import artifact
from bna_export.defend import fit_defence
from bna_export.errors import ModelError
from bna_export.export import build_graph
from bna_export.export.build import rewrite
from bna_export.export.fold import LayerStats
from bna_export.export.locate import Located
from bna_export.export.probe import ProbeRunner
from bna_export.fitfile import Mitigation
from bna_export.lab.zoo import SmallCNN, train_classifier
from bna_export.mitigated import lead, predict_mitigated
from bna_export.model import adapt_module
from bna_export.settings import FitSettings, ReverseSettings, Settings


@pytest.fixture(scope="module")
def patch_reference(patch_scenario, fitted):
    """f (as fitted), its fit file, and inputs: clean test images then triggered ones."""
    fit = artifact.load(fitted[0])
    model = adapt_module(patch_scenario.net, torch.from_numpy(patch_scenario.test.x[:2]))
    x = np.concatenate([patch_scenario.test.x[:64], patch_scenario.triggered["x"][:64]])
    return model, fit, x


def reference(model, fit, x):
    m = Mitigation.from_fit(fit)
    return predict_mitigated(model, m.targets, m.thetas, x, routing=m.routing)


def run(data: bytes, x: np.ndarray):
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(["label", "triggered", "logits"], {sess.get_inputs()[0].name: x})


def assert_matches(data: bytes, ref, x: np.ndarray, sizes=(1, 7, 64)) -> None:
    for n in sizes:
        for start in (0, len(x) - n):  # clean images first, triggered last
            sl = slice(start, start + n)
            label, flag, logits = run(data, x[sl])
            np.testing.assert_array_equal(label, ref.label[sl])
            np.testing.assert_array_equal(flag, ref.triggered[sl])
            np.testing.assert_allclose(logits, ref.logits[sl], atol=1e-4, rtol=0)


def test_a_target_routed_among_its_sources_matches_the_reference(
    patch_reference, patch_scenario, tmp_path
):
    """A fit whose target 0 is routed among its sources (here made one, source 1, as an
    all-to-all map's target is): g_0 answers 0 or 1, whichever it prefers. The graph adds its
    constant before g_0's argmax and gives the reference's labels, flags and logits; triggered
    images of the other sources are no longer answered by their own class."""
    model, fit, x = patch_reference
    fit = artifact.decode(artifact.encode(fit))
    fit.header["sources"]["0"], fit.header["source_routed"] = [1], [0]
    m = Mitigation.from_fit(fit)
    assert m.routing.answers == ((1,),)
    ref = predict_mitigated(model, m.targets, m.thetas, x, routing=m.routing)
    free = predict_mitigated(model, m.targets, m.thetas, x)
    assert set(ref.label[ref.triggered]) == {1} and len(set(free.label[free.triggered])) > 1
    probes = fit.tensors["probe.x"]
    p = predict_mitigated(model, m.targets, m.thetas, probes, routing=m.routing)
    fit.tensors.update({"probe.label": p.label, "probe.triggered": p.triggered})
    fit.tensors["probe.logits"] = p.logits
    path = export_onnx(patch_scenario.net, torch.from_numpy(x[:2]), tmp_path / "f.onnx", "dynamo")
    built = build_graph(path, fit)
    assert_matches(built.data, ref, x)
    whole = build_graph(path, fit, whole_batch=True)
    assert_matches(whole.data, ref, x, sizes=(64,))


def test_a_flag_drop_matches_the_reference_in_both_routings(
    patch_reference, patch_scenario, tmp_path
):
    """A flag drop set between the falls of t's lead on the flagged rows: the rows whose lead
    fell less keep label t unflagged, in the reference and in both graphs alike."""
    model, fit, x = patch_reference
    fit = artifact.decode(artifact.encode(fit))
    m = Mitigation.from_fit(fit)
    assert m.routing.drops[0] > 0  # the fit set one (fit.flag_drop)
    fit.header["flag_drops"] = [0.0]
    paper = Mitigation.from_fit(fit).routing
    free = predict_mitigated(model, m.targets, m.thetas, x, routing=paper)
    with torch.no_grad():
        lf = model(torch.from_numpy(x))
        with model.mitigated(m.thetas, torch.zeros(len(x), dtype=torch.int64)):
            lg = model(torch.from_numpy(x))
    t, every = torch.zeros(len(x), dtype=torch.int64), torch.ones((len(x), lf.shape[1]), dtype=bool)
    fell = (lead(lf, t, every) - lead(lg, t, every)).numpy()
    drop = float(np.median(fell[free.triggered]))
    fit.header["flag_drops"] = [drop]
    m = Mitigation.from_fit(fit)
    ref = predict_mitigated(model, m.targets, m.thetas, x, routing=m.routing)
    spared = free.triggered & ~ref.triggered
    assert spared.any() and (ref.triggered <= free.triggered).all()
    assert (ref.label[spared] == 0).all() and (fell[spared] <= drop).all()
    probes = fit.tensors["probe.x"]
    p = predict_mitigated(model, m.targets, m.thetas, probes, routing=m.routing)
    fit.tensors.update({"probe.label": p.label, "probe.triggered": p.triggered})
    fit.tensors["probe.logits"] = p.logits
    path = export_onnx(patch_scenario.net, torch.from_numpy(x[:2]), tmp_path / "f.onnx", "dynamo")
    assert_matches(build_graph(path, fit).data, ref, x)
    assert_matches(build_graph(path, fit, whole_batch=True).data, ref, x, sizes=(64,))


@pytest.mark.parametrize("form", list(EXPORT_FORMS))
def test_every_export_form_matches_the_reference(form, patch_reference, patch_scenario, tmp_path):
    model, fit, x = patch_reference
    path = export_onnx(patch_scenario.net, torch.from_numpy(x[:2]), tmp_path / "f.onnx", form)
    built = build_graph(path, fit)
    ref = reference(model, fit, x)
    assert ref.triggered[64:].mean() > 0.5  # the triggered half is routed and flagged
    assert_matches(built.data, ref, x)
    assert len(built.layers) == 3 and built.max_logit_error < 1e-4
    kinds = {la["node"] for la in built.layers}
    if form in ("dynamo", "legacy"):
        assert "Conv" in kinds  # BN folded: found by value in the Conv's output
    if form in ("dynamo-unoptimized", "legacy-unfolded"):
        assert kinds == {"BatchNormalization"}
    proto = onnx.load_from_string(built.data)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    assert [o.name for o in proto.graph.output] == ["label", "triggered", "logits"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["bna.targets"] == "[0]" and len(meta["bna.fit_sha256"]) == 64
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)


def test_g_runs_only_from_the_first_bn_layer_and_on_routed_rows(
    patch_reference, patch_scenario, tmp_path
):
    _, fit, x = patch_reference
    net = patch_scenario.net  # f as trained and deployed
    path = export_onnx(net, torch.from_numpy(x[:2]), tmp_path / "f.onnx", "dynamo")
    built = build_graph(path, fit)
    graph = onnx.load_from_string(built.data).graph
    f_ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert [n.op_type for n in graph.node].count("Conv") == f_ops.count("Conv")  # f once
    (route,) = [n for n in graph.node if n.op_type == "If"]  # one target, one g
    then = next(a.g for a in route.attribute if a.name == "then_branch")
    ops = [n.op_type for n in then.node]
    convs = [n for n in then.node if n.op_type == "Conv" and not n.name.startswith("bna/")]
    assert len(convs) == f_ops.count("Conv") and ops.count("ScatterND") == 3
    gathered = {n.output[0]: n.input[0] for n in then.node if n.op_type == "Gather"}
    first_conv = convs[0]
    assert gathered[first_conv.input[0]] == graph.input[0].name  # g reads f's routed rows
    assert {i.name for i in then.initializer} >= set(first_conv.input[1:])  # own weights
    # BN -> ReLU -> pool -> next layer: the clip is a scalar Clip after each layer, its scale
    # carried into the next layer's weights (no per-channel Max/Min, no extra Relu)
    assert ops.count("Clip") == 3 and "Max" not in ops and "Relu" not in ops


def test_batch_with_no_routed_sample(patch_reference, patch_scenario, tmp_path):
    model, fit, x = patch_reference
    ref = reference(model, fit, x)
    clean = x[:64][ref.label[:64] != 0][:9]  # f sends none of these to target 0
    path = export_onnx(patch_scenario.net, torch.from_numpy(x[:2]), tmp_path / "f.onnx", "dynamo")
    built = build_graph(path, fit)
    label, flag, logits = run(built.data, clean)
    with torch.no_grad():
        f_logits = model(torch.from_numpy(clean)).numpy()
    assert not flag.any()
    np.testing.assert_array_equal(label, f_logits.argmax(1))
    np.testing.assert_allclose(logits, f_logits, atol=1e-4, rtol=0)


def test_reference_evaluator_gives_the_same_labels(patch_reference, patch_scenario, tmp_path):
    model, fit, x = patch_reference
    path = export_onnx(patch_scenario.net, torch.from_numpy(x[:2]), tmp_path / "f.onnx", "dynamo")
    built = build_graph(path, fit)
    ref = reference(model, fit, x)
    sess = ReferenceEvaluator(onnx.load_from_string(built.data))
    for sl in (slice(0, 7), slice(120, 128), slice(60, 68)):
        label, flag, _ = sess.run(None, {"images": x[sl]})
        np.testing.assert_array_equal(label, ref.label[sl])
        np.testing.assert_array_equal(flag, ref.triggered[sl])


def test_openvino_gives_the_same_labels_and_flags(patch_reference, patch_scenario, tmp_path):
    ov = pytest.importorskip("openvino")
    _, fit, x = patch_reference
    path = export_onnx(patch_scenario.net, torch.from_numpy(x[:2]), tmp_path / "f.onnx", "dynamo")
    built = tmp_path / "built.onnx"
    built.write_bytes(build_graph(path, fit).data)
    compiled = ov.Core().compile_model(ov.Core().read_model(str(built)), "CPU")
    for sl in (slice(0, 1), slice(0, 7), slice(0, 64), slice(64, 128), slice(60, 124)):
        out = compiled(x[sl])
        label, flag, _ = run(built.read_bytes(), x[sl])
        np.testing.assert_array_equal(out[compiled.output("label")], label)
        np.testing.assert_array_equal(out[compiled.output("triggered")], flag)
    assert flag.any()  # the last slice holds triggered images, flagged alike


def test_a_different_model_is_refused(patch_reference, tmp_path):
    _, fit, x = patch_reference
    torch.manual_seed(1)
    other = SmallCNN(1, 5, 16, 8).eval()  # same architecture, other weights
    path = export_onnx(other, torch.from_numpy(x[:2]), tmp_path / "other.onnx", "dynamo")
    with pytest.raises(ModelError, match="not the model that was fitted"):
        build_graph(path, fit)


def test_fixed_batch_export_is_refused(patch_reference, patch_scenario, tmp_path):
    _, fit, x = patch_reference
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(patch_scenario.net.eval(), (torch.from_numpy(x[:2]),), path, dynamo=False)
    with pytest.raises(ModelError, match="fixed batch size"):
        build_graph(path, fit)


@pytest.fixture(scope="module")
def residual(patch_scenario):
    """A residual CNN with BN after an Add and after a ReLU, fitted (briefly) for one target."""
    sc = patch_scenario
    trig = sc.triggered
    # poisoned with the scenario's patch: its test images plus their triggered copies -> 0
    x = np.concatenate([sc.test.x, trig["x"]])
    y = np.concatenate([sc.test.y, trig["attack_label"]])
    net = train_classifier(ResidualNet(width=16), x, y, epochs=20, lr=1e-2, seed=0)
    model = adapt_module(net, torch.from_numpy(x[:2]))
    quick = Settings(reverse=ReverseSettings(steps=100), fit=FitSettings(epochs=5))
    fit = fit_defence(model, sc.defender, targets=[0], settings=quick).fit
    xs = np.concatenate([sc.test.x[:64], trig["x"][:64]])
    fit = artifact.decode(artifact.encode(fit))  # as `build` reads it
    return net, model, fit, xs


@pytest.mark.parametrize("form", list(EXPORT_FORMS))
def test_bn_after_add_and_after_relu(form, residual, tmp_path):
    net, model, fit, x = residual
    path = export_onnx(net, torch.from_numpy(x[:2]), tmp_path / "res.onnx", form)
    built = build_graph(path, fit)
    ref = reference(model, fit, x)
    assert ref.triggered.any()  # some samples route through g_t and get flagged
    assert_matches(built.data, ref, x)
    # the BN after the Add and after the ReLU cannot be folded into a Conv
    assert [la["node"] for la in built.layers][1:] == ["BatchNormalization"] * 2


def test_whole_batch_graph_gives_the_same_answers(patch_reference, patch_scenario, tmp_path):
    model, fit, x = patch_reference
    path = export_onnx(patch_scenario.net, torch.from_numpy(x[:2]), tmp_path / "f.onnx", "dynamo")
    naive = build_graph(path, fit, whole_batch=True)
    assert_matches(naive.data, reference(model, fit, x), x, sizes=(7, 64))


def test_builds_are_byte_identical_and_hold_no_path(patch_reference, patch_scenario, tmp_path):
    """The same model and fit file give the same bytes, wherever the files lie."""
    _, fit, x = patch_reference
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    b.mkdir(parents=True)
    a.mkdir()
    for folder in (a, b):
        export_onnx(patch_scenario.net, torch.from_numpy(x[:2]), folder / "f.onnx", "dynamo")
    first, second = build_graph(a / "f.onnx", fit).data, build_graph(b / "f.onnx", fit).data
    assert first == second
    assert b"/work/" not in first and b"/tmp/" not in first and b'File "' not in first
    node = onnx.load_from_string(first).graph.node[0]  # exporters keep stack traces here
    assert not node.metadata_props and not node.doc_string


def test_nan_inf_zero_and_saturated_images_get_defined_labels(patch_reference, patch_scenario):
    """No crash and a label in [0, K) for every image, whatever its values (documented in the
    README: NaN/Inf images get meaningless labels; `run` and `bna_run` refuse them)."""
    _, fit, x = patch_reference
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(
            patch_scenario.net, torch.from_numpy(x[:2]), Path(tmp) / "f.onnx", "dynamo"
        )
        data = build_graph(path, fit).data
    shape = (4, *x.shape[1:])
    odd = np.concatenate(
        [
            np.full(shape, np.nan, np.float32),
            np.full(shape, np.inf, np.float32),
            np.full(shape, -np.inf, np.float32),
            np.zeros(shape, np.float32),
            np.ones(shape, np.float32),
            np.full(shape, 1e30, np.float32),
            x[:4],
        ]
    )
    odd[-1, 0, 0, 0] = np.nan  # one NaN pixel in a real image
    for n in (1, 5, len(odd)):
        label, flag, logits = run(data, odd[:n])
        assert label.dtype == np.int64 and ((label >= 0) & (label < 5)).all()
        assert flag.dtype == np.bool_ and logits.shape == (n, 5)
    label, _, logits = run(data, odd)
    assert np.isfinite(logits[3 * 4 : 5 * 4]).all()  # zeros and ones: ordinary answers


def test_one_session_serves_many_threads(patch_reference, patch_scenario, tmp_path):
    """One ONNX Runtime session run from 8 threads at once, as a web service would: the same
    answers as one thread, batch by batch."""
    from concurrent.futures import ThreadPoolExecutor

    _, fit, x = patch_reference
    path = export_onnx(patch_scenario.net, torch.from_numpy(x[:2]), tmp_path / "f.onnx", "dynamo")
    sess = ort.InferenceSession(build_graph(path, fit).data, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    batches = [x[rng.integers(0, len(x), int(rng.integers(1, 40)))] for _ in range(64)]
    name = sess.get_inputs()[0].name
    one = [sess.run(None, {name: b}) for b in batches]
    with ThreadPoolExecutor(8) as pool:
        many = list(pool.map(lambda b: sess.run(None, {name: b}), batches * 2))
    for want, got in zip(one * 2, many, strict=True):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])
    assert any(w[1].any() for w in one)  # some batches route rows through g_t


def test_an_error_inside_a_pass_is_the_libraries_own_one_line(tmp_path):
    """The rewrite runs as onnx-ir passes, which wrap what a pass raises: the user still gets
    the ModelError (here: logits computed beside the BN layer, not from it)."""
    c = 2
    init = [
        helper.make_tensor(n, TensorProto.FLOAT, [c], v)
        for n, v in (("g", [1.0] * c), ("b", [0.0] * c), ("m", [0.0] * c), ("v", [1.0] * c))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"]),
            helper.make_node("Flatten", ["x"], ["logits"]),
        ],
        "beside",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 1, 1])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 1, 1]),
        ],
        init,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.from_proto(proto)
    y = next(v for node in model.graph for v in node.outputs if v.name == "y")
    probe = ProbeRunner(proto, np.ones((3, c, 1, 1), np.float32))
    ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
    stats = [LayerStats(ones, zeros, zeros, ones, 1e-5)]
    theta = np.stack([zeros, ones, -ones, ones])[None]
    with pytest.raises(ModelError, match="do not depend on any BatchNorm layer"):
        rewrite(model, probe, [Located(0, y, 0.0, 4)], (stats, [theta], [0]), {})
