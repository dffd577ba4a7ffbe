"""Trigger families: how a reverse-engineered trigger is parametrised, embedded into images,
sized and optimised. A new family is one class added to :data:`FAMILIES`.

Every family holds its trigger as a few named tensors (its ``keys``), stacked over problems
(leading dimension P), and maps raw, unconstrained solver parameters to them (``decode``) and
back (``encode``, for warm starts). ``embed`` puts the triggers into images x: (P, B, C, H, W),
each problem's trigger into its own B images. ``size`` is the family's detection statistic
(its reciprocal is scored). ``rule`` names the solver's update (:mod:`bna_export.reverse`):

- ``penalised`` (Neural Cleanse): Adam on CE(f(x'), t) + λ·size with the adaptive λ, which is 0
  until the trigger first succeeds; the solver keeps the smallest successful trigger;
- ``grow`` (Xiang et al. 2020): from near zero, normalised steps down the gradient of the
  cross-entropy, stopping at the first success: the size of the shortest path to the target.

Families, from sparse to whole-image to geometric:

- ``patch``: x' = (1 − m)·x + m·p, mask m [1, H, W], pattern p [C, H, W]; size ‖m‖₁ (pixels).
- ``perturbation``: x' = clip(x + v, lo, hi), v [C, H, W]; size ‖v‖₂.
- ``blend``: x' = (1 − α)·x + α·p over the whole image, α [1], p [C, H, W]; size α. Every
  pixel may move by at most α·(hi − lo): a universal perturbation bounded in L∞ rather than
  L₀ or L₂, the shape of blended, SIG-like and chessboard triggers (a small change everywhere),
  which the sparse families model with a few strong pixels instead.
- ``warp``: x'(u) = x(u + φ(u)), a smooth flow φ bicubically upsampled from a k×k control grid
  of displacements in pixels, flow [2, k, k] (as WaNet builds its trigger); size: the root mean
  square displacement in pixels.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor
from torch.nn import functional

from .settings import FitSettings, ReverseSettings

Rule = Literal["penalised", "grow"]
Trigger = dict[str, Tensor]
_ATANH_LIMIT = 1 - 1e-6  # encode: keep atanh finite for a mask or pattern at its bound


def _unit(raw: Tensor) -> Tensor:
    """(tanh + 1) / 2: an unconstrained tensor into [0, 1]."""
    return (torch.tanh(raw) + 1) / 2


def _ununit(value: Tensor) -> Tensor:
    """The inverse of :func:`_unit` (values at 0 or 1 map to a large finite raw value)."""
    return torch.atanh((2 * value - 1).clamp(-_ATANH_LIMIT, _ATANH_LIMIT))


def _lead(t: Tensor) -> Tensor:
    """A per-problem tensor (P, *s) as (P, 1, *s) to broadcast against x: (P, B, ...)."""
    return t.unsqueeze(1)


class Family:
    """The interface; see the module docstring."""

    name: ClassVar[str]
    rule: ClassVar[Rule]
    keys: ClassVar[tuple[str, ...]]

    def start(
        self, gen: torch.Generator, shape: tuple[int, int, int], span: float, init: float
    ) -> Trigger:
        """Raw parameters of one problem (no leading dimension), drawn from its generator;
        ``span`` = hi − lo, ``init`` the settings' perturbation_init (a share of the span)."""
        raise NotImplementedError

    def decode(self, raw: Trigger, lo: float, hi: float) -> Trigger:
        """Raw parameters (P, ...) to the trigger (P, ...)."""
        raise NotImplementedError

    def encode(self, trigger: Trigger, lo: float, hi: float) -> Trigger:
        """The raw parameters that decode to ``trigger`` (a warm start)."""
        raise NotImplementedError

    def embed(self, trigger: Trigger, x: Tensor, lo: float, hi: float) -> Tensor:
        """x: (P, B, C, H, W) with problem p's trigger in its B images; same shape."""
        raise NotImplementedError

    def size(self, trigger: Trigger) -> Tensor:
        """The size statistic of each trigger: (P,)."""
        raise NotImplementedError

    def penalty(self, trigger: Trigger, settings: ReverseSettings) -> Tensor:
        """``penalised`` families: what λ multiplies in the solver's loss, (P,). Default: the
        size."""
        return self.size(trigger)

    def scaled(
        self, trigger: Trigger, scale: float, settings: FitSettings | None = None
    ) -> Trigger:
        """A stronger (scale > 1) or weaker version of the trigger, for the Θ fit; ``settings``
        may bound how strong a copy gets (:attr:`FitSettings.blend_limit`)."""
        raise NotImplementedError

    def largest(self, shape: tuple[int, int, int], lo: float, hi: float) -> float:
        """The largest size a trigger of this family can have: makes families comparable."""
        raise NotImplementedError

    def step_length(self, settings: ReverseSettings, span: float) -> float:
        """``grow`` families: the length of one normalised step of the raw parameters."""
        raise NotImplementedError

    def bound(self, raw: Trigger, shape: tuple[int, int, int], span: float) -> Trigger:
        """``grow`` families: raw parameters kept in their valid range after a step."""
        return raw

    def limit(self, settings: ReverseSettings) -> float:
        """``grow`` families: the size past which a trigger that has not succeeded is given up
        (it is no longer a trigger of this family's kind)."""
        return math.inf

    def max_steps(self, settings: ReverseSettings) -> int:
        """The most steps a problem of this family takes (``penalised`` ones may stop earlier
        by the solver's stopping rule)."""
        return settings.steps


