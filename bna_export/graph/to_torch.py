"""An ONNX graph as a differentiable PyTorch module: a small, strict interpreter over onnx-ir
for the operators image classifiers use (an unsupported operator is an error naming it).

``fit --model model.onnx`` runs on it. Initializers become buffers (never trained); at chosen
tensors ("sites") a module given by the caller is applied to the value, which is how the
fitter's per-channel transform h is put on the outputs of BatchNormalization, Conv and Gemm
nodes. See :func:`bn_sites` for which tensors those are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ModelError

Handler = Callable[["_Node", list[Tensor | None]], tuple[Tensor, ...]]
_OPS: dict[str, Handler] = {}

_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}


def _op(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for n in names:
            _OPS[n] = fn
        return fn

    return register


class _Node:
    """One node, its attributes read once into Python values."""

    def __init__(self, node: ir.Node, opset: int) -> None:
        self.op = node.op_type
        self.name = node.name or node.op_type
        self.opset = opset
        self.inputs = [v.name if v is not None else None for v in node.inputs]
        self.outputs = [v.name for v in node.outputs]
        self.attrs: dict[str, object] = {}
        for name, attr in node.attributes.items():
            value = attr.value
            if isinstance(value, ir.TensorProtocol):
                value = torch.from_numpy(np.array(value.numpy()))
            elif attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise ModelError(f"node {self.name} ({self.op}) has a subgraph; not supported")
            elif isinstance(value, Sequence) and not isinstance(value, str):
                value = list(value)
            self.attrs[name] = value

    def attr(self, name: str, default: object = None) -> object:
        return self.attrs.get(name, default)

    def ints(self, name: str, default: Sequence[int] | None = None) -> list[int] | None:
        v = self.attrs.get(name, default)
        return None if v is None else [int(i) for i in v]  # type: ignore[union-attr]

    def fail(self, why: str) -> ModelError:
        return ModelError(f"node {self.name} ({self.op}): {why}")


def _int_list(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


# --- elementwise ---------------------------------------------------------------------------


def _unary(fn: Callable[[Tensor], Tensor]) -> Handler:
    return lambda n, a: (fn(a[0]),)  # type: ignore[arg-type]


for _name, _fn in {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Erf": torch.erf,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Not": torch.logical_not,
    "Identity": lambda x: x,
    "Mish": F.mish,
    "HardSwish": F.hardswish,
}.items():
    _OPS[_name] = _unary(_fn)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    return lambda n, a: (fn(a[0], a[1]),)  # type: ignore[arg-type]


def _div(x: Tensor, y: Tensor) -> Tensor:
    if x.is_floating_point():
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


for _name, _fn in {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "MatMul": torch.matmul,
}.items():
    _OPS[_name] = _binary(_fn)


@_op("Max", "Min", "Sum", "Mean")
def _variadic(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    xs = [x for x in a if x is not None]
    fn = {"Max": torch.maximum, "Min": torch.minimum}.get(n.op, torch.add)
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return (out / len(xs) if n.op == "Mean" else out,)


@_op("Where")
def _where(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (torch.where(a[0].bool(), a[1], a[2]),)  # type: ignore[union-attr]


@_op("LeakyRelu")
def _leaky(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (F.leaky_relu(a[0], float(n.attr("alpha", 0.01))),)  # type: ignore[arg-type]


@_op("Elu")
def _elu(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (F.elu(a[0], float(n.attr("alpha", 1.0))),)  # type: ignore[arg-type]


@_op("Selu")
def _selu(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    alpha = float(n.attr("alpha", 1.67326319217681884765625))
    gamma = float(n.attr("gamma", 1.05070102214813232421875))
    x = a[0]
    return (gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1)),)  # type: ignore[operator]


@_op("HardSigmoid")
def _hard_sigmoid(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    alpha, beta = float(n.attr("alpha", 0.2)), float(n.attr("beta", 0.5))
    return (torch.clamp(alpha * a[0] + beta, 0.0, 1.0),)  # type: ignore[operator]


@_op("Gelu")
def _gelu(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (F.gelu(a[0], approximate=str(n.attr("approximate", "none"))),)  # type: ignore[arg-type]


@_op("PRelu")
def _prelu(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, slope = a[0], a[1]
    return (torch.where(x >= 0, x, x * slope),)  # type: ignore[operator]


@_op("Clip")
def _clip(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
        return (torch.clamp(x, lo, hi),)  # type: ignore[arg-type]
    lo = a[1] if len(a) > 1 else None
    hi = a[2] if len(a) > 2 else None
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype))  # type: ignore[arg-type]
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype))  # type: ignore[arg-type]
    return (x,)


@_op("Cast")
def _cast(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    to = ir.DataType(int(n.attr("to")))  # type: ignore[arg-type]
    if to not in _DTYPES:
        raise n.fail(f"cast to {to.name} is not supported")
    return (a[0].to(_DTYPES[to]),)  # type: ignore[union-attr]


@_op("CastLike")
def _cast_like(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (a[0].to(a[1].dtype),)  # type: ignore[union-attr]


@_op("Dropout")
def _dropout(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (a[0], torch.ones_like(a[0], dtype=torch.bool))  # type: ignore[arg-type]


@_op("Softmax", "LogSoftmax")
def _softmax(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    axis = int(n.attr("axis", -1 if n.opset >= 13 else 1))  # type: ignore[arg-type]
    fn = torch.softmax if n.op == "Softmax" else torch.log_softmax
    if n.opset >= 13:
        return (fn(x, axis),)  # type: ignore[arg-type]
    shape = x.shape  # type: ignore[union-attr]
    flat = x.reshape(math.prod(shape[:axis]), -1)  # type: ignore[union-attr]
    return (fn(flat, 1).reshape(shape),)


# --- convolution, pooling, normalisation ---------------------------------------------------


def _spatial_pads(n: _Node, x: Tensor, kernel: list[int], strides: list[int], dil: list[int]):
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


@_op("Conv")
def _conv(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
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


@_op("MaxPool", "AveragePool")
def _pool(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
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


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    dims = tuple(range(2, x.dim()))  # type: ignore[union-attr]
    if n.op == "GlobalAveragePool":
        return (x.mean(dims, keepdim=True),)  # type: ignore[union-attr]
    return (x.amax(dims, keepdim=True),)  # type: ignore[union-attr]


@_op("BatchNormalization")
def _batch_norm(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    if int(n.attr("training_mode", 0)):  # type: ignore[arg-type]
        raise n.fail("BatchNormalization in training mode; export the model in eval mode")
    x, scale, bias, mean, var = a[:5]
    eps = float(n.attr("epsilon", 1e-5))  # type: ignore[arg-type]
    return (F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps),)  # type: ignore[arg-type]


@_op("InstanceNormalization")
def _instance_norm(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    eps = float(n.attr("epsilon", 1e-5))  # type: ignore[arg-type]
    return (F.instance_norm(a[0], weight=a[1], bias=a[2], eps=eps),)  # type: ignore[arg-type]


@_op("LayerNormalization")
def _layer_norm(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
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


@_op("Gemm")
def _gemm(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, w = a[0], a[1]
    if int(n.attr("transA", 0)):  # type: ignore[arg-type]
        x = x.t()  # type: ignore[union-attr]
    if int(n.attr("transB", 0)):  # type: ignore[arg-type]
        w = w.t()  # type: ignore[union-attr]
    y = float(n.attr("alpha", 1.0)) * (x @ w)  # type: ignore[arg-type, operator]
    if len(a) > 2 and a[2] is not None:
        y = y + float(n.attr("beta", 1.0)) * a[2]  # type: ignore[arg-type]
    return (y,)


@_op("Einsum")
def _einsum(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (torch.einsum(str(n.attr("equation")), *a),)  # type: ignore[arg-type]


# --- reductions -----------------------------------------------------------------------------


@_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    axes_from_input = (n.op == "ReduceSum" and n.opset >= 13) or n.opset >= 18
    axes = _int_list(a[1] if len(a) > 1 else None) if axes_from_input else n.ints("axes")
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


@_op("ArgMax", "ArgMin")
def _arg(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    if int(n.attr("select_last_index", 0)):  # type: ignore[arg-type]
        raise n.fail("select_last_index is not supported")
    axis, keep = int(n.attr("axis", 0)), bool(n.attr("keepdims", 1))  # type: ignore[arg-type]
    fn = torch.argmax if n.op == "ArgMax" else torch.argmin
    return (fn(a[0], axis, keepdim=keep),)  # type: ignore[arg-type]


# --- shapes ---------------------------------------------------------------------------------


@_op("Shape")
def _shape(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    dims = list(a[0].shape)  # type: ignore[union-attr]
    start, end = int(n.attr("start", 0)), n.attr("end")  # type: ignore[arg-type]
    dims = dims[start:] if end is None else dims[start : int(end)]  # type: ignore[arg-type]
    return (torch.tensor(dims, dtype=torch.int64),)


@_op("Size")
def _size(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (torch.tensor(a[0].numel(), dtype=torch.int64),)  # type: ignore[union-attr]


@_op("Constant")
def _constant(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    for key, value in n.attrs.items():
        if key == "value":
            return (value,)  # type: ignore[return-value]
        if key in ("value_float", "value_floats"):
            return (torch.tensor(value, dtype=torch.float32),)
        if key in ("value_int", "value_ints"):
            return (torch.tensor(value, dtype=torch.int64),)
    raise n.fail("no supported value attribute")


@_op("ConstantOfShape")
def _constant_of_shape(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    value = n.attr("value")
    fill = torch.zeros(1) if value is None else value.reshape(-1)  # type: ignore[union-attr]
    return (torch.full(_int_list(a[0]), fill[0].item(), dtype=fill.dtype),)  # type: ignore[arg-type]


@_op("Flatten")
def _flatten(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    axis = int(n.attr("axis", 1)) % (x.dim() + 1) if x.dim() else 0  # type: ignore[union-attr, arg-type]
    return (x.reshape(math.prod(x.shape[:axis]), -1),)  # type: ignore[union-attr]


@_op("Reshape")
def _reshape(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, shape = a[0], _int_list(a[1])
    if not int(n.attr("allowzero", 0)):  # type: ignore[arg-type]
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]  # type: ignore[union-attr, arg-type]
    return (x.reshape(shape),)  # type: ignore[union-attr]


@_op("Transpose")
def _transpose(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    perm = n.ints("perm") or list(reversed(range(x.dim())))  # type: ignore[union-attr]
    return (x.permute(perm),)  # type: ignore[union-attr]


def _axes(n: _Node, a: list[Tensor | None]) -> list[int] | None:
    return _int_list(a[1] if len(a) > 1 else None) if n.opset >= 13 else n.ints("axes")


@_op("Unsqueeze")
def _unsqueeze(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, axes = a[0], _axes(n, a)
    rank = x.dim() + len(axes)  # type: ignore[union-attr, arg-type]
    for ax in sorted(d % rank for d in axes):  # type: ignore[union-attr]
        x = x.unsqueeze(ax)  # type: ignore[union-attr]
    return (x,)  # type: ignore[return-value]


@_op("Squeeze")
def _squeeze(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, axes = a[0], _axes(n, a)
    if not axes:
        return (x.squeeze(),)  # type: ignore[union-attr]
    return (x.squeeze(tuple(d % x.dim() for d in axes)),)  # type: ignore[union-attr]


@_op("Concat")
def _concat(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (torch.cat([x for x in a if x is not None], int(n.attr("axis"))),)  # type: ignore[arg-type]


@_op("Split")
def _split(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, axis = a[0], int(n.attr("axis", 0))  # type: ignore[arg-type]
    sizes = _int_list(a[1] if len(a) > 1 else None) if n.opset >= 13 else n.ints("split")
    if not sizes:
        k = len(n.outputs)
        total = x.shape[axis]  # type: ignore[union-attr]
        step = -(-total // k)
        sizes = [min(step, total - i * step) for i in range(k)]
    return tuple(torch.split(x, sizes, axis))  # type: ignore[arg-type]


@_op("Gather")
def _gather(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, idx = a[0], a[1].long()  # type: ignore[union-attr]
    axis = int(n.attr("axis", 0)) % x.dim()  # type: ignore[union-attr, arg-type]
    size = x.shape[axis]  # type: ignore[union-attr]
    flat = torch.where(idx < 0, idx + size, idx).reshape(-1)
    out = x.index_select(axis, flat)  # type: ignore[union-attr]
    return (out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])),)  # type: ignore[union-attr]


@_op("Slice")
def _slice(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    if n.opset < 10:
        starts, ends, axes, steps = n.ints("starts"), n.ints("ends"), n.ints("axes"), None
    else:
        starts, ends = _int_list(a[1]), _int_list(a[2])
        axes = _int_list(a[3] if len(a) > 3 else None)
        steps = _int_list(a[4] if len(a) > 4 else None)
    axes = axes or list(range(len(starts)))  # type: ignore[arg-type]
    steps = steps or [1] * len(starts)  # type: ignore[arg-type]
    index = [slice(None)] * x.dim()  # type: ignore[union-attr]
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):  # type: ignore[arg-type]
        if st <= 0:
            raise n.fail("Slice with a step below 1 is not supported")
        index[ax % x.dim()] = slice(s, e, st)  # type: ignore[union-attr]
    return (x[tuple(index)],)  # type: ignore[index]


@_op("Expand")
def _expand(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, shape = a[0], _int_list(a[1])
    return (x.expand(torch.broadcast_shapes(x.shape, tuple(shape))),)  # type: ignore[union-attr, arg-type]


@_op("Tile")
def _tile(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (a[0].repeat(_int_list(a[1])),)  # type: ignore[union-attr, arg-type]


@_op("Range")
def _range(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    start, limit, delta = (t.item() for t in a[:3])  # type: ignore[union-attr]
    return (torch.arange(start, limit, delta, dtype=a[0].dtype),)  # type: ignore[union-attr]


@_op("Pad")
def _pad(n: _Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    mode = str(n.attr("mode", "constant"))
    if n.opset < 11:
        pads, value = n.ints("pads"), float(n.attr("value", 0.0))  # type: ignore[arg-type]
    else:
        pads = _int_list(a[1])
        value = float(a[2].item()) if len(a) > 2 and a[2] is not None else 0.0
        if len(a) > 3 and a[3] is not None:
            raise n.fail("Pad with axes is not supported")
    rank = x.dim()  # type: ignore[union-attr]
    begin, end = pads[:rank], pads[rank:]  # type: ignore[index]
    if any(p < 0 for p in pads):  # type: ignore[union-attr]
        raise n.fail("negative pads are not supported")
    torch_pads: list[int] = []
    for d in reversed(range(rank)):
        torch_pads += [begin[d], end[d]]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return (F.pad(x, torch_pads, value=value),)  # type: ignore[arg-type]
    names = {"reflect": "reflect", "edge": "replicate"}
    if mode not in names:
        raise n.fail(f"Pad mode {mode} is not supported")
    return (F.pad(x, torch_pads, mode=names[mode]),)  # type: ignore[arg-type]


# --- the module -----------------------------------------------------------------------------


def bn_sites(graph: ir.Graph) -> list[ir.Value]:
    """Where h goes, in graph order: the output of every BatchNormalization node, and of every
    Conv and Gemm node not followed by a BatchNormalization (its BN was folded into it, or it
    had none: the paper's general form gives such a neuron its own h), except the last
    layers, from which no other Conv, Gemm or BatchNormalization is reached (the logits)."""
    layer_ops = {"BatchNormalization", "Conv", "Gemm"}
    nodes = list(graph)
    below: dict[int, bool] = {}  # node index -> reaches a layer op downstream
    index = {id(node): i for i, node in enumerate(nodes)}
    for i in reversed(range(len(nodes))):
        reach = False
        for out in nodes[i].outputs:
            for user, _ in out.uses():
                j = index.get(id(user))
                if j is None:
                    continue
                if user.op_type in layer_ops or below.get(j, False):
                    reach = True
        below[i] = reach
    sites = []
    for i, node in enumerate(nodes):
        if node.op_type not in layer_ops or not below[i] or not node.outputs:
            continue
        out = node.outputs[0]
        users = [u for u, _ in out.uses()]
        if (
            node.op_type != "BatchNormalization"
            and users
            and all(u.op_type == "BatchNormalization" for u in users)
        ):
            continue
        sites.append(out)
    return sites


_CONSTANTS = {"Constant", "ConstantOfShape", "Shape", "Size", "Range", "EyeLike"}
"""Operators whose outputs the handlers make on the CPU."""


class OnnxModule(nn.Module):
    """Runs an ONNX graph's nodes in order with PyTorch ops; differentiable in its input.

    ``sites`` maps a tensor name to a module applied to that tensor where it is computed (for a
    BatchNormalization node, the module replaces the node and gets the node's input)."""

    def __init__(self, model: ir.Model, sites: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        graph = model.graph
        if len(graph.inputs) - sum(v.name in graph.initializers for v in graph.inputs) != 1:
            raise ModelError("the ONNX model must have exactly one input (the images)")
        if not graph.outputs:
            raise ModelError("the ONNX model has no output")
        opset = graph.opset_imports.get("", model.opset_imports.get("", 0))
        self.input_name = next(v.name for v in graph.inputs if v.name not in graph.initializers)
        self.output_name = graph.outputs[0].name
        self._buffers_by_value: dict[str, str] = {}
        for k, (name, value) in enumerate(graph.initializers.items()):
            if value.const_value is None:
                raise ModelError(f"initializer {name!r} has no data")
            self.register_buffer(f"init_{k}", torch.from_numpy(np.array(value.const_value.numpy())))
            self._buffers_by_value[name] = f"init_{k}"
        self.nodes: list[tuple[_Node, Handler]] = []
        unsupported: dict[str, str] = {}
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                unsupported.setdefault(f"{node.domain}::{node.op_type}", node.name or "")
                continue
            handler = _OPS.get(node.op_type)
            if handler is None:
                unsupported.setdefault(node.op_type, node.name or "")
                continue
            self.nodes.append((_Node(node, int(opset)), handler))
        defined = {self.input_name, *self._buffers_by_value}
        for node, _ in self.nodes:
            for name in node.inputs:
                if name and name not in defined:
                    raise node.fail(f"uses tensor {name!r} before any node computes it")
            defined.update(n for n in node.outputs if n)
        if self.output_name not in defined and not unsupported:
            raise ModelError(f"the graph output {self.output_name!r} is computed by no node")
        if unsupported:
            listed = ", ".join(f"{op} (node {name})" for op, name in unsupported.items())
            raise ModelError(
                f"the ONNX model uses operators fit --model *.onnx does not support: {listed}; "
                "fit from the .pt2 or package.module:callable instead"
            )
        self.sites = nn.ModuleDict()
        self._site_keys: dict[str, str] = {}
        for k, (name, module) in enumerate((sites or {}).items()):
            self.sites[f"site_{k}"] = module
            self._site_keys[name] = f"site_{k}"
        bn_outputs = {n.outputs[0] for n, _ in self.nodes if n.op == "BatchNormalization"}
        self._replaces = {name for name in self._site_keys if name in bn_outputs}

    def forward(self, x: Tensor) -> Tensor:
        env: dict[str, Tensor | None] = {self.input_name: x, "": None}
        for name, buf in self._buffers_by_value.items():
            env[name] = getattr(self, buf)
        for node, handler in self.nodes:
            args = [env[i] if i else None for i in node.inputs]
            first = node.outputs[0] if node.outputs else ""
            if first in self._replaces:
                outs: tuple[Tensor, ...] = (self.sites[self._site_keys[first]](args[0]),)
            else:
                try:
                    outs = handler(node, args)
                except ModelError:
                    raise
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise node.fail(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
                if first in self._site_keys:
                    outs = (self.sites[self._site_keys[first]](outs[0]), *outs[1:])
            if node.op in _CONSTANTS and x.device.type != "cpu":  # values made on the CPU
                outs = tuple(o.to(x.device) for o in outs)
            for name, value in zip(node.outputs, outs, strict=False):
                if name:
                    env[name] = value
        return env[self.output_name]  # type: ignore[return-value]
