import numpy as np

from bna_export.detect import detect_pairs, effects
from bna_export.target_rules import (
    VOTE_PAIRS,
    intrinsic_check,
    row_minimum_votes,
    vote_targets,
)

SHARE, FAMILIES = 2 / 3, 2  # the defaults of detect.vote_share and detect.pooled_families


def test_intrinsic_check_keeps_the_smallest_when_the_pooled_trigger_is_much_larger():
    # the paper's example: per-pair 3.02 (class 0) and 7.95 (class 8), pooled 27.18
    assert intrinsic_check({0: 3.02, 8: 7.95}, 27.18, 2.0) == [0]
    assert intrinsic_check({0: 3.02, 8: 7.95}, 9.0, 2.0) == [0, 8]  # one shared trigger
    assert intrinsic_check({4: 3.0}, 100.0, 2.0) == [4]  # a single source is kept


def test_row_minimum_votes_known_answer():
    nan = np.nan
    z = np.array(
        [
            [nan, 2.0, 1.0, 5.0],
            [1.0, nan, 3.0, 4.0],
            [9.0, 8.0, nan, 7.0],
            [nan, nan, nan, nan],  # a source with nothing solved votes for nothing
        ]
    )
    votes, voters = row_minimum_votes(z)
    assert votes.tolist() == [1, 0, 1, 1]
    assert voters.tolist() == [2, 2, 2, 3]  # every source with a solved pair but t itself


def sizes(planted: dict[tuple[int, int], float], seed: int, noise: int, k: int = 10) -> np.ndarray:
    """Pair sizes of one family: 8-12 (drawn from ``noise``) times a source effect, a target
    effect (some classes are easier to reach from anywhere) and, for each source, two nearest
    neighbours that are 0.4-0.7 times cheaper (all three drawn from ``seed``: the model's, the
    same in every family); a planted pair is ``v`` times its source's effect."""
    rng = np.random.default_rng(seed)
    source = rng.uniform(0.5, 2.0, (k, 1))
    target = rng.uniform(0.6, 1.6, (1, k))
    near = np.ones((k, k))
    for s in range(k):
        pick = rng.choice([t for t in range(k) if t != s], 2, replace=False)
        near[s, pick] = rng.uniform(0.4, 0.7, 2)
    z = np.random.default_rng(noise).uniform(8.0, 12.0, (k, k)) * target * near
    for p, v in planted.items():
        z[p] = v
    z = z * source
    np.fill_diagonal(z, np.nan)
    return z


def test_the_vote_rule_finds_a_target_that_is_most_sources_cheapest_but_no_outlier():
    """Class 4 is the cheapest way out of every source but one, only a little cheaper than
    their nearest neighbours: no pair and no column is an outlier; two families vote for it."""
    planted = {(s, 4): 2.6 for s in range(10) if s != 4}
    fams = {"patch": sizes(planted, 0, 1), "perturbation": sizes(planted, 0, 2)}
    plain = detect_pairs(fams)
    assert plain.targets == []
    assert max(np.nanmax(np.where(np.isnan(v), 0, v)) for v in plain.target_scores.values()) < 7
    found = vote_targets(fams, SHARE, FAMILIES)
    assert list(found) == [4] and found[4][0] >= 8 / 9
    det = detect_pairs(fams, vote_share=SHARE)
    assert det.targets == [4] and det.all_to_one == {4: found[4][1]}
    assert {s for s, _ in det.pairs} == set(range(10)) - {4}  # every source; intrinsic prunes
    # one family alone is not enough, nor a screened sweep (weights), nor the rule off
    alone = {"patch": fams["patch"], "blend": sizes({}, 0, 3)}
    assert detect_pairs(alone, vote_share=SHARE).pairs == []
    weights = {f: np.ones((10, 10)) for f in fams}
    assert detect_pairs(fams, weights=weights, vote_share=SHARE).pairs == []


def test_the_vote_rule_rarely_fires_on_clean_matrices_and_not_on_all_to_all_ones():
    """200 seeded clean models, two families sharing each model's easy targets and neighbours:
    at most 5 % fire (4 of 200 when the rule was written); all-to-all: none."""
    fired = sum(
        bool(
            vote_targets(
                {"patch": sizes({}, m, 1000 + m), "blend": sizes({}, m, 2000 + m)}, SHARE, 2
            )
        )
        for m in range(200)
    )
    assert fired <= 10
    a2a = {(s, (s + 3) % 10): 2.6 for s in range(10)}
    for m in range(20):
        fams = {"patch": sizes(a2a, m, 1), "blend": sizes(a2a, m, 2)}
        assert vote_targets(fams, SHARE, FAMILIES) == {}


def test_the_vote_rule_needs_enough_sources():
    """With four classes three sources can vote for a target; two of three agree too easily."""
    z = sizes({(0, 3): 1.0, (1, 3): 1.0, (2, 3): 1.0}, 0, 1, k=4)
    assert row_minimum_votes(z)[0][3] == 3
    assert vote_targets({"patch": z, "perturbation": z}, SHARE, FAMILIES) == {}


