"""The pair sweep of detection: a trigger for every ordered class pair (s, t), or, for many
classes, a screen that finds the pairs worth solving and a weighted sample of the rest.

Exhaustive (K ≤ ``detect.screen_above``): K·(K − 1) problems per family and restart.

Screen (more classes), per family:

1. per source s, one untargeted problem: the smallest trigger that sends s's images to any other
   class. The classes are ranked by the mean probability f gives them on s's triggered images;
   the first ``screen_candidates`` are s's candidate targets (a backdoor s → t is the shortest
   way out of s, and that is what a backdoored source's trigger finds);
2. the targets that are candidates of the most sources (the ``screen_targets`` first, and any
   that half the sources name) are all-to-one suspects: every source of theirs is solved;
3. the pairs: every source's candidates, every source of a suspect target, and
   ``screen_references`` other targets per source drawn at random, which stand for the pairs
   left unsolved: each carries the weight (unsolved pairs of its row) / (references of its
   row), and detection takes weighted medians (:mod:`bna_export.detect`);
4. after detection, the unsolved sources of every target detected with several sources are
   solved and detection runs again, so that a backdoor shared by several sources is found with
   all of them (a target found with one source, as each of an all-to-all attack's, is not
   completed: its other sources' screens did not point at it, and completing every such
   column would cost K·(K − 1) again; on a 50-class set it tripled the sweep).

An untargeted problem costs what a pair costs (one class's images), so the screen adds K
problems; there is no pooled per-target problem (its pool of every other class makes it far
costlier per step, and on digits it cost more than the pairs it saved).

Cost per family: K + K·(m + r) + k·(K − 1) problems at most (m candidates, r references, k
suspect targets; candidates and suspects overlap) plus the completed columns of targets
detected with several sources, against K·(K − 1): linear in K.

Pooled problems (``detect.pooled_rule``, either sweep): per family and target one more problem,
t's trigger on the pooled images of every other class (``sweep.batch_size`` of them per
step), scored by the pooled rule of :mod:`bna_export.detect`: K problems per family.

Universal problems (``detect.map_rule``, either sweep): per family one more problem, the smallest
trigger that moves every class's images out of their own class; where it sends each class is
the all-to-all map rule's input (:mod:`bna_export.universal`). Once the pairs are scored, the
same problem is solved again from the triggers of the family's ``detect.map_starts`` best pairs,
and the start whose map counts the most classes is kept: at most 1 + ``map_starts`` problems
per family, at any K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .data import Dataset
from .detect import Detection, detect_pairs
from .fitfile import Intrinsic
from .norm import BnaModel
from .reverse import ANY, Problem, TriggerEstimate, succeeds
from .settings import DetectSettings, Settings
from .universal import fired, universal_maps, universal_problems, warm_starts


class Solve(Protocol):
    """solve(problems, stage, start): the estimates of ``problems`` (stage names the progress
    bar; ``start``: per problem an estimate to start from instead of a random draw)."""

    def __call__(
        self,
        problems: Sequence[Problem],
        stage: str,
        start: Sequence[TriggerEstimate] | None = None,
    ) -> list[TriggerEstimate]: ...


@dataclass
class SweepResult:
    """Every solved pair's estimates, the [K, K] size matrices (NaN: not solved) per family,
    the weights of a sampled sweep (None: exhaustive), the detection, what the screen found,
    and the cost in problems and problem-steps."""

    estimates: list[TriggerEstimate]
    sizes: dict[str, np.ndarray]
    weights: dict[str, np.ndarray] | None
    detection: Detection
    screen: dict[str, Any] = field(default_factory=dict)
    pooled: dict[str, np.ndarray] = field(default_factory=dict)
    """Per family the [K] sizes of the pooled problems (empty without ``detect.pooled_rule``)."""
    problems: int = 0
    problem_steps: int = 0
    intrinsic: dict[int, Intrinsic] = field(default_factory=dict)
    """Filled by the intrinsic-backdoor check (:mod:`bna_export.defend`), per target."""
    natural: dict[int, dict[str, float]] = field(default_factory=dict)
    natural_dropped: tuple[int, ...] = ()
    """Filled by the natural-feature check (:mod:`bna_export.defend`): alignments, drops."""
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per family the universal trigger's size and class map (:mod:`bna_export.universal`;
    empty without ``detect.map_rule``)."""


