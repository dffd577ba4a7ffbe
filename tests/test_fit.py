import numpy as np
import pytest
import torch

from bna_export.fit import _start, _step_loss, fit_thetas
from bna_export.mitigated import g_logits, predict_mitigated
from bna_export.reverse import Problem, reverse_engineer
from bna_export.settings import FitSettings, HistogramSettings
from bna_export.variants import Variants

SRC = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def setup(patch_estimate):
    model, ests = patch_estimate
    return model, ests


def test_divergence_only_fit_lowers_the_paper_objective(setup, patch_scenario):
    """With the paper's objective alone (no CE terms), the summed TV falls."""
    model, ests = setup
    settings = FitSettings(epochs=8, source_ce_weight=0.0, target_ce_weight=0.0)
    res = fit_thetas(model, patch_scenario.defender, [0], {0: SRC}, {0: ests}, (0.0, 1.0), settings)
    assert len(res.history) == 8
    assert res.history[-1] < 0.9 * res.history[0]
    assert [tuple(t.shape) for t in res.thetas] == [(1, 4, 8), (1, 4, 16), (1, 4, 64)]
    assert (res.thetas[0][:, 1] > 0).all() and (res.thetas[0][:, 2] <= res.thetas[0][:, 3]).all()


def test_a_targets_terms_do_not_depend_on_the_targets_fitted_with_it(setup, patch_scenario):
    """One step's loss with a target fitted twice over (two identical blocks) is twice its loss
    alone: each cross-entropy term counts per target, as the divergence does, so a target's
    balance between them does not change with the number of targets detected beside it."""
    model, ests = setup
    data = patch_scenario.defender
    settings = FitSettings(samples_per_channel=10**9, jitter=0, clean_ce_weight=0.5)
    losses = []
    for targets in ([0], [0, 0]):
        st, params = _start(model, data, {0: SRC}, settings, HistogramSettings(), None, targets, 0)
        variants = Variants(targets, {0: ests}, settings, (0.0, 1.0))
        images = np.tile(data.of_classes(SRC)[:8], (len(targets), 1))
        shown = np.tile(np.resize(variants.triggered[0], 8), (len(targets), 1))
        keep_pairs = np.tile(np.arange(len(variants.keep[0]) * 2), (len(targets), 1))
        with torch.no_grad():
            loss = _step_loss(st, params.thetas(), variants, images, shown, keep_pairs)
        losses.append(float(loss))
    assert losses[0] > 0
    assert losses[1] == pytest.approx(2 * losses[0], rel=1e-5)


def test_fit_is_seeded(setup, patch_scenario):
    model, ests = setup
    settings = FitSettings(epochs=2)
    runs = [
        fit_thetas(
            model, patch_scenario.defender, [0], {0: SRC}, {0: ests}, (0.0, 1.0), settings, seed=5
        )
        for _ in range(2)
    ]
    for a, b in zip(runs[0].thetas, runs[1].thetas, strict=True):
        assert torch.equal(a, b)


def test_routing_rule(setup, patch_scenario):
    """Samples f does not send to a target keep f's answer; routed ones take g_t's if it
    differs, and are flagged exactly then."""
    model, ests = setup
    res = fit_thetas(
        model, patch_scenario.defender, [0], {0: SRC}, {0: ests}, (0.0, 1.0), FitSettings(epochs=5)
    )
    x = np.concatenate([patch_scenario.test.x[:40], patch_scenario.triggered["x"][:40]])
    pred = predict_mitigated(model, [0], res.thetas, x, batch=16)
    with torch.no_grad():
        f = model(torch.from_numpy(x)).numpy()
    g = g_logits(model, res.thetas, 1, x)[0]
    routed = f.argmax(1) == 0
    expect_flag = routed & (g.argmax(1) != 0)
    np.testing.assert_array_equal(pred.triggered, expect_flag)
    np.testing.assert_array_equal(pred.label, np.where(expect_flag, g.argmax(1), f.argmax(1)))
    np.testing.assert_allclose(pred.logits, np.where(expect_flag[:, None], g, f), atol=1e-5)
    # no targets: f unchanged
    plain = predict_mitigated(model, [], None, x)
    assert not plain.triggered.any()
    np.testing.assert_array_equal(plain.label, f.argmax(1))


def test_refresh_adds_the_triggers_that_still_work_on_g_t(setup, patch_scenario):
    """Every ``refresh_every`` epochs the fit asks for new triggers against the current Θ
    (routed by target index) and fits on them too; they are returned with the given ones."""
    model, ests = setup
    calls = []

    def refresh(targets, thetas, triggers, round_):
        calls.append((list(targets), [tuple(t.shape) for t in thetas], len(triggers[0])))
        assert round_ == len(calls)
        (new,) = reverse_engineer(
            model,
            patch_scenario.defender,
            [Problem("perturbation", 0, tuple(SRC), 1000 * len(calls))],
            (0.0, 1.0),
        )
        return {0: [new]}

    settings = FitSettings(epochs=7, refresh_every=3)
    res = fit_thetas(
        model, patch_scenario.defender, [0], {0: SRC}, {0: ests}, (0.0, 1.0), settings,
        refresh=refresh,
    )  # fmt: skip
    assert [c[0] for c in calls] == [[0], [0]]  # after epochs 3 and 6
    assert calls[0][1] == [(1, 4, 8), (1, 4, 16), (1, 4, 64)] and calls[1][2] == len(ests) + 1
    assert res.triggers[0][: len(ests)] == ests and len(res.triggers[0]) == len(ests) + 2
