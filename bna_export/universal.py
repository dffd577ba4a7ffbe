"""The all-to-all map: one universal untargeted trigger per family (the smallest that moves the
pooled clean images of every class out of their own class), where it sends each class, and
the rule that reads an all-to-all backdoor off that map.

An all-to-all backdoor (c → π(c) for every class, one trigger) is a trigger that moves every
class, each to a class of its own: the universal untargeted trigger finds it, and the classes
it sends the images to form a permutation. On a clean model (or an all-to-one one) the cheapest
trigger that moves every class crowds them onto a few easy classes (README, Detection). Rule:
per family, each class's most frequent new class d(c) counts when it takes at least
``min_share`` of the class's images and no other class counted goes to d(c); the pairs
(c, d(c)) are detected when at least ``min_sources`` (a share) of the classes count, in any
family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .data import Dataset
from .norm import BnaModel
from .problems import OWN, Problem, TriggerEstimate
from .reverse import succeeds
from .settings import DetectSettings


def universal_problems(n_classes: int, families: list[str]) -> list[Problem]:
    """Per family the universal untargeted problem on every class's images (none below 3
    classes, where every trigger that moves both classes is a permutation)."""
    if n_classes < 3:
        return []
    return [Problem(f, OWN, tuple(range(n_classes))) for f in families]


def class_map(
    model: BnaModel,
    data: Dataset,
    estimate: TriggerEstimate,
    input_range: tuple[float, float],
    n_classes: int,
    images_per_pass: int = 512,
) -> np.ndarray:
    """[K, K]: the share of each class's clean images (rows) that f answers with each class
    (columns) once the trigger is embedded."""
    out = np.zeros((n_classes, n_classes))
    y = np.asarray(data.y)
    for start in range(0, len(y), images_per_pass):
        x = torch.from_numpy(data.x[start : start + images_per_pass]).to(model.device)
        with torch.no_grad():
            got = model(estimate.apply(x, *input_range)).argmax(1).cpu().numpy()
        np.add.at(out, (y[start : start + len(x)], np.minimum(got, n_classes - 1)), 1.0)
    return out / np.maximum(out.sum(1, keepdims=True), 1.0)


def universal_maps(
    model: BnaModel,
    data: Dataset,
    found: list[TriggerEstimate],
    input_range: tuple[float, float],
    n_classes: int,
    success: float,
    images_per_pass: int = 512,
    share: float = 0.5,
    earlier: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[TriggerEstimate], dict[str, dict[str, Any]]]:
    """The estimates ``found`` without the universal ones, and per family the universal
    trigger's size, steps (of all its starts), class map (:func:`class_map`; None: it never
    succeeded) and the estimate itself (the shared Θ of :func:`map_group` is fitted on those
    whose map fires). A family solved from several starts (:func:`warm_starts`) keeps the
    successful trigger whose map the rule counts the most classes of (``share``: the rule's
    ``detect.map_share``), the smaller of equals: a smaller trigger from another start can be
    another, natural one (the digits CNN's all-to-all, seed 0: 6 pairs instead of 10).
    ``earlier``: maps of other starts, already measured, to choose among too."""
    maps = {f: dict(row) for f, row in (earlier or {}).items()}
    for e in found:
        if e.problem.target != OWN:
            continue
        was = maps.get(e.family)
        steps = e.steps + (was["steps"] if was else 0)
        m = None
        if succeeds(e, success):
            m = class_map(model, data, e, input_range, n_classes, images_per_pass)
        row = {"size": float(e.size), "steps": steps, "map": m, "estimate": e}
        if was is None or _rank(row, share) < _rank(was, share):
            maps[e.family] = row
        else:
            was["steps"] = steps
    return [e for e in found if e.problem.target != OWN], maps


def _rank(row: Mapping[str, Any], share: float) -> tuple[int, float]:
    """A universal trigger's place among its family's starts: successful ones first, the most
    classes the map rule counts, then the smallest."""
    if row["map"] is None:
        return (1, row["size"])
    return (-len(counted_pairs(row["map"], share)), row["size"])


def warm_starts(
    scores: Mapping[str, np.ndarray],
    found: Sequence[TriggerEstimate],
    n: int,
    success: float,
    floor: float = -np.inf,
) -> list[tuple[Problem, TriggerEstimate]]:
    """Per family the universal problem again from each of its ``n`` best-scoring successful
    pair triggers that score at least ``floor`` (``scores``: family -> [K, K] pair scores):
    from a random start the untargeted problem can settle on a model's natural strokes, and
    from one pair of an all-to-all backdoor it finds the backdoor's trigger (README,
    Detection)."""
    out: list[tuple[Problem, TriggerEstimate]] = []
    for fam, sc in scores.items():
        k = len(sc)
        pairs = {
            (e.problem.sources[0], e.problem.target): e
            for e in found
            if e.family == fam and len(e.problem.sources) == 1 and e.problem.target != OWN
            and e.problem.restart == 0 and succeeds(e, success)
        }  # fmt: skip
        ranked = sorted((p for p in pairs if sc[p] >= floor), key=lambda p: -sc[p])
        out += [
            (Problem(fam, OWN, tuple(range(k)), i + 1), pairs[p]) for i, p in enumerate(ranked[:n])
        ]
    return out


def destinations(shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class of a class map ([K, K]) its most frequent new class d(c) and the share of the
    class sent there ([K] each)."""
    k = len(shares)
    moved = np.where(np.eye(k, dtype=bool), -np.inf, shares)
    dest = moved.argmax(1)
    return dest, moved[np.arange(k), dest]


