"""The built graph's outputs and metadata (design, "Built graph"): ``label`` int64 [N],
``triggered`` bool [N], ``logits`` float [N, K], the tool's metadata properties, and f's own
logits' name (``bna.f_logits``, for evaluation); then serialised with every initializer inline
and no per-node metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence

import onnx
import onnx_ir as ir

from .builder import Builder
from .routing import Routed


def metadata_for(
    version: str, targets: Sequence[int], fit_sha256: str, model_sha256: str
) -> dict[str, str]:
    """The built graph's metadata properties (design: tool version, targets, fit-file hash;
    and the input model's hash, :func:`bna_export.onnxfile.model_sha256`)."""
    return {
        "bna.tool_version": version,
        "bna.targets": json.dumps([int(t) for t in targets]),
        "bna.fit_sha256": fit_sha256,
        "bna.model_sha256": model_sha256,
    }


class ContractOutputs(ir.passes.InPlacePass):
    """The graph's outputs become the routed answers under the contract's names and types."""

    def __init__(self, routed: Routed, metadata: dict[str, str]) -> None:
        super().__init__()
        self.routed, self.metadata = routed, metadata

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, r = model.graph, self.routed
        logits_f = r.logits_f
        batch = graph.inputs[0].shape[0] if graph.inputs[0].shape is not None else "N"
        k = logits_f.shape[1] if logits_f.shape is not None and len(logits_f.shape) == 2 else None
        outs = [
            (r.label, "label", ir.DataType.INT64, [batch]),
            (r.triggered, "triggered", ir.DataType.BOOL, [batch]),
            (r.logits, "logits", ir.DataType.FLOAT, [batch, k]),
        ]
        final = []
        builder = Builder(graph)
        for v, name, dtype, shape in outs:
            if v is logits_f:  # f's own output keeps its name (evaluation reads it): copy it
                v = builder.one("Identity", [v], f"bna/{name}")
            v.name = name  # our own values: renamed, no copy (one node less per run)
            v.type, v.shape = ir.TensorType(dtype), ir.Shape(shape)
            final.append(v)
        graph.outputs.clear()
        graph.outputs.extend(final)
        graph.sort()
        for key in [k for k in model.metadata_props if k.startswith("bna.")]:
            del model.metadata_props[key]  # the input's own, stale or forged
        model.metadata_props.update(self.metadata)
        model.metadata_props["bna.f_logits"] = logits_f.name  # f's own logits, for evaluation
        return ir.passes.PassResult(model, True)


def _strip(graph: onnx.GraphProto) -> None:
    """Drop doc strings and per-node/tensor metadata: exporters store stack traces there, with
    the exporting machine's file paths; the built graph carries none."""
    graph.doc_string = ""
    for item in (*graph.node, *graph.initializer, *graph.input, *graph.output, *graph.value_info):
        item.doc_string = ""
        if hasattr(item, "metadata_props"):
            del item.metadata_props[:]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip(attr.g)
            for sub in attr.graphs:
                _strip(sub)


def to_bytes(model: ir.Model) -> bytes:
    """Serialize with every initializer inline and no per-node metadata (so no file path of
    any machine is inside); the result passes ``onnx.checker``."""
    proto = ir.to_proto(model)
    _strip(proto.graph)
    proto.doc_string = ""
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