def pair_problems(n_classes: int, families: Sequence[str], restarts: int) -> list[Problem]:
    """Every ordered pair (s, t), s != t, in every family and restart."""
    return [
        Problem(f, t, (s,), r)
        for f in families
        for t in range(n_classes)
        for s in range(n_classes)
        if s != t
        for r in range(restarts)
    ]


def pooled_problems(n_classes: int, families: Sequence[str], restarts: int) -> list[Problem]:
    """Per family, target and restart, the target's problem on every other class's images
    (none below 3 classes, where it is a pair problem)."""
    if n_classes < 3:
        return []
    return [
        Problem(f, t, tuple(s for s in range(n_classes) if s != t), r)
        for f in families
        for t in range(n_classes)
        for r in range(restarts)
    ]


def _size(e: TriggerEstimate, success: float) -> float:
    return e.size if succeeds(e, success) else np.nan


def pooled_sizes(
    estimates: Sequence[TriggerEstimate], n_classes: int, families: Sequence[str], success: float
) -> dict[str, np.ndarray]:
    """Per family the [K] sizes of the pooled problems among ``estimates`` (the smallest
    successful restart; NaN: not solved, or not reached, as in :func:`size_matrices`)."""
    out = {f: np.full(n_classes, np.nan) for f in families}
    for e in estimates:
        t = e.problem.target
        if t != ANY and len(e.problem.sources) == n_classes - 1 > 1:
            out[e.family][t] = np.fmin(out[e.family][t], _size(e, success))
    return out


def size_matrices(
    estimates: Sequence[TriggerEstimate], n_classes: int, families: Sequence[str], success: float
) -> dict[str, np.ndarray]:
    """Per family a [K, K] matrix of per-pair trigger sizes (the smallest successful restart;
    NaN on the diagonal and for pairs not solved or not reached).

    A trigger that does not succeed (moves less than ``success`` of its images) is left out: the
    pair was not reached within the solver's budget, so its size is not known. Its last,
    unsuccessful trigger says nothing of how near the classes are (a blend that never succeeded
    sat at α = 0.002 on the small digits ResNet, the smallest of its row), and counting it as
    the family's largest trigger raised the medians of rows where many pairs were not reached,
    so that their reachable pairs scored as backdoors (README, Detection)."""
    out = {f: np.full((n_classes, n_classes), np.nan) for f in families}
    for e in estimates:
        if len(e.problem.sources) == 1 and e.problem.target != ANY:
            s, t = e.problem.sources[0], e.problem.target
            out[e.family][s, t] = np.fmin(out[e.family][s, t], _size(e, success))
    return out


def landing(
    model: BnaModel,
    data: Dataset,
    estimate: TriggerEstimate,
    input_range: tuple[float, float],
    n_classes: int,
) -> np.ndarray:
    """Mean probability f gives every class on the source images with the trigger: [K]."""
    idx = data.of_classes(list(estimate.problem.sources))
    x = torch.from_numpy(data.x[idx]).to(model.device)
    with torch.no_grad():
        p = torch.softmax(model(estimate.apply(x, *input_range)), 1).mean(0)
    return p.cpu().double().numpy()[:n_classes]


def _weights(solved: np.ndarray, references: dict[int, set[int]], n_classes: int) -> np.ndarray:
    """Per pair the number of population pairs it stands for: 1 for a chosen pair, (unsolved
    pairs of the row) / (references of the row) for a reference. NaN where not solved."""
    w = np.where(solved, 1.0, np.nan)
    for s, refs in references.items():
        refs = {t for t in refs if solved[s, t]}
        chosen = int(solved[s].sum()) - len(refs)
        if refs:
            w[s, sorted(refs)] = (n_classes - 1 - chosen) / len(refs)
    return w


def detect_sizes(
    sizes: dict[str, np.ndarray],
    weights: dict[str, np.ndarray] | None,
    pooled: dict[str, np.ndarray],
    settings: Settings,
) -> Detection:
    """The rules of ``settings.detect`` on a sweep's size matrices (family -> [K, K]), their
    weights (None: exhaustive) and pooled sizes (family -> [K]; empty: no pooled rule)."""
    d = settings.detect
    return detect_pairs(
        sizes,
        d.mad_threshold,
        d.consistency,
        d.normalise,
        d.target_rule,
        weights,
        pooled or None,
        d.pooled_families,
        (d.all_to_all_bar, d.all_to_all_sources) if d.all_to_all_rule else None,
        d.vote_share if d.vote_rule else None,
        d.min_effect,
        d.pooled_vote,
    )


