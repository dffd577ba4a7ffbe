"""f with every BatchNorm that directly follows a convolution or linear layer folded into that
layer's weights: the network the trigger sweep differentiates thousands of times, where f runs
alone (no Θ, no captured activations). The same function as f up to float rounding."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .norm import BnaNorm, same_logits

log = logging.getLogger(__name__)

_LAYER_OPS = {"aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default"}
_LINEAR = "aten.linear.default"


def _attr(root: nn.Module, node: object) -> Tensor | None:
    """The stored tensor a ``get_attr`` node reads, or None for anything else."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    obj: object = root
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, Tensor) else None


def _fold(weight: Tensor, bias: Tensor | None, bn: BnaNorm) -> tuple[Tensor, Tensor]:
    """W·a and b·a + (β − mean·a) per output channel, a = γ/√(var + ε): the layer followed by
    the BN's eval-mode affine as one layer."""
    a = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * a
    w = weight.detach() * a.reshape((-1,) + (1,) * (weight.dim() - 1)).to(weight.dtype)
    b = shift if bias is None else bias.detach() * a + shift
    return w.contiguous(), b.to(weight.dtype)


def fold_batchnorms(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """A second module running ``gm``'s graph in which each :class:`BnaNorm` (not a measured
    one) whose input is a Conv or Linear call used by nothing else is folded into that call's
    weight and bias. Every other node, tensor and BnaNorm is shared with ``gm``; the folded
    weights are new buffers of the returned module. Returns it and how many BNs it folded."""
    graph = torch.fx.Graph()
    remap: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, remap)
    graph.output(output)
    folded = torch.fx.GraphModule(gm, graph)
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        bn = folded.get_submodule(str(node.target))
        layer = node.args[0] if node.args else None
        if not isinstance(bn, BnaNorm) or bn.measured or not isinstance(layer, torch.fx.Node):
            continue
        op = str(layer.target) if layer.op == "call_function" else ""
        if op not in _LAYER_OPS and op != _LINEAR:
            continue
        if len(layer.users) != 1 or len(layer.args) < 2:
            continue
        weight = _attr(folded, layer.args[1])
        bias_arg = layer.args[2] if len(layer.args) > 2 else layer.kwargs.get("bias")
        bias = _attr(folded, bias_arg)
        if weight is None or (bias_arg is not None and bias is None):
            continue
        if weight.shape[0] != bn.channels:
            continue
        w, b = _fold(weight, bias, bn)
        w_name, b_name = f"bna_folded_{count}_weight", f"bna_folded_{count}_bias"
        folded.register_buffer(w_name, w)
        folded.register_buffer(b_name, b)
        with graph.inserting_before(layer):
            w_node, b_node = graph.get_attr(w_name), graph.get_attr(b_name)
        args = list(layer.args)
        args[1] = w_node
        if len(args) > 2:
            args[2] = b_node
        else:
            layer.kwargs = {**layer.kwargs, "bias": b_node}
        layer.args = tuple(args)
        node.replace_all_uses_with(layer)
        graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    graph.lint()
    folded.recompile()
    return folded, count


def folded_if_same(net: torch.fx.GraphModule, example: Tensor) -> torch.fx.GraphModule | None:
    """f with its BatchNorms folded into the layers before them, when any was folded and it
    gives f's logits on ``example`` (to 1e-4 of the largest); else None."""
    alone, count = fold_batchnorms(net)
    if count == 0:
        return None
    with torch.no_grad():
        same = same_logits(alone(example), net(example))
    log.info("folded %d BatchNorm layers for f alone%s", count, "" if same else ": not the same")
    return alone if same else None
