"""An ONNX graph as a differentiable PyTorch module: a small, strict interpreter over onnx-ir
for the operators image classifiers use (an unsupported operator is an error naming it).

``fit --model model.onnx`` runs on it. Initializers become buffers (never trained); at chosen
tensors ("sites") a module given by the caller is applied to the value, which is how the
fitter's per-channel transform h is put on the outputs of BatchNormalization, Conv and Gemm
nodes. See :func:`bn_sites` for which tensors those are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor, nn

from ..errors import ModelError
from . import layers, shapes  # noqa: F401  (they register their operators)
from .ops import OPS, Handler, Node


def bn_sites(graph: ir.Graph) -> list[ir.Value]:
    """Where h goes, in graph order: the output of every BatchNormalization node, and of every
    Conv and Gemm node not followed by a BatchNormalization (its BN was folded into it, or it
    had none: the paper's general form gives such a neuron its own h), except the last
    layers, from which no other Conv, Gemm or BatchNormalization is reached (the logits)."""
    layer_ops = {"BatchNormalization", "Conv", "Gemm"}
    nodes = list(graph)
    below: dict[int, bool] = {}  # node index -> reaches a layer op downstream
    index = {id(node): i for i, node in enumerate(nodes)}
    for i in reversed(range(len(nodes))):
        reach = False
        for out in nodes[i].outputs:
            for user, _ in out.uses():
                j = index.get(id(user))
                if j is None:
                    continue
                if user.op_type in layer_ops or below.get(j, False):
                    reach = True
        below[i] = reach
    sites = []
    for i, node in enumerate(nodes):
        if node.op_type not in layer_ops or not below[i] or not node.outputs:
            continue
        out = node.outputs[0]
        users = [u for u, _ in out.uses()]
        if (
            node.op_type != "BatchNormalization"
            and users
            and all(u.op_type == "BatchNormalization" for u in users)
        ):
            continue
        sites.append(out)
    return sites


_CONSTANTS = {"Constant", "ConstantOfShape", "Shape", "Size", "Range", "EyeLike"}
"""Operators whose outputs the handlers make on the CPU."""


class OnnxModule(nn.Module):
    """Runs an ONNX graph's nodes in order with PyTorch ops; differentiable in its input.

    ``sites`` maps a tensor name to a module applied to that tensor where it is computed (for a
    BatchNormalization node, the module replaces the node and gets the node's input)."""

    def __init__(self, model: ir.Model, sites: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        graph = model.graph
        if len(graph.inputs) - sum(v.name in graph.initializers for v in graph.inputs) != 1:
            raise ModelError("the ONNX model must have exactly one input (the images)")
        if not graph.outputs:
            raise ModelError("the ONNX model has no output")
        opset = graph.opset_imports.get("", model.opset_imports.get("", 0))
        self.input_name = next(v.name for v in graph.inputs if v.name not in graph.initializers)
        self.output_name = graph.outputs[0].name
        self._buffers_by_value: dict[str, str] = {}
        for k, (name, value) in enumerate(graph.initializers.items()):
            if value.const_value is None:
                raise ModelError(f"initializer {name!r} has no data")
            self.register_buffer(f"init_{k}", torch.from_numpy(np.array(value.const_value.numpy())))
            self._buffers_by_value[name] = f"init_{k}"
        self.nodes: list[tuple[Node, Handler]] = []
        unsupported: dict[str, str] = {}
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                unsupported.setdefault(f"{node.domain}::{node.op_type}", node.name or "")
                continue
            handler = OPS.get(node.op_type)
            if handler is None:
                unsupported.setdefault(node.op_type, node.name or "")
                continue
            self.nodes.append((Node(node, int(opset)), handler))
        defined = {self.input_name, *self._buffers_by_value}
        for node, _ in self.nodes:
            for name in node.inputs:
                if name and name not in defined:
                    raise node.fail(f"uses tensor {name!r} before any node computes it")
            defined.update(n for n in node.outputs if n)
        if self.output_name not in defined and not unsupported:
            raise ModelError(f"the graph output {self.output_name!r} is computed by no node")
        if unsupported:
            listed = ", ".join(f"{op} (node {name})" for op, name in unsupported.items())
            raise ModelError(
                f"the ONNX model uses operators fit --model *.onnx does not support: {listed}; "
                "fit from the .pt2 or package.module:callable instead"
            )
        self.sites = nn.ModuleDict()
        self._site_keys: dict[str, str] = {}
        for k, (name, module) in enumerate((sites or {}).items()):
            self.sites[f"site_{k}"] = module
            self._site_keys[name] = f"site_{k}"
        bn_outputs = {n.outputs[0] for n, _ in self.nodes if n.op == "BatchNormalization"}
        self._replaces = {name for name in self._site_keys if name in bn_outputs}

    def forward(self, x: Tensor) -> Tensor:
        env: dict[str, Tensor | None] = {self.input_name: x, "": None}
        for name, buf in self._buffers_by_value.items():
            env[name] = getattr(self, buf)
        for node, handler in self.nodes:
            args = [env[i] if i else None for i in node.inputs]
            first = node.outputs[0] if node.outputs else ""
            if first in self._replaces:
                outs: tuple[Tensor, ...] = (self.sites[self._site_keys[first]](args[0]),)
            else:
                try:
                    outs = handler(node, args)
                except ModelError:
                    raise
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise node.fail(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
                if first in self._site_keys:
                    outs = (self.sites[self._site_keys[first]](outs[0]), *outs[1:])
            if node.op in _CONSTANTS and x.device.type != "cpu":  # values made on the CPU
                outs = tuple(o.to(x.device) for o in outs)
            for name, value in zip(node.outputs, outs, strict=False):
                if name:
                    env[name] = value
        return env[self.output_name]  # type: ignore[return-value]