def screen_choice(
    prob: np.ndarray, settings: DetectSettings, rng: np.random.Generator
) -> tuple[set[tuple[int, int]], dict[int, set[int]], dict[str, Any]]:
    """From the screen's landing probabilities ([K, K]: source, class) the pairs to solve (each
    source's candidates and every source of a suspect target), the reference targets drawn per
    source, and what the screen found (steps 1 to 3 of the module docstring)."""
    n_classes = len(prob)
    prob = prob.astype(np.float64, copy=True)
    prob[np.arange(n_classes), np.arange(n_classes)] = -np.inf
    ranks = np.argsort(-prob, axis=1, kind="stable")[:, : settings.screen_candidates]
    votes = np.bincount(ranks.reshape(-1), minlength=n_classes)
    order = np.lexsort((-np.where(np.isinf(prob), 0, prob).sum(0), -votes))
    suspects = set(order[: settings.screen_targets].tolist())
    suspects |= set(np.flatnonzero(votes >= n_classes / 2).tolist())
    pairs = {(s, int(t)) for s in range(n_classes) for t in ranks[s]}
    pairs |= {(s, t) for t in suspects for s in range(n_classes) if s != t}
    refs: dict[int, set[int]] = {}
    for s in range(n_classes):
        rest = [t for t in range(n_classes) if t != s and (s, t) not in pairs]
        take = min(settings.screen_references, len(rest))
        drawn = rng.choice(rest, size=take, replace=False) if take else []
        refs[s] = {int(t) for t in drawn}
    record = {
        "candidates": {str(s): [int(t) for t in ranks[s]] for s in range(n_classes)},
        "votes": votes.tolist(),
        "suspect_targets": sorted(int(t) for t in suspects),
    }
    return pairs, refs, record


def run_sweep(
    model: BnaModel,
    data: Dataset,
    n_classes: int,
    families: Sequence[str],
    input_range: tuple[float, float],
    settings: Settings,
    solve: Solve,
) -> SweepResult:
    """The sweep and the detection (design step 1, before the intrinsic check)."""
    d = settings.detect
    success, per = settings.sweep.success, settings.sweep.images_per_forward
    pooled = pooled_problems(n_classes, families, d.restarts) if d.pooled_rule else []
    universal = universal_problems(n_classes, list(families)) if d.map_rule else []
    if n_classes <= d.screen_above:
        found = solve(pair_problems(n_classes, families, d.restarts) + pooled + universal, "sweep")
        found, maps = universal_maps(model, data, found, input_range, n_classes, success, per)
        sizes = size_matrices(found, n_classes, families, success)
        psizes = pooled_sizes(found, n_classes, families, success) if pooled else {}
        raw = detect_sizes(sizes, None, psizes, settings)
        maps, more = _from_pairs(model, data, found, maps, raw.scores, solve, input_range, settings)
        steps = sum(e.steps for e in found) + sum(m["steps"] for m in maps.values())
        detection = with_map(raw, maps, d)
        n = len(found) + len(universal) + more
        return SweepResult(found, sizes, None, detection, {}, psizes, n, steps, maps=maps)
    screen = [Problem(f, ANY, (s,)) for f in families for s in range(n_classes)]
    screened = solve(screen, "screen")
    rng = np.random.default_rng(settings.seed)
    chosen: dict[str, set[tuple[int, int]]] = {}
    references: dict[str, dict[int, set[int]]] = {}
    record: dict[str, Any] = {}
    for f in families:
        mine = [e for e in screened if e.family == f]
        prob = np.stack([landing(model, data, e, input_range, n_classes) for e in mine])
        chosen[f], references[f], record[f] = screen_choice(prob, d, rng)
    problems = [
        Problem(f, t, (s,), r)
        for f in families
        for s, t in sorted(chosen[f] | {(s, t) for s, ts in references[f].items() for t in ts})
        for r in range(d.restarts)
    ]
    found, maps = universal_maps(
        model, data, solve(problems + pooled + universal, "sweep"), input_range, n_classes,
        success, per,
    )  # fmt: skip
    sizes = size_matrices(found, n_classes, families, success)
    psizes = pooled_sizes(found, n_classes, families, success) if pooled else {}
    weights = {f: _weights(~np.isnan(sizes[f]), references[f], n_classes) for f in families}
    raw = detect_sizes(sizes, weights, psizes, settings)
    maps, more = _from_pairs(model, data, found, maps, raw.scores, solve, input_range, settings)
    detection = with_map(raw, maps, d)
    several = [t for t, src in detection.sources.items() if len(src) > 1]
    solved = {e.problem for e in found}
    missing = [
        p
        for f in families
        for t in several
        for s in range(n_classes)
        if s != t
        for r in range(d.restarts)
        if (p := Problem(f, t, (s,), r)) not in solved
    ]
    if missing:  # a target several sources were found to share is found with all of them
        found += solve(missing, "sweep")
        sizes = size_matrices(found, n_classes, families, success)
        weights = {f: _weights(~np.isnan(sizes[f]), references[f], n_classes) for f in families}
        detection = with_map(detect_sizes(sizes, weights, psizes, settings), maps, d)
    record["problems"] = {"screen": len(screened), "pairs": len(found) - len(pooled)}
    record["problems"]["pooled"] = len(pooled)
    record["problems"]["universal"] = len(universal) + more
    steps = sum(e.steps for e in screened) + sum(e.steps for e in found)
    steps += sum(m["steps"] for m in maps.values())
    n = len(screened) + len(found) + len(universal) + more
    return SweepResult(found, sizes, weights, detection, record, psizes, n, steps, maps=maps)


