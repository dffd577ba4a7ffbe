"""Loading classifiers (``.pt2``, ``package.module:callable`` + state dict, or ``.onnx``) and
swapping each BatchNorm's normalisation for the per-channel transform h(z | θ) = max(min((z -
µ)/σ, ω), υ): the result is a :class:`~bna_export.norm.BnaModel`.

Every BatchNorm becomes a :class:`BnaNorm` that computes f's own normalisation for samples routed
to -1 and h(· | θ_t) followed by the BN's affine γ·h + β for samples routed to target index t.
Nothing of f's trained parameters changes; Θ lives outside the model and is passed in. A model
given as ONNX runs through :mod:`bna_export.interp`; there the outputs of Conv and Gemm
nodes (whose BN was folded in, or which had none) get a "measured" :class:`BnaNorm`: f passes
through unchanged, and h works in units of the channel's mean and spread on clean data.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import logging
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor, nn

from .audit import audit_model, require_clean
from .data import Dataset
from .errors import ModelError
from .folded import folded_if_same
from .interp import OnnxModule, bn_sites
from .norm import BnaModel, BnaNorm
from .onnxfile import load_proto, model_sha256
from .pt2file import load_module

log = logging.getLogger(__name__)

_BN_OPS = {
    "aten.batch_norm.default",
    "aten._native_batch_norm_legit_no_training.default",
    "aten.native_batch_norm.default",
    "aten._native_batch_norm_legit.default",
}


def _execution_order(net: nn.Module, layers: list[BnaNorm], example: Tensor) -> list[BnaNorm]:
    order: list[BnaNorm] = []
    handles = [la.register_forward_hook(lambda m, i, o: order.append(m)) for la in layers]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in handles:
            h.remove()
    seen: list[BnaNorm] = []
    for m in order:
        if m not in seen:
            seen.append(m)
    unused = [la.name for la in layers if la not in seen]
    if unused:
        log.info("BatchNorm layers not used by forward: %s", unused)
    return seen


def adapt_module(net: nn.Module, example: Tensor) -> BnaModel:
    """A copy of an eager module with every ``nn.BatchNorm*`` replaced by a :class:`BnaNorm`,
    and its in-place activations (``nn.ReLU(inplace=True)``…) made out-of-place, so that a BN
    output stays what BNA measured."""
    net = copy.deepcopy(net).eval()
    for m in net.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    layers: list[BnaNorm] = []
    for parent_name, parent in list(net.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                if not child.track_running_stats or child.running_mean is None:
                    raise ModelError(f"BatchNorm {child_name!r} has no running statistics")
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                bn = BnaNorm(
                    child.running_mean, child.running_var, child.weight, child.bias, child.eps, full
                )
                setattr(parent, child_name, bn)
                layers.append(bn)
    others = any(isinstance(m, _OTHER_NORM_MODULES) for m in net.modules())
    return _finish(net, layers, example, other_norms=others)


OTHER_NORMS = (
    "the model has no BatchNorm layer but normalises its activations another way (GroupNorm, "
    "LayerNorm or InstanceNorm): BNA corrects BatchNorm statistics, so it cannot repair this "
    "model"
)
"""The one answer every input form gives for a model normalised without BatchNorm."""
_OTHER_NORM_OPS = {
    "aten.group_norm.default",
    "aten.native_group_norm.default",
    "aten.layer_norm.default",
    "aten.native_layer_norm.default",
    "aten.instance_norm.default",
}
_OTHER_NORM_MODULES = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_OTHER_NORM_ONNX = {"GroupNormalization", "LayerNormalization", "InstanceNormalization"}


def _finish(
    net: nn.Module,
    layers: list[BnaNorm],
    example: Tensor,
    source: str = "torch",
    other_norms: bool = False,
) -> BnaModel:
    if not layers and other_norms:
        raise ModelError(OTHER_NORMS)
    if not layers:
        raise ModelError("the model has no BatchNorm layer; BNA corrects BatchNorm statistics")
    try:
        ordered = _execution_order(net, layers, example)
    except Exception as exc:  # the model itself failed on a well-formed input
        raise ModelError(
            f"the model failed on an input of shape {tuple(example.shape)}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    alone = None
    if isinstance(net, torch.fx.GraphModule) and source == "torch":
        alone = folded_if_same(net, example)
    return BnaModel(net, ordered, source, alone)


def _getattr_path(root: nn.Module, target: str) -> Tensor:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _out_of_place(graph: torch.fx.Graph) -> None:
    """Rewrite in-place ATen calls (``aten.relu_``, ``aten.add_``…, which torch.export keeps
    for ``inplace=True`` modules) as their out-of-place forms, later reads of the mutated
    tensor taking the result: the same values, and a BN output no later node overwrites."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        name = target._schema.name.split("::")[-1]
        if not name.endswith("_") or name.startswith("_") or not node.args:
            continue
        packet = getattr(torch.ops.aten, name[:-1], None)
        functional = getattr(packet, target._overloadname, None) if packet else None
        mutated = node.args[0]
        if functional is None or not isinstance(mutated, torch.fx.Node):
            continue
        node.target = functional
        for user in list(mutated.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(mutated, node)


def adapt_graph_module(gm: torch.fx.GraphModule, example: Tensor) -> BnaModel:
    """Replace every BatchNorm call of an exported program's module by a :class:`BnaNorm`."""
    graph = gm.graph
    layers: list[BnaNorm] = []

    def tensor_arg(arg: object) -> Tensor | None:
        if arg is None:
            return None
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            return _getattr_path(gm, str(arg.target))
        raise ModelError(f"BatchNorm argument {arg} is not a stored tensor; cannot adapt")

    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) not in _BN_OPS:
            continue
        op = str(node.target)
        args = list(node.args) + [None] * 9
        x, w, b, mean, var = args[:5]
        if op == "aten._native_batch_norm_legit_no_training.default":
            eps = args[6]
        else:
            training, eps = args[5], args[7]
            if training:
                raise ModelError(f"BatchNorm {node.name} runs in training mode; export in eval")
        eps = 1e-5 if eps is None else float(eps)
        m, v = tensor_arg(mean), tensor_arg(var)
        if m is None or v is None:
            raise ModelError(f"BatchNorm {node.name} has no running statistics")
        name = node.meta.get("nn_module_stack")
        label = list(name.values())[-1][0] if name else node.name
        bn = BnaNorm(m, v, tensor_arg(w), tensor_arg(b), eps, str(label))
        mod_name = re.sub(r"\W", "_", f"bna_{len(layers)}_{node.name}")
        gm.add_submodule(mod_name, bn)
        with graph.inserting_after(node):
            new = graph.call_module(mod_name, (x,))
        if op == "aten.batch_norm.default":
            node.replace_all_uses_with(new)
        else:
            for user in list(node.users):
                if user.target.__name__ == "getitem" and user.args[1] == 0:
                    user.replace_all_uses_with(new)
                elif user.users:
                    raise ModelError(f"BatchNorm {node.name}: statistics outputs are used")
        layers.append(bn)
    _out_of_place(graph)
    others = any(str(n.target) in _OTHER_NORM_OPS for n in graph.nodes)
    graph.eliminate_dead_code()
    for node in list(graph.nodes):  # guards pin the traced input shape; BNA runs other batches
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            graph.erase_node(node)
    gm.recompile()
    return _finish(gm, layers, example, other_norms=others)


