"""A graph-level backdoor audit of an ONNX classifier: the nodes on a path from the image to the
outputs that select or branch on the image's values (If, Loop, Where, comparisons, ArgMax/TopK
feeding anything but an output, NonZero, indexing by computed indices), the constants those
comparisons test against, and outputs that do not depend on the image at all. A weight-level
repair cannot touch logic like this; ``fit`` and ``build`` refuse a graph that has any.

What depends on the image's *values* is traced forward from the graph inputs; a Shape or Size
node's output depends on the image's shape only, so the shape arithmetic exporters emit for a
dynamic batch is not flagged. Arithmetic that gates without any such node (a steep Sigmoid as a
switch) is not found: the audit lists selection and branching, it does not prove their absence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, TopologicalSortPass

from .errors import ModelError
from .onnxfile import load_proto

_SHAPE_ONLY = {"Shape", "Size", "EyeLike"}  # outputs depend on the input's shape, not values
_COMPARE = {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "IsNaN", "IsInf"}
_PICK = {"ArgMax", "ArgMin", "TopK", "Hardmax"}
_SHAPED = {  # op: the inputs that set a shape, a position or a count
    "Slice": (1, 2, 3, 4),
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "Pad": (1,),
    "Resize": (1, 2, 3),
    "Split": (1,),
    "SequenceAt": (1,),
    "SequenceInsert": (2,),
    "SequenceErase": (1,),
    "SplitToSequence": (1,),
}
_INDEXED = {  # op: the input that holds indices
    "Gather": 1,
    "GatherElements": 1,
    "GatherND": 1,
    "Scatter": 1,
    "ScatterElements": 1,
    "ScatterND": 1,
    "OneHot": 0,
}


@dataclass(frozen=True)
class Finding:
    """One node that selects or branches on the image's values."""

    node: str
    op: str
    reason: str
    constants: tuple[str, ...] = ()  # constant operands the image-derived values are tested against


@dataclass(frozen=True)
class Audit:
    """What :func:`audit_model` found: clean when there are no findings and every output
    depends on the image."""

    findings: tuple[Finding, ...]
    detached_outputs: tuple[str, ...]

    @property
    def clean(self) -> bool:
        return not self.findings and not self.detached_outputs

    def summary(self) -> str:
        """One line: what was found, the nodes named."""
        if self.clean:
            return "no data-dependent selection or branching on the path to the outputs"
        parts = [f"{f.op} {f.node!r} ({f.reason})" for f in self.findings[:6]]
        if len(self.findings) > 6:
            parts.append(f"and {len(self.findings) - 6} more")
        if self.detached_outputs:
            parts.append("outputs not computed from the image: " + ", ".join(self.detached_outputs))
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "findings": [asdict(f) for f in self.findings],
            "detached_outputs": list(self.detached_outputs),
        }


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    out: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            out.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            out.extend(attr.value)
    return out


def _uses(node: ir.Node) -> list[ir.Value]:
    """Every value the node reads, those its subgraphs read from outer scopes included."""
    used = [v for v in node.inputs if v is not None]
    for g in _subgraphs(node):
        inner = set(g.inputs)
        for n in g:
            inner.update(n.outputs)
        for n in g:
            used += [v for v in _uses(n) if v not in inner]
    return used


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return value.const_value is not None or (
        producer is not None and producer.op_type == "Constant"
    )


def _describe(value: ir.Value) -> str:
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and "value" in producer.attributes:
        tensor = producer.attributes["value"].value
    if tensor is None:
        return value.name or "?"
    try:
        array = np.asarray(tensor.numpy())
    except Exception:  # a tensor onnx-ir cannot show as numbers (a string tensor…): its name
        return value.name or "constant"
    if array.size <= 4:
        shown = [float(f"{v:.6g}") if isinstance(v, float) else v for v in array.ravel().tolist()]
        return f"{value.name or 'constant'}={shown[0] if array.ndim == 0 else shown}"
    return f"{value.name or 'constant'} (shape {list(array.shape)})"


