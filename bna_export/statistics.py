"""What the Θ fit needs to know of f on the clean images, streamed in passes of bounded size: the
clip start of every BN channel, every target's histogram bins and p, and the spatial subsampling
that bounds how many samples of one channel a histogram sees.

A conv channel's distribution is that of all its spatial positions over the images. A uniform
subsample of those (image, position) samples, drawn independently of their values, gives an
unbiased estimate of the histogram, so the cost of a histogram can follow the number of channels
and bins instead of the number of pixels. All layers' histograms share one table: layer l,
target index t, channel c is row ``offset[l] + t·C_l + c``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .histogram import bin_layout, normalise, soft_histogram
from .norm import BnaModel
from .settings import FitSettings, HistogramSettings


@dataclass
class Table:
    """The rows of every layer's histograms: ``lo`` [R] first edge, ``nbins`` [R] bin count,
    ``p`` [R, max bins] the clean probabilities (layer-major, then target, then channel)."""

    channels: list[int]
    n_targets: int
    lo: Tensor
    nbins: Tensor
    p: Tensor

    @property
    def offset(self) -> list[int]:
        sizes = [self.n_targets * c for c in self.channels]
        return [int(v) for v in np.concatenate([[0], np.cumsum(sizes)[:-1]])]


@dataclass
class CleanStatistics:
    """Per layer, the clip start (clean min and max of the normalised BN input, [C] each) and
    the histogram table of the BN outputs on each target's clean source images."""

    clip_lo: list[Tensor]
    clip_hi: list[Tensor]
    table: Table


def _spatial(a: Tensor) -> Tensor:
    """(N, C, *S) -> (N, C, S)."""
    return a.reshape(a.shape[0], a.shape[1], -1)


def sample_blocks(a: Tensor, blocks: int, per_channel: int, generator: torch.Generator) -> Tensor:
    """Up to ``per_channel`` samples of every channel from each of ``blocks`` equal, contiguous
    groups of images of a: (N, C, *S). Within a group the (image, position) pairs are drawn
    uniformly without replacement, the same pairs for every channel; a group with fewer pairs
    gives all of them. Returns (blocks, M, C)."""
    n, c = a.shape[:2]
    flat = _spatial(a)
    size = flat.shape[2]
    per_block = (n // blocks) * size
    if per_block <= per_channel:
        return flat.permute(0, 2, 1).reshape(blocks, per_block, c)
    keys = torch.rand((blocks, per_block), generator=generator)
    pick = keys.topk(per_channel, dim=1, sorted=False).indices.to(a.device)
    pick = pick + torch.arange(blocks, device=a.device)[:, None] * per_block  # (G, M)
    return flat[pick // size, :, pick % size]  # (G, M, C)


def _positions(size: int, keep: int, generator: torch.Generator) -> Tensor | None:
    """``keep`` of ``size`` spatial positions, uniformly without replacement (None: all)."""
    if keep >= size:
        return None
    return torch.rand(size, generator=generator).topk(keep, sorted=False).indices


def clean_statistics(
    model: BnaModel,
    data: Dataset,
    sources: Sequence[Sequence[int]],
    settings: FitSettings = FitSettings(),
    hist: HistogramSettings = HistogramSettings(),
    generator: torch.Generator | None = None,
) -> CleanStatistics:
    """Two streamed passes over the clean images (``settings.images_per_pass`` at a time):
    min/max of every channel's input and output (exact, every position), then the soft
    histogram p of each target's source images, from at most ``clean_samples_per_channel``
    samples per channel and target (positions drawn uniformly per pass)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = model.device
    n_t, layers = len(sources), model.layers
    channels = [la.channels for la in layers]
    n_classes = 1 + max([int(data.y.max()), *(c for s in sources for c in s)])
    member = torch.zeros((n_t, n_classes), dtype=torch.bool)
    for ti, src in enumerate(sources):
        member[ti, list(src)] = True
    mem = member.to(device)
    x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
    inf = float("inf")
    in_lo = [torch.full((c,), inf, device=device) for c in channels]
    in_hi = [torch.full((c,), -inf, device=device) for c in channels]
    out_lo = [torch.full((n_t, c), inf, device=device) for c in channels]
    out_hi = [torch.full((n_t, c), -inf, device=device) for c in channels]
    base = [la.f_theta().to(device) for la in layers]
    with torch.no_grad():  # pass 1, every clean image: exact minima and maxima
        for chunk in torch.split(torch.arange(len(data)), settings.images_per_pass):
            xb, yb = x_all[chunk].to(device), y_all[chunk].to(device)
            with model.capturing(inputs=True) as cin, model.capturing() as cout:
                model(xb)
            pick = mem[:, yb, None]  # (T, n, 1): image n is a source of target t
            for li, (z, a) in enumerate(zip(cin, cout, strict=True)):
                zn = (_spatial(z[0]) - base[li][0][None, :, None]) / base[li][1][None, :, None]
                in_lo[li] = torch.minimum(in_lo[li], zn.amin((0, 2)))
                in_hi[li] = torch.maximum(in_hi[li], zn.amax((0, 2)))
                flat = _spatial(a[0])
                lo_t = torch.where(pick, flat.amin(2)[None], inf).amin(1)  # (T, C)
                hi_t = torch.where(pick, flat.amax(2)[None], -inf).amax(1)
                out_lo[li] = torch.minimum(out_lo[li], lo_t)
                out_hi[li] = torch.maximum(out_hi[li], hi_t)
    lo = torch.cat([o.reshape(-1) for o in out_lo])
    nbins = bin_layout(lo, torch.cat([o.reshape(-1) for o in out_hi]), hist.bin_width)
    table = Table(channels, n_t, lo, nbins, torch.zeros((0, 0)))
    offset, width = table.offset, int(nbins.max()) if len(nbins) else 1
    counts = torch.zeros((lo.shape[0], width), device=device)
    totals = torch.zeros(lo.shape[0], device=device)
    used = torch.nonzero(member.any(0)[y_all]).flatten()
    n_src = max(1, int(member[:, y_all].sum(1).max())) if n_t else 1
    keep = max(1, -(-settings.clean_samples_per_channel // n_src))  # positions per image
    with torch.no_grad():  # pass 2, the sources' images: p, from a bounded subsample
        for chunk in torch.split(used, settings.images_per_pass):
            xb, yb = x_all[chunk].to(device), y_all[chunk].to(device)
            with model.capturing() as cout:
                model(xb)
            ti, img = torch.nonzero(mem[:, yb], as_tuple=True)  # (P,) (target, image) pairs
            values, rows = [], []
            for li, a in enumerate(cout):
                flat = _spatial(a[0])
                pos = _positions(flat.shape[2], keep, gen)
                if pos is not None:
                    flat = flat[:, :, pos.to(device)]
                c, s = flat.shape[1], flat.shape[2]
                r = offset[li] + ti[:, None, None] * c + torch.arange(c, device=device)[:, None]
                values.append(flat[img].reshape(-1))  # (P, C, s)
                rows.append(r.expand(-1, -1, s).reshape(-1))
            vals, rws = torch.cat(values), torch.cat(rows)
            counts += soft_histogram(vals, rws, lo, nbins, hist)
            totals += torch.bincount(rws, minlength=lo.shape[0]).to(totals.dtype)
    table.p = normalise(counts, totals)
    return CleanStatistics(in_lo, in_hi, table)
