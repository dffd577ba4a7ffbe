import numpy as np
import pytest

from bna_export.detect import mad_scores, outliers


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
