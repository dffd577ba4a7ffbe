"""Interpreter handlers for convolution, pooling, normalisation, Gemm and reductions."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .ops import Node, int_list, op

# --- convolution, pooling, normalisation ---------------------------------------------------


def _spatial_pads(n: Node, x: Tensor, kernel: list[int], strides: list[int], dil: list[int]):
    """ONNX pads [b1, b2, ..., e1, e2, ...] for the spatial dims, auto_pad resolved."""
    nd = len(kernel)
    auto = str(n.attr("auto_pad", "NOTSET"))
    if auto in ("NOTSET", ""):
        return n.ints("pads", [0] * (2 * nd))
    if auto == "VALID":
        return [0] * (2 * nd)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise n.fail(f"auto_pad {auto} is not supported")
    begin, end = [], []
    for d in range(nd):
        size = x.shape[2 + d]
        out = -(-size // strides[d])
        total = max(0, (out - 1) * strides[d] + (kernel[d] - 1) * dil[d] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


def _torch_pad(pads: list[int]) -> list[int]:
    nd = len(pads) // 2
    out: list[int] = []
    for d in reversed(range(nd)):
        out += [pads[d], pads[d + nd]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@op("Conv")
def _conv(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    nd = w.dim() - 2  # type: ignore[union-attr]
    if nd not in _CONV:
        raise n.fail(f"{nd}-d convolution is not supported")
    kernel = list(w.shape[2:])  # type: ignore[union-attr]
    strides = n.ints("strides", [1] * nd)
    dil = n.ints("dilations", [1] * nd)
    pads = _spatial_pads(n, x, kernel, strides, dil)  # type: ignore[arg-type]
    group = int(n.attr("group", 1))  # type: ignore[arg-type]
    if pads[:nd] == pads[nd:]:
        return (_CONV[nd](x, w, b, strides, pads[:nd], dil, group),)
    x = F.pad(x, _torch_pad(pads))  # type: ignore[arg-type]
    return (_CONV[nd](x, w, b, strides, 0, dil, group),)


@op("MaxPool", "AveragePool")
def _pool(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    kernel = n.ints("kernel_shape")
    if kernel is None:
        raise n.fail("no kernel_shape")
    if len(n.outputs) > 1 and n.outputs[1]:
        raise n.fail("MaxPool's Indices output is not supported")
    nd = len(kernel)
    if nd not in _MAXPOOL:
        raise n.fail(f"{nd}-d pooling is not supported")
    strides = n.ints("strides", [1] * nd)
    dil = n.ints("dilations", [1] * nd)
    pads = _spatial_pads(n, x, kernel, strides, dil)  # type: ignore[arg-type]
    ceil = bool(n.attr("ceil_mode", 0))
    symmetric = pads[:nd] == pads[nd:] and all(
        p <= k // 2 for p, k in zip(pads[:nd], kernel, strict=True)
    )
    if n.op == "MaxPool":
        if not symmetric:
            x = F.pad(x, _torch_pad(pads), value=float("-inf"))  # type: ignore[arg-type]
        padding = pads[:nd] if symmetric else 0
        return (_MAXPOOL[nd](x, kernel, strides, padding, dil, ceil_mode=ceil),)
    if dil != [1] * nd:
        raise n.fail("dilated AveragePool is not supported")
    include = bool(n.attr("count_include_pad", 0))
    if not symmetric:
        if any(pads) and not include:
            raise n.fail("asymmetric padding without count_include_pad is not supported")
        x = F.pad(x, _torch_pad(pads))  # type: ignore[arg-type]
    padding = pads[:nd] if symmetric else 0
    return (_AVGPOOL[nd](x, kernel, strides, padding, ceil, include),)


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    dims = tuple(range(2, x.dim()))  # type: ignore[union-attr]
    if n.op == "GlobalAveragePool":
        return (x.mean(dims, keepdim=True),)  # type: ignore[union-attr]
    return (x.amax(dims, keepdim=True),)  # type: ignore[union-attr]


@op("BatchNormalization")
def _batch_norm(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    if int(n.attr("training_mode", 0)):  # type: ignore[arg-type]
        raise n.fail("BatchNormalization in training mode; export the model in eval mode")
    x, scale, bias, mean, var = a[:5]
    eps = float(n.attr("epsilon", 1e-5))  # type: ignore[arg-type]
    return (F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps),)  # type: ignore[arg-type]


@op("InstanceNormalization")
def _instance_norm(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    eps = float(n.attr("epsilon", 1e-5))  # type: ignore[arg-type]
    return (F.instance_norm(a[0], weight=a[1], bias=a[2], eps=eps),)  # type: ignore[arg-type]


@op("LayerNormalization")
def _layer_norm(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    if len(n.outputs) > 1 and any(n.outputs[1:]):
        raise n.fail("LayerNormalization's Mean/InvStdDev outputs are not supported")
    x = a[0]
    axis = int(n.attr("axis", -1)) % x.dim()  # type: ignore[union-attr, arg-type]
    eps = float(n.attr("epsilon", 1e-5))  # type: ignore[arg-type]
    dims = tuple(range(axis, x.dim()))  # type: ignore[union-attr]
    mean = x.mean(dims, keepdim=True)  # type: ignore[union-attr]
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * a[1]
    return (y + a[2] if len(a) > 2 and a[2] is not None else y,)


@op("Gemm")
def _gemm(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, w = a[0], a[1]
    if int(n.attr("transA", 0)):  # type: ignore[arg-type]
        x = x.t()  # type: ignore[union-attr]
    if int(n.attr("transB", 0)):  # type: ignore[arg-type]
        w = w.t()  # type: ignore[union-attr]
    y = float(n.attr("alpha", 1.0)) * (x @ w)  # type: ignore[arg-type, operator]
    if len(a) > 2 and a[2] is not None:
        y = y + float(n.attr("beta", 1.0)) * a[2]  # type: ignore[arg-type]
    return (y,)


@op("Einsum")
def _einsum(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (torch.einsum(str(n.attr("equation")), *a),)  # type: ignore[arg-type]


# --- reductions -----------------------------------------------------------------------------


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    axes_from_input = (n.op == "ReduceSum" and n.opset >= 13) or n.opset >= 18
    axes = int_list(a[1] if len(a) > 1 else None) if axes_from_input else n.ints("axes")
    keep = bool(n.attr("keepdims", 1))
    if not axes:
        if int(n.attr("noop_with_empty_axes", 0)):  # type: ignore[arg-type]
            return (x,)  # type: ignore[return-value]
        axes = list(range(x.dim()))  # type: ignore[union-attr]
    dims = tuple(axes)
    if n.op == "ReduceMean":
        return (x.mean(dims, keepdim=keep),)  # type: ignore[union-attr]
    if n.op == "ReduceSum":
        return (x.sum(dims, keepdim=keep),)  # type: ignore[union-attr]
    if n.op == "ReduceMax":
        return (x.amax(dims, keepdim=keep),)  # type: ignore[union-attr]
    return (x.amin(dims, keepdim=keep),)  # type: ignore[union-attr]


@op("ArgMax", "ArgMin")
def _arg(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    if int(n.attr("select_last_index", 0)):  # type: ignore[arg-type]
        raise n.fail("select_last_index is not supported")
    axis, keep = int(n.attr("axis", 0)), bool(n.attr("keepdims", 1))  # type: ignore[arg-type]
    fn = torch.argmax if n.op == "ArgMax" else torch.argmin
    return (fn(a[0], axis, keepdim=keep),)  # type: ignore[arg-type]
