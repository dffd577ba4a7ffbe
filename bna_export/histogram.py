"""Differentiable (sigmoid-soft) histograms of neuron activations and the divergences between them.

Bins follow the paper (Eq. 5-6): for a row (one neuron) with clean minimum ``lo`` and ``M`` bins
of width Δb, the edges are ``b_k = lo + k·Δb`` for k = 1 … M-1; bin 0 is (-∞, b_1) and bin M-1 is
[b_{M-1}, ∞). With ``S_k(z) = sigmoid(τ (z - b_k))``, ``S_0 = 1`` and ``S_M = 0``, the soft mass of
z in bin k is ``S_k(z) - S_{k+1}(z)``; the masses of one sample telescope to exactly 1.

Since τ·Δb = 15, a sample's mass outside the few bins next to its own is below σ(-15·w), so
:func:`soft_histogram` only visits a window of ``2w + 1`` bins per sample: O(samples · window).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .settings import Divergence, HistogramSettings


def bin_layout(lo: Tensor, hi: Tensor, bin_width: float) -> Tensor:
    """Number of bins M per row, ``ceil((hi - lo) / Δb)``, at least 1.

    lo, hi: [R] clean minimum and maximum of each row. Returns int64 [R].
    """
    span = (hi - lo).clamp_min(0) / bin_width
    return torch.ceil(span).to(torch.int64).clamp_min(1)


def soft_histogram(
    values: Tensor,
    rows: Tensor,
    lo: Tensor,
    nbins: Tensor,
    settings: HistogramSettings = HistogramSettings(),
) -> Tensor:
    """Windowed soft histogram counts, differentiable in ``values``.

    values: [E] samples; rows: [E] int64 row (neuron) of each sample; lo: [R] first edge b_0 of
    each row; nbins: [R] int64 bin count M of each row. Returns [R, max(M)] summed soft masses
    (bins at or past a row's M stay 0). Divide by each row's sample count for probabilities.
    """
    n_rows = lo.shape[0]
    width = int(nbins.max().item()) if n_rows else 1
    out = values.new_zeros(n_rows * width)
    if values.numel() == 0:
        return out.view(n_rows, width)
    dbin, tau, w = settings.bin_width, settings.tau, settings.window
    offsets = torch.arange(-w, w + 2, device=values.device)  # (W + 1,) edges of W bins
    for start in range(0, values.numel(), settings.chunk):
        z = values[start : start + settings.chunk]
        r = rows[start : start + settings.chunk]
        row_lo, row_m = lo[r], nbins[r]  # (E,)
        own = torch.floor((z.detach() - row_lo) / dbin).to(torch.int64)
        own = torch.minimum(own.clamp_min(0), row_m - 1)
        edge = own[:, None] + offsets[None, :]  # (E, W + 1) edge indices
        # S_edge(z), with S_0 = 1 and S_M = 0: the first and last bins are half-infinite.
        s = torch.sigmoid(tau * (z[:, None] - (row_lo[:, None] + edge * dbin)))
        s = torch.where(edge <= 0, torch.ones_like(s), s)
        s = torch.where(edge >= row_m[:, None], torch.zeros_like(s), s)
        k = edge[:, :-1]  # (E, W) bin indices
        valid = (k >= 0) & (k < row_m[:, None])
        mass = (s[:, :-1] - s[:, 1:]) * valid  # (E, W)
        flat = (r[:, None] * width + k.clamp(0, width - 1)).reshape(-1)
        out = out.index_add(0, flat, mass.reshape(-1))
    return out.view(n_rows, width)


def normalise(counts: Tensor, totals: Tensor) -> Tensor:
    """Turn counts [R, M] into probabilities using each row's sample count totals [R]."""
    return counts / totals.clamp_min(1).to(counts.dtype)[:, None]


def divergence(p: Tensor, q: Tensor, kind: Divergence = "tv", eps: float = 1e-6) -> Tensor:
    """Per-row divergence D(p || q) of probability rows p, q: [R, M] -> [R].

    tv: ½ Σ |p - q|; kl: Σ p log(p / q); js: ½ KL(p || m) + ½ KL(q || m), m = (p + q) / 2.
    Padding bins (0 in both) contribute nothing. ``eps`` floors probabilities inside the log.
    """
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "kl":
        return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)
    if kind == "js":
        m = 0.5 * (p + q)
        log_m = torch.log(m + eps)
        kl_pm = (p * (torch.log(p + eps) - log_m)).sum(-1)
        kl_qm = (q * (torch.log(q + eps) - log_m)).sum(-1)
        return 0.5 * (kl_pm + kl_qm)
    raise ValueError(f"unknown divergence {kind!r}; expected tv, js or kl")


def mass_left_out(settings: HistogramSettings) -> float:
    """Upper bound of one sample's mass outside its window, σ(-τ·Δb·window)."""
    return 1.0 / (1.0 + math.exp(settings.tau * settings.bin_width * settings.window))
