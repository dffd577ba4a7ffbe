"""The fit file's detection (:class:`~bna_export.fitfile.records.Detection`, and each pair's
score :class:`~bna_export.fitfile.records.PairScore`): its header part, written and read here
for :mod:`bna_export.fitfile.layout`."""

from __future__ import annotations

from typing import Any

import numpy as np

from .fields import (
    class_key,
    fail,
    get,
    opt_bool,
    opt_float,
    opt_int,
    pair,
    pair_key,
    read_bool,
    read_dict,
    read_float,
    read_int,
    read_list,
    read_str,
)
from .records import Detection, Intrinsic, PairScore


def _finite(values: Any) -> list[float | None]:
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def score_header(p: PairScore) -> dict[str, Any]:
    out = {
        "source": p.source,
        "target": p.target,
        "size": p.size,
        "statistic": p.statistic,
        "score": p.score,
        "detected": p.detected,
    }
    if p.weight is not None:
        out["weight"] = p.weight
    return out


def detection_header(d: Detection) -> dict[str, Any]:
    return {
        "rule": d.rule,
        "normalise": d.normalise,
        "consistency": d.consistency,
        "threshold": d.threshold,
        "side": d.side,
        "scores_computed": d.scores_computed,
        "pair_families": {f"{s}:{t}": f for (s, t), f in sorted(d.pair_families.items())},
        "detected_pairs": [list(p) for p in d.detected_pairs],
        "all_to_one": {str(t): f for t, f in d.all_to_one.items()},
        "target_scores": {f: _finite(v) for f, v in d.target_scores.items()},
        "pooled_scores": {f: _finite(v) for f, v in d.pooled_scores.items()},
        "pooled_sizes": {f: _finite(v) for f, v in d.pooled_sizes.items()},
        "intrinsic": {
            str(t): {
                "family": i.family,
                "pooled_size": i.pooled_size,
                "pair_sizes": {str(s): z for s, z in i.pair_sizes.items()},
                "ratios": dict(i.ratios),
                "kept": list(i.kept),
                "dropped": list(i.dropped),
            }
            for t, i in d.intrinsic.items()
        },
        "sweep": dict(d.sweep),
        "all_to_all": [list(p) for p in d.all_to_all],
        "natural": {str(t): dict(a) for t, a in d.natural.items()},
        "natural_dropped": list(d.natural_dropped),
    }


# --- reading ---


def read_score(v: Any, what: str) -> PairScore:
    d = read_dict(v, what)
    return PairScore(
        opt_int(get(d, "source", what), f"{what}.source"),
        read_int(get(d, "target", what), f"{what}.target"),
        read_float(get(d, "size", what), f"{what}.size"),
        read_float(get(d, "statistic", what), f"{what}.statistic"),
        opt_float(get(d, "score", what), f"{what}.score"),
        opt_bool(get(d, "detected", what), f"{what}.detected"),
        opt_float(d.get("weight"), f"{what}.weight"),
    )


def _intrinsic(v: Any, what: str) -> Intrinsic:
    d = read_dict(v, what)
    sizes = read_dict(get(d, "pair_sizes", what), f"{what}.pair_sizes")
    ratios = read_dict(get(d, "ratios", what), f"{what}.ratios")
    return Intrinsic(
        read_str(get(d, "family", what), f"{what}.family"),
        opt_float(get(d, "pooled_size", what), f"{what}.pooled_size"),
        {class_key(s, what): read_float(z, f"{what}.pair_sizes") for s, z in sizes.items()},
        {read_str(f, what): opt_float(r, f"{what}.ratios") for f, r in ratios.items()},
        read_list(get(d, "kept", what), f"{what}.kept", read_int),
        read_list(get(d, "dropped", what), f"{what}.dropped", read_int),
    )


def _per_family(v: Any, what: str) -> dict[str, tuple[float | None, ...]]:
    return {f: read_list(x, f"{what}.{f}", opt_float) for f, x in read_dict(v, what).items()}


def _threshold(v: Any) -> float:
    t = read_float(v, "detection.threshold")
    if not 0 < t < float("inf"):
        raise fail("detection.threshold is not a positive number")
    return t


def _natural(v: Any) -> dict[int, dict[str, float]]:
    w = "detection.natural"
    return {
        class_key(t, w): {
            read_str(f, w): read_float(a, f"{w}.{t}") for f, a in read_dict(x, f"{w}.{t}").items()
        }
        for t, x in read_dict(v, w).items()
    }


def read_detection(v: Any) -> Detection:
    w = "detection"
    d = read_dict(v, w)
    families = read_dict(get(d, "pair_families", w), "detection.pair_families")
    return Detection(
        read_str(get(d, "rule", w), "detection.rule"),
        read_str(get(d, "normalise", w), "detection.normalise"),
        read_float(get(d, "consistency", w), "detection.consistency"),
        _threshold(get(d, "threshold", w)),
        read_str(get(d, "side", w), "detection.side"),
        read_bool(get(d, "scores_computed", w), "detection.scores_computed"),
        {pair_key(k, w): read_str(f, "detection.pair_families") for k, f in families.items()},
        read_list(get(d, "detected_pairs", w), "detection.detected_pairs", pair),
        {
            class_key(t, w): read_str(f, "detection.all_to_one")
            for t, f in read_dict(get(d, "all_to_one", w), "detection.all_to_one").items()
        },
        _per_family(get(d, "target_scores", w), "detection.target_scores"),
        _per_family(d.get("pooled_scores", {}), "detection.pooled_scores"),
        _per_family(d.get("pooled_sizes", {}), "detection.pooled_sizes"),
        {
            class_key(t, w): _intrinsic(i, f"detection.intrinsic.{t}")
            for t, i in read_dict(get(d, "intrinsic", w), "detection.intrinsic").items()
        },
        read_dict(d.get("sweep", {}), "detection.sweep"),
        read_list(d.get("all_to_all", []), "detection.all_to_all", pair),
        _natural(d.get("natural", {})),
        read_list(d.get("natural_dropped", []), "detection.natural_dropped", read_int),
    )
