import dataclasses

import numpy as np
import pytest

from bna_export import artifact, fitfile
from bna_export.errors import BadInputError
from bna_export.fitfile import Detection, PairScore
from bna_export.report import (
    detected_pairs,
    family_votes,
    fit_lines,
    fit_summary,
    inspect_lines,
    plot_scores,
    score_histograms,
    signed_scores,
)


def records(scores, detected=(), threshold=7.0, computed=True):
    """(scores, detection) records of a sweep with these pairs' statistics and scores."""
    entries = {
        fam: [
            PairScore(s, t, 1 / st, st, sc, (s, t) in detected and fam == "patch")
            for (s, t), st, sc in rows
        ]
        for fam, rows in scores.items()
    }
    detection = Detection(
        rule="union",
        normalise="source",
        consistency=1.4826,
        threshold=threshold,
        side="large",
        scores_computed=computed,
        pair_families={(s, t): "patch" for s, t in detected},
        detected_pairs=tuple(detected),
        all_to_one={},
        target_scores={},
        pooled_scores={},
        pooled_sizes={},
        intrinsic={},
        sweep={},
    )
    return entries, detection


ROWS = [((0, 1), 1.0, 0.2), ((1, 0), 0.9, 0.5), ((0, 2), 1.1, 0.7), ((2, 0), 5.0, 9.5)]


def test_signed_scores_put_small_triggers_on_the_plus_side():
    got = signed_scores(records({"patch": ROWS})[0]["patch"])
    np.testing.assert_allclose(got, [-0.2, -0.5, 0.7, 9.5])
    inf = [PairScore(0, 1, 0.5, 2.0, None, False), PairScore(1, 0, 1.0, 1.0, 0.0, False)]
    assert signed_scores(inf)[0] == np.inf


def test_histograms_count_every_pair_and_mark_the_detected():
    (h,) = score_histograms(*records({"patch": ROWS}, detected=[(2, 0)]))
    assert h.family == "patch" and h.pairs == 4 and sum(h.counts) == 4
    assert h.edges[0] == -1.0 and h.edges[-1] >= 9.0 and sum(h.detected) == 1
    nine = h.edges.index(9.0)
    assert h.counts[nine] == 1 and h.detected[nine] == 1
    assert score_histograms(*records({"patch": ROWS}, computed=False)) == []


def test_detected_pairs_carry_every_family_score():
    rows = detected_pairs(*records({"patch": ROWS, "perturbation": ROWS}, detected=[(2, 0)]))
    assert rows == [
        {"source": 2, "target": 0, "family": "patch", "patch_score": 9.5, "perturbation_score": 9.5}
    ]


def test_plot_needs_a_sweep(tmp_path):
    with pytest.raises(BadInputError, match="no pair sweep"):
        plot_scores(*records({"patch": ROWS}, computed=False), tmp_path / "x.png")
    plot_scores(*records({"patch": ROWS}, detected=[(2, 0)]), tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_family_votes_count_each_source_s_smallest_trigger():
    """Sizes are 1 / statistic: source 0's smallest trigger goes to 2 (1/1.1 < 1/1.0) though
    its score is infinite (None: MAD 0), sources 1 and 2 have only a pair to 0."""
    rows = [((0, 1), 1.0, 0.2), ((0, 2), 1.1, None), ((1, 0), 0.9, 0.5), ((2, 0), 5.0, 9.5)]
    entries, _ = records({"patch": rows})
    votes, voters, effect = family_votes(entries, "patch")
    assert votes.tolist() == [2, 0, 1] and voters.tolist() == [2, 2, 2]
    # sizes 1 and 1 / 1.1 in row 0 (median m), 1 / 0.9 and 1 / 9.5 alone in rows 1 and 2
    m = (1.0 + 1 / 1.1) / 2
    np.testing.assert_allclose(effect, [1.0, m, m * 1.1])
    screened = [PairScore(0, 1, 1.0, 1.0, 0.0, False, 2.0)]
    assert family_votes({"patch": screened}, "patch") is None  # a screen's weighted pairs
    assert family_votes(entries, "blend") is None


def test_the_natural_feature_check_is_shown_and_kept_in_the_fit_file(a2o_detected_file):
    rec = fitfile.load(a2o_detected_file[0])
    det = dataclasses.replace(
        rec.detection, natural={3: {"patch": 0.61, "blend": 0.58}, 5: {}}, natural_dropped=(3,)
    )
    rec = fitfile.read(artifact.decode(artifact.encode(fitfile.to_fit(
        dataclasses.replace(rec, detection=det)
    ))))  # fmt: skip
    assert rec.detection.natural == {3: {"patch": 0.61, "blend": 0.58}, 5: {}}
    assert "  target 3: dropped (a natural hub: its triggers look like t inside)" in fit_lines(
        rec, "x.bna", 1.0
    )
    shown = inspect_lines(rec, "x.bna")
    assert (
        "natural-feature check, target 3: feature alignment blend 0.58, patch 0.61; "
        "dropped: a natural hub" in shown
    )
    assert "natural-feature check, target 5: feature alignment no trigger succeeded; kept" in shown
    assert fit_summary(rec)["natural_dropped"] == [3]