class _Moments(nn.Module):
    """Passes its input through and adds up per-channel sums (float64) for mean and spread."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() < 2:
            raise ModelError(f"a Conv/Gemm output of shape {tuple(z.shape)} has no channel axis")
        flat = z.detach().transpose(0, 1).reshape(z.shape[1], -1).double()
        s, sq = flat.sum(1), (flat * flat).sum(1)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        self.count += flat.shape[1]
        return z

    def statistics(self) -> tuple[Tensor, Tensor]:
        assert self.sum is not None and self.sumsq is not None
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean * mean).clamp_min(0.0)
        spread = var.sqrt()
        dead = spread <= 1e-6 * mean.abs().clamp_min(1.0)  # a constant channel: any unit works
        return mean.float(), torch.where(dead, torch.ones_like(spread), spread).float()


def _constant(value: ir.Value | None, what: str) -> Tensor:
    if value is None or value.const_value is None:
        raise ModelError(f"{what} is not a constant; cannot adapt")
    return torch.from_numpy(np.array(value.const_value.numpy(), dtype=np.float32))


def adapt_onnx(
    path: str | Path,
    example: Tensor,
    calibration: Tensor | None = None,
    allow_graph_logic: bool = False,
) -> BnaModel:
    """f from its ONNX file, as a differentiable module with a :class:`BnaNorm` at every site of
    :func:`~bna_export.interp.bn_sites`. A BatchNormalization node keeps its own
    statistics; a Conv/Gemm output is measured on ``calibration`` (clean images; ``example``
    when None). A graph the audit (:mod:`bna_export.audit`) does not find clean is refused
    unless ``allow_graph_logic``; the result's ``audit`` holds what it found."""
    model = ir.from_proto(load_proto(path))
    found = audit_model(model)
    require_clean(found, path, allow_graph_logic)
    ops = {node.op_type for node in model.graph}
    if ops & _OTHER_NORM_ONNX and "BatchNormalization" not in ops:
        raise ModelError(OTHER_NORMS)  # a Conv/Gemm site would carry no BN statistic
    sites = bn_sites(model.graph)
    measured = [v.name for v in sites if v.producer().op_type != "BatchNormalization"]
    stats: dict[str, tuple[Tensor, Tensor]] = {}
    if measured:
        moments = {name: _Moments() for name in measured}
        probe = OnnxModule(model, moments)
        x = example if calibration is None else calibration
        with torch.no_grad():
            for start in range(0, len(x), 256):
                probe(x[start : start + 256].float())
        stats = {name: m.statistics() for name, m in moments.items()}
        del probe
    layers: dict[str, BnaNorm] = {}
    for v in sites:
        node = v.producer()
        if v.name in stats:
            mean, spread = stats[v.name]
            bn = BnaNorm(mean, spread**2, spread, mean, 0.0, v.name, measured=True)
        else:
            what = f"BatchNormalization {node.name or v.name}"
            scale, bias, mean, var = (_constant(node.inputs[i], what) for i in range(1, 5))
            eps = node.attributes.get("epsilon")
            bn = BnaNorm(mean, var, scale, bias, 1e-5 if eps is None else eps.as_float(), v.name)
        layers[v.name] = bn
    net = OnnxModule(model, layers)
    adapted = _finish(net, list(layers.values()), example, source="onnx")
    adapted.audit = found
    return adapted


