"""The per-channel transform h(z | θ) = max(min((z − µ)/σ, ω), υ) that replaces a BatchNorm's
normalisation, and :class:`BnaNorm`, the module that applies f's own normalisation or h per
sample, and :class:`BnaModel`, f with every BatchNorm as a :class:`BnaNorm`: it runs f, or g
with Θ per sample (:meth:`BnaModel.mitigated`), and captures the BN outputs.

h runs once per BN channel of every image in every step of the Θ fit, so it is one autograd
node (:class:`_ClipNormalise`) with a hand-written backward: a chain of PyTorch ops
(subtract, divide, minimum, maximum, affine) kept about ten full-size temporaries alive and
ran about twenty passes over them in backward.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ModelError


class _ClipNormalise(torch.autograd.Function):
    """γ·max(min((z − µ)/σ, ω), υ) + β, differentiable in z, µ, σ, υ and ω (γ, β constant).

    µ, σ, υ, ω broadcast to z as (N, C, 1, …); γ, β as (1, C, 1, …). Where min and max tie, the
    gradient goes to the bound (a set of measure zero: PyTorch splits it)."""

    @staticmethod
    def forward(
        ctx: Any, z: Tensor, mu: Tensor, sigma: Tensor, lo: Tensor, hi: Tensor, g: Tensor, b: Tensor
    ) -> Tensor:
        t = (z - mu) / sigma
        below = torch.minimum(t, hi) < lo  # υ wins (also where υ > ω)
        above = (t > hi) & ~below  # ω wins
        ctx.save_for_backward(t, below, above, sigma, g)
        return torch.maximum(torch.minimum(t, hi), lo) * g + b

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        t, below, above, sigma, g = ctx.saved_tensors
        gy = grad * g
        dims = tuple(range(2, t.dim()))

        def reduce(v: Tensor) -> Tensor:
            return v.sum(dims, keepdim=True) if dims else v

        need = ctx.needs_input_grad
        g_lo = reduce(torch.where(below, gy, 0.0)) if need[3] else None
        g_hi = reduce(torch.where(above, gy, 0.0)) if need[4] else None
        gt = torch.where(below | above, 0.0, gy) / sigma
        g_mu = -reduce(gt) if need[1] else None
        g_sigma = -reduce(gt * t) if need[2] else None
        return (gt if need[0] else None), g_mu, g_sigma, g_lo, g_hi, None, None


def clip_normalise(
    z: Tensor, mu: Tensor, sigma: Tensor, lo: Tensor, hi: Tensor, weight: Tensor, bias: Tensor
) -> Tensor:
    """γ·h(z | µ, σ, υ, ω) + β, with µ, σ, υ, ω per sample and channel (N, C, 1, …)."""
    return _ClipNormalise.apply(z, mu, sigma, lo, hi, weight, bias)


class BnaNorm(nn.Module):
    """One BatchNorm of f with optional per-sample replacement of its normalisation.

    Buffers hold f's running mean/var and affine γ, β (shape [C]). ``theta`` is None (plain f) or
    [T, 4, C] holding (µ, σ, υ, ω) per target; ``route`` is None or [N] int64 with -1 for f.
    ``capture`` (a list or None) receives this layer's output when set. A ``measured`` layer
    stands for a BN that is not in the graph (folded into a Conv/Gemm, or none): its statistics
    are the channel's mean and spread on clean data (mean = bias = m, var = weight² = s², eps 0),
    and f (route -1, or no θ) passes its input through unchanged.
    """

    def __init__(
        self,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        name: str,
        measured: bool = False,
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
        self.measured = measured
        self.theta: Tensor | None = None
        self.route: Tensor | None = None
        self.capture_in: list[Tensor] | None = None
        self.capture_out: list[Tensor] | None = None
        self.versions_in: list[int] = []  # version counter of each capture when taken
        self.versions_out: list[int] = []

    @property
    def channels(self) -> int:
        return int(self.running_mean.shape[0])

    def f_theta(self) -> Tensor:
        """f's own normalisation as θ: µ = mean, σ = sqrt(var + eps), υ = -inf, ω = +inf. [4, C]"""
        inf = torch.full_like(self.running_mean, float("inf"))
        sigma = torch.sqrt(self.running_var + self.eps)
        return torch.stack([self.running_mean, sigma, -inf, inf])

    def set_statistics(self, mean: Tensor, spread: Tensor) -> None:
        """A measured layer's statistics: per-channel mean m and spread s (> 0)."""
        dev = self.running_mean.device
        self.running_mean = mean.detach().clone().float().to(dev)
        self.running_var = spread.detach().clone().float().to(dev) ** 2
        self.weight = spread.detach().clone().float().to(dev)
        self.bias = mean.detach().clone().float().to(dev)

    def _affine(self, z: Tensor) -> Tensor:
        """f's own (eval-mode) BatchNorm as one multiply-add, z·a + b with a = γ/√(var + ε) and
        b = β − mean·a per channel: the sweep differentiates f thousands of times, and PyTorch's
        batch-norm backward on the CPU took as long as the convolutions' (a fifth of a
        reverse-engineering step on the small digits ResNet, torch.profiler); this one's
        backward is a single multiply. Equal to ``batch_norm`` up to float rounding."""
        a = self.weight * torch.rsqrt(self.running_var + self.eps)
        b = self.bias - self.running_mean * a
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return torch.addcmul(b.view(shape), z, a.view(shape))

    def forward(self, z: Tensor) -> Tensor:
        if self.capture_in is not None:
            self.capture_in.append(z)
            self.versions_in.append(z._version)
        if self.theta is None or self.route is None:
            out = z if self.measured else self._affine(z)
        else:
            full = torch.cat([self.theta, self.f_theta()[None]], 0)  # (T + 1, 4, C)
            idx = torch.where(self.route < 0, self.theta.shape[0], self.route)
            # index_select, not full[idx]: the backward of advanced indexing on the CPU adds
            # into the gradient from several threads in any order (the fit was not reproducible
            # on MobileNetV2); index_select's backward (index_add) is deterministic there
            th = full.index_select(0, idx)  # (N, 4, C)
            shape = (z.shape[0], z.shape[1]) + (1,) * (z.dim() - 2)
            mu, sigma, lo, hi = (th[:, i].reshape(shape) for i in range(4))
            cshape = (1, z.shape[1]) + (1,) * (z.dim() - 2)
            out = clip_normalise(
                z, mu, sigma, lo, hi, self.weight.reshape(cshape), self.bias.reshape(cshape)
            )
            if self.measured and bool((self.route < 0).any()):
                keep = (self.route < 0).reshape((-1,) + (1,) * (z.dim() - 1))
                out = torch.where(keep, z, out)
        if self.capture_out is not None:
            self.capture_out.append(out)
            self.versions_out.append(out._version)
        return out


