"""The keep-t term of the Θ fit: g_t's logits on clean images of t (plain or with t's
triggers), and the term's weight per target, fixed or following g_t's flags on them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .norm import BnaModel
from .settings import FitSettings
from .variants import Variants, jitter


def keep_target_logits(
    model: BnaModel,
    thetas: list[Tensor],
    x_all: Tensor,
    variants: Variants,
    tgt: Sequence[np.ndarray],
    which: Tensor,
    per_target: int,
    rng: np.random.Generator,
    settings: FitSettings,
) -> tuple[Tensor, Tensor]:
    """g_t's logits on ``per_target`` of each target t's kept clean images, each plain or with
    one of t's estimated triggers (``which`` indexes each target's (image, variant) pairs,
    image-major), shifted by up to ``settings.jitter`` pixels; and the images' own classes."""
    n_keep = torch.tensor([len(k) for k in variants.keep])
    route = torch.arange(len(tgt)).repeat_interleave(per_target)
    image = which // n_keep[route]
    width = max(len(k) for k in variants.keep)
    keep = torch.tensor([list(k) + [0] * (width - len(k)) for k in variants.keep])
    var = keep[route, which % n_keep[route]]
    size = max(len(t) for t in tgt)
    pools = torch.tensor(np.stack([np.pad(t, (0, size - len(t))) for t in tgt]))
    dev = x_all.device
    sel = pools[route, image].to(dev)
    x = variants.apply(x_all[sel], var.to(dev))
    with model.mitigated(thetas, route.to(dev)):
        return model(jitter(x, settings.jitter, rng)), sel


def keep_budgets(
    settings: FitSettings,
    targets: Sequence[int],
    sources: dict[int, Sequence[int]],
    keep: dict[int, Sequence[int]] | None = None,
) -> tuple[list[float], list[float], list[float]]:
    """Each target's flag budget of the adaptive keep-t weight and the least and most weight it
    may take: ``fit.single_source_budget`` for a target with one source and no shared keep
    group (when set), whose weight only grows (none of 20 images flagged is no licence to
    weaken the term: free to fall, it cost the small digits ResNet's seed-1 warp row 1.2 more
    points of accuracy; README, one-source targets), up to ``fit.single_source_range`` times
    the set weight; else ``fit.target_flag_budget``, within 1/r and r times it (r:
    ``fit.target_weight_range``)."""
    one, w0, r = (
        settings.single_source_budget,
        settings.target_ce_weight,
        settings.target_weight_range,
    )
    single = [one > 0 and len(sources[t]) == 1 and not (keep and t in keep) for t in targets]
    budgets = [one if x else settings.target_flag_budget for x in single]
    floors = [w0 if x else w0 / r for x in single]
    ceilings = [w0 * (settings.single_source_range if x else r) for x in single]
    return budgets, floors, ceilings


class KeepWeight:
    """The weight of the keep-t term per target: ``fit.target_ce_weight``; with
    ``fit.target_flag_budget``, after every step it is multiplied by ``fit.target_weight_step``
    while more than that share of t's clean images (those f answers t for, as routing would) are
    flagged by g_t, and divided by it otherwise, within [1/r, r]× the start (r:
    ``fit.target_weight_range``): Neural Cleanse's adaptive λ, applied to the false flags the
    defender can see, an image counting as flagged while g_t's margin for its class is below
    ``fit.keep_margin``. ``budgets``, ``floors``, ``ceilings``: each target's own budget, least
    and most weight (default: the settings')."""

    def __init__(
        self,
        model: BnaModel,
        data: Dataset,
        kept: Sequence[Sequence[int]],
        settings: FitSettings,
        budgets: Sequence[float] | None = None,
        floors: Sequence[float] | None = None,
        ceilings: Sequence[float] | None = None,
    ) -> None:
        dev, n_t = model.device, len(kept)
        self.settings = settings
        self.weight = torch.full((n_t,), float(settings.target_ce_weight), device=dev)
        self.budget = torch.tensor(
            [settings.target_flag_budget] * n_t if budgets is None else list(budgets),
            dtype=torch.float32,
            device=dev,
        )
        w0, r = settings.target_ce_weight, settings.target_weight_range
        least = [w0 / r] * n_t if floors is None else list(floors)
        self.floor = torch.tensor(least, dtype=torch.float32, device=dev)
        most = [w0 * r] * n_t if ceilings is None else list(ceilings)
        self.ceiling = torch.tensor(most, dtype=torch.float32, device=dev)
        self.adaptive = bool((self.budget > 0).any()) and settings.target_ce_weight > 0
        # share of routed clean t images flagged, or kept by less than fit.keep_margin
        self.flagged = torch.zeros(n_t, device=dev)
        if not self.adaptive:
            return
        idx = [data.of_classes(list(k)) for k in kept]
        x = torch.from_numpy(data.x[np.concatenate(idx)]).to(dev)
        route = torch.arange(n_t, device=dev).repeat_interleave(
            torch.tensor([len(i) for i in idx], device=dev)
        )
        label = torch.from_numpy(data.y[np.concatenate(idx)]).to(dev)
        with torch.no_grad():
            routed = model(x).argmax(1) == label
        self.x, self.route, self.label = x[routed], route[routed], label[routed]
        ones = torch.ones_like(self.route, dtype=torch.float32)
        self.n = torch.zeros_like(self.weight).index_add_(0, self.route, ones).clamp_min(1)
        self.adaptive = bool(routed.any())

    def update(self, model: BnaModel, thetas: list[Tensor]) -> None:
        """One step of the rule, with g_t's current Θ (call under ``torch.no_grad``)."""
        s = self.settings
        if not self.adaptive:
            return
        with model.mitigated(thetas, self.route):
            logits = model(self.x)
        own = logits.gather(1, self.label[:, None])[:, 0]
        others = logits.scatter(1, self.label[:, None], float("-inf")).amax(1)
        flag = (own - others < s.keep_margin).float()
        self.flagged = torch.zeros_like(self.weight).index_add_(0, self.route, flag) / self.n
        step = torch.where(
            self.flagged > self.budget, s.target_weight_step, 1 / s.target_weight_step
        )
        step = torch.where(self.budget > 0, step, 1.0)  # a budget of 0: a fixed weight
        self.weight = torch.minimum(torch.maximum(self.weight * step, self.floor), self.ceiling)
