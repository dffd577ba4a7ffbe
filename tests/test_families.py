"""Trigger families: one interface (start, decode/encode, embed, size, scaled) that the solver,
the fit and TriggerEstimate.apply share; each family solves a trigger of its own kind."""

import numpy as np
import pytest
import torch

from bna_export.families import FAMILIES
from bna_export.lab.attacks import Trigger
from bna_export.model import adapt_module
from bna_export.reverse import Problem, TriggerEstimate, attack_success, reverse_engineer
from bna_export.settings import ReverseSettings

SHAPE = (3, 12, 12)


@pytest.fixture
def x(rng):
    return torch.from_numpy(rng.random((2, 4, *SHAPE)).astype(np.float32) * 0.8 + 0.1)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_embeds_decodes_and_sizes_alike(name, x):
    fam = FAMILIES[name]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    raw = [fam.start(g, SHAPE, 1.0, 0.001) for g in gens]
    stacked = {k: torch.stack([r[k] for r in raw]) for k in fam.keys}
    trig = fam.decode(stacked, 0.0, 1.0)
    assert set(trig) == set(fam.keys)
    out = fam.embed(trig, x, 0.0, 1.0)
    assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0
    size = fam.size(trig)
    assert size.shape == (2,) and (size >= 0).all()
    assert (size <= fam.largest(SHAPE, 0.0, 1.0) + 1e-6).all()
    # encode inverts decode (warm starts), scaled strengthens, and the two problems differ
    again = fam.decode(fam.encode(trig, 0.0, 1.0), 0.0, 1.0)
    for k in fam.keys:
        torch.testing.assert_close(again[k], trig[k], atol=1e-4, rtol=1e-4)
    assert (fam.size(fam.scaled(trig, 2.0)) >= size - 1e-6).all()
    assert not torch.equal(out[0], fam.embed({k: v[[1]] for k, v in trig.items()}, x[:1], 0, 1)[0])
    # one problem embedded alone gives what the batch gave: rows are independent
    alone = fam.embed({k: v[[0]] for k, v in trig.items()}, x[:1], 0.0, 1.0)
    torch.testing.assert_close(alone[0], out[0])


def test_zero_triggers_leave_images_alone(x):
    one = x[:1]
    zero = {
        "patch": {"mask": torch.zeros(1, 1, 12, 12), "pattern": torch.ones(1, *SHAPE)},
        "perturbation": {"pattern": torch.zeros(1, *SHAPE)},
        "blend": {"alpha": torch.zeros(1, 1), "pattern": torch.ones(1, *SHAPE)},
        "warp": {"flow": torch.zeros(1, 2, 4, 4)},
    }
    for name, trig in zero.items():
        torch.testing.assert_close(FAMILIES[name].embed(trig, one, 0.0, 1.0), one)
        assert float(FAMILIES[name].size(trig)[0]) == 0.0


def test_blend_and_warp_reproduce_the_attacks_they_model(rng):
    """The blend family with α and pattern of a blend attack, and the warp family with the
    attack's control grid in pixels, give the attacked images (a warp up to the border)."""
    x = rng.random((3, *SHAPE)).astype(np.float32)
    blend = Trigger("blend", SHAPE, alpha=0.2, seed=3)
    trig = {"alpha": torch.tensor([[0.2]]), "pattern": torch.from_numpy(blend.pattern)[None]}
    got = FAMILIES["blend"].embed(trig, torch.from_numpy(x)[None], 0.0, 1.0)[0]
    np.testing.assert_allclose(got.numpy(), blend.apply(x), atol=1e-6)
    warp = Trigger("warp", SHAPE, strength=0.5, seed=3)
    h = SHAPE[1]
    flow = torch.from_numpy(warp.pattern[0] * warp.strength / h * (h - 1) / 2)[None]
    got = FAMILIES["warp"].embed({"flow": flow}, torch.from_numpy(x)[None], 0.0, 1.0)[0]
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(got.numpy()[inner], warp.apply(x)[inner], atol=1e-4)


@pytest.fixture(scope="module")
def model(patch_scenario):
    return adapt_module(patch_scenario.net, torch.from_numpy(patch_scenario.test.x[:2]))


