"""The report's pictures as PNG bytes (matplotlib, Agg): anomaly-score histograms, a target's
reverse-engineered trigger with clean and triggered examples, and each layer's divergence before
and after Θ. Everything is drawn from a fit-file record (:mod:`bna_export.fitfile`)."""

from __future__ import annotations

import io
import textwrap
from typing import Any

import numpy as np
import torch

from .data import class_rank
from .errors import FitFileError
from .families import FAMILIES
from .fitfile import FitRecord, Trigger
from .report import draw_scores, pyplot, score_histograms

EXAMPLES = 4
"""Clean and triggered examples shown per target (the fit file keeps 4 triggered ones)."""


def png(fig: Any) -> bytes:
    """A figure as PNG bytes (no timestamp inside: the same record draws the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    pyplot("report").close(fig)
    return buf.getvalue()


def as_picture(x: np.ndarray, input_range: tuple[float, float]) -> np.ndarray:
    """An input [C, H, W] as an image [H, W, 3] in [0, 1] (one channel: grey; more than three:
    the first three)."""
    lo, hi = input_range
    z = np.nan_to_num((np.asarray(x, np.float64) - lo) / max(hi - lo, 1e-12))
    z = np.clip(z, 0.0, 1.0)
    z = np.repeat(z[:1], 3, 0) if z.shape[0] < 3 else z[:3]
    return z.transpose(1, 2, 0)


def _checker(h: int, w: int) -> np.ndarray:
    cells = (np.arange(h)[:, None] // max(1, h // 8) + np.arange(w)[None] // max(1, w // 8)) % 2
    return np.repeat((0.1 + 0.15 * cells)[..., None], 3, 2)


def _checked(tr: Trigger, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A trigger's tensors, checked against its family and the input shape (C, H, W): a fit
    file is untrusted input."""
    c, h, w = shape
    want = {
        "patch": {"mask": (1, h, w), "pattern": (c, h, w)},
        "blend": {"alpha": (1,), "pattern": (c, h, w)},
        "perturbation": {"pattern": (c, h, w)},
    }.get(tr.family)
    flow = tr.params.get("flow")
    if tr.family == "warp" and flow is not None and flow.ndim == 3 and flow.shape[1] > 0:
        want = {"flow": (2, flow.shape[1], flow.shape[1])}
    if want is None or any(tr.params.get(k, np.zeros(0)).shape != v for k, v in want.items()):
        raise FitFileError(f"fit file: trigger {tr.index} ({tr.family}) has tensors of wrong shape")
    return {k: np.nan_to_num(np.asarray(tr.params[k], np.float64)) for k in want}


def trigger_picture(
    tr: Trigger, input_range: tuple[float, float], shape: tuple[int, ...]
) -> tuple[np.ndarray, str]:
    """What a trigger looks like as an image [H, W, 3], and how to read it: a patch's pattern
    over a checkerboard, as opaque as its mask; a blend's pattern; a perturbation's additive v
    (grey: no change); a warp's displacement length (white: the largest). ``shape``: the input's
    (C, H, W)."""
    p = _checked(tr, shape)
    if tr.family == "patch":
        pattern = as_picture(p["pattern"], input_range)
        h, w = pattern.shape[:2]
        mask = np.asarray(p["mask"], np.float64).reshape(h, w, 1)
        return mask * pattern + (1 - mask) * _checker(h, w), "pattern, as opaque as its mask"
    if tr.family == "blend":
        alpha = float(np.asarray(p["alpha"]).reshape(-1)[0])
        return as_picture(p["pattern"], input_range), f"pattern, blended in at α = {alpha:.3f}"
    if tr.family == "perturbation":
        v = np.asarray(p["pattern"], np.float64)
        scale = max(float(np.abs(v).max()), 1e-12)
        pic = as_picture(0.5 + v / (2 * scale), (0.0, 1.0))
        return pic, f"added v (grey: 0, ±{scale:.3g} at black/white)"
    h, w = shape[-2:]
    field = FAMILIES["warp"].field(torch.as_tensor(p["flow"], dtype=torch.float32)[None], h, w)
    length = field[0].pow(2).sum(0).sqrt().numpy()
    top = max(float(length.max()), 1e-12)
    return np.repeat((length / top)[..., None], 3, 2), f"displacement (white: {top:.2f} px)"


