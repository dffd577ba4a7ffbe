"""Finding the fit's BatchNorm layers in an ONNX graph by value, not by name.

Exporters fold BatchNorm into the preceding Conv/Gemm, rename tensors and merge initializers,
so names and even node types lie. What does not change is the layer's output: the fit file
records, for every BN layer, the per-sample channel means of its output on the probe inputs.
Running the graph on the same probes with every intermediate tensor exposed (a
:class:`~.probe.ProbeRunner`), the tensor whose channel means match is the layer's output,
whichever node (BatchNormalization, a folded Conv or Gemm, ...) produced it. A fit made from
this very ONNX file (``fit --model model.onnx``) names its layers by tensor name; those are
taken by name and only checked by value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..errors import ModelError
from .probe import ProbeRunner

MATCH_TOLERANCE = 1e-3
"""Largest relative difference of channel means for a tensor to be a BN layer's output: float32
round-off between PyTorch and ONNX Runtime is ~1e-6; another layer is off by far more."""


@dataclass(frozen=True)
class Located:
    """A fit layer's output tensor in the graph, its rank, and how far its channel means were
    off."""

    layer: int
    value: ir.Value
    error: float
    rank: int


def candidate_values(graph: ir.Graph) -> list[ir.Value]:
    """Every named float tensor a node of the top-level graph computes, in graph order."""
    floats = {None, ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}
    return [
        v
        for node in graph
        if node.op_type not in ("Constant", "Shape", "Size")
        for v in node.outputs
        if v.name and v.dtype in floats
    ]


def locate_layers(
    graph: ir.Graph,
    probe: ProbeRunner,
    fingerprints: Sequence[np.ndarray],
    names: Sequence[str],
) -> list[Located]:
    """The output tensor of every fit layer (``fingerprints[i]``: [N, C] channel means of layer
    i's output on the probes); a layer that matches no tensor is an error naming it."""
    values = candidate_values(graph)
    arrays = probe.values([v.name for v in values])
    n = len(probe.x)
    out: list[Located] = []
    taken: dict[str, int] = {}
    for i, fp in enumerate(fingerprints):
        c = fp.shape[1]
        scale = max(float(np.abs(fp).max()), 1e-6)
        best: tuple[float, ir.Value, int] | None = None
        for v, a in zip(values, arrays, strict=True):
            if a.ndim < 2 or a.shape[0] != n or a.shape[1] != c:
                continue
            err = float(np.abs(a.reshape(n, c, -1).mean(2) - fp).max()) / scale
            if best is None or err < best[0]:
                best = (err, v, a.ndim)
            if err <= MATCH_TOLERANCE:
                # the earliest match is the layer's output: what follows it and keeps its
                # channel means (a global average pool, a flatten) matches as well, and its
                # float rounding can be the smaller one
                break
        if best is None or best[0] > MATCH_TOLERANCE:
            near = (
                ""
                if best is None
                else f" (closest tensor {best[1].name!r} is off by {best[0]:.2g})"
            )
            raise ModelError(
                f"BatchNorm layer {i} ({names[i]}, {c} channels) of the fit file is not in this "
                f"ONNX graph{near}: this is not the model that was fitted"
            )
        if best[1].name in taken:
            raise ModelError(
                f"BatchNorm layers {taken[best[1].name]} and {i} of the fit file both match "
                f"tensor {best[1].name!r}: cannot tell them apart"
            )
        taken[best[1].name] = i
        out.append(Located(i, best[1], best[0], best[2]))
    return out


def locate_by_name(
    graph: ir.Graph,
    probe: ProbeRunner,
    fingerprints: Sequence[np.ndarray],
    names: Sequence[str],
) -> list[Located] | None:
    """The fit layers' tensors by name (a fit made from this ONNX file), checked against their
    fingerprints; None when a name is not in the graph (another export: match by value)."""
    by_name = {v.name: v for v in candidate_values(graph)}
    if not all(n in by_name for n in names):
        return None
    arrays = probe.values(list(names)) if names else []
    out = []
    for i, (name, fp, a) in enumerate(zip(names, fingerprints, arrays, strict=True)):
        n, c = fp.shape
        scale = max(float(np.abs(fp).max()), 1e-6)
        ok = a.ndim >= 2 and a.shape[:2] == (n, c)
        err = float(np.abs(a.reshape(n, c, -1).mean(2) - fp).max()) / scale if ok else np.inf
        if not err <= MATCH_TOLERANCE:
            raise ModelError(
                f"layer {i} ({name}) of the fit file differs from tensor {name!r} of this ONNX "
                f"graph (off by {err:.2g}): this is not the model that was fitted"
            )
        out.append(Located(i, by_name[name], err, a.ndim))
    return out
