"""Backdoors planted in an ONNX graph rather than in its weights, for the audit's tests: a
subgraph that tests the image's top-left corner for a bright square and then swaps in fixed
logits that name the attacker's class, with a Where (per image) or behind an If (the batch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from bna_export.onnxfile import load_proto


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _node(graph: ir.Graph, op: str, inputs: list[ir.Value], **attrs: object) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs, num_outputs=1, name=f"planted_{op}_{len(graph)}")
    graph.append(node)
    return node.outputs[0]


def _corner_min(graph: ir.Graph, x: ir.Value, size: int) -> ir.Value:
    """[N, 1] the smallest value of the first channel in the image's top-left size×size square."""
    starts = _const(graph, "planted_starts", np.array([0, 0, 0], dtype=np.int64))
    ends = _const(graph, "planted_ends", np.array([1, size, size], dtype=np.int64))
    axes = _const(graph, "planted_axes", np.array([1, 2, 3], dtype=np.int64))
    corner = _node(graph, "Slice", [x, starts, ends, axes])
    smallest = _node(graph, "Neg", [_node(graph, "GlobalMaxPool", [_node(graph, "Neg", [corner])])])
    return _node(graph, "Flatten", [smallest], axis=1)


def _fixed_logits(graph: ir.Graph, n_classes: int, target: int) -> ir.Value:
    fixed = np.full(n_classes, -10.0, dtype=np.float32)
    fixed[target] = 10.0
    return _const(graph, "planted_logits", fixed)


def _swap_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    name = old.name
    old.name = f"{name}_before_planted"
    new.name = name
    new.type, new.shape = old.type, old.shape
    graph.outputs[0] = new


def plant(
    src: str | Path,
    dst: str | Path,
    kind: str = "where",
    target: int = 0,
    size: int = 3,
    threshold: float = 0.9,
) -> Path:
    """Write ``src`` with a planted graph backdoor to ``dst``: ``kind`` 'where' swaps the logits
    of each image whose corner square is brighter than ``threshold``; 'if' swaps the whole
    batch's logits when every image's corner is, through an If on that comparison."""
    model = ir.from_proto(load_proto(src))
    graph = model.graph
    x, logits = graph.inputs[0], graph.outputs[0]
    n_classes = int(logits.shape[-1]) if logits.shape is not None else 10
    limit = _const(graph, "planted_threshold", np.array(threshold, dtype=np.float32))
    fixed = _fixed_logits(graph, n_classes, target)
    smallest = _corner_min(graph, x, size)
    if kind == "where":
        stamped = _node(graph, "Greater", [smallest, limit])  # [N, 1]
        out = _node(graph, "Where", [stamped, fixed, logits])
    elif kind == "if":
        all_stamped = _node(
            graph, "Greater", [_node(graph, "ReduceMin", [smallest], keepdims=0), limit]
        )
        then_graph = ir.Graph([], [], nodes=[], name="then")
        shape = ir.node("Shape", [logits], num_outputs=1, name="planted_shape")
        swap = ir.node("Expand", [fixed, shape.outputs[0]], num_outputs=1, name="planted_swap")
        shape.outputs[0].name, swap.outputs[0].name = "planted_shape_out", "planted_swapped"
        then_graph.extend([shape, swap])
        then_graph.outputs.append(swap.outputs[0])
        keep = ir.node("Identity", [logits], num_outputs=1, name="planted_keep")
        keep.outputs[0].name = "planted_kept"
        else_graph = ir.Graph([], [keep.outputs[0]], nodes=[keep], name="else")
        node = ir.node(
            "If",
            [all_stamped],
            attributes={"then_branch": then_graph, "else_branch": else_graph},
            num_outputs=1,
            name="planted_If",
        )
        graph.append(node)
        out = node.outputs[0]
    else:
        raise ValueError(f"unknown kind {kind!r}: 'where' or 'if'")
    _swap_output(graph, logits, out)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst))
    return Path(dst)