def _from_pairs(
    model: BnaModel,
    data: Dataset,
    found: list[TriggerEstimate],
    maps: dict[str, dict[str, Any]],
    scores: dict[str, np.ndarray],
    solve: Solve,
    input_range: tuple[float, float],
    settings: Settings,
) -> tuple[dict[str, dict[str, Any]], int]:
    """The universal maps with each family's problem also solved from its best pairs' triggers
    (``detect.map_starts``, :func:`~bna_export.universal.warm_starts`; pairs scoring at least
    ``detect.all_to_all_bar`` × the threshold, as the all-to-all rule counts a source's best
    pair), and how many more problems that took."""
    d, success = settings.detect, settings.sweep.success
    floor = d.all_to_all_bar * d.mad_threshold
    starts = warm_starts(scores, found, d.map_starts, success, floor) if maps else []
    if not starts:
        return maps, 0
    solved = solve([p for p, _ in starts], "universal", [e for _, e in starts])
    k, per = len(next(iter(scores.values()))), settings.sweep.images_per_forward
    _, out = universal_maps(
        model, data, solved, input_range, k, success, per, d.map_share, earlier=maps
    )
    came = {p: (e.problem.sources[0], e.problem.target) for p, e in starts}
    for m in out.values():
        if m["estimate"].problem in came:
            m["from"] = came[m["estimate"].problem]
    return out, len(solved)


def with_map(detection: Detection, maps: dict[str, dict[str, Any]], d: DetectSettings) -> Detection:
    """``detection`` with the pairs of the all-to-all map rule (:mod:`bna_export.universal`)
    added to its pairs and its all-to-all pairs. A source the map sends to its own new class
    keeps no other pair: an all-to-all trigger names one destination per class, and the other
    rules' pairs of a mapped source (an easy class that every digit's strokes reach, named an
    all-to-one target by the pooled rule) would route that target's clean images through a Θ
    fitted for a backdoor that is not there (README, Detection, map rule)."""
    found = fired(maps, d)
    if not found:
        return detection
    for pair, fam in found.items():
        detection.family.setdefault(pair, fam)
    mapped = {s: t for s, t in found}
    pairs = set(detection.pairs) | set(found)
    detection.pairs = sorted(p for p in pairs if mapped.get(p[0], p[1]) == p[1])
    left = {t for s, t in detection.pairs if (s, t) not in found}
    detection.all_to_one = {t: f for t, f in detection.all_to_one.items() if t in left}
    both = set(detection.all_to_all) | set(found)
    detection.all_to_all = sorted(p for p in both if mapped.get(p[0], p[1]) == p[1])
    return detection
