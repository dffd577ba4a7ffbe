"""``build``: from the ONNX file of f and a fit file to the one graph users deploy, checked in
ONNX Runtime against the fit file's PyTorch reference before anything is written.

The pipeline: find the fit's layers in f (:mod:`.locate`, on one :class:`~.probe.ProbeRunner`),
find where g_t starts (:mod:`.cut`), then the passes :class:`~.routing.ReserveOutputNames`,
:class:`~.routing.RouteToRepairs` (or :class:`~.whole_batch.RouteWholeBatch`) and
:class:`~.outputs.ContractOutputs`, and serialise."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .. import __version__
from ..artifact import FitFile, encode
from ..audit import Audit, audit_model, require_clean
from ..errors import BnaError, FitFileError, ModelError
from ..fitfile import FitRecord, Routing, read
from ..onnxfile import load_proto, model_sha256
from ..runtime import run_built, session
from .builder import Builder
from .clone import Applied
from .cut import find_cut
from .fold import LayerStats
from .locate import Located, locate_by_name, locate_layers
from .outputs import ContractOutputs, metadata_for, to_bytes
from .probe import ProbeRunner
from .routing import Repairs, ReserveOutputNames, RouteToRepairs
from .whole_batch import RouteWholeBatch

MIN_OPSET = 13

LOGIT_TOLERANCE = 1e-3
"""Largest |logit difference| (relative to the largest logit, at least 1) between the built
graph in ONNX Runtime and the PyTorch reference on the probes before ``build`` refuses."""


@dataclass
class Built:
    """A built graph (serialized), where each fit layer was found, and the self-check."""

    data: bytes
    targets: list[int]
    layers: list[dict[str, object]]
    max_logit_error: float
    probes: int
    found_by: str = "value"
    """How the layers were found: "name" (the fit was made from this .onnx) or "value"."""
    audit: Audit | None = None
    """The input graph's audit; not clean only when built with ``allow_graph_logic``."""


def _stats(rec: FitRecord) -> list[LayerStats]:
    return [
        LayerStats(la.weight, la.bias, la.running_mean, la.running_var, float(la.eps))
        for la in rec.layers
    ]


def rewrite(
    model: ir.Model,
    probe: ProbeRunner,
    located: Sequence[Located],
    repairs: tuple[Sequence[LayerStats], Sequence[np.ndarray], Sequence[int]],
    metadata: dict[str, str],
    whole_batch: bool = False,
    routing: Routing | None = None,
    n_classes: int = 0,
) -> list[Applied]:
    """Turn ``model`` (f) into the built graph, in place; ``repairs``: each layer's statistics,
    its Θ ([T, 4, C]) and the targets; ``routing``: per target, the classes g_t may answer
    besides t and its flag drop (None: any class, no drop), of ``n_classes`` classes. Returns
    which rule rewrote each layer in each g_t.

    ``whole_batch`` runs every g_t on every sample and keeps the answers of the samples f
    sent to t: the same outputs at a higher cost (the naive graph, for benchmarks)."""
    graph = model.graph
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise ModelError(f"the model uses ONNX opset {opset}; the build needs {MIN_OPSET} or newer")
    if len(graph.inputs) != 1 or not graph.outputs:
        raise ModelError(
            "the model must have one input (the images) and its logits as first output"
        )
    graph.sort()
    b = Builder(graph)
    stats, thetas, targets = repairs
    cut = find_cut(graph, located, probe)
    answers, drops = (routing.answers, routing.drops) if routing else (None, None)
    plan = Repairs(cut, stats, thetas, targets, answers, n_classes, drops)
    route = (RouteWholeBatch if whole_batch else RouteToRepairs)(b, plan)
    passes = ir.passes.Sequential(
        ReserveOutputNames(b), route, ContractOutputs(route.routed, metadata)
    )
    try:
        passes(model)
    except ir.passes.PassError as exc:  # onnx-ir wraps what a pass raised: ours is the answer
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, BnaError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause  # noqa: B904 (the error is the pass's own, with its own cause)
    return route.routed.applied