class _Tracer:
    def __init__(self, outputs: list[ir.Value]) -> None:
        self.tainted: set[ir.Value] = set()
        self.output_values = set(outputs)
        self.findings: list[Finding] = []

    def graph(self, graph: ir.Graph, live: set[ir.Node]) -> None:
        for node in graph:
            self.node(node, live)

    def node(self, node: ir.Node, live: set[ir.Node]) -> None:
        op, ins = node.op_type, node.inputs
        hot = [v is not None and v in self.tainted for v in ins]
        for g in _subgraphs(node):  # values inside see the outer taint; its inputs follow ours
            if any(hot):
                self.tainted.update(g.inputs)
            self.graph(g, live | set(g))
        reads_image = any(v in self.tainted for v in _uses(node))
        if reads_image and op not in _SHAPE_ONLY:
            self.tainted.update(node.outputs)
        if node not in live:
            return
        name = node.name or (node.outputs[0].name if node.outputs else op)
        reason = None
        constants: tuple[str, ...] = ()
        if node.domain not in ("", "ai.onnx"):
            if reads_image:
                reason = f"an operator of domain {node.domain!r}, which the audit cannot see into"
        elif op == "If" and hot[:1] == [True]:
            reason = "branches on a condition computed from the image"
        elif op == "Loop" and reads_image:
            reason = "loops over values computed from the image"
        elif op == "Where" and hot[:1] == [True] and not _softplus_guard(node):
            reason = "selects values by a condition computed from the image"
        elif op in _COMPARE and any(hot) and not _only_softplus_guards(node):
            reason = "compares values computed from the image"
            constants = tuple(_describe(v) for v in ins if v is not None and _is_constant(v))
        elif op == "Cast" and any(hot) and _casts_to_bool(node):
            reason = "turns values computed from the image into booleans"
        elif op in _SHAPED and any(hot[i] for i in _SHAPED[op] if i < len(hot)):
            reason = "sizes or positions its result by values computed from the image"
        elif op in ("NonZero", "Compress") and any(hot):
            reason = "selects elements by the image's values"
        elif op in _INDEXED and len(hot) > _INDEXED[op] and hot[_INDEXED[op]]:
            reason = "indexes with indices computed from the image"
        elif op in _PICK and any(hot):
            users = [u for v in node.outputs for u, _ in v.uses()]
            if users or not any(v in self.output_values for v in node.outputs):
                reason = (
                    f"its result feeds {users[0].op_type if users else 'nothing'}, not an output"
                )
        if reason is not None:
            self.findings.append(Finding(name, op, reason, constants))


def _casts_to_bool(node: ir.Node) -> bool:
    to = node.attributes.get("to")
    return to is not None and to.value == ir.DataType.BOOL.value


def _softplus_guard(where: ir.Node) -> bool:
    """Where(Greater(v, c), v, Softplus(v)): how PyTorch's exporter writes softplus with its
    threshold (softplus(v) = v for large v), not a selection an attacker controls."""
    cond, big, small = [*where.inputs, None, None, None][:3]
    test = cond.producer() if cond is not None else None
    soft = small.producer() if small is not None else None
    return (
        test is not None
        and soft is not None
        and test.op_type == "Greater"
        and soft.op_type == "Softplus"
        and test.inputs[0] is big
        and soft.inputs[0] is big
        and test.inputs[1] is not None
        and _is_constant(test.inputs[1])
    )


def _only_softplus_guards(node: ir.Node) -> bool:
    users = [u for v in node.outputs for u, _ in v.uses()]
    return bool(users) and all(u.op_type == "Where" and _softplus_guard(u) for u in users)


def _live(graph: ir.Graph) -> set[ir.Node]:
    """Nodes (of the graph and its subgraphs) on which some graph output depends."""
    live: set[ir.Node] = set()
    stack = [v.producer() for v in graph.outputs if v.producer() is not None]
    while stack:
        node = stack.pop()
        if node is None or node in live:
            continue
        live.add(node)
        for g in _subgraphs(node):
            for n in g:
                live.add(n)
        stack += [v.producer() for v in _uses(node)]
    return live


def audit_model(model: ir.Model) -> Audit:
    """Audit ``model``'s main graph and the subgraphs of its If/Loop/Scan nodes, on a copy
    with its model-local functions inlined and its nodes in topological order (ONNX Runtime
    runs a graph listed out of order)."""
    copy = ir.from_proto(ir.to_proto(model))
    copy = TopologicalSortPass()(InlinePass()(copy).model).model
    graph = copy.graph
    tracer = _Tracer(list(graph.outputs))
    tracer.tainted.update(v for v in graph.inputs if v.const_value is None)
    tracer.graph(graph, _live(graph))
    detached = tuple(v.name or "?" for v in graph.outputs if v not in tracer.tainted)
    return Audit(tuple(tracer.findings), detached)


def audit_file(path: str | Path) -> Audit:
    """:func:`audit_model` of an ONNX file (read as :func:`~bna_export.onnxfile.load_proto`
    reads it: external data only from the model's folder)."""
    return audit_model(ir.from_proto(load_proto(path)))


def require_clean(audit: Audit, path: str | Path, allow: bool) -> None:
    """Raise :class:`ModelError` naming the nodes when ``audit`` is not clean and not ``allow``."""
    if not audit.clean and not allow:
        raise ModelError(
            f"{path} holds graph logic a weight repair cannot remove: {audit.summary()} "
            "(`bna-export audit` lists it; --allow-graph-logic goes on anyway)"
        )
