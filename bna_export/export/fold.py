"""The maths of g_t's layer in f's graph, and which nodes can take it.

f's BN layer computes y = γ·(z − m)/s + β with s = √(var + ε). g_t's computes
γ·clip((z − µ')/σ', υ, ω) + β. Substituting z = m + s·(y − β)/γ, g_t's output is

    clip(A·y + c, L, H),   A = s/σ',   c = −A·β + γ·(m − µ')/σ' + β,
    L, H = min(γυ, γω) + β, max(γυ, γω) + β   (L = H = β where γ = 0),

an affine map of f's own BN output, then a per-channel clip. The affine part folds into the
node that computes y: a kept BatchNormalization (scale γ·s/σ', mean µ'), a Conv (W·A per output
channel, bias A·b + c) or a Gemm (B's output columns and C scaled by A, β unchanged); any
other producer gets y·A + c after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .builder import attribute, constant_array


@dataclass(frozen=True)
class LayerStats:
    """A BN layer of f as the fit file records it: γ, β, running mean and var, ε ([C] each)."""

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float


@dataclass(frozen=True)
class Affine:
    """g_t's layer as clip(A·y + c, L, H) of f's BN output y ([C] float32 each)."""

    a: np.ndarray
    c: np.ndarray
    low: np.ndarray
    high: np.ndarray


def affine(st: LayerStats, theta: np.ndarray) -> Affine:
    """A, c, L, H for θ = (µ', σ', υ, ω) [4, C] (see the module docstring)."""
    mu, sigma, lo, hi = (theta[k].astype(np.float64) for k in range(4))
    g, b = st.weight.astype(np.float64), st.bias.astype(np.float64)
    s = np.sqrt(st.var.astype(np.float64) + st.eps)
    a = s / sigma
    c = -a * b + g * (st.mean - mu) / sigma + b
    with np.errstate(invalid="ignore"):
        low, high = np.minimum(g * lo, g * hi), np.maximum(g * lo, g * hi)
    low = np.where(g == 0, 0.0, low) + b
    high = np.where(g == 0, 0.0, high) + b
    return Affine(*(t.astype(np.float32) for t in (a, c, low, high)))


def why_not_foldable(node: ir.Node, channels: int) -> str | None:
    """None when the affine map of ``channels`` channels folds into ``node`` (its weights and
    bias are constants of the right shape); else, in a few words, why not."""
    if node.op_type == "BatchNormalization":
        if len(node.outputs) != 1:
            return "BatchNormalization with training outputs"
        if constant_array(node.inputs[1]) is None or constant_array(node.inputs[4]) is None:
            return "scale or variance is not a constant"
        return None
    if node.op_type == "Conv":
        w = constant_array(node.inputs[1]) if len(node.inputs) >= 2 else None
        if w is None:
            return "weight is not a constant"
        if w.shape[0] != channels:
            return f"weight has {w.shape[0]} output channels, the layer {channels}"
        if len(node.inputs) > 2 and constant_array(node.inputs[2]) is None:
            return "bias is not a constant"
        return None
    if node.op_type == "Gemm":
        w = constant_array(node.inputs[1])
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = constant_array(node.inputs[2]) if has_bias else None
        if w is None or w.ndim != 2:
            return "B is not a constant matrix"
        if bias is None or bias.size not in (1, channels):
            return "C is not a constant per output column"
        if attribute(node, "beta", 1.0) == 0:
            return "beta is 0"
        return None
    return f"{node.op_type} has no weights to fold into"
