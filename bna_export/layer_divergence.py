"""How far a trigger moves each BN layer's output distribution, before and after Θ: per target
and layer, the mean over the layer's channels of D(p || q), p the clean source images' histogram
(as the Θ fit sees it), q the same images with the target's triggers (those Θ was fitted on),
through f (before) and through g_t (after), beside the floor that sampling alone gives (the
images without their triggers). The fit file keeps it; the report plots it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .histogram import divergence, normalise, soft_histogram
from .norm import BnaModel
from .problems import TriggerEstimate
from .settings import FitSettings, HistogramSettings
from .statistics import Table, clean_statistics, sample_blocks


def _per_layer(
    captured: list[list[Tensor]],
    table: Table,
    target: int,
    settings: FitSettings,
    hist: HistogramSettings,
    gen: torch.Generator,
) -> np.ndarray:
    """[layers] the mean over channels of D(p || q) for one target's captured BN outputs."""
    out = []
    for li, outs in enumerate(captured):
        v = sample_blocks(outs[0], 1, settings.samples_per_channel, gen)[0]  # (M, C)
        c = v.shape[1]
        rows = table.offset[li] + target * c + torch.arange(c, device=v.device)
        local = torch.arange(c, device=v.device).expand_as(v).reshape(-1)
        counts = soft_histogram(v.reshape(-1), local, table.lo[rows], table.nbins[rows], hist)
        q = normalise(counts, torch.full((c,), v.shape[0], device=v.device))
        p = table.p[rows][:, : q.shape[1]]
        d = divergence(p, q, settings.divergence, settings.kl_eps)
        out.append(float(d.mean()))
    return np.array(out, dtype=np.float64)


def layer_divergence(
    model: BnaModel,
    data: Dataset,
    targets: Sequence[int],
    sources: dict[int, Sequence[int]],
    triggers: dict[int, Sequence[TriggerEstimate]],
    thetas: Sequence[Tensor],
    input_range: tuple[float, float],
    settings: FitSettings = FitSettings(),
    hist: HistogramSettings = HistogramSettings(),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(floor, before, after), each [targets, layers]: per target t (row i, routed to
    ``thetas``' row i) and BN layer, the mean over channels of D(p || q) on at most
    ``settings.images_per_pass`` of t's source images, each with one of t's triggers, q
    through f (before) and g_t (after), from at most ``settings.samples_per_channel`` samples
    per channel; ``floor``: the same images without a trigger through f, what sampling alone
    gives."""
    out = np.zeros((3, len(targets), len(model.layers)))  # floor, before, after
    if not targets:
        return out[0], out[1], out[2]
    gen = torch.Generator().manual_seed(seed)
    clean = clean_statistics(model, data, [sources[t] for t in targets], settings, hist, gen)
    dev = model.device
    for i, t in enumerate(targets):
        idx = data.of_classes(list(sources[t]))[: settings.images_per_pass]
        x = torch.from_numpy(data.x[idx]).to(dev)
        with torch.no_grad():  # image k carries trigger k mod (t's triggers), as in the fit
            xt = x.clone()
            for j, est in enumerate(triggers[t]):
                xt[j :: len(triggers[t])] = est.apply(x[j :: len(triggers[t])], *input_range)
            for k, (xk, route) in enumerate(((x, -1), (xt, -1), (xt, i))):
                routes = torch.full((len(idx),), route, device=dev)
                with model.mitigated(list(thetas), routes), model.capturing() as cap:
                    model(xk)
                out[k, i] = _per_layer(cap, clean.table, i, settings, hist, gen)
    return out[0], out[1], out[2]
