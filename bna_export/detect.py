"""Anomaly scores over class-pair statistics (MAD, as in Neural Cleanse and the paper's
appendix C): small pure functions that compute, and decide nothing else.

score_i = |s_i − median(s)| / (c · MAD), MAD = median(|s − median(s)|), c = 1.4826 makes c·MAD a
consistent estimate of a normal standard deviation. Medians follow ``np.median`` (the mean of the
two middle values for an even count; ``torch.median`` would take the lower one).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Side = Literal["large", "small", "both"]


def mad_scores(stats: np.ndarray, consistency: float = 1.4826) -> np.ndarray:
    """Anomaly score of every statistic (any shape; the median is over all of them).

    When MAD = 0 (more than half the statistics equal), a statistic equal to the median
    scores 0 and any other scores +inf: it is infinitely far out by this scale.
    """
    s = np.asarray(stats, dtype=np.float64)
    if s.size == 0:
        return s.copy()
    dev = np.abs(s - np.median(s))
    mad = float(np.median(dev)) * consistency
    if mad == 0.0:
        return np.where(dev == 0.0, 0.0, np.inf)
    return dev / mad


def outliers(
    stats: np.ndarray, scores: np.ndarray, threshold: float, side: Side = "large"
) -> np.ndarray:
    """Boolean mask of statistics whose score exceeds ``threshold`` on the given side of the
    median ('large' for reciprocal trigger sizes: a small trigger is a large statistic)."""
    s = np.asarray(stats, dtype=np.float64)
    over = np.asarray(scores) > threshold
    if s.size == 0 or side == "both":
        return over
    med = np.median(s)
    return over & (s > med if side == "large" else s < med)
