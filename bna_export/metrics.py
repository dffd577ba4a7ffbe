"""ACC, ASR, SIA, TPR and FPR of a (mitigated) classifier.

ACC: accuracy on clean images. ASR: share of triggered images answered with their attack label.
SIA: share of triggered images answered with their true source class. TPR: share of triggered
images flagged. FPR: share of clean images of the target classes that get flagged. A metric
that is not defined (no triggered set, no detector, no target-class image) is None.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _share(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def compute_metrics(
    clean_label: np.ndarray,
    clean_y: np.ndarray,
    clean_flag: np.ndarray | None = None,
    trig_label: np.ndarray | None = None,
    trig_y: np.ndarray | None = None,
    attack_label: np.ndarray | None = None,
    trig_flag: np.ndarray | None = None,
    targets: Sequence[int] = (),
) -> dict[str, float | None]:
    """The five metrics (lower-case keys); FPR is over clean images whose class is in targets."""
    out: dict[str, float | None] = {
        "acc": _share(clean_label == clean_y),
        "asr": None,
        "sia": None,
        "tpr": None,
        "fpr": None,
    }
    if trig_label is not None and trig_y is not None and attack_label is not None:
        out["asr"] = _share(trig_label == attack_label)
        out["sia"] = _share(trig_label == trig_y)
        if trig_flag is not None:
            out["tpr"] = _share(trig_flag)
    if clean_flag is not None and len(targets):
        out["fpr"] = _share(clean_flag[np.isin(clean_y, np.asarray(targets))])
    return out
