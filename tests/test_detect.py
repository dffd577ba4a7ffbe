from pathlib import Path

import numpy as np
import pytest

from bna_export.detect import (
    detect_pairs,
    effects,
    large_side_scores,
    mad_scores,
    outliers,
    pair_statistics,
)
from bna_export.settings import Settings
from bna_export.sweep import detect_sizes


def test_known_answer_even_count_uses_the_middle_mean():
    stats = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 100.0])
    # median 5.5 (np semantics, not torch's lower 5.0); |dev| median = 2.5
    scores = mad_scores(stats)
    assert scores[0] == pytest.approx(4.5 / (2.5 * 1.4826))
    assert scores[-1] == pytest.approx(94.5 / (2.5 * 1.4826))
    assert mad_scores(stats, consistency=1.0)[-1] == pytest.approx(94.5 / 2.5)


def test_zero_mad_is_handled():
    scores = mad_scores(np.array([1.0, 1.0, 1.0, 5.0]))
    assert scores.tolist() == [0.0, 0.0, 0.0, np.inf]
    assert mad_scores(np.array([])).shape == (0,)


def test_outliers_respect_threshold_and_side():
    stats = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 10.0, -8.0])
    scores = mad_scores(stats)
    assert outliers(stats, scores, 7.0, "large").tolist() == [0, 0, 0, 0, 0, 1, 0]
    assert outliers(stats, scores, 7.0, "small").tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert outliers(stats, scores, 7.0, "both").tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert not outliers(stats, scores, 1e9).any()


def test_shape_is_kept():
    stats = np.arange(12.0).reshape(3, 4)
    assert mad_scores(stats).shape == (3, 4)


def test_nan_entries_are_left_out():
    stats = np.array([[np.nan, 1.0, 1.1], [0.9, np.nan, 1.05], [0.95, 10.0, np.nan]])
    scores = mad_scores(stats)
    assert np.isnan(scores[0, 0]) and np.isnan(scores[1, 1])
    assert scores[2, 1] == pytest.approx(mad_scores(stats[~np.isnan(stats)])[-1])
    assert outliers(stats, scores, 7.0).tolist() == [
        [False, False, False],
        [False, False, False],
        [False, True, False],
    ]


def test_source_normalisation_divides_by_the_source_median():
    sizes = np.array([[np.nan, 2.0, 4.0, 8.0], [10.0, np.nan, 20.0, 40.0]] + [[1.0] * 4] * 2)
    sizes[2, 2] = sizes[3, 3] = np.nan
    st = pair_statistics(sizes, "source")
    assert st[0, 1] == pytest.approx(4.0 / 2.0) and st[1, 3] == pytest.approx(20.0 / 40.0)
    # a source that reaches everything easily is not an outlier by itself
    np.testing.assert_allclose(st[0, 1:], st[1, [0, 2, 3]])
    np.testing.assert_allclose(pair_statistics(sizes, "none")[0, 1:], [0.5, 0.25, 0.125])
    assert np.isnan(st[0, 0])


