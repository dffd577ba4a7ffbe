"""A clip followed by a Relu, moved into the next layer.

When a fit layer's output y goes only to a Relu, clip(y, L, H) followed by the Relu is
clip(y, 0, H) for L ≤ 0 < H, and clip(y, 0, H) = H·Clip(y/H, 0, 1). The producer (a Conv, or a
Gemm on flat features) computes (A·y + c)/H, a scalar Clip to [0, 1] follows (ONNX Runtime fuses
it into the Conv), and H moves forward, through the ops that commute with a positive per-channel
scale (MaxPool, Relu, Identity, a channel-major flatten), into the input channels of the next
Conv's or Gemm's constant weight. The Relu is left out of g_t.

Cases handled:
1. Conv (rank 4) → Relu → (MaxPool | Relu | Identity)* → ungrouped Conv.
2. Conv (rank 4) → Relu → … → Flatten(axis 1) or Reshape([N, −1]) → Gemm (transA = 0).
3. Gemm ([N, C]) → Relu → Gemm (transA = 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx_ir as ir

from ..builder import attribute, constant_array
from ..fold import why_not_foldable
from .base import Site

if TYPE_CHECKING:
    from ..clone import Clone

_SCALE_COMMUTES = ("MaxPool", "Relu", "Identity")


def _flattens(node: ir.Node, v: ir.Value) -> bool:
    """Whether ``node`` turns v [N, C, ...] into [N, C·...] (channel-major features)."""
    if node.inputs[0] is not v:
        return False
    if node.op_type == "Flatten":
        return attribute(node, "axis", 1) == 1
    if node.op_type == "Reshape":
        shape = constant_array(node.inputs[1])
        return shape is not None and shape.shape == (2,) and shape[0] in (-1, 0) and shape[1] > 0
    return False


def _takes(consumer: ir.Node, channels: int) -> bool:
    """Whether a chain's Conv/Gemm reads ``channels`` channels (a Gemm: runs of features)."""
    w = constant_array(consumer.inputs[1])
    if consumer.op_type == "Conv":
        return w.shape[1] == channels
    features = w.shape[1] if attribute(consumer, "transB", 0) else w.shape[0]
    return features % channels == 0


def scale_chain(out: ir.Value, flat: bool = False) -> tuple[ir.Node, ir.Node] | None:
    """(relu, consumer) when a layer output ``out`` feeds only a Relu, and from there a chain of
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
        w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or node.inputs[0] is not v:
            return None
        if node.op_type == "Conv" and attribute(node, "group", 1) == 1 and not flat:
            return relu, node
        if node.op_type == "Gemm" and flat and w.ndim == 2:
            return (relu, node) if not attribute(node, "transA", 0) else None
        return None


class ClipIntoNextLayer:
    name: ClassVar[str] = "clip-into-next-layer"

    def match(self, site: Site) -> tuple[ir.Node, ir.Node] | None:
        op = site.node.op_type
        if op == "Gemm" and site.rank == 2:
            return scale_chain(site.out, flat=True)
        if op in ("Conv", "Gemm") and site.rank == 4:
            return scale_chain(site.out)
        return None

    def check(self, site: Site, match: tuple[ir.Node, ir.Node]) -> str | None:
        aff = site.affine
        if not np.all(aff.low <= 0):
            return "the clip's lower bound is above 0 in some channel"
        if not np.all(aff.high > 1e-6):
            return "the clip's upper bound is not above 0 in every channel"
        if not _takes(match[1], site.channels):
            return f"{match[1].name!r} does not read the layer's {site.channels} channels"
        return why_not_foldable(site.node, site.channels)

    def rewrite(self, clone: Clone, site: Site, match: tuple[ir.Node, ir.Node]) -> None:
        relu, consumer = match
        aff, b, tag = site.affine, clone.b, f"{site.out.name}/{clone.tag}"
        fold = clone.fold_conv if site.node.op_type == "Conv" else clone.fold_gemm
        y = fold(site.node, aff.a / aff.high, aff.c / aff.high)
        zero, one = np.array(0, np.float32), np.array(1, np.float32)
        y = b.one(
            "Clip", [y, b.const(f"{tag}/zero", zero), b.const(f"{tag}/one", one)], f"{tag}/clip"
        )
        clone.map[id(site.out)] = clone.map[id(relu.outputs[0])] = y
        clone.skip.add(id(relu))
        clone.scale_in[id(consumer)] = aff.high.astype(np.float64)
