"""The all-to-all map (bna_export/universal.py): the rule on known maps, and the universal
untargeted trigger solved on the tests' all-to-all and clean models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bna_export.model import adapt_module
from bna_export.problems import OWN, away_of
from bna_export.reverse import Problem, TriggerEstimate, reverse_engineer, succeeds
from bna_export.settings import DetectSettings
from bna_export.universal import (
    as_target,
    class_map,
    map_group,
    map_pairs,
    universal_maps,
    universal_problems,
    warm_starts,
)


def shares(dest: list[int], share: float = 0.8) -> np.ndarray:
    """A class map sending ``share`` of class c to dest[c] and the rest nowhere else."""
    k = len(dest)
    m = np.eye(k) * (1 - share)
    m[np.arange(k), dest] += share
    return m


def test_the_map_rule_takes_a_permutation_and_nothing_that_crowds():
    k = 10
    perm = [(c + 1) % k for c in range(k)]
    assert map_pairs({"perturbation": shares(perm)}, 0.5, 0.5) == {
        (c, (c + 1) % k): "perturbation" for c in range(k)
    }
    hub = [8] * 8 + [2, 8]  # a clean model: most classes onto one easy class
    hub[8] = 2
    assert map_pairs({"perturbation": shares(hub)}, 0.5, 0.5) == {}
    a2o = [7] * 7 + [0] + [7] * 2  # an all-to-one backdoor: every class to 7 (7 itself to 0)
    assert map_pairs({"patch": shares(a2o)}, 0.5, 0.5) == {}
    # a class counts only when enough of it moves, and only if no other class goes there too
    half = [1, 2, 3, 4, 5, 6, 0, 0, 0, 0]
    assert len(map_pairs({"blend": shares(half)}, 0.5, 0.5)) == 6
    assert map_pairs({"blend": shares(half)}, 0.5, 0.7) == {}
    assert map_pairs({"blend": shares(perm, 0.4)}, 0.5, 0.5) == {}
    # the family whose map holds the most pairs names them
    both = map_pairs({"patch": shares(half), "perturbation": shares(perm)}, 0.5, 0.5)
    assert set(both.values()) == {"perturbation"} and len(both) == k


def test_a_fired_map_sends_the_classes_it_left_out_where_no_counted_class_goes():
    k = 10
    perm = shares([(c + 1) % k for c in range(k)])
    perm[0] = 0
    perm[0, [0, 1, 5]] = [0.35, 0.45, 0.2]  # class 0 moves less than the bar, to the free class
    assert (0, 1) not in map_pairs({"perturbation": perm}, 0.5, 0.5)
    full = map_pairs({"perturbation": perm}, 0.5, 0.5, complete=True)
    assert set(full) == {(c, (c + 1) % k) for c in range(k)}
    # a class left out whose new class is taken by a counted one, or shared, is not added
    perm[0, [1, 5]] = [0.2, 0.45]
    assert (0, 5) not in map_pairs({"perturbation": perm}, 0.5, 0.5, complete=True)
    half = shares([1, 2, 3, 4, 5, 6, 0, 0, 0, 0])
    assert len(map_pairs({"blend": half}, 0.5, 0.5, complete=True)) == 6
    # the rule must fire first: completion never makes a map fire
    assert map_pairs({"blend": shares([1, 0, 3, 2, 5, 4, 7, 6, 9, 8], 0.4)}, 0.5, 0.5, True) == {}


def test_the_targets_whose_every_source_is_mapped_share_one_theta():
    k = 10
    maps = {
        "patch": {"map": None},
        "perturbation": {"map": shares([(c + 1) % k for c in range(k)])},
    }
    sources = {(c + 1) % k: [c] for c in range(k)}
    assert map_group(maps, sources, DetectSettings()) == (list(range(k)), ["perturbation"])
    both = {**maps, "blend": {"map": shares([(c + 1) % k for c in range(k)])}}
    assert map_group(both, sources, DetectSettings())[1] == ["perturbation", "blend"]
    # a target with a source the map does not send there is fitted on its own
    sources[5] = [4, 8]
    assert 5 not in map_group(maps, sources, DetectSettings())[0]
    # one mapped target, or a map that did not fire, is no group
    assert map_group(maps, {1: [0], 7: [3]}, DetectSettings()) == ([], [])
    assert map_group({"patch": {"map": None}}, sources, DetectSettings()) == ([], [])
    e = TriggerEstimate(
        Problem("perturbation", OWN, tuple(range(k)), 2), 1.5, 0.9, 10, {}, (1, 4, 4)
    )
    mine = as_target(e, 3, [2])
    assert mine.problem == Problem("perturbation", 3, (2,), 2) and mine.size == e.size
    assert e.problem.target == OWN


def test_an_image_of_a_universal_problem_leaves_its_own_class():
    labels = torch.tensor([3, 1, 4, 1, 5])
    index = torch.tensor([[0, 1], [2, 3], [4, 0]])
    away = torch.tensor([-1, 2, OWN])  # targeted, untargeted from class 2, universal
    assert away_of(away, index, labels).tolist() == [-1, -1, 2, 2, 5, 3]
    assert universal_problems(2, ["patch"]) == []
    assert [p.sources for p in universal_problems(3, ["patch", "blend"])] == [(0, 1, 2)] * 2


@pytest.mark.parametrize(("scenario", "truth"), [("a2a_scenario", True), ("clean_scenario", False)])
def test_the_universal_trigger_maps_an_all_to_all_backdoor_and_not_a_clean_model(
    scenario, truth, request
):
    """The tests' 8-class models: the all-to-all one (c -> c + 1) gives its permutation, the
    clean one nothing."""
    sc = request.getfixturevalue(scenario)
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    (est,) = reverse_engineer(model, sc.defender, universal_problems(8, ["perturbation"]), (0, 1))
    assert est.problem.target == OWN and succeeds(est, 0.95)
    m = class_map(model, sc.defender, est, (0.0, 1.0), 8)
    np.testing.assert_allclose(m.sum(1), 1.0)
    moved = 1 - np.diag(m)[sc.defender.y].mean()
    assert moved >= 0.9  # what the solver's success says, on the whole pool
    found = set(map_pairs({"perturbation": m}, 0.5, 0.5))
    if truth:
        true = {(c, (c + 1) % 8) for c in range(8)}
        assert found <= true and len(found) >= 6, sorted(found)
    else:
        assert found == set(), sorted(found)


def _estimate(fam: str, target: int, sources: tuple[int, ...], size: float, success: float):
    return TriggerEstimate(Problem(fam, target, sources), size, success, 100, {}, (1, 4, 4))


def test_the_universal_problem_starts_again_from_each_family_s_best_pairs():
    k = 4
    scores = {"patch": np.full((k, k), np.nan), "blend": np.full((k, k), np.nan)}
    scores["patch"][[0, 1, 2, 3], [1, 2, 3, 0]] = [9.0, 2.0, 5.0, 7.0]
    scores["blend"][0, 1] = 3.0
    found = [
        _estimate("patch", 1, (0,), 2.0, 1.0),
        _estimate("patch", 2, (1,), 3.0, 1.0),
        _estimate("patch", 3, (2,), 3.0, 1.0),
        _estimate("patch", 0, (3,), 3.0, 0.5),  # never succeeded: no start
        _estimate("patch", 1, (0, 2, 3), 1.0, 1.0),  # pooled: not a pair
        _estimate("blend", 1, (0,), 0.1, 1.0),
    ]
    starts = warm_starts(scores, found, 2, 0.95)
    assert [(p, (e.problem.sources, e.problem.target)) for p, e in starts] == [
        (Problem("patch", OWN, (0, 1, 2, 3), 1), ((0,), 1)),
        (Problem("patch", OWN, (0, 1, 2, 3), 2), ((2,), 3)),
        (Problem("blend", OWN, (0, 1, 2, 3), 1), ((0,), 1)),
    ]
    assert warm_starts(scores, found, 0, 0.95) == []
    floored = warm_starts(scores, found, 2, 0.95, floor=6.0)  # 2 -> 3 scores 5: no start
    assert [p for p, _ in floored] == [Problem("patch", OWN, (0, 1, 2, 3), 1)]


def test_a_universal_trigger_started_from_a_backdoor_pair_keeps_the_map(a2a_scenario):
    """The tests' all-to-all model: the universal problem started from the 0 -> 1 pair's trigger
    maps the backdoor; of a family's starts the one whose map counts the most classes is kept
    (the smaller of equals), its steps counted with the others'."""
    sc, k = a2a_scenario, 8
    model = adapt_module(sc.net, torch.from_numpy(sc.test.x[:2]))
    (pair,) = reverse_engineer(model, sc.defender, [Problem("perturbation", 1, (0,))], (0, 1))
    universal = universal_problems(k, ["perturbation"])
    started = [Problem("perturbation", OWN, tuple(range(k)), 1)]
    (warm,) = reverse_engineer(model, sc.defender, started, (0, 1), start=[pair])
    (cold,) = reverse_engineer(model, sc.defender, universal, (0, 1))
    assert succeeds(warm, 0.95)
    counted = {}
    for e in (cold, warm):
        _, alone = universal_maps(model, sc.defender, [e], (0.0, 1.0), k, 0.95)
        counted[id(e)] = set(map_pairs({"perturbation": alone["perturbation"]["map"]}, 0.5, 0.5))
    assert counted[id(warm)] <= {(c, (c + 1) % k) for c in range(k)} and counted[id(warm)]
    _, maps = universal_maps(model, sc.defender, [cold, warm], (0.0, 1.0), k, 0.95)
    best = min((cold, warm), key=lambda e: (-len(counted[id(e)]), e.size))
    assert maps["perturbation"]["estimate"] is best
    assert maps["perturbation"]["steps"] == cold.steps + warm.steps
    _, first = universal_maps(model, sc.defender, [cold], (0.0, 1.0), k, 0.95)
    _, merged = universal_maps(model, sc.defender, [warm], (0.0, 1.0), k, 0.95, earlier=first)
    assert merged["perturbation"]["estimate"] is best  # the same choice from measured maps
    assert merged["perturbation"]["steps"] == cold.steps + warm.steps
    assert first["perturbation"]["steps"] == cold.steps  # the earlier maps are not changed
    # a start that never succeeded is not kept over one that did
    failed = dataclasses.replace(warm, size=0.01, success=0.1)
    _, maps = universal_maps(model, sc.defender, [warm, failed], (0.0, 1.0), k, 0.95)
    assert maps["perturbation"]["estimate"] is warm
