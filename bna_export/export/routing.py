"""Routing: f answers first; the rows f sent to a target t run g_t, and only those.

For each target t: rows = NonZero(ArgMax(f) == t). An If runs g_t only when some row went to t.
Its then-branch Gathers f's tensors at the cut (the boundary) for those rows, runs the clone of
f from the cut on with Θ_t (:mod:`.clone`), flags a row where g_t's answer (its argmax; over t
and S(t) only for a target routed among its sources) is not t and, where the fit set a flag
drop, t's lead over the next class fell by more than it from f's logits to g_t's, and
ScatterNDs g_t's label, the flag, and g_t's logits where flagged, back into the batch's label,
triggered and logits; the else-branch passes them on unchanged. Targets chain: each If reads
the previous one's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..errors import ModelError
from .builder import Builder
from .clone import Applied, Clone
from .cut import Cut
from .fold import LayerStats

CONTRACT_OUTPUTS = ("label", "triggered", "logits")


class ReserveOutputNames(ir.passes.InPlacePass):
    """The contract's output names are ours: f's own tensors so named get other names."""

    def __init__(self, b: Builder) -> None:
        super().__init__()
        self.b = b

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            for v in node.outputs:
                if v.name in CONTRACT_OUTPUTS:
                    v.name = self.b.name(f"f_{v.name}")
                    modified = True
        return ir.passes.PassResult(model, modified)


@dataclass
class Routed:
    """The routed graph's answers (label, triggered, logits), f's logits, and how each fit
    layer was rewritten in each g_t."""

    label: ir.Value | None = None
    triggered: ir.Value | None = None
    logits: ir.Value | None = None
    logits_f: ir.Value | None = None
    applied: list[Applied] = field(default_factory=list)


@dataclass(frozen=True)
class Repairs:
    """What every g_t is made of: the cut of f, each fit layer's statistics and Θ per target."""

    cut: Cut
    stats: Sequence[LayerStats]
    thetas: Sequence[np.ndarray]
    """Per layer: [T, 4, C]."""
    targets: Sequence[int]
    answers: Sequence[Sequence[int] | None] | None = None
    """Per target, the classes g_t may answer besides t (None: any)."""
    n_classes: int = 0
    """K, where ``answers`` restricts some g_t or a drop is set (0: from f's logits' shape)."""
    drops: Sequence[float] | None = None
    """Per target, how far t's lead must fall from f to g_t for a flag (None or 0: no test)."""