def scores_png(rec: FitRecord) -> bytes | None:
    """The anomaly-score histograms of every family with the threshold (None: no sweep)."""
    hists = score_histograms(rec.scores, rec.detection)
    if not hists:
        return None
    plt = pyplot("report")
    fig, axes = plt.subplots(1, len(hists), figsize=(4.2 * len(hists), 3.0), squeeze=False)
    draw_scores(list(axes[0]), hists)
    fig.tight_layout()
    return png(fig)


def _show(ax: Any, img: np.ndarray, title: str) -> None:
    ax.imshow(img, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def target_png(rec: FitRecord, target: int) -> bytes | None:
    """One target: its first trigger Θ was fitted on, then clean source images with f's answer
    and triggered ones with f's answer, the repaired answer and the flag (None: the fit file
    does not keep which probe is which, or no trigger was used)."""
    probes = rec.probes
    used = [tr for tr in rec.triggers if tr.target == target and tr.used]
    if probes is None or probes.truth is None or probes.trigger_of is None or not used:
        return None
    shape = tuple(rec.input_shape)
    if len(shape) != 3 or min(shape) < 1 or probes.x.shape[1:] != shape:
        raise FitFileError("fit file: the probe images do not have the input's shape (C, H, W)")
    if probes.f_logits.shape[1] < 1:
        raise FitFileError("fit file: the probes have no logits")
    pic, how = trigger_picture(used[0], rec.input_range, shape)  # checked before drawing
    f_answer = probes.f_logits.argmax(1)
    sources = set(rec.sources[target])
    clean = np.flatnonzero((probes.trigger_of == -1) & np.isin(probes.truth, list(sources)))
    clean = clean[np.lexsort((clean, class_rank(probes.truth[clean])))][:EXAMPLES]
    stamped = np.flatnonzero(probes.trigger_of == target)[:EXAMPLES]
    cols = 1 + max(len(clean), len(stamped), 1)
    plt = pyplot("report")
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols, 3.7), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    _show(axes[0][0], pic, f"{used[0].family} trigger")
    axes[0][0].axis("on")
    axes[0][0].set_xlabel("\n".join(textwrap.wrap(how, 22)), fontsize=7)
    for j, i in enumerate(clean, start=1):
        axes[0][j].axis("on")
        _show(axes[0][j], as_picture(probes.x[i], rec.input_range), f"clean {probes.truth[i]}\n"
              f"f: {f_answer[i]}")  # fmt: skip
    for j, i in enumerate(stamped, start=1):
        axes[1][j].axis("on")
        flag = " FLAGGED" if probes.triggered[i] else ""
        title = f"{probes.truth[i]} + trigger\nf: {f_answer[i]} → {probes.label[i]}{flag}"
        _show(axes[1][j], as_picture(probes.x[i], rec.input_range), title)
    fig.tight_layout()
    return png(fig)


def divergence_png(rec: FitRecord) -> bytes | None:
    """Per target, each layer's mean D(p || q) with the trigger through f and through g_t, and
    the floor without it (None: the fit file keeps none, or nothing was fitted)."""
    ev = rec.evidence
    if ev is None or not rec.targets or not rec.layers:
        return None
    plt = pyplot("report")
    n = len(rec.targets)
    fig, axes = plt.subplots(n, 1, figsize=(max(5.0, 0.45 * len(rec.layers) + 2), 2.4 * n))
    axes = np.atleast_1d(axes)
    pos = np.arange(len(rec.layers))
    rows = zip(axes, rec.targets, ev.floor, ev.before, ev.after, strict=True)
    for ax, t, floor, before, after in rows:
        ax.bar(pos - 0.2, before, width=0.4, color="#c33", label="trigger through f")
        ax.bar(pos + 0.2, after, width=0.4, color="#38a", label="through g_t (repaired)")
        ax.plot(pos, floor, "k_", markersize=14, label="floor (no trigger, f)")
        ax.set_title(f"target {t}: how far the trigger moves each BN layer", fontsize=9)
        ax.set_ylabel(f"mean {ev.divergence.upper()}", fontsize=8)
        ax.set_xticks(pos, [str(i) for i in pos], fontsize=7)
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("BN layer (in execution order)")
    fig.tight_layout()
    return png(fig)