def load_model_for(
    spec: str,
    weights: str | Path | None,
    data: Dataset,
    device: torch.device | str = "cpu",
    allow_graph_logic: bool = False,
) -> BnaModel:
    """:func:`load_model` with the first images of ``data`` as the example and all of them
    to measure an ONNX model's Conv/Gemm outputs."""
    x = torch.from_numpy(data.x)
    return load_model(spec, weights, x[:2], x, device, allow_graph_logic)


def load_model(
    spec: str,
    weights: str | Path | None,
    example: Tensor,
    calibration: Tensor | None = None,
    device: torch.device | str = "cpu",
    allow_graph_logic: bool = False,
) -> BnaModel:
    """Load a classifier from a ``.pt2`` file, an ``.onnx`` file, or ``package.module:callable``
    (+ ``weights``), on ``device``. An ``.onnx`` with graph logic (:mod:`bna_export.audit`) is
    refused unless ``allow_graph_logic``.

    ``example`` is one input batch used to order layers and check that the model runs;
    ``calibration`` (clean images) measures the channels of an ONNX model's Conv/Gemm outputs.
    Nothing is unpickled: a ``.pt2`` is checked first (:mod:`bna_export.pt2file`), ONNX is
    protobuf (external data only from the model's folder), weights load with
    ``torch.load(weights_only=True)``.
    """
    dev = torch.device(device)
    model = _load(spec, weights, example, calibration, dev, allow_graph_logic).to(device)
    model.sha256 = _file_sha256(spec, weights)
    return model


def _file_sha256(spec: str, weights: str | Path | None) -> str | None:
    """The SHA-256 of what was loaded: an .onnx as deployed (:func:`model_sha256`), a .pt2's
    bytes, a module's weights file; None for a module without one."""
    if spec.endswith(".onnx"):
        return model_sha256(spec)
    path = Path(spec) if spec.endswith(".pt2") else None if weights is None else Path(weights)
    if path is None:
        return None
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load(
    spec: str,
    weights: str | Path | None,
    example: Tensor,
    calibration: Tensor | None,
    device: torch.device,
    allow_graph_logic: bool,
) -> BnaModel:
    path = Path(spec)
    if spec.endswith(".pt2"):
        if not path.is_file():
            raise ModelError(f"model file {spec} does not exist")
        gm = load_module(path, spec, device)  # checked: nothing in it is unpickled unsafely
        return adapt_graph_module(gm, example.to(device))
    if spec.endswith(".onnx"):
        if weights is not None:
            raise ModelError("an .onnx model holds its weights: drop --weights")
        return adapt_onnx(path, example, calibration, allow_graph_logic)
    if ":" not in spec:
        raise ModelError(f"model {spec!r}: expected a .pt2 file or package.module:callable")
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import {spec}: {exc}") from exc
    net = factory()
    if not isinstance(net, nn.Module):
        raise ModelError(f"{spec} returned {type(net).__name__}, expected a torch.nn.Module")
    if weights is not None:
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise ModelError(f"weights file {weights} does not exist") from exc
        except Exception as exc:
            raise ModelError(
                f"{weights} is not a plain state dict "
                f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from exc
        if not isinstance(state, dict):
            raise ModelError(f"{weights} holds {type(state).__name__}, expected a state dict")
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(f"{weights} does not fit {spec}: {str(exc).splitlines()[0]}") from exc
    return adapt_module(net, example)
