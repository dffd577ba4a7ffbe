"""The operator handlers of the ONNX interpreter (:mod:`bna_export.interp.module`): the
registry, a node's attributes, and the elementwise operators; :mod:`.layers` and :mod:`.shapes`
register the others."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import ModelError

Handler = Callable[["Node", list[Tensor | None]], tuple[Tensor, ...]]
OPS: dict[str, Handler] = {}

DTYPES = {
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


def op(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for n in names:
            OPS[n] = fn
        return fn

    return register


class Node:
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


def int_list(t: Tensor | None) -> list[int] | None:
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
    OPS[_name] = _unary(_fn)


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
    OPS[_name] = _binary(_fn)


@op("Max", "Min", "Sum", "Mean")
def _variadic(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    xs = [x for x in a if x is not None]
    fn = {"Max": torch.maximum, "Min": torch.minimum}.get(n.op, torch.add)
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return (out / len(xs) if n.op == "Mean" else out,)


@op("Where")
def _where(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (torch.where(a[0].bool(), a[1], a[2]),)  # type: ignore[union-attr]


@op("LeakyRelu")
def _leaky(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (F.leaky_relu(a[0], float(n.attr("alpha", 0.01))),)  # type: ignore[arg-type]


@op("Elu")
def _elu(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (F.elu(a[0], float(n.attr("alpha", 1.0))),)  # type: ignore[arg-type]


@op("Selu")
def _selu(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    alpha = float(n.attr("alpha", 1.67326319217681884765625))
    gamma = float(n.attr("gamma", 1.05070102214813232421875))
    x = a[0]
    return (gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1)),)  # type: ignore[operator]


@op("HardSigmoid")
def _hard_sigmoid(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    alpha, beta = float(n.attr("alpha", 0.2)), float(n.attr("beta", 0.5))
    return (torch.clamp(alpha * a[0] + beta, 0.0, 1.0),)  # type: ignore[operator]


@op("Gelu")
def _gelu(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (F.gelu(a[0], approximate=str(n.attr("approximate", "none"))),)  # type: ignore[arg-type]


@op("PRelu")
def _prelu(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, slope = a[0], a[1]
    return (torch.where(x >= 0, x, x * slope),)  # type: ignore[operator]


@op("Clip")
def _clip(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
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


@op("Cast")
def _cast(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    to = ir.DataType(int(n.attr("to")))  # type: ignore[arg-type]
    if to not in DTYPES:
        raise n.fail(f"cast to {to.name} is not supported")
    return (a[0].to(DTYPES[to]),)  # type: ignore[union-attr]


@op("CastLike")
def _cast_like(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (a[0].to(a[1].dtype),)  # type: ignore[union-attr]


@op("Dropout")
def _dropout(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (a[0], torch.ones_like(a[0], dtype=torch.bool))  # type: ignore[arg-type]


@op("Softmax", "LogSoftmax")
def _softmax(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    axis = int(n.attr("axis", -1 if n.opset >= 13 else 1))  # type: ignore[arg-type]
    fn = torch.softmax if n.op == "Softmax" else torch.log_softmax
    if n.opset >= 13:
        return (fn(x, axis),)  # type: ignore[arg-type]
    shape = x.shape  # type: ignore[union-attr]
    flat = x.reshape(math.prod(shape[:axis]), -1)  # type: ignore[union-attr]
    return (fn(flat, 1).reshape(shape),)
