"""Rules that decide about a target from its sources' trigger sizes alone: the vote rule, which
finds an all-to-one target, and the paper's intrinsic-backdoor check, which prunes its sources.

Vote rule: an all-to-one backdoor's trigger is, for most sources, the cheapest way out of the
source, while a natural easy target is the cheapest for a few (each class has its own nearest
neighbours). Per family, each source's smallest trigger votes for its target; a target that gets
at least a share of the votes of the sources that could give it one, in at least two families,
and whose triggers are clearly smaller than their sources' typical one in one of them (the
effect floor: a clean model's *hub*, a class every source reaches a little more cheaply, gets
the votes but not the effect), is detected with every source (the intrinsic check then
prunes). Pairs over the threshold from :data:`VOTE_PAIRS` sources in a family stand for the
second family there. This holds where sizes alone do not separate: on the digits CNN a central
3×3 patch costs about what the few pixels that turn one digit into another cost, yet it is the
cheapest way out of 7 of 9 sources (README, Detection). Exhaustive sweeps only, of more than
:data:`VOTE_MIN_SOURCES` classes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

VOTE_MIN_SOURCES = 5
"""Fewer possible voters than this agree too easily by chance (two of two sources half the
time with three classes), so the vote rule leaves such targets alone."""


VOTE_PAIRS = 2
"""Sources whose pair to a target passes the threshold in a family for that family's votes
alone to detect the target (``paired`` of :func:`vote_targets`). One such pair is what a natural
neighbour gives: on the small digits ResNet the blend family's natural pair 0 → 8 (×6.6) landed
on its hub 8, most sources' cheapest blend, and one pair would have made 8 a false target with
every source (README, Detection)."""


def row_minimum_votes(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per target ([K] each): how many sources' smallest trigger goes to it, and how many
    sources could vote for it (every source but t with at least one solved pair)."""
    z = np.asarray(sizes, dtype=np.float64)
    solved = ~np.isnan(z)
    has = solved.any(1)
    best = np.where(solved, z, np.inf).argmin(1)
    votes = np.bincount(best[has], minlength=len(z))
    return votes, int(has.sum()) - has.astype(np.int64)


def vote_targets(
    sizes: Mapping[str, np.ndarray],
    share: float,
    families: int,
    effects: Mapping[str, np.ndarray] | None = None,
    min_effect: float = 1.0,
    paired: Mapping[str, set[int]] | None = None,
) -> dict[int, tuple[float, str]]:
    """The vote rule (module docstring): targets that at least ``share`` of their possible
    voters name as their smallest trigger in at least ``families`` of the families (all of
    them when fewer are given) and, with ``effects`` (family -> [K], :func:`bna_export.detect.
    effects`), whose effect reaches ``min_effect`` in one of those families; target -> (its
    largest share, the family that gave it). ``paired`` (family -> the targets with pairs
    over the threshold from :data:`VOTE_PAIRS` sources in it, and with ``detect.pooled_vote``
    its pooled outliers): that evidence stands for the second family, so one family's votes do
    when the target has it in that family and reaches the floor there (README, Detection: a
    warp found by the blend family alone, three pairs)."""
    shares: dict[int, list[tuple[float, str]]] = {}
    for fam, z in sizes.items():
        votes, voters = row_minimum_votes(z)
        ok = (voters >= VOTE_MIN_SOURCES) & (votes >= share * np.maximum(voters, 1))
        for t in np.flatnonzero(ok).tolist():
            shares.setdefault(t, []).append((float(votes[t] / voters[t]), fam))
    need = min(families, len(sizes))

    def floor(t: int, f: str) -> bool:
        return effects is None or bool(effects[f][t] >= min_effect)

    return {
        t: max(v)
        for t, v in shares.items()
        if (len(v) >= need and any(floor(t, f) for _, f in v))
        or any(t in (paired or {}).get(f, ()) and floor(t, f) for _, f in v)
    }


def intrinsic_check(pair_sizes: Mapping[int, float], pooled_size: float, ratio: float) -> list[int]:
    """Sources of one target to keep (paper, appendix C). When the trigger re-estimated on the
    pooled images of all detected sources is more than ``ratio`` times the largest per-pair
    trigger, the sources do not share one backdoor: keep only the source with the smallest
    trigger (the others' small triggers are intrinsic, natural features of their classes)."""
    if len(pair_sizes) < 2 or not pooled_size > ratio * max(pair_sizes.values()):
        return sorted(pair_sizes)
    return [min(pair_sizes, key=lambda s: (pair_sizes[s], s))]