@pytest.mark.parametrize("name", ["blend", "warp"])
def test_new_families_solve_a_pooled_problem_seeded_and_recorded_truthfully(
    name, model, patch_scenario
):
    data = patch_scenario.defender
    settings = ReverseSettings(steps=150, min_steps=30)
    problem = Problem(name, 0, (1, 2, 3, 4))
    (est,) = reverse_engineer(model, data, [problem], (0.0, 1.0), settings, seed=2)
    assert est.family == name and set(est.params) == set(FAMILIES[name].keys)
    assert 0 < est.size < FAMILIES[name].largest(est.shape, 0.0, 1.0)
    xs = torch.from_numpy(data.x[np.isin(data.y, [1, 2, 3, 4])])
    assert attack_success(model, xs, est, 0, (0.0, 1.0)) == pytest.approx(est.success)
    (again,) = reverse_engineer(model, data, [problem], (0.0, 1.0), settings, seed=2)
    for k in est.params:
        np.testing.assert_array_equal(est.params[k], again.params[k])


def test_warm_start_and_another_forward(model, patch_scenario):
    """A problem started from a successful estimate of its family succeeds at once (a grow
    family stops at its first step); ``forward`` replaces f (here: f with inverted logits,
    under which the old trigger no longer reaches the target)."""
    data = patch_scenario.defender
    settings = ReverseSettings(steps=100, min_steps=10)
    p = Problem("perturbation", 0, (1, 2))
    (first,) = reverse_engineer(model, data, [p], (0.0, 1.0), settings)
    assert first.success >= 0.95
    (warm,) = reverse_engineer(model, data, [p], (0.0, 1.0), settings, start=[first])
    assert warm.steps == 1 and warm.success == pytest.approx(first.success)
    np.testing.assert_allclose(warm.pattern, first.pattern, atol=1e-6)
    calls = []

    def flipped(xb: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        calls.append(int(which.max()))
        return -model(xb)

    (other,) = reverse_engineer(
        model, data, [p], (0.0, 1.0), settings, forward=flipped, start=[first]
    )
    assert calls and max(calls) == 0 and other.steps > 1


def test_estimates_of_every_family_apply_as_the_solver_embeds(rng):
    x = torch.from_numpy(rng.random((5, *SHAPE)).astype(np.float32))
    for name, fam in FAMILIES.items():
        raw = fam.start(torch.Generator().manual_seed(1), SHAPE, 1.0, 0.05)
        trig = fam.decode({k: v[None] for k, v in raw.items()}, 0.0, 1.0)
        est = TriggerEstimate(
            Problem(name, 0, (1,)), 1.0, 1.0, 1, {k: v[0].numpy() for k, v in trig.items()}, SHAPE
        )
        torch.testing.assert_close(est.apply(x, 0.0, 1.0), fam.embed(trig, x[None], 0, 1)[0])


def test_the_sweeps_blend_is_penalised_in_pixels_of_mask_mass_and_stops_at_its_cap(
    model, patch_scenario
):
    """With ``blend_pixels`` λ multiplies α·H·W (a patch mask of α at every pixel), so after
    its first success the blend shrinks to the success boundary as a patch does, instead of
    keeping the first success's α; ``blend_steps`` ends it."""
    trig = {"alpha": torch.tensor([[0.25]]), "pattern": torch.zeros((1, 1, 10, 12))}
    blend = FAMILIES["blend"]
    assert blend.penalty(trig, ReverseSettings(blend_pixels=True)).item() == pytest.approx(30)
    assert blend.penalty(trig, ReverseSettings()).item() == pytest.approx(0.25)
    data = patch_scenario.defender
    problem = Problem("blend", 0, (1, 2, 3, 4))
    short, long = (
        reverse_engineer(
            model,
            data,
            [problem],
            (0.0, 1.0),
            ReverseSettings(steps=400, blend_pixels=True, blend_steps=n),
            seed=1,
        )[0]
        for n in (40, 300)
    )
    assert short.steps == 40 and long.steps <= 300
    assert short.success >= 0.95 and long.success >= 0.95
    assert long.size < 0.8 * short.size
