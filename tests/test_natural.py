"""The natural-feature check measures what it says: a planted backdoor's trigger moves the
features less toward the target's than the target's own look does; a trigger that changes
nothing moves nothing; only estimates that succeed count; and the fit drops only a pooled or
vote rule's target all of whose triggers look natural."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bna_export.defend import _natural_check
from bna_export.detect import Detection
from bna_export.natural import (
    alignment,
    class_means,
    layer_features,
    natural_targets,
    own_look,
    target_alignments,
)
from bna_export.reverse import TriggerEstimate
from bna_export.settings import Settings, with_overrides
from bna_export.sweep import SweepResult

SRC = (1, 2, 3, 4)


def blend_to_target(data, target: int, alpha: float, success: float = 1.0) -> TriggerEstimate:
    """A blend toward the mean clean image of ``target`` (α = 1: the target's own look)."""
    own = own_look(data, target, SRC)
    params = {**own.params, "alpha": np.array([alpha], np.float32)}
    return dataclasses.replace(own, size=alpha, success=success, params=params)


@pytest.fixture(scope="module")
def setup(patch_estimate, patch_scenario):
    model, ests = patch_estimate
    data = patch_scenario.defender
    y = torch.from_numpy(data.y)
    means = class_means(layer_features(model, torch.from_numpy(data.x)), y, 5)
    return model, ests[0], data, means


def test_class_means_are_each_class_s_mean_feature(setup):
    model, _, data, means = setup
    feats = layer_features(model, torch.from_numpy(data.x))
    assert len(feats) == len(means) == len(model.layers) - 1  # every BN layer but the first
    for f, mu in zip(feats, means, strict=True):
        for c in range(5):
            torch.testing.assert_close(mu[c], f[torch.from_numpy(data.y == c)].mean(0))


def test_the_backdoor_aligns_far_less_than_the_target_s_own_look(setup):
    model, backdoor, data, means = setup
    planted = alignment(model, data, backdoor, means, (0.0, 1.0))
    own = alignment(model, data, own_look(data, 0, SRC), means, (0.0, 1.0))
    # this 3-BN model counts 2 layers; the digits models' backdoors align -0.22 to 0.24 over
    # 8 layers (README, Detection), this one 0.31 against its target's own look at 0.74
    assert planted < own - 0.3 and own > 0.3


def test_a_trigger_that_changes_nothing_moves_nothing(setup):
    model, _, data, means = setup
    assert alignment(model, data, blend_to_target(data, 0, 0.0), means, (0.0, 1.0)) == 0.0


def test_each_family_keeps_its_smallest_alignment_of_the_estimates_that_succeed(setup):
    model, backdoor, data, _ = setup
    natural = blend_to_target(data, 0, 1.0)
    failed = blend_to_target(data, 0, 0.0, success=0.1)  # would score 0.0 if it counted
    got = target_alignments(model, data, [natural, failed, backdoor], (0.0, 1.0), 0.9)
    assert set(got) == {0} and set(got[0]) == {"blend", "patch"}
    assert got[0]["blend"] > got[0]["patch"]
    only = target_alignments(model, data, [natural, failed], (0.0, 1.0), 0.9)
    assert natural_targets(only, 0.5) == [0]
    assert natural_targets(got, 0.5) == []  # its backdoor's patch (0.31) keeps it
    assert natural_targets({3: {}}, -1.0) == []  # no estimate succeeded: no evidence, kept


def test_the_fit_drops_a_pooled_or_vote_target_only_when_every_trigger_looks_natural(setup):
    model, backdoor, data, _ = setup
    natural = own_look(data, 0, SRC)
    settings = with_overrides(Settings(), ["detect.natural_alignment=0.5"])

    def check(estimates, column=()):
        det = Detection({}, {}, {}, [(s, 0) for s in SRC], all_to_one={0: "patch"})
        det.column = list(column)
        sweep = SweepResult([], {}, None, det)
        kept = _natural_check(model, data, sweep, {0: list(SRC)}, estimates, (0.0, 1.0), settings)
        return kept, sweep

    kept, sweep = check([natural])
    assert kept == {} and sweep.natural_dropped == (0,) and sweep.natural[0]["blend"] > 0.5
    kept, sweep = check([natural, backdoor])  # the backdoor's patch aligns 0.31 < 0.5
    assert (
        kept == {0: list(SRC)}
        and sweep.natural_dropped == ()
        and set(sweep.natural[0])
        == {
            "blend",
            "patch",
        }
    )
    kept, sweep = check([natural], column=[0])  # the column rule's targets are not checked
    assert kept == {0: list(SRC)} and sweep.natural == {}
    settings = Settings()  # off by default (README, Detection): nothing computed or dropped
    kept, sweep = check([natural])
    assert kept == {0: list(SRC)} and sweep.natural == {} and sweep.natural_dropped == ()


def test_features_computed_once_give_the_same_alignment(setup):
    model, backdoor, data, means = setup
    every = layer_features(model, torch.from_numpy(data.x))
    alone = alignment(model, data, backdoor, means, (0.0, 1.0))
    assert alignment(model, data, backdoor, means, (0.0, 1.0), every) == pytest.approx(alone)