def sizes_with(backdoor: dict[tuple[int, int], float], k: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.uniform(8.0, 12.0, (k, k)) * rng.uniform(0.5, 2.0, (k, 1))  # source effects
    for p, v in backdoor.items():
        z[p] = v
    np.fill_diagonal(z, np.nan)
    return z


def test_all_to_one_and_all_to_all_pairs_are_found():
    a2o = detect_pairs({"patch": sizes_with({(s, 2): 0.5 for s in range(6) if s != 2})})
    assert a2o.targets == [2] and a2o.sources == {2: [0, 1, 3, 4, 5]}
    a2a = {(s, (s + 1) % 6): 0.4 for s in range(6)}
    det = detect_pairs({"patch": sizes_with({}), "perturbation": sizes_with(a2a, seed=1)})
    assert det.pairs == sorted(a2a) and set(det.family.values()) == {"perturbation"}
    assert det.target_family(3) == "perturbation"
    clean = detect_pairs({"patch": sizes_with({}), "perturbation": sizes_with({}, seed=2)})
    assert clean.pairs == [] and clean.targets == []


def alike_targets(easy: float, k: int = 8, seed: int = 0) -> np.ndarray:
    """Sizes on a model whose targets are all alike (10 ± 10 %, times a source effect), but
    for target 3, ``easy`` times cheaper from every source."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(9.0, 11.0, (k, k)) * rng.uniform(0.5, 2.0, (k, 1))
    z[:, 3] /= easy
    np.fill_diagonal(z, np.nan)
    return z


def test_effects_known_answer_and_weights():
    z = np.array([[np.nan, 4.0, 4.0, 1.0], [10.0, np.nan, 10.0, 2.0], [1.0, 1.0, np.nan, 0.5]])
    z = np.vstack([z, [4.0, 2.0, 1.0, np.nan]])
    # column 3: row medians 4, 10, 1 over sizes 1, 2, 0.5 -> median of 4, 5, 2
    eff = effects({"patch": z})["patch"]
    assert eff[3] == pytest.approx(4.0) and eff[1] == pytest.approx(1.0)
    np.testing.assert_allclose(effects({"patch": alike_targets(1.4)})["patch"][3], 1.4, rtol=0.1)
    weighted = effects({"patch": z}, {"patch": np.ones((4, 4))})["patch"]
    assert weighted.shape == (4,) and np.isfinite(weighted).all()


def test_a_column_needs_its_effect_not_only_its_score():
    """Targets all alike: a class 1.3× easier to reach from everywhere is a huge outlier among
    them, but not a backdoor's effect; 3× easier is detected."""
    mild = {"patch": alike_targets(1.3), "blend": alike_targets(1.3, seed=1)}
    det = detect_pairs(mild, min_effect=1.0)
    assert list(det.all_to_one) == [3] and det.target_scores["patch"][3] > 10  # score alone
    assert detect_pairs(mild).all_to_one == {}  # the default floor, 1.5
    strong = detect_pairs({"patch": alike_targets(3.0)})
    assert strong.targets == [3] and strong.sources == {3: [0, 1, 2, 4, 5, 6, 7]}
    assert strong.effects["patch"][3] == pytest.approx(3.0, rel=0.1)


def test_union_keeps_the_family_with_the_higher_score():
    z1 = sizes_with({(0, 1): 0.5, (2, 3): 0.3})
    z2 = sizes_with({(0, 1): 0.2}, seed=1)
    det = detect_pairs({"patch": z1, "perturbation": z2})
    assert det.pairs == [(0, 1), (2, 3)]
    assert det.family == {(0, 1): "perturbation", (2, 3): "patch"}


def test_pooled_rule_finds_a_target_that_every_class_reaches_cheaply():
    # the pairs say nothing (no pair or column is an outlier), the pooled triggers do
    rng = np.random.default_rng(3)
    pooled = rng.uniform(20.0, 40.0, 10)
    pairs = {"patch": sizes_with({}, k=10)}
    assert detect_pairs(pairs, pooled={"patch": pooled}).targets == []
    pooled[4] = 4.0
    det = detect_pairs(pairs, pooled={"patch": pooled})
    assert det.targets == [4] and det.sources == {4: [s for s in range(10) if s != 4]}
    assert det.all_to_one == {4: "patch"} and det.pooled_scores["patch"][4] > 7
    # with two families, an outlier in one of them only is a naturally easy class, not a
    # backdoor (unless pooled_families=1); in both, it is found
    other = rng.uniform(2.0, 4.0, 10)
    two = detect_pairs(
        {**pairs, "perturbation": pairs["patch"]}, pooled={"patch": pooled, "perturbation": other}
    )
    assert two.targets == []
    one = detect_pairs(pairs, pooled={"patch": pooled, "perturbation": other}, pooled_families=1)
    assert one.targets == [4]
    other[4] = 0.4
    two = detect_pairs(
        {**pairs, "perturbation": pairs["patch"]}, pooled={"patch": pooled, "perturbation": other}
    )
    assert two.targets == [4] and two.all_to_one[4] in ("patch", "perturbation")
    assert detect_pairs(pairs).pooled_scores == {}
    # a target that is *hard* to reach from every class is no backdoor (large side only)
    pooled[4] = 400.0
    assert detect_pairs(pairs, pooled={"patch": pooled}).targets == []
    # most targets not reached (each at the family's largest size): no scale, no detection
    unreached = np.array([36.0] * 6 + [4.0, 30.0, 31.0, 36.0])
    det = detect_pairs(pairs, pooled={"patch": unreached})
    assert det.targets == [] and np.isnan(det.pooled_scores["patch"]).all()


def test_large_side_scores_keep_only_the_backdoor_side():
    stats = np.array([1.0, 2.0, 3.0, 10.0, 0.1, np.nan])
    scores = mad_scores(stats)
    side = large_side_scores(stats, scores)
    assert side[3] == scores[3] > 0 and side[4] == 0.0 < scores[4]  # 0.1: far, but small side
    assert side[5] == 0.0 and side[0] == 0.0


A2A = (0.5, 0.5)  # the defaults of detect.all_to_all_bar and detect.all_to_all_sources


def relative_sizes(backdoor: dict[tuple[int, int], float], k: int = 10, seed: int = 0):
    """Sizes 8-12 times a source effect; a planted pair is ``v`` times its source's effect."""
    rng = np.random.default_rng(seed)
    effect = rng.uniform(0.5, 2.0, (k, 1))
    z = rng.uniform(8.0, 12.0, (k, k))
    for p, v in backdoor.items():
        z[p] = v
    z = z * effect
    np.fill_diagonal(z, np.nan)
    return z


def test_the_all_to_all_rule_finds_a_mapping_no_pair_shows_alone():
    """Every source has one moderately small trigger to its own target: below the threshold pair
    by pair (scores 4.4-5.3), found by the rule; off, or with a screened sweep's weights, not."""
    k = 10
    a2a = {(s, (s + 3) % k): 6.0 for s in range(k)}
    sizes = {"patch": relative_sizes(a2a, seed=4)}
    plain = detect_pairs(sizes)
    assert plain.pairs == [] and max(plain.scores["patch"][p] for p in a2a) < 7
    det = detect_pairs(sizes, all_to_all=A2A)
    assert det.pairs == sorted(a2a) == det.all_to_all
    assert set(det.family.values()) == {"patch"}
    weights = {"patch": np.ones((k, k))}
    assert detect_pairs(sizes, weights=weights, all_to_all=A2A).pairs == []


@pytest.mark.parametrize("seed", range(20))
def test_the_all_to_all_rule_stays_quiet_on_clean_and_all_to_one_matrices(seed):
    clean = {"patch": relative_sizes({}, seed=seed), "blend": relative_sizes({}, seed=99 - seed)}
    assert detect_pairs(clean, all_to_all=A2A).all_to_all == []
    a2o = {"patch": relative_sizes({(s, 4): 6.0 for s in range(10) if s != 4}, seed=seed)}
    det = detect_pairs(a2o, all_to_all=A2A)
    assert det.all_to_all == [] and det.targets == [4]  # the all-to-one rule's, not this one's


def test_the_all_to_all_rule_keeps_one_source_per_target():
    """Two sources whose best pair is the same target: the better-scoring one is kept."""
    k = 10
    a2a = {(s, (s + 3) % k): 6.0 for s in range(k)}
    a2a[(3, 9)] = 4.0  # source 3's best pair now points at 9, which source 6 points at too
    found = detect_pairs({"patch": relative_sizes(a2a, seed=4)}, all_to_all=A2A).all_to_all
    assert (3, 9) in found and (6, 9) not in found and len({t for _, t in found}) == len(found)


SWEEPS = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep-sizes-2026-12-05"


def saved_detection(name: str):
    """The default rules, as ``fit`` runs them, on a sweep ``benchmarks/families.py --save``
    wrote."""
    saved = np.load(SWEEPS / f"{name}.npz")
    fams = [k.removeprefix("pairs_") for k in saved.files if k.startswith("pairs_")]
    sizes = {f: saved[f"pairs_{f}"] for f in fams}
    return detect_sizes(sizes, None, {f: saved[f"pooled_{f}"] for f in fams}, Settings())


@pytest.mark.parametrize("name", sorted(p.stem for p in SWEEPS.glob("*.npz")))
def test_saved_sweeps_of_real_models(name):
    """Sizes the sweep measured on the panel's digits CNNs and on clean CNNs of 8 equidistant
    synthetic classes (the test suite's own clean model is seed 1): every all-to-one backdoor
    is found with all 9 sources (the seed-0 patch by the vote rule alone), no clean or
    all-to-all model gets an all-to-one target, and a clean model keeps at most one natural
    pair (README, Detection: the effect floor)."""
    det = saved_detection(name)
    if name.startswith("cnn-") and "clean" not in name and "a2a" not in name:
        assert det.sources == {7: [0, 1, 2, 3, 4, 5, 6, 8, 9]}
    elif name == "binary-a2a":
        assert len(det.all_to_all) >= 8
    else:
        assert det.all_to_one == {} and len(det.pairs) <= 1
