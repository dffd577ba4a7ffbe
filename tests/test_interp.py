"""The ONNX → PyTorch interpreter: every export form of two CNNs gives ONNX Runtime's logits and
gradients in its input; hand-made graphs check the operators' ONNX semantics against ONNX
Runtime; where h goes (the sites); and the errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tiny_models import EXPORT_FORMS, ResidualNet, export_onnx, make_cnn

from bna_export.errors import ModelError
from bna_export.interp import OnnxModule, bn_sites
from bna_export.model import load_model


def ort_run(path_or_bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    cnn = make_cnn().eval()
    g = torch.Generator().manual_seed(1)
    for m in cnn.modules():  # seeded statistics, not the identity
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return {"cnn": cnn, "residual": ResidualNet().eval()}


# which layers get h, per net and export form: (sites, how many measured)
EXPECTED_SITES = {
    ("cnn", "dynamo"): (3, 3),  # BN folded into both Convs and the hidden Gemm
    ("cnn", "dynamo-unoptimized"): (3, 0),  # BatchNormalization nodes kept
    ("cnn", "legacy"): (3, 2),  # the BN after the hidden Linear stays a node
    ("cnn", "legacy-unfolded"): (3, 0),
    ("residual", "dynamo"): (4, 2),  # conv1 (+bn1) and conv2 (no BN: its own h), 2 BN nodes
    ("residual", "dynamo-unoptimized"): (4, 1),
    ("residual", "legacy"): (4, 2),
    ("residual", "legacy-unfolded"): (4, 1),
}


@pytest.mark.parametrize("form", list(EXPORT_FORMS))
@pytest.mark.parametrize("net_name", ["cnn", "residual"])
def test_every_export_form_runs_as_onnx_runtime_does(nets, net_name, form, tmp_path):
    net = nets[net_name]
    x = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    path = export_onnx(net, x[:2], tmp_path / "f.onnx", form)
    model = load_model(str(path), None, x[:2], calibration=x)
    with torch.no_grad():
        out = model(x).numpy()
        want = net(x).numpy()
    np.testing.assert_allclose(out, ort_run(str(path), x.numpy()), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    sites, measured = EXPECTED_SITES[(net_name, form)]
    assert len(model.layers) == sites and sum(la.measured for la in model.layers) == measured
    # differentiable in the input, as the trigger search needs; gradients agree with PyTorch's
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    model(xa)[:, 1].sum().backward()
    net(xb)[:, 1].sum().backward()
    np.testing.assert_allclose(xa.grad.numpy(), xb.grad.numpy(), atol=1e-5, rtol=0)


def test_measured_layers_pass_f_through_and_hold_clean_statistics(nets, tmp_path):
    net = nets["cnn"]
    x = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    model = load_model(str(export_onnx(net, x[:2], tmp_path / "f.onnx", "dynamo")), None, x[:2], x)
    first = model.layers[0]
    with torch.no_grad(), model.capturing(inputs=True) as seen:
        model(x)
    z = seen[0][0]
    np.testing.assert_allclose(first.running_mean, z.mean((0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(first.weight, z.std((0, 2, 3), unbiased=False), rtol=1e-4)
    # θ = f's own normalisation changes nothing; another θ does, only for routed samples
    route = torch.tensor([0, -1] * 16)
    thetas = [la.f_theta()[None] for la in model.layers]
    with torch.no_grad():
        plain = model(x)
        with model.mitigated(thetas, route):
            same = model(x)
        moved = [th.clone() for th in thetas]
        moved[0][0, 0] += 0.5  # shift µ
        with model.mitigated(moved, route):
            other = model(x)
    np.testing.assert_allclose(same, plain, atol=1e-5)
    assert torch.equal(other[1::2], plain[1::2])  # route -1: f exactly
    assert not torch.allclose(other[0::2], plain[0::2])


def _graph(nodes, inits, out_shape, opset=20, in_shape=(2, 3, 8, 8)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _i64(*v):
    return np.array(v, dtype=np.int64)


rng = np.random.default_rng(0)
OP_GRAPHS = {
    "asymmetric conv padding, strides, groups": (
        [
            helper.make_node(
                "Conv", ["x", "w", "b"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1], group=3
            )
        ],
        {"w": rng.normal(size=(6, 1, 3, 3)).astype(np.float32), "b": np.ones(6, np.float32)},
    ),
    "SAME_UPPER conv": (
        [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
        {"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32)},
    ),
    "max and average pools with ceil mode and padding": (
        [
            helper.make_node(
                "MaxPool",
                ["x"],
                ["m"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                ceil_mode=1,
            ),
            helper.make_node(
                "AveragePool",
                ["m"],
                ["y"],
                kernel_shape=[2, 2],
                pads=[0, 0, 1, 1],
                count_include_pad=1,
            ),
        ],
        {},
    ),
    "reduce, slice, gather, concat, reshape with 0 and -1": (
        [
            helper.make_node("Slice", ["x", "st", "en", "axs", "stp"], ["s"]),
            helper.make_node("ReduceMean", ["s", "ax"], ["r"], keepdims=1),
            helper.make_node("Gather", ["s", "idx"], ["g"], axis=1),
            helper.make_node("Concat", ["g", "r"], ["c"], axis=1),
            helper.make_node("Reshape", ["c", "shape"], ["y"]),
        ],
        {
            "ax": _i64(1),
            "st": _i64(1, -7),
            "en": _i64(9, 1000),
            "axs": _i64(2, 3),
            "stp": _i64(2, 3),
            "idx": _i64(-1, 0),
            "shape": _i64(0, -1),
        },
    ),
    "shape chain: Shape, Gather, Unsqueeze, Concat, Flatten, Gemm, Softmax": (
        [
            helper.make_node("Shape", ["x"], ["sh"]),
            helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "zax"], ["n1"]),
            helper.make_node("Concat", ["n1", "m1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["f"]),
            helper.make_node("Gemm", ["f", "w", "b"], ["l"], transB=1, alpha=0.5, beta=2.0),
            helper.make_node("Clip", ["l", "lo", ""], ["c"]),
            helper.make_node("Softmax", ["c"], ["y"], axis=1),
        ],
        {
            "zero": np.array(0, np.int64),
            "zax": _i64(0),
            "m1": _i64(-1),
            "w": rng.normal(size=(5, 192)).astype(np.float32),
            "b": rng.normal(size=5).astype(np.float32),
            "lo": np.array(-0.5, np.float32),
        },
    ),
    "pad, transpose, split, max, LeakyRelu, HardSigmoid, Gelu": (
        [
            helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
            helper.make_node("Transpose", ["p"], ["t"], perm=[0, 2, 3, 1]),
            helper.make_node("Split", ["t", "sp"], ["a", "b"], axis=3),
            helper.make_node("LeakyRelu", ["a"], ["la"], alpha=0.2),
            helper.make_node("HardSigmoid", ["b"], ["hb"]),
            helper.make_node("Max", ["la", "hb"], ["mx"]),
            helper.make_node("Gelu", ["mx"], ["y"]),
        ],
        {"pads": _i64(0, 0, 1, 2, 0, 0, 2, 1), "sp": _i64(1, 2)},
    ),
}


@pytest.mark.parametrize("case", list(OP_GRAPHS))
def test_operators_follow_onnx_semantics(case):
    nodes, inits = OP_GRAPHS[case]
    proto = _graph(nodes, inits, None)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    want = ort_run(proto.SerializeToString(), x)
    got = OnnxModule(ir.from_proto(proto))(torch.from_numpy(x)).detach().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_an_unsupported_operator_is_named():
    proto = _graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Resize", ["r", "", "sc"], ["y"], name="up"),
            helper.make_node("Frobnicate", ["y"], ["z"], domain="com.example", name="odd"),
        ],
        {"sc": np.array([1, 1, 2, 2], np.float32)},
        None,
    )
    with pytest.raises(ModelError, match=r"Resize \(node up\).*com\.example::Frobnicate"):
        OnnxModule(ir.from_proto(proto))


def test_sites_skip_the_logits_layer_and_convs_feeding_a_bn():
    proto = _graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"]),
            helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["bn"]),
            helper.make_node("Relu", ["bn"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["c2"]),
            helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1),
        ],
        {
            "w1": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "s": np.ones(4, np.float32),
            "b": np.zeros(4, np.float32),
            "m": np.zeros(4, np.float32),
            "v": np.ones(4, np.float32),
            "w2": rng.normal(size=(6, 4, 1, 1)).astype(np.float32),
            "w3": rng.normal(size=(5, 6)).astype(np.float32),
        },
        None,
    )
    assert [v.name for v in bn_sites(ir.from_proto(proto).graph)] == ["bn", "c2"]


def test_a_model_with_two_inputs_is_refused():
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ModelError, match="exactly one input"):
        OnnxModule(ir.from_proto(proto))


def test_a_graph_out_of_order_is_refused():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["z"], ["y"]), helper.make_node("Relu", ["x"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ModelError, match="uses tensor 'z' before any node computes it"):
        OnnxModule(ir.from_proto(proto))
