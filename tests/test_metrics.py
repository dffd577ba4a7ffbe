import numpy as np
import pytest

from bna_export.metrics import compute_metrics


def test_known_answers():
    m = compute_metrics(
        clean_label=np.array([0, 1, 2, 2]),
        clean_y=np.array([0, 1, 2, 1]),
        clean_flag=np.array([False, True, False, False]),
        trig_label=np.array([2, 0, 2, 1]),
        trig_y=np.array([0, 0, 1, 1]),
        attack_label=np.array([2, 2, 2, 2]),
        trig_flag=np.array([False, True, False, True]),
        targets=[1],
    )
    assert m["acc"] == pytest.approx(0.75)
    assert m["asr"] == pytest.approx(0.5)
    assert m["sia"] == pytest.approx(0.5)
    assert m["tpr"] == pytest.approx(0.5)
    assert m["fpr"] == pytest.approx(0.5)  # class-1 clean images: one of two flagged


def test_undefined_metrics_are_none():
    m = compute_metrics(np.array([0]), np.array([0]))
    assert m == {"acc": 1.0, "asr": None, "sia": None, "tpr": None, "fpr": None}