def test_a_hub_that_is_every_sources_cheapest_by_a_little_gets_no_vote():
    """A clean model whose classes are all alike can still have one class that every source
    reaches a little more easily (on 8 equidistant synthetic classes: 7 of 7 sources, 5-15 %
    cheaper, README); the vote rule asks for an effect as well (detect.min_effect)."""
    rng = np.random.default_rng(0)
    fams = {}
    for fam in ("perturbation", "blend"):
        z = rng.uniform(9.0, 11.0, (8, 8)) * rng.uniform(0.5, 2.0, (8, 1))
        np.fill_diagonal(z, np.nan)
        rest = np.delete(z, 5, axis=1)
        z[:, 5] = np.nanmin(rest, axis=1) * rng.uniform(0.85, 0.95, 8)
        z[5, 5] = np.nan
        fams[fam] = z
    assert row_minimum_votes(fams["blend"])[0][5] == 7
    assert list(vote_targets(fams, SHARE, FAMILIES)) == [5]  # the votes alone
    eff = effects(fams)
    assert 1.0 < max(eff["perturbation"][5], eff["blend"][5]) < 1.5
    assert vote_targets(fams, SHARE, FAMILIES, eff, 1.5) == {}
    assert detect_pairs(fams, vote_share=SHARE).targets == []
    planted = {(s, 4): 2.6 for s in range(10) if s != 4}  # a backdoor's effect is larger
    backdoor = {"patch": sizes(planted, 0, 1), "perturbation": sizes(planted, 0, 2)}
    assert min(v[4] for v in effects(backdoor).values()) > 2.5
    assert detect_pairs(backdoor, vote_share=SHARE).targets == [4]


def test_one_familys_votes_complete_a_target_that_has_pairs_over_the_threshold_there():
    """As the digits CNN's warp, found by the blend family alone (README, Detection): every
    source's cheapest blend goes to 4, three blend pairs pass the threshold, no other family
    votes. The pairs stand for the second family: 4 gets every source. Without pairs in the
    voting family, with one pair only, or with the pairs in another family, one family's votes
    do not."""
    planted = {(s, 4): 2.6 for s in range(10) if s != 4}
    strong = {**planted, **{(s, 4): 0.6 for s in (0, 1, 2)}}
    voting, other = sizes(strong, 0, 1), sizes({}, 0, 2)
    det = detect_pairs({"blend": voting, "patch": other}, vote_share=SHARE)
    assert det.targets == [4] and det.all_to_one == {4: "blend"}
    assert det.sources[4] == [s for s in range(10) if s != 4]
    pairs_only = detect_pairs({"blend": voting, "patch": other})  # the rule off: the pairs
    assert pairs_only.sources == {4: [0, 1, 2]}
    quiet = detect_pairs({"blend": sizes(planted, 0, 1), "patch": other}, vote_share=SHARE)
    assert quiet.pairs == []  # the same votes, no pair over the threshold
    few = {(s, 4): 0.6 for s in range(VOTE_PAIRS - 1)}  # one pair: a natural neighbour's
    single = sizes({**planted, **few}, 0, 1)
    assert detect_pairs({"blend": single, "patch": other}, vote_share=SHARE).sources == {4: [0]}
    three = {(s, 4): 0.6 for s in (0, 1, 2)}
    elsewhere = {"blend": sizes(planted, 0, 1), "patch": sizes(three, 0, 2)}
    votes = row_minimum_votes(elsewhere["patch"])[0][4]
    assert votes < SHARE * 9  # the pairs' family does not vote
    assert detect_pairs(elsewhere, vote_share=SHARE).sources == {4: [0, 1, 2]}


def test_a_pooled_outlier_completes_one_familys_votes_when_asked():
    """As the 5×5 corner patch on a VGG (README, Cases the panel does not hold): most sources'
    cheapest patch goes to 4, and 4's pooled patch trigger is an outlier, but no other family
    votes or finds it pooled and no pair passes the threshold. With ``pooled_vote`` the pooled
    outlier stands for the second family, in its own family only."""
    planted = {(s, 4): 2.6 for s in range(10) if s != 4}
    voting, other = sizes(planted, 0, 1), sizes({}, 0, 2)
    natural = np.array([40.0, 44.0, 22.0, 25.0, 31.0, 30.0, 28.0, 35.0, 20.0, 26.0])
    small = natural.copy()
    small[4] = 5.0
    both = {"patch": voting, "blend": other}
    pooled = {"patch": small, "blend": natural}
    off = detect_pairs(both, vote_share=SHARE, pooled=pooled)
    assert off.targets == [] and off.pooled_scores["patch"][4] > 7.0
    on = detect_pairs(both, vote_share=SHARE, pooled=pooled, pooled_vote=True)
    assert on.all_to_one == {4: "patch"}
    assert on.sources[4] == [s for s in range(10) if s != 4]
    swapped = {"patch": natural, "blend": small}  # the outlier in the family that does not vote
    assert detect_pairs(both, vote_share=SHARE, pooled=swapped, pooled_vote=True).targets == []
