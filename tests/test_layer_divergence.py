"""The per-layer divergence the fit file keeps for the report: it measures what it says (Θ = f's
own normalisation changes nothing; a trigger that changes no pixel gives only the sampling floor;
a real one moves the deep layers past it), and it is seeded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bna_export.fit import fit_thetas
from bna_export.layer_divergence import layer_divergence
from bna_export.settings import FitSettings

SRC = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def setup(patch_estimate):
    model, ests = patch_estimate
    own = [la.f_theta()[None] for la in model.layers]  # Θ = f's own normalisation
    return model, ests, own


def measure(model, data, ests, thetas, seed=0):
    """(floor, before, after)."""
    return layer_divergence(model, data, [0], {0: SRC}, {0: ests}, thetas, (0.0, 1.0), seed=seed)


def test_f_as_its_own_repair_changes_nothing(setup, patch_scenario):
    model, ests, own = setup
    floor, before, after = measure(model, patch_scenario.defender, ests, own)
    assert floor.shape == before.shape == after.shape == (1, len(model.layers))
    np.testing.assert_allclose(after, before, atol=0.05)  # only the two subsamples differ


def test_a_trigger_moves_the_deep_layers_and_no_trigger_only_the_floor(setup, patch_scenario):
    model, ests, own = setup
    floor, before, _ = measure(model, patch_scenario.defender, ests, own)
    nothing = dataclasses.replace(ests[0], params={**ests[0].params})
    nothing.params["mask"] = np.zeros_like(nothing.params["mask"])
    floor2, still, _ = measure(model, patch_scenario.defender, [nothing], own)
    # a trigger that changes no pixel gives the floor (the two differ by their subsamples)
    np.testing.assert_allclose(still, floor2, atol=0.05)
    np.testing.assert_allclose(floor, floor2, atol=0.05)
    assert before[0, -1] > floor[0, -1] + 0.2, (before, floor)


def test_it_is_seeded(setup, patch_scenario):
    model, ests, own = setup
    runs = [measure(model, patch_scenario.defender, ests, own, seed=3) for _ in range(2)]
    for a, b in zip(runs[0], runs[1], strict=True):
        assert np.array_equal(a, b)


def test_each_row_is_its_targets_and_a_fitted_repair_moves_the_deep_layer_back(
    setup, patch_scenario
):
    """Two targets whose class numbers are not their rows: row 0 (class 3) keeps f's own
    normalisation, row 1 (class 0, the attacked one) a fitted Θ; only row 1's "after" moves,
    and at the deepest layer it moves back towards p."""
    model, ests, own = setup
    data = patch_scenario.defender
    fitted = fit_thetas(model, data, [0], {0: SRC}, {0: ests}, (0.0, 1.0), FitSettings(epochs=10))
    thetas = [torch.cat([o, f]) for o, f in zip(own, fitted.thetas, strict=True)]
    sources = {3: [1, 2, 4], 0: SRC}
    _, before, after = layer_divergence(
        model, data, [3, 0], sources, {3: ests, 0: ests}, thetas, (0.0, 1.0)
    )
    assert before.shape == (2, len(model.layers))
    np.testing.assert_allclose(after[0], before[0], atol=0.05)  # class 3: f's own Θ
    assert after[1, -1] < before[1, -1] - 0.1, (before, after)  # class 0: repaired
    alone = measure(model, data, ests, fitted.thetas)
    np.testing.assert_allclose(after[1], alone[2][0], atol=0.05)  # the same as fitted alone
