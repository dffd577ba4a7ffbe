"""Anomaly detection over class-pair trigger sizes (MAD, as in Neural Cleanse and the paper's
appendix C): small pure functions that compute and decide, and run nothing.

score_i = |s_i − median(s)| / (c · MAD), MAD = median(|s − median(s)|), c = 1.4826 makes c·MAD a
consistent estimate of a normal standard deviation. Medians follow ``np.median`` (the mean of the
two middle values for an even count; ``torch.median`` would take the lower one).

The statistic of a pair (s, t) is the reciprocal of its trigger size. With ``normalise="source"``
(the default) the size is first divided by the median size of the same source's triggers to
every other target: how easily images of s move to *any* class (thin "1"s need a few pixels to
become anything) is a property of s, not a backdoor, and it would otherwise dominate the spread.
An all-to-one or all-to-all attack adds one backdoor target per source, which leaves that median
alone. Families are scored separately; a pair is detected when it is an outlier on the large side
in *any* family (the defender does not know which family the trigger belongs to, and a trigger
of one family can be invisible to the other: an additive chessboard has no small patch).

Sampled pairs: when the sweep solved only some pairs (the screen of :mod:`bna_export.sweep`),
each solved pair carries a weight, the number of pairs it stands for, and every median is the
weighted median. Equal weights give ``np.median`` exactly.

Effect floor: the pair, column and vote rules also need the trigger to be ``min_effect`` times
smaller than its source's typical one (:func:`effects`): a score is relative to the spread.

All-to-one (column) rule: an all-to-one backdoor makes *every* source's trigger to t small,
perhaps each only a little; the median over sources of a target's pair statistics, scored by MAD
across targets, catches it, and t is detected with every source (the intrinsic check prunes;
the natural-feature check, :mod:`bna_export.natural`, tests the pooled and vote rules' targets).

Pooled rule (Neural Cleanse's own test): per target, one trigger on the pooled images of every
other class, 1 / its size scored by MAD across targets. Turning *every* class into t is not
easy unless t is an all-to-one target; t is detected with every source when it is an outlier
in two families: one family alone can draw a naturally easy class cheaply (patch strokes make
any digit an 8), while a backdoor trigger is small in more than one (README, Detection).

All-to-all rule: an all-to-all backdoor gives every source one target of its own, each pair
perhaps only a little anomalous. Each source's best pair (its largest large-side score over
the families) is taken from a share of the threshold, one source per target (the best-scoring:
a backdoor maps each source to its own target); the pairs are detected when a share keep one.
A clean model's best pairs are few and crowd onto easy targets; an all-to-one attack's share
one. Exhaustive sweeps only; the sweep adds the map rule's pairs (:mod:`bna_export.universal`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .target_rules import VOTE_PAIRS, vote_targets

Side = Literal["large", "small", "both"]
_MEDIAN_SE = math.sqrt(math.pi / 2)  # sd of a sample median = 1.2533·σ/√n (normal samples)
Normalise = Literal["source", "none"]


def weighted_median(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The median of ``values`` (1-D, no NaN), each counted ``weights`` times (None: once).

    The midpoint of the values where the cumulative weight crosses half the total; where it
    reaches exactly half, the mean of that value and the next (so equal weights give
    ``np.median``: the mean of the two middle values for an even count)."""
    v = np.asarray(values, dtype=np.float64)
    if weights is None:
        return float(np.median(v))
    return float(weighted_medians(v[None], np.asarray(weights, dtype=np.float64)[None])[0])