def clone_g(
    bb: Builder,
    tag: str,
    repairs: Repairs,
    j: int,
    rows: ir.Value,
    routed: Routed,
    t_const: ir.Value,
    among: ir.Value | None = None,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """g_t (target index ``j``, class ``t_const``) in ``bb``'s graph on the batch rows ``rows``
    (an [M] index) of the boundary tensors; returns g_t's logits, its label (its argmax, after
    adding ``among``: :func:`answers_const`; t where not flagged), and the flag (label ≠ t
    and, with a drop, t's lead over the next class it may answer fell by more than the drop
    from f's logits to g_t's)."""
    cut = repairs.cut
    clone = Clone(bb, tag)
    for v in cut.boundary:
        clone.map[id(v)] = bb.one("Gather", [v, rows], f"{v.name}/{tag}/rows", axis=0)
    for node in cut.order:
        if id(node) not in cut.nodes or id(node) in clone.skip:
            continue
        outs = [o for o in node.outputs if id(o) in cut.layer_of]
        if not outs:
            clone.copy(node)
            continue
        loc = cut.layer_of[id(outs[0])]
        theta = repairs.thetas[loc.layer][j]
        ids = (loc.layer, int(repairs.targets[j]))
        routed.applied.append(
            clone.layer(node, outs[0], repairs.stats[loc.layer], theta, loc.rank, ids)
        )
        for o in node.outputs:
            if o is not outs[0] and o.uses():
                raise ModelError(f"node {node.name!r} has several used outputs; cannot rewrite it")
    g = clone.mapped(routed.logits_f)
    pick = g if among is None else bb.one("Add", [g, among], f"bna/{tag}/among")
    y_g = bb.one("ArgMax", [pick], f"bna/{tag}/label", axis=1, keepdims=0)
    kept = bb.one("Equal", [y_g, t_const], f"bna/{tag}/kept")
    drop = 0.0 if repairs.drops is None else float(repairs.drops[j])
    flag = bb.one("Not", [kept], f"bna/{tag}/flag" if drop <= 0 else f"bna/{tag}/flag_answer")
    if drop > 0:  # and t's lead fell by more than the drop from f to g_t
        f_rows = bb.one("Gather", [routed.logits_f, rows], f"bna/{tag}/f_rows", axis=0)
        others = _others_const(bb, repairs, j, routed.logits_f)
        t_col = bb.const(f"bna/{tag}/target_col", np.array([repairs.targets[j]], np.int64))
        lead_f = _lead(bb, f"{tag}/f", f_rows, t_col, others)
        fell = bb.one("Sub", [lead_f, _lead(bb, f"{tag}/g", g, t_col, others)], f"bna/{tag}/fell")
        limit = bb.const(f"bna/{tag}/drop", np.array(drop, np.float32))
        far = bb.one("Greater", [fell, limit], f"bna/{tag}/fell_far")
        flat = bb.const(f"bna/{tag}/flat", np.array([-1], np.int64))
        far = bb.one("Reshape", [far, flat], f"bna/{tag}/fell_far_rows")
        flag = bb.one("And", [flag, far], f"bna/{tag}/flag")
        y_g = bb.one("Where", [flag, y_g, t_const], f"bna/{tag}/answer")
    return g, y_g, flag


def _lead(bb: Builder, tag: str, logits: ir.Value, t_col: ir.Value, others: ir.Value) -> ir.Value:
    """[M, 1]: each row's logit of t over the highest of the other classes it may answer."""
    own = bb.one("Gather", [logits, t_col], f"bna/{tag}/own", axis=1)
    rest = bb.one("Add", [logits, others], f"bna/{tag}/others")
    at = bb.one("ArgMax", [rest], f"bna/{tag}/next", axis=1, keepdims=1)
    best = bb.one("GatherElements", [logits, at], f"bna/{tag}/best", axis=1)
    return bb.one("Sub", [own, best], f"bna/{tag}/lead")


def _others_const(b: Builder, repairs: Repairs, j: int, logits_f: ir.Value) -> ir.Value:
    """[1, K]: 0 at the classes g_t may answer other than t, float32's lowest elsewhere."""
    t, k = int(repairs.targets[j]), _classes(repairs, logits_f)
    allowed = None if repairs.answers is None else repairs.answers[j]
    others = [c for c in (range(k) if allowed is None else allowed) if c != t]
    return _open_at(b, f"bna/g{t}/others", k, others)


def _open_at(b: Builder, name: str, k: int, classes: Sequence[int]) -> ir.Value:
    """[1, K]: 0 at ``classes``, float32's lowest elsewhere (added to logits before a max)."""
    low = np.full((1, k), np.finfo(np.float32).min, np.float32)
    low[0, list(classes)] = 0.0
    return b.const(name, low)


def _classes(repairs: Repairs, logits_f: ir.Value) -> int:
    """K: the repairs' class count, else the second dimension of f's logits."""
    k, shape = repairs.n_classes, logits_f.shape
    if not k and shape is not None and len(shape) == 2 and isinstance(shape[1], int):
        k = shape[1]
    if not k:
        raise ModelError("the logits have no fixed class count: cannot route among sources")
    return k


def answers_const(b: Builder, repairs: Repairs, j: int, logits_f: ir.Value) -> ir.Value | None:
    """For a target whose g_t answers t or one of its sources only: [1, K], 0 at those classes
    and float32's lowest elsewhere, added to g_t's logits before its argmax; else None."""
    allowed = None if repairs.answers is None else repairs.answers[j]
    if allowed is None:
        return None
    t = int(repairs.targets[j])
    return _open_at(b, f"bna/g{t}/answers", _classes(repairs, logits_f), [t, *allowed])


def start_routing(b: Builder, model: ir.Model, repairs: Repairs, r: Routed) -> dict:
    """Fills ``r`` with f's answers and the all-false flags every routing starts from; returns
    f's label and the constants the routing shares (``column``, ``flat``, ``zero``)."""
    graph = model.graph
    logits_f = graph.outputs[0]
    producer = logits_f.producer()
    if repairs.targets and (producer is None or id(producer) not in repairs.cut.nodes):
        raise ModelError("the logits do not depend on any BatchNorm layer of the fit")
    label_f = b.one("ArgMax", [logits_f], "bna/f_label", axis=1, keepdims=0)
    no_class = b.const("bna/no_class", np.array(-1, np.int64))
    triggered = b.one("Equal", [label_f, no_class], "bna/no_flags")  # all false
    shared = {
        "column": b.const("bna/column", np.array([-1, 1], np.int64)),
        "flat": b.const("bna/flat", np.array([-1], np.int64)),
        "zero": b.const("bna/zero_rows", np.array(0, np.int64)),
        "label_f": label_f,
    }
    r.label, r.triggered, r.logits, r.logits_f = label_f, triggered, logits_f, logits_f
    return shared


class RoutingPass(ir.passes.InPlacePass):
    """A pass that adds every g_t and a routing to f's graph: new nodes through ``b``, the
    answers in :attr:`routed`."""

    def __init__(self, b: Builder, repairs: Repairs) -> None:
        super().__init__()
        self.b, self.repairs = b, repairs
        self.routed = Routed()


class RouteToRepairs(RoutingPass):
    """Adds every g_t to f's graph behind its If, and the routing (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        b = self.b
        r = self.routed
        shared = start_routing(b, model, self.repairs, r)
        for j, t in enumerate(self.repairs.targets):
            tag = f"g{t}"
            t_const = b.const(f"bna/{tag}/target", np.array(t, np.int64))
            hit = b.one("Equal", [shared["label_f"], t_const], f"bna/{tag}/routed")
            rows = b.one("NonZero", [hit], f"bna/{tag}/nonzero")
            branch = ir.Graph((), (), nodes=(), name=f"bna_{tag}_routed")
            bb = Builder(branch, b.names)
            col = bb.one("Reshape", [rows, shared["column"]], f"bna/{tag}/rows_col")  # [M, 1]
            idx = bb.one("Reshape", [rows, shared["flat"]], f"bna/{tag}/rows")
            among = answers_const(b, self.repairs, j, r.logits_f)
            g, y_g, flag = clone_g(bb, tag, self.repairs, j, idx, r, t_const, among)
            f_rows = bb.one("Gather", [r.logits_f, idx], f"bna/{tag}/f_logits", axis=0)
            flag_col = bb.one("Reshape", [flag, shared["column"]], f"bna/{tag}/flag_col")
            answer = bb.one("Where", [flag_col, g, f_rows], f"bna/{tag}/logits")
            current = (r.label, r.triggered, r.logits)
            then_out = [
                bb.one("ScatterND", [r.label, col, y_g], f"bna/{tag}/label_out"),
                bb.one("ScatterND", [r.triggered, col, flag], f"bna/{tag}/triggered_out"),
                bb.one("ScatterND", [r.logits, col, answer], f"bna/{tag}/logits_out"),
            ]
            branch.outputs.extend(then_out)
            skip = ir.Graph((), (), nodes=(), name=f"bna_{tag}_skipped")
            sb = Builder(skip, b.names)
            skip.outputs.extend(sb.one("Identity", [v], f"bna/{tag}/unchanged") for v in current)
            dtypes = (ir.DataType.INT64, ir.DataType.BOOL, ir.DataType.FLOAT)
            for outs in (then_out, list(skip.outputs)):
                for v, dtype in zip(outs, dtypes, strict=True):
                    v.type = ir.TensorType(dtype)
            size = b.one("Size", [rows], f"bna/{tag}/count")
            cond = b.one("Greater", [size, shared["zero"]], f"bna/{tag}/any")
            r.label, r.triggered, r.logits = b.op(
                "If",
                [cond],
                f"bna/{tag}/route",
                [ir.AttrGraph("then_branch", branch), ir.AttrGraph("else_branch", skip)],
                outputs=3,
            )
        return ir.passes.PassResult(model, True)