def counted_pairs(shares: np.ndarray, min_share: float) -> set[tuple[int, int]]:
    """The pairs (c, d(c)) of one family's class map ([K, K]) that the map rule counts: d(c)
    takes at least ``min_share`` of c's images, and no other class counted goes to d(c)."""
    k = len(shares)
    dest, share = destinations(shares)
    counted = share >= min_share
    named = np.bincount(dest[counted], minlength=k)
    return {(c, int(dest[c])) for c in range(k) if counted[c] and named[dest[c]] == 1}


def completed(shares: np.ndarray, pairs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """A fired map's ``pairs`` with each class they leave out sent to its most frequent new
    class d(c), where no counted class goes and no other class left out goes too: an
    all-to-all backdoor is a permutation, and a class its trigger moved less than the bar
    still moves to the one place left for it."""
    dest, share = destinations(shares)
    left = [c for c in range(len(shares)) if c not in {s for s, _ in pairs} and share[c] > 0]
    free = [c for c in left if dest[c] not in {d for _, d in pairs}]
    named = np.bincount(dest[free], minlength=len(shares)) if free else None
    return pairs | {(c, int(dest[c])) for c in free if named[dest[c]] == 1}


def map_pairs(
    maps: Mapping[str, np.ndarray], min_share: float, min_sources: float, complete: bool = False
) -> dict[tuple[int, int], str]:
    """The all-to-all map rule (module docstring) on each family's class map ([K, K]); pair ->
    the family whose map holds the most pairs (empty: the rule did not fire); ``complete``:
    with the classes the fired map left out (:func:`completed`)."""
    best: dict[tuple[int, int], str] = {}
    for fam, m in maps.items():
        pairs = counted_pairs(m, min_share)
        if pairs and len(pairs) >= math.ceil(min_sources * len(m)) and len(pairs) > len(best):
            best = dict.fromkeys(sorted(completed(m, pairs) if complete else pairs), fam)
    return best


def fired(maps: Mapping[str, Mapping[str, Any]], d: DetectSettings) -> dict[tuple[int, int], str]:
    """The map rule's pairs (:func:`map_pairs`, with ``d``'s settings) from the sweep's
    universal maps (:func:`universal_maps`; a family whose trigger never succeeded has none)."""
    given = {f: m["map"] for f, m in maps.items() if m["map"] is not None}
    return map_pairs(given, d.map_share, d.all_to_all_sources, d.map_complete)


def map_group(
    maps: Mapping[str, Mapping[str, Any]], sources: Mapping[int, Sequence[int]], d: DetectSettings
) -> tuple[list[int], list[str]]:
    """The targets that share one Θ (``fit.map_shared``): those whose every source is a pair
    of the map rule (none when fewer than two are), and the families whose map fires on its
    own: their universal triggers are the backdoor's, as the map shows (another family's
    may be a natural one that sends most classes to one class)."""
    mapped = fired(maps, d)
    group = [t for t, v in sorted(sources.items()) if v and all((s, t) in mapped for s in v)]
    if len(group) < 2:
        return [], []
    return group, [f for f in maps if fired({f: maps[f]}, d)]


def as_target(estimate: TriggerEstimate, target: int, sources: Sequence[int]) -> TriggerEstimate:
    """A shared group's universal trigger recorded as one target's: the same trigger, its
    problem named by that target and its sources (the fit file names real classes)."""
    p = estimate.problem
    return replace(estimate, problem=Problem(p.family, target, tuple(sources), p.restart))


def universal_record(maps: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What the fit file keeps of each family's universal trigger: its size, the steps of all
    its starts, the pair whose trigger it started from (``from``; absent: a random start), and
    per class its most frequent new class and the share sent there (no map: it never
    succeeded)."""
    out: dict[str, Any] = {}
    for fam, m in maps.items():
        row: dict[str, Any] = {"size": m["size"], "steps": m["steps"]}
        if "from" in m:  # started from this pair's trigger (warm_starts)
            row["from"] = [int(v) for v in m["from"]]
        if m["map"] is not None:
            dest, share = destinations(m["map"])
            row["destinations"] = dest.tolist()
            row["shares"] = [round(float(x), 4) for x in share]
        out[fam] = row
    return out