def weighted_medians(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """:func:`weighted_median` of every row of ``values`` [R, n] with ``weights`` [R, n] (no
    NaN; a weight of 0 leaves its value out): [R]."""
    order = np.argsort(values, axis=1, kind="stable")
    v = np.take_along_axis(values, order, 1)
    w = np.take_along_axis(weights, order, 1)
    c = np.cumsum(w, axis=1)
    half = c[:, -1:] / 2
    i = np.argmax(c >= half * (1 - 1e-12), axis=1)
    rows = np.arange(len(v))
    tie = np.isclose(c[rows, i], half[:, 0], rtol=1e-9, atol=0.0)
    # the next value that counts: the first after i with a weight
    after = np.where((np.arange(v.shape[1]) > i[:, None]) & (w > 0), np.arange(v.shape[1]), -1)
    nxt = np.where(after.max(1) >= 0, np.where(after < 0, v.shape[1], after).min(1), i)
    return np.where(tie, (v[rows, i] + v[rows, nxt]) / 2, v[rows, i])


def _select(weights: np.ndarray | None, mask: np.ndarray) -> np.ndarray | None:
    return None if weights is None else np.asarray(weights, dtype=np.float64)[mask]


def mad_scores(
    stats: np.ndarray, consistency: float = 1.4826, weights: np.ndarray | None = None
) -> np.ndarray:
    """Anomaly score of every statistic (any shape; the median is over all of them, weighted
    by ``weights`` of the same shape when given).

    NaN entries are left out of the median and score NaN. When MAD = 0 (more than half the
    statistics equal), a statistic equal to the median scores 0 and any other scores +inf.
    """
    s = np.asarray(stats, dtype=np.float64)
    finite = ~np.isnan(s)
    if not finite.any():
        return s.copy()
    w = _select(weights, finite)
    dev = np.abs(s - weighted_median(s[finite], w))
    mad = weighted_median(dev[finite], w) * consistency
    if mad == 0.0:
        return np.where(np.isnan(s), np.nan, np.where(dev == 0.0, 0.0, np.inf))
    return dev / mad


def outliers(
    stats: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    side: Side = "large",
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask of statistics whose score exceeds ``threshold`` on the given side of the
    median ('large' for reciprocal trigger sizes: a small trigger is a large statistic)."""
    s = np.asarray(stats, dtype=np.float64)
    over = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf) > threshold
    finite = ~np.isnan(s)
    if not finite.any() or side == "both":
        return over
    med = weighted_median(s[finite], _select(weights, finite))
    return over & (s > med if side == "large" else s < med)


def large_side_scores(stats: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``scores`` where the statistic is above the median (the side a backdoor is on: a smaller
    trigger than the median), 0 elsewhere and where there is no score (NaN)."""
    return np.where(outliers(stats, scores, -np.inf, "large"), scores, 0.0)


def _row_medians(z: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Weighted median of every row's non-NaN entries, [K, K] -> [K, 1] (NaN: empty row)."""
    out = np.full((z.shape[0], 1), np.nan)
    for i, row in enumerate(z):
        ok = ~np.isnan(row)
        if ok.any():
            out[i, 0] = weighted_median(row[ok], None if weights is None else weights[i][ok])
    return out


def _others_medians(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """For every entry (s, t) of [K, K] ``z``, the weighted median of row s's other non-NaN
    entries (NaN where (s, t) is NaN or is the row's only entry)."""
    out = np.full(z.shape, np.nan)
    for s, row in enumerate(z):
        ok = np.flatnonzero(~np.isnan(row))
        if len(ok) < 2:
            continue
        w = np.broadcast_to(weights[s, ok], (len(ok), len(ok))) * (1 - np.eye(len(ok)))  # j: no j
        out[s, ok] = weighted_medians(np.broadcast_to(row[ok], w.shape), w)
    return out


def pair_statistics(
    sizes: np.ndarray, normalise: Normalise = "source", weights: np.ndarray | None = None
) -> np.ndarray:
    """Detection statistic of every ordered pair from a [K, K] matrix of trigger sizes
    (row = source, column = target, NaN on the diagonal and for pairs not solved).

    ``none``: 1 / size (the paper). ``source``: median over t' of size(s, t') / size(s, t).
    A sampled sweep (``weights`` given) takes the weighted median over t' != t: the pair is left
    out of its normaliser, because with it the row's middle pair scores exactly 1, and three
    heavily weighted references per row put a third of the weight there, which shrank the MAD
    scale about twofold and made natural pairs outliers (README, Detection). An exhaustive row
    (K − 1 equal weights) keeps the plain median, as in the paper's appendix.
    """
    z = np.maximum(np.asarray(sizes, dtype=np.float64), 1e-12)  # NaN stays NaN
    if normalise == "none":
        return 1.0 / z
    if weights is not None:
        return _others_medians(z, np.asarray(weights, dtype=np.float64)) / z
    with warnings.catch_warnings():  # a source with no solved pair has an all-NaN row
        warnings.simplefilter("ignore", RuntimeWarning)
        row = np.nanmedian(z, axis=1, keepdims=True)  # (K, 1)
    return row / z


@dataclass
class Detection:
    """What the pair statistics say: per family the [K, K] statistics and scores and the [K]
    target scores; the pairs P, targets T, sources S(t); each pair's family; the targets of the
    all-to-one rules (column, pooled, vote) with their family; the pooled rule's scores."""

    statistics: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    target_scores: dict[str, np.ndarray]
    pairs: list[tuple[int, int]]
    family: dict[tuple[int, int], str] = field(default_factory=dict)
    all_to_one: dict[int, str] = field(default_factory=dict)
    pooled_scores: dict[str, np.ndarray] = field(default_factory=dict)
    all_to_all: list[tuple[int, int]] = field(default_factory=list)
    """The pairs the all-to-all rule found (empty when it did not fire)."""
    effects: dict[str, np.ndarray] = field(default_factory=dict)  # per family (:func:`effects`)
    column: list[int] = field(default_factory=list)  # all_to_one's targets the column rule found

    @property
    def targets(self) -> list[int]:
        return sorted({t for _, t in self.pairs})

    @property
    def sources(self) -> dict[int, list[int]]:
        return {t: sorted(s for s, tt in self.pairs if tt == t) for t in self.targets}

    def target_family(self, t: int) -> str:
        """The family that detected target t (its all-to-one family, else the family of its
        best-scoring pair)."""
        if t in self.all_to_one:
            return self.all_to_one[t]
        best = max(
            (p for p in self.pairs if p[1] == t), key=lambda p: self.scores[self.family[p]][p]
        )
        return self.family[best]


def target_statistics(stats: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per target, the median over sources of its pair statistics: [K, K] -> [K]. An
    all-to-one backdoor makes every source's trigger to t small, a natural easy pair one."""
    if weights is not None:
        st = np.asarray(stats, dtype=np.float64)
        return _row_medians(st.T, np.asarray(weights, dtype=np.float64).T)[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(np.asarray(stats, dtype=np.float64), axis=0)


def effects(
    sizes: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Per family the [K] target effects (median over sources of row median / size; NaN: none
    solved), as :func:`detect_pairs` computes them for its effect floor (README, Detection)."""
    out = {}
    for fam, z in sizes.items():
        w = None if weights is None else weights[fam]
        out[fam] = target_statistics(pair_statistics(z, "source", w), w)
    return out


def target_scores(
    stats: np.ndarray, consistency: float = 1.4826, weights: np.ndarray | None = None
) -> np.ndarray:
    """Anomaly score of every target's median pair statistic: [K, K] -> [K].

    A target's median m_t differs from the others' by a real effect (some classes are easier
    to reach) and by the sampling error of a median of its solved pairs, se_t = 1.2533·σ/√n_t
    (σ the pairs' own MAD scale, n_t the column's effective count (Σw)²/Σw², its solved count
    when unweighted). The spread of the medians (MAD across targets) holds both, so the real
    effects' spread is τ² = max(0, spread² − median_t se_t²), and target t is scored as
    |m_t − median(m)| / √(τ² + se_t²). With every pair solved all se_t are equal and this is
    max(spread, se): with few targets whose medians happen to agree closely, the spread alone
    would make a small wobble look like an attack. In a screened sweep the columns of
    non-suspect targets hold a few pairs each, so their medians are noisy and the spread is
    large, while an all-to-one suspect's column is complete: scoring it by the spread alone
    halved its score (README, Detection).
    """
    st = np.asarray(stats, dtype=np.float64)
    ts = target_statistics(st, weights)
    finite = ~np.isnan(ts)
    out = np.full(ts.shape, np.nan)
    if not finite.any():
        return out
    dev = np.abs(ts - np.median(ts[finite]))
    spread = consistency * float(np.median(dev[finite]))
    solved = ~np.isnan(st)
    pairs, w = st[solved], _select(weights, solved)
    sigma = (
        consistency * weighted_median(np.abs(pairs - weighted_median(pairs, w)), w)
        if pairs.size
        else 0.0
    )
    counted = np.where(solved, 1.0 if weights is None else np.nan_to_num(weights), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff = np.maximum(counted.sum(0) ** 2 / (counted**2).sum(0), 1.0)
    se = _MEDIAN_SE * sigma / np.sqrt(np.nan_to_num(n_eff, nan=1.0))
    tau2 = max(0.0, spread**2 - float(np.median(se[finite] ** 2)))
    scale = np.sqrt(tau2 + se**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[finite] = np.where(
            scale[finite] > 0, dev[finite] / scale[finite], np.where(dev[finite] == 0, 0.0, np.inf)
        )
    return out


def detect_pairs(
    sizes: Mapping[str, np.ndarray],
    threshold: float = 7.0,
    consistency: float = 1.4826,
    normalise: Normalise = "source",
    target_rule: bool = True,
    weights: Mapping[str, np.ndarray] | None = None,
    pooled: Mapping[str, np.ndarray] | None = None,
    pooled_families: int = 2,
    all_to_all: tuple[float, float] | None = None,
    vote_share: float | None = None,
    min_effect: float = 1.5,
    pooled_vote: bool = False,
) -> Detection:
    """Score every pair in every family and take the union of the outliers.

    sizes: family -> [K, K] trigger sizes (NaN on the diagonal and unsolved pairs); ``weights``:
    family -> [K, K] the pairs each solved one stands for (None: all solved). ``target_rule``: a
    target whose median pair statistic is an outlier among the targets' is detected with every
    solved source (all-to-one rule). ``pooled``: family -> [K] sizes of each target's trigger on
    the pooled images of every other class (NaN: not solved); a target whose 1 / size is an
    outlier in ``pooled_families`` of them (all when fewer) is detected with every solved source
    (pooled rule). ``all_to_all``: (bar as a share of ``threshold``, share of sources) of the
    all-to-all rule (:func:`all_to_all_pairs`), applied when every pair was solved (None: off).
    ``vote_share``: the vote rule's share (:func:`bna_export.target_rules.vote_targets`, in
    ``pooled_families`` families, or one with ``VOTE_PAIRS`` pairs over the threshold or, with
    ``pooled_vote``, a pooled outlier), applied when every pair was solved (None: off).
    ``min_effect``: the effect floor (module docstring) of the pair, column and vote rules, in
    the family that finds the pair or target (one of those that vote for it).
    """
    stats, scores, tscores, best, a2o, pscores, eff, paired = {}, {}, {}, {}, {}, {}, {}, {}
    column: set[int] = set()
    for fam, z in sizes.items():
        w = None if weights is None else weights[fam]
        st = pair_statistics(z, normalise, w)
        rel = st if normalise == "source" else pair_statistics(z, "source", w)
        eff[fam] = target_statistics(rel, w)
        sc = mad_scores(st, consistency, w)
        stats[fam], scores[fam] = st, sc
        big = outliers(st, sc, threshold, "large", w) & (np.nan_to_num(rel) >= min_effect)
        paired[fam] = set(np.flatnonzero(big.sum(0) >= VOTE_PAIRS).tolist())
        for s, t in np.argwhere(big).tolist():
            if (s, t) not in best or sc[s, t] > scores[best[(s, t)]][s, t]:
                best[(s, t)] = fam
        ts = target_statistics(st, w)
        tscores[fam] = target_scores(st, consistency, w)
        if target_rule:
            big = outliers(ts, tscores[fam], threshold, "large") & (eff[fam] >= min_effect)
            for t in np.flatnonzero(big).tolist():
                column.add(t)
                if t not in a2o or tscores[fam][t] > tscores[a2o[t]][t]:
                    a2o[t] = fam
    votes: dict[int, list[tuple[float, str]]] = {}
    for fam, z in (pooled or {}).items():
        st = 1.0 / np.maximum(np.asarray(z, dtype=np.float64), 1e-12)
        pscores[fam] = mad_scores(st, consistency)
        if np.isinf(pscores[fam]).any():  # MAD 0: most targets tie; no scale, no test
            pscores[fam] = np.full(st.shape, np.nan)
        for t in np.flatnonzero(outliers(st, pscores[fam], threshold, "large")).tolist():
            votes.setdefault(t, []).append((float(pscores[fam][t]), fam))
            paired.setdefault(fam, set()).update({t} if pooled_vote else ())
    for t, v in votes.items():
        if len(v) >= min(pooled_families, len(pooled or {})):
            a2o.setdefault(t, max(v)[1])
    if vote_share is not None and weights is None:
        voted = vote_targets(sizes, vote_share, pooled_families, eff, min_effect, paired)
        for t, (_, fam) in voted.items():
            a2o.setdefault(t, fam)
    for t, fam in a2o.items():
        for s in np.flatnonzero(~np.isnan(sizes[fam][:, t])).tolist():
            best.setdefault((s, t), fam)
    a2a = {}
    if all_to_all is not None and weights is None:
        a2a = all_to_all_pairs(stats, scores, all_to_all[0] * threshold, all_to_all[1])
        for pair, fam in a2a.items():
            best.setdefault(pair, fam)
    a2o = dict(sorted(a2o.items()))
    found = (sorted(best), best, a2o, pscores, sorted(a2a), eff, sorted(column))
    return Detection(stats, scores, tscores, *found)


def all_to_all_pairs(
    stats: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    bar: float,
    min_sources: float,
) -> dict[tuple[int, int], str]:
    """The all-to-all rule (module docstring): each source's best pair over the families when
    its large-side score is at least ``bar``, one source per target (the best-scoring), kept
    when at least ``min_sources`` (a share) of the sources have one; pair -> its family."""
    fams = list(stats)
    if not fams:
        return {}
    side = np.stack(  # (F, K, K): large-side scores, -inf where unsolved
        [
            np.where(np.isnan(stats[f]), -np.inf, large_side_scores(stats[f], scores[f]))
            for f in fams
        ]
    )
    which, best = side.argmax(0), side.max(0)
    k = best.shape[0]
    np.fill_diagonal(best, -np.inf)
    target = best.argmax(1)
    top = best[np.arange(k), target]
    kept: dict[int, int] = {}  # target -> source
    for s in np.argsort(-top, kind="stable").tolist():
        if top[s] >= bar and int(target[s]) not in kept:
            kept[int(target[s])] = s
    if not kept or len(kept) < math.ceil(min_sources * k):
        return {}
    return {(s, t): fams[which[s, t]] for t, s in sorted(kept.items())}
