"""Loading classifiers (``.pt2`` or ``package.module:callable`` + state dict) and swapping each
BatchNorm's normalisation for the per-channel transform h(z | θ) = max(min((z - µ)/σ, ω), υ).

Every BatchNorm becomes a :class:`BnaNorm` that computes f's own normalisation for samples routed
to -1 and h(· | θ_t) followed by the BN's affine γ·h + β for samples routed to target index t.
Nothing of f's trained parameters changes; Θ lives outside the model and is passed in.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ModelError

log = logging.getLogger(__name__)

_BN_OPS = {
    "aten.batch_norm.default",
    "aten._native_batch_norm_legit_no_training.default",
    "aten.native_batch_norm.default",
    "aten._native_batch_norm_legit.default",
}


class BnaNorm(nn.Module):
    """One BatchNorm of f with optional per-sample replacement of its normalisation.

    Buffers hold f's running mean/var and affine γ, β (shape [C]). ``theta`` is None (plain f) or
    [T, 4, C] holding (µ, σ, υ, ω) per target; ``route`` is None or [N] int64 with -1 for f.
    ``capture`` (a list or None) receives this layer's output when set.
    """

    def __init__(
        self,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        name: str,
    ) -> None:
        super().__init__()
        c = mean.shape[0]
        self.register_buffer("running_mean", mean.detach().clone().float())
        self.register_buffer("running_var", var.detach().clone().float())
        w = torch.ones(c) if weight is None else weight.detach().clone().float()
        b = torch.zeros(c) if bias is None else bias.detach().clone().float()
        self.register_buffer("weight", w)
        self.register_buffer("bias", b)
        self.eps = float(eps)
        self.name = name
        self.theta: Tensor | None = None
        self.route: Tensor | None = None
        self.capture_in: list[Tensor] | None = None
        self.capture_out: list[Tensor] | None = None

    @property
    def channels(self) -> int:
        return int(self.running_mean.shape[0])

    def f_theta(self) -> Tensor:
        """f's own normalisation as θ: µ = mean, σ = sqrt(var + eps), υ = -inf, ω = +inf. [4, C]"""
        inf = torch.full_like(self.running_mean, float("inf"))
        sigma = torch.sqrt(self.running_var + self.eps)
        return torch.stack([self.running_mean, sigma, -inf, inf])

    def forward(self, z: Tensor) -> Tensor:
        if self.capture_in is not None:
            self.capture_in.append(z)
        if self.theta is None or self.route is None:
            out = nn.functional.batch_norm(
                z, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        else:
            full = torch.cat([self.theta, self.f_theta()[None]], 0)  # (T + 1, 4, C)
            idx = torch.where(self.route < 0, self.theta.shape[0], self.route)
            th = full[idx]  # (N, 4, C)
            shape = (z.shape[0], z.shape[1]) + (1,) * (z.dim() - 2)
            mu, sigma, lo, hi = (th[:, i].reshape(shape) for i in range(4))
            h = torch.maximum(torch.minimum((z - mu) / sigma, hi), lo)
            cshape = (1, z.shape[1]) + (1,) * (z.dim() - 2)
            out = h * self.weight.reshape(cshape) + self.bias.reshape(cshape)
        if self.capture_out is not None:
            self.capture_out.append(out)
        return out


class BnaModel(nn.Module):
    """f with every BatchNorm as a :class:`BnaNorm`, in execution order."""

    def __init__(self, net: nn.Module, layers: Sequence[BnaNorm]) -> None:
        super().__init__()
        self.net = net
        self.layers = list(layers)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> BnaModel:
        """Always eval: BNA never trains f (exported programs refuse .train()/.eval())."""
        self.training = False
        with contextlib.suppress(NotImplementedError):
            self.net.train(False)
        return self

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out

    @contextlib.contextmanager
    def mitigated(self, thetas: Sequence[Tensor], route: Tensor) -> Iterator[None]:
        """Run g: per layer θ [T, 4, C], per sample ``route`` [N] (-1 = f's own BN)."""
        if len(thetas) != len(self.layers):
            raise ModelError(f"{len(thetas)} θ tensors for {len(self.layers)} BatchNorm layers")
        try:
            for layer, th in zip(self.layers, thetas, strict=True):
                layer.theta, layer.route = th, route
            yield
        finally:
            for layer in self.layers:
                layer.theta, layer.route = None, None

    @contextlib.contextmanager
    def capturing(self, inputs: bool = False) -> Iterator[list[list[Tensor]]]:
        """Collect every layer's output (or input, pre-normalisation) during the block."""
        lists: list[list[Tensor]] = [[] for _ in self.layers]
        try:
            for layer, buf in zip(self.layers, lists, strict=True):
                if inputs:
                    layer.capture_in = buf
                else:
                    layer.capture_out = buf
            yield lists
        finally:
            for layer in self.layers:
                layer.capture_in = layer.capture_out = None


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
    """A copy of an eager module with every ``nn.BatchNorm*`` replaced by a :class:`BnaNorm`."""
    net = copy.deepcopy(net).eval()
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
    return _finish(net, layers, example)


def _finish(net: nn.Module, layers: list[BnaNorm], example: Tensor) -> BnaModel:
    if not layers:
        raise ModelError("the model has no BatchNorm layer; BNA corrects BatchNorm statistics")
    try:
        ordered = _execution_order(net, layers, example)
    except Exception as exc:  # the model itself failed on a well-formed input
        raise ModelError(
            f"the model failed on an input of shape {tuple(example.shape)}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    return BnaModel(net, ordered)


def _getattr_path(root: nn.Module, target: str) -> Tensor:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
    graph.eliminate_dead_code()
    for node in list(graph.nodes):  # guards pin the traced input shape; BNA runs other batches
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            graph.erase_node(node)
    gm.recompile()
    return _finish(gm, layers, example)


def load_model(spec: str, weights: str | Path | None, example: Tensor) -> BnaModel:
    """Load a classifier from a ``.pt2`` file or ``package.module:callable`` (+ ``weights``).

    ``example`` is one input batch used to order layers and check that the model runs.
    Nothing is unpickled: ``torch.export.load`` and ``torch.load(weights_only=True)`` only.
    """
    path = Path(spec)
    if spec.endswith(".pt2"):
        if not path.is_file():
            raise ModelError(f"model file {spec} does not exist")
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:
            raise ModelError(
                f"{spec} is not a readable torch.export archive ({type(exc).__name__})"
            ) from exc
        gm = ep.module()
        return adapt_graph_module(gm, example)
    if spec.endswith(".onnx"):
        raise ModelError(
            "fitting from an .onnx model is not supported yet; pass the .pt2 "
            "or package.module:callable with --weights"
        )
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
