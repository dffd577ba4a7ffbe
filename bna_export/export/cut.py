"""Where g_t starts: the nodes of f that every g_t recomputes (the *cut*) and the tensors of f it
reads from outside (the *boundary*).

The cut starts at the producers of the fit layers' outputs and takes everything downstream. The
routing picks the rows f sent to t from each boundary tensor with Gather, so a boundary tensor
must be batch-major; one that is not (a Shape of an activation, a size computed from it) is
found by running f on 3 and on 2 probes (its first dimension does not follow), and its
producer joins the cut, to be recomputed from the routed rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx_ir as ir

from ..errors import ModelError
from .locate import Located
from .probe import ProbeRunner


@dataclass(frozen=True)
class Cut:
    """The nodes every g_t recomputes (ids), the tensors of f they read, where each fit layer's
    output is (by the value's id), and f's nodes in graph order (before anything was added)."""

    nodes: set[int]
    boundary: list[ir.Value]
    layer_of: dict[int, Located]
    order: list[ir.Node]


def _depends_on_input(graph: ir.Graph) -> set[int]:
    """ids of the nodes whose outputs depend on a graph input."""
    live = {id(v) for v in graph.inputs}
    out = set()
    for node in graph:
        if any(v is not None and id(v) in live for v in node.inputs):
            out.add(id(node))
            live.update(id(v) for v in node.outputs)
    return out


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


def find_cut(graph: ir.Graph, located: Sequence[Located], probe: ProbeRunner) -> Cut:
    """The cut of ``graph`` (sorted) for the fit layers ``located``."""
    nodes = list(graph)
    layer_of = {id(loc.value): loc for loc in located}
    input_nodes = _depends_on_input(graph)
    cut: set[int] = set()
    for node in nodes:
        if any(id(v) in layer_of for v in node.outputs) or any(
            v is not None and (p := v.producer()) is not None and id(p) in cut for v in node.inputs
        ):
            cut.add(id(node))
    if not cut:
        return Cut(cut, [], layer_of, nodes)
    while True:
        boundary = _boundary(nodes, cut, input_nodes)
        if not boundary:
            return Cut(cut, boundary, layer_of, nodes)
        names = [v.name for v in boundary]
        three, two = probe.values(names, rows=3), probe.values(names, rows=2)
        pull = [
            v
            for v, a, b in zip(boundary, three, two, strict=True)
            if not (a.ndim and b.ndim and a.shape[0] == 3 and b.shape[0] == 2)
        ]
        if not pull:
            return Cut(cut, boundary, layer_of, nodes)
        for v in pull:
            if v.producer() is None:
                raise ModelError(f"the model's input {v.name!r} has no batch dimension")
            cut.add(id(v.producer()))
