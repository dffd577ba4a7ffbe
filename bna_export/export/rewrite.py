"""Rewriting f's ONNX graph into one graph holding f, every g_t and the routing (design step 3).

g_t is f from the first BN layer on, with every BN layer's normalisation replaced by Θ_t's and
clipped per channel. Each layer's new normalisation is folded into the node that computes the
layer's output (a kept BatchNormalization node, or the Conv/Gemm that the exporter folded the BN
into); any other producer gets a per-channel Mul/Add after it. The per-channel clip is a scalar
Clip whose per-channel scale moves into the next layer where a ReLU follows, two Relu'd 1x1
depthwise Convs after another Conv (ONNX Runtime fuses both into its blocked convolutions), and
Max/Min elsewhere. Routing: NonZero(ArgMax(f) == t) picks the rows f sent to t, Gather
takes f's tensors at the cut into g_t for those rows only, and ScatterND writes g_t's answers
back; no row routed means g_t runs on an empty batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import ModelError
from .locate import Located, run_exposing

MIN_OPSET = 13


@dataclass(frozen=True)
class LayerStats:
    """A BN layer of f as the fit file records it: γ, β, running mean and var, ε ([C] each)."""

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float


class _Builder:
    """Adds nodes and initializers to one graph with unique names."""

    def __init__(self, graph: ir.Graph, names: set[str] | None = None) -> None:
        self.graph = graph
        if names is None:  # a subgraph's builder shares its parent's names
            names = {v.name for n in graph for v in n.outputs} | set(graph.initializers)
            names |= {v.name for v in graph.inputs}
        self.names = names

    def name(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.name(base)
        v = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        v.shape, v.type = v.const_value.shape, ir.TensorType(v.const_value.dtype)
        self.graph.register_initializer(v)
        return v

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        base: str,
        attributes: Sequence[ir.Attr] = (),
        outputs: int = 1,
    ) -> list[ir.Value]:
        node = ir.Node(
            "",
            op_type,
            list(inputs),
            attributes=list(attributes),
            outputs=[
                ir.Value(name=self.name(f"{base}_{k}" if k else base)) for k in range(outputs)
            ],
            name=self.name(f"bna/{base}"),
        )
        self.graph.append(node)
        return list(node.outputs)

    def one(self, op_type: str, inputs: Sequence[ir.Value | None], base: str, **attrs) -> ir.Value:
        return self.op(
            op_type,
            inputs,
            base,
            [ir.convenience.convert_attribute(k, a) for k, a in attrs.items()],
        )[0]


def _constant_array(v: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output (through Identity), else None."""
    while v is not None:
        if v.const_value is not None:
            return v.const_value.numpy()
        node = v.producer()
        if node is None:
            return None
        if node.op_type == "Identity":
            v = node.inputs[0]
            continue
        if node.op_type == "Constant" and "value" in node.attributes:
            return node.attributes["value"].value.numpy()
        return None
    return None


def _depends_on_input(graph: ir.Graph) -> set[int]:
    """ids of the nodes whose outputs depend on a graph input."""
    live = {id(v) for v in graph.inputs}
    out = set()
    for node in graph:
        if any(v is not None and id(v) in live for v in node.inputs):
            out.add(id(node))
            live.update(id(v) for v in node.outputs)
    return out


