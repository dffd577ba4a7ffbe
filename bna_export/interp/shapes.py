"""Interpreter handlers for shape operators (Shape, Reshape, Concat, Gather, Slice, Pad...)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .ops import Node, int_list, op

# --- shapes ---------------------------------------------------------------------------------


@op("Shape")
def _shape(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    dims = list(a[0].shape)  # type: ignore[union-attr]
    start, end = int(n.attr("start", 0)), n.attr("end")  # type: ignore[arg-type]
    dims = dims[start:] if end is None else dims[start : int(end)]  # type: ignore[arg-type]
    return (torch.tensor(dims, dtype=torch.int64),)


@op("Size")
def _size(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (torch.tensor(a[0].numel(), dtype=torch.int64),)  # type: ignore[union-attr]


@op("Constant")
def _constant(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    for key, value in n.attrs.items():
        if key == "value":
            return (value,)  # type: ignore[return-value]
        if key in ("value_float", "value_floats"):
            return (torch.tensor(value, dtype=torch.float32),)
        if key in ("value_int", "value_ints"):
            return (torch.tensor(value, dtype=torch.int64),)
    raise n.fail("no supported value attribute")


@op("ConstantOfShape")
def _constant_of_shape(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    value = n.attr("value")
    fill = torch.zeros(1) if value is None else value.reshape(-1)  # type: ignore[union-attr]
    return (torch.full(int_list(a[0]), fill[0].item(), dtype=fill.dtype),)  # type: ignore[arg-type]


@op("Flatten")
def _flatten(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    axis = int(n.attr("axis", 1)) % (x.dim() + 1) if x.dim() else 0  # type: ignore[union-attr, arg-type]
    return (x.reshape(math.prod(x.shape[:axis]), -1),)  # type: ignore[union-attr]


@op("Reshape")
def _reshape(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, shape = a[0], int_list(a[1])
    if not int(n.attr("allowzero", 0)):  # type: ignore[arg-type]
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]  # type: ignore[union-attr, arg-type]
    return (x.reshape(shape),)  # type: ignore[union-attr]


@op("Transpose")
def _transpose(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    perm = n.ints("perm") or list(reversed(range(x.dim())))  # type: ignore[union-attr]
    return (x.permute(perm),)  # type: ignore[union-attr]


def _axes(n: Node, a: list[Tensor | None]) -> list[int] | None:
    return int_list(a[1] if len(a) > 1 else None) if n.opset >= 13 else n.ints("axes")


@op("Unsqueeze")
def _unsqueeze(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, axes = a[0], _axes(n, a)
    rank = x.dim() + len(axes)  # type: ignore[union-attr, arg-type]
    for ax in sorted(d % rank for d in axes):  # type: ignore[union-attr]
        x = x.unsqueeze(ax)  # type: ignore[union-attr]
    return (x,)  # type: ignore[return-value]


@op("Squeeze")
def _squeeze(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, axes = a[0], _axes(n, a)
    if not axes:
        return (x.squeeze(),)  # type: ignore[union-attr]
    return (x.squeeze(tuple(d % x.dim() for d in axes)),)  # type: ignore[union-attr]


@op("Concat")
def _concat(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (torch.cat([x for x in a if x is not None], int(n.attr("axis"))),)  # type: ignore[arg-type]


@op("Split")
def _split(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, axis = a[0], int(n.attr("axis", 0))  # type: ignore[arg-type]
    sizes = int_list(a[1] if len(a) > 1 else None) if n.opset >= 13 else n.ints("split")
    if not sizes:
        k = len(n.outputs)
        total = x.shape[axis]  # type: ignore[union-attr]
        step = -(-total // k)
        sizes = [min(step, total - i * step) for i in range(k)]
    return tuple(torch.split(x, sizes, axis))  # type: ignore[arg-type]


@op("Gather")
def _gather(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, idx = a[0], a[1].long()  # type: ignore[union-attr]
    axis = int(n.attr("axis", 0)) % x.dim()  # type: ignore[union-attr, arg-type]
    size = x.shape[axis]  # type: ignore[union-attr]
    flat = torch.where(idx < 0, idx + size, idx).reshape(-1)
    out = x.index_select(axis, flat)  # type: ignore[union-attr]
    return (out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])),)  # type: ignore[union-attr]


@op("Slice")
def _slice(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    if n.opset < 10:
        starts, ends, axes, steps = n.ints("starts"), n.ints("ends"), n.ints("axes"), None
    else:
        starts, ends = int_list(a[1]), int_list(a[2])
        axes = int_list(a[3] if len(a) > 3 else None)
        steps = int_list(a[4] if len(a) > 4 else None)
    axes = axes or list(range(len(starts)))  # type: ignore[arg-type]
    steps = steps or [1] * len(starts)  # type: ignore[arg-type]
    index = [slice(None)] * x.dim()  # type: ignore[union-attr]
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):  # type: ignore[arg-type]
        if st <= 0:
            raise n.fail("Slice with a step below 1 is not supported")
        index[ax % x.dim()] = slice(s, e, st)  # type: ignore[union-attr]
    return (x[tuple(index)],)  # type: ignore[index]


@op("Expand")
def _expand(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x, shape = a[0], int_list(a[1])
    return (x.expand(torch.broadcast_shapes(x.shape, tuple(shape))),)  # type: ignore[union-attr, arg-type]


@op("Tile")
def _tile(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    return (a[0].repeat(int_list(a[1])),)  # type: ignore[union-attr, arg-type]


@op("Range")
def _range(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    start, limit, delta = (t.item() for t in a[:3])  # type: ignore[union-attr]
    return (torch.arange(start, limit, delta, dtype=a[0].dtype),)  # type: ignore[union-attr]


@op("Pad")
def _pad(n: Node, a: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = a[0]
    mode = str(n.attr("mode", "constant"))
    if n.opset < 11:
        pads, value = n.ints("pads"), float(n.attr("value", 0.0))  # type: ignore[arg-type]
    else:
        pads = int_list(a[1])
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
