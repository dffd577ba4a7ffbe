"""The pair sweep: weighted medians of a sampled sweep, untargeted problems, and the screen that
finds all-to-one and all-to-all backdoors while solving a number of problems linear in K."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bna_export.defend import fit_defence
from bna_export.detect import mad_scores, pair_statistics, weighted_median
from bna_export.model import adapt_module
from bna_export.reverse import ANY, Problem, reverse_engineer
from bna_export.scenario import build_scenario, synthetic_scenario_data
from bna_export.settings import Settings
from bna_export.sweep import _weights, pair_problems


@pytest.mark.parametrize("n", [1, 2, 5, 10, 11])
def test_equal_weights_give_numpys_median(n):
    v = np.random.default_rng(n).random(n)
    assert weighted_median(v, np.ones(n)) == pytest.approx(np.median(v), abs=0)
    assert weighted_median(v, np.full(n, 3.5)) == pytest.approx(np.median(v), abs=1e-15)


def test_weights_count_values_as_repeats():
    v, w = np.array([1.0, 2.0, 10.0]), np.array([1.0, 1.0, 4.0])
    assert weighted_median(v, w) == np.median([1.0, 2.0, 10, 10, 10, 10])
    v, w = np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 1.0, 1.0, 1.0])
    assert weighted_median(v, w) == np.median([1.0, 1, 1, 2, 3, 4])


def test_weighted_scores_equal_scores_of_the_expanded_sample():
    rng = np.random.default_rng(0)
    v = rng.random(7)
    w = rng.integers(1, 4, 7).astype(float)
    expanded = np.repeat(v, w.astype(int))
    got = mad_scores(v, weights=w)
    want = mad_scores(expanded)[np.cumsum(w.astype(int)) - 1]
    np.testing.assert_allclose(got, want)


def test_row_weights_and_source_normalisation():
    k = 5
    solved = np.zeros((k, k), dtype=bool)
    solved[0, [1, 2]] = True  # two chosen
    solved[0, 3] = True  # one reference for the two unsolved-or-reference pairs 3, 4
    w = _weights(solved, {0: {3}}, k)
    assert w[0, 1] == w[0, 2] == 1.0 and w[0, 3] == 2.0 and np.isnan(w[0, 4])
    sizes = np.where(solved, np.array([[0, 1.0, 4.0, 9.0, 0]]), np.nan)
    st = pair_statistics(sizes, "source", w)
    # the weighted median of the row's other solved pairs: {4, 9, 9} for (0, 1), {1, 4} for
    # the reference (0, 3), which leaves with the unsolved pair it stands for
    assert st[0, 1] == pytest.approx(9.0) and st[0, 3] == pytest.approx(2.5 / 9)


def _mad_scale(stats: np.ndarray, weights: np.ndarray | None = None) -> float:
    ok = ~np.isnan(stats)
    v, w = stats[ok], None if weights is None else weights[ok]
    return 1.4826 * weighted_median(np.abs(v - weighted_median(v, w)), w)


def test_a_sampled_sweep_keeps_the_spread_of_the_exhaustive_one():
    """No backdoor, 40 classes: each source's 2 easiest targets plus 3 weighted references give
    the MAD scale of every pair (normalising a pair by a median that holds the pair itself put
    a third of the weight at exactly 1 and halved the scale, making natural pairs outliers)."""
    rng, k = np.random.default_rng(0), 40
    for _ in range(10):
        z = np.exp(rng.normal(0, 0.3, (k, k)) + rng.normal(0, 0.3, (k, 1)))
        np.fill_diagonal(z, np.nan)
        solved, refs = np.zeros((k, k), dtype=bool), {}
        for s in range(k):
            solved[s, np.argsort(np.nan_to_num(z[s], nan=np.inf))[:2]] = True
            rest = [t for t in range(k) if t != s and not solved[s, t]]
            refs[s] = set(rng.choice(rest, 3, replace=False).tolist())
            solved[s, sorted(refs[s])] = True
        w = _weights(solved, refs, k)
        sampled = _mad_scale(pair_statistics(np.where(solved, z, np.nan), "source", w), w)
        assert 0.75 < sampled / _mad_scale(pair_statistics(z, "source")) < 1.4


def test_exhaustive_sweep_is_every_ordered_pair():
    probs = pair_problems(4, ["patch"], 2)
    assert len(probs) == 4 * 3 * 2 and len(set(probs)) == len(probs)
    assert all(p.target != p.sources[0] for p in probs)


@pytest.fixture(scope="module")
def twelve():
    """12 equidistant synthetic classes, all-to-one to 0 with a 3×3 patch."""
    x, y = synthetic_scenario_data(n_classes=12, per_class=200, equidistant=True)
    return build_scenario(x, y, attack="patch", target=0, width=8, epochs=6, seed=0)


def test_untargeted_problem_leaves_its_source(twelve):
    model = adapt_module(twelve.net, torch.from_numpy(twelve.test.x[:2]))
    est = reverse_engineer(model, twelve.defender, [Problem("perturbation", ANY, (3,))], (0, 1))
    assert est[0].success >= 0.95
    x = torch.from_numpy(twelve.defender.x[twelve.defender.y == 3])
    with torch.no_grad():
        pred = model(est[0].apply(x, 0.0, 1.0)).argmax(1)
    assert (pred != 3).float().mean() >= 0.95


@pytest.mark.slow
def test_screen_finds_the_all_to_one_target_with_fewer_problems(twelve):
    s = Settings()
    s = dataclasses.replace(s, detect=dataclasses.replace(s.detect, screen_above=8))
    out = fit_defence(
        adapt_module(twelve.net, torch.from_numpy(twelve.test.x[:2])), twelve.defender, settings=s
    )
    h = out.fit.header
    sweep = h["detection"]["sweep"]
    assert not sweep["exhaustive"]
    assert sweep["problems"] < 12 * 11 * 2  # fewer than every ordered pair
    assert h["targets"] == [0]
    assert h["sources"]["0"] == [c for c in range(1, 12)]
