"""The one writer and the one reader of a fit file's header layout and tensor names
(:mod:`bna_export.artifact` owns the bytes): a record (:mod:`bna_export.fitfile.records`) becomes
a :class:`~bna_export.artifact.FitFile` and back, validated once when read."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import artifact
from ..artifact import FitFile
from ..errors import FitFileError
from .evidence import evidence_header, evidence_tensors, read_evidence
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
    tensor,
)
from .records import (
    Detection,
    FitRecord,
    Intrinsic,
    Layer,
    PairScore,
    Probes,
    Trigger,
    check_routing,
)

# --- writing -----------------------------------------------------------------------------


def _finite(values: Any) -> list[float | None]:
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def _score_json(p: PairScore) -> dict[str, Any]:
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


def _detection_json(d: Detection) -> dict[str, Any]:
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
    }


def header_of(rec: FitRecord) -> dict[str, Any]:
    """The JSON header of a record (without the format version and tensor table, which
    :mod:`bna_export.artifact` adds)."""
    targets = rec.targets
    return {
        "tool": "bna-export",
        "tool_version": rec.tool_version,
        "mode": rec.mode,
        "attacked": rec.attacked,
        "n_classes": rec.n_classes,
        "model_format": rec.model_format,
        "input_shape": list(rec.input_shape),
        "input_range": [float(rec.input_range[0]), float(rec.input_range[1])],
        "targets": targets,
        "sources": {str(t): list(s) for t, s in rec.sources.items()},
        "source_routed": list(rec.source_routed),
        "flag_drops": [float(d) for d in rec.flag_drops],
        "pairs": [list(p) for p in rec.pairs],
        "families": {str(t): f for t, f in rec.families.items()},
        "scores": {f: [_score_json(p) for p in v] for f, v in rec.scores.items()},
        "detection": _detection_json(rec.detection),
        "triggers": [
            {
                "index": tr.index,
                "family": tr.family,
                "target": tr.target,
                "sources": list(tr.sources),
                "restart": tr.restart,
                "refresh_round": tr.refresh_round,
                "size": tr.size,
                "relative_size": tr.relative_size,
                "success": tr.success,
                "steps": tr.steps,
                "used": tr.used,
            }
            for tr in rec.triggers
        ],
        "layers": [
            {
                "index": la.index,
                "name": la.name,
                "channels": la.channels,
                "eps": la.eps,
                "measured": la.measured,
            }
            for la in rec.layers
        ],
        "settings": rec.settings,
        "history": list(rec.history),
        "data": {"images": rec.data_images, "sha256": rec.data_sha256},
        **({} if rec.evidence is None else {"evidence": evidence_header(rec.evidence)}),
    }


_LAYER_TENSORS = ("running_mean", "running_var", "weight", "bias")
_PROBE_TENSORS = {
    "x": np.float32,
    "f_logits": np.float32,
    "g_logits": np.float32,
    "label": np.int64,
    "triggered": np.bool_,
    "logits": np.float32,
}
_PROBE_ROLES = ("truth", "trigger_of")  # optional: absent in fit files before ``report``


def to_fit(rec: FitRecord) -> FitFile:
    """The fit file of a record (encode it with :func:`bna_export.artifact.encode`)."""
    tensors: dict[str, np.ndarray] = {}
    for la in rec.layers:
        for key in _LAYER_TENSORS:
            tensors[f"layer.{la.index}.{key}"] = np.asarray(getattr(la, key), np.float32)
        tensors[f"theta.{la.index}"] = np.asarray(la.theta, np.float32)
        if la.probe_mean is not None:
            tensors[f"layer.{la.index}.probe_mean"] = np.asarray(la.probe_mean, np.float32)
    for tr in rec.triggers:
        for key, value in tr.params.items():
            tensors[f"trigger.{tr.index}.{key}"] = np.asarray(value, np.float32)
    if rec.probes is not None:
        for key, dtype in _PROBE_TENSORS.items():
            tensors[f"probe.{key}"] = np.asarray(getattr(rec.probes, key), dtype)
        for key in _PROBE_ROLES:
            if getattr(rec.probes, key) is not None:
                tensors[f"probe.{key}"] = np.asarray(getattr(rec.probes, key), np.int64)
    if rec.evidence is not None:
        tensors.update(evidence_tensors(rec.evidence))
    return FitFile(header_of(rec), tensors)


# --- reading -----------------------------------------------------------------------------


def _score(v: Any, what: str) -> PairScore:
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


def _detection(v: Any) -> Detection:
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
    )


def _trigger(v: Any, what: str, tensors: Mapping[str, np.ndarray]) -> Trigger:
    d = read_dict(v, what)
    index = read_int(get(d, "index", what), f"{what}.index")
    prefix = f"trigger.{index}."
    return Trigger(
        index,
        read_str(get(d, "family", what), f"{what}.family"),
        read_int(get(d, "target", what), f"{what}.target"),
        read_list(get(d, "sources", what), f"{what}.sources", read_int),
        read_int(get(d, "restart", what), f"{what}.restart"),
        read_int(d.get("refresh_round", 0), f"{what}.refresh_round"),
        read_float(get(d, "size", what), f"{what}.size"),
        read_float(get(d, "relative_size", what), f"{what}.relative_size"),
        read_float(get(d, "success", what), f"{what}.success"),
        read_int(get(d, "steps", what), f"{what}.steps"),
        read_bool(get(d, "used", what), f"{what}.used"),
        {k.removeprefix(prefix): a for k, a in tensors.items() if k.startswith(prefix)},
    )


def _layer(
    v: Any, i: int, n_targets: int, n_probes: int | None, tensors: Mapping[str, np.ndarray]
) -> Layer:
    what = f"layers[{i}]"
    d = read_dict(v, what)
    c = read_int(get(d, "channels", what), f"{what}.channels")
    stats = [tensor(tensors, f"layer.{i}.{k}", (c,)) for k in _LAYER_TENSORS]
    theta = tensor(tensors, f"theta.{i}", (n_targets, 4, c))
    probe = tensors.get(f"layer.{i}.probe_mean")
    if probe is not None and (n_probes is None or probe.shape != (n_probes, c)):
        raise FitFileError(f"fit file: tensor 'layer.{i}.probe_mean' has shape {probe.shape}")
    return Layer(
        i,
        read_str(get(d, "name", what), f"{what}.name"),
        c,
        read_float(get(d, "eps", what), f"{what}.eps"),
        read_bool(d.get("measured", False), f"{what}.measured"),
        *stats,
        theta,
        probe,
    )


def _probes(tensors: Mapping[str, np.ndarray], n_targets: int) -> Probes | None:
    names = [f"probe.{k}" for k in _PROBE_TENSORS]
    if not all(n in tensors for n in names):
        return None
    roles = [tensors.get(f"probe.{k}") for k in _PROBE_ROLES]
    p = Probes(*(tensors[n] for n in names), *roles)
    present = [r for r in roles if r is not None]
    ranks = {p.x.ndim >= 2, p.f_logits.ndim == 2, p.logits.ndim == 2, p.g_logits.ndim == 3}
    ranks |= {a.ndim == 1 for a in (p.label, p.triggered, *present)}
    if ranks != {True} or any(not np.issubdtype(r.dtype, np.integer) for r in present):
        raise FitFileError("fit file: the probe tensors have the wrong rank")
    n = len(p.x)
    per_probe = [p.f_logits, p.label, p.triggered, p.logits, *present]
    if any(len(a) != n for a in per_probe) or p.g_logits.shape[:2] != (n_targets, n):
        raise FitFileError("fit file: the probe tensors disagree in length")
    return p


def read(fit: FitFile) -> FitRecord:
    """The record of a decoded fit file; raises :class:`FitFileError` on anything missing or
    of the wrong type or shape that the commands read (a fit file is untrusted input; fields
    added after format version 1 take their defaults when absent)."""
    h, t = fit.header, fit.tensors
    try:
        targets = read_list(get(h, "targets", "header"), "targets", read_int)
        if len(set(targets)) != len(targets):
            raise fail("a target is listed twice")
        raw_sources = read_dict(get(h, "sources", "header"), "sources")
        sources = {
            c: read_list(get(raw_sources, str(c), "sources"), f"sources.{c}", read_int)
            for c in targets
        }
        raw_families = read_dict(h.get("families", {}), "families")
        shape = read_list(get(h, "input_shape", "header"), "input_shape", read_int)
        lo, hi = read_list(get(h, "input_range", "header"), "input_range", read_float)
        if not -np.inf < lo < hi < np.inf:
            raise fail("input_range is not LO < HI, both finite")
        probes = _probes(t, len(targets))
        layers = read_list(get(h, "layers", "header"), "layers", lambda v, _w: v)
        data = read_dict(h.get("data", {}), "data")
        rec = FitRecord(
            read_str(h.get("tool_version", "unknown"), "tool_version"),
            read_str(get(h, "mode", "header"), "mode"),
            read_int(get(h, "n_classes", "header"), "n_classes"),
            read_str(h.get("model_format", "torch"), "model_format"),
            shape,
            (lo, hi),
            sources,
            {c: read_str(raw_families.get(str(c), ""), "families") for c in targets},
            {
                f: read_list(v, f"scores.{f}", _score)
                for f, v in read_dict(get(h, "scores", "header"), "scores").items()
            },
            _detection(get(h, "detection", "header")),
            read_list(get(h, "triggers", "header"), "triggers", lambda v, w: _trigger(v, w, t)),
            tuple(
                _layer(v, i, len(targets), None if probes is None else len(probes.x), t)
                for i, v in enumerate(layers)
            ),
            read_dict(get(h, "settings", "header"), "settings"),
            read_list(h.get("history", []), "history", read_float),
            read_int(data.get("images", 0), "data.images"),
            read_str(data.get("sha256", ""), "data.sha256"),
            probes,
            read_evidence(h, t, len(targets), len(layers)),
            read_list(h.get("source_routed", []), "source_routed", read_int),
            read_list(h.get("flag_drops", []), "flag_drops", read_float),
        )
        check_routing(rec)
    except ValueError as exc:  # e.g. input_range of the wrong length
        raise fail(str(exc)) from exc
    _check_classes(rec)
    return rec


def _check_classes(rec: FitRecord) -> None:
    """Every class number the record names lies in [0, n_classes): the readers index
    per-class arrays with them."""
    d = rec.detection
    named = {
        "targets": [*rec.sources, *(s for v in rec.sources.values() for s in v)],
        "scores": [c for v in rec.scores.values() for e in v for c in (e.source, e.target)],
        "detection": [
            *(c for p in (*d.pair_families, *d.detected_pairs, *d.all_to_all) for c in p),
            *d.all_to_one,
            *d.intrinsic,
            *(c for i in d.intrinsic.values() for c in (*i.pair_sizes, *i.kept, *i.dropped)),
        ],
        "triggers": [c for tr in rec.triggers for c in (tr.target, *tr.sources)],
    }
    if rec.n_classes < 1:
        raise fail("n_classes is not a positive number")
    for what, classes in named.items():
        bad = [c for c in classes if c is not None and not 0 <= c < rec.n_classes]
        if bad:
            raise fail(f"{what} name class {bad[0]}, outside 0..{rec.n_classes - 1}")


def load(path: str | Path) -> FitRecord:
    """Read, check and validate a fit file."""
    return read(artifact.load(path))
