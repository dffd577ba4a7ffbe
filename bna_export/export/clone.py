"""One g_t as a copy of f's nodes from the cut on: every node cloned into g_t's branch, and each
fit layer's producer rewritten by the first rule of :mod:`.rules` that matches and passes its
check. The clone also holds the rewrite primitives the rules use (folding an affine map into a
BatchNormalization, Conv or Gemm; a per-channel ``bias − y`` as a depthwise Conv)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..errors import ModelError
from .builder import Builder, attribute, constant_array
from .fold import Affine, LayerStats, affine
from .rules import RULES, Site


@dataclass(frozen=True)
class Applied:
    """Which rule rewrote a fit layer in one g_t, and why the rules before it declined."""

    layer: int
    target: int
    rule: str
    declined: dict[str, str] = field(default_factory=dict)


class Clone:
    """The nodes of one g_t (``tag``), built by ``b``; ``map`` takes f's values to g_t's."""

    def __init__(self, b: Builder, tag: str) -> None:
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
        """A copy of ``node`` in g_t (reading g_t's values, or ``inputs``)."""
        if any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            raise ModelError(
                f"node {node.name!r} ({node.op_type}) after a BatchNorm layer has a subgraph; "
                "control flow inside the classifier is not supported"
            )
        if inputs is None and id(node) in self.scale_in:  # weight scaled, not copied as is
            w = self.b.const(f"{node.name}/{self.tag}/weight_in", self.scaled_weight(node))
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
        self,
        node: ir.Node,
        out: ir.Value,
        st: LayerStats,
        theta: np.ndarray,
        rank: int,
        ids: tuple[int, int],
    ) -> Applied:
        """Clone the node producing a fit layer's output with θ folded in and clipped, by the
        first rule that takes it; ``ids``: (layer index, target) for the record."""
        site = Site(node, out, theta, affine(st, theta), rank)
        declined = {}
        for rule in RULES:
            match = rule.match(site)
            if match is None:
                continue
            why = rule.check(site, match)
            if why is not None:
                declined[rule.name] = why
                continue
            rule.rewrite(self, site, match)
            return Applied(*ids, rule.name, declined)
        raise AssertionError("the last rule takes every layer")

    # --- rewrite primitives -------------------------------------------------------------

    def depthwise(self, y: ir.Value, bias: np.ndarray, base: str) -> ir.Value:
        """bias - y per channel, as a 1x1 depthwise Conv (weight -1)."""
        ch = len(bias)
        w = self.b.const(f"{base}/weight", -np.ones((ch, 1, 1, 1), np.float32))
        b = self.b.const(f"{base}/bias", bias.astype(np.float32))
        return self.b.one("Conv", [y, w, b], base, group=ch, kernel_shape=[1, 1])

    def fold(self, node: ir.Node, aff: Affine, theta: np.ndarray) -> ir.Value:
        """y·A + c computed by a copy of ``node`` (foldable: see :func:`.fold.why_not_foldable`)."""
        if node.op_type == "BatchNormalization":
            return self.fold_bn(node, theta)
        if node.op_type == "Conv":
            return self.fold_conv(node, aff.a, aff.c)
        return self.fold_gemm(node, aff.a, aff.c)

    def fold_bn(self, node: ir.Node, theta: np.ndarray) -> ir.Value:
        """Keep the node's own var and ε: scale' = γ·√(var+ε)/σ', mean' = µ'."""
        scale, var = constant_array(node.inputs[1]), constant_array(node.inputs[4])
        eps = attribute(node, "epsilon", 1e-5)
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

    def scaled_weight(self, node: ir.Node) -> np.ndarray | None:
        """A Conv's or Gemm's weight with its input channels scaled (see
        :mod:`.rules.clip_into_next`; after a flatten each channel's scale covers its run of
        features)."""
        w = constant_array(node.inputs[1])
        if w is None or id(node) not in self.scale_in:
            return w
        scale = self.scale_in[id(node)]
        if node.op_type == "Gemm":
            trans_b = attribute(node, "transB", 0)
            features = w.shape[1] if trans_b else w.shape[0]
            if features % len(scale):
                raise ModelError(f"{node.name!r}: {features} features from {len(scale)} channels")
            per = np.repeat(scale, features // len(scale))
            scale = per[None, :] if trans_b else per[:, None]
        else:
            scale = scale.reshape(1, -1, *([1] * (w.ndim - 2)))
        return (w.astype(np.float64) * scale).astype(w.dtype)

    def fold_conv(self, node: ir.Node, a: np.ndarray, c: np.ndarray) -> ir.Value:
        w = self.scaled_weight(node)
        bias = (
            constant_array(node.inputs[2]) if len(node.inputs) > 2 else np.zeros(len(a), np.float32)
        )
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

    def fold_gemm(self, node: ir.Node, a: np.ndarray, c: np.ndarray) -> ir.Value:
        beta = attribute(node, "beta", 1.0)
        trans_b = attribute(node, "transB", 0)
        w = self.scaled_weight(node)
        bias = constant_array(node.inputs[2])
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
