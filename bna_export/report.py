"""What a fit file's detection says, ready to show: signed anomaly-score histograms per trigger
family (text, or a PNG when matplotlib is installed) and the detected pairs with their scores."""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import write_atomic
from .errors import BadInputError, FitFileError

OVERFLOW = 20.0
"""Scores beyond ±OVERFLOW share the last bin (an infinite score, MAD = 0, lands there too)."""


@dataclass
class Histogram:
    """Counts of signed scores (positive: a smaller trigger than the median) in unit bins."""

    family: str
    edges: list[float]
    counts: list[int]
    detected: list[int]
    threshold: float
    pairs: int


def signed_scores(entries: list[dict[str, Any]]) -> np.ndarray:
    """Per pair: +score when the statistic is above the median (small trigger), else -score;
    an infinite score (MAD = 0) is +inf or -inf."""
    stats = np.array([e["statistic"] for e in entries], dtype=np.float64)
    raw = np.array([np.inf if e["score"] is None else e["score"] for e in entries])
    med = np.median(stats) if len(stats) else 0.0
    return np.where(stats > med, raw, -raw)


MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError)
"""What reading a fit-file header of the wrong shape raises (a missing key, a list where a
dict was expected, ...): callers turn these into :class:`FitFileError`."""


def _malformed(fn: Any) -> Any:
    """A fit file is untrusted: a header of the wrong shape is a :class:`FitFileError`."""

    @functools.wraps(fn)
    def wrapper(header: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(header, *args, **kwargs)
        except MALFORMED as exc:
            raise FitFileError(f"fit file: malformed detection results ({exc!r})") from exc

    return wrapper


@_malformed
def score_histograms(header: dict[str, Any]) -> list[Histogram]:
    """One histogram per family of the pair sweep (none when targets or pairs were given)."""
    det = header.get("detection") or {}
    if not det.get("scores_computed"):
        return []
    threshold = float(det.get("threshold", 7.0))
    out = []
    for family, entries in sorted((header.get("scores") or {}).items()):
        if not entries:
            continue
        signed = np.clip(signed_scores(entries), -OVERFLOW, OVERFLOW)
        lo = math.floor(min(signed.min(), 0.0))
        hi = max(math.ceil(signed.max()), math.ceil(threshold) + 1, lo + 1)
        edges = np.arange(lo, hi + 1, dtype=np.float64)
        counts, _ = np.histogram(signed, edges)
        flags = np.array([bool(e.get("detected")) for e in entries])
        hits, _ = np.histogram(signed[flags], edges)
        out.append(
            Histogram(
                family,
                edges.tolist(),
                counts.tolist(),
                hits.tolist(),
                threshold,
                len(entries),
            )
        )
    return out


@_malformed
def detected_pairs(header: dict[str, Any]) -> list[dict[str, Any]]:
    """The detected pairs, each with its family and its score in every family."""
    det = header.get("detection") or {}
    families = det.get("pair_families") or {}
    by_pair: dict[str, dict[str, Any]] = {}
    for family, entries in (header.get("scores") or {}).items():
        for e in entries:
            key = f"{e['source']}:{e['target']}"
            if key in families:
                row = by_pair.setdefault(
                    key,
                    {"source": e["source"], "target": e["target"], "family": families[key]},
                )
                row[f"{family}_score"] = e["score"]
    return sorted(by_pair.values(), key=lambda r: (r["target"], r["source"]))


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend; a one-line error when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BadInputError("--plot needs matplotlib: pip install matplotlib") from exc
    return plt


def plot_scores(header: dict[str, Any], path: str | Path) -> None:
    """Write a PNG of the anomaly-score histograms (one panel per family)."""
    plt = pyplot()
    hists = score_histograms(header)
    if not hists:
        raise BadInputError("this fit file has no pair sweep to plot (targets or pairs were given)")
    fig, axes = plt.subplots(1, len(hists), figsize=(5 * len(hists), 3.2), squeeze=False)
    draw_scores(list(axes[0]), hists)
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig: Any, path: str | Path) -> None:
    """Write a matplotlib figure as a PNG (no timestamp inside), atomically, and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def draw_scores(axes: list[Any], hists: list[Histogram]) -> None:
    """Draw each family's score histogram, detected pairs and threshold on its own axes."""
    for ax, h in zip(axes, hists, strict=True):
        left = np.array(h.edges[:-1])
        clean = np.array(h.counts) - np.array(h.detected)
        ax.bar(left, clean, width=1.0, align="edge", color="#8aa", label="pairs")
        ax.bar(
            left, h.detected, width=1.0, align="edge", bottom=clean, color="#c33", label="detected"
        )
        ax.axvline(h.threshold, color="k", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(f"{h.family} ({h.pairs} pairs)")
        ax.set_xlabel("anomaly score (+: smaller trigger than the median)")
        ax.set_ylabel("class pairs")
        ax.legend(fontsize=8)