class _Mixture(Family):
    """x' = (1 − w)·x + w·p: a weight in [0, 1] (key ``weight``) and a pattern in [lo, hi], both
    through a sigmoid."""

    weight = ""

    def decode(self, raw, lo, hi):
        w = self.weight
        return {w: _unit(raw[w]), "pattern": lo + (hi - lo) * _unit(raw["pattern"])}

    def encode(self, trigger, lo, hi):
        w = self.weight
        return {
            w: _ununit(trigger[w]),
            "pattern": _ununit((trigger["pattern"] - lo) / (hi - lo)),
        }


class Patch(_Mixture):
    name, rule, keys, weight = "patch", "penalised", ("mask", "pattern"), "mask"

    def start(self, gen, shape, span, init):
        c, h, w = shape
        return {
            "mask": torch.randn((1, h, w), generator=gen) * 0.1 - 2.0,
            "pattern": torch.randn((c, h, w), generator=gen) * 0.1,
        }

    def embed(self, trigger, x, lo, hi):
        m, p = _lead(trigger["mask"]), _lead(trigger["pattern"])
        return (1 - m) * x + m * p

    def size(self, trigger):
        return trigger["mask"].flatten(1).sum(1)

    def scaled(self, trigger, scale, settings=None):
        reach = int((scale - 1) * settings.patch_widen + 1e-6) if settings is not None else 0
        mask, pattern = trigger["mask"], trigger["pattern"]
        big = reach > 0 and float(mask.sum()) >= settings.patch_grow_from
        if big and compactness(mask) >= settings.patch_compact:
            # grown by `reach` pixels, the pattern spread by its mask-weighted mean
            side = 2 * reach + 1
            near = functional.avg_pool2d(mask, side, 1, reach, count_include_pad=False)
            spread = functional.avg_pool2d(mask * pattern, side, 1, reach, count_include_pad=False)
            pattern = torch.where(mask > 0.5, pattern, spread / near.clamp_min(1e-6))
            mask = functional.max_pool2d(mask, side, 1, reach)
        return {"mask": torch.clamp(mask * scale, 0, 1), "pattern": pattern}

    def largest(self, shape, lo, hi):
        return float(shape[1] * shape[2])


def compactness(mask: Tensor) -> float:
    """The least share, over problems, of a patch mask's mass (P, 1, H, W) that lies in its
    densest square of side ⌈√size⌉ + 1: near 1 for a block of pixels, low for scattered ones."""
    size = mask.flatten(1).sum(1)
    side = min(math.ceil(math.sqrt(float(size.max()))) + 1, *mask.shape[-2:])
    dense = functional.avg_pool2d(mask, side, 1).flatten(1).amax(1) * side * side
    return float((dense / size.clamp_min(1e-12)).min())


class Perturbation(Family):
    name, rule, keys = "perturbation", "grow", ("pattern",)

    def start(self, gen, shape, span, init):
        return {"pattern": torch.randn(shape, generator=gen) * init * span}

    def decode(self, raw, lo, hi):
        return {"pattern": raw["pattern"]}

    def encode(self, trigger, lo, hi):
        return {"pattern": trigger["pattern"].clone()}

    def embed(self, trigger, x, lo, hi):
        return torch.clamp(x + _lead(trigger["pattern"]), lo, hi)

    def size(self, trigger):
        return trigger["pattern"].flatten(1).norm(dim=1)

    def scaled(self, trigger, scale, settings=None):
        return {"pattern": trigger["pattern"] * scale}

    def largest(self, shape, lo, hi):
        return (hi - lo) * math.sqrt(shape[0] * shape[1] * shape[2])

    def step_length(self, settings, span):
        return settings.perturbation_step * span

    def bound(self, raw, shape, span):
        return {"pattern": torch.clamp(raw["pattern"], -span, span)}


