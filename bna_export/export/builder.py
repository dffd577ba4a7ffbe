"""Small helpers over onnx-ir that every export pass uses: a :class:`Builder` that adds nodes and
initializers under unique names, the value of a constant tensor, and the shape a per-channel
vector takes to broadcast over a layer's output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir


class Builder:
    """Adds nodes and initializers to one graph with unique names."""

    def __init__(self, graph: ir.Graph, names: set[str] | None = None) -> None:
        self.graph = graph
        if names is None:  # a subgraph's builder shares its parent's names
            names = {v.name for n in graph for v in n.outputs} | set(graph.initializers)
            names |= {v.name for v in graph.inputs}
        self.names = names

    def name(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.name(base)
        v = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        v.shape, v.type = v.const_value.shape, ir.TensorType(v.const_value.dtype)
        self.graph.register_initializer(v)
        return v

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        base: str,
        attributes: Sequence[ir.Attr] = (),
        outputs: int = 1,
    ) -> list[ir.Value]:
        node = ir.Node(
            "",
            op_type,
            list(inputs),
            attributes=list(attributes),
            outputs=[
                ir.Value(name=self.name(f"{base}_{k}" if k else base)) for k in range(outputs)
            ],
            name=self.name(f"bna/{base}"),
        )
        self.graph.append(node)
        return list(node.outputs)

    def one(self, op_type: str, inputs: Sequence[ir.Value | None], base: str, **attrs) -> ir.Value:
        return self.op(
            op_type,
            inputs,
            base,
            [ir.convenience.convert_attribute(k, a) for k, a in attrs.items()],
        )[0]


def constant_array(v: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output (through Identity), else None."""
    while v is not None:
        if v.const_value is not None:
            return v.const_value.numpy()
        node = v.producer()
        if node is None:
            return None
        if node.op_type == "Identity":
            v = node.inputs[0]
            continue
        if node.op_type == "Constant" and "value" in node.attributes:
            return node.attributes["value"].value.numpy()
        return None
    return None


def attribute(node: ir.Node, name: str, default: object) -> object:
    """An attribute's value, or ONNX's default for it."""
    return node.attributes[name].value if name in node.attributes else default


def channel_shape(c: int, rank: int) -> tuple[int, ...]:
    """The shape of a per-channel vector that broadcasts over an [N, C, ...] tensor of ``rank``."""
    return (c,) + (1,) * max(rank - 2, 0)