def _affine(
    st: LayerStats, theta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For θ = (µ', σ', υ, ω) [4, C]: g's BN output is clip(A·y + c, L, H) with y f's BN
    output; returns A, c, L, H ([C] float32)."""
    mu, sigma, lo, hi = (theta[k].astype(np.float64) for k in range(4))
    g, b = st.weight.astype(np.float64), st.bias.astype(np.float64)
    s = np.sqrt(st.var.astype(np.float64) + st.eps)
    a = s / sigma
    c = -a * b + g * (st.mean - mu) / sigma + b
    with np.errstate(invalid="ignore"):
        low, high = np.minimum(g * lo, g * hi), np.maximum(g * lo, g * hi)
    low = np.where(g == 0, 0.0, low) + b
    high = np.where(g == 0, 0.0, high) + b
    return tuple(t.astype(np.float32) for t in (a, c, low, high))


def _channel_shape(c: int, rank: int) -> tuple[int, ...]:
    return (c,) + (1,) * max(rank - 2, 0)


class _Clone:
    """One g_t: the nodes from the cut on, cloned with the layers re-normalised and clipped."""

    def __init__(self, b: _Builder, tag: str) -> None:
        self.b, self.tag, self.map = b, tag, {}
        self.scale_in: dict[int, np.ndarray] = {}  # Conv node id -> its input channels' scale
        self.skip: set[int] = set()  # ids of nodes the clone leaves out (a Relu made redundant)

    def mapped(self, v: ir.Value | None) -> ir.Value | None:
        """The clone's version of v; an initializer of f is copied into g_t's branch (a branch
        that reads its parent's initializers is slower to start in ONNX Runtime)."""
        if v is None:
            return None
        if id(v) not in self.map and v.is_initializer() and v.const_value is not None:
            self.map[id(v)] = self.b.const(f"{v.name}/{self.tag}", v.const_value.numpy())
        return self.map.get(id(v), v)

    def copy(
        self, node: ir.Node, inputs: Sequence[ir.Value | None] | None = None
    ) -> list[ir.Value]:
        if any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            raise ModelError(
                f"node {node.name!r} ({node.op_type}) after a BatchNorm layer has a subgraph; "
                "control flow inside the classifier is not supported"
            )
        if inputs is None and id(node) in self.scale_in:  # weight scaled, not copied as is
            w = self.b.const(f"{node.name}/{self.tag}/weight_in", self._scaled_weight(node))
            inputs = [w if k == 1 else self.mapped(v) for k, v in enumerate(node.inputs)]
        ins = [self.mapped(v) for v in node.inputs] if inputs is None else list(inputs)
        clone = ir.Node(
            node.domain,
            node.op_type,
            ins,
            attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
            outputs=[ir.Value(name=self.b.name(f"{v.name}/{self.tag}")) for v in node.outputs],
            version=node.version,
            name=self.b.name(f"{node.name or node.op_type}/{self.tag}"),
        )
        self.b.graph.append(clone)
        for old, new in zip(node.outputs, clone.outputs, strict=True):
            self.map[id(old)] = new
        return list(clone.outputs)

    def layer(
        self, node: ir.Node, out: ir.Value, st: LayerStats, theta: np.ndarray, rank: int
    ) -> None:
        """Clone the node producing a BN layer's output with θ folded in, then clip."""
        a, c, low, high = _affine(st, theta)
        ch = len(a)
        tag = f"{out.name}/{self.tag}"
        folded = None
        producer = {"Conv": self._fold_conv, "Gemm": self._fold_gemm}.get(node.op_type)
        flat = node.op_type == "Gemm" and rank == 2
        chain = _scale_chain(out, flat) if flat or (producer and rank == 4) else None
        if chain is not None and np.all(low <= 0) and np.all(high > 1e-6) and _takes(chain[1], ch):
            # BN -> Relu -> (MaxPool | Relu | Identity)* -> [flatten] -> Conv/Gemm: clip then Relu
            # is clip(y, 0, H) = H·Clip(y/H, 0, 1). The Conv/Gemm computes y/H, a scalar Clip
            # (fused into it by ONNX Runtime) does the rest, and H moves forward through the
            # pools (they commute with a positive per-channel scale) into the next Conv's or
            # Gemm's input channels
            relu, consumer = chain
            y = producer(node, a / high, c / high)
            if y is not None:
                zero, one = np.array(0, np.float32), np.array(1, np.float32)
                y = self.b.one(
                    "Clip",
                    [y, self.b.const(f"{tag}/zero", zero), self.b.const(f"{tag}/one", one)],
                    f"{tag}/clip",
                )
                self.map[id(out)] = self.map[id(relu.outputs[0])] = y
                self.skip.add(id(relu))
                self.scale_in[id(consumer)] = high.astype(np.float64)
                return
        if node.op_type == "Conv" and len(node.inputs) >= 2 and rank == 4:
            # clip(y, L, H) = H - Relu((H - L) - Relu(y - L)): the Conv with bias shifted by -L
            # and two 1x1 depthwise Convs, each with its Relu; ONNX Runtime fuses every one of
            # these into its blocked convolutions (per-channel Max/Min would break them up)
            y = self._fold_conv(node, a, c - low)
            if y is not None:
                y = self.b.one("Relu", [y], f"{tag}/above_low")
                y = self._depthwise(y, high - low, f"{tag}/below_high")
                y = self.b.one("Relu", [y], f"{tag}/below_high_relu")
                self.map[id(out)] = self._depthwise(y, high, f"{tag}/clipped")
                return
        if node.op_type == "BatchNormalization" and len(node.outputs) == 1:
            folded = self._fold_bn(node, theta, st)
        elif node.op_type == "Conv" and len(node.inputs) >= 2:
            folded = self._fold_conv(node, a, c)
        elif node.op_type == "Gemm":
            folded = self._fold_gemm(node, a, c)
        if folded is not None:
            y = folded
        else:  # any other producer: y·A + c after it
            y = self.copy(node)[list(node.outputs).index(out)]
            shape = _channel_shape(ch, rank)
            y = self.b.one("Mul", [y, self.b.const(f"{tag}/scale", a.reshape(shape))], f"{tag}/mul")
            y = self.b.one("Add", [y, self.b.const(f"{tag}/shift", c.reshape(shape))], f"{tag}/add")
        shape = _channel_shape(ch, rank)
        y = self.b.one("Max", [y, self.b.const(f"{tag}/low", low.reshape(shape))], f"{tag}/max")
        y = self.b.one("Min", [y, self.b.const(f"{tag}/high", high.reshape(shape))], f"{tag}/min")
        self.map[id(out)] = y

    def _depthwise(self, y: ir.Value, bias: np.ndarray, base: str) -> ir.Value:
        """bias - y per channel, as a 1x1 depthwise Conv (weight -1)."""
        ch = len(bias)
        w = self.b.const(f"{base}/weight", -np.ones((ch, 1, 1, 1), np.float32))
        b = self.b.const(f"{base}/bias", bias.astype(np.float32))
        return self.b.one("Conv", [y, w, b], base, group=ch, kernel_shape=[1, 1])

    def _fold_bn(self, node: ir.Node, theta: np.ndarray, st: LayerStats) -> ir.Value | None:
        # keep the node's own var and ε: scale' = γ·√(var+ε)/σ', mean' = µ'
        scale, var = _constant_array(node.inputs[1]), _constant_array(node.inputs[4])
        if scale is None or var is None:
            return None
        eps = node.attributes["epsilon"].value if "epsilon" in node.attributes else 1e-5
        s = np.sqrt(var.astype(np.float64) + eps)
        new_scale = (scale.astype(np.float64) * s / theta[1]).astype(np.float32)
        ins = [
            self.mapped(node.inputs[0]),
            self.b.const(f"{node.name}/{self.tag}/scale", new_scale),
        ]
        ins += [
            self.mapped(node.inputs[2]),
            self.b.const(f"{node.name}/{self.tag}/mean", theta[0].astype(np.float32)),
            self.mapped(node.inputs[4]),
        ]
        return self.copy(node, ins)[0]

    def _scaled_weight(self, node: ir.Node) -> np.ndarray | None:
        """A Conv's or Gemm's weight with its input channels scaled (see :func:`_scale_chain`;
        after a flatten each channel's scale covers its run of features)."""
        w = _constant_array(node.inputs[1])
        if w is None or id(node) not in self.scale_in:
            return w
        scale = self.scale_in[id(node)]
        if node.op_type == "Gemm":
            trans_b = node.attributes["transB"].value if "transB" in node.attributes else 0
            features = w.shape[1] if trans_b else w.shape[0]
            if features % len(scale):
                raise ModelError(f"{node.name!r}: {features} features from {len(scale)} channels")
            per = np.repeat(scale, features // len(scale))
            scale = per[None, :] if trans_b else per[:, None]
        else:
            scale = scale.reshape(1, -1, *([1] * (w.ndim - 2)))
        return (w.astype(np.float64) * scale).astype(w.dtype)

    def _fold_conv(self, node: ir.Node, a: np.ndarray, c: np.ndarray) -> ir.Value | None:
        w = self._scaled_weight(node)
        if w is None or w.shape[0] != len(a):
            return None
        bias = (
            _constant_array(node.inputs[2])
            if len(node.inputs) > 2
            else np.zeros(len(a), np.float32)
        )
        if bias is None:
            return None
        shape = (len(a),) + (1,) * (w.ndim - 1)
        w2 = (w.astype(np.float64) * a.reshape(shape)).astype(w.dtype)
        b2 = (a.astype(np.float64) * bias + c).astype(w.dtype)
        tag = f"{node.name}/{self.tag}"
        ins = [
            self.mapped(node.inputs[0]),
            self.b.const(f"{tag}/weight", w2),
            self.b.const(f"{tag}/bias", b2),
        ]
        return self.copy(node, ins)[0]

    def _fold_gemm(self, node: ir.Node, a: np.ndarray, c: np.ndarray) -> ir.Value | None:
        attrs = node.attributes
        beta = attrs["beta"].value if "beta" in attrs else 1.0
        trans_b = attrs["transB"].value if "transB" in attrs else 0
        w = self._scaled_weight(node)
        bias = (
            _constant_array(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else None
        )
        if w is None or w.ndim != 2 or bias is None or beta == 0 or bias.size not in (1, len(a)):
            return None
        # Y = α·A·B + β·C: scaling B's output columns and C scales Y's channels (α untouched)
        w2 = w.astype(np.float64) * (a[:, None] if trans_b else a[None, :])
        b2 = (a * (beta * np.broadcast_to(bias, a.shape)) + c) / beta
        tag = f"{node.name}/{self.tag}"
        ins = [
            self.mapped(node.inputs[0]),
            self.b.const(f"{tag}/weight", w2.astype(w.dtype)),
            self.b.const(f"{tag}/bias", b2.astype(np.float32)),
        ]
        return self.copy(node, ins)[0]


def rewrite(
    model: ir.Model,
    proto: onnx.ModelProto,
    located: Sequence[Located],
    stats: Sequence[LayerStats],
    thetas: Sequence[np.ndarray],
    targets: Sequence[int],
    probe_x: np.ndarray,
    metadata: dict[str, str],
    whole_batch: bool = False,
) -> ir.Model:
    """Turn ``model`` (f) into the built graph; ``thetas[i]``: [T, 4, C] for layer i.

    ``whole_batch`` runs every g_t on every sample and keeps the answers of the samples f
    sent to t: the same outputs at a higher cost (the naive graph, for benchmarks)."""
    graph = model.graph
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise ModelError(f"the model uses ONNX opset {opset}; the build needs {MIN_OPSET} or newer")
    if len(graph.inputs) != 1 or not graph.outputs:
        raise ModelError(
            "the model must have one input (the images) and its logits as first output"
        )
    graph.sort()
    b = _Builder(graph)
    logits_f = graph.outputs[0]
    nodes = list(graph)
    layer_of = {id(loc.value): loc for loc in located}
    cut, boundary = _cut(nodes, layer_of, _depends_on_input(graph), proto, probe_x)
    producer = logits_f.producer()
    if targets and (producer is None or id(producer) not in cut):
        raise ModelError("the logits do not depend on any BatchNorm layer of the fit")

    for node in nodes:  # the contract's output names are ours (after probing f by name)
        for v in node.outputs:
            if v.name in ("label", "triggered", "logits"):
                v.name = b.name(f"f_{v.name}")
    label_f = b.one("ArgMax", [logits_f], "bna/f_label", axis=1, keepdims=0)
    label, logits = label_f, logits_f
    no_class = b.const("bna/no_class", np.array(-1, np.int64))
    triggered = b.one("Equal", [label_f, no_class], "bna/no_flags")  # all false
    shape_col = b.const("bna/column", np.array([-1, 1], np.int64))
    flat = b.const("bna/flat", np.array([-1], np.int64))
    zero = b.const("bna/zero_rows", np.array(0, np.int64))
    for j, t in enumerate(targets):
        tag = f"g{t}"
        t_const = b.const(f"bna/{tag}/target", np.array(t, np.int64))
        hit = b.one("Equal", [label_f, t_const], f"bna/{tag}/routed")
        if whole_batch:
            hit = b.one("Equal", [label_f, label_f], f"bna/{tag}/every_row")
        rows = b.one("NonZero", [hit], f"bna/{tag}/nonzero")
        # routed: g_t lives in the then-branch of an If that runs only when a row went to t
        branch = ir.Graph((), (), nodes=(), name=f"bna_{tag}_routed") if not whole_batch else None
        bb = b if branch is None else _Builder(branch, b.names)
        col = bb.one("Reshape", [rows, shape_col], f"bna/{tag}/rows_col")  # [M, 1]
        idx = bb.one("Reshape", [rows, flat], f"bna/{tag}/rows")
        clone = _Clone(bb, tag)
        for v in boundary:
            clone.map[id(v)] = bb.one("Gather", [v, idx], f"{v.name}/{tag}/rows", axis=0)
        for node in nodes:
            if id(node) not in cut or id(node) in clone.skip:
                continue
            outs = [o for o in node.outputs if id(o) in layer_of]
            if outs:
                loc = layer_of[id(outs[0])]
                clone.layer(node, outs[0], stats[loc.layer], thetas[loc.layer][j], loc.rank)
                for o in node.outputs:
                    if o is not outs[0] and o.uses():
                        raise ModelError(
                            f"node {node.name!r} has several used outputs; cannot rewrite it"
                        )
            else:
                clone.copy(node)
        g = clone.mapped(logits_f)
        y_g = bb.one("ArgMax", [g], f"bna/{tag}/label", axis=1, keepdims=0)
        kept = bb.one("Equal", [y_g, t_const], f"bna/{tag}/kept")
        flag = bb.one("Not", [kept], f"bna/{tag}/flag")
        if branch is None:  # every row ran g_t: rows f did not send to t keep what they had
            sent = b.one("Equal", [label_f, t_const], f"bna/{tag}/sent")
            flag = b.one("And", [flag, sent], f"bna/{tag}/flag_sent")
            flag_col = b.one("Reshape", [flag, shape_col], f"bna/{tag}/flag_col")
            label = b.one("Where", [flag, y_g, label], f"bna/{tag}/label_out")
            triggered = b.one("Or", [triggered, flag], f"bna/{tag}/triggered_out")
            logits = b.one("Where", [flag_col, g, logits], f"bna/{tag}/logits_out")
            continue
        f_rows = bb.one("Gather", [logits_f, idx], f"bna/{tag}/f_logits", axis=0)
        flag_col = bb.one("Reshape", [flag, shape_col], f"bna/{tag}/flag_col")
        answer = bb.one("Where", [flag_col, g, f_rows], f"bna/{tag}/logits")
        current = (label, triggered, logits)
        then_out = [
            bb.one("ScatterND", [label, col, y_g], f"bna/{tag}/label_out"),
            bb.one("ScatterND", [triggered, col, flag], f"bna/{tag}/triggered_out"),
            bb.one("ScatterND", [logits, col, answer], f"bna/{tag}/logits_out"),
        ]
        branch.outputs.extend(then_out)
        skip = ir.Graph((), (), nodes=(), name=f"bna_{tag}_skipped")
        sb = _Builder(skip, b.names)
        skip.outputs.extend(sb.one("Identity", [v], f"bna/{tag}/unchanged") for v in current)
        dtypes = (ir.DataType.INT64, ir.DataType.BOOL, ir.DataType.FLOAT)
        for outs in (then_out, list(skip.outputs)):
            for v, dtype in zip(outs, dtypes, strict=True):
                v.type = ir.TensorType(dtype)
        size = b.one("Size", [rows], f"bna/{tag}/count")
        cond = b.one("Greater", [size, zero], f"bna/{tag}/any")
        label, triggered, logits = b.op(
            "If",
            [cond],
            f"bna/{tag}/route",
            [ir.AttrGraph("then_branch", branch), ir.AttrGraph("else_branch", skip)],
            outputs=3,
        )
    return _finish(model, label, triggered, logits, logits_f, metadata)


def _cut(
    nodes: Sequence[ir.Node],
    layer_of: dict[int, Located],
    input_nodes: set[int],
    proto: onnx.ModelProto,
    probe_x: np.ndarray,
) -> tuple[set[int], list[ir.Value]]:
    """The nodes every g_t recomputes (ids) and the tensors of f it reads (``boundary``).

    The cut starts at the producers of the BN layers' outputs and takes everything downstream.
    A boundary tensor must be batch-major (its rows are the samples', so Gather can pick the
    routed ones); one that is not (a Shape of an activation, a size computed from it) is
    recomputed inside the cut from the routed rows: its producer joins the cut.
    """
    cut: set[int] = set()
    for node in nodes:
        if any(id(v) in layer_of for v in node.outputs) or any(
            v is not None and (p := v.producer()) is not None and id(p) in cut for v in node.inputs
        ):
            cut.add(id(node))
    if not cut:
        return cut, []
    while True:
        boundary = _boundary(nodes, cut, input_nodes)
        if not boundary:
            return cut, boundary
        names = [v.name for v in boundary]
        three, two = (
            run_exposing(proto, names, probe_x[:3]),
            run_exposing(proto, names, probe_x[:2]),
        )
        pull = [
            v
            for v, a, b in zip(boundary, three, two, strict=True)
            if not (a.ndim and b.ndim and a.shape[0] == 3 and b.shape[0] == 2)
        ]
        if not pull:
            return cut, boundary
        for v in pull:
            if v.producer() is None:
                raise ModelError(f"the model's input {v.name!r} has no batch dimension")
            cut.add(id(v.producer()))


_SCALE_COMMUTES = ("MaxPool", "Relu", "Identity")


def _flattens(node: ir.Node, v: ir.Value) -> bool:
    """Whether ``node`` turns v [N, C, ...] into [N, C·...] (channel-major features)."""
    if node.inputs[0] is not v:
        return False
    if node.op_type == "Flatten":
        return (node.attributes["axis"].value if "axis" in node.attributes else 1) == 1
    if node.op_type == "Reshape":
        shape = _constant_array(node.inputs[1])
        return shape is not None and shape.shape == (2,) and shape[0] in (-1, 0) and shape[1] > 0
    return False


def _takes(consumer: ir.Node, channels: int) -> bool:
    """Whether a chain's Conv/Gemm reads ``channels`` channels (a Gemm: runs of features)."""
    w = _constant_array(consumer.inputs[1])
    if consumer.op_type == "Conv":
        return w.shape[1] == channels
    trans_b = consumer.attributes["transB"].value if "transB" in consumer.attributes else 0
    features = w.shape[1] if trans_b else w.shape[0]
    return features % channels == 0


def _scale_chain(out: ir.Value, flat: bool = False) -> tuple[ir.Node, ir.Node] | None:
    """(relu, consumer) when a BN output ``out`` feeds only a Relu, and from there a chain of
    single-use ops that commute with a positive per-channel scale (pools, Relu, a flatten)
    leads to the data input of an ungrouped Conv, or of a Gemm after a flatten, whose weight
    is a constant (``flat``: ``out`` is already [N, C]); else None."""
    users = out.consumers()
    if len(users) != 1 or users[0].op_type != "Relu" or out.is_graph_output():
        return None
    relu = node = users[0]
    while True:
        v = node.outputs[0]
        users = v.consumers()
        if len(users) != 1 or v.is_graph_output():
            return None
        node = users[0]
        if node.op_type in _SCALE_COMMUTES and len(node.outputs) == 1 and not flat:
            continue
        if not flat and _flattens(node, v):
            flat = True
            continue
        group = node.attributes["group"].value if "group" in node.attributes else 1
        w = _constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or node.inputs[0] is not v:
            return None
        if node.op_type == "Conv" and group == 1 and not flat:
            return relu, node
        if node.op_type == "Gemm" and flat and w.ndim == 2:
            trans_a = node.attributes["transA"].value if "transA" in node.attributes else 0
            return (relu, node) if not trans_a else None
        return None


def _boundary(nodes: Sequence[ir.Node], cut: set[int], input_nodes: set[int]) -> list[ir.Value]:
    """Tensors computed outside the cut (from the input) that nodes of the cut read."""
    seen, out = set(), []
    for node in nodes:
        if id(node) not in cut:
            continue
        for v in node.inputs:
            if v is None or id(v) in seen:
                continue
            p = v.producer()
            if v.is_graph_input() or (p is not None and id(p) not in cut and id(p) in input_nodes):
                seen.add(id(v))
                out.append(v)
    return out


def _finish(
    model: ir.Model,
    label: ir.Value,
    triggered: ir.Value,
    logits: ir.Value,
    logits_f: ir.Value,
    metadata: dict[str, str],
) -> ir.Model:
    graph = model.graph
    batch = graph.inputs[0].shape[0] if graph.inputs[0].shape is not None else "N"
    k = logits_f.shape[1] if logits_f.shape is not None and len(logits_f.shape) == 2 else None
    outs = [
        (label, "label", ir.DataType.INT64, [batch]),
        (triggered, "triggered", ir.DataType.BOOL, [batch]),
        (logits, "logits", ir.DataType.FLOAT, [batch, k]),
    ]
    final = []
    builder = _Builder(graph)
    for v, name, dtype, shape in outs:
        if v is logits_f:  # f's own output keeps its name (evaluation reads it): copy it
            v = builder.one("Identity", [v], f"bna/{name}")
        v.name = name  # our own values: renamed, no copy (one node less per run)
        v.type, v.shape = ir.TensorType(dtype), ir.Shape(shape)
        final.append(v)
    graph.outputs.clear()
    graph.outputs.extend(final)
    graph.sort()
    model.metadata_props.update(metadata)
    model.metadata_props["bna.f_logits"] = logits_f.name  # f's own logits, for evaluation
    return model


def _strip(graph: onnx.GraphProto) -> None:
    """Drop doc strings and per-node/tensor metadata: exporters store stack traces there, with
    the exporting machine's file paths; the built graph carries none."""
    graph.doc_string = ""
    for item in (*graph.node, *graph.initializer, *graph.input, *graph.output, *graph.value_info):
        item.doc_string = ""
        if hasattr(item, "metadata_props"):
            del item.metadata_props[:]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip(attr.g)
            for sub in attr.graphs:
                _strip(sub)


def to_bytes(model: ir.Model) -> bytes:
    """Serialize with every initializer inline and no per-node metadata (so no file path of
    any machine is inside); the result passes ``onnx.checker``."""
    proto = ir.to_proto(model)
    _strip(proto.graph)
    proto.doc_string = ""
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def metadata_for(version: str, targets: Sequence[int], fit_sha256: str) -> dict[str, str]:
    """The built graph's metadata properties (design: tool version, targets, fit-file hash)."""
    return {
        "bna.tool_version": version,
        "bna.targets": json.dumps([int(t) for t in targets]),
        "bna.fit_sha256": fit_sha256,
    }