def build_graph(
    model_path: str | Path, fit: FitFile, whole_batch: bool = False, allow_graph_logic: bool = False
) -> Built:
    """Rewrite f's ONNX graph with every g_t and the routing; raises :class:`ModelError` when
    the graph in ONNX Runtime disagrees with the fit file's reference on its probes, or holds
    graph logic (:mod:`bna_export.audit`) and not ``allow_graph_logic`` (then what the audit
    found is in the built graph's metadata, ``bna.audit``).
    ``whole_batch``: the naive graph that runs every g_t on every sample (benchmarks)."""
    rec = read(fit)
    probes = rec.probes
    fingerprints = [la.probe_mean for la in rec.layers]
    if probes is None or any(f is None for f in fingerprints):
        raise FitFileError(
            "fit file lacks its probes: it was written before `build` existed; run `fit` again"
        )
    probe_x = probes.x
    expected = (probes.label, probes.triggered, probes.logits)
    proto = load_proto(model_path)
    model = ir.from_proto(proto)
    found = audit_model(model)
    require_clean(found, model_path, allow_graph_logic)
    inputs = model.graph.inputs
    if len(inputs) != 1 or inputs[0].shape is None:
        raise ModelError(f"{model_path}: the model must have one image input with a known shape")
    dims = list(inputs[0].shape)
    if len(dims) != 1 + len(rec.input_shape) or any(
        isinstance(d, int) and d != e for d, e in zip(dims[1:], rec.input_shape, strict=True)
    ):
        raise ModelError(
            f"{model_path}: input shape {dims} does not take the fit's images "
            f"{list(rec.input_shape)}: this is not the model that was fitted"
        )
    if isinstance(dims[0], int):
        raise ModelError(
            f"{model_path}: the input has a fixed batch size {dims[0]}; export it with a dynamic "
            "batch dimension (torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes=...)"
        )
    targets = rec.targets
    names = [la.name for la in rec.layers]
    located: list[Located] = []
    found_by = "value"
    probe = ProbeRunner(proto, probe_x)  # the one session that runs f on the probes
    if targets and rec.model_format == "onnx":
        by_name = locate_by_name(model.graph, probe, fingerprints, names)
        if by_name is not None:
            located, found_by = by_name, "name"
    if targets and found_by == "value":
        located = locate_layers(model.graph, probe, fingerprints, names)
    thetas = [np.asarray(la.theta) for la in rec.layers]
    digest = hashlib.sha256(encode(fit)).hexdigest()
    applied = rewrite(
        model,
        probe,
        located,
        (_stats(rec), thetas, targets),
        metadata_for(__version__, targets, digest, model_sha256(model_path)),
        whole_batch,
        rec.routing,
        rec.n_classes,
    )
    if not found.clean:  # carried into the built graph: said there too
        model.metadata_props["bna.audit"] = json.dumps(found.to_json(), sort_keys=True)
    data = to_bytes(model)
    out = run_built(session(data, "cpu"), probe_x)
    scale = max(1.0, float(np.abs(expected[2]).max()))
    err = float(np.abs(out.logits - expected[2]).max()) / scale if len(probe_x) else 0.0
    wrong = int((out.label != expected[0]).sum() + (out.triggered != expected[1]).sum())
    if wrong or not err <= LOGIT_TOLERANCE:
        raise ModelError(
            f"the built graph disagrees with the fit file's reference on its {len(probe_x)} "
            f"probe inputs ({wrong} labels or flags differ, logits off by {err:.2g}): "
            f"{model_path} is not the model that was fitted, or the rewrite failed; nothing written"
        )
    layers = [
        {
            "layer": loc.layer,
            "name": names[loc.layer],
            "tensor": loc.value.name,
            "node": loc.value.producer().op_type if loc.value.producer() else "input",
            "match_error": loc.error,
            "rules": {
                str(a.target): {"rule": a.rule, "declined": a.declined}
                for a in applied
                if a.layer == loc.layer
            },
        }
        for loc in located
    ]
    return Built(data, list(targets), layers, err, len(probe_x), found_by, found)
