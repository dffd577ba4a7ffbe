"""How the Θ fit shows images: the clean image or one of a target's estimated triggers embedded
(a *variant*, every family's variants stacked so a batch embeds each family in one op), drawn
per target in a fresh random order each pass, and shifted by a few pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .families import FAMILIES
from .reverse import TriggerEstimate
from .settings import FitSettings


def jitter(x: Tensor, pixels: int, rng: np.random.Generator) -> Tensor:
    """Shift each image by up to ``pixels`` in each direction (edge-replicated): augmentation
    so the few clean target images generalise. x: (N, C, H, W)."""
    if pixels <= 0:
        return x
    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (pixels,) * 4, mode="replicate")
    dy = torch.from_numpy(rng.integers(0, 2 * pixels + 1, n)).to(x.device)
    dx = torch.from_numpy(rng.integers(0, 2 * pixels + 1, n)).to(x.device)
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = (dy[:, None] + ar_h[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pixels)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + ar_w[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


class Variants:
    """Every way an image is shown to the fit, stacked per trigger family so that a batch
    embeds each family's variants in one op. Variant 0 is the clean image; then each estimate
    of each target at each scale (:meth:`~bna_export.families.Family.scaled`)."""

    def __init__(
        self,
        targets: Sequence[int],
        triggers: dict[int, Sequence[TriggerEstimate]],
        settings: FitSettings,
        input_range: tuple[float, float],
    ) -> None:
        self.lo, self.hi = input_range
        self.family: list[str | None] = [None]  # per variant
        self.row: list[int] = [0]  # per variant: its row in its family's stacked tensors
        stacks: dict[str, dict[str, list[Tensor]]] = {}
        index: dict[tuple[int, float], int] = {}

        def variant(est: TriggerEstimate, scale: float) -> int:
            key = (id(est), scale)
            if key not in index:
                index[key] = len(self.family)
                trig = est.kind.scaled(est.tensors(), scale, settings)
                rows = stacks.setdefault(est.family, {k: [] for k in trig})
                self.family.append(est.family)
                self.row.append(len(next(iter(rows.values()))))
                for k, v in trig.items():
                    rows[k].append(v[0].float())
            return index[key]

        self.triggered = [
            [variant(e, s) for e in triggers[t] for s in settings.trigger_scales] for t in targets
        ]
        self.keep = [
            [0] + ([variant(e, 1.0) for e in triggers[t]] if settings.target_triggered else [])
            for t in targets
        ]
        self.names = sorted(stacks)
        self.params = {f: {k: torch.stack(v) for k, v in r.items()} for f, r in stacks.items()}
        self.code = torch.tensor([-1 if f is None else self.names.index(f) for f in self.family])
        self.rows = torch.tensor(self.row)

    def to(self, device: torch.device) -> Variants:
        self.params = {f: {k: t.to(device) for k, t in r.items()} for f, r in self.params.items()}
        self.code, self.rows = self.code.to(device), self.rows.to(device)
        return self

    def apply(self, x: Tensor, which: Tensor) -> Tensor:
        """x: (N, C, H, W) with variant ``which`` [N] embedded."""
        out = x.clone()
        code = self.code[which]
        for fi, name in enumerate(self.names):
            at = torch.nonzero(code == fi).flatten()
            if not at.numel():
                continue
            r = self.rows[which[at]]
            trig = {k: t[r] for k, t in self.params[name].items()}
            out[at] = FAMILIES[name].embed(trig, x[at][:, None], self.lo, self.hi)[:, 0]
        return out


def draws(
    pools: Sequence[np.ndarray],
    choices: Sequence[Sequence[int]],
    length: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass: per target (row), its pool of images in a fresh random order, each with a
    random one of its ``choices``, cycled to ``length``. Returns images and variants (T, L)."""
    sizes = np.array([len(p) for p in pools])
    keys = rng.random((len(pools), int(sizes.max())))
    keys[np.arange(keys.shape[1])[None, :] >= sizes[:, None]] = np.inf
    order = np.argsort(keys, axis=1, kind="stable")
    pos = order[np.arange(len(pools))[:, None], np.arange(length)[None, :] % sizes[:, None]]
    width = max(len(c) for c in choices)
    table = np.array([list(c) + [c[0]] * (width - len(c)) for c in choices])
    n_choice = np.array([len(c) for c in choices])
    pick = np.floor(rng.random((len(pools), length)) * n_choice[:, None]).astype(np.int64)
    padded = np.array([np.pad(p, (0, int(sizes.max()) - len(p))) for p in pools])
    rows = np.arange(len(pools))[:, None]
    return padded[rows, pos], table[rows, pick]