def same_logits(fast: Tensor | Sequence[Tensor], plain: Tensor | Sequence[Tensor]) -> bool:
    """Whether two runs of f agree: the same shape and logits within 1e-4 of the largest (the
    first output of a model that returns several)."""
    fast = fast[0] if isinstance(fast, (tuple, list)) else fast
    plain = plain[0] if isinstance(plain, (tuple, list)) else plain
    return fast.shape == plain.shape and bool(
        (fast - plain).abs().max() <= 1e-4 * plain.abs().max().clamp_min(1.0)
    )


class BnaModel(nn.Module):
    """f with every BatchNorm as a :class:`BnaNorm`, in execution order. ``alone`` (optional)
    is the same f with BatchNorms folded into the layers before them
    (:func:`bna_export.folded.fold_batchnorms`): the forward runs it whenever no layer has Θ
    or captures, as in every step of the trigger sweep."""

    def __init__(
        self,
        net: nn.Module,
        layers: Sequence[BnaNorm],
        source: str = "torch",
        alone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.alone = alone
        self.layers = list(layers)
        self.source = source  # "torch" (.pt2, module) or "onnx": how the layers were found
        self.channels_last = False  # see use_channels_last
        self.audit: Any = None  # an ONNX f's graph audit (bna_export.audit.Audit)
        self.sha256: str | None = None  # the model file's (bna_export.model.load_model)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.train(False)

    @property
    def device(self) -> torch.device:
        """Where f's tensors live (the device its first buffer or parameter is on)."""
        for t in itertools.chain(self.net.buffers(), self.net.parameters()):
            return t.device
        return torch.device("cpu")

    def train(self, mode: bool = True) -> BnaModel:
        """Always eval: BNA never trains f (exported programs refuse .train()/.eval())."""
        self.training = False
        with contextlib.suppress(NotImplementedError):
            self.net.train(False)
        return self

    def forward(self, x: Tensor) -> Tensor:
        # f gets its own copy: a model that normalises its input in place (x.sub_(mean), as
        # torchvision's Normalize(inplace=True) does) would otherwise rewrite our images, and
        # every later pass would see them normalised again
        last = self.channels_last and x.dim() == 4
        fmt = torch.channels_last if last else torch.contiguous_format
        busy = self.alone is None or any(
            la.theta is not None
            or la.capture_in is not None
            or la.capture_out is not None
            or la._forward_hooks
            or la._forward_pre_hooks
            for la in self.layers
        )  # a layer someone watches must run: the folded f has none
        out = (self.net if busy else self.alone)(x.clone(memory_format=fmt))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out

    def use_channels_last(self, example: Tensor, enable: bool = True) -> bool:
        """Run f in channels-last memory layout (oneDNN's and cuDNN's fast path for
        convolutions) when ``enable`` and f gives the same logits on ``example`` that way (to
        1e-4 of the largest); else keep the default layout. Returns whether it is on."""
        self.channels_last = False
        if not enable or example.dim() != 4:
            return False
        example = example.to(self.device)
        with torch.no_grad():
            plain = self(example)
            self._layout(torch.channels_last)
            self.channels_last = True
            try:
                same = same_logits(self(example), plain)
            except (RuntimeError, ModelError):  # e.g. a .view() that needs the default layout
                same = False
        if not same:
            self._layout(torch.contiguous_format)
            self.channels_last = False
        return self.channels_last

    def _layout(self, fmt: torch.memory_format) -> None:
        self.net.to(memory_format=fmt)
        if self.alone is not None:
            self.alone.to(memory_format=fmt)

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
        versions: list[list[int]] = [[] for _ in self.layers]
        try:
            for layer, buf, ver in zip(self.layers, lists, versions, strict=True):
                if inputs:
                    layer.capture_in, layer.versions_in = buf, ver
                else:
                    layer.capture_out, layer.versions_out = buf, ver
            yield lists
        finally:
            for layer in self.layers:
                if inputs:
                    layer.capture_in = None
                else:
                    layer.capture_out = None
        for layer, buf, ver in zip(self.layers, lists, versions, strict=True):
            if [t._version for t in buf] != ver:
                raise ModelError(
                    f"the model changes the output of BatchNorm {layer.name} in place (an "
                    "in-place operation such as F.relu(x, inplace=True) in its forward): BNA "
                    "needs it unchanged; use the out-of-place form"
                )
