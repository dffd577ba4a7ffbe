import numpy as np
import pytest
import torch

from bna_export.fit import _jitter, fit_thetas, g_logits, predict_mitigated
from bna_export.model import adapt_module
from bna_export.reverse import Problem, reverse_engineer
from bna_export.settings import FitSettings

SRC = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def setup(patch_scenario):
    model = adapt_module(patch_scenario.net, torch.from_numpy(patch_scenario.test.x[:2]))
    ests = reverse_engineer(
        model, patch_scenario.defender, [Problem("patch", 0, tuple(SRC))], (0.0, 1.0)
    )
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


def test_jitter_shifts_within_bounds():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    out = _jitter(x, 1, np.random.default_rng(0))
    assert out.shape == x.shape
    assert torch.equal(_jitter(x, 0, np.random.default_rng(0)), x)
    # every output row is some input row shifted by at most one pixel
    for n in range(2):
        diffs = [
            (out[n, 0] - torch.roll(x[n, 0], (dy, dx), (0, 1))).abs()[1:-1, 1:-1].max()
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
        assert min(diffs) == 0