class Blend(_Mixture):
    name, rule, keys, weight = "blend", "penalised", ("alpha", "pattern"), "alpha"

    def start(self, gen, shape, span, init):
        return {
            "alpha": torch.randn((1,), generator=gen) * 0.1 - 2.0,
            "pattern": torch.randn(shape, generator=gen) * 0.1,
        }

    def embed(self, trigger, x, lo, hi):
        a = trigger["alpha"].view(-1, 1, 1, 1, 1)
        return (1 - a) * x + a * _lead(trigger["pattern"])

    def size(self, trigger):
        return trigger["alpha"][:, 0]

    def penalty(self, trigger, settings):
        # ``blend_pixels``: α over the whole image is the mass of a patch mask of α at every
        # pixel, α·H·W, on the patch family's λ scale
        h, w = trigger["pattern"].shape[-2:]
        return trigger["alpha"][:, 0] * (h * w if settings.blend_pixels else 1)

    def scaled(self, trigger, scale, settings=None):
        alpha = torch.clamp(trigger["alpha"] * scale, 0, 1)
        if settings is not None and scale > 1:  # stronger, but not past the limit
            own = trigger["alpha"]
            alpha = torch.minimum(alpha, torch.clamp(own, min=settings.blend_limit))
        return {**trigger, "alpha": alpha}

    def largest(self, shape, lo, hi):
        return 1.0

    def max_steps(self, settings):
        return min(settings.steps, settings.blend_steps)


class Warp(Family):
    """``grid``: the control grid's side k (WaNet's default 4)."""

    name, rule, keys = "warp", "grow", ("flow",)

    def __init__(self, grid: int = 4) -> None:
        self.grid = grid

    def start(self, gen, shape, span, init):
        return {"flow": torch.randn((2, self.grid, self.grid), generator=gen) * 0.01}

    def decode(self, raw, lo, hi):
        return {"flow": raw["flow"]}

    def encode(self, trigger, lo, hi):
        return {"flow": trigger["flow"].clone()}

    @staticmethod
    def field(flow: Tensor, h: int, w: int) -> Tensor:
        """Dense displacements (P, 2, H, W) in pixels (x, y) of control grids (P, 2, k, k)."""
        return torch.nn.functional.interpolate(
            flow, size=(h, w), mode="bicubic", align_corners=True
        )

    def embed(self, trigger, x, lo, hi):
        p, b, c, h, w = x.shape
        disp = self.field(trigger["flow"], h, w)  # (P, 2, H, W) pixels
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        # pixels to grid_sample's [-1, 1] units (align_corners: corners at ±1)
        unit = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], device=x.device)
        grid = torch.stack([gx, gy], -1)[None] + disp.permute(0, 2, 3, 1) * unit  # (P, H, W, 2)
        grid = grid.unsqueeze(1).expand(p, b, h, w, 2).reshape(p * b, h, w, 2)
        out = torch.nn.functional.grid_sample(
            x.reshape(p * b, c, h, w), grid, mode="bilinear", padding_mode="border",
            align_corners=True,
        )  # fmt: skip
        return torch.clamp(out.view(p, b, c, h, w), lo, hi)

    def size(self, trigger):
        flow = trigger["flow"]
        k = flow.shape[-1]
        disp = self.field(flow, 4 * k, 4 * k)  # the upsampled field's RMS, at a fixed resolution
        return disp.pow(2).sum(1).mean((1, 2)).sqrt()

    def scaled(self, trigger, scale, settings=None):
        return {"flow": trigger["flow"] * scale}

    def largest(self, shape, lo, hi):
        return float(max(shape[1], shape[2]))

    def step_length(self, settings, span):
        return settings.warp_step

    def limit(self, settings):
        return settings.warp_limit

    def max_steps(self, settings):
        return min(settings.steps, settings.warp_steps)

    def bound(self, raw, shape, span):
        reach = float(max(shape[1], shape[2]))
        return {"flow": torch.clamp(raw["flow"], -reach, reach)}


FAMILIES: dict[str, Family] = {f.name: f for f in (Patch(), Perturbation(), Blend(), Warp())}
"""Every trigger family by name."""
